"""LiteConfig.bf16_heads: the deployed student runs the float32 heads it names in bfloat16."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lite3r_compile import models_zoo
from lite3r_compile.api import lite
from lite3r_compile.backends.deploy import deploy
from lite3r_compile.backends.fp8_linear import Float8Linear
from lite3r_compile.backends.head_precision import find_heads
from lite3r_compile.backends.serialization import config_from_json, load_deployable, read_metadata, save_deployable
from lite3r_compile.bench.models import build_model, make_images, model_spec, output_tensors
from lite3r_compile.config import FP8Config, LiteConfig
from test_backend_deploy import Frames, make_student, make_teacher, rel_err, tokens


def _deployed(student, backend="fp8"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8 emulation on a CPU
        return deploy(student, backend, compile=False)


def _bench_student(name, config, teacher=None):
    """(spec, teacher, images, student): a benchmark model (bf16 backbone, float32 heads) and its
    fp8 student under ``config``."""
    spec = model_spec(name)
    teacher = build_model(spec, "cpu") if teacher is None else teacher
    images = make_images(spec, 2, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="fp8", config=config, example_inputs=(images,))
    return spec, teacher, images, student


def test_only_the_deployed_form_runs_its_heads_in_bfloat16():
    teacher = make_teacher()
    student = make_student(teacher, bf16_heads=("head",))
    reference = make_student(teacher)  # the same student, heads as the model has them
    deployed, as_model = _deployed(student), _deployed(reference)
    assert deployed.record.bf16_heads == ["head"] and deployed.record.heads_kept == []
    assert deployed.module.head.weight.dtype == torch.bfloat16
    assert student.head.weight.dtype == teacher.head.weight.dtype == torch.float32
    x = tokens(2)
    with torch.no_grad():
        out, expected = deployed(x), as_model(x)
    assert out.dtype == torch.float32, "the rest of the model sees the head's old output dtype"
    assert 0 < rel_err(out, expected) < 1e-2
    # the casting hooks trace into the compiled graph: no graph break
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(deployed.module)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_the_bfloat16_heads_follow_the_students_weights():
    student = make_student(make_teacher(), bf16_heads=("head",))
    x = tokens(2)
    with torch.no_grad():
        before = student(x)  # eval router: deploys once
        student.head.weight.mul_(2.0)  # an in-place change refreshes the deployed copies
        after = student(x)
        fresh = _deployed(student)(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


class FramesWithMLPHead(Frames):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))

    def example_inputs(self):
        return (tokens(2, seed=0),)


def test_float8_layers_inside_a_head_keep_their_precision():
    torch.manual_seed(0)
    teacher = FramesWithMLPHead().eval()
    student = make_student(teacher, bf16_heads=("*",), fp8=FP8Config(include=("head.0",)))
    deployed = _deployed(student)
    first, last = deployed.module.head[0], deployed.module.head[2]
    assert isinstance(first, Float8Linear) and first.weight.dtype == torch.float8_e4m3fn
    assert first.weight_scale.dtype == torch.float32
    assert last.weight.dtype == torch.bfloat16
    assert deployed.record.bf16_heads == ["head"]
    with torch.no_grad():
        assert deployed(tokens(2)).dtype == torch.float32


def test_a_head_with_nothing_in_float32_is_kept_and_said_so():
    student = make_student(make_teacher().to(torch.bfloat16), bf16_heads=("head",))
    deployed = _deployed(student)
    assert deployed.record.bf16_heads == []
    assert deployed.record.heads_kept == [("head", "no float32 parameter or buffer")]


def test_a_saved_student_keeps_its_bfloat16_heads(tmp_path):
    student = make_student(make_teacher(), bf16_heads=("head",))
    path = tmp_path / "student.safetensors"
    save_deployable(student, path)
    assert config_from_json(read_metadata(path)["config"]).bf16_heads == ("head",)
    loaded = load_deployable(path, model=make_teacher(seed=3))
    assert loaded.module.head.weight.dtype == torch.bfloat16
    x = tokens(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), _deployed(student)(x))


def test_a_glob_that_names_no_head_is_an_error_that_lists_the_heads():
    student = make_student(make_teacher(), bf16_heads=("head", "depth_head"))
    with pytest.raises(ValueError, match=r"\['depth_head'\] name no head of Frames \(its heads: \['head'\]"):
        _deployed(student)


def test_vggt_heads_take_their_token_lists_and_images_in_bfloat16():
    torch.manual_seed(0)
    model = models_zoo.create("vggt-tiny").eval()
    assert sorted(find_heads(model)) == ["camera_head", "depth_head", "point_head", "track_head"]
    config = LiteConfig(bf16_heads=("*",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(model, backend="fp8", config=config)
        reference = lite(model, backend="fp8")
    images, _ = model.example_inputs()
    with torch.no_grad():
        out = output_tensors(_deployed(student)(images))
        expected = output_tensors(_deployed(reference)(images))
    for key in ("depth", "world_points", "pose_enc"):
        assert out[key].dtype == torch.float32
        assert rel_err(out[key], expected[key]) < 2e-2, key
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(_deployed(student).module)(images)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_the_benchmarks_float32_heads_run_in_the_dtype_they_were_lowered_to():
    # the benchmark wraps each head to run it in float32 behind a bf16 backbone; a bf16 head must
    # get bf16 inputs from that wrapper (a float32 input into bf16 weights is a dtype error)
    heads = model_spec("vggt-tiny").dense_heads
    spec, teacher, images, student = _bench_student("vggt-tiny", LiteConfig(bf16_heads=heads))
    deployed = _deployed(student)
    assert sorted(deployed.record.bf16_heads) == ["depth_head", "point_head"]
    with torch.no_grad():
        out = output_tensors(deployed(images), spec.passthrough_outputs)
        expected = output_tensors(teacher(images), spec.passthrough_outputs)
    for key in ("depth", "world_points"):
        assert rel_err(out[key], expected[key]) < 5e-2, key


def test_da3_dualdpt_in_bfloat16_returns_its_dict_in_float32():
    heads = model_spec("da3-tiny").dense_heads
    spec, teacher, images, student = _bench_student("da3-tiny", LiteConfig(bf16_heads=heads))
    *_, reference = _bench_student("da3-tiny", LiteConfig(), teacher)
    deployed = _deployed(student)
    assert deployed.record.bf16_heads == ["head"]
    with torch.no_grad():
        out = output_tensors(deployed(images), spec.passthrough_outputs)
        expected = output_tensors(_deployed(reference)(images), spec.passthrough_outputs)
    for key in ("depth", "depth_conf"):
        assert out[key].dtype == torch.float32
        assert rel_err(out[key], expected[key]) < 2e-2, key


def test_the_deployed_dpt_heads_run_the_frames_chunk_the_config_asks_for():
    torch.manual_seed(0)
    model = models_zoo.create("vggt-tiny").eval()
    images = torch.rand(1, 3, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunked = lite(model, backend="fp8", config=LiteConfig(head_frames_chunk=1))
        reference = lite(model, backend="fp8")
    deployed = _deployed(chunked)
    assert sorted(deployed.record.head_frames_chunk) == ["depth_head", "point_head", "track_head.feature_extractor"]
    assert deployed.module.depth_head.frames_chunk_size == 1
    assert chunked.depth_head.frames_chunk_size == model.depth_head.frames_chunk_size == 8  # copies only
    starts = []
    impl = deployed.module.depth_head._forward_impl
    deployed.module.depth_head._forward_impl = lambda *a, **k: starts.append(a[3:]) or impl(*a, **k)
    with torch.no_grad():
        out = output_tensors(deployed(images))
        expected = output_tensors(_deployed(reference)(images))
    assert starts == [(0, 1), (1, 2), (2, 3)]
    for key in ("depth", "world_points", "pose_enc"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5)


def test_a_frames_chunk_for_a_model_without_chunked_heads_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        LiteConfig(head_frames_chunk=0)
    student = make_student(make_teacher(), head_frames_chunk=2)
    with pytest.raises(ValueError, match="frames_chunk_size"):
        _deployed(student)
