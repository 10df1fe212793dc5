"""The Triton kernel of :mod:`lite3r_compile.backends.gelu_quant` and its branch-free GELU.

Kept apart because ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined (as for
:mod:`lite3r_compile.sla.triton_sla`): this module is imported only when a kernel runs, so
importing the op does not need Triton. Module-level functions, because the interpreter resolves
the names a kernel calls among the module's globals, not a closure's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_fitted(x):
    """GELU of float32 ``x`` through the fitted erfc of ``gelu_quant``'s docstring:
    ``t = 1 / (1 + 0.45 |x|)``, ``erfc(|x| / sqrt 2) = t 2^(P(t) - x^2 log2(e) / 2)``."""
    u = tl.abs(x)
    t = 1.0 / (1.0 + 0.45 * u)
    p = -0.3101082742214203 * t + 1.210431456565857
    p = p * t - 1.5714600086212158
    p = p * t + 0.3629325330257416
    p = p * t + 0.33398255705833435
    p = p * t + 1.4523427486419678
    p = p * t - 1.4781254529953003
    h = 0.5 * x * (t * tl.math.exp2(p - (u * u) * 0.7213475204444817))  # log2(e) / 2
    return tl.where(x >= 0, x - h, h)


@triton.jit
def gelu_quant_rows(y_ptr, q_ptr, scale_ptr, M, N, stride_y, stride_q, FLOOR: tl.constexpr,
                    FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FORM: tl.constexpr):
    """``ROWS`` rows of ``y`` a program, each loaded once: GELU in ``FORM`` (``"fitted"``,
    ``"erf"``, or ``"identity"``: no GELU, the benchmark's bound on what a cheaper one can
    save), rounded to y's dtype, the row's amax scale, and the e4m3 quotients."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
    x = y.to(tl.float32)
    if FORM == "fitted":
        g = gelu_fitted(x)
    elif FORM == "erf":
        g = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        g = x
    g = g.to(y.dtype).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(g), axis=1), FLOOR) / FP8_MAX
    # one division a row, then products: the quotient moves by at most an ulp of float32, which
    # the rounding to 3 mantissa bits below almost never sees
    inv_scale = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), scale)
    q = tl.clamp(g * inv_scale[:, None], -FP8_MAX, FP8_MAX)
    # q_ptr is e4m3, or float32 under the interpreter (see gelu_quantize_triton)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
