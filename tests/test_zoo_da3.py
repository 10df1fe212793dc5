"""Depth Anything 3 in the models zoo: exact DA3-Large size and names, tiny forward/backward,
view-order handling, camera conditioning, input validation, checkpoint round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lite3r_compile import models_zoo
from lite3r_compile.models_zoo.da3 import DA3_TINY, DA3Config, DepthAnything3, build_da3_large, build_da3_tiny
from lite3r_compile.models_zoo.da3_camera import (
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
)
from lite3r_compile.models_zoo.da3_reference_view import (
    reorder_by_reference,
    restore_original_order,
    select_reference_view,
)

DA3_LARGE_PARAMETERS = 410_941_767

# Upstream names in an official DA3-Large checkpoint (as saved by DepthAnything3Net).
UPSTREAM_KEYS = [
    "backbone.pretrained.cls_token",
    "backbone.pretrained.camera_token",
    "backbone.pretrained.pos_embed",
    "backbone.pretrained.patch_embed.proj.weight",
    "backbone.pretrained.blocks.0.attn.qkv.weight",
    "backbone.pretrained.blocks.0.ls1.gamma",
    "backbone.pretrained.blocks.8.attn.q_norm.weight",
    "backbone.pretrained.blocks.23.attn.k_norm.bias",
    "backbone.pretrained.blocks.23.mlp.fc2.weight",
    "backbone.pretrained.norm.weight",
    "head.norm.weight",
    "head.projects.3.weight",
    "head.resize_layers.0.weight",
    "head.resize_layers.3.weight",
    "head.scratch.layer4_rn.weight",
    "head.scratch.refinenet1.resConfUnit1.conv1.weight",
    "head.scratch.refinenet4.resConfUnit2.conv2.bias",
    "head.scratch.refinenet4_aux.out_conv.weight",
    "head.scratch.output_conv1.weight",
    "head.scratch.output_conv2.2.weight",
    "head.scratch.output_conv1_aux.3.4.weight",
    "head.scratch.output_conv2_aux.0.2.weight",
    "head.scratch.output_conv2_aux.3.5.bias",
    "cam_dec.backbone.2.weight",
    "cam_dec.fc_t.weight",
    "cam_dec.fc_qvec.bias",
    "cam_dec.fc_fov.0.weight",
    "cam_enc.pose_branch.fc1.weight",
    "cam_enc.token_norm.weight",
    "cam_enc.trunk.3.ls2.gamma",
    "cam_enc.trunk_norm.bias",
]

# Parameters that get no gradient by construction: upstream builds ray-head necks for the three
# coarser pyramid levels but never uses their output.
UNUSED_PREFIXES = tuple(f"head.scratch.output_conv{i}_aux.{level}." for i in (1, 2) for level in (0, 1, 2))


def _tiny(seed: int = 0, **overrides) -> DepthAnything3:
    torch.manual_seed(seed)
    return build_da3_tiny(**overrides)


def _cameras(batch: int, views: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random world-to-camera matrices (B, S, 4, 4) and pinhole intrinsics (B, S, 3, 3)."""
    generator = torch.Generator().manual_seed(1)
    quat = torch.randn(batch, views, 4, generator=generator)
    extrinsics = torch.eye(4).repeat(batch, views, 1, 1)
    extrinsics[:, :, :3, :3] = quat_to_mat(quat)
    extrinsics[:, :, :3, 3] = torch.randn(batch, views, 3, generator=generator)
    intrinsics = torch.tensor([[1.2 * size, 0.0, size / 2], [0.0, 1.2 * size, size / 2], [0.0, 0.0, 1.0]])
    return extrinsics, intrinsics.repeat(batch, views, 1, 1)


# ---------------------------------------------------------------------------------------------
# DA3-Large: size and names, on the meta device
# ---------------------------------------------------------------------------------------------


def test_da3_large_has_exactly_the_upstream_parameter_count_on_meta():
    with torch.device("meta"):
        model = build_da3_large()
    assert all(p.is_meta for p in model.parameters())
    assert models_zoo.count_parameters(model) == DA3_LARGE_PARAMETERS
    parts = {
        name: models_zoo.count_parameters(getattr(model, name)) for name in ("backbone", "head", "cam_enc", "cam_dec")
    }
    assert parts == {"backbone": 304_373_760, "head": 47_229_246, "cam_enc": 50_927_616, "cam_dec": 8_411_145}


def test_da3_large_from_the_registry_on_meta():
    model = models_zoo.create("da3-large", device="meta")
    assert isinstance(model, DepthAnything3)
    assert models_zoo.count_parameters(model) == DA3_LARGE_PARAMETERS


def test_da3_large_state_dict_uses_upstream_names():
    with torch.device("meta"):
        state = build_da3_large().state_dict()
    missing = [key for key in UPSTREAM_KEYS if key not in state]
    assert missing == []
    assert state["backbone.pretrained.pos_embed"].shape == (1, 37 * 37 + 1, 1024)
    assert state["backbone.pretrained.camera_token"].shape == (1, 2, 1024)
    assert state["head.norm.weight"].shape == (2048,)
    assert state["cam_dec.backbone.0.weight"].shape == (2048, 2048)
    # qk-norm only from block 8; the coarsest fusion block has no skip unit
    assert "backbone.pretrained.blocks.7.attn.q_norm.weight" not in state
    assert "head.scratch.refinenet4.resConfUnit1.conv1.weight" not in state
    assert not any("image_mean" in key or "image_std" in key for key in state)
    assert len(state) == 643


def test_da3_large_ray_head_layernorm_is_one_module_shared_by_every_level():
    with torch.device("meta"):
        head = build_da3_large().head
    norms = {id(head.scratch.output_conv2_aux[level][2]) for level in range(4)}
    assert len(norms) == 1


# ---------------------------------------------------------------------------------------------
# Tiny preset: every path, forward and backward on CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, views, height, width",
    [(1, 1, 28, 28), (2, 2, 42, 28), (1, 3, 28, 42), (2, 4, 42, 42)],
)
def test_da3_tiny_forward_backward_shapes(batch, views, height, width):
    model = _tiny()
    images = torch.rand(batch, views, 3, height, width)
    out = model(images, keep_ray=True)

    ray_h, ray_w = 8 * height // 14, 8 * width // 14
    expected = {
        "depth": (batch, views, height, width),
        "depth_conf": (batch, views, height, width),
        "ray": (batch, views, ray_h, ray_w, 6),
        "ray_conf": (batch, views, ray_h, ray_w),
        "extrinsics": (batch, views, 3, 4),
        "intrinsics": (batch, views, 3, 3),
    }
    assert {key: tuple(value.shape) for key, value in out.items()} == expected
    assert all(torch.isfinite(value).all() for value in out.values())
    assert (out["depth"] > 0).all() and (out["depth_conf"] >= 1).all() and (out["ray_conf"] >= 1).all()

    loss = sum(value.float().mean() for value in out.values())
    loss.backward()
    without_grad = [
        name
        for name, p in model.named_parameters()
        if (p.grad is None or not p.grad.abs().sum() > 0) and not name.startswith(UNUSED_PREFIXES)
    ]
    # the camera encoder runs only when cameras are given
    assert without_grad == [name for name, _ in model.named_parameters() if name.startswith("cam_enc.")]


def test_da3_tiny_drops_ray_outputs_by_default_like_upstream():
    out = _tiny()(torch.rand(1, 2, 3, 28, 28))
    assert set(out) == {"depth", "depth_conf", "extrinsics", "intrinsics"}


def test_da3_tiny_camera_conditioning_trains_the_camera_encoder():
    model = _tiny()
    images = torch.rand(2, 3, 3, 28, 28)
    extrinsics, intrinsics = _cameras(2, 3, 28)
    out = model(images, extrinsics, intrinsics, keep_ray=True)
    assert out["depth"].shape == (2, 3, 28, 28) and out["extrinsics"].shape == (2, 3, 3, 4)
    sum(value.mean() for value in out.values()).backward()
    for name, p in model.named_parameters():
        if name.startswith("cam_enc."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the learned camera token is replaced by the encoder's tokens
    assert model.backbone.pretrained.camera_token.grad is None
    unconditioned = model(images, keep_ray=True)
    assert not torch.allclose(unconditioned["depth"], out["depth"])
    # 3x4 extrinsics are accepted as well
    out_34 = model(images, extrinsics[:, :, :3], intrinsics, keep_ray=True)
    torch.testing.assert_close(out_34["depth"], out["depth"])


def test_da3_tiny_attention_scope_alternates_from_alt_start():
    """Blocks 0-1 see one view (B*S, N, C); from block 2 odd blocks see all views (B, S*N, C)."""
    model = _tiny()
    batch, views, tokens = 2, 3, 1 + 2 * 2
    seen = {}

    def record(index):
        def hook(module, args, kwargs):
            seen[index] = (tuple(args[0].shape), kwargs["pos"])

        return hook

    hooks = [
        block.attn.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, block in enumerate(model.backbone.pretrained.blocks)
    ]
    model(torch.rand(batch, views, 3, 28, 28))
    for hook in hooks:
        hook.remove()
    per_view, all_views = (batch * views, tokens, 64), (batch, views * tokens, 64)
    assert [seen[i][0] for i in range(6)] == [per_view, per_view, per_view, all_views, per_view, all_views]
    assert seen[0][1] is None and seen[1][1] is None
    blocks = model.backbone.pretrained.blocks
    assert [blk.attn.rope is not None for blk in blocks] == [False, False, True, True, True, True]
    assert [isinstance(blk.attn.q_norm, torch.nn.LayerNorm) for blk in blocks] == [False, False, True, True, True, True]
    # per-view positions: special token (0, 0), patches (row + 1, col + 1); all-view: patches (1, 1)
    local_pos, global_pos = seen[2][1], seen[3][1]
    assert local_pos[0].tolist() == [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2]]
    assert global_pos[0, :tokens].tolist() == [[0, 0], [1, 1], [1, 1], [1, 1], [1, 1]]


def test_da3_tiny_camera_token_replaces_cls_token_at_alt_start():
    model = _tiny()
    captured = {}
    alt = model.backbone.pretrained.blocks[2]
    hook = alt.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach().clone()))
    model(torch.rand(1, 2, 3, 28, 28), ref_view_strategy="first")
    hook.remove()
    first_tokens = captured["x"].reshape(1, 2, 5, 64)[:, :, 0]
    camera_token = model.backbone.pretrained.camera_token.detach()
    torch.testing.assert_close(first_tokens[0, 0], camera_token[0, 0])
    torch.testing.assert_close(first_tokens[0, 1], camera_token[0, 1])


def test_da3_tiny_is_deterministic():
    model = _tiny()
    images = torch.rand(1, 4, 3, 28, 28)
    first, second = model(images, keep_ray=True), model(images, keep_ray=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_da3_reference_view_outputs_come_back_in_input_order():
    """'middle' with 3 views puts view 1 first inside the backbone; that equals feeding the views
    in the order [1, 0, 2] with 'first' and putting the outputs back."""
    model = _tiny().eval()
    images = torch.rand(2, 3, 3, 28, 28)
    with torch.no_grad():
        middle = model(images, ref_view_strategy="middle", keep_ray=True)
        permuted = model(images[:, [1, 0, 2]], ref_view_strategy="first", keep_ray=True)
        plain = model(images, ref_view_strategy="first", keep_ray=True)
    for key in middle:
        torch.testing.assert_close(middle[key], permuted[key][:, [1, 0, 2]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(middle["depth"], plain["depth"])


def test_reorder_and_restore_views():
    x = torch.arange(2 * 5).reshape(2, 5, 1).float()
    reference = torch.tensor([2, 4])
    reordered = reorder_by_reference(x, reference)
    assert reordered[0, :, 0].tolist() == [2, 0, 1, 3, 4]
    assert reordered[1, :, 0].tolist() == [9, 5, 6, 7, 8]
    assert torch.equal(restore_original_order(reordered, reference), x)


def test_select_reference_view_strategies():
    tokens = torch.randn(3, 5, 4, 8)
    assert select_reference_view(tokens, "first").tolist() == [0, 0, 0]
    assert select_reference_view(tokens, "middle").tolist() == [2, 2, 2]
    for strategy in ("saddle_balanced", "saddle_sim_range"):
        chosen = select_reference_view(tokens, strategy)
        assert chosen.shape == (3,) and ((0 <= chosen) & (chosen < 5)).all()
    with pytest.raises(ValueError, match="saddle_balanced"):
        select_reference_view(tokens, "random")


def test_da3_head_chunking_does_not_change_outputs():
    chunked = _tiny(head_chunk_size=2).eval()
    whole = build_da3_tiny(head_chunk_size=None).eval()
    whole.load_state_dict(chunked.state_dict())
    images = torch.rand(2, 3, 3, 28, 28)
    with torch.no_grad():
        a, b = chunked(images, keep_ray=True), whole(images, keep_ray=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_da3_position_embedding_resizes_for_other_grids():
    vit = _tiny().backbone.pretrained
    assert vit.interpolate_pos_encoding(torch.zeros(1, 5, 64), 28, 28) is vit.pos_embed
    resized = vit.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 2, 64), 42, 28)
    assert resized.shape == (1, 7, 64)
    torch.testing.assert_close(resized[:, 0], vit.pos_embed[:, 0])
    assert vit.interpolate_pos_encoding(torch.zeros(1, 7, 64, dtype=torch.bfloat16), 42, 28).dtype == torch.bfloat16


def test_da3_tiny_runs_in_bfloat16_and_under_autocast():
    images = torch.rand(1, 3, 3, 28, 28)
    model = _tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, keep_ray=True)
    assert out["depth"].dtype == torch.float32 and torch.isfinite(out["depth"]).all()
    out = model.to(torch.bfloat16)(images.to(torch.bfloat16), keep_ray=True)
    assert out["depth"].dtype == torch.bfloat16 and out["depth"].shape == (1, 3, 28, 28)


# ---------------------------------------------------------------------------------------------
# Pose encoding
# ---------------------------------------------------------------------------------------------


def test_pose_encoding_round_trip_for_square_images():
    extrinsics, intrinsics = _cameras(2, 3, 28)
    cam_to_world = extrinsics[:, :, :3]
    encoding = extri_intri_to_pose_encoding(cam_to_world, intrinsics, (28, 28))
    assert encoding.shape == (2, 3, 9)
    decoded_pose, decoded_intrinsics = pose_encoding_to_extri_intri(encoding, (28, 28))
    torch.testing.assert_close(decoded_pose, cam_to_world, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded_intrinsics, intrinsics, rtol=1e-4, atol=1e-4)
    quat = mat_to_quat(cam_to_world[..., :3])
    assert (quat[..., 3] >= 0).all()
    torch.testing.assert_close(quat.norm(dim=-1), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# Input validation and config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 2, 3, 30, 28), r"height 30 .*multiple of the patch size 14"),
        ((1, 2, 3, 28, 20), r"width 20 .*multiple of the patch size 14"),
        ((1, 2, 3, 29, 43), r"height 29 .*width 43 .*multiple of the patch size 14"),
        ((3, 28, 28), r"\(B, S, 3, H, W\)"),
        ((1, 1, 2, 3, 28, 28), r"\(B, S, 3, H, W\)"),
        ((1, 2, 4, 28, 28), r"3 \(RGB\) channels"),
    ],
)
def test_da3_rejects_bad_images(shape, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(torch.rand(*shape))


def test_da3_bad_size_message_names_valid_sizes():
    with pytest.raises(ValueError) as error:
        _tiny()(torch.rand(1, 1, 3, 30, 28))
    assert "28 or 42" in str(error.value)


def test_da3_accepts_unbatched_views():
    out = _tiny()(torch.rand(2, 3, 28, 28))
    assert out["depth"].shape == (1, 2, 28, 28)


def test_da3_rejects_incomplete_or_mismatched_cameras():
    model = _tiny()
    images = torch.rand(1, 2, 3, 28, 28)
    extrinsics, intrinsics = _cameras(1, 2, 28)
    with pytest.raises(ValueError, match="both extrinsics and intrinsics"):
        model(images, extrinsics)
    with pytest.raises(ValueError, match=r"extrinsics must be \(1, 2, 4, 4\)"):
        model(images, extrinsics[:, :1], intrinsics)
    with pytest.raises(ValueError, match=r"intrinsics must be \(1, 2, 3, 3\)"):
        model(images, extrinsics, intrinsics[..., :2])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 3}, "multiple of 4"),
        ({"alt_start": 0}, "alt_start"),
        ({"out_layers": (1, 3, 4, 5)}, "out_layers"),
        ({"out_layers": (5, 4, 3, 2)}, "ascending"),
        ({"head_features": 12}, "head_features"),
        ({"ref_view_strategy": "random"}, "ref_view_strategy"),
        ({"img_size": 30}, "img_size"),
    ],
)
def test_da3_config_rejects_inconsistent_shapes(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DA3_TINY, **overrides)


def test_da3_config_defaults_are_da3_large():
    config = DA3Config()
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (1024, 24, 16, 14)
    assert (config.alt_start, config.qknorm_start, config.rope_start) == (8, 8, 8)
    assert config.out_layers == (11, 15, 19, 23)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_da3_tiny_loads_an_upstream_style_checkpoint_with_model_prefix(tmp_path):
    source = _tiny(seed=3).eval()
    path = tmp_path / "da3_tiny.pt"
    torch.save({f"model.{key}": value for key, value in source.state_dict().items()}, path)

    loaded = models_zoo.load("da3-tiny", path).eval()
    assert loaded.image_mean.device.type == "cpu"
    images = torch.rand(1, 3, 3, 28, 28)
    with torch.no_grad():
        expected, actual = source(images, keep_ray=True), loaded(images, keep_ray=True)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_da3_traces_as_one_graph():
    # the camera encoder's quaternion picks its best-conditioned candidate by gather, not by a
    # boolean mask, so Dynamo sees the whole model with static shapes
    model = models_zoo.create("da3-tiny").eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*model.example_inputs())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
