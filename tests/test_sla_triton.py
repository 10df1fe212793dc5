"""The Triton SLA kernels (lite3r_compile.sla.triton_sla) against the PyTorch reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 on tiny shapes (forward and backward,
fp32 and fp16, ragged lengths, Nq != Nk, D in 32/64/128, every feature map); with one, the
``gpu`` tests run bf16/fp16 at moderate sizes and through the ``lite3r::sla_forward`` op.
Gradients are compared with autograd of the reference in float64 on the same (rounded) inputs
and the same block classes.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    # Triton decides at decoration time whether a kernel is interpreted, so the variable must
    # be set before the kernel modules are imported; if another test imported them first, they
    # are imported again (in dependency order) under the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("lite3r_compile.sla.triton_linear", "lite3r_compile.sla.triton_blockmap",
                  "lite3r_compile.sla.triton_attention", "lite3r_compile.sla.triton_sla"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from lite3r_compile.sla import reference, triton_sla  # noqa: E402
from lite3r_compile.sla.config import SLAConfig  # noqa: E402
from lite3r_compile.sla.triton_blockmap import (  # noqa: E402
    CRITICAL,
    MARGINAL,
    block_scores,
    block_tables,
    build_block_map,
)
from lite3r_compile.sla.triton_linear import block_statistics, marginal_sum  # noqa: E402

interpreter = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run where there is no GPU")
DEVICE = "cuda" if _HAS_CUDA else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(shape_q, shape_k, dtype, seed, device=DEVICE, layout_bnhd=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=gen)
    k = torch.randn(*shape_k, generator=gen)
    v = torch.randn(*shape_k, generator=gen)
    D = shape_q[-1]
    w = torch.randn(D, D, generator=gen) * D**-0.5
    b = torch.randn(D, generator=gen) * 0.1
    grad = torch.randn(*shape_q, generator=gen)
    q, k, v, grad = (t.to(device=device, dtype=dtype) for t in (q, k, v, grad))
    if layout_bnhd:
        # (B, N, H, D) storage seen as (B, H, N, D): non-contiguous inputs, as models pass them.
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v, w.to(device), b.to(device), grad


def _check(q, k, v, w, b, grad, scale, config, tol_out, tol_grad):
    o, o_l, lse, block_class = triton_sla.forward(q, k, v, w, b, scale, config, True)
    assert torch.equal(block_class.cpu(), reference.classify_blocks(q, k, config).cpu())
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, w, b)]
    o_ref, o_l_ref, lse_ref = reference.sla_with_block_class(*ref_in, block_class, scale, config)
    o_ref.backward(grad.double())
    assert o.dtype == q.dtype and o_l.dtype == torch.float32 and lse.dtype == torch.float32
    assert _rel(o, o_ref) < tol_out
    assert _rel(o_l, o_l_ref) < tol_out
    assert _rel(lse, lse_ref) < 1e-5
    grads = triton_sla.backward(grad, q, k, v, o, o_l, lse, block_class, w, scale, config)
    for name, got, ref in zip(("dq", "dk", "dv", "dw", "db"), grads,
                              [t.grad for t in ref_in]):
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < tol_grad, (name, _rel(got, ref))
    assert [g.dtype for g in grads[:3]] == [q.dtype] * 3


@interpreter
@pytest.mark.parametrize(
    "dtype, shape_q, shape_k, blocks, topk, negligible, feature_map, tol",
    [
        # ragged on both sides, cross-attention, negligible blocks
        (torch.float32, (1, 2, 50, 32), (1, 2, 70, 32), (16, 16), 0.3, 0.2, "softmax", 1e-5),
        (torch.float32, (1, 1, 48, 64), (1, 1, 48, 64), (16, 32), 0.5, 0.0, "relu", 1e-5),
        (torch.float32, (1, 1, 20, 128), (1, 1, 36, 128), (16, 16), 0.34, 0.33, "elu", 1e-5),
        (torch.float16, (2, 1, 40, 32), (2, 1, 33, 32), (16, 16), 0.25, 0.25, "elu", 1e-2),
        (torch.float16, (1, 2, 64, 64), (1, 2, 40, 64), (16, 16), 0.34, 0.0, "softmax", 1e-2),
        # the default 128 x 64 blocks, ragged on both sides
        (torch.float32, (1, 1, 200, 32), (1, 1, 150, 32), (128, 64), 0.5, 0.0, "softmax", 1e-5),
        (torch.float16, (1, 1, 130, 64), (1, 1, 260, 64), (128, 64), 0.4, 0.2, "relu", 1e-2),
        # a single key block, shorter than one block; both sides shorter than one block
        (torch.float32, (1, 2, 40, 16), (1, 2, 11, 16), (16, 16), 0.1, 0.0, "elu", 1e-5),
        (torch.float16, (2, 1, 5, 32), (2, 1, 7, 32), (16, 32), 0.2, 0.0, "softmax", 1e-2),
        # every block critical: no linear branch, dense attention plus the projection's bias
        (torch.float16, (1, 1, 45, 128), (1, 1, 50, 128), (16, 16), 1.0, 0.0, "softmax", 1e-2),
    ],
)
def test_interpreted_forward_backward_match_reference(dtype, shape_q, shape_k, blocks, topk,
                                                      negligible, feature_map, tol):
    q, k, v, w, b, grad = _inputs(shape_q, shape_k, dtype, seed=sum(shape_q) + sum(shape_k))
    config = SLAConfig(topk=topk, negligible=negligible, block_q=blocks[0], block_k=blocks[1],
                       feature_map=feature_map)
    _check(q, k, v, w, b, grad, 0.7 * shape_q[-1] ** -0.5, config, tol, tol * 3)


@interpreter
def test_interpreted_non_contiguous_inputs():
    q, k, v, w, b, grad = _inputs((1, 2, 40, 32), (1, 2, 40, 32), torch.float32, seed=3,
                                  layout_bnhd=True)
    assert not q.is_contiguous()
    _check(q, k, v, w, b, grad, 32**-0.5, SLAConfig(topk=0.5, block_q=16, block_k=16), 1e-5, 3e-5)


@interpreter
def test_interpreted_topk_one_is_dense_attention():
    q, k, v, _, _, _ = _inputs((1, 2, 37, 32), (1, 2, 45, 32), torch.float32, seed=4)
    zero_w, zero_b = torch.zeros(32, 32), torch.zeros(32)
    config = SLAConfig(topk=1.0, block_q=16, block_k=16)
    o, _, _, block_class = triton_sla.forward(q, k, v, zero_w, zero_b, 0.2, config, False)
    assert (block_class == CRITICAL).all()
    dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.2, dim=-1) @ v.double()
    assert _rel(o, dense) < 1e-6


@interpreter
def test_interpreted_empty_marginal_set_gives_zero_linear_branch():
    q, k, v, w, b, _ = _inputs((1, 1, 32, 32), (1, 1, 64, 32), torch.float32, seed=5)
    config = SLAConfig(topk=0.5, negligible=0.5, block_q=16, block_k=16)
    o, o_l, _, block_class = triton_sla.forward(q, k, v, w, b, 0.2, config, True)
    assert not (block_class == 1).any()
    assert torch.equal(o_l, torch.zeros_like(o_l))


@interpreter
@pytest.mark.parametrize("early_exit", [True, False])
@pytest.mark.parametrize("case", ["zero_q", "negative_q", "repeated_k", "random"])
def test_interpreted_block_map_ties_and_lookup_tables(case, early_exit):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 40, 16, generator=gen)
    k = torch.randn(1, 2, 100, 16, generator=gen)
    if case == "zero_q":
        q = torch.zeros_like(q)  # every score is +-0: ties everywhere
    elif case == "negative_q":
        q = -torch.ones_like(q)
    elif case == "repeated_k":
        k = k[:, :, :16].repeat(1, 1, 7, 1)[:, :, :100]  # equal key blocks, equal scores
    config = SLAConfig(topk=0.3, negligible=0.3, block_q=16, block_k=16)
    expected = reference.classify_blocks(q, k, config)
    _, k_sums, q_means = block_statistics(q, k, k, config, torch.float32)
    block_map = build_block_map(q_means, k_sums, k.shape[2], config, torch.float32,
                                early_exit=early_exit)
    assert torch.equal(block_map.block_class, expected)
    assert torch.equal(block_map.marginal, (expected == MARGINAL).float())
    n_critical = config.num_critical(expected.shape[3])
    assert torch.equal(block_map.critical_count, torch.full((1, 2, 3), n_critical, dtype=torch.int32))
    critical = expected == CRITICAL
    by_query, by_key = block_tables(expected, torch.float32, torch.float32)
    assert torch.equal(by_query.marginal, (expected == MARGINAL).float())
    assert torch.equal(by_key.marginal, (expected == MARGINAL).float().transpose(-1, -2))
    for h in range(2):
        for i in range(expected.shape[2]):
            want = torch.nonzero(critical[0, h, i]).flatten().tolist()
            assert block_map.critical_lut[0, h, i].tolist() == want
            assert by_query.critical_lut[0, h, i, : by_query.critical_count[0, h, i]].tolist() == want
        for j in range(expected.shape[3]):
            want = torch.nonzero(critical[0, h, :, j]).flatten().tolist()
            assert by_key.critical_lut[0, h, j, : by_key.critical_count[0, h, j]].tolist() == want


@interpreter
@pytest.mark.parametrize("topk, negligible", [(0.1, 0.2), (1.0, 0.0), (0.003, 0.997)])
def test_interpreted_early_exit_classifies_long_rows_like_the_reference(topk, negligible):
    # 313 key blocks (a 512-wide row): the search stops early on distinct scores, and runs to
    # the end (or not at all) when every block, or a single one, is critical
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 256, 16, generator=gen)
    k = torch.randn(1, 2, 5000, 16, generator=gen)
    config = SLAConfig(topk=topk, negligible=negligible, block_q=64, block_k=16)
    _, k_sums, q_means = block_statistics(q, k, k, config, torch.float32)
    block_map = build_block_map(q_means, k_sums, k.shape[2], config, torch.float32)
    assert torch.equal(block_map.block_class, reference.classify_blocks(q, k, config))


@interpreter
@pytest.mark.parametrize("n_q, n_k, blocks, d", [(70, 45, (16, 16), 32), (16, 100, (16, 32), 16),
                                                 (9, 5, (16, 16), 64), (130, 33, (32, 16), 128)])
def test_interpreted_block_statistics_and_scores_match_reference(n_q, n_k, blocks, d):
    # The one pass over the blocks (states, k sums, q means) and the score kernel, piece by
    # piece against the reference's definitions: ragged blocks, one key block, N below a block.
    gen = torch.Generator().manual_seed(n_q + n_k)
    q, k, v = (torch.randn(2, 1, n, d, generator=gen) for n in (n_q, n_k, n_k))
    config = SLAConfig(topk=0.5, block_q=blocks[0], block_k=blocks[1], feature_map="elu")
    states, k_sums, q_means = block_statistics(q, k, v, config, torch.float32)
    k_blocks = reference._to_blocks(k, config.block_k)
    torch.testing.assert_close(k_sums, k_blocks.sum(dim=3))
    torch.testing.assert_close(q_means, reference._block_means(q, config.block_q))
    phi_k = reference._to_blocks(reference.feature_map(k, "elu"), config.block_k)
    v_blocks = reference._to_blocks(v, config.block_k)
    want_states = torch.cat([(phi_k.transpose(-1, -2) @ v_blocks).flatten(3), phi_k.sum(dim=3)], -1)
    torch.testing.assert_close(states, want_states)
    assert block_statistics(None, k, v, config, torch.float32)[2] is None
    torch.testing.assert_close(block_scores(q_means, k_sums, n_k, config),
                               reference.block_scores(q, k, config), rtol=1e-5, atol=1e-5)


@interpreter
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_interpreted_marginal_sum_rounds_once(out_dtype):
    # H_i = sum over marginal j of h_j: float32 accumulation, one rounding to out_dtype.
    gen = torch.Generator().manual_seed(8)
    block_class = torch.randint(0, 3, (1, 2, 20, 37), generator=gen, dtype=torch.int8)
    states = torch.randn(1, 2, 37, 40, generator=gen)
    by_query, by_key = block_tables(block_class, torch.float32, torch.float32)
    got = marginal_sum(by_query.marginal, states, dot=0, out_dtype=out_dtype)
    want = (block_class == MARGINAL).double() @ states.double()
    assert got.dtype == out_dtype
    # float32 sums: float32 rounding; bfloat16: one bfloat16 ulp of the exact sum (a GPU rounds
    # to nearest, Triton 3.6's interpreter truncates).
    rtol = 1e-5 if out_dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5)
    back = marginal_sum(by_key.marginal, torch.randn(1, 2, 20, 40, generator=gen), dot=0)
    assert back.shape == (1, 2, 37, 40)


@interpreter
def test_interpreted_indicator_padding_is_written_with_zeros(monkeypatch):
    # The product reads each indicator row up to its padded stride: the block-map kernels must
    # zero the padding, whatever the memory held (NaN here).
    from lite3r_compile.sla import triton_blockmap, triton_linear

    def nan_filled(B, H, R, C, dtype, device):
        view = triton_linear.empty_indicator(B, H, R, C, dtype, device)
        view.as_strided((B, H, R, view.stride(2)), view.stride()).fill_(float("nan"))
        return view

    monkeypatch.setattr(triton_blockmap, "empty_indicator", nan_filled)
    q, k, v, *_ = _inputs((1, 2, 40, 32), (1, 2, 75, 32), torch.float32, seed=6)
    config = SLAConfig(topk=0.3, block_q=16, block_k=16)
    key_states, k_sums, q_means = block_statistics(q, k, v, config, torch.float32)
    block_map = build_block_map(q_means, k_sums, 75, config, torch.float32)
    by_query, by_key = block_tables(block_map.block_class, torch.float32, torch.float32)
    for indicator in (block_map.marginal, by_query.marginal, by_key.marginal):
        B, H, R, C = indicator.shape
        padded = indicator.as_strided((B, H, R, indicator.stride(2)), indicator.stride())
        assert indicator.stride(2) % 16 == 0 and indicator.stride(2) > C
        assert torch.equal(padded[..., C:], torch.zeros_like(padded[..., C:]))
    got = marginal_sum(block_map.marginal, key_states, dot=0)
    want = (block_map.block_class == MARGINAL).double() @ key_states.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _forward_both_loads(q, k, v, w, b, scale, config):
    """The fused kernel's (o, o_l, lse) with key blocks loaded through pointers and through TMA
    descriptors, on the same block map and states."""
    key_states, k_sums, q_means = block_statistics(q, k, v, config, torch.bfloat16)
    block_map = build_block_map(q_means, k_sums, k.shape[2], config, torch.bfloat16)
    states = marginal_sum(block_map.marginal, key_states, dot=triton_sla.DOT_BF16,
                          out_dtype=torch.bfloat16)
    return [triton_sla.attention_forward(q, k, v, block_map, states, w, b, scale, config, True,
                                         tma=tma) for tma in (False, True)]


@interpreter
@pytest.mark.parametrize("shape_q, shape_k, blocks, layout_bnhd", [
    ((1, 2, 130, 64), (1, 2, 150, 64), (128, 64), True),   # ragged keys, (B, N, H, D) storage
    ((2, 1, 40, 32), (2, 1, 64, 32), (16, 32), False),     # even keys, batch > 1
])
def test_interpreted_tma_loads_equal_pointer_loads(shape_q, shape_k, blocks, layout_bnhd):
    q, k, v, w, b, _ = _inputs(shape_q, shape_k, torch.float16, seed=11, layout_bnhd=layout_bnhd)
    config = SLAConfig(topk=0.5, block_q=blocks[0], block_k=blocks[1])
    assert triton_sla.tma_supported(k, v, require_gpu=False)
    pointer, tma = _forward_both_loads(q, k, v, w, b, 0.125, config)
    for got, want in zip(tma, pointer):
        assert torch.equal(got, want)


def test_tma_is_refused_where_descriptors_cannot_describe_the_inputs():
    x = torch.randn(1, 1, 8, 32)
    assert not triton_sla.tma_supported(x, x, require_gpu=False)  # float32
    odd = torch.randn(1, 1, 8, 36, dtype=torch.float16)[..., :32]  # 72-byte rows
    assert not triton_sla.tma_supported(odd, odd, require_gpu=False)
    shared = torch.randn(1, 1, 8, 32, dtype=torch.float16).expand(1, 4, 8, 32)  # stride 0 heads
    assert not triton_sla.tma_supported(shared, shared, require_gpu=False)
    assert triton_sla.tma_supported(shared.contiguous(), shared.contiguous(), require_gpu=False)
    assert not triton_sla.tma_supported(x.half(), x.half())  # no GPU tensor
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    key_states, k_sums, q_means = block_statistics(x, x, x, config, torch.float32)
    block_map = build_block_map(q_means, k_sums, 8, config, torch.float32)
    states = marginal_sum(block_map.marginal, key_states, dot=0)
    with pytest.raises(ValueError, match="tma=True needs"):
        triton_sla.attention_forward(x, x, x, block_map, states, torch.zeros(32, 32),
                                     torch.zeros(32), 0.1, config, False, tma=True)


def test_rejects_unsupported_inputs():
    q = torch.randn(1, 1, 8, 48)
    w, b = torch.zeros(48, 48), torch.zeros(48)
    with pytest.raises(ValueError, match="head dim 48"):
        triton_sla.forward(q, q, q, w, b, 0.1, SLAConfig(), False)
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_sla.forward(q, q.half(), q, w[:32, :32], b[:32], 0.1, SLAConfig(), False)
    empty = torch.empty(0)
    with pytest.raises(ValueError, match="save_for_backward=True"):
        triton_sla.backward(q, q, q, q, q, empty, empty, torch.zeros(1, 1, 1, 1, dtype=torch.int8),
                            w[:32, :32], 0.1, SLAConfig())


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, n_q, n_k, d, blocks, feature_map",
    [
        (torch.bfloat16, 3001, 3001, 64, (64, 64), "softmax"),
        (torch.bfloat16, 2048, 4100, 64, (128, 64), "elu"),
        (torch.float16, 1000, 2000, 128, (64, 64), "relu"),
        (torch.float16, 1500, 700, 32, (128, 128), "softmax"),
    ],
)
def test_gpu_matches_reference(dtype, n_q, n_k, d, blocks, feature_map):
    q, k, v, w, b, grad = _inputs((2, 4, n_q, d), (2, 4, n_k, d), dtype, seed=n_q + d)
    config = SLAConfig(topk=0.15, negligible=0.1, block_q=blocks[0], block_k=blocks[1],
                       feature_map=feature_map)
    o, o_l, lse, block_class = triton_sla.forward(q, k, v, w, b, d**-0.5, config, True)
    # Block classes come from float32 scores computed in another order than the reference's:
    # near-ties may differ, the branches are compared on our classes.
    match = (block_class == reference.classify_blocks(q, k, config)).float().mean()
    assert match > 0.999
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, w, b)]
    o_ref, _, lse_ref = reference.sla_with_block_class(*ref_in, block_class, d**-0.5, config)
    o_ref.backward(grad.float())
    with torch.no_grad():
        o_s, _ = reference.sparse_branch(*ref_in[:3], block_class, d**-0.5, config)
        o_l_ref = reference.linear_branch(*ref_in[:3], block_class, config)
        o_ref32 = o_s + o_l_ref @ ref_in[3].T + ref_in[4]
    assert _rel(o, o_ref32) < 1e-2
    assert _rel(o_l, o_l_ref) < 1e-2
    assert _rel(lse, lse_ref) < 1e-5
    grads = triton_sla.backward(grad, q, k, v, o, o_l, lse, block_class, w, d**-0.5, config)
    for got, ref in zip(grads, [t.grad for t in ref_in]):
        assert _rel(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n_q, n_k, d", [(3001, 2900, 64), (1374, 1374 * 4, 128)])
def test_gpu_tma_loads_match_pointer_loads(n_q, n_k, d):
    q, k, v, w, b, _ = _inputs((1, 4, n_q, d), (1, 4, n_k, d), torch.bfloat16, seed=n_k,
                               layout_bnhd=True)
    config = SLAConfig(topk=0.1, block_q=128, block_k=64)
    assert triton_sla.tma_supported(k, v)
    pointer, tma = _forward_both_loads(q, k, v, w, b, d**-0.5, config)
    for got, want in zip(tma, pointer):
        assert _rel(got, want) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("n_k", [8192, 43968])  # 128 and 687 key blocks
def test_gpu_early_exit_classifies_like_the_full_search(n_k):
    q, k, v, _, _, _ = _inputs((1, 2, 8192, 64), (1, 2, n_k, 64), torch.bfloat16, seed=n_k)
    config = SLAConfig(topk=0.1, negligible=0.1, block_q=128, block_k=64)
    _, k_sums, q_means = block_statistics(q, k, v, config, torch.bfloat16)
    early, full = (build_block_map(q_means, k_sums, n_k, config, torch.bfloat16, early_exit=e)
                   for e in (True, False))
    assert torch.equal(early.block_class, full.block_class)
    assert torch.equal(early.critical_lut, full.critical_lut)


@pytest.mark.gpu
def test_gpu_op_autograd_matches_cpu_reference():
    from lite3r_compile.sla.op import sla_attention

    q, k, v, w, b, grad = _inputs((1, 2, 700, 64), (1, 2, 700, 64), torch.float32, seed=9,
                                  device="cpu")
    config = SLAConfig(topk=0.2, block_q=64, block_k=64)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v, w, b)]
        out = sla_attention(*leaves, scale=None, config=config)
        out.backward(grad.to(device))
        results.append([out.detach().cpu()] + [t.grad.cpu() for t in leaves])
    for got, ref in zip(results[1], results[0]):
        assert _rel(got, ref) < 1e-4


def _kernel_functions(module):
    for value in vars(module).values():
        fn = value
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction / InterpretedFunction -> function
            fn = fn.fn
        if fn is not value and callable(fn) and hasattr(fn, "__code__"):
            yield value, fn


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


@pytest.mark.parametrize("module_name", ["triton_linear", "triton_blockmap", "triton_attention"])
def test_kernels_read_only_constexpr_globals(module_name):
    # A compiled @triton.jit function may read a module global only if it is a tl.constexpr (a
    # plain int is a NameError at compile time), but the interpreter the CPU tests use reads any:
    # without this check such a kernel passes CI and fails on the first GPU run.
    import triton.language as tl

    module = importlib.import_module(f"lite3r_compile.sla.{module_name}")
    kernels = list(_kernel_functions(module))
    assert kernels, f"no Triton kernel found in {module_name}"
    for _, fn in kernels:
        for name in _global_names(fn.__code__):
            value = fn.__globals__.get(name)
            if isinstance(value, (bool, int, float)) and not isinstance(value, tl.constexpr):
                pytest.fail(f"{module_name}.{fn.__name__} reads the global {name} = {value!r}, "
                            f"which is not a tl.constexpr")


def test_float32_launches_autotune_one_config_with_the_fewest_stages():
    import triton

    from lite3r_compile.sla.triton_linear import DOT_BF16, DOT_F32, DOT_TF32, float32_prune

    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (8, 2), (4, 4))]
    assert float32_prune(configs, {}, DOT=DOT_F32) == [configs[1]]
    assert float32_prune(configs, {}, DOT=DOT_BF16, D=64) == configs
    assert float32_prune(configs, {}, DOT=DOT_TF32) == configs
