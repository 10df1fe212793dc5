"""Freeze every parameter except the trainable set: the ``proj_l`` weight and bias of each
:class:`~lite3r_compile.sla.module.SparseLinearAttention`, plus the parameter names matched by
``LiteConfig.trainable`` globs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lite3r_compile.config import LiteConfig, matches_any
from lite3r_compile.passes.manager import PassResult


@dataclass(frozen=True)
class FreezeSummary:
    """Parameter names left trainable, and element/tensor counts of both sets (tied parameters
    counted once)."""

    trainable: tuple[str, ...]
    trainable_numel: int
    frozen_numel: int
    frozen_tensors: int


def trainable_names(module: nn.Module, config: LiteConfig) -> set[str]:
    """Names of the parameters of ``module`` that stay trainable under ``config``."""
    from lite3r_compile.sla.module import SparseLinearAttention

    names = set()
    for path, m in module.named_modules():
        if isinstance(m, SparseLinearAttention):
            prefix = f"{path}.proj_l." if path else "proj_l."
            names.update(prefix + n for n, _ in m.proj_l.named_parameters())
    for name, _ in module.named_parameters():
        if matches_any(name, config.trainable):
            names.add(name)
    return names


def freeze(module: nn.Module, config: LiteConfig) -> PassResult:
    """Pass: set ``requires_grad`` on every parameter of ``module``, True only for the trainable
    set. Provides ``freeze``: a :class:`FreezeSummary`."""
    keep = trainable_names(module, config)
    trainable, trainable_numel, frozen_numel, frozen_tensors = [], 0, 0, 0
    for name, p in module.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            trainable.append(name)
            trainable_numel += p.numel()
        else:
            frozen_numel += p.numel()
            frozen_tensors += 1
    unmatched = [g for g in config.trainable if not any(matches_any(n, (g,)) for n in trainable)]
    result = PassResult(
        "freeze",
        {"freeze": FreezeSummary(tuple(trainable), trainable_numel, frozen_numel, frozen_tensors)},
    )
    if unmatched:
        result.notes.append(f"freeze: LiteConfig.trainable globs {unmatched} matched no parameter")
    if not trainable:
        result.notes.append("freeze: no parameter is trainable (no SLA site was rewritten)")
    return result
