"""SparseLinearAttention: dense equality at topk=1, dtypes, the float32 proj_l, autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lite3r_compile.sla import SLAConfig, SparseLinearAttention, reference
from lite3r_compile.sla.config import FEATURE_MAPS


def _qkv(batch, heads, q_len, k_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype) for n in (q_len, k_len, k_len)
    )


def _relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 80),
    k_len=st.integers(1, 80),
    head_dim=st.sampled_from([32, 64, 128]),
    block_q=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([16, 32, 64]),
    feature_map=st.sampled_from(FEATURE_MAPS),
    scale=st.one_of(st.none(), st.floats(0.05, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_topk_one_equals_dense_attention(batch, heads, q_len, k_len, head_dim, block_q, block_k, feature_map, scale, seed):
    config = SLAConfig(topk=1.0, block_q=block_q, block_k=block_k, feature_map=feature_map)
    module = SparseLinearAttention(head_dim, config)
    with torch.no_grad():
        module.proj_l.weight.normal_()  # the linear branch is empty, so any weight gives the same
    q, k, v = _qkv(batch, heads, q_len, k_len, head_dim, seed=seed)
    out = module(q, k, v, scale=scale)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert out.shape == (batch, heads, q_len, head_dim) and out.dtype == torch.float32
    assert _relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_module_is_the_reference_with_its_projection(feature_map):
    config = SLAConfig(topk=0.3, negligible=0.2, block_q=16, block_k=16, feature_map=feature_map)
    module = SparseLinearAttention(32, config)
    with torch.no_grad():
        module.proj_l.weight.normal_()
        module.proj_l.bias.normal_()
    q, k, v = _qkv(2, 2, 45, 83, 32)
    expected, _, _, _ = reference.sla_forward(q, k, v, module.proj_l.weight, module.proj_l.bias, 0.3, config)
    torch.testing.assert_close(module(q, k, v, scale=0.3), expected)


def test_fresh_module_is_block_sparse_attention():
    config = SLAConfig(topk=0.25, block_q=16, block_k=16)
    module = SparseLinearAttention(64, config)
    assert torch.equal(module.proj_l.weight, torch.zeros(64, 64))
    assert torch.equal(module.proj_l.bias, torch.zeros(64))
    q, k, v = _qkv(1, 2, 32, 64, 64)
    classes = reference.classify_blocks(q, k, config)
    o_s, _ = reference.sparse_branch(q, k, v, classes, None, config)
    torch.testing.assert_close(module(q, k, v), o_s)
    assert [name for name, _ in module.named_parameters()] == ["proj_l.weight", "proj_l.bias"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_follows_q(dtype):
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    module = SparseLinearAttention(32, config)
    with torch.no_grad():
        module.proj_l.weight.normal_()
    q, k, v = _qkv(1, 2, 40, 50, 32, dtype=dtype)
    out = module(q, k, v)
    assert out.dtype == dtype
    expected, _, _, _ = reference.sla_forward(
        q.float(), k.float(), v.float(), module.proj_l.weight, module.proj_l.bias, None, config
    )
    # same inputs, the only difference is the final rounding to `dtype`
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["to_bfloat16", "half", "bfloat16"])
def test_proj_l_stays_float32_when_the_module_is_cast(cast):
    module = SparseLinearAttention(32, SLAConfig(topk=0.5, block_q=16, block_k=16))
    with torch.no_grad():
        module.proj_l.weight.normal_()
    weight = module.proj_l.weight.detach().clone()
    if cast == "to_bfloat16":
        module.to(torch.bfloat16)
    else:
        getattr(module, cast)()
    assert module.proj_l.weight.dtype == torch.float32 and module.proj_l.bias.dtype == torch.float32
    assert torch.equal(module.proj_l.weight, weight)  # no round trip through the low precision
    assert isinstance(module.proj_l.weight, torch.nn.Parameter) and module.proj_l.weight.requires_grad

    q, k, v = _qkv(1, 1, 20, 40, 32, dtype=torch.bfloat16)
    q.requires_grad_()
    module(q, k, v).float().square().sum().backward()
    assert module.proj_l.weight.grad.dtype == torch.float32
    assert q.grad.dtype == torch.bfloat16


def test_double_makes_proj_l_float64():
    module = SparseLinearAttention(32).double()
    assert module.proj_l.weight.dtype == torch.float64
    module.float()
    assert module.proj_l.weight.dtype == torch.float32


def test_autocast_casts_inputs_to_the_autocast_dtype():
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    module = SparseLinearAttention(32, config)
    q, k, v = _qkv(1, 2, 30, 40, 32)
    # qk-norm under autocast leaves q, k in float32 next to a bfloat16 v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(q, k, v.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = module(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(out, expected)


def test_mixed_dtypes_promote_without_autocast():
    module = SparseLinearAttention(32, SLAConfig(topk=0.5, block_q=16, block_k=16))
    q, k, v = _qkv(1, 2, 30, 40, 32)
    out = module(q, k, v.bfloat16())
    assert out.dtype == torch.float32
    assert torch.equal(out, module(q, k, v.bfloat16().float()))


def test_gradients_match_the_reference():
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map="elu")
    module = SparseLinearAttention(32, config)
    with torch.no_grad():
        module.proj_l.weight.normal_()
        module.proj_l.bias.normal_()
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 37, 90, 32))
    params = [q, k, v, module.proj_l.weight, module.proj_l.bias]
    grads = torch.autograd.grad(module(q, k, v).square().sum(), params)
    expected_out, _, _, _ = reference.sla_forward(*params, None, config)
    expected = torch.autograd.grad(expected_out.square().sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert grads[3].abs().sum() > 0  # proj_l trains


def test_wrong_head_dim_names_the_module():
    module = SparseLinearAttention(64)
    q, k, v = _qkv(1, 1, 8, 8, 32)
    with pytest.raises(ValueError, match=r"SparseLinearAttention\(head_dim=64\)"):
        module(q, k, v)


def test_extra_repr_shows_the_config():
    text = repr(SparseLinearAttention(64, SLAConfig(topk=0.2, negligible=0.1, block_q=32, feature_map="relu")))
    for part in ("head_dim=64", "topk=0.2", "negligible=0.1", "block_q=32", "block_k=64", "feature_map='relu'"):
        assert part in text


def test_proj_l_stays_float32_inside_a_cast_parent():
    parent = torch.nn.ModuleDict({"attn": SparseLinearAttention(32), "proj": torch.nn.Linear(32, 32)})
    parent.to(torch.bfloat16)
    assert parent["proj"].weight.dtype == torch.bfloat16
    assert parent["attn"].proj_l.weight.dtype == torch.float32


@pytest.mark.parametrize("n_queries", [3 * 40, 3 * 40 + 1, 3 * 40 + 7, 5])
def test_dense_row_index_takes_the_first_rows_of_every_period(n_queries):
    from lite3r_compile.sla.op import dense_row_index

    expected = [i for i in range(n_queries) if i % 40 < 3]
    assert dense_row_index(n_queries, 40, 3).tolist() == expected


def test_dense_rows_are_exact_attention_and_the_other_rows_are_sla():
    period, count = 40, 3
    sparse = SLAConfig(topk=0.25, block_q=16, block_k=16, feature_map="elu")
    with_rows = SLAConfig(topk=0.25, block_q=16, block_k=16, feature_map="elu", dense_rows=(period, count))
    module = SparseLinearAttention(32, with_rows)
    with torch.no_grad():
        module.proj_l.weight.normal_()
        module.proj_l.bias.normal_()
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 3 * period, 3 * period, 32))
    out = module(q, k, v, scale=0.3)
    rows = torch.tensor([i for i in range(3 * period) if i % period < count])
    others = torch.tensor([i for i in range(3 * period) if i % period >= count])
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.3) + module.proj_l.bias
    torch.testing.assert_close(out[:, :, rows], exact[:, :, rows])
    plain, _, _, _ = reference.sla_forward(q, k, v, module.proj_l.weight, module.proj_l.bias, 0.3, sparse)
    torch.testing.assert_close(out[:, :, others], plain[:, :, others])
    # gradients flow through both parts to q, k, v and the projection
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, module.proj_l.weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert grads[0][:, :, rows].abs().sum() > 0


def test_dense_rows_are_validated_and_shown():
    for bad in ((0, 0), (8, 9), (8, 0), (8,)):
        with pytest.raises(ValueError, match="dense_rows"):
            SLAConfig(dense_rows=bad)
    assert SLAConfig(dense_rows=[1374, 5]).dense_rows == (1374, 5)  # from JSON, a list
    assert "dense_rows=(1374, 5)" in repr(SparseLinearAttention(64, SLAConfig(dense_rows=(1374, 5))))
