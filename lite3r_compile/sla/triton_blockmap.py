"""The SLA block map on the GPU: pooled block scores, top-k, the block classes and the lookup
tables the attention kernels iterate over.

For q (B, H, Nq, D) and k (B, H, Nk, D), with Mq = ceil(Nq / block_q) and Mk = ceil(Nk / block_k):

    pooled_q[m] = mean of q over the valid rows of query block m               (B, H, Mq, D)
    pooled_k[j] = mean of (k - mean over all keys of k) over key block j       (B, H, Mk, D)
    scores      = pooled_q @ pooled_k^T                                        (B, H, Mq, Mk)

Per query block, the ``config.num_critical(Mk)`` highest-scoring key blocks are critical (class 2),
the ``config.num_negligible(Mk)`` lowest-scoring are negligible (class 0), the rest marginal (1);
ties go to the lower key-block index, as in ``lite3r_compile.sla.reference``.
Only the pooled tensors and the (Mq, Mk) scores are materialised, never an N x N tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.triton_linear import empty_indicator, marginal_indicator

CRITICAL, MARGINAL, NEGLIGIBLE = 2, 1, 0


@triton.jit
def _block_mean_kernel(
    X, OUT,
    stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, n_blocks,
    BLOCK: tl.constexpr, D: tl.constexpr,
):
    # One program per (block, batch*head): the mean over the block's valid rows. The last block
    # of a ragged sequence divides by its own row count, not by BLOCK.
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=(offs_n < N)[:, None], other=0.0).to(tl.float32)
    count = tl.minimum(N - pid_blk * BLOCK, BLOCK).to(tl.float32)
    out = OUT + (pid_bh.to(tl.int64) * n_blocks + pid_blk) * D
    tl.store(out + offs_d, tl.sum(x, axis=0) / count)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of x (B, H, N, D) over each block of ``block`` rows (the last one ragged):
    float32 (B, H, ceil(N / block), D)."""
    B, H, N, D = x.shape
    n_blocks = triton.cdiv(N, block)
    out = torch.empty(B, H, n_blocks, D, device=x.device, dtype=torch.float32)
    _block_mean_kernel[(n_blocks, B * H)](
        x, out, *x.stride(), H, N, n_blocks, BLOCK=block, D=D, num_warps=4,
    )
    return out


@triton.jit
def _kth_largest(key, valid, k):
    """The k-th largest of the uint32 keys where valid (k >= 1), by a 32-step bitwise search:
    the largest t with #{key >= t} >= k."""
    t = tl.full((), 0, tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        candidate = t | tl.full((), 1 << bit, tl.uint32)
        count = tl.sum((valid & (key >= candidate)).to(tl.int32))
        t = tl.where(count >= k, candidate, t)
    return t


@triton.jit
def _classify_kernel(
    SCORES, CLS, LUT, IND, stride_ind_row, Mk, n_critical, n_negligible,
    BLOCK: tl.constexpr,
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

    top = _kth_largest(key, valid, n_critical)
    above = valid & (key > top)
    tied = (valid & (key == top)).to(tl.int32)
    room = n_critical - tl.sum(above.to(tl.int32))
    critical = above | ((tied != 0) & (tl.cumsum(tied, 0) <= room))

    negligible = idx < 0
    if n_negligible > 0:
        low_key = key ^ 0xFFFFFFFF
        bottom = _kth_largest(low_key, valid, n_negligible)
        below = valid & (low_key > bottom)
        tied_low = (valid & (low_key == bottom)).to(tl.int32)
        room_low = n_negligible - tl.sum(below.to(tl.int32))
        from_end = tl.sum(tied_low) - tl.cumsum(tied_low, 0) + tied_low
        negligible = below | ((tied_low != 0) & (from_end <= room_low))

    cls = tl.where(critical, 2, tl.where(negligible, 0, 1)).to(tl.int8)
    tl.store(CLS + row * Mk + idx, cls, mask=valid)
    # The marginal indicator the linear branch's product reads (through float32: Triton 3.6's
    # interpreter casts integers to bfloat16 as raw bit patterns).
    tl.store(IND + row * stride_ind_row + idx,
             (cls == 1).to(tl.float32).to(IND.dtype.element_ty), mask=valid)
    slot = tl.cumsum(critical.to(tl.int32), 0) - 1
    tl.store(LUT + row * n_critical + slot, idx, mask=critical)


@triton.jit
def _critical_lut_kernel(
    CLS, LUT, COUNT,
    stride_bh, stride_row, stride_col, n_rows, n_cols,
    BLOCK: tl.constexpr,
):
    # One program per row of block_class seen through (stride_row, stride_col): rows are query
    # blocks for the forward table, key blocks for the transposed one. Writes the critical
    # columns in ascending order and their count; the table is n_cols wide (never overflows).
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_rows
    r = pid % n_rows
    idx = tl.arange(0, BLOCK)
    valid = idx < n_cols
    cls = tl.load(CLS + bh * stride_bh + r * stride_row + idx * stride_col, mask=valid, other=0)
    critical = cls == 2
    slot = tl.cumsum(critical.to(tl.int32), 0) - 1
    tl.store(LUT + pid * n_cols + slot, idx, mask=critical)
    tl.store(COUNT + pid, tl.sum(critical.to(tl.int32)))


@dataclass(frozen=True)
class BlockMap:
    """The block classification of one SLA call and the index table built from it.

    block_class:     int8 (B, H, Mq, Mk): 2 critical, 1 marginal, 0 negligible.
    marginal:        (B, H, Mq, Mk) [block_class == 1] in the linear-branch product's dtype.
    critical_lut:    int32 (B, H, Mq, C): the critical key blocks of each query block,
                     ascending; entries past the query block's count are unused.
    critical_count:  int32 (B, H, Mq): how many critical key blocks each query block has.
    """

    block_class: torch.Tensor
    marginal: torch.Tensor
    critical_lut: torch.Tensor
    critical_count: torch.Tensor


def block_scores(q: torch.Tensor, k_sums: torch.Tensor, n_keys: int,
                 config: SLAConfig) -> torch.Tensor:
    """Pooled block scores, float32 (B, H, Mq, Mk) (see the module docstring), from q and the
    per-key-block sums of k (``triton_linear.key_block_states`` computes them)."""
    pooled_q = block_means(q, config.block_q)
    Mk = k_sums.shape[2]
    counts = torch.full((Mk, 1), float(config.block_k), device=q.device)
    counts[-1] = n_keys - config.block_k * (Mk - 1)
    k_mean = k_sums.sum(dim=2, keepdim=True) / n_keys
    return pooled_q @ (k_sums / counts - k_mean).transpose(-1, -2)


def build_block_map(q: torch.Tensor, k_sums: torch.Tensor, n_keys: int, config: SLAConfig,
                    marginal_dtype: torch.dtype) -> BlockMap:
    """Classify every (query block, key block) pair from q and the key-block sums of k (n_keys
    keys), and build the critical lookup table and the marginal indicator (``marginal_dtype``)."""
    scores = block_scores(q, k_sums, n_keys, config)
    B, H, Mq, Mk = scores.shape
    n_critical = config.num_critical(Mk)
    block_class = torch.empty(B, H, Mq, Mk, dtype=torch.int8, device=q.device)
    marginal = empty_indicator(B, H, Mq, Mk, marginal_dtype, q.device)
    lut = torch.empty(B, H, Mq, n_critical, dtype=torch.int32, device=q.device)
    # One or two warps: the 64 bitwise-search reductions then need no cross-warp barrier.
    _classify_kernel[(B * H * Mq,)](
        scores, block_class, lut, marginal, marginal.stride(2), Mk, n_critical,
        config.num_negligible(Mk), BLOCK=max(32, triton.next_power_of_2(Mk)),
        num_warps=1 if Mk <= 1024 else 2,
    )
    count = torch.full((B, H, Mq), n_critical, dtype=torch.int32, device=q.device)
    return BlockMap(block_class, marginal, lut, count)


def block_map_from_classes(block_class: torch.Tensor, marginal_dtype: torch.dtype) -> BlockMap:
    """Rebuild the lookup table and indicator from a given block_class (the backward's)."""
    lut, count = _critical_lut(block_class, transpose=False)
    marginal = marginal_indicator(block_class, transpose=False, dtype=marginal_dtype)
    return BlockMap(block_class, marginal, lut, count)


def transposed_critical_lut(block_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks that chose it as critical: (lut int32 (B, H, Mk,
    Mq) ascending, count int32 (B, H, Mk)); entries past a key block's count are unused."""
    return _critical_lut(block_class, transpose=True)


def _critical_lut(block_class: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Mq, Mk = block_class.shape
    block_class = block_class.contiguous()
    rows, cols = (Mk, Mq) if transpose else (Mq, Mk)
    stride_row, stride_col = (1, Mk) if transpose else (Mk, 1)
    lut = torch.empty(B, H, rows, cols, dtype=torch.int32, device=block_class.device)
    count = torch.empty(B, H, rows, dtype=torch.int32, device=block_class.device)
    _critical_lut_kernel[(B * H * rows,)](
        block_class, lut, count, Mq * Mk, stride_row, stride_col, rows, cols,
        BLOCK=max(16, triton.next_power_of_2(cols)), num_warps=4,
    )
    return lut, count
