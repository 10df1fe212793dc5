"""Route a Dynamo graph's bilinear ``F.interpolate`` calls to ``lite3r::upsample_bilinear2d``.

A pass over the graph Dynamo captured, before AOTAutograd (Inductor decomposes
``upsample_bilinear2d`` there, so a post-grad pass would see only its gathers). Each call
``F.interpolate(x, size | scale_factor, mode="bilinear", align_corners, recompute_scale_factor)``
on a 4-D ``x`` with at least ``min_channels`` channels becomes
:func:`~lite3r_compile.backends.bilinear_upsample.interpolate_bilinear` with the same arguments:
the same output sizes and source points, computed by one kernel on a channels-last copy of ``x``
(Inductor writes that copy directly from whatever produced ``x``; see the op's module docstring
for why this beats Inductor's own lowering). Calls with another mode, antialiasing, another
rank or few channels (where a channels-last vector is too short to pay), calls whose output only
feeds elementwise ops, and every call of a graph that computes gradients stay as they are and are
reported with the reason. The elementwise rule is measured: Inductor fuses a resize into its
elementwise consumer, so the pair writes one buffer; routed, the kernel writes the resized map and
the consumer reads and rewrites it. The DPT heads end in such a pair (the last resize to the image
size, then the pixel embedding added, on 8 x 128 x 518 x 518 values): with it routed, VGGT-1B's
student held 0.5 GiB more CUDA-graph pool (one such map is 0.55 GB) and the pair took about as
long as Inductor's fused kernel (``benchmarks/NOTES.md``, sessions 12-13). The refinement steps'
resizes feed a convolution, which fuses nothing; there the kernel is what saves time.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from lite3r_compile.backends.bilinear_upsample import interpolate_bilinear
from lite3r_compile.backends.graph_attention import module_path, size_hint

_INTERPOLATE = inspect.signature(F.interpolate)


@dataclass(frozen=True)
class UpsampleConfig:
    """``min_channels``: the fewest channels routed to the kernel."""

    min_channels: int = 8


@dataclass(frozen=True)
class RoutedUpsample:
    """One ``F.interpolate`` call of a Dynamo graph: the module path it came from ("" when
    unknown), its mode, its input's shape (hinted sizes), whether it now runs
    ``lite3r::upsample_bilinear2d`` and, if not, why."""

    path: str
    mode: str
    input_shape: tuple[int, ...]
    routed: bool
    reason: str


# torch-level elementwise ops as Dynamo records them (functions, and methods by name)
ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.clamp,
    torch.where, F.relu, F.gelu, F.silu, F.leaky_relu,
})
ELEMENTWISE_METHODS = frozenset({"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "exp", "clamp", "neg",
                                 "add_", "mul_", "relu_"})


def _is_elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _why_not(bound: inspect.BoundArguments, value: object, config: UpsampleConfig, inference: bool,
             users: list[fx.Node]) -> str:
    if not inference:
        return ("the graph computes gradients: Inductor's own lowering (ATen's upsample backward, "
                "which the op's gradient calls, cannot be traced with symbolic sizes)")
    mode = bound.arguments.get("mode", "nearest")
    if mode != "bilinear":
        return f"mode {mode!r} (only 'bilinear' has a kernel)"
    if bound.arguments.get("antialias", False) is not False:
        return "antialias=True (the kernel does not filter)"
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return "input is not a 4-D tensor (N, C, H, W)"
    if not value.is_floating_point():
        return f"input dtype {value.dtype} is not floating point"
    channels = size_hint(value.shape[1])
    if channels < config.min_channels:
        return f"{channels} channels, fewer than UpsampleConfig.min_channels={config.min_channels}"
    if users and all(_is_elementwise(u) for u in users):
        return (f"its output only feeds elementwise ops ({', '.join(u.name for u in users)}), into which "
                "Inductor fuses the resize: one buffer written instead of two")
    return ""


def _channels_last_value(value: object) -> object:
    """The fake output of the routed call: F.interpolate's, in channels-last as the op returns it."""
    if not isinstance(value, FakeTensor):
        return value
    with value.fake_mode:
        return value.contiguous(memory_format=torch.channels_last)


def route_bilinear_upsamples(gm: fx.GraphModule, config: UpsampleConfig = UpsampleConfig(), *,
                             inference: bool = True) -> list[RoutedUpsample]:
    """Replace the graph's eligible bilinear ``F.interpolate`` calls in place (see the module
    docstring); returns one record per ``F.interpolate`` call, routed or not. ``inference``: the
    graph computes no gradients (else nothing is routed)."""
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.interpolate:
            continue
        bound = _INTERPOLATE.bind(*node.args, **node.kwargs)
        source = bound.arguments["input"]
        value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
        shape = tuple(size_hint(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()
        reason = _why_not(bound, value, config, inference, list(node.users))
        records.append(RoutedUpsample(module_path(node), str(bound.arguments.get("mode", "nearest")), shape,
                                      not reason, reason))
        if reason:
            continue
        kwargs = {name: bound.arguments[name] for name in ("size", "scale_factor", "align_corners",
                                                           "recompute_scale_factor") if name in bound.arguments}
        with gm.graph.inserting_before(node):
            routed = gm.graph.call_function(interpolate_bilinear, (source,), kwargs)
        routed.meta.update(node.meta)
        routed.meta["example_value"] = _channels_last_value(node.meta.get("example_value"))
        node.replace_all_uses_with(routed)
        gm.graph.erase_node(node)
    if any(r.routed for r in records):
        gm.recompile()
    return records


__all__ = ["RoutedUpsample", "UpsampleConfig", "route_bilinear_upsamples"]
