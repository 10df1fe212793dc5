"""Sparse Linear Attention through Triton: the CUDA implementation of ``lite3r::sla_forward`` and
``lite3r::sla_backward``.

One forward call is five kernel launches and no host synchronisation, for q (B, H, Nq, D) and
k, v (B, H, Nk, D):

1. the block pass (triton_linear.py): per key block the linear-branch state
   [phi(K_j)^T V_j | phi(K_j)^T 1] and the sum of k, per query block the mean of q;
2. the block map (triton_blockmap.py), two launches: pooled scores (B, H, Mq, Mk), then per
   score row the top-k classes, the lookup table of critical key blocks, their count and the
   marginal indicator;
3. the marginal sums of the states per query block: one batched product (triton_linear.py);
4. the fused attention kernel (triton_attention.py): online softmax over the critical blocks,
   then o_l and o = o_s + o_l W^T + b in the epilogue. On Hopper and newer GPUs it loads the
   key blocks through TMA tensor descriptors (:func:`tma_supported`).

The backward is seven launches: the tables of both views from the saved block_class (one
kernel), the key-block states and their marginal sums, a dq kernel per query block (which also
produces delta, the gradient of each query block's state and partial sums of dW, db), the
transposed product sending the state gradients back to the key blocks, a dk/dv kernel per key
block over the query blocks that chose it, and the sum of the dW, db partials. Nothing of size
Nq x Nk is ever materialised.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.reference import LINEAR_DENOMINATOR_EPS
from lite3r_compile.sla.triton_attention import (
    _sla_bwd_dkdv_kernel,
    _sla_bwd_dq_kernel,
    _sla_fwd_kernel,
)
from lite3r_compile.sla.triton_blockmap import BlockMap, block_tables, build_block_map
from lite3r_compile.sla.triton_linear import (
    DOT_BF16,
    DOT_CODES,
    DOT_F32,
    DOT_TF32,
    FEATURE_MAP_CODES,
    block_statistics,
    marginal_sum,
)

HEAD_DIMS = (16, 32, 64, 128)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    scale: float,
    config: SLAConfig,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA forward.

    Returns (o, o_l, lse, block_class): o (B, H, Nq, D) in q.dtype, o = o_s + o_l W^T + b
    computed in float32; o_l (B, H, Nq, D) float32, the linear branch before the projection;
    lse (B, H, Nq) float32, the natural-log logsumexp of scale * q.k over the critical keys;
    block_class (B, H, Mq, Mk) int8. o_l and lse are empty (0,) tensors unless
    ``save_for_backward``.
    """
    _check_inputs(q, k, v, proj_weight, config)
    key_states, k_sums, q_means = block_statistics(q, k, v, config, _state_dtype(k))
    block_map = build_block_map(q_means, k_sums, k.shape[2], config, _state_dtype(q))
    states = marginal_sum(block_map.marginal, key_states, dot=_state_dot(k),
                          out_dtype=_state_dtype(k))
    o, o_l, lse = attention_forward(q, k, v, block_map, states, proj_weight, proj_bias, scale,
                                    config, save_for_backward)
    return o, o_l, lse, block_map.block_class


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    states: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    scale: float,
    config: SLAConfig,
    save_for_backward: bool,
    tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused attention kernel alone, given the block map and the marginal sums of the
    linear-branch states (B, H, Mq, D*D + D): (o, o_l, lse) as in ``forward`` (the benchmark
    times it apart from the other steps).

    ``tma`` loads the key blocks through tensor descriptors (the Hopper copy engine); None picks
    it where :func:`tma_supported` holds."""
    if tma is None:
        tma = tma_supported(k, v)
    elif tma and not tma_supported(k, v, require_gpu=False):
        raise ValueError("lite3r_compile.sla.triton_sla.attention_forward: tma=True needs "
                         "bfloat16/float16 k, v with a contiguous last dim and 16-byte aligned "
                         f"strides, got {k.dtype} strides {k.stride()}, {v.stride()}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty(B, H, Nq, D, device=q.device, dtype=q.dtype)
    if save_for_backward:
        o_l = torch.empty(B, H, Nq, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    else:
        # two distinct tensors: a custom op's outputs may not alias each other
        o_l = torch.empty(0, device=q.device, dtype=torch.float32)
        lse = torch.empty(0, device=q.device, dtype=torch.float32)
    Mq = block_map.block_class.shape[2]
    k_strides, v_strides = k.stride(), v.stride()
    if tma:
        k = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, config.block_k, D])
        v = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, config.block_k, D])
    _sla_fwd_kernel[(Mq, B * H)](
        q, k, v, block_map.critical_lut, block_map.critical_count, states,
        proj_weight.float().contiguous(), proj_bias.float().contiguous(), o, o_l, lse,
        *q.stride(), *k_strides, *v_strides,
        H, Nq, Nk, Mq, block_map.critical_lut.shape[-1], float(scale), LINEAR_DENOMINATOR_EPS,
        BLOCK_M=config.block_q, BLOCK_N=config.block_k, D=D,
        FEATURE_MAP=FEATURE_MAP_CODES[config.feature_map], DOT=DOT_CODES[q.dtype],
        LIN_DOT=_linear_dot(q), EVEN_N=Nk % config.block_k == 0, SAVE=save_for_backward,
        TMA=tma,
    )
    return o, o_l, lse


# Asked on every forward call (48 a VGGT-1B forward); a device's capability never changes.
_capability = functools.cache(torch.cuda.get_device_capability)


def tma_supported(k: torch.Tensor, v: torch.Tensor, require_gpu: bool = True) -> bool:
    """Whether the forward kernel can load k and v through TMA tensor descriptors: a GPU of
    compute capability 9.0 or newer (unless ``require_gpu`` is False: the CPU interpreter runs
    descriptors too), 16-bit elements, a contiguous last dim, positive 16-byte aligned strides
    and base. Float32 inputs keep pointer loads: they serve tests and float32 models, not speed;
    so do broadcast (stride 0) views, e.g. k expanded over heads."""
    if require_gpu and not (k.is_cuda and _capability(k.device)[0] >= 9):
        return False
    return all(
        x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1
        and all(stride > 0 and stride * x.element_size() % 16 == 0 for stride in x.stride()[:-1])
        and x.data_ptr() % 16 == 0
        for x in (k, v)
    )


def backward(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    o_l: torch.Tensor,
    lse: torch.Tensor,
    block_class: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: float,
    config: SLAConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA backward from the tensors ``forward(..., save_for_backward=True)`` returned, with the
    block classes held fixed. Only the block sizes and feature map of ``config`` are used.

    ``o`` is accepted for the op's signature but not read: delta = rowsum(grad_o * o_s) is
    accumulated inside the dq kernel, since o_s = o - (o_l W^T + b) would need the bias.
    Returns (dq, dk, dv, d_proj_weight, d_proj_bias), the first three in the dtypes of q, k, v,
    the last two float32.
    """
    _check_inputs(q, k, v, proj_weight, config)
    if o_l.numel() == 0 or lse.numel() == 0:
        raise ValueError(
            "lite3r_compile.sla.triton_sla.backward: o_l and lse are empty; run forward with "
            "save_for_backward=True"
        )
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq, Mk = block_class.shape[2], block_class.shape[3]
    by_query, by_key = block_tables(block_class, _state_dtype(q), torch.float32)
    key_states = block_statistics(None, k, v, config, _state_dtype(k))[0]
    states = marginal_sum(by_query.marginal, key_states, dot=_state_dot(k),
                          out_dtype=_state_dtype(k))
    weight = proj_weight.float().contiguous()
    lse = lse.contiguous()

    dq = torch.empty(B, H, Nq, D, device=q.device, dtype=q.dtype)
    d_states_q = torch.empty(B, H, Mq, D * D + D, device=q.device, dtype=torch.float32)
    d_proj_parts = torch.empty(B * H * Mq, D * D + D, device=q.device, dtype=torch.float32)
    delta = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    common = dict(D=D, FEATURE_MAP=FEATURE_MAP_CODES[config.feature_map], DOT=DOT_CODES[q.dtype],
                  LIN_DOT=_linear_dot(q), BLOCK_M=config.block_q, BLOCK_N=config.block_k)
    _sla_bwd_dq_kernel[(Mq, B * H)](
        q, k, v, grad_o, o_l.contiguous(), lse, by_query.critical_lut, by_query.critical_count,
        states, weight,
        dq, d_states_q, d_proj_parts, delta,
        *q.stride(), *k.stride(), *v.stride(), *grad_o.stride(),
        H, Nq, Nk, Mq, by_query.critical_lut.shape[-1], float(scale), LINEAR_DENOMINATOR_EPS,
        EVEN_N=Nk % config.block_k == 0, **common,
    )

    d_states_k = marginal_sum(by_key.marginal, d_states_q, dot=_linear_dot(q))
    dk = torch.empty(B, H, Nk, D, device=k.device, dtype=k.dtype)
    dv = torch.empty(B, H, Nk, D, device=v.device, dtype=v.dtype)
    _sla_bwd_dkdv_kernel[(Mk, B * H)](
        q, k, v, grad_o, lse, delta, by_key.critical_lut, by_key.critical_count, d_states_k,
        dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_o.stride(),
        H, Nq, Nk, Mk, by_key.critical_lut.shape[-1], float(scale),
        EVEN_M=Nq % config.block_q == 0, **common,
    )

    # dW = sum over rows of g^T o_l and db = sum of g, from the dq kernel's per-query-block
    # partial sums; the op's outputs must not alias, so the bias is copied out.
    d_proj = d_proj_parts.sum(dim=0)
    return dq, dk, dv, d_proj[: D * D].view(D, D), d_proj[D * D :].clone()


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    # For half-precision inputs the per-key-block states and their marginal sums H_i, Z_i are
    # bfloat16 (8 exponent bits: no overflow; summed in float32 and rounded once, which moves o_l
    # by ~1e-3 relative, under the bf16 output's own rounding); float32 inputs stay exact.
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


def _state_dot(x: torch.Tensor) -> int:
    return DOT_F32 if x.dtype == torch.float32 else DOT_BF16


def _linear_dot(q: torch.Tensor) -> int:
    # The linear branch and the projection are float32 math: exact for float32 inputs, tf32
    # (10 mantissa bits, finer than the bf16/fp16 output) for half-precision inputs.
    return DOT_F32 if q.dtype == torch.float32 else DOT_TF32


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                  config: SLAConfig) -> None:
    where = "lite3r_compile.sla.triton_sla"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be (B, H, N, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"{where}: k and v must be (B, H, Nk, D) matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"{where}: head dim {D} is not supported (supported: {HEAD_DIMS}); "
                         "use the reference implementation for other head dims")
    if q.dtype not in DOT_CODES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{where}: q, k, v must share one dtype among float32, float16, "
                         f"bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{where}: empty sequence (Nq={q.shape[2]}, Nk={k.shape[2]})")
    if tuple(proj_weight.shape) != (D, D):
        raise ValueError(f"{where}: proj_weight must be ({D}, {D}), got {tuple(proj_weight.shape)}")
    if not q.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError(f"{where}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before triton is imported, for CPU tests); got device "
                           f"{q.device}")
