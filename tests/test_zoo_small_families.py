"""The small model families of the zoo: Fast3R-like, DUSt3R-like and π3-like tiny presets."""

from __future__ import annotations

import pytest
import torch

from lite3r_compile import models_zoo
from lite3r_compile.models_zoo.dust3r import DUSt3RConfig, build_dust3r_tiny
from lite3r_compile.models_zoo.fast3r import Fast3RConfig, build_fast3r_tiny
from lite3r_compile.models_zoo.pi3 import Pi3Config, build_pi3_tiny

BUILDERS = {"fast3r-tiny": build_fast3r_tiny, "dust3r-tiny": build_dust3r_tiny, "pi3-tiny": build_pi3_tiny}
OUTPUT_KEYS = {
    "fast3r-tiny": {"pts3d", "conf", "pts3d_local", "conf_local"},
    "dust3r-tiny": {"pts3d", "conf"},
    "pi3-tiny": {"pts3d", "conf", "local_points", "camera_poses"},
}


def _build(name: str, **overrides):
    torch.manual_seed(0)
    return BUILDERS[name](**overrides)


def _sites(model, num_views: int) -> dict[str, str]:
    # the two-view model's sites do not depend on a view count
    return model.attention_sites() if hasattr(model, "dec_blocks2") else model.attention_sites(num_views)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_backward_on_cpu(name):
    model = _build(name)
    (images,) = model.example_inputs()
    B, S, _, H, W = images.shape
    outputs = model(images)
    assert set(outputs) == OUTPUT_KEYS[name]
    for key, value in outputs.items():
        assert torch.isfinite(value).all(), key
        if key == "camera_poses":
            assert value.shape == (B, S, 4, 4)
        elif key.startswith("conf"):
            assert value.shape == (B, S, H, W)
        else:
            assert value.shape == (B, S, H, W, 3)
    sum(value.mean() for value in outputs.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_registry_builds_the_preset_and_on_meta(name):
    model = models_zoo.create(name)
    assert type(model) is type(_build(name))
    meta = models_zoo.create(name, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert models_zoo.count_parameters(meta) == models_zoo.count_parameters(model)
    assert meta.example_inputs()[0].device.type == "meta"


def test_full_size_configs_build_on_meta():
    with torch.device("meta"):
        from lite3r_compile.models_zoo.dust3r import build_dust3r
        from lite3r_compile.models_zoo.fast3r import build_fast3r
        from lite3r_compile.models_zoo.pi3 import build_pi3

        sizes = {
            "dust3r": models_zoo.count_parameters(build_dust3r()),
            "fast3r": models_zoo.count_parameters(build_fast3r()),
            "pi3": models_zoo.count_parameters(build_pi3()),
        }
    assert all(300e6 < n < 1.5e9 for n in sizes.values()), sizes


def test_pi3_runs_on_the_meta_device():
    model = models_zoo.create("pi3-tiny", device="meta")
    outputs = model(*model.example_inputs())
    assert outputs["camera_poses"].shape == (1, 3, 4, 4) and outputs["pts3d"].device.type == "meta"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_example_inputs_are_deterministic_images(name):
    model = _build(name)
    (first,), (second,) = model.example_inputs(), model.example_inputs()
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1
    assert first.shape[2] == 3 and first.shape[1] == model.config.num_views


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_image_sizes_are_refused(name):
    model = _build(name)
    (images,) = model.example_inputs()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images[..., :-1])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(images[:, :, :2])
    with pytest.raises(ValueError, match="shape"):
        model(images[0, 0, 0])


def test_dust3r_takes_exactly_two_views():
    model = _build("dust3r-tiny")
    (images,) = model.example_inputs()
    with pytest.raises(ValueError, match="exactly 2 views"):
        model(torch.cat((images, images[:, :1]), dim=1))
    with pytest.raises(ValueError, match="exactly 2 views"):
        model(images[:, :1])
    with pytest.raises(ValueError, match="exactly 2 views"):
        DUSt3RConfig(num_views=3)
    unbatched = model(images[0])  # (S, 3, H, W) gains a batch axis
    assert unbatched["pts3d"].shape[:2] == (1, 2)


@pytest.mark.parametrize("name", ["fast3r-tiny", "pi3-tiny"])
def test_multi_view_families_take_any_number_of_views(name):
    model = _build(name)
    (images,) = model.example_inputs()
    for views in (1, 2, 4):
        stacked = images.repeat(2, 2, 1, 1, 1)[:, :views]
        assert model(stacked)["pts3d"].shape[:2] == (2, views)


def test_configs_refuse_bad_sizes_and_take_overrides():
    with pytest.raises(ValueError, match="head dim"):
        Fast3RConfig(enc_embed_dim=36, enc_num_heads=2)
    with pytest.raises(ValueError, match="even number"):
        Pi3Config(dec_depth=3)
    with pytest.raises(ValueError, match="head dim"):
        DUSt3RConfig(dec_embed_dim=30, dec_num_heads=3)
    model = build_pi3_tiny(dec_depth=6)
    assert len(model.decoder) == 6 and model.config.dec_depth == 6
    assert len(build_dust3r_tiny(dec_depth=3).dec_blocks2) == 3


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_attention_sites_see_the_tokens_their_scope_says(name):
    model = _build(name)
    (images,) = model.example_inputs()
    B, S, _, H, W = images.shape
    patches = (H // model.patch_size) * (W // model.patch_size)
    per_view = patches + (model.config.num_register_tokens if name == "pi3-tiny" else 0)
    sites = _sites(model, S)
    seen: dict[str, list] = {}
    modules = dict(model.named_modules())
    handles = [
        # a pre-hook that returns something replaces the inputs: list.append returns None
        modules[path].register_forward_pre_hook(lambda m, args, path=path: seen.setdefault(path, []).append(args[0].shape[:2]))
        for path in sites
    ]
    model(images)
    for handle in handles:
        handle.remove()
    assert set(seen) == set(sites)
    expected = {"frame": (B * S, per_view), "global": (B, S * per_view)}
    for path, scope in sites.items():
        if name == "dust3r-tiny" and path.startswith("dec_blocks"):
            expected_shape = (B, per_view)  # the decoders run one view each
        elif name == "pi3-tiny" and path.startswith("encoder_blocks"):
            expected_shape = (B * S, patches)  # registers join after the encoder
        else:
            expected_shape = expected[scope]
        assert [tuple(shape) for shape in seen[path]] == [expected_shape], (path, scope)
    # every attention-holding module is listed: the sites are the modules that own a qkv or projq
    owners = {
        path.rsplit(".", 2)[0] for path, _ in model.named_parameters() if ".qkv." in path or ".projq." in path
    }
    assert owners == set(sites)


def test_single_view_sites_are_self_scoped():
    for name in ("fast3r-tiny", "pi3-tiny"):
        assert set(_sites(_build(name), 1).values()) == {"self"}
    assert set(_sites(_build("dust3r-tiny"), 2).values()) == {"frame", "cross"}


def test_pi3_is_permutation_equivariant_over_views():
    model = _build("pi3-tiny")
    (images,) = model.example_inputs()
    order = torch.tensor([2, 0, 1])
    outputs = model(images)
    permuted = model(images[:, order])
    for key in ("local_points", "conf", "camera_poses", "pts3d"):
        torch.testing.assert_close(permuted[key], outputs[key][:, order], rtol=1e-4, atol=1e-5)


def test_fast3r_tells_views_apart_by_image_index():
    model = _build("fast3r-tiny")
    (images,) = model.example_inputs()
    same = images[:, :1].expand(-1, 2, -1, -1, -1)
    outputs = model(same)["pts3d_local"]
    assert not torch.allclose(outputs[:, 0], outputs[:, 1])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_checkpoint_round_trip_through_a_meta_build(name, tmp_path):
    model = _build(name).eval()
    path = tmp_path / f"{name}.safetensors"
    models_zoo.save(model, path)
    loaded = models_zoo.load(name, path).eval()
    (images,) = model.example_inputs()
    expected, actual = model(images), loaded(images)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
