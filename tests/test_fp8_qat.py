"""FP8 fake-quantization: the rounding, the Linear that carries it, and the layer-selection rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.passes.fp8_qat import (
    E4M3,
    E4M3_MAX,
    FP8FakeQuantLinear,
    e4m3_scale,
    fake_quantize_e4m3,
    fp8_qat,
    plan_fp8,
    quantize_e4m3,
)


def test_quantize_saturates_instead_of_nan():
    # The bare cast maps 1000 to NaN on torch 2.11; the clamp must come first.
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.0])
    q = quantize_e4m3(x, torch.tensor(1.0))
    assert torch.equal(q, torch.tensor([E4M3_MAX, -E4M3_MAX, 1.0, 0.0]))


@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 40),
    log_range=st.floats(-8, 8),
    rowwise=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fake_quant_lies_on_the_scaled_e4m3_grid(rows, cols, log_range, rowwise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 10.0**log_range
    scale = e4m3_scale(x, rowwise)
    q = fake_quantize_e4m3(x, rowwise)
    assert q.shape == x.shape and q.dtype == x.dtype
    grid = q / scale
    # every value is an e4m3 number times the scale (up to the float32 rounding of q / scale)
    assert torch.allclose(grid.to(E4M3).float(), grid, rtol=1e-6, atol=0)
    assert grid.abs().max() <= E4M3_MAX * (1 + 1e-6)
    # round-to-nearest with 3 mantissa bits: relative error <= 2^-4 on normals; absolute error
    # <= half the subnormal step 2^-9 below the smallest normal 2^-6
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert ((q - x).abs() <= bound).all()
    # the largest magnitude of each row (or the tensor) maps to the top of the range
    top = (x.abs() / scale).amax(dim=-1) if rowwise else (x.abs() / scale).amax()
    assert torch.allclose(top, torch.full_like(top, E4M3_MAX), rtol=1e-5)


def test_zero_rows_stay_zero_and_gradients_finite():
    x = torch.randn(4, 32)
    x[1] = 0.0
    x.requires_grad_(True)
    q = fake_quantize_e4m3(x, rowwise=True)
    assert torch.equal(q[1], torch.zeros(32))
    assert torch.isfinite(q).all()
    q.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient_is_identity(rowwise, dtype):
    x = (torch.randn(6, 48) * 3).to(dtype).requires_grad_(True)
    upstream = torch.randn(6, 48).to(dtype)
    (fake_quantize_e4m3(x, rowwise) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("rowwise", [True, False])
def test_matches_torchao_float8_fake_quantizer_on_nonzero_rows(rowwise):
    qat = pytest.importorskip("torchao.quantization.qat")
    from torchao.quantization.granularity import PerRow, PerTensor

    quantizer = qat.Float8FakeQuantizer(
        qat.Float8FakeQuantizeConfig(granularity=PerRow() if rowwise else PerTensor())
    )
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8).unsqueeze(1)
    assert torch.equal(fake_quantize_e4m3(x, rowwise), quantizer(x))


def _linear(in_f=32, out_f=48, bias=True):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("quantize_activations", [True, False])
def test_fake_quant_linear_shares_parameters_and_keys(granularity, quantize_activations):
    lin = _linear()
    fq = FP8FakeQuantLinear.from_linear(
        lin, granularity=granularity, quantize_activations=quantize_activations
    )
    assert fq.weight is lin.weight and fq.bias is lin.bias
    assert list(fq.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    assert list(fq.buffers()) == []
    x = torch.randn(2, 5, 32)
    rowwise = granularity == "rowwise"
    x_in = fake_quantize_e4m3(x, rowwise) if quantize_activations else x
    expected = F.linear(x_in, fake_quantize_e4m3(lin.weight, rowwise), lin.bias)
    out = fq(x)
    assert torch.equal(out, expected)
    assert not torch.equal(out, lin(x))  # the rounding really happens
    assert (out - lin(x)).norm() < 0.05 * lin(x).norm()  # e4m3 keeps about 2^-5 relative error


def test_fake_quant_linear_without_bias_in_bf16():
    lin = _linear(bias=False).to(torch.bfloat16)
    fq = FP8FakeQuantLinear.from_linear(lin)
    out = fq(torch.randn(3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and fq.bias is None


def test_fake_quant_linear_weight_gradient_matches_straight_through():
    lin = _linear()
    fq = FP8FakeQuantLinear.from_linear(lin)
    x = torch.randn(4, 32)
    fq(x).square().sum().backward()
    grad = lin.weight.grad.clone()
    lin.weight.grad = None
    # d/dW of sum(y^2) with y = q(x) q(W)^T + b and the STE: 2 y^T q(x)
    y = fq(x).detach()
    assert torch.allclose(grad, 2 * y.T @ fake_quantize_e4m3(x, True), rtol=1e-5, atol=1e-5)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class _Toy(nn.Module):
    """patch_embed -> 2 blocks -> neck (outside blocks) -> head; plus an unaligned Linear in a
    block and an nn.MultiheadAttention head."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(48, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(2)])
        self.blocks[1].odd = nn.Linear(dim, 24)
        self.neck = nn.Linear(dim, dim)
        self.camera_head = nn.Sequential(nn.Linear(dim, 16))
        self.track_head = nn.ModuleDict({"attn": nn.MultiheadAttention(dim, heads, batch_first=True)})

    def forward(self, x):
        x = self.patch_embed(x)
        for b in self.blocks:
            x = b(x)
        x = self.neck(x)
        return self.camera_head(x) + self.track_head["attn"](x, x, x)[0][..., :16]


SITES = ["blocks.0.attn", "blocks.1.attn", "track_head.attn"]


def _plan(config=FP8Config(), sites=SITES):
    return {d.path: d for d in plan_fp8(_Toy(), config, sites)}


def test_default_plan_quantizes_block_linears_only():
    plan = _plan()
    quantized = sorted(p for p, d in plan.items() if d.quantized)
    assert quantized == sorted(
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    )
    assert plan["blocks.1.odd"].rule == "unaligned" and "24" in plan["blocks.1.odd"].reason
    assert plan["patch_embed.0"].rule == "patch_embed"
    assert plan["camera_head.0"].rule == "head"
    assert plan["neck"].rule == "outside"
    assert plan["track_head.attn.out_proj"].rule == "mha"
    # every Linear of the model is in the plan, none silently dropped
    assert set(plan) == {p for p, m in _Toy().named_modules() if isinstance(m, nn.Linear)}


def test_include_exclude_and_switches():
    plan = _plan(FP8Config(include=("camera_head.*", "neck"), exclude=("blocks.0.*",)))
    assert plan["camera_head.0"].quantized and plan["camera_head.0"].rule == "include"
    assert plan["neck"].quantized
    assert not plan["blocks.0.attn.qkv"].quantized and plan["blocks.0.attn.qkv"].rule == "exclude"
    assert plan["blocks.1.attn.qkv"].quantized
    # include never overrides the alignment rule
    assert not _plan(FP8Config(include=("blocks.1.odd",)))["blocks.1.odd"].quantized
    assert not _plan(FP8Config(skip_patch_embed=False))["patch_embed.0"].quantized  # outside blocks
    no_heads_rule = _plan(FP8Config(skip_heads=False), sites=SITES + ["camera_head.0"])
    assert no_heads_rule["camera_head.0"].quantized
    assert not any(d.quantized for d in _plan(FP8Config(enabled=False)).values())


def test_no_attention_quantizes_every_aligned_linear_outside_heads():
    plan = _plan(sites=[])
    assert plan["neck"].quantized and plan["neck"].rule == "no_attention"
    assert plan["blocks.0.mlp.0"].quantized
    assert not plan["camera_head.0"].quantized and not plan["patch_embed.0"].quantized


def test_pass_swaps_modules_in_place_keeping_state_dict():
    model = _Toy()
    before = {k: v for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    x = torch.randn(2, 7, 48)
    dense = model(x)
    result = fp8_qat(model, LiteConfig(), [type("Site", (), {"path": p})() for p in SITES])
    decisions = result.artifacts["fp8_layers"]
    assert sum(d.quantized for d in decisions) == 8
    assert isinstance(model.blocks[0].attn.qkv, FP8FakeQuantLinear)
    assert type(model.neck) is nn.Linear and type(model.camera_head[0]) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert any("not multiples of 16" in n for n in result.notes)
    out = model(x)
    assert out.shape == dense.shape and not torch.equal(out, dense)
    assert (out - dense).abs().max() < 0.1 * dense.abs().max()


def test_shared_linear_is_replaced_everywhere():
    model = _Toy()
    model.blocks[1].attn.proj = model.blocks[0].attn.proj
    fp8_qat(model, LiteConfig(), [type("Site", (), {"path": p})() for p in SITES])
    assert model.blocks[1].attn.proj is model.blocks[0].attn.proj
    assert isinstance(model.blocks[1].attn.proj, FP8FakeQuantLinear)


def test_unknown_granularity_is_an_error():
    with pytest.raises(ValueError, match="granularity must be one of"):
        FP8FakeQuantLinear.from_linear(_linear(), granularity="blockwise")


class _Backbone(nn.Module):
    """A ViT backbone named like a patch embedding (VGGT's DINOv2 is `aggregator.patch_embed`):
    its pixel projection and its transformer blocks."""

    def __init__(self, dim=32):
        super().__init__()
        self.proj = nn.Linear(48, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(dim, dim), "mlp": nn.Linear(dim, dim)}) for _ in range(2)
        )


def test_blocks_inside_a_backbone_named_patch_embed_are_quantized_but_its_projection_is_not():
    model = nn.ModuleDict({"patch_embed": _Backbone(), "blocks": nn.ModuleList([_Backbone().blocks[0]])})
    sites = ["patch_embed.blocks.0.attn", "patch_embed.blocks.1.attn", "blocks.0.attn"]
    plan = {d.path: d for d in plan_fp8(model, FP8Config(), sites)}
    assert plan["patch_embed.proj"].rule == "patch_embed" and not plan["patch_embed.proj"].quantized
    for path in ("patch_embed.blocks.0.mlp", "patch_embed.blocks.1.attn", "blocks.0.mlp"):
        assert plan[path].quantized and plan[path].rule == "block", path
