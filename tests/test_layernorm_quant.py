"""A block's LayerNorm fused into the rowwise FP8 quantization of the layer it feeds: the kernel,
the op and the deploy pass that moves ``nn.LayerNorm`` into the ``Float8Linear`` after it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lite3r_compile.backends.fp8_linear import Float8Linear, quantize_to_e4m3
from lite3r_compile.backends.fuse_layernorm import fuse_layernorm_quantization
from lite3r_compile.backends.layernorm_quant import layernorm_quant_rowwise, layernorm_quantize_triton
from lite3r_compile.models_zoo.layers import Attention, Mlp

DIM = 32


def reference(x, weight, bias, eps=1e-5):
    return quantize_to_e4m3(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), rowwise=True)


def norm_params(n: int, affine: bool, bias: bool, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    weight = 1 + 0.5 * torch.randn(n, generator=g) if affine else None
    return weight, (0.3 * torch.randn(n, generator=g) if affine and bias else None)


@pytest.mark.parametrize("shape", [(5, 96), (1, 1024), (9, 100), (4, 1)])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_the_triton_kernel_quantizes_what_eager_layer_norm_then_quantize_does(shape, affine, bias, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # float32: Triton 3.6's interpreter truncates a cast to bfloat16 where a GPU rounds it
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3 + 1
    weight, b = norm_params(shape[1], affine, bias)
    q, scale = layernorm_quantize_triton(x, weight, b, 1e-6)
    want_q, want_scale = reference(x, weight, b, 1e-6)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (shape[0], 1)
    torch.testing.assert_close(scale, want_scale, rtol=1e-5, atol=0)
    # two-pass sums against F.layer_norm's: a last-bit difference can flip a rounding
    assert (q.float() == want_q.float()).float().mean() > 0.99
    torch.testing.assert_close(q.float(), want_q.float(), rtol=0.13, atol=2.0**-9)


def test_rows_of_one_value_and_huge_rows_stay_finite(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.tensor([[3.0, 3.0, 3.0, 3.0], [1e30, -1e30, 2.0, 0.0]])
    q, scale = layernorm_quantize_triton(x, None, None, 1e-5)
    want_q, want_scale = reference(x, None, None)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert (q.float()[0] == 0).all() and torch.equal(q.float(), want_q.float())


def test_bad_inputs_are_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        layernorm_quantize_triton(torch.randn(2, 8), None, None, 1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="weight has shape"):
        layernorm_quantize_triton(torch.randn(2, 8), torch.ones(4), None, 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        layernorm_quantize_triton(torch.randn(8, 2).t(), None, None, 1e-5)


def test_the_op_passes_opcheck_and_runs_the_reference_on_a_cpu():
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    weight, bias = (t.to(torch.bfloat16) for t in norm_params(64, True, True))
    q, scale = layernorm_quant_rowwise(x, weight, bias, 1e-6)
    want_q, want_scale = reference(x, weight, bias, 1e-6)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
    torch.library.opcheck(layernorm_quant_rowwise, (x, weight, bias, 1e-6))
    torch.library.opcheck(layernorm_quant_rowwise, (x, None, None, 1e-5))


class Block(nn.Module):
    """A pre-norm block as VGGT's: the norms feed a child whose first op is an FP8 layer."""

    def __init__(self, granularity: str = "rowwise"):
        super().__init__()
        torch.manual_seed(0)
        self.norm1 = nn.LayerNorm(DIM, eps=1e-6)
        self.attn = Attention(DIM, num_heads=4, qkv_bias=True)
        self.norm2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = Mlp(DIM, 2 * DIM)
        self.norm3 = nn.LayerNorm(DIM)
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(DIM, DIM))
        with torch.no_grad():
            for norm in (self.norm1, self.norm2, self.norm3):
                norm.weight.normal_(1, 0.3), norm.bias.normal_(0, 0.3)
        for parent, name in ((self.attn, "qkv"), (self.attn, "proj"), (self.mlp, "fc1"), (self.mlp, "fc2"),
                             (self.head, "1")):
            setattr(parent, name, Float8Linear.from_linear(getattr(parent, name), granularity=granularity))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm3(x))


def test_a_blocks_norms_move_into_the_fp8_layers_they_feed_with_the_same_values():
    block = Block().eval()
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        expected = block(x)
    result = fuse_layernorm_quantization(block)
    # past a child's forward (attn, mlp) and past an eval Dropout (head)
    assert result.fused == [("norm1", "attn.qkv"), ("norm2", "mlp.fc1"), ("norm3", "head.1")]
    assert result.kept == []
    assert all(isinstance(getattr(block, f"norm{i}"), nn.Identity) for i in (1, 2, 3))
    assert block.attn.qkv.input_norm.eps == 1e-6 and "layer_norm(input) fused" in repr(block.mlp.fc1)
    with torch.no_grad():
        assert torch.equal(block(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(x), expected)


class NormTwice(nn.Module):
    """A norm whose output also feeds a residual: moving it would drop that use."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = Float8Linear.from_linear(nn.Linear(DIM, DIM))

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h


class ResidualMlp(Mlp):
    def forward(self, h):
        return self.fc2(self.act(self.fc1(h))) + h


class InputTwice(nn.Module):
    """The consumer uses its input for more than its first FP8 layer."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.mlp = ResidualMlp(DIM, DIM)
        self.mlp.fc1 = Float8Linear.from_linear(self.mlp.fc1)

    def forward(self, x):
        return self.mlp(self.norm(x))


class TwoDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm((4, DIM // 4))
        self.fc = Float8Linear.from_linear(nn.Linear(DIM, DIM))

    def forward(self, x):
        return self.fc(self.norm(x.unflatten(-1, (4, DIM // 4))).flatten(-2))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = Float8Linear.from_linear(nn.Linear(DIM, DIM))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc(self.norm(x))


@pytest.mark.parametrize(
    "model, reason",
    [
        (NormTwice, "2 uses"),
        (InputTwice, "uses its input 2 times"),
        (TwoDims, "goes into call_method flatten"),
        (Untraceable, "does not trace with torch.fx"),
        (lambda: Block("tensorwise"), "not a rowwise Float8Linear"),
    ],
)
def test_norms_that_cannot_be_fused_are_kept_and_reported(model, reason):
    m = model().eval()
    x = torch.randn(3, 5, DIM)
    with torch.no_grad():
        expected = m(x)
    result = fuse_layernorm_quantization(m)
    assert result.fused == [] and result.kept and all(reason in why for _, why in result.kept), result.kept
    with torch.no_grad():
        assert torch.equal(m(x), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1024, 1000])
def test_the_cuda_kernel_matches_eager_on_block_shapes(dtype, n):
    x = (torch.randn(8 * 1374 + 3, n, device="cuda") * 2 + 0.5).to(dtype)
    weight, bias = (t.to("cuda", dtype) for t in norm_params(n, True, True))
    q, scale = layernorm_quant_rowwise(x, weight, bias, 1e-6)
    want_q, want_scale = reference(x, weight, bias, 1e-6)
    torch.testing.assert_close(scale, want_scale, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)
    assert (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean() > 0.995
    # a norm value one bf16 step off can round to the next e4m3 value: at most one e4m3 step apart
    torch.testing.assert_close(q.float() * scale, want_q.float() * want_scale, rtol=0.13, atol=1e-2)


def test_under_autocast_the_norm_runs_in_the_dtype_autocast_picks():
    block = Block().eval()
    x = torch.randn(2, 7, DIM).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(x)
        fuse_layernorm_quantization(block)
        assert torch.equal(block(x), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_under_cuda_autocast_the_norm_runs_in_float32_as_unfused():
    block = Block().eval().cuda()
    x = torch.randn(2, 7, DIM, device="cuda").to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = block(x)
        fuse_layernorm_quantization(block)
        assert torch.equal(block(x), expected)
