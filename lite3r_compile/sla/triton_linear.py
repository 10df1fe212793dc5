"""The linear branch of SLA on the GPU: feature maps, per-key-block states and their marginal sums.

With phi the feature map (applied per row, over the head dimension, in float32):

    h_j = phi(K_j)^T V_j   (D, D)      z_j = phi(K_j)^T 1   (D,)       for each key block j
    H_i = sum over j marginal for query block i of h_j,   Z_i likewise
    o_l = phi(q) H_i / (phi(q) . Z_i + eps)   for q in query block i (eps = 1e-6, as the reference;
                                              an empty marginal set gives exactly 0)

h_j and z_j are stored side by side as one row of E = D*D + D numbers, so H_i and Z_i come out of
one batched matrix product: (marginal indicator (Mq, Mk)) @ (states (Mk, E)). The backward pass
uses the same product transposed to send dH_i, dZ_i back to the key blocks. The pass that builds
the states also pools k per key block and q per query block for the block map
(triton_blockmap.py), so k, v and q are each read once before the attention kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lite3r_compile.sla.config import SLAConfig

FEATURE_MAP_CODES = {"softmax": 0, "elu": 1, "relu": 2}
# Operand precision of tl.dot: exact float32, operands rounded to float16 / bfloat16 / tf32, all
# with float32 accumulation.
DOT_F32, DOT_F16, DOT_BF16, DOT_TF32 = 0, 1, 2, 3
DOT_CODES = {torch.float32: DOT_F32, torch.float16: DOT_F16, torch.bfloat16: DOT_BF16}
# Set when the kernels were decorated under TRITON_INTERPRET=1 (CPU tests).
INTERPRETING: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))


def float32_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuning prune: a float32 (``DOT=DOT_F32``, exact ``ieee`` products) launch tries one
    config, the one with the fewest pipeline stages (the least shared memory: float32 tiles are
    twice the size). Such kernels serve tests and float32 models; compiling them is what a first
    call spends its time on (ptxas took 71 s for one small float32 backward over every config on
    an H200, benchmarks/NOTES.md), not the few percent a tuned config would gain."""
    if kwargs.get("DOT") == DOT_F32:
        return [min(configs, key=lambda c: c.num_stages)]
    return configs


def tuned(configs: list[triton.Config], key: list[str]):
    """Autotune over ``configs`` on a GPU (float32 launches over one, :func:`float32_prune`),
    with the timings cached on disk next to the compiled kernels, so a warm Triton cache skips
    both. Under TRITON_INTERPRET=1 there is nothing to time: the kernel runs with the launch
    options its caller passes."""
    if triton.knobs.runtime.interpret:
        return lambda kernel: kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": float32_prune},
                           cache_results=True)


@triton.jit
def mma(a, b, DOT: tl.constexpr):
    """a @ b accumulated in float32, operands in the precision DOT names."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        if INTERPRETING:
            # Triton 3.6's interpreter multiplies bfloat16 operands as their raw 16-bit patterns;
            # rounding to bfloat16 and multiplying exactly in float32 is what tensor cores do.
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                          input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def mma_acc(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b, accumulated inside the matrix instruction (no separate add pass)."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif DOT == 2:
        if INTERPRETING:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                          acc, input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")


@triton.jit
def feature_map(x, FEATURE_MAP: tl.constexpr):
    """phi(x) for float32 rows x (R, D): softmax over D (0), elu(x) + 1 (1), relu (2)."""
    if FEATURE_MAP == 0:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        return e / tl.sum(e, axis=1)[:, None]
    elif FEATURE_MAP == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def feature_map_grad(x, phi, dphi, FEATURE_MAP: tl.constexpr):
    """dL/dx from dL/dphi for phi = feature_map(x)."""
    if FEATURE_MAP == 0:
        return phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    elif FEATURE_MAP == 1:
        # d(elu(x) + 1)/dx is 1 above zero and exp(x) = phi at or below it.
        return dphi * tl.where(x > 0, 1.0, phi)
    else:
        return tl.where(x > 0, dphi, 0.0)


@triton.jit
def _sla_block_stats_kernel(
    Q, K, V, HZ, KSUM, QMEAN,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, Nq, Nk, Mq, Mk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    FEATURE_MAP: tl.constexpr, DOT: tl.constexpr, POOL_Q: tl.constexpr,
):
    # Program j of one (batch, head) summarises key block j when j < Mk, and query block j - Mk
    # otherwise (POOL_Q): one launch reads k, v and q once each, and a program's loads are all
    # issued before any of its arithmetic, so that each has as many bytes in flight as it can.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    if pid < Mk:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (offs_n < Nk)[:, None]
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=valid, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=valid, other=0.0)
        k = k.to(tl.float32)
        # The key-block sums the block scores are pooled from, while the tile is here.
        tl.store(KSUM + (pid_bh.to(tl.int64) * Mk + pid) * D + offs_d, tl.sum(k, axis=0))
        # Padded rows must not enter the state: phi(0) is not 0 for softmax or elu + 1.
        phi = tl.where(valid, feature_map(k, FEATURE_MAP), 0.0)
        state = mma(tl.trans(phi), v, DOT)
        out = HZ + (pid_bh.to(tl.int64) * Mk + pid) * (D * D + D)
        tl.store(out + offs_d[:, None] * D + offs_d[None, :], state.to(HZ.dtype.element_ty))
        tl.store(out + D * D + offs_d, tl.sum(phi, axis=0).to(HZ.dtype.element_ty))
    elif POOL_Q:
        # The mean of q over the query block's real rows: the last block of a ragged sequence
        # divides by its own row count, not by BLOCK_M.
        i = pid - Mk
        offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        x = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                    + offs_d[None, :] * stride_qd, mask=(offs_m < Nq)[:, None], other=0.0)
        count = tl.minimum(Nq - i * BLOCK_M, BLOCK_M).to(tl.float32)
        tl.store(QMEAN + (pid_bh.to(tl.int64) * Mq + i) * D + offs_d,
                 tl.sum(x.to(tl.float32), axis=0) / count)


def block_statistics(
    q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, config: SLAConfig,
    state_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over the blocks of q (B, H, Nq, D), k and v (B, H, Nk, D).

    Returns ``(states, k_sums, q_means)``: [h_j | z_j] for every key block, (B, H, Mk, D*D + D)
    in ``state_dtype``; the sum of k over each key block, float32 (B, H, Mk, D); the mean of q
    over each query block, float32 (B, H, Mq, D), or None when ``q`` is None (the backward,
    which takes the block classes from the forward, needs only the states).
    """
    B, H, Nk, D = k.shape
    Mk = triton.cdiv(Nk, config.block_k)
    states = torch.empty(B, H, Mk, D * D + D, device=k.device, dtype=state_dtype)
    k_sums = torch.empty(B, H, Mk, D, device=k.device, dtype=torch.float32)
    if q is None:
        Nq, Mq, q_means, q_arg, q_strides = 0, 0, None, k, (0, 0, 0, 0)
    else:
        Nq = q.shape[2]
        Mq = triton.cdiv(Nq, config.block_q)
        q_means = torch.empty(B, H, Mq, D, device=q.device, dtype=torch.float32)
        q_arg, q_strides = q, q.stride()
    _sla_block_stats_kernel[(Mk + Mq, B * H)](
        q_arg, k, v, states, k_sums, k_sums if q_means is None else q_means,
        *q_strides, *k.stride(), *v.stride(), H, Nq, Nk, Mq, Mk,
        BLOCK_M=config.block_q, BLOCK_N=config.block_k, D=D,
        FEATURE_MAP=FEATURE_MAP_CODES[config.feature_map], DOT=DOT_CODES[k.dtype],
        POOL_Q=q is not None, num_warps=4 if D <= 64 else 8,
    )
    return states, k_sums, q_means


@tuned([triton.Config({"BLOCK_E": e}, num_warps=w, num_stages=st)
        for e, w, st in ((128, 4, 3), (128, 8, 3), (256, 8, 3), (128, 4, 4), (256, 8, 4))],
       key=["R", "C", "E", "BLOCK_R", "BLOCK_C", "DOT"])
@triton.jit
def _marginal_sum_kernel(
    IND, X, OUT,
    stride_ind_bh, stride_ind_row,
    R, C, E,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr,
):
    # OUT[bh] = IND[bh] @ X[bh]: (R, C) 0/1 indicator times (C, E) states, accumulated in
    # float32 and rounded once to OUT's dtype. The contraction is short (C = number of key or
    # query blocks, a few hundred), so the output tile's store is a large share of the work:
    # half-precision inputs get a bfloat16 OUT in the forward. Row tiles vary fastest in the
    # grid so that the programs sharing one column tile of X run together and X is read from
    # memory about once.
    pid_r = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    ind_base = IND + pid_bh * stride_ind_bh + rows[:, None] * stride_ind_row
    x_base = X + pid_bh * C * E + cols[None, :]
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        # The indicator's rows are padded with zeros to stride_ind_row, a multiple of 16
        # (empty_indicator): masking there instead of at C keeps the mask constant over
        # 16-column runs, so the loads are vectorised.
        a = tl.load(ind_base + cs[None, :],
                    mask=(rows < R)[:, None] & (cs < stride_ind_row)[None, :], other=0.0)
        x = tl.load(x_base + cs[:, None] * E, mask=(cs < C)[:, None] & (cols < E)[None, :],
                    other=0.0)
        acc = mma_acc(a, x, acc, DOT)
    tl.store(OUT + (pid_bh * R + rows[:, None]) * E + cols[None, :],
             acc.to(OUT.dtype.element_ty), mask=(rows < R)[:, None] & (cols < E)[None, :])


def empty_indicator(B: int, H: int, R: int, C: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """An uninitialised (B, H, R, C) view of an indicator whose rows are padded to a multiple of
    16 columns, so that the product's tile loads are aligned and need no mask at C. The
    block-map kernels fill it, the padding with zeros."""
    padded = triton.cdiv(C, 16) * 16
    return torch.empty(B, H, R, padded, device=device, dtype=dtype)[..., :C]


def marginal_sum(indicator: torch.Tensor, x: torch.Tensor, dot: int,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """indicator (B, H, R, C) @ x (B, H, C, E) -> (B, H, R, E) in ``out_dtype``: the per-block
    states x summed over the marginal pairs (float32 accumulation). With the forward indicator
    (R, C) = (Mq, Mk) this sums each query block's marginal key blocks; with the transposed one
    it sends query-block gradients back to the key blocks. ``dot`` is the operand precision
    (DOT_* code); the 0/1 indicator is exact in every one of them. The indicator's columns
    past C, up to its row stride, are read and must be zeros (as :func:`empty_indicator` and the
    block-map kernels leave them, or a contiguous indicator, which has none).
    """
    B, H, R, C = indicator.shape
    E = x.shape[-1]
    assert indicator.stride(3) == 1 and indicator.stride(1) == R * indicator.stride(2)
    assert indicator.stride(2) >= C
    out = torch.empty(B, H, R, E, device=x.device, dtype=out_dtype)
    # Tiles no larger than the problem: frame attention has only ~22 blocks a side.
    block_r = min(128 if x.is_cuda else 16, max(16, triton.next_power_of_2(R)))
    block_c = min(64 if dot in (DOT_F16, DOT_BF16) else 32, max(16, triton.next_power_of_2(C)))
    launch = {"BLOCK_E": 64} if triton.knobs.runtime.interpret else {}
    _marginal_sum_kernel[lambda meta: (triton.cdiv(R, block_r), triton.cdiv(E, meta["BLOCK_E"]),
                                       B * H)](
        indicator, x.contiguous(), out, indicator.stride(1), indicator.stride(2), R, C, E,
        BLOCK_R=block_r, BLOCK_C=block_c, DOT=dot, **launch,
    )
    return out
