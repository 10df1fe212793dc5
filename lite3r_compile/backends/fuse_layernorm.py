"""Fuse a block's LayerNorm into the FP8 quantization of the layer it feeds.

In a pre-norm transformer block, ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``, the deployed
``attn.qkv`` and ``mlp.fc1`` are rowwise ``Float8Linear`` layers whose input quantization is an
amax over the normalised row. This pass finds, in every module whose forward FX can trace, an
``nn.LayerNorm`` over the last dim, called once, whose output goes only, possibly through
eval-mode ``nn.Dropout`` / ``nn.Identity`` modules, into

- a rowwise ``Float8Linear``, or
- the first argument of a child module (``attn``, ``mlp``) whose own forward uses that argument
  only to call one rowwise ``Float8Linear`` child (reading its shape aside),

and moves the norm into that layer (``Float8Linear.input_norm``; the norm's place becomes
``nn.Identity``), so the layer runs norm and quantization in one kernel
(:mod:`lite3r_compile.backends.layernorm_quant`). The values are the eager student's up to the
order of the norm's sums.

LayerNorms next to an FP8 layer that cannot be fused (another use of the output, a module FX
cannot trace, a norm over more than the last dim, a tensorwise layer) are left as they are, and
reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from lite3r_compile.backends.fp8_linear import Float8Linear
from lite3r_compile.backends.fuse_gelu import PASS_THROUGH, ChildrenAsLeaves, child_calls

# attribute reads and calls that look at a tensor's metadata, not its values
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_METADATA_METHODS = {"size", "dim"}


@dataclass
class LayerNormFusion:
    """``fused``: (norm path, layer path) of the LayerNorms moved into the FP8 layer they feed;
    ``kept``: (path, why) of LayerNorms next to an FP8 layer that were left as they are."""

    fused: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _past_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, fx.Node, str]:
    """``(user, value, "")``: the one node consuming ``node``'s value past pass-through modules
    and the node it reads it from, or ``(None, node, why)``."""
    while True:
        if len(node.users) != 1:
            return None, node, f"its output has {len(node.users)} uses"
        (user,) = node.users
        if user.op == "call_module" and isinstance(modules[user.target], PASS_THROUGH):
            node = user
            continue
        return user, node, ""


def _fp8_entry(module: nn.Module) -> tuple[str | None, str]:
    """The name of the rowwise ``Float8Linear`` child that is the only (non-metadata) use of
    ``module.forward``'s first argument, or None with the reason."""
    try:
        graph = ChildrenAsLeaves().trace(module)
    except Exception as err:  # noqa: BLE001 - any trace failure leaves the norm as it is
        return None, f"{type(module).__name__} does not trace with torch.fx: {type(err).__name__}"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None, f"{type(module).__name__}.forward takes no argument"
    value = placeholders[0]
    while True:
        uses = [u for u in value.users if not _reads_metadata(u)]
        if len(uses) != 1:
            return None, f"{type(module).__name__}.forward uses its input {len(uses)} times"
        (use,) = uses
        layer = module.get_submodule(use.target) if use.op == "call_module" else None
        if use.all_input_nodes != [value]:
            break
        if isinstance(layer, PASS_THROUGH):
            value = use
            continue
        if isinstance(layer, Float8Linear):
            return str(use.target), ""
        break
    return None, f"{type(module).__name__}.forward passes its input to {use.op} {use.target}"


def _target_layer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """The path, relative to the traced parent, of the Float8Linear the norm's output feeds;
    None with the reason, or with "" where the output feeds no module holding an FP8 layer."""
    user, value, why = _past_pass_through(node, modules)
    if user is None:
        return None, why
    if user.op != "call_module":
        return None, f"its output goes into {user.op} {user.target}"
    consumer = modules[user.target]
    if not _holds_fp8(consumer):
        return None, ""
    if not user.args or user.args[0] is not value:
        return None, f"its output is not the first argument of {user.target}"
    if sum(a is value for a in (*user.args, *user.kwargs.values())) != 1:
        return None, f"its output is passed to {user.target} more than once"
    if isinstance(consumer, Float8Linear):
        return str(user.target), ""
    entry, why = _fp8_entry(consumer)
    return (f"{user.target}.{entry}", "") if entry is not None else (None, why)


def _holds_fp8(module: nn.Module) -> bool:
    return any(isinstance(m, Float8Linear) for m in module.modules())


def fuse_layernorm_quantization(module: nn.Module) -> LayerNormFusion:
    """Move every LayerNorm of ``module`` that feeds a rowwise ``Float8Linear`` alone into that
    layer (see the module docstring), in place; returns what it fused and what it kept."""
    result = LayerNormFusion()
    for parent_path, parent in list(module.named_modules()):
        children = dict(parent.named_children())
        norms = {n for n, c in children.items() if isinstance(c, nn.LayerNorm)}
        if not norms or not any(_holds_fp8(c) for n, c in children.items() if n not in norms):
            continue
        where = f"{parent_path}." if parent_path else ""
        calls, why = child_calls(parent, norms)
        if calls is None:
            result.kept += [(where + n, why) for n in sorted(norms)]
            continue
        modules = dict(parent.named_modules())
        for name in sorted(norms):
            path, norm, nodes = where + name, children[name], calls.get(name, [])
            if not nodes:
                continue  # not called by this forward: nothing to fuse, nothing to report
            if len(nodes) != 1:
                result.kept.append((path, f"called {len(nodes)} times in {type(parent).__name__}.forward"))
                continue
            target, why = _target_layer(nodes[0], modules)
            layer = parent.get_submodule(target) if target is not None else None
            if layer is None:
                if why:
                    result.kept.append((path, why))
                continue
            if layer.granularity != "rowwise" or layer.input_gelu or layer.input_norm is not None:
                result.kept.append((path, f"{where}{target} is not a rowwise Float8Linear free to fuse"))
                continue
            if tuple(norm.normalized_shape) != (layer.in_features,):
                result.kept.append((path, f"normalizes over {tuple(norm.normalized_shape)}, not the "
                                    f"{layer.in_features} input features of {where}{target}"))
                continue
            setattr(parent, name, nn.Identity())
            layer.input_norm = norm
            result.fused.append((path, where + target))
    return result


__all__ = ["LayerNormFusion", "fuse_layernorm_quantization"]
