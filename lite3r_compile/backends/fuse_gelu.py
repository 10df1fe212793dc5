"""Fuse an MLP's GELU into the FP8 quantization of its second layer's input.

In a transformer MLP, ``fc2(drop(act(fc1(x))))``, the deployed ``fc2`` is a rowwise
``Float8Linear`` whose input quantization is a reduction over the 4096-wide GELU output. This
pass finds, in every module whose forward FX can trace, a GELU (``nn.GELU``, exact) whose output
goes only, possibly through eval-mode ``nn.Dropout`` / ``nn.Identity`` modules, into a rowwise
``Float8Linear``; it replaces the GELU module by ``nn.Identity`` and sets the layer's
``input_gelu``, so the layer computes ``gelu`` inside its quantization kernel
(:mod:`lite3r_compile.backends.gelu_quant`). The values are the same to the bit.

Modules that FX cannot trace, GELUs called more than once or whose output has another use, and
approximate (tanh) GELUs are left as they are, and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from lite3r_compile.backends.fp8_linear import Float8Linear

PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass
class GeluFusion:
    """``fused``: paths of the GELU modules folded into the layer after them;
    ``kept``: (path, why) of GELUs next to a Float8Linear that were left as they are."""

    fused: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


class ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward only: every submodule call is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def child_calls(parent: nn.Module, names: set[str]) -> tuple[dict[str, list[fx.Node]] | None, str]:
    """The ``call_module`` nodes of each child in ``names`` in ``parent``'s own forward (traced
    with its children as leaves), or ``(None, why)`` where FX cannot trace it."""
    try:
        graph = ChildrenAsLeaves().trace(parent)
    except Exception as err:  # noqa: BLE001 - any trace failure leaves the module as it is
        return None, f"{type(parent).__name__} does not trace with torch.fx: {type(err).__name__}"
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in names:
            calls.setdefault(str(node.target), []).append(node)
    return calls, ""


def single_consumer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, str]:
    """The one ``call_module`` node that consumes ``node``'s value, past pass-through modules,
    or None with the reason."""
    while True:
        if len(node.users) != 1:
            return None, f"its output has {len(node.users)} uses"
        (user,) = node.users
        if user.op != "call_module" or len(user.all_input_nodes) != 1:
            return None, f"its output goes into {user.op} {user.target}"
        module = modules[user.target]
        if isinstance(module, PASS_THROUGH):
            node = user
            continue
        return user, ""


def fuse_gelu_quantization(module: nn.Module) -> GeluFusion:
    """Fold every GELU of ``module`` that feeds a rowwise ``Float8Linear`` alone into that layer
    (see the module docstring), in place; returns what it fused and what it kept."""
    result = GeluFusion()
    for parent_path, parent in list(module.named_modules()):
        children = dict(parent.named_children())
        gelus = {n for n, c in children.items() if isinstance(c, nn.GELU)}
        if not gelus or not any(isinstance(c, Float8Linear) for c in children.values()):
            continue
        where = f"{parent_path}." if parent_path else ""
        calls, why = child_calls(parent, gelus)
        if calls is None:
            result.kept += [(where + n, why) for n in sorted(gelus)]
            continue
        modules = dict(parent.named_modules())
        for name in sorted(gelus):
            path, gelu, nodes = where + name, children[name], calls.get(name, [])
            if gelu.approximate != "none":
                result.kept.append((path, f"approximate={gelu.approximate!r} GELU; the fused kernel computes exact GELU"))
                continue
            if len(nodes) != 1:
                result.kept.append((path, f"called {len(nodes)} times in {type(parent).__name__}.forward"))
                continue
            consumer, why = single_consumer(nodes[0], modules)
            layer = modules.get(consumer.target) if consumer is not None else None
            if not isinstance(layer, Float8Linear) or layer.granularity != "rowwise" or layer.input_gelu:
                result.kept.append((path, why or f"its output goes into {type(layer).__name__} {consumer.target}, "
                                    "not a rowwise Float8Linear"))
                continue
            setattr(parent, name, nn.Identity())
            layer.input_gelu = True
            result.fused.append(path)
    return result


__all__ = ["ChildrenAsLeaves", "GeluFusion", "PASS_THROUGH", "child_calls", "fuse_gelu_quantization", "single_consumer"]
