"""Checkpoint loading and saving in the models zoo: round trips, key prefixes, strict errors."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lite3r_compile import models_zoo
from lite3r_compile.models_zoo import CheckpointMismatchError
from lite3r_compile.models_zoo.checkpoint import read_state_dict, save_state_dict

# a small VGGT (no DPT / track heads) keeps every test here well under a second
SMALL = {"enable_depth": False, "enable_point": False, "enable_track": False}


def _small(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models_zoo.create("vggt-tiny", **SMALL).eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.rand(1, 2, 3, 28, 28)


def test_safetensors_round_trip_into_model(tmp_path, images):
    source, target = _small(0), _small(1)
    assert not torch.equal(source.aggregator.camera_token, target.aggregator.camera_token)
    path = tmp_path / "vggt.safetensors"
    models_zoo.save(source, path)
    returned = models_zoo.load(target, path)
    assert returned is target
    _assert_same_state(source, target)
    with torch.no_grad():
        torch.testing.assert_close(target(images)["pose_enc"], source(images)["pose_enc"])


def test_load_by_preset_name_builds_on_meta_and_assigns(tmp_path, images):
    source = _small(0)
    path = tmp_path / "vggt.safetensors"
    models_zoo.save(source, path)
    loaded = models_zoo.load("vggt-tiny", path, **SMALL).eval()
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert loaded.aggregator._resnet_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    # parameter flags survive the assignment
    assert not loaded.aggregator.patch_embed.mask_token.requires_grad
    assert loaded.aggregator.camera_token.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["pose_enc"], source(images)["pose_enc"])


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_formats_round_trip(tmp_path, suffix):
    source, target = _small(0), _small(1)
    path = tmp_path / f"vggt{suffix}"
    models_zoo.save(source, path)
    models_zoo.load(target, path)
    _assert_same_state(source, target)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_torch_checkpoint_is_unwrapped(tmp_path, wrapper):
    source, target = _small(0), _small(1)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: source.state_dict(), "epoch": 3}, path)
    models_zoo.load(target, path)
    _assert_same_state(source, target)


@pytest.mark.parametrize("prefix", ["model.", "module."])
def test_wrapper_key_prefix_is_stripped(tmp_path, prefix):
    source, target = _small(0), _small(1)
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    models_zoo.load(target, path)
    _assert_same_state(source, target)


def test_missing_key_raises_naming_it(tmp_path):
    state = _small(0).state_dict()
    del state["aggregator.camera_token"]
    path = tmp_path / "missing.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\).*'aggregator\.camera_token'"):
        models_zoo.load(_small(1), path)


def test_missing_key_with_strict_false_loads_the_rest(tmp_path):
    source, target = _small(0), _small(1)
    state = source.state_dict()
    del state["aggregator.camera_token"]
    path = tmp_path / "missing.safetensors"
    save_state_dict(state, path)
    kept = target.aggregator.camera_token.detach().clone()
    models_zoo.load(target, path, strict=False)
    assert torch.equal(target.aggregator.camera_token, kept)
    assert torch.equal(target.aggregator.register_token, source.aggregator.register_token)


def test_missing_key_into_meta_model_raises_even_when_not_strict(tmp_path):
    state = _small(0).state_dict()
    del state["camera_head.embed_pose.bias"]
    path = tmp_path / "missing.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointMismatchError, match="built on the meta device"):
        models_zoo.load("vggt-tiny", path, strict=False, **SMALL)


def test_unexpected_key_raises_naming_it(tmp_path):
    state = _small(0).state_dict()
    state["aggregator.extra_token"] = torch.zeros(3)
    path = tmp_path / "unexpected.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\).*'aggregator\.extra_token'"):
        models_zoo.load(_small(1), path)
    models_zoo.load(_small(1), path, strict=False)  # ignored when not strict


def test_shape_mismatch_raises_with_both_shapes_even_when_not_strict(tmp_path):
    state = _small(0).state_dict()
    state["camera_head.embed_pose.weight"] = torch.zeros(128, 7)
    path = tmp_path / "shapes.safetensors"
    save_state_dict(state, path)
    expected = re.escape("'camera_head.embed_pose.weight': model (128, 9) vs checkpoint (128, 7)")
    with pytest.raises(CheckpointMismatchError, match=expected):
        models_zoo.load(_small(1), path)
    with pytest.raises(CheckpointMismatchError, match=expected):
        models_zoo.load(_small(1), path, strict=False)


def test_many_offending_keys_are_summarised(tmp_path):
    state = {k: v for k, v in _small(0).state_dict().items() if not k.startswith("camera_head.")}
    path = tmp_path / "no_camera_head.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        models_zoo.load(_small(1), path)
    message = str(info.value)
    n_missing = sum(k.startswith("camera_head.") for k in _small(1).state_dict())
    assert f"{n_missing} missing key(s)" in message
    assert f"({n_missing - 5} more)" in message
    assert str(path) in message


def test_checkpoint_for_another_preset_fails_clearly(tmp_path):
    path = tmp_path / "tiny.safetensors"
    models_zoo.save(_small(0), path)
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        models_zoo.load("vggt-tiny", path)  # the full tiny preset also has DPT and track heads


def test_unknown_suffix_and_missing_file(tmp_path):
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"unknown file type '\.npz'.*\.safetensors"):
        read_state_dict(odd)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="cannot save"):
        save_state_dict({"a": torch.zeros(1)}, tmp_path / "out.npz")


def test_non_state_dict_pickle_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(path)


def test_shared_and_strided_tensors_save_to_safetensors(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    state = {"a": base, "b": base, "c": base.t(), "d": base[1]}
    path = tmp_path / "shared.safetensors"
    save_state_dict(state, path)
    loaded = read_state_dict(path)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


def test_load_rejects_overrides_for_a_model_and_bad_types(tmp_path):
    path = tmp_path / "x.safetensors"
    models_zoo.save(_small(0), path)
    with pytest.raises(TypeError, match="overrides"):
        models_zoo.load(_small(1), path, enable_track=False)
    with pytest.raises(TypeError, match="preset name or an nn.Module"):
        models_zoo.load(42, path)


def test_saving_a_meta_model_is_refused(tmp_path):
    model = models_zoo.create("vggt-tiny", device="meta", **SMALL)
    with pytest.raises(ValueError, match="meta device and hold no data"):
        models_zoo.save(model, tmp_path / "meta.safetensors")
