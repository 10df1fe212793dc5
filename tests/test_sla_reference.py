"""The PyTorch reference of Sparse Linear Attention against an independent, explicitly
block-masked dense computation of the specification (tests only build Nq x Nk tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lite3r_compile.sla import reference
from lite3r_compile.sla.config import FEATURE_MAPS, SLAConfig


def _spec_classes(q: torch.Tensor, k: torch.Tensor, config: SLAConfig) -> torch.Tensor:
    """Block classes by explicit loops over blocks and a Python sort."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    bq, bk = config.block_q, config.block_k
    n_q, n_k = math.ceil(q_len / bq), math.ceil(k_len / bk)
    centered = k - k.mean(dim=2, keepdim=True)
    classes = torch.empty(batch, heads, n_q, n_k, dtype=torch.int8)
    n_critical = config.num_critical(n_k)
    n_negligible = config.num_negligible(n_k)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                pooled_q = q[b, h, i * bq : (i + 1) * bq].mean(dim=0)
                scores = [float(pooled_q @ centered[b, h, j * bk : (j + 1) * bk].mean(dim=0)) for j in range(n_k)]
                ranked = sorted(range(n_k), key=lambda j: (-scores[j], j))
                for rank, j in enumerate(ranked):
                    if rank < n_critical:
                        classes[b, h, i, j] = 2
                    elif rank >= n_k - n_negligible:
                        classes[b, h, i, j] = 0
                    else:
                        classes[b, h, i, j] = 1
    return classes


def _token_mask(classes: torch.Tensor, value: int, q_len: int, k_len: int, config: SLAConfig) -> torch.Tensor:
    """(B, H, Mq, Mk) classes -> (B, H, Nq, Nk) bool: token pairs whose blocks have class `value`."""
    q_block = torch.arange(q_len) // config.block_q
    k_block = torch.arange(k_len) // config.block_k
    return (classes == value)[:, :, q_block][:, :, :, k_block]


def _phi(x: torch.Tensor, name: str) -> torch.Tensor:
    return {"softmax": lambda t: t.softmax(-1), "elu": lambda t: F.elu(t) + 1, "relu": F.relu}[name](x)


def spec_sla(q, k, v, weight, bias, scale, config, classes):
    """Dense N x N form of the spec: masked softmax over critical tokens, masked linear attention
    over marginal tokens, projection. Returns (o, o_l) in q's dtype."""
    q_len, k_len = q.shape[2], k.shape[2]
    critical = _token_mask(classes, 2, q_len, k_len, config)
    marginal = _token_mask(classes, 1, q_len, k_len, config)
    logits = (q @ k.transpose(-1, -2)) * scale
    o_s = logits.masked_fill(~critical, -math.inf).softmax(-1) @ v
    kernel = (_phi(q, config.feature_map) @ _phi(k, config.feature_map).transpose(-1, -2)) * marginal
    o_l = (kernel @ v) / (kernel.sum(-1, keepdim=True) + reference.LINEAR_DENOMINATOR_EPS)
    return o_s + o_l @ weight.T + bias, o_l


def _inputs(batch, heads, q_len, k_len, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, k_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, k_len, head_dim, generator=gen, dtype=dtype)
    weight = torch.randn(head_dim, head_dim, generator=gen, dtype=dtype) / head_dim**0.5
    bias = torch.randn(head_dim, generator=gen, dtype=dtype)
    return q, k, v, weight, bias


@given(
    q_len=st.integers(1, 70),
    k_len=st.integers(1, 90),
    head_dim=st.sampled_from([32, 64, 128]),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
    topk=st.sampled_from([0.1, 0.25, 0.5, 0.75]),
    negligible=st.sampled_from([0.0, 0.2, 0.25]),
    feature_map=st.sampled_from(FEATURE_MAPS),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_block_masked_spec(q_len, k_len, head_dim, block_q, block_k, topk, negligible, feature_map, seed):
    config = SLAConfig(topk=topk, negligible=negligible, block_q=block_q, block_k=block_k, feature_map=feature_map)
    q, k, v, weight, bias = _inputs(1, 2, q_len, k_len, head_dim, seed=seed)
    scale = 0.37

    classes = _spec_classes(q, k, config)
    o, o_l, lse, block_class = reference.sla_forward(q, k, v, weight, bias, scale, config)
    assert torch.equal(block_class, classes)

    expected_o, expected_o_l = spec_sla(q, k, v, weight, bias, scale, config, classes)
    torch.testing.assert_close(o_l, expected_o_l, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(o, expected_o, rtol=1e-9, atol=1e-9)
    critical = _token_mask(classes, 2, q_len, k_len, config)
    expected_lse = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~critical, -math.inf).logsumexp(-1)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_reference_float32_matches_spec(feature_map):
    config = SLAConfig(topk=0.3, negligible=0.2, block_q=16, block_k=16, feature_map=feature_map)
    q, k, v, weight, bias = _inputs(2, 2, 53, 75, 64, dtype=torch.float32, seed=1)
    classes = reference.classify_blocks(q, k, config)
    assert torch.equal(classes, _spec_classes(q.double(), k.double(), config))
    o, o_l, lse, _ = reference.sla_forward(q, k, v, weight, bias, None, config)
    assert o.dtype == torch.float32 and o_l.dtype == torch.float32 and lse.dtype == torch.float32
    expected, _ = spec_sla(*(t.double() for t in (q, k, v, weight, bias)), 64**-0.5, config, classes)
    torch.testing.assert_close(o, expected.float(), rtol=1e-5, atol=1e-5)


def test_class_counts_per_query_block():
    config = SLAConfig(topk=0.3, negligible=0.25, block_q=16, block_k=16)
    q, k, _, _, _ = _inputs(2, 3, 40, 160, 32, dtype=torch.float32)
    classes = reference.classify_blocks(q, k, config)
    assert classes.shape == (2, 3, 3, 10) and classes.dtype == torch.int8
    assert ((classes == 2).sum(-1) == 3).all()
    assert ((classes == 0).sum(-1) == 2).all()
    assert ((classes == 1).sum(-1) == 5).all()
    # critical blocks outscore marginal ones, which outscore negligible ones
    scores = reference.block_scores(q, k, config)
    lowest_critical = scores.masked_fill(classes != 2, math.inf).amin(-1)
    highest_marginal = scores.masked_fill(classes != 1, -math.inf).amax(-1)
    lowest_marginal = scores.masked_fill(classes != 1, math.inf).amin(-1)
    highest_negligible = scores.masked_fill(classes != 0, -math.inf).amax(-1)
    assert (lowest_critical >= highest_marginal).all()
    assert (lowest_marginal >= highest_negligible).all()


def test_block_scores_ignore_ragged_rows():
    config = SLAConfig(block_q=16, block_k=16)
    q, k, _, _, _ = _inputs(1, 1, 20, 20, 32)
    scores = reference.block_scores(q, k, config)
    centered = k - k.mean(dim=2, keepdim=True)
    expected = q[0, 0, 16:].mean(0) @ centered[0, 0, 16:].mean(0)
    torch.testing.assert_close(scores[0, 0, 1, 1], expected)


def test_ties_prefer_lower_key_block_index():
    # Identical keys: every centred key is zero, so all block scores tie.
    config = SLAConfig(topk=0.25, negligible=0.25, block_q=16, block_k=16)
    q = torch.randn(1, 1, 16, 32)
    k = torch.ones(1, 1, 128, 32)
    classes = reference.classify_blocks(q, k, config)
    assert classes[0, 0, 0].tolist() == [2, 2, 1, 1, 1, 1, 0, 0]


def test_topk_one_is_dense_attention_with_zero_linear_branch():
    config = SLAConfig(topk=1.0, block_q=16, block_k=16)
    q, k, v, weight, bias = _inputs(1, 2, 33, 47, 32, dtype=torch.float32)
    o, o_l, lse, classes = reference.sla_forward(q, k, v, weight, torch.zeros_like(bias), None, config)
    assert (classes == 2).all()
    assert torch.equal(o_l, torch.zeros_like(o_l))
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (o - dense).norm() / dense.norm() < 1e-5
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) * 32**-0.5).logsumexp(-1))


@pytest.mark.parametrize(
    "q_len, k_len, block_k",
    [(5, 7, 16), (40, 16, 16), (3, 64, 64), (20, 1, 16)],
    ids=["shorter-than-a-block", "single-key-block", "single-full-block", "one-key"],
)
def test_small_cases_are_finite_and_correct(q_len, k_len, block_k):
    config = SLAConfig(topk=0.5, negligible=0.0, block_q=16, block_k=block_k, feature_map="relu")
    q, k, v, weight, bias = _inputs(1, 2, q_len, k_len, 32)
    o, o_l, _, classes = reference.sla_forward(q, k, v, weight, bias, None, config)
    # one key block: it is critical, the marginal set is empty
    assert (classes == 2).all()
    assert torch.equal(o_l, torch.zeros_like(o_l))
    expected = F.scaled_dot_product_attention(q, k, v) + bias
    torch.testing.assert_close(o, expected)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_empty_marginal_set_has_finite_gradients(feature_map):
    config = SLAConfig(topk=1.0, block_q=16, block_k=16, feature_map=feature_map)
    inputs = [t.requires_grad_() for t in _inputs(1, 1, 20, 40, 32)]
    o, o_l, _, _ = reference.sla_forward(*inputs, None, config)
    (o.sum() + o_l.sum()).backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()
    assert torch.equal(inputs[3].grad, torch.zeros_like(inputs[3].grad))  # o_l = 0: no weight grad


def test_relu_with_all_negative_queries_is_finite():
    # phi(q) = 0 makes the relu denominator exactly zero; the epsilon keeps o_l at 0.
    config = SLAConfig(topk=0.25, block_q=16, block_k=16, feature_map="relu")
    q, k, v, weight, bias = _inputs(1, 1, 16, 64, 32)
    q = -q.abs()
    q.requires_grad_()
    o, o_l, _, _ = reference.sla_forward(q, k, v, weight, bias, None, config)
    assert torch.equal(o_l, torch.zeros_like(o_l))
    o.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_gradcheck_float64(feature_map):
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map=feature_map)
    q, k, v, weight, bias = _inputs(1, 1, 21, 70, 8, seed=3)
    classes = reference.classify_blocks(q, k, config)
    assert (classes == 1).any() and (classes == 0).any()
    inputs = tuple(t.requires_grad_() for t in (q, k, v, weight, bias))

    def sla(*tensors):
        return reference.sla_with_block_class(*tensors, classes, 0.5, config)[0]

    assert torch.autograd.gradcheck(sla, inputs, fast_mode=True)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("topk", [1.0, 0.1])
def test_no_nq_by_nk_tensor(topk):
    config = SLAConfig(topk=topk, block_q=64, block_k=64)
    q_len = k_len = 2048
    q, k, v, weight, bias = _inputs(1, 1, q_len, k_len, 32, dtype=torch.float32)
    with _LargestOutput() as mode:
        reference.sla_forward(q, k, v, weight, bias, None, config)
    assert mode.numel <= q_len * k_len // 4


@given(
    q_len=st.integers(1, 50),
    k_len=st.integers(1, 80),
    topk=st.sampled_from([0.2, 0.5, 1.0]),
    negligible=st.sampled_from([0.0, 0.3]),
    feature_map=st.sampled_from(FEATURE_MAPS),
    seed=st.integers(0, 2**16),
)
def test_written_out_backward_matches_autograd(q_len, k_len, topk, negligible, feature_map, seed):
    negligible = min(negligible, 1.0 - topk)
    config = SLAConfig(topk=topk, negligible=negligible, block_q=16, block_k=16, feature_map=feature_map)
    inputs = [t.requires_grad_() for t in _inputs(1, 2, q_len, k_len, 32, seed=seed)]
    classes = reference.classify_blocks(inputs[0], inputs[1], config)
    o, _, _ = reference.sla_with_block_class(*inputs, classes, 0.3, config)
    grad_o = torch.randn_like(o)
    expected = torch.autograd.grad(o, inputs, grad_o)
    got = reference.sla_backward(grad_o, *inputs[:4], classes, 0.3, config)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_autocast_does_not_lower_the_reference():
    config = SLAConfig(topk=0.5, block_q=16, block_k=16, feature_map="elu")
    q, k, v, weight, bias = _inputs(1, 2, 30, 50, 32, dtype=torch.float32)
    expected = reference.sla_forward(q, k, v, weight, bias, None, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.sla_forward(q, k, v, weight, bias, None, config)
        o_l = reference.linear_branch(q, k, v, expected[3], config)
        o_s, _ = reference.sparse_branch(q, k, v, expected[3], None, config)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert o_l.dtype == torch.float32 and o_s.dtype == torch.float32
    assert torch.equal(o_l, expected[1])
