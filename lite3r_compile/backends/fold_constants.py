"""Fold the input-independent computations of an FX graph into constants of the graph.

Models rebuild tensors that depend only on shapes on every call. VGGT's DPT heads add a sin/cos
embedding of the pixel grid to their features, computed in float64 from ``linspace`` and
``arange``, at each pyramid level and at the full output resolution (518 x 518 x 128 per head,
per chunk of frames). Inductor fuses that computation into the add that reads it and so
recomputes the transcendentals on every call: 1.6 ms a head on an H200 in float64, about a fifth
of the FP8 student's GPU time at one frame (benchmarks/NOTES.md, session 8).

The pass works on either graph the ``lite3r`` backend sees: the Dynamo graph (torch functions and
methods; the ``compiler="eager"`` path) and the ATen forward graph AOTAutograd hands Inductor
(OpOverloads; the Inductor path, where a folded value becomes a constant exactly as Inductor's
own freezing makes them). A node is *input-independent* when it calls a pure, deterministic
function and every node it reads is input-independent. Placeholders are not (inputs, parameters
and buffers all arrive as placeholders, so a folded value can never go stale when the weights
change), nor are ``get_attr`` nodes, symbolic sizes (they come from placeholders), random or
uninitialised factories, dropout, in-place ops, higher-order ops and anything ``torch.fx`` calls
impure.

Each *boundary* value (an input-independent tensor read by a node that is not) is computed once,
at compile time, and becomes a buffer of the graph module that the graph reads through a
``get_attr`` node. Equal boundary values share one buffer. Only values that cost something to
compute are folded (:data:`COSTLY_OPS`: transcendentals, powers, reductions, products): index
arithmetic on ``arange`` is what Inductor generates inline for free, and a buffer would add a
load. A value over ``max_bytes`` is left alone and reported, since a buffer holds its memory for
the life of the compiled model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor

from lite3r_compile.backends.post_grad import ChainedGraphPass

# What makes a value worth a buffer: transcendentals, powers, reductions and products. Index
# arithmetic on ``arange`` and friends (the interpolation tables of a decomposed ``upsample``, a
# mask) is left alone: Inductor computes it from the index at no cost, a buffer would add a load
# and turn affine indexing into a gather.
COSTLY_OPS = frozenset({
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "exp", "exp2", "expm1",
    "log", "log2", "log10", "log1p", "pow", "float_power", "sqrt", "rsqrt", "erf", "erfc", "erfinv",
    "sigmoid", "softmax", "_softmax", "log_softmax", "_log_softmax", "sum", "mean", "prod", "cumsum",
    "cumprod", "norm", "linalg_vector_norm", "matmul", "mm", "bmm", "einsum", "outer",
})

# Factories whose values differ between calls or are undefined, and ops that behave differently
# by mode; none of them may be computed once for every call.
NOT_FOLDABLE = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "empty", "empty_like", "empty_strided", "new_empty", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu", "manual_seed", "seed",
})


@dataclass(frozen=True)
class FoldConfig:
    """``max_bytes``: the largest value folded (a folded value is held by the compiled graph for
    its lifetime); larger ones keep being computed at every call and are reported."""

    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"FoldConfig: max_bytes must be >= 0, got {self.max_bytes}")


@dataclass(frozen=True)
class FoldedConstant:
    """One boundary value: the buffer that holds it (``""`` where it was not folded), its shape,
    dtype and size, the graph nodes computing it (``nodes``: the boundary node's name first) and,
    where it was not folded, why."""

    buffer: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    nodes: tuple[str, ...]
    skipped: str = ""


@dataclass
class FoldReport:
    """What :func:`fold_input_independent` did to one graph: ``constants`` folded or skipped, and the
    graph nodes it removed."""

    constants: list[FoldedConstant] = field(default_factory=list)
    removed_nodes: int = 0

    @property
    def folded(self) -> list[FoldedConstant]:
        return [c for c in self.constants if not c.skipped]

    @property
    def folded_bytes(self) -> int:
        """Bytes the folded buffers hold (each shared buffer counted once)."""
        return sum({c.buffer: c.nbytes for c in self.folded}.values())

    def merged(self, other: "FoldReport") -> "FoldReport":
        """This report and ``other``'s (the forward and backward graphs of one Dynamo graph)."""
        return FoldReport(self.constants + other.constants, self.removed_nodes + other.removed_nodes)


def _name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.rsplit(".", 1)[-1]


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    if isinstance(target, torch._ops.OpOverload) and (
        torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable
    ):
        return False
    name = _name(target)
    if name in NOT_FOLDABLE or "out" in node.kwargs:
        return False
    if name.endswith("_") and not name.startswith("__"):  # in-place methods
        return False
    if node.op == "call_function" and target is not operator.getitem and node.is_impure():
        return False
    return True


def _input_independent(graph: fx.Graph) -> set[fx.Node]:
    independent: set[fx.Node] = set()
    for node in graph.nodes:
        if _pure(node) and all(arg in independent for arg in node.all_input_nodes):
            independent.add(node)
    # An in-place op changes its argument and every view of it after the fact (``t = zeros(n);
    # t.view(-1).add_(1); sin(t)`` reads the zeros node): a connected group of independent nodes
    # any of which an impure op reads is not folded at all.
    unsafe: set[fx.Node] = set()
    for node in independent:
        if node in unsafe or all(_pure(user) or user.op == "output" for user in node.users):
            continue
        group, stack = {node}, [node]
        while stack:
            current = stack.pop()
            for other in (*current.all_input_nodes, *current.users):
                if other in independent and other not in group:
                    group.add(other)
                    stack.append(other)
        unsafe |= group
    return independent - unsafe


def _subgraph(boundary: fx.Node, independent: set[fx.Node]) -> list[fx.Node]:
    """The input-independent nodes ``boundary`` is computed from, itself included, in graph order."""
    seen, stack = {boundary}, [boundary]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in independent and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return [n for n in boundary.graph.nodes if n in seen]


def _evaluate(nodes: list[fx.Node], cache: dict[fx.Node, Any]) -> Any:
    """The value of ``nodes[-1]``, computing the nodes in order (values kept in ``cache``)."""
    for node in nodes:
        if node in cache:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: cache[n])
        if node.op == "call_function":
            cache[node] = node.target(*args, **kwargs)
        else:
            self_arg, *rest = args
            cache[node] = getattr(self_arg, node.target)(*rest, **kwargs)
    return cache[nodes[-1]]


def _same(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device
            and torch.equal(a, b))


def fold_input_independent(gm: fx.GraphModule, config: FoldConfig = FoldConfig()) -> FoldReport:
    """Compute every input-independent boundary value of ``gm`` once and read it from a buffer of
    ``gm`` instead (in place; see the module docstring). Returns what was folded and skipped."""
    graph = gm.graph
    independent = _input_independent(graph)
    boundaries = [
        n for n in graph.nodes
        if n in independent and any(user not in independent for user in n.users)
    ]
    report = FoldReport()
    cache: dict[fx.Node, Any] = {}
    buffers: list[tuple[str, Tensor]] = []
    # Inductor may call in with a fake-tensor mode active; the folded values must be real
    with torch.utils._python_dispatch._disable_current_modes(), torch.no_grad():
        for boundary in boundaries:
            nodes = _subgraph(boundary, independent)
            if not any(_name(n.target) in COSTLY_OPS for n in nodes):
                continue
            value = _evaluate(nodes, cache)
            if not isinstance(value, Tensor):
                continue
            names = (boundary.name, *(n.name for n in nodes[:-1]))
            nbytes = value.untyped_storage().nbytes()
            if nbytes > config.max_bytes:
                report.constants.append(FoldedConstant("", tuple(value.shape), value.dtype, nbytes, names,
                                                       skipped=f"{nbytes} bytes > FoldConfig.max_bytes"))
                continue
            buffer = next((name for name, held in buffers if _same(held, value)), None)
            if buffer is None:
                buffer = f"_lite3r_folded_{len(buffers)}"
                while hasattr(gm, buffer):
                    buffer += "_"
                gm.register_buffer(buffer, value)
                buffers.append((buffer, value))
            with graph.inserting_before(boundary):
                read = graph.get_attr(buffer)
            read.meta = dict(boundary.meta)
            boundary.replace_all_uses_with(read, delete_user_cb=lambda user: user not in independent)
            report.constants.append(FoldedConstant(buffer, tuple(value.shape), value.dtype, nbytes, names))
    cache.clear()
    if report.folded:
        # Only the folded (pure) nodes go: a general dead-code pass would also drop in-place
        # methods whose results are unused.
        for node in reversed(list(graph.nodes)):
            if node in independent and not node.users:
                graph.erase_node(node)
                report.removed_nodes += 1
        graph.lint()
        gm.recompile()
    return report


class FoldConstantsPass(ChainedGraphPass):
    """:func:`fold_input_independent` as an Inductor post-grad pass
    (``torch._inductor.config.post_grad_custom_pre_pass``), on the ATen graph Inductor lowers.
    ``on_fold`` receives each graph's report; ``after``: the pass or passes already set there,
    run first (:class:`~lite3r_compile.backends.post_grad.ChainedGraphPass`: its uuid, this file
    and the config key Inductor's caches, so a graph compiled with the pass is never served to a
    compile without it)."""

    def __init__(self, config: FoldConfig = FoldConfig(), on_fold: Callable[[FoldReport], None] | None = None,
                 after: Any = None) -> None:
        super().__init__(after, source=__file__, key=repr(config))
        self.config = config
        self.on_fold = on_fold

    def run(self, graph: fx.Graph) -> None:
        report = fold_input_independent(graph.owning_module, self.config)
        if self.on_fold is not None:
            self.on_fold(report)


__all__ = ["FoldConfig", "FoldConstantsPass", "FoldReport", "FoldedConstant", "fold_input_independent"]
