"""GELU fused with rowwise FP8 quantization: the input of an MLP's second FP8 layer.

For ``y`` (M, N), the hidden activations before an MLP's GELU (``fc1``'s output)::

    g     = gelu(y)                      exact (erf) GELU, rounded to y's dtype as F.gelu does
    scale = max(max_j |g_ij|, 1e-12) / 448          (M, 1) float32
    q     = clamp(g / scale, -448, 448) -> e4m3      (M, N)

which is ``quantize_to_e4m3(F.gelu(y), rowwise=True)`` to the bit. Inductor fuses the GELU into
the rowwise reduction, but for rows wider than its persistent-reduction limit (1024; an MLP's
hidden width is 4096) as a looped reduction that reads the row and computes erf twice: 0.173 ms
for M = 8 x 1374 on an H200, against 0.078 ms for the kernel here, which holds a few rows in
registers, reads each once and computes erf once (``benchmarks/fp8_quant.py``; its looped
form also skips the bf16 rounding of the GELU, so 1.5% of its e4m3 bytes differ from eager).

``lite3r::gelu_quant_rowwise`` is a ``torch.library`` custom op (a fake implementation for
tracing; CUDA tensors run the Triton kernel, others the PyTorch reference), opaque to Inductor,
which schedules around it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from lite3r_compile.passes.fp8_qat import AMAX_FLOOR, E4M3, E4M3_MAX

# elements of a program's tile: rows * next_pow2(N); 2 rows of 4096 at 8 warps measured fastest
_TILE = 8192


def gelu_quantize_reference(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of ``y`` (..., N) as the module docstring defines them, in PyTorch."""
    from lite3r_compile.backends.fp8_linear import quantize_to_e4m3

    return quantize_to_e4m3(F.gelu(y), rowwise=True)


@functools.cache
def _kernel(interpret: bool):
    """The kernel, decorated once for the interpreter (``TRITON_INTERPRET=1``) and once for GPUs."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quant_rows(y_ptr, q_ptr, scale_ptr, M, N, stride_y, stride_q,
                        FLOOR: tl.constexpr, FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        x = y.to(tl.float32)
        g = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(y.dtype).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(g), axis=1), FLOOR) / FP8_MAX
        q = tl.clamp(g / scale[:, None], -FP8_MAX, FP8_MAX)
        # q_ptr is e4m3, or float32 under the interpreter (see gelu_quantize_triton)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < M)

    return triton, gelu_quant_rows


def gelu_quantize_triton(y: Tensor, *, rows: int | None = None,
                         num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel on ``y`` (M, N) with unit stride along N: CUDA tensors, or any tensors
    under ``TRITON_INTERPRET=1``. ``rows`` (a power of two) and ``num_warps`` override the tile
    (``benchmarks/fp8_quant.py`` sweeps them)."""
    import triton

    interpret = bool(triton.knobs.runtime.interpret)
    if not y.is_cuda and not interpret:
        raise ValueError(f"gelu_quantize_triton: a {y.device} tensor needs TRITON_INTERPRET=1; "
                         "call gelu_quant_rowwise, which runs the reference there")
    _, kernel = _kernel(interpret)
    if y.dim() != 2 or y.stride(-1) != 1:
        raise ValueError(f"gelu_quantize_triton: expected a 2-D tensor with unit stride along its rows, "
                         f"got shape {tuple(y.shape)} and strides {y.stride()}")
    M, N = y.shape
    block_n = triton.next_power_of_2(N)
    rows = rows or max(1, _TILE // block_n)
    num_warps = num_warps or (8 if block_n >= 2048 else 4)
    # Triton 3.6's interpreter casts float32 to e4m3 wrongly just below a power of two (7.8 -> 4),
    # so there the kernel stores the float32 quotients and torch rounds them
    q = torch.empty(M, N, device=y.device, dtype=torch.float32 if interpret else E4M3)
    scale = torch.empty(M, 1, device=y.device, dtype=torch.float32)
    kernel[(triton.cdiv(M, rows),)](y, q, scale, M, N, y.stride(0), q.stride(0), FLOOR=AMAX_FLOOR,
                                    FP8_MAX=E4M3_MAX, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return (q.to(E4M3) if interpret else q), scale


@torch.library.custom_op("lite3r::gelu_quant_rowwise", mutates_args=())
def gelu_quant_rowwise(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(q (M, N) e4m3, scale (M, 1) float32)`` for ``y`` (M, N): see the module docstring."""
    return gelu_quantize_reference(y)


@gelu_quant_rowwise.register_kernel("cuda")
def _(y: Tensor) -> tuple[Tensor, Tensor]:
    return gelu_quantize_triton(y.contiguous())


@gelu_quant_rowwise.register_fake
def _(y: Tensor) -> tuple[Tensor, Tensor]:
    return y.new_empty(y.shape, dtype=E4M3), y.new_empty((*y.shape[:-1], 1), dtype=torch.float32)


__all__ = ["gelu_quant_rowwise", "gelu_quantize_reference", "gelu_quantize_triton"]
