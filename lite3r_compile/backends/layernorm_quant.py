"""LayerNorm fused with rowwise FP8 quantization: the input of a block's first FP8 layers.

For ``x`` (M, N), the residual stream before a transformer block's ``norm1`` (-> qkv) or
``norm2`` (-> fc1), with the norm's ``weight`` and ``bias`` (N,) or None::

    y     = layer_norm(x) = (x - mean) * rsqrt(var + eps) * weight + bias
                                     float32, rounded to x's dtype as F.layer_norm does
    scale = max(max_j |y_ij|, 1e-12) / 448          (M, 1) float32
    q     = clamp(y / scale, -448, 448) -> e4m3      (M, N)

which is ``quantize_to_e4m3(F.layer_norm(x, (N,), weight, bias, eps), rowwise=True)`` up to the
order of the mean and variance sums (F.layer_norm's Welford against two passes over registers
here: a last-bit difference in rstd that flips a bf16 rounding now and then). Inductor fuses the
norm, the amax and the quantization into one kernel, but as a looped reduction that reads the
row once per reduction (mean and variance, then the amax of the normalised row, then the
stores): 0.15 ms for M = 32 x 1374, N = 1024 on an H200 in session 8's profile, four times the
floor of one read of 2 bytes and one write of 1 byte an element. The kernel here holds a few
rows in registers and reads each once (``benchmarks/fp8_quant.py --layernorm``).

``lite3r::layernorm_quant_rowwise`` is a ``torch.library`` custom op (a fake implementation for
tracing; CUDA tensors run the Triton kernel, others the PyTorch reference), opaque to Inductor,
which schedules around it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from lite3r_compile.passes.fp8_qat import AMAX_FLOOR, E4M3, E4M3_MAX

# elements of a program's tile: rows * next_pow2(N)
_TILE = 4096


def layernorm_quantize_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                                 eps: float) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of ``x`` (..., N) as the module docstring defines them, in PyTorch."""
    from lite3r_compile.backends.fp8_linear import quantize_to_e4m3

    return quantize_to_e4m3(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), rowwise=True)


@functools.cache
def _kernel(interpret: bool):
    """The kernel, decorated once for the interpreter (``TRITON_INTERPRET=1``) and once for GPUs."""
    import triton
    import triton.language as tl

    @triton.jit
    def layernorm_quant_rows(x_ptr, w_ptr, b_ptr, q_ptr, scale_ptr, M, N, stride_x, stride_q, eps,
                             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FLOOR: tl.constexpr,
                             FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        in_row = cols[None, :] < N
        mask = (rows[:, None] < M) & in_row
        raw = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = raw.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(in_row, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / N + eps)
        y = centred * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        # F.layer_norm returns x's dtype: the quantization sees the rounded values
        y = tl.where(in_row, y.to(raw.dtype).to(tl.float32), 0.0)
        scale = tl.maximum(tl.max(tl.abs(y), axis=1), FLOOR) / FP8_MAX
        q = tl.clamp(y / scale[:, None], -FP8_MAX, FP8_MAX)
        # q_ptr is e4m3, or float32 under the interpreter (see layernorm_quantize_triton)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < M)

    return triton, layernorm_quant_rows


def layernorm_quantize_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                              rows: int | None = None, num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel on ``x`` (M, N) with unit stride along N: CUDA tensors, or any tensors
    under ``TRITON_INTERPRET=1``. ``rows`` (a power of two) and ``num_warps`` override the tile
    (``benchmarks/fp8_quant.py`` sweeps them)."""
    import triton

    interpret = bool(triton.knobs.runtime.interpret)
    if not x.is_cuda and not interpret:
        raise ValueError(f"layernorm_quantize_triton: a {x.device} tensor needs TRITON_INTERPRET=1; "
                         "call layernorm_quant_rowwise, which runs the reference there")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"layernorm_quantize_triton: expected a 2-D tensor with unit stride along its rows, "
                         f"got shape {tuple(x.shape)} and strides {x.stride()}")
    M, N = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f"layernorm_quantize_triton: {name} has shape {tuple(t.shape)}, expected ({N},)")
    _, kernel = _kernel(interpret)
    block_n = triton.next_power_of_2(N)
    rows = rows or max(1, _TILE // block_n)
    num_warps = num_warps or (8 if block_n >= 4096 else 4)
    # Triton 3.6's interpreter casts float32 to e4m3 wrongly just below a power of two (7.8 -> 4),
    # so there the kernel stores the float32 quotients and torch rounds them
    q = torch.empty(M, N, device=x.device, dtype=torch.float32 if interpret else E4M3)
    scale = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    # a dummy pointer where the norm has no weight or bias: the constexpr flags skip its loads
    kernel[(triton.cdiv(M, rows),)](
        x, x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(), q, scale,
        M, N, x.stride(0), q.stride(0), float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        FLOOR=AMAX_FLOOR, FP8_MAX=E4M3_MAX, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return (q.to(E4M3) if interpret else q), scale


@torch.library.custom_op("lite3r::layernorm_quant_rowwise", mutates_args=())
def layernorm_quant_rowwise(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                            eps: float) -> tuple[Tensor, Tensor]:
    """``(q (M, N) e4m3, scale (M, 1) float32)`` for ``x`` (M, N) and the norm's ``weight`` and
    ``bias`` (N,) or None: see the module docstring."""
    return layernorm_quantize_reference(x, weight, bias, eps)


@layernorm_quant_rowwise.register_kernel("cuda")
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return layernorm_quantize_triton(x.contiguous(), weight, bias, eps)


@layernorm_quant_rowwise.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


__all__ = ["layernorm_quant_rowwise", "layernorm_quantize_reference", "layernorm_quantize_triton"]
