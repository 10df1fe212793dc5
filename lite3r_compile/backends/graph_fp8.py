"""FP8 dynamic quantization of the Linear calls of a Dynamo FX graph.

Each ``linear(x, weight, bias)`` whose weight is a parameter of the model (a graph input or
attribute, 2-D, both dims multiples of ``FP8Config.multiple_of``) becomes
:func:`dynamic_float8_linear`: the weight and the input are quantized to e4m3 with absmax scales
(rowwise or tensorwise) at every call, then multiplied by ``torch._scaled_mm`` (or emulated where
the device has no FP8 GEMMs). The quantization is plain tensor ops, so Inductor fuses the input's
into the kernel that produces it (an exact GELU or a LayerNorm over the features feeding a
rowwise layer alone is folded into the layer's own quantization kernel instead, as the deployed
student does), and the weight's is one pass over the weight (small against
the GEMM at 3D-reconstruction token counts); reading the weight at each call keeps the compiled
model in step with later changes of its parameters.

Which layers: ``FP8Config``'s rules (``exclude``, unaligned dims, ``include``, patch embeddings,
heads, then "inside a transformer block", the parent of an attention site), with module paths
found from the modules being called. A graph break can leave a block's Linear layers in a graph
without its attention; such a graph quantizes every Linear outside heads and patch embeddings.
Dynamo reuses a graph for every module running the same code on the same shapes (the blocks of
a ``ModuleList``): the choice made for the module it was traced on holds for all of them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from lite3r_compile.backends.fp8_linear import float8_linear, quantize_to_e4m3
from lite3r_compile.backends.graph_attention import module_path
from lite3r_compile.config import HEAD_NAME_GLOBS, FP8Config, ancestor_named, matches_any, pixel_embedding_of

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}


GELU_FUNCTIONS = {F.gelu, torch._C._nn.gelu}
LAYER_NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm}


def dynamic_float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, granularity: str,
                          input_gelu: bool = False, norm_weight: Tensor | None = None,
                          norm_bias: Tensor | None = None, norm_eps: float | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with both operands quantized to e4m3 on the fly; output in
    ``x``'s dtype. Shapes: x (..., in), weight (out, in), bias (out,). ``input_gelu``: the input
    is ``gelu(x)``; ``norm_eps`` (with the optional ``norm_weight``, ``norm_bias``): the input is
    ``F.layer_norm(x, (in,), norm_weight, norm_bias, norm_eps)``; either is computed inside the
    quantization (``float8_linear``'s)."""
    weight_q, weight_scale = quantize_to_e4m3(weight, granularity == "rowwise")
    norm = None if norm_eps is None else (norm_weight, norm_bias, norm_eps)
    return float8_linear(x, weight_q, weight_scale, bias, granularity, input_gelu, norm)


def _gelu_input(node: object) -> fx.Node | None:
    """The input of ``node`` when it is an exact GELU whose only use is the Linear being lowered
    (the GELU is then computed in that layer's quantization kernel), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in GELU_FUNCTIONS:
        return None
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return node.args[0] if approximate == "none" and len(node.users) == 1 else None


def _layer_norm_input(node: object, in_features: int) -> tuple[object, object, object, float] | None:
    """``(input, weight, bias, eps)`` of ``node`` when it is a LayerNorm over the last
    ``in_features`` whose only use is the Linear being lowered, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in LAYER_NORM_FUNCTIONS:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    shape = args.get("normalized_shape")
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
    eps = args.get("eps", 1e-5)
    if len(node.users) != 1 or shape != (in_features,) or not isinstance(eps, float):
        return None
    return args["input"], args.get("weight"), args.get("bias"), eps


@dataclass(frozen=True)
class GraphLinear:
    """One Linear call of a Dynamo graph and whether it was quantized (``reason``: why not, or
    the rule that chose it); ``gelu_fused`` / ``norm_fused``: the GELU / LayerNorm before it
    was folded into its quantization."""

    path: str
    in_features: int | None
    out_features: int | None
    quantized: bool
    reason: str
    gelu_fused: bool = False
    norm_fused: bool = False


def _parameter(node: object, gm: fx.GraphModule, inputs: dict[fx.Node, object]) -> Tensor | None:
    """The parameter a weight argument is, or None for a computed tensor."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        value = inputs.get(node)
        return value if isinstance(value, nn.Parameter) else None
    if node.op == "get_attr":
        value = getattr(gm, str(node.target), None)
        return value if isinstance(value, Tensor) else None
    return None


def parameter_names(parameters: list[Tensor]) -> dict[int, str]:
    """``id(parameter) -> qualified name`` in the outermost module being called that holds all
    of ``parameters``, or {} when none does.

    A Dynamo graph names modules relative to the frame it traced, and after a graph break that
    frame can be a submodule's forward (``blocks.0.attn`` of ``aggregator.patch_embed``): the
    full path, which the FP8 rules need, is found from the modules whose calls are on the Python
    stack while Dynamo compiles.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    callers = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule):
            owner = owner._orig_mod
        if isinstance(owner, nn.Module) and all(owner is not c for c in callers):
            callers.append(owner)
        frame = frame.f_back
    wanted = {id(p) for p in parameters}
    for root in reversed(callers):  # outermost first
        names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
        if wanted <= names.keys():
            return names
    return {}


def _weight_of(node: fx.Node) -> object:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def graph_prefix(gm: fx.GraphModule, example_inputs: list) -> str | None:
    """The qualified name, in the outermost module being called, of the module whose forward
    Dynamo traced into ``gm`` ("" for the root), read off a Linear call whose weight is a
    parameter; None when the graph has no such call."""
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    names = parameter_names([v for v in example_inputs if isinstance(v, nn.Parameter)])
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
            continue
        weight = _parameter(_weight_of(node), gm, inputs)
        name = names.get(id(weight)) if weight is not None else None
        relative = module_path(node)
        if name is None or not relative:
            continue
        full = name.rpartition(".")[0]
        if full == relative:
            return ""
        if full.endswith("." + relative):
            return full[: -len(relative) - 1]
    return None


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _decide(path: str, weight: Tensor, config: FP8Config, blocks: list[str]) -> tuple[bool, str]:
    if weight.dim() != 2 or not weight.is_floating_point():
        return False, "weight is not a 2-D floating-point matrix"
    out_features, in_features = weight.shape
    if matches_any(path, config.exclude):
        return False, "FP8Config.exclude"
    n = config.multiple_of
    if in_features % n or out_features % n:
        return False, f"in/out features {in_features}/{out_features} not multiples of {n}"
    if matches_any(path, config.include):
        return True, "FP8Config.include"
    block = next((b for b in blocks if _inside(path, b)), None)
    if config.skip_patch_embed and pixel_embedding_of(path, block) is not None:
        return False, "under a patch embedding (FP8Config.skip_patch_embed)"
    if config.skip_heads and ancestor_named(path, HEAD_NAME_GLOBS) is not None:
        return False, "under a head (FP8Config.skip_heads)"
    if not blocks:
        return True, "no attention in this graph: every Linear outside heads"
    if block is None:
        return False, "outside every transformer block"
    return True, f"in transformer block {block!r}"


def quantize_dynamo_linears(gm: fx.GraphModule, example_inputs: list, config: FP8Config,
                            site_paths: list[str] = ()) -> list[GraphLinear]:
    """Replace the chosen Linear calls of ``gm`` by :func:`dynamic_float8_linear`, in place.
    ``example_inputs`` are the graph's inputs as Dynamo passes them to a backend (parameters are
    ``nn.Parameter``). ``site_paths``: full module paths of the attention sites of this graph;
    their parents are the transformer blocks whose Linear layers are quantized, as
    :func:`lite3r_compile.passes.fp8_qat.plan_fp8` does (a graph without attention quantizes
    every Linear outside heads and patch embeddings). Returns one :class:`GraphLinear` per
    Linear call."""
    blocks = sorted({p.rsplit(".", 1)[0] if "." in p else "" for p in site_paths})
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    names = parameter_names([v for v in example_inputs if isinstance(v, nn.Parameter)])
    found = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
            continue
        x = node.args[0]
        weight_node = _weight_of(node)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _parameter(weight_node, gm, inputs)
        if weight is None:
            found.append(GraphLinear(module_path(node), None, None, False,
                                     "weight is computed in the graph, not a parameter"))
            continue
        name = names.get(id(weight))
        path = name.rpartition(".")[0] if name is not None else module_path(node)
        out_features, in_features = weight.shape if weight.dim() == 2 else (None, None)
        quantized, reason = _decide(path, weight, config, blocks) if config.enabled else (False, "FP8 off")
        fusable = quantized and config.granularity == "rowwise"
        gelu_input = _gelu_input(x) if fusable else None
        norm = _layer_norm_input(x, in_features) if fusable and gelu_input is None else None
        found.append(GraphLinear(path, in_features, out_features, quantized, reason, gelu_input is not None,
                                 norm is not None))
        if not quantized:
            continue
        if gelu_input is not None:
            args = (gelu_input, weight_node, bias, config.granularity, True)
        elif norm is not None:
            args = (norm[0], weight_node, bias, config.granularity, False, *norm[1:])
        else:
            args = (x, weight_node, bias, config.granularity)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(dynamic_float8_linear, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if gelu_input is not None or norm is not None:
            gm.graph.erase_node(x)  # its one use was the Linear
    gm.graph.lint()
    gm.recompile()
    return found


__all__ = [
    "GraphLinear",
    "LINEAR_FUNCTIONS",
    "dynamic_float8_linear",
    "graph_prefix",
    "parameter_names",
    "quantize_dynamo_linears",
]
