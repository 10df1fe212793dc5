"""The ``lite3r`` torch.compile backend on dense models: training-free SLA + FP8 on the Dynamo
graph, then Inductor. Most tests run the rewritten graph with ``compiler="eager"`` (a CPU
Inductor compile costs tens of seconds); one goes through Inductor end to end."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from lite3r_compile.backends.graph_fp8 import dynamic_float8_linear
from lite3r_compile.config import FP8Config
from lite3r_compile.backends.registration import (
    CompileOptions,
    GraphBreakWarning,
    NoFP8DeviceWarning,
    clear_compile_reports,
    compile_reports,
    lite3r_backend,
)
from test_backend_deploy import BLOCKS, DIM, TOKENS, make_student, make_teacher, rel_err, tokens

SMALL = {"topk": BLOCKS.topk, "block_q": BLOCKS.block_q, "block_k": BLOCKS.block_k}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    clear_compile_reports()
    with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", NoFP8DeviceWarning)
        yield
    torch._dynamo.reset()


def _compile(model, **options):
    return torch.compile(model, backend=lite3r_backend, options=options)


def test_topk_one_without_fp8_is_the_dense_model_and_frames_are_dynamic():
    teacher = make_teacher()
    compiled = _compile(teacher, compiler="eager", topk=1.0, block_q=16, block_k=16, fp8=False)
    for frames in (2, 3, 4, 5):
        x = tokens(frames, seed=frames)
        with torch.no_grad():
            out, dense = compiled(x), teacher(x)
        assert (out - dense).abs().max() < 1e-5, frames
    # S=2 compiles static, S=3 once more with the frames dynamic; S=4, 5 reuse it
    assert counters["stats"]["unique_graphs"] == 2
    report = compile_reports()[-1]
    assert [(s.path, s.form, s.rewritten) for s in report.sites] == [
        ("frame_block.attn", "sdpa", True), ("global_block.attn", "matmul", True)
    ]
    assert report.quantized == 0


def test_training_free_sla_and_fp8_match_the_lite_student():
    teacher = make_teacher()
    student = make_student(teacher)
    with torch.no_grad():  # training-free: the compiled model's projections are zero
        for p in student.parameters():
            if p.requires_grad:
                p.zero_()
    compiled = _compile(teacher, compiler="eager", **SMALL)
    x = tokens(3, seed=3)
    with torch.no_grad():
        out, want, dense = compiled(x), type(student).forward(student, x), teacher(x)
    assert rel_err(out, want) < 1e-5
    assert rel_err(out, dense) > 1e-3, "sparse attention and FP8 change the result"
    report = compile_reports()[-1]
    assert report.rewritten == 2 and report.fp8_emulated
    quantized = sorted(lin.path for lin in report.linears if lin.quantized)
    assert len(quantized) == 8 and all(p.startswith(("frame_block.", "global_block.")) for p in quantized)
    # each MLP's GELU is computed inside its second layer's quantization, as in a deployed student
    assert sorted(lin.path for lin in report.linears if lin.gelu_fused) == ["frame_block.mlp.2", "global_block.mlp.2"]
    # and each block's LayerNorms inside the quantization of the layer they feed
    assert sorted(lin.path for lin in report.linears if lin.norm_fused) == [
        f"{block}.{layer}" for block in ("frame_block", "global_block") for layer in ("attn.qkv", "mlp.0")]
    head = next(lin for lin in report.linears if lin.path == "head")
    assert not head.quantized and "not multiples of 16" in head.reason


def test_dense_rows_option_gives_the_lite_students_exact_rows():
    teacher = make_teacher()
    rows = (TOKENS, 3)  # the first 3 tokens of every frame, as VGGT's camera and register tokens
    compiled = _compile(teacher, compiler="eager", fp8=False, dense_rows=rows, **SMALL)
    x = tokens(3, seed=4)
    with torch.no_grad():
        out, dense = compiled(x), teacher(x)
    no_fp8 = make_student(teacher, sla=dataclasses.replace(BLOCKS, dense_rows=rows), fp8=FP8Config(enabled=False))
    with torch.no_grad():
        for p in no_fp8.parameters():
            if p.requires_grad:
                p.zero_()
        want = type(no_fp8).forward(no_fp8, x)
    assert rel_err(out, want) < 1e-5 and rel_err(out, dense) > 1e-3
    assert compile_reports()[-1].options.sla_config().dense_rows == rows
    # without the option the rows are block-sparse like the rest
    torch._dynamo.reset()
    with torch.no_grad():
        sparse = _compile(teacher, compiler="eager", fp8=False, **SMALL)(x)
    assert rel_err(sparse, want) > 1e-3
    with pytest.raises(ValueError, match="dense_rows"):
        CompileOptions.from_options({"dense_rows": (4, 5)})


def test_inductor_end_to_end_fp8_against_the_eager_student_and_saturation():
    teacher = make_teacher(frame_block=False)
    student = make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.zero_()
    compiled = torch.compile(teacher, backend=lite3r_backend, dynamic=True, options=SMALL)
    for frames, scale in ((2, 1.0), (3, 1.0), (3, 1e6)):
        x = tokens(frames, seed=frames) * scale
        with torch.no_grad():
            out, want = compiled(x), type(student).forward(student, x)
        assert torch.isfinite(out).all(), "activations beyond the e4m3 range must saturate, not NaN"
        assert rel_err(out, want) < 2e-2, (frames, scale)
    assert counters["stats"]["unique_graphs"] == 1


def test_dense_bf16_teacher_at_topk_one_without_fp8():
    teacher = make_teacher().to(torch.bfloat16)
    compiled = _compile(teacher, compiler="eager", topk=1.0, fp8=False)
    x = tokens(2).to(torch.bfloat16)
    with torch.no_grad():
        assert rel_err(compiled(x), teacher(x)) < 1e-2


def test_fp8_linear_saturates_where_a_bare_cast_would_not():
    x = torch.tensor([[1e30, -1e30, 3.0, 0.0] * 4], dtype=torch.float32)
    weight = torch.eye(16)
    out = dynamic_float8_linear(x, weight, None, "tensorwise")
    assert torch.isfinite(out).all()
    assert out[0, 0] == pytest.approx(1e30, rel=0.07) and out[0, 2] == 0.0  # 3 vanishes next to 1e30


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, DIM // 2)).permute(2, 0, 3, 1, 4).unbind(0)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if x.sum().item() > 0:  # data-dependent Python: a graph break
            dense = dense * 2
        return self.out(dense.transpose(1, 2).flatten(2))


def test_graph_breaks_and_unrewritable_sites_are_reported():
    model = Breaks().eval()
    x = torch.randn(2, TOKENS, DIM)
    mask = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    compiled = _compile(model, compiler="eager", **SMALL)
    # the whole reason on one line: the explanation names the call (here Tensor.item)
    with pytest.warns(GraphBreakWarning, match=r"graph break .*item\(\)"):
        with torch.no_grad():
            out = compiled(x, mask)
    with torch.no_grad():
        assert torch.isfinite(out).all()
    reports = compile_reports()
    assert len(reports) >= 2 and any(r.graph_breaks for r in reports)
    site = next(s for r in reports for s in r.sites)
    assert not site.rewritten and "mask" in site.reason


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown option.*'top_k'"):
        CompileOptions.from_options({"top_k": 0.5})
    with pytest.raises(ValueError, match="topk"):
        CompileOptions.from_options({"topk": 0.0})
    with pytest.raises(ValueError, match="granularity"):
        CompileOptions.from_options({"granularity": "blockwise"})
    compiled = _compile(make_teacher(), compiler="eager", bogus=1)
    with pytest.raises(Exception, match="bogus"):
        compiled(tokens(2))


@pytest.mark.gpu
def test_on_a_gpu_fp8_and_sla_match_the_student_and_topk_one_matches_the_dense_teacher():
    teacher = make_teacher().to("cuda", torch.bfloat16)
    student = make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.zero_()
    x = tokens(4).to("cuda", torch.bfloat16)
    compiled = torch.compile(teacher, backend=lite3r_backend, options=SMALL)
    with torch.no_grad():
        assert rel_err(compiled(x), type(student).forward(student, x)) < 2e-2
    assert not compile_reports()[-1].fp8_emulated
    torch._dynamo.reset()
    dense = torch.compile(teacher, backend=lite3r_backend, options={"topk": 1.0, "fp8": False})
    with torch.no_grad():
        assert rel_err(dense(x), teacher(x)) < 1e-2


def test_a_zoo_model_compiles_to_what_its_lite_student_computes():
    from lite3r_compile.api import lite
    from lite3r_compile.config import LiteConfig
    from lite3r_compile.models_zoo import create
    from lite3r_compile.sla.config import SLAConfig

    torch.manual_seed(0)
    teacher = create("pi3-tiny").eval()
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="eager", example_inputs=(images,), config=LiteConfig(sla=SLAConfig(**SMALL)))
        compiled = _compile(teacher, compiler="eager", **SMALL)
        with torch.no_grad():
            out, want, dense = compiled(images), type(student).forward(student.eval(), images), teacher(images)
    for key, value in want.items():
        assert rel_err(out[key], value) < 1e-4, key
    assert any(rel_err(dense[key], value) > 1e-3 for key, value in want.items())
    record = student.lite3r_record.passes.artifacts
    reports = compile_reports()
    assert sorted(s.path for r in reports for s in r.sites if s.rewritten) == sorted(
        s.path for s in record["sla_sites"] if s.rewritten
    )
    assert sorted(lin.path for r in reports for lin in r.linears if lin.quantized) == sorted(
        d.path for d in record["fp8_layers"] if d.quantized
    )


def test_inductor_options_reach_compile_fx_for_the_backend_and_the_deployed_student(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    from lite3r_compile.backends.deploy import deploy
    from lite3r_compile.config import LiteConfig

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    model = make_teacher(frame_block=False)
    x = tokens(2)
    with torch.no_grad():
        _compile(model, sla=False, fp8=False, multi_kernel=True)(x)
    assert seen[-1]["triton.multi_kernel"] == 1 and "triton.cudagraphs" not in seen[-1]
    # every graph rounds its intermediates as eager does, whatever the options
    assert seen[-1]["emulate_precision_casts"] is True

    torch._dynamo.reset()
    seen.clear()
    teacher = make_teacher(frame_block=False)
    student = make_student(teacher, inductor_multi_kernel=True)
    plain = make_student(teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = deploy(student, "fp8")
        with torch.no_grad():
            deployed(x)
    assert deployed.record.multi_kernel
    assert seen and all(p["triton.multi_kernel"] == 1 for p in seen)
    assert not deploy(plain, "fp8", compile=False).record.multi_kernel
    assert LiteConfig().inductor_multi_kernel is False
    # the deployed form's graphs take the resize kernel's switch from LiteConfig.bilinear_kernel
    assert compile_reports()[-1].options.bilinear_kernel is True
    torch._dynamo.reset()
    clear_compile_reports()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = deploy(make_student(teacher, bilinear_kernel=False), "fp8")
        with torch.no_grad():
            off(x)
    assert compile_reports() and all(not r.options.bilinear_kernel for r in compile_reports())
