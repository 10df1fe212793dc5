"""GELU fused into the rowwise FP8 quantization of an MLP's second layer: the kernel, the op and
the deploy pass that folds ``nn.GELU`` into the ``Float8Linear`` after it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from lite3r_compile.backends.fp8_linear import Float8Linear, quantize_to_e4m3
from lite3r_compile.backends.fuse_gelu import fuse_gelu_quantization
from lite3r_compile.backends.gelu_quant import gelu_quant_rowwise, gelu_quantize_triton
from lite3r_compile.backends.gelu_quant_kernel import gelu_fitted
from lite3r_compile.models_zoo.layers import Mlp


def fp8_mlp(granularity: str = "rowwise", approximate: str = "none") -> Mlp:
    torch.manual_seed(0)
    mlp = Mlp(32, 96, act_layer=lambda: nn.GELU(approximate=approximate)).eval()
    mlp.fc1 = Float8Linear.from_linear(mlp.fc1, granularity=granularity)
    mlp.fc2 = Float8Linear.from_linear(mlp.fc2, granularity=granularity)
    return mlp


# the kernels run on a GPU where there is one (compiled there), else under the interpreter,
# which conftest switches on before any kernel module is imported
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_kernel(y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu_quantize_triton on DEVICE, results back on the CPU"""
    q, scale = gelu_quantize_triton(y.to(DEVICE), **kwargs)
    return q.cpu(), scale.cpu()


@pytest.mark.parametrize("shape", [(5, 96), (1, 4096), (9, 100), (3, 1)])
def test_the_triton_kernel_quantizes_what_eager_gelu_then_quantize_does(shape):
    # float32: Triton 3.6's interpreter truncates a cast to bfloat16 where a GPU rounds it
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    q, scale = run_kernel(y)
    want_q, want_scale = quantize_to_e4m3(F.gelu(y), rowwise=True)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (shape[0], 1)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    # numpy's erf and torch's differ in the last bit now and then, which can flip a rounding or
    # the sign of a zero
    assert (q.float() == want_q.float()).float().mean() > 0.99
    torch.testing.assert_close(q.float(), want_q.float(), rtol=0.13, atol=2.0**-9)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """x Phi(x) in float64, through erfc so that neither tail cancels"""
    x = x.double()
    return x * 0.5 * torch.special.erfc(-x / 2**0.5)


@triton.jit
def apply_gelu_fitted(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, gelu_fitted(x), mask=offs < n)


def test_the_fitted_gelu_is_within_2e_5_of_the_exact_one_in_both_tails():
    # every float32 step of 1/256 on [-13, 13], where x Phi(x) stays a normal float32
    x = torch.arange(-13 * 256, 13 * 256 + 1, dtype=torch.float32, device=DEVICE) / 256
    out = torch.empty_like(x)
    apply_gelu_fitted[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    x, out = x.cpu(), out.cpu()
    want = exact_gelu(x)
    rel = ((out.double() - want).abs() / want.abs().clamp_min(1e-300))[x != 0]
    assert rel.max() < 2e-5, f"worst relative error {rel.max():.2e} at x = {x[x != 0][rel.argmax()]}"
    assert (out[x == 0] == 0).all()
    # eager's float32 GELU, for scale: it loses digits where 1 + erf(x) cancels
    eager_rel = ((F.gelu(x).double() - want).abs() / want.abs().clamp_min(1e-300))[(x < -4) & (x > -6)]
    assert eager_rel.median() > 1e-3


def test_the_kernels_bytes_are_the_correctly_rounded_gelus():
    y = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3)) * 2
    q, scale = run_kernel(y)
    want_q, want_scale = quantize_to_e4m3(exact_gelu(y).float(), rowwise=True)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean() > 0.9999


def test_the_erf_and_identity_forms_and_a_wrong_form():
    y = torch.randn(7, 300, generator=torch.Generator().manual_seed(4)) * 3
    q, scale = run_kernel(y, gelu_form="identity")
    want_q, want_scale = quantize_to_e4m3(y, rowwise=True)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (q.float() == want_q.float()).float().mean() > 0.999
    q, scale = run_kernel(y, gelu_form="erf")
    want_q, want_scale = quantize_to_e4m3(F.gelu(y), rowwise=True)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (q.float() == want_q.float()).float().mean() > 0.99
    with pytest.raises(ValueError, match="gelu_form='tanh'"):
        gelu_quantize_triton(y, gelu_form="tanh")


def test_the_kernel_saturates_huge_rows_and_keeps_zero_rows_finite():
    y = torch.tensor([[1e30, -1e30, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = run_kernel(y)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert q.float()[0].abs().max() == 448 and (q.float()[1] == 0).all()


def test_a_cpu_tensor_outside_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gelu_quantize_triton(torch.randn(2, 8))


def test_the_op_passes_opcheck_and_runs_the_reference_on_a_cpu():
    y = torch.randn(6, 64, dtype=torch.bfloat16)
    q, scale = gelu_quant_rowwise(y)
    want_q, want_scale = quantize_to_e4m3(F.gelu(y), rowwise=True)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
    torch.library.opcheck(gelu_quant_rowwise, (y,))


def test_an_mlps_gelu_is_folded_into_its_second_fp8_layer_to_the_bit():
    mlp = fp8_mlp()
    x = torch.randn(2, 7, 32, dtype=torch.float32)
    expected = mlp(x)
    result = fuse_gelu_quantization(mlp)
    assert result.fused == ["act"] and result.kept == []
    assert isinstance(mlp.act, nn.Identity) and mlp.fc2.input_gelu and "gelu(input) fused" in repr(mlp.fc2)
    assert torch.equal(mlp(x), expected)
    # compiled (Dynamo traces the op through its fake implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), expected)


class GeluTwice(nn.Module):
    """A GELU whose output also feeds a residual: folding it would drop that use."""

    def __init__(self):
        super().__init__()
        self.act = nn.GELU()
        self.fc2 = Float8Linear.from_linear(nn.Linear(32, 32))

    def forward(self, x):
        h = self.act(x)
        return self.fc2(h) + h


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.GELU()
        self.fc2 = Float8Linear.from_linear(nn.Linear(32, 32))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc2(self.act(x))


@pytest.mark.parametrize(
    "model, reason",
    [
        (lambda: fp8_mlp(approximate="tanh"), "approximate='tanh'"),
        (lambda: fp8_mlp(granularity="tensorwise"), "not a rowwise Float8Linear"),
        (GeluTwice, "2 uses"),
        (Untraceable, "does not trace with torch.fx"),
    ],
)
def test_gelus_that_cannot_be_folded_are_kept_and_reported(model, reason):
    m = model().eval()
    x = torch.randn(3, 32)
    expected = m(x)
    result = fuse_gelu_quantization(m)
    assert result.fused == []
    assert [path for path, _ in result.kept] == ["act"] and reason in result.kept[0][1]
    assert isinstance(m.act, nn.GELU) and torch.equal(m(x), expected)


def test_a_deployed_fp8_student_folds_every_mlp_gelu(tmp_path):
    from lite3r_compile.api import lite
    from lite3r_compile.backends.deploy import deploy
    from lite3r_compile import models_zoo

    torch.manual_seed(0)
    teacher = models_zoo.create("vggt-tiny").eval()
    images = torch.rand(1, 2, 3, 56, 56)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="fp8", example_inputs=(images,)).eval()
        deployed = deploy(student, "fp8", compile=False)
    record = deployed.record
    fc2 = [p for p in record.float8_layers if p.endswith("mlp.fc2")]
    assert fc2 and sorted(p.rsplit(".", 1)[0] for p in record.gelu_fused) == sorted(p.rsplit(".", 1)[0] for p in fc2)
    with torch.no_grad():
        out = deployed(images)
        eager = type(student).forward(student, images)
    for key in ("depth", "world_points"):
        assert ((out[key] - eager[key]).norm() / eager[key].norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_cuda_kernel_matches_eager_on_mlp_shapes(dtype):
    y = torch.randn(8 * 1374 + 3, 4096, device="cuda", dtype=dtype) * 2
    q, scale = gelu_quant_rowwise(y)
    want_q, want_scale = quantize_to_e4m3(F.gelu(y), rowwise=True)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean() > 0.999
