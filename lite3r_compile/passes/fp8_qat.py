"""FP8 (e4m3) fake-quantization of the Linear layers of transformer blocks, for QAT.

Each chosen ``nn.Linear`` becomes an :class:`FP8FakeQuantLinear` holding the *same* Parameter
objects under the same names (``weight``, ``bias``), so state-dict keys and storage sharing are
unchanged. Its forward rounds the weight, and by default the input, to e4m3 with absmax scales
and computes ``F.linear`` in high precision on the rounded values; gradients pass straight
through the rounding.

Why not torchao's ``FakeQuantizedLinear`` with ``Float8FakeQuantizeConfig`` (torchao 0.18): its
scale ``amax / 448`` is 0 for an all-zero row, so a zero token or weight row gives 0/0 = NaN in the
forward and in the weight gradient; its scale is not detached (the rounding error leaks into the
gradient through ``amax``); under Inductor on CPU it produced NaN weight gradients in a bf16 test;
and the GPU machine has no torchao. The rounding here is the same arithmetic (``x / (amax/448)``,
clamp to +-448, cast, multiply back), bit for bit on non-zero rows, with a floor on ``amax`` and a
detached scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lite3r_compile.config import (
    GRANULARITIES,
    HEAD_NAME_GLOBS,
    FP8Config,
    LiteConfig,
    ancestor_named,
    matches_any,
    pixel_embedding_of,
)
from lite3r_compile.passes.manager import PassResult

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Floor on absmax: an all-zero row then has a finite scale and rounds to zeros, not 0/0.
AMAX_FLOOR = 1e-12


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the e4m3 grid scaled by ``scale`` (broadcastable to ``x``), in float32.

    Values beyond ``448 * scale`` saturate: the cast alone maps them to NaN on torch 2.11.
    Not differentiable (use :func:`fake_quantize_e4m3` for the straight-through form).
    """
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


def e4m3_scale(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """The absmax scale ``amax / 448`` of ``x`` (detached, float32): one per row (over the last
    dim, shape ``(..., 1)``) if ``rowwise``, else one for the tensor (shape ``()``)."""
    amax = x.detach().float().abs()
    amax = amax.amax(dim=-1, keepdim=True) if rowwise and x.dim() > 0 else amax.amax()
    return amax.clamp(min=AMAX_FLOOR) / E4M3_MAX


def fake_quantize_e4m3(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``x`` rounded to e4m3 with absmax scales, returned in ``x.dtype``; the gradient is the
    identity (straight-through estimator, the scale is a constant).

    ``x + (q - x)`` is exactly ``q`` in float32: ``q`` and ``x`` are within a factor of two of
    each other (or ``q`` is 0), so the difference is exact (Sterbenz).
    """
    x32 = x.float()
    frozen = x32.detach()
    rounding = quantize_e4m3(frozen, e4m3_scale(frozen, rowwise)) - frozen
    return (x32 + rounding).to(x.dtype)


class FP8FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose weight (per output row or per tensor) and input (per token or per
    tensor) are fake-quantized to e4m3 before the matmul. Parameters and state-dict keys are those
    of the Linear it replaces; it has no buffers.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        granularity: str = "rowwise",
        quantize_activations: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"FP8FakeQuantLinear: granularity must be one of {GRANULARITIES}, got {granularity!r}"
            )
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.granularity = granularity
        self.quantize_activations = quantize_activations

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, granularity: str = "rowwise", quantize_activations: bool = True
    ) -> "FP8FakeQuantLinear":
        """A fake-quant Linear holding ``linear``'s own Parameter objects (nothing is copied)."""
        fq = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            granularity=granularity,
            quantize_activations=quantize_activations,
            device="meta",
        )
        fq.weight = linear.weight
        fq.bias = linear.bias
        fq.train(linear.training)
        return fq

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rowwise = self.granularity == "rowwise"
        weight = fake_quantize_e4m3(self.weight, rowwise)
        if self.quantize_activations:
            input = fake_quantize_e4m3(input, rowwise)
        return F.linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        acts = "weight+input" if self.quantize_activations else "weight"
        return f"{super().extra_repr()}, e4m3 {self.granularity} ({acts})"


@dataclass(frozen=True)
class FP8LayerDecision:
    """One Linear layer and whether it is fake-quantized, with the rule that decided (``rule``:
    ``block``, ``no_attention``, ``include``, ``exclude``, ``unaligned``, ``patch_embed``,
    ``head``, ``outside``, ``disabled``, ``subclass``, ``sla``, ``mha``, ``sensitive``) and why
    in words."""

    path: str
    in_features: int
    out_features: int
    quantized: bool
    rule: str
    reason: str


def _first_match(path: str, globs: tuple[str, ...]) -> str:
    return next(g for g in globs if matches_any(path, (g,)))


def transformer_blocks(site_paths: list[str]) -> list[str]:
    """The transformer block of each attention site: its parent module (``blocks.3`` for
    ``blocks.3.attn``; the root ``""`` for a top-level site or the root itself)."""
    return sorted({p.rsplit(".", 1)[0] if "." in p else "" for p in site_paths})


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def plan_fp8(
    module: nn.Module, config: FP8Config, site_paths: list[str], keep: dict[str, str] | None = None
) -> list[FP8LayerDecision]:
    """Decide, for every ``nn.Linear`` in ``module``, whether it gets FP8 fake-quant (rules in
    :class:`~lite3r_compile.config.FP8Config`). ``site_paths``: module paths of the attention
    sites, which locate the transformer blocks. ``keep``: block path -> why, for blocks whose
    Linear layers stay high precision although the ``block`` rule would quantize them (rule
    ``sensitive``; see ``FP8Config.keep_high_precision``)."""
    from lite3r_compile.sla.module import SparseLinearAttention

    blocks = transformer_blocks(site_paths)
    # module path -> (rule, reason) for the Linear layers under it, which are never quantized
    special: dict[str, tuple[str, str]] = {}
    for path, m in module.named_modules():
        if isinstance(m, SparseLinearAttention):
            special[path] = "sla", f"inside SparseLinearAttention {path!r} (trainable, high precision)"
        elif isinstance(m, nn.MultiheadAttention):
            special[path] = "mha", (
                f"packed projection of nn.MultiheadAttention {path!r}, whose forward reads the "
                "weights directly"
            )
    decisions = []
    for path, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        owner = next((p for p in special if path != p and _inside(path, p)), None)
        if owner is not None:
            rule, reason = special[owner]
            decisions.append(FP8LayerDecision(path, m.in_features, m.out_features, False, rule, reason))
            continue
        quantized, rule, reason = _decide(path, m, config, blocks)
        kept = next((b for b in keep or {} if _inside(path, b)), None)
        if rule == "block" and kept is not None:
            quantized, rule, reason = False, "sensitive", keep[kept]
        decisions.append(
            FP8LayerDecision(path, m.in_features, m.out_features, quantized, rule, reason)
        )
    return decisions


def _decide(
    path: str, m: nn.Linear, config: FP8Config, blocks: list[str]
) -> tuple[bool, str, str]:
    if not config.enabled:
        return False, "disabled", "FP8Config.enabled is False"
    if type(m) is not nn.Linear:
        return False, "subclass", f"{type(m).__qualname__} subclasses nn.Linear with its own forward"
    if matches_any(path, config.exclude):
        return False, "exclude", f"FP8Config.exclude {_first_match(path, config.exclude)!r}"
    n = config.multiple_of
    if m.in_features % n or m.out_features % n:
        return False, "unaligned", (
            f"in/out features {m.in_features}/{m.out_features} not multiples of {n}"
        )
    if matches_any(path, config.include):
        return True, "include", f"FP8Config.include {_first_match(path, config.include)!r}"
    block = next((b for b in blocks if _inside(path, b)), None)
    patch_embed = pixel_embedding_of(path, block) if config.skip_patch_embed else None
    if patch_embed is not None:
        return False, "patch_embed", (
            f"under patch embedding {patch_embed!r} (FP8Config.skip_patch_embed)"
        )
    head = ancestor_named(path, HEAD_NAME_GLOBS) if config.skip_heads else None
    if head is not None:
        return False, "head", f"under head {head!r} (FP8Config.skip_heads)"
    if not blocks:
        return True, "no_attention", "no attention in the model: every Linear outside heads"
    if block is None:
        return False, "outside", "outside every transformer block"
    return True, "block", f"in transformer block {block!r}"


def _replace(module: nn.Module, paths: set[str], config: FP8Config) -> None:
    """Swap the Linear at each of ``paths`` (and every other path holding the same module) for an
    :class:`FP8FakeQuantLinear` sharing its Parameters."""
    replacement: dict[int, FP8FakeQuantLinear] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        if path in paths and id(m) not in replacement:
            replacement[id(m)] = FP8FakeQuantLinear.from_linear(
                m, granularity=config.granularity, quantize_activations=config.quantize_activations
            )
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, name, replacement[id(child)])


def sensitive_blocks(module: nn.Module, config: FP8Config, sites: list, example_inputs: Any) -> dict[str, str]:
    """Block path -> reason, for the ``config.keep_high_precision`` most FP8-sensitive blocks of
    ``module`` measured on ``example_inputs`` (:func:`lite3r_compile.sensitivity.fp8_sensitivity`)."""
    from lite3r_compile.sensitivity import fp8_sensitivity, most_sensitive

    if not config.enabled or config.keep_high_precision == 0:
        return {}
    measured = fp8_sensitivity(module, example_inputs, config=config, sites=sites)
    chosen = most_sensitive(measured, config.keep_high_precision)
    n = config.keep_high_precision
    return {
        b.block: f"among the {n} most FP8-sensitive blocks (output change {b.relative_change:.3g} "
                 f"when only it is FP8; FP8Config.keep_high_precision)"
        for b in chosen
    }


def fp8_qat(module: nn.Module, config: LiteConfig, sites: list, example_inputs: Any = None) -> PassResult:
    """Pass: fake-quantize the Linear layers that :func:`plan_fp8` picks, in place.

    With ``FP8Config.keep_high_precision`` the sensitivity of each block is measured on
    ``module`` as it stands (after the SLA rewrite) with ``example_inputs`` first.
    Provides ``fp8_layers``: the list of :class:`FP8LayerDecision`, one per Linear layer.
    """
    keep = sensitive_blocks(module, config.fp8, sites, example_inputs)
    decisions = plan_fp8(module, config.fp8, [s.path for s in sites], keep)
    _replace(module, {d.path for d in decisions if d.quantized}, config.fp8)
    result = PassResult("fp8_qat", {"fp8_layers": decisions})
    if keep:
        result.notes.append(
            f"FP8: the {len(keep)} most FP8-sensitive transformer block(s) stay high precision: "
            + ", ".join(repr(b) for b in keep)
        )
    n_quantized = sum(d.quantized for d in decisions)
    unaligned = [d.path for d in decisions if d.rule == "unaligned"]
    if config.fp8.enabled and not n_quantized:
        result.notes.append("FP8: no Linear layer was fake-quantized")
    if unaligned:
        result.notes.append(
            f"FP8: {len(unaligned)} Linear layer(s) stay high precision because their dims are "
            f"not multiples of {config.fp8.multiple_of}, e.g. {unaligned[0]!r}"
        )
    return result
