"""GELU fused with rowwise FP8 quantization: the input of an MLP's second FP8 layer.

For ``y`` (M, N), the hidden activations before an MLP's GELU (``fc1``'s output)::

    g     = gelu(y)                      exact (erf) GELU, rounded to y's dtype as F.gelu does
    scale = max(max_j |g_ij|, 1e-12) / 448          (M, 1) float32
    q     = clamp(g / scale, -448, 448) -> e4m3      (M, N)

which is ``quantize_to_e4m3(F.gelu(y), rowwise=True)``, the reference the op runs off CUDA.
Inductor fuses the GELU into the rowwise reduction, but for rows wider than its
persistent-reduction limit (1024; an MLP's hidden width is 4096) as a looped reduction that reads
the row and computes erf twice: 0.173 ms for M = 8 x 1374 on an H200, against 0.055 ms for the
kernel here, which holds a row in registers and reads it once (``benchmarks/fp8_quant.py``;
Inductor's looped form also skips the bf16 rounding of the GELU, so 1.5% of its e4m3 bytes differ
from eager).

The kernel does not call libdevice's erf. With it, the kernel took 0.076-0.078 ms there, like a
plain compiled GELU (0.070 ms), which moves bytes at 60% of the copy rate: erf, two polynomials
and an exponential on either side of a branch that a warp of mixed signs runs both ways, bounds
them, not the bytes; the same kernel without any GELU takes 0.037 ms, the copy rate
(``benchmarks/NOTES.md``, sessions 9 and 16). The kernel writes GELU through the complementary error
function instead, one branch-free polynomial::

    u = |x|,  t = 1 / (1 + 0.45 u)
    erfc(u / sqrt 2) = t * 2^(P(t) - u^2 log2(e) / 2)      P of degree 6, fitted on u in [0, 14]
    h = x erfc(u / sqrt 2) / 2,   gelu(x) = x - h if x >= 0 else h

``P``'s error is under 4.4e-6 in log2, so ``erfc`` is within 3.1e-6 of its value relative to it
in both tails. There eager's float32 ``1 + erf(x)`` cancels: its GELU is off by 0.18% (median)
relative on x in [-6, -3], by 6e-5 at most on [-3, -1]. Rounded to bfloat16 the kernel's GELU
equals the correctly rounded one on 4M samples of 2 N(0, 1); after the rowwise e4m3 rounding
its bytes equal eager's wherever eager's erf kept its digits (99.992% of them on those samples),
and the scales always (``tests/test_gelu_quant.py``). ``gelu_form="erf"`` keeps eager's formula
(``benchmarks/fp8_quant.py`` times both).

``lite3r::gelu_quant_rowwise`` is a ``torch.library`` custom op (a fake implementation for
tracing; CUDA tensors run the Triton kernel, others the PyTorch reference), opaque to Inductor,
which schedules around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lite3r_compile.passes.fp8_qat import AMAX_FLOOR, E4M3, E4M3_MAX

# elements of a program's tile: rows * next_pow2(N); with the fitted erfc, 1 row of 4096 at 4
# warps measured fastest (benchmarks/NOTES.md, session 16)
_TILE = 4096


def gelu_quantize_reference(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of ``y`` (..., N) as the module docstring defines them, in PyTorch."""
    from lite3r_compile.backends.fp8_linear import quantize_to_e4m3

    return quantize_to_e4m3(F.gelu(y), rowwise=True)


GELU_FORMS = ("fitted", "erf", "identity")  # see gelu_quant_kernel.py


def gelu_quantize_triton(y: Tensor, *, rows: int | None = None, num_warps: int | None = None,
                         gelu_form: str = "fitted") -> tuple[Tensor, Tensor]:
    """The Triton kernel on ``y`` (M, N) with unit stride along N: CUDA tensors, or any tensors
    under ``TRITON_INTERPRET=1``. ``rows`` (a power of two) and ``num_warps`` override the tile
    (``benchmarks/fp8_quant.py`` sweeps them). ``gelu_form`` is ``"fitted"`` (the module
    docstring's erfc), ``"erf"`` (eager's formula, libdevice's erf) or ``"identity"`` (no GELU:
    the benchmark's bound, not a GELU)."""
    import triton

    if gelu_form not in GELU_FORMS:
        raise ValueError(f"gelu_quantize_triton: gelu_form={gelu_form!r}; use one of {GELU_FORMS}")

    interpret = bool(triton.knobs.runtime.interpret)
    if not y.is_cuda and not interpret:
        raise ValueError(f"gelu_quantize_triton: a {y.device} tensor needs TRITON_INTERPRET=1; "
                         "call gelu_quant_rowwise, which runs the reference there")
    from lite3r_compile.backends.gelu_quant_kernel import gelu_quant_rows as kernel

    if y.dim() != 2 or y.stride(-1) != 1:
        raise ValueError(f"gelu_quantize_triton: expected a 2-D tensor with unit stride along its rows, "
                         f"got shape {tuple(y.shape)} and strides {y.stride()}")
    M, N = y.shape
    block_n = triton.next_power_of_2(N)
    rows = rows or max(1, _TILE // block_n)
    num_warps = num_warps or 4
    # Triton 3.6's interpreter casts float32 to e4m3 wrongly just below a power of two (7.8 -> 4),
    # so there the kernel stores the float32 quotients and torch rounds them
    q = torch.empty(M, N, device=y.device, dtype=torch.float32 if interpret else E4M3)
    scale = torch.empty(M, 1, device=y.device, dtype=torch.float32)
    kernel[(triton.cdiv(M, rows),)](y, q, scale, M, N, y.stride(0), q.stride(0), FLOOR=AMAX_FLOOR,
                                    FP8_MAX=E4M3_MAX, ROWS=rows, BLOCK_N=block_n, FORM=gelu_form,
                                    num_warps=num_warps)
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


__all__ = ["GELU_FORMS", "gelu_quant_rowwise", "gelu_quantize_reference", "gelu_quantize_triton"]
