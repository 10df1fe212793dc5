"""The SLA block map on the GPU: pooled block scores, top-k, the block classes and the lookup
tables the attention kernels iterate over.

For q (B, H, Nq, D) and k (B, H, Nk, D), with Mq = ceil(Nq / block_q) and Mk = ceil(Nk / block_k):

    pooled_q[i] = mean of q over the real rows of query block i                (B, H, Mq, D)
    pooled_k[j] = mean of (k - mean over all keys of k) over key block j       (B, H, Mk, D)
                = k_sum[j] / rows(j) - (sum over j' of k_sum[j']) / Nk
    scores      = pooled_q @ pooled_k^T                                        (B, H, Mq, Mk)

Per query block, the ``config.num_critical(Mk)`` highest-scoring key blocks are critical (class 2),
the ``config.num_negligible(Mk)`` lowest-scoring are negligible (class 0), the rest marginal (1);
ties go to the lower key-block index, as in ``lite3r_compile.sla.reference``.

The q means and k sums come from the pass that builds the linear-branch states
(``triton_linear.block_statistics``); from them the forward's block map is two launches: a tiled
score kernel and a per-row classification kernel that writes every table the forward needs. The
backward, given ``block_class``, rebuilds its tables (rows and columns) in one launch. No host
synchronisation, no N x N tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.triton_linear import empty_indicator

CRITICAL, MARGINAL, NEGLIGIBLE = 2, 1, 0
# The same classes for the kernels: a compiled @triton.jit function reads only constexpr globals
# (the interpreter reads any, so only a GPU run catches a plain int here).
CRITICAL_C: tl.constexpr = tl.constexpr(CRITICAL)
MARGINAL_C: tl.constexpr = tl.constexpr(MARGINAL)
NEGLIGIBLE_C: tl.constexpr = tl.constexpr(NEGLIGIBLE)


@triton.jit
def _sla_block_scores_kernel(
    QMEAN, KSUM, KTOTAL, SCORES,
    Nk, Mq, Mk, block_k,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
):
    # SCORES[bh, rows, cols] = pooled_q[rows] @ pooled_k[cols]^T for one (BLOCK_R, BLOCK_C) tile.
    # The sum of k over all keys comes per (batch, head) in KTOTAL: re-deriving it in every
    # program from the (Mk, D) key-block sums made each one read all of them, so the kernel's
    # reads grew as Mk^2.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D)
    k_sums = KSUM + pid_bh * Mk * D
    k_mean = tl.load(KTOTAL + pid_bh * D + offs_d) / Nk

    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < Mk
    # rows(j) = block_k except for a ragged last key block; invalid columns divide by 1.
    rows_in_block = tl.where(col_ok, tl.minimum(Nk - cols * block_k, block_k), 1).to(tl.float32)
    k_block_sum = tl.load(k_sums + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None],
                          other=0.0)
    pooled_k = tl.where(col_ok[:, None], k_block_sum / rows_in_block[:, None] - k_mean[None, :],
                        0.0)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < Mq
    pooled_q = tl.load(QMEAN + (pid_bh * Mq + rows[:, None]) * D + offs_d[None, :],
                       mask=row_ok[:, None], other=0.0)
    # Three tf32 products (hi*hi + hi*lo + lo*hi) on the tensor cores: float32 accuracy, where
    # the exact "ieee" form runs on the CUDA cores and took 0.094 ms at N = 43,968 on an H200.
    scores = tl.dot(pooled_q, tl.trans(pooled_k), input_precision="tf32x3")
    tl.store(SCORES + (pid_bh * Mq + rows[:, None]) * Mk + cols[None, :], scores,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _kth_largest(key, valid, k, EARLY_EXIT: tl.constexpr):
    """The k-th largest of the uint32 keys where valid (1 <= k <= their count): the largest t
    with #{key >= t} >= k, found bit by bit from the top, one count (a reduction over the row)
    a bit.

    With ``EARLY_EXIT`` the search stops as soon as exactly k keys are >= t: the k-th largest
    is then the least of them, one more reduction. It stops once t falls in the gap between the
    k-th and (k+1)-th largest keys, about 32 - log2(gap) bits, where the full search always
    makes 32 (classification is bound by these reductions: benchmarks/NOTES.md, sessions 15
    and 16). Keys tied at the k-th keep ``#{key >= t} > k`` to the last bit, where t is exact."""
    t = tl.full((), 0, tl.uint32)
    if EARLY_EXIT:
        n_at_least = tl.sum(valid.to(tl.int32))  # #{key >= t}, >= k throughout
        bit = 31
        while (bit >= 0) & (n_at_least != k):
            candidate = t | (tl.full((), 1, tl.uint32) << bit.to(tl.uint32))
            count = tl.sum((valid & (key >= candidate)).to(tl.int32))
            t = tl.where(count >= k, candidate, t)
            n_at_least = tl.where(count >= k, count, n_at_least)
            bit -= 1
        t = tl.min(tl.where(valid & (key >= t), key, tl.full((), 0xFFFFFFFF, tl.uint32)))
    else:
        for bit in tl.static_range(31, -1, -1):
            candidate = t | tl.full((), 1 << bit, tl.uint32)
            count = tl.sum((valid & (key >= candidate)).to(tl.int32))
            t = tl.where(count >= k, candidate, t)
    return t


@triton.jit
def _store_tables(c, idx, valid, LUT_LINE, COUNT_AT, IND_LINE, ind_width):
    # From the classes c of one row (or column) of block_class, whose block indices are idx (real
    # where valid): the critical indices in ascending order at LUT_LINE, their count at COUNT_AT
    # and the marginal indicator at IND_LINE, zeros in its padding up to ind_width (through
    # float32: Triton 3.6's interpreter casts integers to bfloat16 as raw bit patterns).
    critical = valid & (c == CRITICAL_C)
    slot = tl.cumsum(critical.to(tl.int32), 0) - 1
    tl.store(LUT_LINE + slot, idx, mask=critical)
    tl.store(COUNT_AT, tl.sum(critical.to(tl.int32)))
    marginal = (valid & (c == MARGINAL_C)).to(tl.float32).to(IND_LINE.dtype.element_ty)
    tl.store(IND_LINE + idx, marginal, mask=idx < ind_width)


@triton.jit
def _sla_classify_kernel(
    SCORES, CLS, LUT, COUNT, IND, stride_ind_row, Mk, n_critical, n_negligible,
    BLOCK: tl.constexpr, EARLY_EXIT: tl.constexpr = True,
):
    # One program per (batch, head, query block) row of scores, reproducing the reference's
    # stable descending sort without sorting: the n_critical-th largest score is the critical
    # threshold and, among scores equal to it, the lowest key-block indices are critical; the
    # negligible ones mirror it from the bottom, ties going to the highest indices.
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = idx < Mk
    # + 0.0 turns -0.0 into +0.0 (equal scores must get equal keys); then the float bits map to
    # unsigned keys in the same order: flip all bits of negatives, the sign bit of the rest.
    s = tl.load(SCORES + row * Mk + idx, mask=valid, other=0.0) + 0.0
    bits = s.to(tl.uint32, bitcast=True)
    key = tl.where(s < 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)

    top = _kth_largest(key, valid, n_critical, EARLY_EXIT)
    above = valid & (key > top)
    tied = (valid & (key == top)).to(tl.int32)
    room = n_critical - tl.sum(above.to(tl.int32))
    critical = above | ((tied != 0) & (tl.cumsum(tied, 0) <= room))

    negligible = idx < 0
    if n_negligible > 0:
        low_key = key ^ 0xFFFFFFFF
        bottom = _kth_largest(low_key, valid, n_negligible, EARLY_EXIT)
        below = valid & (low_key > bottom)
        tied_low = (valid & (low_key == bottom)).to(tl.int32)
        room_low = n_negligible - tl.sum(below.to(tl.int32))
        from_end = tl.sum(tied_low) - tl.cumsum(tied_low, 0) + tied_low
        negligible = below | ((tied_low != 0) & (from_end <= room_low))

    cls = tl.where(critical, CRITICAL_C, tl.where(negligible, NEGLIGIBLE_C, MARGINAL_C)).to(tl.int8)
    tl.store(CLS + row * Mk + idx, cls, mask=valid)
    _store_tables(cls, idx, valid, LUT + row * n_critical, COUNT + row, IND + row * stride_ind_row,
                  stride_ind_row)


@triton.jit
def _sla_tables_kernel(
    CLS, LUT, COUNT, IND, T_LUT, T_COUNT, T_IND,
    stride_ind_row, stride_t_ind_row, Mq, Mk,
    BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr,
):
    # The backward's tables from block_class (B, H, Mq, Mk). Program r of one (batch, head)
    # reads row r (query block r, when r < Mq) and column r (key block r, when r < Mk), and
    # writes for each the critical indices in ascending order, their count, and the marginal
    # indicator. Tables are as wide as the row or column, so they never overflow.
    r = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    cls = CLS + pid_bh * Mq * Mk
    if r < Mq:
        line = pid_bh * Mq + r
        idx = tl.arange(0, BLOCK_ROW)
        valid = idx < Mk
        c = tl.load(cls + r * Mk + idx, mask=valid, other=NEGLIGIBLE_C)
        _store_tables(c, idx, valid, LUT + line * Mk, COUNT + line, IND + line * stride_ind_row,
                      stride_ind_row)
    if r < Mk:
        line = pid_bh * Mk + r
        idx = tl.arange(0, BLOCK_COL)
        valid = idx < Mq
        c = tl.load(cls + idx * Mk + r, mask=valid, other=NEGLIGIBLE_C)
        _store_tables(c, idx, valid, T_LUT + line * Mq, T_COUNT + line,
                      T_IND + line * stride_t_ind_row, stride_t_ind_row)


@dataclass(frozen=True)
class BlockMap:
    """The block classification of one SLA call and the index tables built from it, seen from
    the query blocks (the forward and dq kernels) or from the key blocks (the dk/dv kernel, with
    rows and columns swapped: (B, H, Mk, Mq)).

    block_class:     int8 (B, H, Mq, Mk): 2 critical, 1 marginal, 0 negligible.
    marginal:        (B, H, rows, cols) [block_class == 1] in the linear-branch product's dtype.
    critical_lut:    int32 (B, H, rows, C): the critical blocks of each row, ascending; entries
                     past the row's count are unused.
    critical_count:  int32 (B, H, rows): how many critical blocks each row has.
    """

    block_class: torch.Tensor
    marginal: torch.Tensor
    critical_lut: torch.Tensor
    critical_count: torch.Tensor


def block_scores(q_means: torch.Tensor, k_sums: torch.Tensor, n_keys: int,
                 config: SLAConfig) -> torch.Tensor:
    """Pooled block scores, float32 (B, H, Mq, Mk) (see the module docstring), from the q means
    per query block (B, H, Mq, D) and the k sums per key block (B, H, Mk, D) of n_keys keys."""
    B, H, Mq, D = q_means.shape
    Mk = k_sums.shape[2]
    scores = torch.empty(B, H, Mq, Mk, device=q_means.device, dtype=torch.float32)
    # the sum of k over all keys, (B, H, D): one small deterministic reduction
    k_total = k_sums.sum(dim=2)
    block_r = min(64, max(16, triton.next_power_of_2(Mq)))
    block_c = min(64, max(16, triton.next_power_of_2(Mk)))
    _sla_block_scores_kernel[(triton.cdiv(Mq, block_r), triton.cdiv(Mk, block_c), B * H)](
        q_means, k_sums, k_total, scores, n_keys, Mq, Mk, config.block_k,
        BLOCK_R=block_r, BLOCK_C=block_c, D=D, num_warps=4,
    )
    return scores


def build_block_map(q_means: torch.Tensor, k_sums: torch.Tensor, n_keys: int, config: SLAConfig,
                    marginal_dtype: torch.dtype, early_exit: bool = True) -> BlockMap:
    """Classify every (query block, key block) pair from the q means per query block and the
    k sums per key block (n_keys keys), and build the critical lookup table, the counts and the
    marginal indicator (``marginal_dtype``): two launches. ``early_exit=False`` makes the
    threshold search run all 32 bits (see ``_kth_largest``; the same classes):
    benchmarks/sla_forward_variants.py times both."""
    scores = block_scores(q_means, k_sums, n_keys, config)
    B, H, Mq, Mk = scores.shape
    n_critical = config.num_critical(Mk)
    device = q_means.device
    block_class = torch.empty(B, H, Mq, Mk, dtype=torch.int8, device=device)
    marginal = empty_indicator(B, H, Mq, Mk, marginal_dtype, device)
    lut = torch.empty(B, H, Mq, n_critical, dtype=torch.int32, device=device)
    count = torch.empty(B, H, Mq, dtype=torch.int32, device=device)
    # At most 8 scores a thread: with 32 (one warp for 1024 key blocks) the row's working
    # arrays did not fit in registers and the kernel took 0.094 ms at N = 43,968 on an H200;
    # the price is a cross-warp barrier in each of the bitwise search's reductions.
    block = max(32, triton.next_power_of_2(Mk))
    _sla_classify_kernel[(B * H * Mq,)](
        scores, block_class, lut, count, marginal, marginal.stride(2), Mk, n_critical,
        config.num_negligible(Mk), BLOCK=block, EARLY_EXIT=early_exit,
        num_warps=min(8, max(1, block // 256)),
    )
    return BlockMap(block_class, marginal, lut, count)


def block_tables(block_class: torch.Tensor, marginal_dtype: torch.dtype,
                 transposed_marginal_dtype: torch.dtype) -> tuple[BlockMap, BlockMap]:
    """The backward's tables from a given block_class (B, H, Mq, Mk), in one launch: the query
    blocks' view (critical key blocks per query block, marginal indicator (Mq, Mk) in
    ``marginal_dtype``) and the key blocks' view (the query blocks that chose each key block,
    indicator (Mk, Mq) in ``transposed_marginal_dtype``)."""
    B, H, Mq, Mk = block_class.shape
    block_class = block_class.contiguous()
    device = block_class.device
    lut = torch.empty(B, H, Mq, Mk, dtype=torch.int32, device=device)
    count = torch.empty(B, H, Mq, dtype=torch.int32, device=device)
    marginal = empty_indicator(B, H, Mq, Mk, marginal_dtype, device)
    t_lut = torch.empty(B, H, Mk, Mq, dtype=torch.int32, device=device)
    t_count = torch.empty(B, H, Mk, dtype=torch.int32, device=device)
    t_marginal = empty_indicator(B, H, Mk, Mq, transposed_marginal_dtype, device)
    _sla_tables_kernel[(max(Mq, Mk), B * H)](
        block_class, lut, count, marginal, t_lut, t_count, t_marginal,
        marginal.stride(2), t_marginal.stride(2), Mq, Mk,
        BLOCK_ROW=max(16, triton.next_power_of_2(Mk)),
        BLOCK_COL=max(16, triton.next_power_of_2(Mq)), num_warps=4,
    )
    return (BlockMap(block_class, marginal, lut, count),
            BlockMap(block_class, t_marginal, t_lut, t_count))
