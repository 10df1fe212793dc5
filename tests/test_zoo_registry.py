"""The models zoo's registry: presets by name, lazy builders, create/count, input checks, CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from lite3r_compile import models_zoo
from lite3r_compile.commands import zoo as zoo_command
from lite3r_compile.models_zoo import presets as presets_module
from lite3r_compile.models_zoo.presets import Preset, PresetUnavailableError

REQUIRED_PRESETS = {"vggt-1b", "vggt-tiny", "da3-large", "da3-tiny", "fast3r-tiny", "dust3r-tiny", "pi3-tiny"}
TINY_PRESETS = sorted(name for name in REQUIRED_PRESETS if name.endswith("-tiny"))


def test_required_presets_are_listed():
    names = models_zoo.list_presets()
    assert REQUIRED_PRESETS <= set(names)
    assert len(names) == len(set(names))


def test_every_preset_names_a_zoo_builder():
    for name in models_zoo.list_presets():
        preset = presets_module.get_preset(name)
        assert preset.name == name
        module, _, function = preset.target.partition(":")
        assert module.startswith("lite3r_compile.models_zoo.") and function.startswith("build_")
        assert preset.description


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model preset 'vggt-tyni'.*Did you mean 'vggt-tiny'"):
        models_zoo.create("vggt-tyni")


@pytest.fixture
def extra_preset(monkeypatch):
    def add(target: str) -> str:
        name = "test-extra"
        monkeypatch.setitem(presets_module.PRESETS, name, Preset(name, target, "test preset"))
        return name

    return add


def test_preset_with_absent_module_names_the_module(extra_preset):
    name = extra_preset("lite3r_compile.models_zoo.not_written_yet:build_it")
    with pytest.raises(PresetUnavailableError, match=r"needs module lite3r_compile\.models_zoo\.not_written_yet"):
        models_zoo.create(name)


def test_preset_whose_module_lacks_the_function(extra_preset):
    name = extra_preset("lite3r_compile.models_zoo.vggt:build_vggt_huge")
    with pytest.raises(PresetUnavailableError, match="has no function 'build_vggt_huge'"):
        models_zoo.create(name)


def test_preset_whose_module_misses_a_dependency(extra_preset, tmp_path, monkeypatch):
    (tmp_path / "zoo_family_with_missing_dep.py").write_text("import not_a_real_dependency_4711\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = extra_preset("zoo_family_with_missing_dep:build")
    with pytest.raises(PresetUnavailableError, match="not_a_real_dependency_4711"):
        models_zoo.create(name)


def test_create_on_meta_and_with_dtype():
    meta = models_zoo.create("vggt-tiny", device="meta")
    assert all(t.is_meta for t in meta.parameters())
    double = models_zoo.create("vggt-tiny", dtype=torch.float64, enable_track=False)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert models_zoo.count_parameters(meta) > models_zoo.count_parameters(double)


def test_create_overrides_reach_the_config():
    model = models_zoo.create("vggt-tiny", device="meta", enable_track=False, enable_point=False)
    assert model.track_head is None and model.point_head is None and model.depth_head is not None
    with pytest.raises(TypeError):
        models_zoo.create("vggt-tiny", device="meta", no_such_field=1)


def test_count_parameters_trainable_only():
    model = models_zoo.create("vggt-tiny", device="meta")
    total = models_zoo.count_parameters(model)
    frozen = model.aggregator.patch_embed.mask_token.numel()  # frozen as upstream does
    assert models_zoo.count_parameters(model, trainable_only=True) == total - frozen
    model.requires_grad_(False)
    assert models_zoo.count_parameters(model, trainable_only=True) == 0


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_run_forward_and_backward_on_cpu(name):
    model = models_zoo.create(name)
    model.train()
    torch.manual_seed(0)
    images = torch.rand(1, 2, 3, 112, 112)  # 112 is a multiple of the 8, 14 and 16 pixel patches
    out = model(images)
    values = out.values() if isinstance(out, dict) else (out if isinstance(out, (tuple, list)) else [out])
    tensors = [v for v in values if torch.is_tensor(v) and v.is_floating_point() and v.requires_grad]
    assert tensors, f"{name} returned no differentiable tensor"
    sum(t.float().mean() for t in tensors).backward()
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_every_preset_has_example_inputs_that_run_it(name):
    """The compiler captures a model from its own example inputs: they must exist for every
    preset, live on the model's device, and (for tiny presets) run it."""
    big = not name.endswith("-tiny")
    model = models_zoo.create(name, device="meta" if big else None).eval()
    inputs = model.example_inputs()
    assert isinstance(inputs, tuple) and inputs[0].dim() == 5 and inputs[0].shape[1] >= 2
    assert all(t.device == next(model.parameters()).device for t in inputs)
    if not big:
        with torch.no_grad():
            out = model(*inputs)
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------
# check_images


def test_check_images_passes_valid_batches_through():
    images = torch.rand(2, 3, 3, 28, 42)
    assert models_zoo.check_images(images, 14) is images
    single = models_zoo.check_images(torch.rand(3, 3, 28, 42), 14)
    assert tuple(single.shape) == (1, 3, 3, 28, 42)


@pytest.mark.parametrize("shape", [(28, 28), (3, 28, 28), (1, 1, 1, 3, 28, 28)])
def test_check_images_rank(shape):
    with pytest.raises(ValueError, match=rf"got rank {len(shape)}"):
        models_zoo.check_images(torch.rand(*shape), 14)


@pytest.mark.parametrize(
    "height, width, pattern",
    [
        (518, 500, r"width 500 \(nearest valid: 490 or 504\).*patch size 14.*518x504"),
        (520, 518, r"height 520 \(nearest valid: 518 or 532\)"),
        (7, 14, r"height 7 \(nearest valid: 14\)"),
    ],
)
def test_check_images_sizes(height, width, pattern):
    with pytest.raises(ValueError, match=pattern):
        models_zoo.check_images(torch.rand(1, 1, 3, height, width), 14)


def test_check_images_rejects_non_tensors_and_bad_channels():
    with pytest.raises(TypeError, match="torch.Tensor"):
        models_zoo.check_images([[0.0]], 14)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        models_zoo.check_images(torch.rand(1, 2, 1, 28, 28), 14)


# ---------------------------------------------------------------------------------------------
# `lite3r zoo`


def _run_zoo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    zoo_command.add_arguments(parser)
    return zoo_command.run(parser.parse_args(argv))


def test_zoo_command_lists_every_preset(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert _run_zoo(["--no-count"]) == 0
    printed = capsys.readouterr().out
    for name in models_zoo.list_presets():
        assert name in printed


def test_zoo_command_counts_parameters(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert _run_zoo(["vggt-tiny"]) == 0
    expected = models_zoo.count_parameters(models_zoo.create("vggt-tiny", device="meta"))
    assert f"{expected:,}" in capsys.readouterr().out


def test_zoo_command_reports_unavailable_presets(capsys, monkeypatch, extra_preset):
    monkeypatch.setenv("COLUMNS", "250")
    name = extra_preset("lite3r_compile.models_zoo.not_written_yet:build_it")
    assert _run_zoo([name]) == 0
    assert "unavailable" in capsys.readouterr().out


def test_zoo_command_rejects_unknown_presets(capsys):
    assert _run_zoo(["vggt-huge"]) == 2
    assert "unknown preset" in capsys.readouterr().out


def test_zoo_command_module_imports_nothing_heavy():
    assert zoo_command.HELP
    source = open(zoo_command.__file__).read()
    top_level_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert top_level_imports == ["from __future__ import annotations", "import argparse"]


def test_check_images_rejects_integer_images():
    with pytest.raises(ValueError, match=r"floating point with values in \[0, 1\].*/ 255"):
        models_zoo.check_images(torch.zeros(1, 2, 3, 28, 28, dtype=torch.uint8), 14)
