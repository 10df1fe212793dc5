"""Compute once what a broadcast would make Inductor compute many times.

Inductor inlines a pointwise value into every kernel that reads it instead of writing it to
memory. That is right when each element is read once, and wrong when a consumer *broadcasts* it:
VGGT's 2D RoPE builds ``cos`` and ``sin`` of the angle table, (B, 1, N, D/2), and multiplies them
into q and k, (B, H, N, D/2). Inlined, the fused qk-norm + RoPE kernel evaluates the two
transcendentals, and the position gather and angle product behind them, once per head: H = 16
times the work, which made those kernels run at a third of the memory bandwidth on an H200
(VGGT-1B, S=32: 15 ms of the student's 314; benchmarks/NOTES.md, sessions 10 and 12).

The pass finds each *costly* pointwise node (a transcendental or a power; see
:data:`COSTLY_POINTWISE`) whose value reaches, through pointwise and view ops only, a node with
at least ``min_expansion`` times as many elements, and inserts
``prims.inductor_force_stride_order(x, contiguous strides)`` after it. Inductor lowers that op by
realizing ``x`` into a buffer with those strides: the costly work is done once per element of
``x``, and the broadcasting kernel loads the (small, L2-resident) buffer. The values are unchanged
(the buffer holds ``x`` in its own dtype and logical shape, which is what the inlined code rounds to under
``emulate_precision_casts``), only where they are computed moves.

It runs on the ATen graph Inductor lowers (``torch._inductor.config.post_grad_custom_pre_pass``,
through :class:`RealizeBroadcastsPass`); on any other graph it does nothing useful, since only
Inductor's lowering gives the op its meaning.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lite3r_compile.backends.post_grad import ChainedGraphPass

# Pointwise ops costly enough that evaluating them once per broadcast copy is worth a buffer:
# the transcendentals. Not ``rsqrt`` or ``div``: a normalisation's ``rsqrt(var + eps)`` is broadcast
# over the row it normalises too, and is best left inside the reduction kernel that computes it.
COSTLY_POINTWISE = frozenset({
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "exp", "exp2", "expm1",
    "log", "log2", "log10", "log1p", "pow", "erf", "erfc", "erfinv", "sigmoid",
})


@dataclass(frozen=True)
class RealizeConfig:
    """``min_expansion``: how many times more elements than a costly value a consumer must have
    for the value to get its own buffer (below it, the extra load costs about what it saves)."""

    min_expansion: int = 4

    def __post_init__(self) -> None:
        if self.min_expansion < 2:
            raise ValueError(f"RealizeConfig: min_expansion must be >= 2, got {self.min_expansion}")


@dataclass(frozen=True)
class RealizedValue:
    """One value given a buffer: its node, op, shape (hints where symbolic), the consumer that
    broadcasts it and how many times more elements that consumer has."""

    node: str
    op: str
    shape: tuple[int, ...]
    consumer: str
    expansion: int


def _opname(node: fx.Node) -> str:
    target = node.target
    return target._opname if isinstance(target, torch._ops.OpOverload) else ""


def _passes_through(node: fx.Node) -> bool:
    """Pointwise and view ops, which Inductor fuses into one kernel with their inputs."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tags = target.tags
    return torch.Tag.pointwise in tags or target.is_view or _opname(node) in {"cat", "expand", "clone"}


def _numel(node: fx.Node) -> Any:
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else None


def _broadcasting_consumer(node: fx.Node, min_expansion: int) -> tuple[fx.Node, int] | None:
    """The first node reached from ``node`` through fusible ops whose output has at least
    ``min_expansion`` times ``node``'s elements, with the (hinted) ratio; None if there is none."""
    numel = _numel(node)
    if numel is None:
        return None
    seen: set[fx.Node] = set()
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        if user in seen or user.op != "call_function" or not _passes_through(user):
            continue
        seen.add(user)
        user_numel = _numel(user)
        if user_numel is None:
            continue
        if statically_known_true(user_numel >= min_expansion * numel):
            return user, hint_int(user_numel) // max(hint_int(numel), 1)
        frontier.extend(user.users)
    return None


def hint_int(value: Any) -> int:
    """An int, or a symbolic size's example value (the hint Dynamo traced with; 1 for an
    unbacked size). Used for reports and for a stride *order*, never for a guard."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint if value.node.has_hint() else None
        return int(hint) if hint is not None else 1
    return int(value)


def _hinted(values: Any) -> list[int]:
    return [hint_int(v) for v in values]


def _contiguous_strides(graph: fx.Graph, node: fx.Node, value: torch.Tensor) -> list[Any]:
    """The contiguous strides of ``node``'s value as arguments of a graph node: ints where the
    sizes are static, else products of ``aten.sym_size`` nodes of ``node`` (so that the op also
    means the right thing for any size the graph is called with, not just the traced one)."""
    strides: list[Any] = [1]
    for dim in reversed(range(1, value.dim())):
        stride, size = strides[-1], value.shape[dim]
        if isinstance(size, torch.SymInt):
            size_node = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
            size_node.meta["val"] = size
            size = size_node
        if isinstance(stride, int) and isinstance(size, int):
            strides.append(stride * size)
        elif isinstance(stride, int) and stride == 1:
            strides.append(size)
        else:
            product = graph.call_function(operator.mul, (stride, size))
            product.meta["val"] = _meta(stride) * _meta(size)
            strides.append(product)
    return strides[::-1] if value.dim() else []


def _meta(value: Any) -> Any:
    return value.meta["val"] if isinstance(value, fx.Node) else value


def realize_broadcast_values(gm: fx.GraphModule, config: RealizeConfig = RealizeConfig()) -> list[RealizedValue]:
    """Insert ``prims.inductor_force_stride_order`` after every costly pointwise value that a
    fusible consumer broadcasts ``config.min_expansion``-fold or more. Returns what it realized;
    the graph is changed in place."""
    force = torch.ops.prims.inductor_force_stride_order.default
    realized = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _opname(node) not in COSTLY_POINTWISE:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        if any(user.target is force for user in node.users):
            continue
        found = _broadcasting_consumer(node, config.min_expansion)
        if found is None:
            continue
        consumer, expansion = found
        with gm.graph.inserting_after(node):
            buffer = gm.graph.call_function(force, (node, []))
        node.replace_all_uses_with(buffer, delete_user_cb=lambda user: user is not buffer)
        with gm.graph.inserting_before(buffer):
            buffer.args = (node, _contiguous_strides(gm.graph, node, value))
        buffer.meta["val"] = value
        realized.append(RealizedValue(node.name, _opname(node), tuple(_hinted(value.shape)), consumer.name, expansion))
    if realized:
        gm.graph.lint()
        gm.recompile()
    return realized


class RealizeBroadcastsPass(ChainedGraphPass):
    """:func:`realize_broadcast_values` as an Inductor post-grad pass; ``on_realize`` receives each
    graph's list."""

    def __init__(self, config: RealizeConfig = RealizeConfig(),
                 on_realize: Callable[[list[RealizedValue]], None] | None = None, after: Any = None) -> None:
        super().__init__(after, source=__file__, key=repr(config))
        self.config = config
        self.on_realize = on_realize

    def run(self, graph: fx.Graph) -> None:
        realized = realize_broadcast_values(graph.owning_module, self.config)
        if self.on_realize is not None:
            self.on_realize(realized)


__all__ = ["COSTLY_POINTWISE", "RealizeBroadcastsPass", "RealizeConfig", "RealizedValue", "realize_broadcast_values"]
