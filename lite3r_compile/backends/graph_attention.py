"""Training-free SLA rewrite of the dense attention in a Dynamo FX graph.

The graph-level matcher (:func:`lite3r_compile.passes.attention_patterns.find_matches`) and
rewriter (:func:`lite3r_compile.passes.sla_rewrite.rewrite_attention`) work on Dynamo's graphs as
they are: module calls are inlined into torch-level ops (``torch._C._nn.linear``,
``torch._C._nn.scaled_dot_product_attention``, ``@``, ``.softmax``), parameters are placeholders,
and each node's fake value sits in ``node.meta["example_value"]``, which the matcher reads.

One thing needs an adapter: with dynamic shapes those fake values have symbolic sizes, and the
matcher reads sizes with ``int(...)``, which would specialize them (a guard per size, so a new
number of frames would recompile every time). :func:`find_attention_in_dynamo_graph` therefore
shows the matcher plain meta tensors of the *hinted* sizes (``node.meta["val"]``, which the
matcher reads first) while it runs, and removes them afterwards. The rewrite itself reads sizes
at run time, so the rewritten graph is correct for every size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from lite3r_compile.passes.attention_patterns import AttentionMatch, find_matches, infer_num_heads
from lite3r_compile.passes.sla_rewrite import rewrite_attention
from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention
from lite3r_compile.sla.op import sla_attention


@dataclass(frozen=True)
class GraphSite:
    """One attention found in a Dynamo graph: the module path it came from (from
    ``nn_module_stack``; "" when unknown), its form, heads, head dim, whether it was replaced
    by SLA and, if not, why."""

    path: str
    form: str
    num_heads: int | None
    head_dim: int | None
    rewritten: bool
    reason: str


def size_hint(size: Any) -> Any:
    """A symbolic size or scalar as its hinted value (no guard); plain values unchanged."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else size.node.shape_env.size_hint(size.node.expr)
    if isinstance(size, torch.SymFloat):
        return float(size.node.hint)
    return size


def _concrete(value: Any) -> Any:
    """A fake value with symbolic sizes as a meta tensor of its hinted sizes (no guards)."""
    if isinstance(value, torch.Tensor):
        return torch.empty([size_hint(s) for s in value.shape], dtype=value.dtype, device="meta")
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return size_hint(value)
    return value


@contextmanager
def _hinted_values(gm: fx.GraphModule) -> Iterator[None]:
    added = []
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = pytree.tree_map(_concrete, node.meta["example_value"])
            added.append(node)
    try:
        yield
    finally:
        for node in added:
            node.meta.pop("val", None)


def module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module a Dynamo node came from, without Dynamo's
    ``L['self']`` prefix ("" when the node carries no module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    fqn = list(stack.values())[-1][0]
    if fqn.startswith("L['"):
        _, _, fqn = fqn.partition("']")
        fqn = fqn.lstrip(".")
    return fqn


def find_attention_in_dynamo_graph(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Every dense attention of a Dynamo graph, matched without specializing symbolic sizes."""
    with _hinted_values(gm):
        return find_matches(gm)


def rewrite_dynamo_attention(gm: fx.GraphModule, config: SLAConfig) -> list[GraphSite]:
    """Replace every rewritable attention of ``gm`` (a Dynamo graph) by a
    ``SparseLinearAttention`` submodule with ``config`` and a zero ``proj_l`` (training-free: the
    result is block-sparse attention, exact dense attention at ``topk=1.0``). In place; returns
    one :class:`GraphSite` per attention found."""
    sites = []
    for match in find_attention_in_dynamo_graph(gm):
        path = module_path(match.output) if match.output is not None else ""
        heads = infer_num_heads(match)
        if match.problems:
            sites.append(GraphSite(path, match.form, heads, match.head_dim, False, "; ".join(match.problems)))
            continue
        result = rewrite_attention(gm, [match], config)
        if result.skipped:
            sites.append(GraphSite(path, match.form, heads, match.head_dim, False, result.skipped[0][1]))
            continue
        sites.append(GraphSite(path, match.form, heads, match.head_dim, True, ""))
    _inline_sla_modules(gm)
    return sites


def training_free_sla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                      topk: float, negligible: float, block_q: int, block_k: int,
                      feature_map: str, dense_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``SparseLinearAttention`` with a zero ``proj_l``, as a function: q (B, H, Nq, D), k and v
    (B, H, Nk, D) -> (B, H, Nq, D), in the dtype SparseLinearAttention would use;
    ``dense_rows`` as :attr:`SLAConfig.dense_rows`."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    head_dim = q.shape[-1]
    proj_weight = q.new_zeros((head_dim, head_dim), dtype=torch.float32)
    proj_bias = q.new_zeros((head_dim,), dtype=torch.float32)
    config = SLAConfig(topk=topk, negligible=negligible, block_q=block_q, block_k=block_k,
                       feature_map=feature_map, dense_rows=dense_rows)
    return sla_attention(q.to(dtype), k.to(dtype), v.to(dtype), proj_weight, proj_bias, scale, config)


def _inline_sla_modules(gm: fx.GraphModule) -> None:
    """Turn the rewriter's ``SparseLinearAttention`` submodule calls into
    :func:`training_free_sla` calls and drop the submodules. A Dynamo graph must not gain
    parameters (AOTAutograd maps each parameter of a Dynamo graph back to a source in the user's
    program), and a zero ``proj_l`` needs none."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, SparseLinearAttention):
            continue
        c = module.config
        q, k, v = node.args[:3]
        scale = node.kwargs.get("scale", node.args[3] if len(node.args) > 3 else None)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                training_free_sla,
                (q, k, v, scale, c.topk, c.negligible, c.block_q, c.block_k, c.feature_map, c.dense_rows),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.delete_submodule(str(node.target))
    gm.graph.lint()
    gm.recompile()


__all__ = [
    "GraphSite",
    "find_attention_in_dynamo_graph",
    "module_path",
    "rewrite_dynamo_attention",
    "training_free_sla",
]
