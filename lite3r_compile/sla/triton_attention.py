"""The fused SLA attention kernels: block-sparse online softmax over the critical key blocks with
the linear branch and the output projection in the epilogue (forward), and the FlashAttention-2
style gradients of both branches (backward).

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D); one program handles one query block (forward,
dq) or one key block (dk, dv) of one (batch, head). With s = scale * q.k over the critical keys:

    o_s  = softmax(s) v,    lse = logsumexp(s)                    (natural log, float32)
    o_l  = phi(q) H_i / (phi(q) . Z_i + eps)                       (triton_linear.py)
    o    = o_s + o_l W^T + b

Backward, with g = dL/do and delta = rowsum(g * o_s) (accumulated in the dq kernel):

    p = exp(s - lse),  dp = g v^T,  ds = p (dp - delta)
    dq = scale ds k (+ linear),   dk = scale ds^T q (+ linear),   dv = p^T g (+ linear)
    dW = sum over query blocks of g^T o_l,   db = sum of g          (partials from the dq kernel)

Rows past Nq or Nk are masked: padded keys get -inf scores, padded queries are never stored and
carry zero gradient, and neither enters a linear-branch state.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lite3r_compile.sla.triton_linear import feature_map, feature_map_grad, mma, mma_acc, tuned


_ATTENTION_CONFIGS = [
    triton.Config({}, num_warps=w, num_stages=s)
    for w, s in ((4, 3), (4, 4), (8, 3), (8, 2))
] + [
    # Forward only: at most 168 registers a thread lets three 4-warp programs share an SM (64K
    # registers; 3 stages of K, V tiles fit three times in shared memory at D = 64). With TMA
    # loads the kernel fits without spilling: 2.136 ms against 2.219 uncapped at N = 43,968,
    # topk 0.1, bf16, D = 64 on an H200 (benchmarks/NOTES.md, session 15).
    triton.Config({}, num_warps=4, num_stages=3, maxnreg=168),
]
# c_max, the critical blocks a query block loops over, is in the forward's key: the register cap
# that wins on long loops (69 blocks) lost on short ones (6 to 35 blocks: frame attention and
# N <= 21,984 ran 5-10% slower under the config tuned at N = 43,968), so each loop length is
# tuned once (one value per frame count and topk).
_ATTENTION_KEY = ["D", "BLOCK_M", "BLOCK_N", "DOT", "SAVE", "TMA", "c_max"]


@tuned(_ATTENTION_CONFIGS, _ATTENTION_KEY)
@triton.jit
def _sla_fwd_kernel(
    Q, K, V, LUT, COUNT, HZ, W, BIAS, O, OL, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, Nq, Nk, Mq, c_max, scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    FEATURE_MAP: tl.constexpr, DOT: tl.constexpr, LIN_DOT: tl.constexpr,
    EVEN_N: tl.constexpr, SAVE: tl.constexpr, TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    # With TMA, K and V are tensor descriptors over (B, H, Nk, D) with (1, 1, BLOCK_N, D)
    # blocks: the copy engine fetches each critical block (rows past Nk read as zeros), in place
    # of BLOCK_N x D addresses computed and loaded by the threads. WARP_SPECIALIZE asks Triton to
    # split the loop into producer and consumer warps; only benchmarks/sla_forward_variants.py
    # sets it (Triton 3.6's Hopper pass fails on this loop; Blackwell is untried).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    if not TMA:
        k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    slot = pid_bh.to(tl.int64) * Mq + pid_m
    lut = LUT + slot * c_max
    n_critical = tl.load(COUNT + slot)

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for t in tl.range(n_critical, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.load(lut + t) * BLOCK_N
        offs_n = start_n + offs_n0
        col_ok = offs_n < Nk
        if TMA:
            k = K.load([pid_bh // H, pid_bh % H, start_n, 0]).reshape(BLOCK_N, D)
            v = V.load([pid_bh // H, pid_bh % H, start_n, 0]).reshape(BLOCK_N, D)
        elif EVEN_N:
            k = tl.load(k_base + offs_n[:, None] * stride_kn)
            v = tl.load(v_base + offs_n[:, None] * stride_vn)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT)
        if not EVEN_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        # The max is taken on the raw scores (qk_scale > 0), so that scaling a score and
        # subtracting the max is one fused multiply-add. Every key block holds at least one
        # valid key and every query block at least one critical key block, so m_new is finite
        # from the first step on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = mma_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m_i = m_new
    o_s = acc / l_i[:, None]

    # Linear branch over this query block's marginal key blocks, then the projection.
    phi = feature_map(q.to(tl.float32), FEATURE_MAP)
    hz = HZ + slot * (D * D + D)
    state = tl.load(hz + offs_d[:, None] * D + offs_d[None, :])
    z = tl.load(hz + D * D + offs_d)
    o_l = mma(phi, state, LIN_DOT) / (tl.sum(phi * z[None, :], axis=1) + eps)[:, None]
    w = tl.load(W + offs_d[:, None] * D + offs_d[None, :])
    bias = tl.load(BIAS + offs_d)
    o = o_s + mma(o_l, tl.trans(w), LIN_DOT) + bias[None, :]

    row = pid_bh.to(tl.int64) * Nq + offs_m
    tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if SAVE:
        tl.store(OL + row[:, None] * D + offs_d[None, :], o_l, mask=row_ok[:, None])
        tl.store(LSE + row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@tuned(_ATTENTION_CONFIGS[:3], ["D", "BLOCK_M", "BLOCK_N", "DOT"])
@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, DO, OL, LSE, LUT, COUNT, HZ, W, DQ, DHZ, DWB, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, Nq, Nk, Mq, c_max, scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    FEATURE_MAP: tl.constexpr, DOT: tl.constexpr, LIN_DOT: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn
                 + offs_d[None, :] * stride_gd, mask=row_ok[:, None], other=0.0)
    row = pid_bh.to(tl.int64) * Nq + offs_m
    lse2 = tl.load(LSE + row, mask=row_ok, other=float("inf")) * 1.4426950408889634

    # ds = p (dp - delta) with delta = rowsum(g * o_s) = sum_j p_j dp_j, so
    # dq = scale (sum_j (p dp)_j k_j - delta sum_j p_j k_j): one pass yields delta and dq without
    # o_s, which the saved o only gives up with the projection bias.
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    slot = pid_bh.to(tl.int64) * Mq + pid_m
    lut = LUT + slot * c_max
    n_critical = tl.load(COUNT + slot)
    qk_scale = scale * 1.4426950408889634
    acc_pdp = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(n_critical):
        offs_n = tl.load(lut + t) * BLOCK_N + offs_n0
        if EVEN_N:
            k = tl.load(k_base + offs_n[:, None] * stride_kn)
            v = tl.load(v_base + offs_n[:, None] * stride_vn)
        else:
            col_ok = offs_n < Nk
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
        p = tl.exp2(mma(q, tl.trans(k), DOT) * qk_scale - lse2[:, None])
        if not EVEN_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        pdp = p * mma(do, tl.trans(v), DOT)
        delta += tl.sum(pdp, axis=1)
        acc_pdp = mma_acc(pdp.to(k.dtype), k, acc_pdp, DOT)
        acc_p = mma_acc(p.to(k.dtype), k, acc_p, DOT)
    tl.store(DELTA + row, delta, mask=row_ok)
    dq = (acc_pdp - delta[:, None] * acc_p) * scale

    # Linear branch: o_l = num / (den + eps) with num = phi H, den = phi . Z, dL/do_l = g W.
    x = q.to(tl.float32)
    phi = feature_map(x, FEATURE_MAP)
    hz = HZ + slot * (D * D + D)
    state = tl.load(hz + offs_d[:, None] * D + offs_d[None, :])
    z = tl.load(hz + D * D + offs_d)
    tile = row[:, None] * D + offs_d[None, :]
    o_l = tl.load(OL + tile, mask=row_ok[:, None], other=0.0)
    w = tl.load(W + offs_d[:, None] * D + offs_d[None, :])
    inv_den = 1.0 / (tl.sum(phi * z[None, :], axis=1) + eps)
    d_num = tl.where(row_ok[:, None], mma(do, w, LIN_DOT) * inv_den[:, None], 0.0)
    d_den = -tl.sum(d_num * o_l, axis=1)
    d_phi = mma(d_num, tl.trans(state), LIN_DOT) + d_den[:, None] * z[None, :]
    dq += feature_map_grad(x, phi, d_phi, FEATURE_MAP)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])

    phi = tl.where(row_ok[:, None], phi, 0.0)
    dhz = DHZ + slot * (D * D + D)
    tl.store(dhz + offs_d[:, None] * D + offs_d[None, :], mma(tl.trans(phi), d_num, LIN_DOT))
    tl.store(dhz + D * D + offs_d, tl.sum(phi * d_den[:, None], axis=0))

    # This query block's share of the projection's gradients: dW = g^T o_l, db = sum of g
    # (padded rows of g and o_l are zeros); the caller sums the shares.
    dwb = DWB + slot * (D * D + D)
    tl.store(dwb + offs_d[:, None] * D + offs_d[None, :], mma(tl.trans(do), o_l, LIN_DOT))
    tl.store(dwb + D * D + offs_d, tl.sum(do.to(tl.float32), axis=0))


@tuned(_ATTENTION_CONFIGS[:3], ["D", "BLOCK_M", "BLOCK_N", "DOT"])
@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, TLUT, TCOUNT, DHZ, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, Nq, Nk, Mk, c_max, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    FEATURE_MAP: tl.constexpr, DOT: tl.constexpr, LIN_DOT: tl.constexpr, EVEN_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < Nk
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
    do_base = DO + b * stride_gb + h * stride_gh + offs_d[None, :] * stride_gd
    row_base = pid_bh.to(tl.int64) * Nq
    slot = pid_bh.to(tl.int64) * Mk + pid_n
    lut = TLUT + slot * c_max
    count = tl.load(TCOUNT + slot)

    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for t in range(count):
        offs_m = tl.load(lut + t) * BLOCK_M + offs_m0
        if EVEN_M:
            q = tl.load(q_base + offs_m[:, None] * stride_qn)
            do = tl.load(do_base + offs_m[:, None] * stride_gn)
            lse2 = tl.load(LSE + row_base + offs_m) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m)
        else:
            # Padded query rows: q = g = 0 and lse = +inf, so they add nothing.
            row_ok = offs_m < Nq
            q = tl.load(q_base + offs_m[:, None] * stride_qn, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_gn, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok,
                           other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.exp2(mma(k, tl.trans(q), DOT) * qk_scale - lse2[None, :])
        dv = mma_acc(p_t.to(do.dtype), do, dv, DOT)
        dp_t = mma(v, tl.trans(do), DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma_acc(ds_t.to(q.dtype), q, dk, DOT)
    dk *= scale

    # Linear branch: h_j = phi(K_j)^T V_j and z_j = phi(K_j)^T 1 received dH_j, dZ_j.
    x = k.to(tl.float32)
    phi = tl.where(col_ok[:, None], feature_map(x, FEATURE_MAP), 0.0)
    dhz = DHZ + slot * (D * D + D)
    d_state = tl.load(dhz + offs_d[:, None] * D + offs_d[None, :])
    dz = tl.load(dhz + D * D + offs_d)
    dv += mma(phi, d_state, LIN_DOT)
    d_phi = mma(v, tl.trans(d_state), LIN_DOT) + dz[None, :]
    dk += feature_map_grad(x, phi, d_phi, FEATURE_MAP)
    tile = (pid_bh.to(tl.int64) * Nk + offs_n)[:, None] * D + offs_d[None, :]
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
