"""VGGT's DPT heads and track head: exact sizes, state-dict names, behaviour on tiny configs."""

from __future__ import annotations

import importlib
import math
import pathlib
import sys
import types

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

_ZOO_DIR = pathlib.Path(__file__).resolve().parents[1] / "lite3r_compile" / "models_zoo"
if not (_ZOO_DIR / "__init__.py").exists() and "lite3r_compile.models_zoo" not in sys.modules:
    # The zoo package's __init__ is written by another change; these modules import only each other.
    _pkg = types.ModuleType("lite3r_compile.models_zoo")
    _pkg.__path__ = [str(_ZOO_DIR)]
    sys.modules["lite3r_compile.models_zoo"] = _pkg

dpt = importlib.import_module("lite3r_compile.models_zoo.dpt")
head_utils = importlib.import_module("lite3r_compile.models_zoo.head_utils")
track_modules = importlib.import_module("lite3r_compile.models_zoo.track_modules")
vggt_track = importlib.import_module("lite3r_compile.models_zoo.vggt_track")
DPTHead = dpt.DPTHead
TrackHead = vggt_track.TrackHead

PATCH = 14
SPECIAL_TOKENS = 5  # camera + 4 registers, as in VGGT
TINY_DIM = 32
TINY_DPT = dict(features=16, out_channels=[8, 16, 32, 32], intermediate_layer_idx=[0, 1, 2, 3])


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tokens(batch: int, frames: int, height: int, width: int, layers: int = 4, grad: bool = False):
    patches = (height // PATCH) * (width // PATCH)
    return [
        torch.randn(batch, frames, SPECIAL_TOKENS + patches, TINY_DIM, requires_grad=grad) for _ in range(layers)
    ]


def _tiny_track_head(**overrides) -> TrackHead:
    kwargs = dict(TINY_DPT, dim_in=TINY_DIM, hidden_size=32)
    kwargs.update(overrides)
    return TrackHead(**kwargs)


# ---------------------------------------------------------------------------------------------
# VGGT-1B sizes and names (meta device: no memory, no init cost)
# ---------------------------------------------------------------------------------------------


def test_vggt_1b_head_parameter_counts_are_exact():
    with torch.device("meta"):
        point = DPTHead(dim_in=2048, output_dim=4, activation="inv_log", conf_activation="expp1")
        depth = DPTHead(dim_in=2048, output_dim=2, activation="exp", conf_activation="expp1")
        track = TrackHead(dim_in=2048, patch_size=14)
    assert _count(point) == 32_654_628
    assert _count(depth) == 32_654_562
    assert _count(track) == 65_941_396
    assert len(point.state_dict()) == 62
    assert len(depth.state_dict()) == 62
    assert len(track.state_dict()) == 394


def test_vggt_1b_state_dict_names_match_upstream():
    with torch.device("meta"):
        point = DPTHead(dim_in=2048)
        track = TrackHead(dim_in=2048)
    point_keys = set(point.state_dict())
    for key in (
        "norm.weight",
        "projects.3.bias",
        "resize_layers.0.weight",
        "resize_layers.3.weight",
        "scratch.layer4_rn.weight",
        "scratch.refinenet1.resConfUnit1.conv2.bias",
        "scratch.refinenet4.resConfUnit2.conv1.weight",
        "scratch.refinenet4.out_conv.weight",
        "scratch.output_conv1.weight",
        "scratch.output_conv2.0.weight",
        "scratch.output_conv2.2.bias",
    ):
        assert key in point_keys, key
    # No skip input into the coarsest fusion block, no bias on the channel reducers, no
    # parameters in the Identity resize.
    assert not any(k.startswith("scratch.refinenet4.resConfUnit1") for k in point_keys)
    assert "scratch.layer1_rn.bias" not in point_keys
    assert not any(k.startswith("resize_layers.2") for k in point_keys)

    track_keys = set(track.state_dict())
    for key in (
        "feature_extractor.scratch.output_conv1.weight",
        "tracker.query_ref_token",
        "tracker.corr_mlp.fc1.weight",
        "tracker.updateformer.virual_tracks",
        "tracker.updateformer.time_blocks.5.attn.in_proj_weight",
        "tracker.updateformer.time_blocks.5.attn.out_proj.weight",
        "tracker.updateformer.space_virtual2point_blocks.5.cross_attn.in_proj_bias",
        "tracker.updateformer.space_point2virtual_blocks.0.norm_context.weight",
        "tracker.updateformer.space_virtual_blocks.0.mlp.fc2.weight",
        "tracker.fmap_norm.weight",
        "tracker.ffeat_norm.weight",
        "tracker.ffeat_updater.0.weight",
        "tracker.vis_predictor.0.weight",
        "tracker.conf_predictor.0.bias",
    ):
        assert key in track_keys, key
    # The feature extractor stops at output_conv1, works at half resolution and, as in the
    # official model, adds no UV embedding.
    assert not any("output_conv2" in k for k in track_keys)
    assert track.feature_extractor.feature_only and track.feature_extractor.down_ratio == 2
    assert track.feature_extractor.pos_embed is False
    assert track.state_dict()["tracker.corr_mlp.fc1.weight"].shape == (384, 7 * 9 * 9)
    assert track.state_dict()["tracker.query_ref_token"].shape == (1, 2, 3 * 128 + 4)


def test_track_head_attention_is_nn_multihead_attention():
    head = _tiny_track_head()
    attentions = [m for m in head.modules() if isinstance(m, nn.MultiheadAttention)]
    # 6 time blocks + 6 virtual self-attention blocks + 2 x 6 point/virtual cross blocks.
    assert len(attentions) == 24
    assert all(m.batch_first and m.num_heads == 8 and m.embed_dim == 32 for m in attentions)


def test_track_head_without_conf_has_no_conf_predictor():
    head = _tiny_track_head(predict_conf=False)
    assert not any(k.startswith("tracker.conf_predictor") for k in head.state_dict())
    images = torch.rand(1, 2, 3, 28, 28)
    tracks, vis, conf = head(_tokens(1, 2, 28, 28), images, SPECIAL_TOKENS, query_points=torch.rand(1, 3, 2) * 27)
    assert conf is None and vis.shape == (1, 2, 3) and tracks[-1].shape == (1, 2, 3, 2)


# ---------------------------------------------------------------------------------------------
# DPT head forward / backward on tiny configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(28, 28), (56, 42), (14, 14), (30, 44)])
def test_dpt_point_head_shapes_finite_and_backward(height, width):
    torch.manual_seed(0)
    head = DPTHead(dim_in=TINY_DIM, output_dim=4, activation="inv_log", conf_activation="expp1", **TINY_DPT)
    tokens = _tokens(2, 3, height, width, grad=True)
    preds, conf = head(tokens, torch.rand(2, 3, 3, height, width), SPECIAL_TOKENS)
    # Output covers the patch grid: (H // 14) * 14 by (W // 14) * 14.
    out_h, out_w = height // PATCH * PATCH, width // PATCH * PATCH
    assert preds.shape == (2, 3, out_h, out_w, 3)
    assert conf.shape == (2, 3, out_h, out_w)
    assert torch.isfinite(preds).all() and torch.isfinite(conf).all()
    assert (conf >= 1).all()  # expp1
    (preds.square().mean() + conf.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    for t in tokens:
        assert t.grad is not None and t.grad[:, :, SPECIAL_TOKENS:].abs().sum() > 0
        # Special tokens are sliced off before the head.
        assert t.grad[:, :, :SPECIAL_TOKENS].abs().sum() == 0


def test_dpt_depth_head_is_positive_and_taps_the_configured_layers():
    torch.manual_seed(0)
    head = DPTHead(dim_in=TINY_DIM, output_dim=2, activation="exp", conf_activation="expp1", features=16,
                   out_channels=[8, 16, 32, 32], intermediate_layer_idx=[1, 1, 3, 4])
    tokens = _tokens(1, 2, 28, 28, layers=6, grad=True)
    depth, conf = head(tokens, torch.rand(1, 2, 3, 28, 28), SPECIAL_TOKENS)
    assert depth.shape == (1, 2, 28, 28, 1) and conf.shape == (1, 2, 28, 28)
    assert (depth > 0).all() and (conf >= 1).all()
    (depth.mean() + conf.mean()).backward()
    used = [t.grad is not None for t in tokens]
    assert used == [False, True, False, True, True, False]


def test_dpt_frame_chunking_matches_one_pass():
    torch.manual_seed(0)
    head = DPTHead(dim_in=TINY_DIM, **TINY_DPT).eval()
    tokens = _tokens(2, 5, 28, 42)
    images = torch.rand(2, 5, 3, 28, 42)
    with torch.no_grad():
        full = head(tokens, images, SPECIAL_TOKENS, frames_chunk_size=None)
        chunked = head(tokens, images, SPECIAL_TOKENS, frames_chunk_size=2)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dpt_feature_only_with_down_ratio():
    head = DPTHead(dim_in=TINY_DIM, feature_only=True, down_ratio=2, **TINY_DPT)
    features = head(_tokens(2, 3, 56, 28), torch.rand(2, 3, 3, 56, 28), SPECIAL_TOKENS, frames_chunk_size=2)
    assert features.shape == (2, 3, 16, 28, 14)
    assert torch.isfinite(features).all()


@given(
    patch_rows=st.integers(1, 4),
    patch_cols=st.integers(1, 4),
    frames=st.integers(1, 3),
    pos_embed=st.booleans(),
)
def test_dpt_output_shape_for_any_patch_grid(patch_rows, patch_cols, frames, pos_embed):
    head = DPTHead(dim_in=TINY_DIM, output_dim=3, activation="linear", conf_activation="sigmoid",
                   pos_embed=pos_embed, **TINY_DPT)
    height, width = patch_rows * PATCH, patch_cols * PATCH
    with torch.no_grad():
        preds, conf = head(_tokens(1, frames, height, width), torch.rand(1, frames, 3, height, width),
                           SPECIAL_TOKENS, frames_chunk_size=2)
    assert preds.shape == (1, frames, height, width, 2)
    assert conf.shape == (1, frames, height, width)
    assert ((conf > 0) & (conf < 1)).all()


def test_dpt_rejects_bad_configs_with_the_module_path():
    with pytest.raises(ValueError, match="DPTHead: unknown activation 'softplus'"):
        DPTHead(dim_in=TINY_DIM, activation="softplus", **TINY_DPT)
    with pytest.raises(ValueError, match="DPTHead: unknown conf_activation"):
        DPTHead(dim_in=TINY_DIM, conf_activation="exp", **TINY_DPT)
    with pytest.raises(ValueError, match="exactly four layers"):
        DPTHead(dim_in=TINY_DIM, features=16, out_channels=[8, 16, 32], intermediate_layer_idx=[0, 1, 2])
    with pytest.raises(ValueError, match="multiples of 4"):
        DPTHead(dim_in=TINY_DIM, features=16, out_channels=[6, 16, 32, 32], intermediate_layer_idx=[0, 1, 2, 3])


def test_residual_conv_unit_adds_relu_of_its_input():
    """Upstream's in-place ReLU makes the skip branch relu(x); check against that literal form."""
    torch.manual_seed(0)
    unit = dpt.ResidualConvUnit(4)
    x = torch.randn(2, 4, 5, 5)
    relu_inplace = nn.ReLU(inplace=True)
    x_upstream = x.clone()
    out = relu_inplace(x_upstream)
    out = unit.conv2(relu_inplace(unit.conv1(out)))
    expected = out + x_upstream  # x_upstream was rectified in place
    torch.testing.assert_close(unit(x), expected)


# ---------------------------------------------------------------------------------------------
# Activations and positional embeddings
# ---------------------------------------------------------------------------------------------


def _raw(channels: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, channels, 3, 5) * 2


def test_activate_head_functions_behave_as_named():
    raw = _raw(4)
    xyz = raw.permute(0, 2, 3, 1)[..., :3]
    c = raw[:, 3]

    preds, conf = head_utils.activate_head(raw, "inv_log", "expp1")
    assert preds.shape == (2, 3, 5, 3) and conf.shape == (2, 3, 5)
    torch.testing.assert_close(preds, torch.sign(xyz) * (torch.exp(xyz.abs()) - 1))
    # inv_log undoes sign(x) * log(1 + |x|)
    torch.testing.assert_close(head_utils.inverse_log_transform(torch.sign(preds) * torch.log1p(preds.abs())), preds)
    assert (conf >= 1).all()
    torch.testing.assert_close(conf, 1 + torch.exp(c))

    preds, conf = head_utils.activate_head(raw, "exp", "expp0")
    torch.testing.assert_close(preds, torch.exp(xyz))
    torch.testing.assert_close(conf, torch.exp(c))

    preds, conf = head_utils.activate_head(raw, "norm_exp", "sigmoid")
    torch.testing.assert_close(preds.norm(dim=-1), torch.expm1(xyz.norm(dim=-1)))
    torch.testing.assert_close(preds / preds.norm(dim=-1, keepdim=True), xyz / xyz.norm(dim=-1, keepdim=True))
    assert ((conf > 0) & (conf < 1)).all()

    preds, _ = head_utils.activate_head(raw, "norm", "expp1")
    torch.testing.assert_close(preds.norm(dim=-1), torch.ones(2, 3, 5))

    preds, _ = head_utils.activate_head(raw, "relu", "expp1")
    assert (preds >= 0).all() and torch.equal(preds, xyz.clamp(min=0))

    preds, _ = head_utils.activate_head(raw, "sigmoid", "expp1")
    torch.testing.assert_close(preds, torch.sigmoid(xyz))

    preds, _ = head_utils.activate_head(raw, "linear", "expp1")
    assert torch.equal(preds, xyz)

    preds, _ = head_utils.activate_head(raw, "xy_inv_log", "expp1")
    z = head_utils.inverse_log_transform(xyz[..., 2:])
    torch.testing.assert_close(preds, torch.cat([xyz[..., :2] * z, z], dim=-1))

    with pytest.raises(ValueError, match="activate_head: unknown activation"):
        head_utils.activate_head(raw, "tanh", "expp1")


def test_uv_grid_is_normalised_by_the_diagonal():
    uv = head_utils.create_uv_grid(4, 2, aspect_ratio=2.0)
    assert uv.shape == (2, 4, 2)
    span_x, span_y = 2 / math.sqrt(5), 1 / math.sqrt(5)
    torch.testing.assert_close(uv[0, 0], torch.tensor([-span_x * 3 / 4, -span_y / 2]))
    torch.testing.assert_close(uv[-1, -1], torch.tensor([span_x * 3 / 4, span_y / 2]))
    assert torch.all(uv[:, 1:, 0] > uv[:, :-1, 0]) and torch.all(uv[1:, :, 1] > uv[:-1, :, 1])


def test_position_grid_embedding_layout():
    grid = torch.stack(torch.meshgrid(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 3.0, 0.0]), indexing="xy"), -1)
    emb = head_utils.position_grid_to_embed(grid, 8)  # 2 frequencies per coordinate: 1 and 1/10
    assert emb.shape == (3, 2, 8)
    u, v = grid[..., 0], grid[..., 1]
    expected = torch.stack(
        [torch.sin(u), torch.sin(u / 10), torch.cos(u), torch.cos(u / 10),
         torch.sin(v), torch.sin(v / 10), torch.cos(v), torch.cos(v / 10)], dim=-1
    )
    torch.testing.assert_close(emb, expected)


# ---------------------------------------------------------------------------------------------
# Tracker pieces
# ---------------------------------------------------------------------------------------------


def test_bilinear_sampler_uses_pixel_coordinates():
    image = torch.arange(20.0).reshape(1, 1, 4, 5)  # value = 5 * y + x
    coords = torch.tensor([[[[0.0, 0.0], [4.0, 3.0], [1.5, 2.0], [2.0, 0.25]]]])
    sampled = track_modules.bilinear_sampler(image, coords)
    torch.testing.assert_close(sampled.flatten(), torch.tensor([0.0, 19.0, 11.5, 3.25]))
    feats = track_modules.sample_features4d(image.expand(2, 3, 4, 5), coords[0, :, :2].expand(2, 2, 2))
    assert feats.shape == (2, 2, 3)
    torch.testing.assert_close(feats[1, 1], torch.full((3,), 19.0))


def test_corr_block_window_order_and_pyramid():
    torch.manual_seed(0)
    radius = 1
    fmaps = torch.randn(1, 2, 4, 8, 6)
    corr = track_modules.CorrBlock(fmaps, num_levels=3, radius=radius)
    assert [tuple(level.shape[-2:]) for level in corr.fmaps_pyramid] == [(8, 6), (4, 3), (2, 1)]
    torch.testing.assert_close(corr.fmaps_pyramid[1][0, 1], torch.nn.functional.avg_pool2d(fmaps[0, 1], 2))

    targets = torch.randn(1, 2, 1, 4)
    x, y = 3, 4
    sampled = corr.corr_sample(targets, torch.tensor([[[[float(x), float(y)]], [[float(x), float(y)]]]]))
    assert sampled.shape == (1, 2, 1, 3 * 9)
    level0 = sampled[0, 1, 0, :9].view(3, 3)
    for i, di in enumerate(range(-radius, radius + 1)):
        for j, dj in enumerate(range(-radius, radius + 1)):
            # Window row i moves x, column j moves y (upstream's order).
            expected = targets[0, 1, 0] @ fmaps[0, 1, :, y + dj, x + di] / 2.0
            torch.testing.assert_close(level0[i, j], expected)


def test_corr_block_handles_maps_smaller_than_the_pyramid():
    fmaps = torch.randn(1, 2, 4, 3, 2)
    corr = track_modules.CorrBlock(fmaps, num_levels=7, radius=4)
    assert [tuple(level.shape[-2:]) for level in corr.fmaps_pyramid] == [(3, 2)] + [(1, 1)] * 6
    out = corr.corr_sample(torch.randn(1, 2, 5, 4), torch.rand(1, 2, 5, 2) * 2)
    assert out.shape == (1, 2, 5, 7 * 81) and torch.isfinite(out).all()


def test_2d_sincos_grid_embedding_layout():
    pe = track_modules.get_2d_sincos_pos_embed(8, (3, 4))
    assert pe.shape == (1, 8, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(pe[0, 0], torch.sin(xs))  # first half: x (column)
    torch.testing.assert_close(pe[0, 2], torch.cos(xs))
    torch.testing.assert_close(pe[0, 4], torch.sin(ys))  # second half: y (row)
    torch.testing.assert_close(pe[0, 5], torch.sin(ys / 100))


def test_2d_point_embedding_interleaves_sin_and_cos():
    xy = torch.tensor([[[0.3, -0.7]]])
    pe = track_modules.get_2d_embedding(xy, 4, cat_coords=True)
    freqs = torch.tensor([0.0, 2 * 1000.0 / 4])
    x, y = 0.3, -0.7
    expected = torch.tensor(
        [x, y, math.sin(x * freqs[0]), math.cos(x * freqs[0]), math.sin(x * freqs[1]), math.cos(x * freqs[1]),
         math.sin(y * freqs[0]), math.cos(y * freqs[0]), math.sin(y * freqs[1]), math.cos(y * freqs[1])]
    )
    torch.testing.assert_close(pe.flatten(), expected)


# ---------------------------------------------------------------------------------------------
# Track head forward / backward on tiny configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "frames"), [(28, 28, 3), (56, 42, 2), (14, 14, 2)])
def test_track_head_shapes_finite_and_backward(height, width, frames):
    torch.manual_seed(0)
    head = _tiny_track_head()
    tokens = _tokens(2, frames, height, width, grad=True)
    query = torch.rand(2, 6, 2) * torch.tensor([width - 1.0, height - 1.0])
    tracks, vis, conf = head(tokens, torch.rand(2, frames, 3, height, width), SPECIAL_TOKENS, query_points=query)
    assert len(tracks) == head.iters == 4
    assert all(t.shape == (2, frames, 6, 2) and torch.isfinite(t).all() for t in tracks)
    assert vis.shape == conf.shape == (2, frames, 6)
    assert ((vis > 0) & (vis < 1)).all() and ((conf > 0) & (conf < 1)).all()
    # The query frame is pinned to the query points.
    for t in tracks:
        torch.testing.assert_close(t[:, 0], query)
    # A freshly initialised flow head moves points by far less than a pixel: predictions come back
    # in image pixels, not feature-map pixels.
    assert (tracks[-1] - query[:, None]).abs().max() < 0.5

    loss = sum(t.mean() for t in tracks) + vis.mean() + conf.mean()
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert all(t.grad is not None for t in tokens)


def test_track_head_iters_override_and_missing_queries():
    head = _tiny_track_head(iters=2)
    tokens = _tokens(1, 2, 28, 28)
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        tracks, _, _ = head(tokens, images, SPECIAL_TOKENS, query_points=torch.rand(1, 3, 2) * 27)
        assert len(tracks) == 2
        tracks, _, _ = head(tokens, images, SPECIAL_TOKENS, query_points=torch.rand(1, 3, 2) * 27, iters=3)
        assert len(tracks) == 3
    with pytest.raises(ValueError, match="TrackHead.forward: query_points"):
        head(tokens, images, SPECIAL_TOKENS)


def test_corr_block_can_split_track_features_per_level():
    fmaps = torch.randn(1, 2, 4, 8, 8)
    corr = track_modules.CorrBlock(fmaps, num_levels=2, radius=1, multiple_track_feats=True)
    targets = torch.randn(1, 2, 3, 8)  # 4 channels per level
    coords = torch.full((1, 2, 3, 2), 4.0)
    out = corr.corr_sample(targets, coords)
    assert out.shape == (1, 2, 3, 2 * 9)
    # Level 1 correlates the second half of the features with the pooled map at coords / 2.
    expected = targets[0, 0, 0, 4:] @ corr.fmaps_pyramid[1][0, 0, :, 2, 2] / 2.0
    torch.testing.assert_close(out[0, 0, 0, 9 + 4], expected)


def test_tracker_options_return_feat_logits_and_down_ratio():
    torch.manual_seed(0)
    tracker = track_modules.BaseTrackerPredictor(
        stride=2, corr_levels=2, corr_radius=1, latent_dim=8, hidden_size=16, depth=2
    )
    fmaps = torch.randn(1, 3, 8, 7, 5)  # maps at 1/4 of a 28 x 20 image: stride 2 x down_ratio 2
    query = torch.tensor([[[3.0, 5.0], [17.0, 25.0]]])
    tracks, vis, track_feats, query_feats, conf = tracker(
        query, fmaps, iters=2, return_feat=True, down_ratio=2, apply_sigmoid=False
    )
    assert len(tracks) == 2 and tracks[-1].shape == (1, 3, 2, 2)
    torch.testing.assert_close(tracks[-1][:, 0], query)
    assert (tracks[-1] - query[:, None]).abs().max() < 0.5
    assert track_feats.shape == (1, 3, 2, 8) and query_feats.shape == (1, 2, 8)
    # Logits, not probabilities: the sigmoid is left to the caller.
    assert vis.shape == conf.shape == (1, 3, 2)
    probs = tracker(query, fmaps, iters=2, down_ratio=2)
    torch.testing.assert_close(probs[1], torch.sigmoid(vis))
    torch.testing.assert_close(probs[2], torch.sigmoid(conf))
