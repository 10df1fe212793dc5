"""Layer-wise FP8 sensitivity: how much a model's output moves when one transformer block's
Linear layers are fake-quantized to e4m3 and everything else stays in high precision.

For each block ``b`` (the parent module of an attention site, as :mod:`lite3r_compile.passes.fp8_qat`
defines it) holding Linear layers that the FP8 plan would quantize::

    change(b) = mean over output tensors y of  ||y_b - y||_2 / ||y||_2

where ``y`` is the model's output in high precision and ``y_b`` its output with only block ``b``'s
Linear layers rounded to e4m3 (weights, and inputs where ``FP8Config.quantize_activations``).
Output tensors are the floating-point leaves of the model's output pytree, except leaves that are
the inputs themselves (VGGT returns its images in eval mode).

:func:`fp8_sensitivity` measures every block; ``FP8Config.keep_high_precision = n`` makes
:func:`lite3r_compile.lite` keep the ``n`` most sensitive blocks in high precision.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lite3r_compile.config import FP8Config


@dataclass(frozen=True)
class BlockSensitivity:
    """One transformer block: its module path, the scope of its attention (``frame``,
    ``global``, ``cross``, ``self``; ``"+"``-joined when it holds sites of several scopes), the
    Linear layers FP8 would quantize in it, and the relative output change when only they are."""

    block: str
    scope: str
    layers: tuple[str, ...]
    relative_change: float


def _site_paths_and_scopes(model: nn.Module, example_inputs: Any, sites: Sequence[Any] | None) -> list[tuple[str, str]]:
    if sites is None:
        from lite3r_compile.passes.attention import find_attention

        sites = find_attention(model, example_inputs)
    return [(s.path, s.scope) for s in sites]


def quantized_layers_by_block(model: nn.Module, config: FP8Config, sites: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Block path -> the Linear layers :func:`~lite3r_compile.passes.fp8_qat.plan_fp8` quantizes
    in it by the ``block`` rule, for blocks holding at least one; in module order."""
    from lite3r_compile.passes.fp8_qat import plan_fp8, transformer_blocks

    blocks = transformer_blocks([p for p, _ in sites])
    by_block: dict[str, list[str]] = {}
    for d in plan_fp8(model, config, [p for p, _ in sites]):
        if d.quantized and d.rule == "block":
            block = max((b for b in blocks if b == "" or d.path.startswith(b + ".")), key=len)
            by_block.setdefault(block, []).append(d.path)
    return by_block


@contextmanager
def _fake_quantized(model: nn.Module, paths: Sequence[str], config: FP8Config) -> Iterator[None]:
    """Run the Linear layers at ``paths`` with FP8 fake-quant until exit; the model's modules
    are not replaced (their ``forward`` is shadowed on the instance, then restored)."""
    from lite3r_compile.passes.fp8_qat import fake_quantize_e4m3

    rowwise = config.granularity == "rowwise"
    patched = []
    try:
        for path in paths:
            linear = model.get_submodule(path)

            def forward(x: Tensor, _m: nn.Linear = linear) -> Tensor:
                w = fake_quantize_e4m3(_m.weight, rowwise)
                if config.quantize_activations:
                    x = fake_quantize_e4m3(x, rowwise)
                return F.linear(x, w, _m.bias)

            linear.forward = forward
            patched.append(linear)
        yield
    finally:
        for linear in patched:
            del linear.forward


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _output_leaves(output: Any, inputs: Sequence[Any]) -> list[Tensor]:
    input_ids = {id(t) for t in tree_flatten(list(inputs))[0] if isinstance(t, Tensor)}
    return [
        t for t in tree_flatten(output)[0]
        if isinstance(t, Tensor) and t.is_floating_point() and id(t) not in input_ids
    ]


def relative_change(reference: Sequence[Tensor], changed: Sequence[Tensor]) -> float:
    """Mean over paired tensors of ``||changed - reference|| / ||reference||`` (a zero reference
    counts its absolute change); ``inf`` where the changed output is not finite."""
    if len(reference) != len(changed) or not reference:
        raise ValueError(f"relative_change: need equally many tensors (>= 1), got {len(reference)} and {len(changed)}")
    total = 0.0
    for r, c in zip(reference, changed):
        r, c = r.detach().double(), c.detach().double()
        if not torch.isfinite(c).all():
            return math.inf
        norm = r.norm().item()
        diff = (c - r).norm().item()
        total += diff / norm if norm > 0 else diff
    return total / len(reference)


@torch.no_grad()
def fp8_sensitivity(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: FP8Config | None = None,
    sites: Sequence[Any] | None = None,
) -> list[BlockSensitivity]:
    """The FP8 sensitivity of every transformer block of ``model``, in module order.

    ``example_inputs``: a positional tuple, one tensor or a kwargs dict for ``model``'s forward
    (``None``: ``model.example_inputs()``); use representative inputs, the ranking depends on them.
    ``config``: which Linear layers FP8 would quantize (default :class:`FP8Config`); only those of
    the ``block`` rule are measured. ``sites``: the attention sites (objects with ``path`` and
    ``scope``, as :func:`lite3r_compile.find_attention` returns); found on ``model`` if ``None``.
    The model runs in eval mode, one forward for the reference and one per block; its modules
    and training flags are left as they were.
    """
    from lite3r_compile.capture import normalize_example_inputs

    config = config or FP8Config()
    args, kwargs = normalize_example_inputs(model, example_inputs)
    pairs = _site_paths_and_scopes(model, example_inputs, sites)
    by_block = quantized_layers_by_block(model, config, pairs)
    scopes: dict[str, list[str]] = {}
    for path, scope in pairs:
        block = path.rsplit(".", 1)[0] if "." in path else ""
        if scope not in scopes.setdefault(block, []):
            scopes[block].append(scope)

    results = []
    with _eval_mode(model):
        reference = _output_leaves(model(*args, **kwargs), (args, kwargs))
        if not reference:
            raise ValueError(
                f"fp8_sensitivity: {type(model).__name__} returned no floating-point tensor besides its "
                "inputs; there is nothing to compare"
            )
        for block, layers in by_block.items():
            with _fake_quantized(model, layers, config):
                changed = _output_leaves(model(*args, **kwargs), (args, kwargs))
            results.append(
                BlockSensitivity(block, "+".join(scopes.get(block, ["?"])), tuple(layers), relative_change(reference, changed))
            )
    return results


def most_sensitive(results: Sequence[BlockSensitivity], count: int) -> list[BlockSensitivity]:
    """The ``count`` blocks with the largest relative change, largest first (ties: module order).
    Raises ``ValueError`` when ``count`` exceeds the number of measured blocks."""
    if count < 0:
        raise ValueError(f"most_sensitive: count must be >= 0, got {count}")
    if count > len(results):
        raise ValueError(
            f"cannot keep {count} transformer blocks in high precision: only {len(results)} block(s) have "
            f"Linear layers that FP8 quantizes ({', '.join(repr(r.block) for r in results) or 'none'}); "
            f"lower FP8Config.keep_high_precision to at most {len(results)}"
        )
    order = sorted(range(len(results)), key=lambda i: (-results[i].relative_change, i))
    return [results[i] for i in order[:count]]


def block_globs(blocks: Sequence[BlockSensitivity | str]) -> tuple[str, ...]:
    """``FP8Config.exclude`` globs that keep exactly these blocks' Linear layers in high
    precision (``FP8Config(exclude=block_globs(most_sensitive(results, 2)))``)."""
    paths = [b.block if isinstance(b, BlockSensitivity) else b for b in blocks]
    return tuple("*" if p == "" else f"{p}.*" for p in paths)


__all__ = ["BlockSensitivity", "block_globs", "fp8_sensitivity", "most_sensitive", "quantized_layers_by_block", "relative_change"]
