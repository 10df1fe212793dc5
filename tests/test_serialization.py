"""Saving a deployable student (float8 weights, scales, SLA projections, config) and loading it
without the teacher's weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lite3r_compile.api import lite
from lite3r_compile.backends.deploy import deploy
from lite3r_compile.backends.serialization import (
    DeployableFormatError,
    config_from_json,
    config_to_json,
    load_deployable,
    read_metadata,
    save_deployable,
)
from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.models_zoo import create
from lite3r_compile.sla.config import SLAConfig
from test_backend_deploy import Frames, make_student, make_teacher, tokens


def _deployed_output(student, x):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return deploy(student, "fp8", compile=False)(x)


def test_round_trip_without_the_teacher_gives_the_same_outputs(tmp_path):
    student = make_student(make_teacher(seed=0))  # non-zero (trained) projections
    path = tmp_path / "student.safetensors"
    save_deployable(student, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("global_block.attn.qkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("global_block.attn.qkv.weight_scale").shape == (3 * 32, 1)
        proj_l = f.get_tensor("global_block.attn.sla.proj_l.weight")
    assert proj_l.abs().sum() > 0
    meta = read_metadata(path)
    assert meta["backend"] == "fp8" and meta["model_class"].endswith("Frames")
    assert json.loads(meta["sites"]) == ["frame_block.attn", "global_block.attn"]
    assert config_from_json(meta["config"]) == student.lite3r_record.config

    other = make_teacher(seed=7)  # another architecture instance: its weights must not matter
    loaded = load_deployable(path, model=other)
    x = tokens(3)
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, _deployed_output(student, x))
    assert torch.equal(other.head.weight, make_teacher(seed=7).head.weight), "the skeleton is unchanged"


def test_a_zoo_student_loads_from_its_preset_name(tmp_path):
    torch.manual_seed(0)
    teacher = create("pi3-tiny").eval()
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="fp8", example_inputs=(images,),
                       config=LiteConfig(sla=SLAConfig(topk=0.5, block_q=16, block_k=16))).eval()
    path = tmp_path / "pi3.safetensors"
    save_deployable(student, path, model_spec="pi3-tiny")
    loaded = load_deployable(path)  # no teacher, no model: built from the preset
    with torch.no_grad():
        out = loaded(images)
    want = _deployed_output(student, images)
    assert set(out) == set(want)
    for key in want:
        assert torch.equal(out[key], want[key]), key


def test_errors_name_what_is_missing_or_mismatched(tmp_path):
    student = make_student(make_teacher())
    path = tmp_path / "student.safetensors"
    save_deployable(student, path)
    with pytest.raises(DeployableFormatError, match="no model spec; pass model="):
        load_deployable(path)
    with pytest.raises(DeployableFormatError, match="holds a student of .*Frames.*skeleton is a .*Sequential"):
        load_deployable(path, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(DeployableFormatError, match="rewrote attention at"):
        load_deployable(path, model=Frames(frame_block=False))

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    del tensors["global_block.attn.sla.proj_l.bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(DeployableFormatError, match=r"missing \['global_block.attn.sla.proj_l.bias'\]"):
        load_deployable(broken, model=make_teacher())

    save_file(tensors, str(broken))
    with pytest.raises(DeployableFormatError, match="not a lite3r deployable student"):
        read_metadata(broken)
    with pytest.raises(TypeError, match="not a lite3r student"):
        save_deployable(make_teacher(), tmp_path / "teacher.safetensors")
    with pytest.raises(ValueError, match="neither a zoo preset"):
        save_deployable(student, tmp_path / "x.safetensors", model_spec="no-such-model")


def test_config_json_round_trip_keeps_overrides_and_globs():
    config = LiteConfig(
        sla=SLAConfig(topk=0.2, feature_map="elu"),
        fp8=FP8Config(granularity="tensorwise", exclude=("*.head*",)),
        sla_scopes=("global",),
        sla_overrides=(("blocks.0.*", SLAConfig(topk=1.0)),),
        trainable=("*.norm*",),
    )
    assert config_from_json(config_to_json(config)) == config
