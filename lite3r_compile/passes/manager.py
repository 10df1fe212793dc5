"""A small pass manager: passes declare the artifacts they require and provide, and run in the
dependency order that follows (a topological sort of the require/provide graph, with networkx).

A pass is a function ``fn(module, config, **required) -> PassResult``: ``module`` is the student
(changed in place), ``config`` the :class:`~lite3r_compile.config.LiteConfig`, and each name in
``requires`` arrives as a keyword argument holding the artifact an earlier pass provided (or one
seeded by the caller). Its :class:`PassResult` carries the artifacts it ``provides``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import networkx as nx
from torch import nn


@dataclass
class PassResult:
    """What one pass did.

    ``artifacts``: name -> value for every name the pass declared in ``provides``.
    ``notes``: one line each of things the user should know (also shown by ``report()``).
    ``seconds``: wall time of the pass, filled in by the manager.
    """

    name: str
    artifacts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Pass:
    """A pass and its place in the order: it runs after every pass providing one of its
    ``requires`` and after every pass named in ``after``."""

    name: str
    fn: Callable[..., PassResult]
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


@dataclass
class PassRecord:
    """The accumulated results of a pipeline run, in run order, and every artifact by name."""

    results: list[PassResult] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def notes(self) -> list[str]:
        return [note for result in self.results for note in result.notes]


def order_passes(passes: Iterable[Pass], seeded: Iterable[str] = ()) -> list[Pass]:
    """The passes in an order where each runs after the providers of what it requires.

    Ties keep the declaration order. Raises ``ValueError`` naming the pass and artifact when an
    artifact has no provider or two, when ``after`` names an unknown pass, or on a cycle.
    """
    passes = list(passes)
    seeded = set(seeded)
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise ValueError(f"pass names must be unique, got {names}")
    provider: dict[str, str] = {}
    for p in passes:
        for artifact in p.provides:
            if artifact in provider or artifact in seeded:
                first = provider.get(artifact, "the caller")
                raise ValueError(
                    f"artifact {artifact!r} is provided by both {first!r} and {p.name!r}"
                )
            provider[artifact] = p.name

    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for p in passes:
        for artifact in p.requires:
            if artifact in seeded:
                continue
            if artifact not in provider:
                raise ValueError(
                    f"pass {p.name!r} requires {artifact!r}, which no pass provides "
                    f"(provided: {sorted(provider)}; seeded: {sorted(seeded)})"
                )
            graph.add_edge(provider[artifact], p.name)
        for before in p.after:
            if before not in graph:
                raise ValueError(f"pass {p.name!r} runs after unknown pass {before!r}")
            graph.add_edge(before, p.name)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise ValueError(f"passes depend on each other in a cycle: {cycle}")
    index = {name: i for i, name in enumerate(names)}
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in nx.lexicographical_topological_sort(graph, key=index.__getitem__)]


def run_passes(
    module: nn.Module,
    config: Any,
    passes: Iterable[Pass],
    seeded: Mapping[str, Any] | None = None,
) -> PassRecord:
    """Run ``passes`` on ``module`` in dependency order; ``seeded`` artifacts are available from
    the start. Raises ``RuntimeError`` when a pass does not provide exactly what it declared."""
    record = PassRecord(artifacts=dict(seeded or {}))
    for p in order_passes(passes, record.artifacts):
        start = time.perf_counter()
        result = p.fn(module, config, **{name: record.artifacts[name] for name in p.requires})
        result.seconds = time.perf_counter() - start
        missing = [a for a in p.provides if a not in result.artifacts]
        if missing:
            raise RuntimeError(f"pass {p.name!r} declared {missing} in provides but returned none")
        undeclared = sorted(set(result.artifacts) - set(p.provides))
        if undeclared:
            raise RuntimeError(f"pass {p.name!r} returned {undeclared}, not declared in provides")
        record.artifacts.update(result.artifacts)
        record.results.append(result)
    return record
