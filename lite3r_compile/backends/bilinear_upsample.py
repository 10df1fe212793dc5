"""Bilinear resizing of channels-last maps in one Triton kernel: ``lite3r::upsample_bilinear2d``.

For ``x`` (N, C, H, W) and an output size (OH, OW), output pixel (oh, ow) reads the four input
pixels around the source point (h, w), the same for every channel::

    h = oh * (H - 1) / (OH - 1)                          align_corners=True (0 when OH == 1)
    h = max((oh + 0.5) * r_h - 0.5, 0)                   align_corners=False; r_h = 1 / scale_h
                                                         when a scale is given, else H / OH
    h0 = floor(h), h1 = min(h0 + 1, H - 1), a = h - h0   (w, w0, w1, b likewise along W)
    y[n, c, oh, ow] = (1 - a) * ((1 - b) * x[h0, w0] + b * x[h0, w1])
                      +     a * ((1 - b) * x[h1, w0] + b * x[h1, w1])

in float32, rounded once to x's dtype: ``F.interpolate(x, mode="bilinear")``'s CUDA arithmetic.

Why a kernel of our own: Inductor decomposes ``upsample_bilinear2d`` into four gathers per output
element and fuses them with whatever produced ``x``, which in the DPT heads of VGGT and DA3 is a
convolution's bias, a residual add and a ReLU, so every output element recomputes that chain at
four corners, from two tensors. In VGGT-1B's heads at 518 x 518 those kernels took 2.1 and 1.2 ms
for the two heads' 8-frame chunks, 0.5-1 TB/s. Here a program owns one output row, a strip of
columns and a block of channels; with channels innermost in memory (channels-last, as Inductor
lays out convolution outputs) each corner is a contiguous vector load, and the chain that produced
``x`` is computed once, by Inductor, into a buffer of the input's size, a quarter of the output's.
Routed, the heads' elementwise time fell from 6.4 to 3.9 ms at S=8. In isolation the picture is
different: on a plain ``a + b`` before the resize, Inductor's fused kernel reaches 2.2-2.4 TB/s
and this kernel 2.6-2.8 TB/s, so the routed pair (add, then resize) is no faster there
(``benchmarks/upsample.py``; both in ``benchmarks/NOTES.md``, sessions 12-13).

The output is channels-last when x is (:func:`is_channels_last`), else contiguous, on every
device. Off CUDA the op runs ``F.interpolate``; its gradient is ATen's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# elements of a program's tile (columns x channels)
_TILE = 4096


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) is laid out channels-last: then the op's output is too. (A map
    with one channel, or of one pixel, can be both channels-last and contiguous; it counts as
    channels-last, in the fake and the real op alike.)"""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _empty_output(x: Tensor, size: Sequence[int]) -> Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], *size), dtype=x.dtype, device=x.device, memory_format=fmt)


def source_ratio(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> float:
    """The factor from an output index to its source coordinate along one axis (see the module
    docstring); ATen's ``area_pixel_compute_scale``."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else in_size / out_size


def upsample_bilinear_reference(x: Tensor, size: Sequence[int], align_corners: bool,
                                scale_h: float | None = None, scale_w: float | None = None) -> Tensor:
    """The op in PyTorch (ATen's kernel), with the output in x's memory format."""
    y = torch.ops.aten.upsample_bilinear2d.default(x, list(size), align_corners, scale_h, scale_w)
    return y.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


@functools.cache
def _kernel(interpret: bool):
    """The kernel, decorated once for the interpreter (``TRITON_INTERPRET=1``) and once for GPUs."""
    import triton
    import triton.language as tl

    @triton.jit
    def bilinear_rows(x_ptr, y_ptr, C, H, W, OH, OW, ratio_h, ratio_w,
                      sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                      ALIGN_CORNERS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0)  # n * OH + oh
        n = (row // OH).to(tl.int64)
        oh = row % OH
        ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        if ALIGN_CORNERS:
            h = oh.to(tl.float32) * ratio_h
            w = ow.to(tl.float32) * ratio_w
        else:
            h = tl.maximum((oh.to(tl.float32) + 0.5) * ratio_h - 0.5, 0.0)
            w = tl.maximum((ow.to(tl.float32) + 0.5) * ratio_w - 0.5, 0.0)
        h0 = h.to(tl.int32)
        w0 = w.to(tl.int32)
        a = h - h0.to(tl.float32)
        b = w - w0.to(tl.float32)
        h1 = tl.minimum(h0 + 1, H - 1)
        w1 = tl.minimum(w0 + 1, W - 1)
        mask = (ow < OW)[:, None] & (c < C)[None, :]
        plane = x_ptr + n * sxn + c[None, :] * sxc
        top = plane + h0 * sxh
        bottom = plane + h1 * sxh
        left = (w0 * sxw)[:, None]
        right = (w1 * sxw)[:, None]
        x00 = tl.load(top + left, mask=mask, other=0.0).to(tl.float32)
        x01 = tl.load(top + right, mask=mask, other=0.0).to(tl.float32)
        x10 = tl.load(bottom + left, mask=mask, other=0.0).to(tl.float32)
        x11 = tl.load(bottom + right, mask=mask, other=0.0).to(tl.float32)
        b = b[:, None]
        y = (1.0 - a) * ((1.0 - b) * x00 + b * x01) + a * ((1.0 - b) * x10 + b * x11)
        out = y_ptr + n * syn + oh * syh + ow[:, None] * syw + c[None, :] * syc
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)

    return triton, bilinear_rows


def upsample_bilinear_triton(x: Tensor, size: Sequence[int], align_corners: bool,
                             scale_h: float | None = None, scale_w: float | None = None, *,
                             block_c: int | None = None, num_warps: int = 4) -> Tensor:
    """The Triton kernel on ``x`` (N, C, H, W), any strides: CUDA tensors, or any tensors under
    ``TRITON_INTERPRET=1``. ``block_c`` and ``num_warps`` override the tile (the benchmark sweeps
    them)."""
    import triton

    interpret = bool(triton.knobs.runtime.interpret)
    if not x.is_cuda and not interpret:
        raise ValueError(f"upsample_bilinear_triton: a {x.device} tensor needs TRITON_INTERPRET=1; "
                         "call lite3r::upsample_bilinear2d, which runs F.interpolate there")
    if x.dim() != 4 or len(size) != 2 or min(size) < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"upsample_bilinear_triton: expected x (N, C, H, W) with H, W >= 1 and a size "
                         f"(OH, OW) >= 1, got x {tuple(x.shape)} and size {tuple(size)}")
    if not x.is_floating_point():
        raise ValueError(f"upsample_bilinear_triton: x must be floating point, got {x.dtype}")
    N, C, H, W = x.shape
    OH, OW = int(size[0]), int(size[1])
    y = _empty_output(x, (OH, OW))
    if y.numel() == 0:
        return y
    if max(H * W * C, OH * OW * C) >= 2**31:
        raise ValueError(f"upsample_bilinear_triton: one image of {C} x {OH} x {OW} elements is too large "
                         "for 32-bit offsets; resize fewer channels at a time")
    _, kernel = _kernel(interpret)
    block_c = block_c or min(triton.next_power_of_2(C), 128)
    block_w = max(1, min(triton.next_power_of_2(OW), _TILE // block_c))
    grid = (N * OH, triton.cdiv(OW, block_w), triton.cdiv(C, block_c))
    kernel[grid](x, y, C, H, W, OH, OW,
                 source_ratio(H, OH, align_corners, scale_h), source_ratio(W, OW, align_corners, scale_w),
                 *x.stride(), *y.stride(), ALIGN_CORNERS=align_corners, BLOCK_W=block_w, BLOCK_C=block_c,
                 num_warps=num_warps)
    return y


@torch.library.custom_op("lite3r::upsample_bilinear2d", mutates_args=())
def upsample_bilinear2d(x: Tensor, size: Sequence[int], align_corners: bool,
                        scale_h: float | None = None, scale_w: float | None = None) -> Tensor:
    """``x`` (N, C, H, W) resized bilinearly to ``size`` (OH, OW), in x's memory format: see the
    module docstring. ``scale_h``/``scale_w``: the scale factors ``F.interpolate`` was given
    (they place the source points when ``align_corners`` is False), or None."""
    return upsample_bilinear_reference(x, size, align_corners, scale_h, scale_w)


@upsample_bilinear2d.register_kernel("cuda")
def _(x: Tensor, size: Sequence[int], align_corners: bool, scale_h: float | None = None,
      scale_w: float | None = None) -> Tensor:
    return upsample_bilinear_triton(x, size, align_corners, scale_h, scale_w)


@upsample_bilinear2d.register_fake
def _(x: Tensor, size: Sequence[int], align_corners: bool, scale_h: float | None = None,
      scale_w: float | None = None) -> Tensor:
    return _empty_output(x, size)


def _setup_context(ctx, inputs, output) -> None:
    x, size, align_corners, scale_h, scale_w = inputs
    ctx.input_size = list(x.shape)
    ctx.args = (list(size), align_corners, scale_h, scale_w)


def _backward(ctx, grad: Tensor):
    size, align_corners, scale_h, scale_w = ctx.args
    dx = torch.ops.aten.upsample_bilinear2d_backward.default(
        grad, size, ctx.input_size, align_corners, scale_h, scale_w)
    return dx, None, None, None, None


upsample_bilinear2d.register_autograd(_backward, setup_context=_setup_context)


def interpolate_bilinear(x: Tensor, size: int | Sequence[int] | None = None,
                         scale_factor: float | Sequence[float] | None = None, align_corners: bool | None = None,
                         recompute_scale_factor: bool | None = None) -> Tensor:
    """``F.interpolate(x, size, scale_factor, mode="bilinear", align_corners, ...)`` of a 4-D ``x``
    through :func:`upsample_bilinear2d`, in channels-last: the output sizes and scales as
    ``F.interpolate`` computes them (``align_corners=None`` is False)."""
    if x.dim() != 4:
        raise ValueError(f"interpolate_bilinear: expected a 4-D input (N, C, H, W), got {x.dim()}-D")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate_bilinear: give exactly one of size and scale_factor")
    if size is not None:
        out = [size, size] if not isinstance(size, (list, tuple)) else list(size)
        scales: list[float | None] = [None, None]
    else:
        factors = [scale_factor, scale_factor] if not isinstance(scale_factor, (list, tuple)) else list(scale_factor)
        # F.interpolate: floor(in * scale); the scales place the source points unless recomputed
        out = [torch.sym_int(x.shape[i + 2] * float(f)) for i, f in enumerate(factors)]
        scales = [None, None] if recompute_scale_factor else [float(f) for f in factors]
    if len(out) != 2:
        raise ValueError(f"interpolate_bilinear: size must have 2 entries for a 4-D input, got {out}")
    x = x.contiguous(memory_format=torch.channels_last)
    return upsample_bilinear2d(x, out, bool(align_corners), scales[0], scales[1])


__all__ = ["interpolate_bilinear", "is_channels_last", "source_ratio", "upsample_bilinear2d",
           "upsample_bilinear_reference", "upsample_bilinear_triton"]
