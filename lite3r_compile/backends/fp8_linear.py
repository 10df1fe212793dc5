"""The deployment form of an FP8 fake-quantized Linear: float8 weights, real FP8 GEMMs.

``Float8Linear`` stores its weight as ``float8_e4m3fn`` (one byte a parameter) with float32
absmax scales, one per output row (``rowwise``) or one for the tensor (``tensorwise``). Its input
is quantized on the fly with the same recipe, and the product runs as

    y = (x_q @ w_q^T) * s_x * s_w^T + b          x_q = sat(x / s_x),  w_q = sat(w / s_w)

through ``torch._scaled_mm`` on GPUs with FP8 tensor cores (compute capability >= 8.9). Elsewhere
the same rounded operands are multiplied in float32 (emulation), so a CPU gives the numbers an
H100 gives up to accumulation order. The quantization of ``x`` is written as plain tensor ops, so
under ``torch.compile`` Inductor fuses it into the kernel that produces ``x`` (LayerNorm, GELU,
residual add) instead of spending a separate pass over memory. The exception is an MLP's
second layer, whose input is a GELU over a row too wide for Inductor's fused reduction to run at
bandwidth: there the layer takes the GELU's input and quantizes it through one hand-written
kernel (``input_gelu``; :mod:`lite3r_compile.backends.gelu_quant`). Likewise a block's
LayerNorm before qkv or fc1, which Inductor fuses as a looped reduction reading the row three
times: the layer takes the norm's input and runs norm and quantization in one kernel
(``input_norm``; :mod:`lite3r_compile.backends.layernorm_quant`).

The rounding is :mod:`lite3r_compile.passes.fp8_qat`'s, bit for bit: the deployed student computes
what the fake-quant student was trained to compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite3r_compile.backends.gelu_quant import gelu_quant_rowwise
from lite3r_compile.backends.layernorm_quant import layernorm_quant_rowwise
from lite3r_compile.passes.fp8_qat import E4M3, E4M3_MAX, FP8FakeQuantLinear, e4m3_scale

GRANULARITIES = ("rowwise", "tensorwise")


def has_fp8_gemm(device: torch.device | str) -> bool:
    """Whether ``device`` runs ``torch._scaled_mm`` (a CUDA GPU of compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_to_e4m3(x: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """``(x_q, scale)``: ``x`` as float8 e4m3 (saturating) and its float32 absmax scale, one per
    row ((..., 1)) or one for the tensor (())."""
    scale = e4m3_scale(x, rowwise)
    # clamp before the cast: on torch 2.11 the cast alone turns out-of-range values into NaN
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def float8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, granularity: str,
    input_gelu: bool = False, input_norm: tuple[Tensor | None, Tensor | None, float] | None = None,
) -> Tensor:
    """``x (..., in) -> (..., out)`` with ``x`` quantized on the fly and a pre-quantized weight:
    ``weight`` (out, in) float8 e4m3, ``weight_scale`` (out, 1) rowwise or () tensorwise, ``bias``
    (out,) or None. Real FP8 GEMM where :func:`has_fp8_gemm`, float32 emulation of the same
    rounded operands elsewhere; the output has ``x``'s dtype. Rowwise only, the layer first
    computes ``gelu(x)`` (``input_gelu``) or ``F.layer_norm(x, (in,), w, b, eps)`` (``input_norm
    = (w, b, eps)``), fused into the quantization (``lite3r::gelu_quant_rowwise``,
    ``lite3r::layernorm_quant_rowwise``); under autocast the norm runs unfused, in the dtype
    autocast gives it."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"float8_linear: input has {x.shape[-1]} features, expected {in_features}")
    rowwise = granularity == "rowwise"
    lead = x.shape[:-1]
    if input_norm is not None and torch.is_autocast_enabled(x.device.type):
        # autocast picks layer_norm's dtype (float32 on CUDA, not on a CPU): let it, unfused
        x, input_norm = F.layer_norm(x, (in_features,), *input_norm), None
    if (input_gelu or input_norm is not None) and not rowwise:
        raise ValueError("float8_linear: input_gelu and input_norm need rowwise granularity")
    if input_gelu and input_norm is not None:
        raise ValueError("float8_linear: input_gelu and input_norm are exclusive (one producer fuses)")
    if input_gelu:
        x_q, x_scale = gelu_quant_rowwise(x.reshape(-1, in_features))
    elif input_norm is not None:
        x_q, x_scale = layernorm_quant_rowwise(x.reshape(-1, in_features), *input_norm)
    else:
        x_q, x_scale = quantize_to_e4m3(x.reshape(-1, in_features), rowwise)
    if has_fp8_gemm(x.device) and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        # rowwise scaling in cuBLAS needs a bf16 output; other dtypes are cast after
        mm_dtype = torch.bfloat16 if rowwise else x.dtype
        out = torch._scaled_mm(
            x_q,
            weight.t(),  # (in, out), column-major: what cuBLASLt wants for B
            scale_a=x_scale,
            scale_b=weight_scale.t() if rowwise else weight_scale,
            bias=bias.to(mm_dtype) if bias is not None else None,
            out_dtype=mm_dtype,
        ).to(x.dtype)
    else:
        out = F.linear(x_q.float() * x_scale, weight.float() * weight_scale)
        if bias is not None:
            out = out + bias.float()
        out = out.to(x.dtype)
    return out.reshape(*lead, out_features)


class Float8Linear(nn.Module):
    """A Linear layer with float8 e4m3 weights for inference (no gradients).

    Buffers: ``weight`` (out, in) float8_e4m3fn, ``weight_scale`` (out, 1) or () float32, ``bias``
    (out,) in ``dtype`` or absent. Input (..., in) in float32, bfloat16 or float16; output in the
    input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        granularity: str = "rowwise",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"Float8Linear: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Float8Linear: FP8 GEMMs need in_features and out_features divisible by 16, got "
                f"({in_features}, {out_features}); keep this layer in high precision"
            )
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        # set by :func:`~lite3r_compile.backends.fuse_gelu.fuse_gelu_quantization`
        self.input_gelu = False
        # set by :func:`~lite3r_compile.backends.fuse_layernorm.fuse_layernorm_quantization`: the
        # nn.LayerNorm that ran before this layer, now run inside its quantization
        self.input_norm: nn.LayerNorm | None = None
        scale_shape = (out_features, 1) if granularity == "rowwise" else ()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, granularity: str = "rowwise", dtype: torch.dtype | None = None) -> "Float8Linear":
        """Quantize ``linear``'s weight (one byte a parameter); the bias is kept in ``dtype``."""
        dtype = dtype or linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    granularity=granularity, dtype=dtype, device=linear.weight.device)
        layer.quantize_from(linear)
        return layer

    @torch.no_grad()
    def quantize_from(self, linear: nn.Linear) -> None:
        """Overwrite the buffers in place with ``linear``'s weight (quantized) and bias, e.g. after
        its weights changed: the buffers keep their identity, so compiled code stays valid."""
        if (linear.out_features, linear.in_features) != tuple(self.weight.shape):
            raise ValueError(
                f"Float8Linear.quantize_from: Linear is {linear.in_features}->{linear.out_features}, "
                f"this layer {self.in_features}->{self.out_features}"
            )
        if (linear.bias is None) != (self.bias is None):
            raise ValueError("Float8Linear.quantize_from: the Linear and this layer differ in having a bias")
        w_q, w_scale = quantize_to_e4m3(linear.weight, self.granularity == "rowwise")
        self.weight.copy_(w_q)
        self.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            self.bias.copy_(linear.bias)

    @classmethod
    def from_fake_quant(cls, fq: FP8FakeQuantLinear, dtype: torch.dtype | None = None) -> "Float8Linear":
        """The deployed form of a QAT layer, with its granularity."""
        if not fq.quantize_activations:
            raise ValueError(
                "Float8Linear.from_fake_quant: the layer fake-quantizes only its weight; an FP8 GEMM "
                "needs FP8 activations too (train with FP8Config(quantize_activations=True))"
            )
        return cls.from_linear(fq, granularity=fq.granularity, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.input_norm
        return float8_linear(x, self.weight, self.weight_scale, self.bias, self.granularity, self.input_gelu,
                             None if norm is None else (norm.weight, norm.bias, norm.eps))

    def extra_repr(self) -> str:
        fused = ", gelu(input) fused" if self.input_gelu else ", layer_norm(input) fused" if self.input_norm is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 {self.granularity}{fused}"
