"""Replace each dense attention site by :class:`SparseLinearAttention`.

Graph sites: the region between q, k, v and the attention output (the q.k product, scaling,
softmax, dropout, the product with v; or the SDPA / xFormers call) becomes one call of a
``SparseLinearAttention`` submodule named ``sla`` (``sla_<i>`` for the i-th site of a module) of
the module that holds the site. Projections, norms, RoPE, head split and merge stay as they were.
q, k, v are brought to SLA's (B, H, N, D) layout by permutes read off the match's role letters
(so (B, N, H, D), (B*H, N, D) and einsum layouts all work) and the output is brought back the
same way. Everything emitted reads sizes at run time: the rewritten module works for other
numbers of frames or tokens than the example.

The softmax scale is kept exactly: a static scale is passed to SLA; a scale computed at run time
(``/ math.sqrt(q.size(-1))``) is computed by the same nodes and passed; a per-query-row tensor
factor (a learned per-head temperature) multiplies q. Attention dropout is dropped: SLA has none,
and a student trained by distillation (only ``proj_l`` trains) does not need it. A site with an
attention mask, or whose scores/probabilities are used elsewhere, is never rewritten (the finder
marks it not rewritable and says why).

``nn.MultiheadAttention`` is replaced as a module by :class:`SLAMultiheadAttention`, which keeps
its parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ...) and adds
``sla``; a ``F.multi_head_attention_forward`` call is replaced by the same computation.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lite3r_compile.capture import copy_graph, graph_module_like, node_value
from lite3r_compile.passes.attention import AttentionSite
from lite3r_compile.passes.attention_patterns import AttentionMatch
from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention


@dataclass
class RewriteResult:
    """The rewritten GraphModule (changed in place), the matches replaced, and those left with
    the reason."""

    graph_module: fx.GraphModule
    rewritten: list[AttentionMatch] = field(default_factory=list)
    skipped: list[tuple[AttentionMatch, str]] = field(default_factory=list)


def rewrite_attention(gm: fx.GraphModule, matches: Iterable[AttentionMatch], config: SLAConfig,
                      *, names: Iterable[str] | None = None) -> RewriteResult:
    """Replace each match (nodes of ``gm.graph``) by a ``SparseLinearAttention`` submodule call.

    ``names`` gives the submodule name of each match (default ``sla``, ``sla_1``, ...).
    ``nn.MultiheadAttention`` *module* calls are not graph rewrites (use :func:`apply_sla`) and
    are skipped here, as are matches with problems.
    """
    matches = list(matches)
    names = list(names) if names is not None else [None] * len(matches)
    result = RewriteResult(gm)
    for match, name in zip(matches, names):
        if match.problems:
            result.skipped.append((match, "; ".join(match.problems)))
            continue
        if match.module_target is not None or match.output is None:
            result.skipped.append((match, "nn.MultiheadAttention modules are replaced by apply_sla"))
            continue
        name = name or _free_name(gm, "sla")
        head_dim = match.head_dim
        if head_dim is None:
            result.skipped.append((match, "head dim unknown at capture"))
            continue
        sla = SparseLinearAttention(head_dim, config).to(_device_for(gm, match))
        gm.add_submodule(name, sla)
        if match.form == "multihead_attention":
            _replace_mha_function(gm.graph, match, name)
        else:
            _replace_region(gm.graph, match, name)
        result.rewritten.append(match)
    gm.graph.lint()
    gm.recompile()
    return result


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _device_for(gm: nn.Module, match: AttentionMatch) -> torch.device:
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    value = node_value(match.q)
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _replace_region(graph: fx.Graph, match: AttentionMatch, name: str) -> None:
    batch = "".join(sorted(match.batch_letters))
    nb = len(batch)
    with graph.inserting_before(match.output):
        q = match.q
        for kind, factor in match.q_factors:
            q = graph.call_function(operator.mul if kind == "mul" else operator.truediv, (q, factor))
        q = _permute(graph, q, match.q_letters, batch + "nd")
        k = _permute(graph, match.k, match.k_letters, batch + "md")
        v = _permute(graph, match.v, match.v_letters, batch + "me")
        q4, k4, v4 = (_fold_batch(graph, t, nb) for t in (q, k, v))
        scale: Any = match.scale
        for kind, factor in match.scale_nodes:
            scale = graph.call_function(operator.mul if kind == "mul" else operator.truediv,
                                        (1.0 if scale is None else scale, factor))
        out = graph.call_module(name, (q4, k4, v4), {"scale": scale})
        out = _unfold_batch(graph, out, nb, q)
        out = _permute(graph, out, batch + "ne", match.out_letters, contiguous=True)
        out = _cast_like(graph, out, match)
    match.output.replace_all_uses_with(out)
    _erase_dead(graph, match.region)


def _permute(graph: fx.Graph, node: Any, letters: str, order: str, contiguous: bool = False) -> Any:
    perm = [letters.index(c) for c in order]
    if perm == list(range(len(perm))):
        return node
    out = graph.call_method("permute", (node, *perm))
    return graph.call_method("contiguous", (out,)) if contiguous else out


def _fold_batch(graph: fx.Graph, node: Any, nb: int) -> Any:
    """(batch..., N, D) -> (B, H, N, D): one batch dim is (1, B*H), none is (1, 1)."""
    if nb == 2:
        return node
    if nb < 2:
        for _ in range(2 - nb):
            node = graph.call_method("unsqueeze", (node, 0))
        return node
    return graph.call_method("flatten", (node, 0, nb - 2))


def _unfold_batch(graph: fx.Graph, node: Any, nb: int, like: Any) -> Any:
    if nb == 2:
        return node
    if nb < 2:
        for _ in range(2 - nb):
            node = graph.call_method("squeeze", (node, 0))
        return node
    shape = graph.call_function(getattr, (like, "shape"))
    lead = graph.call_function(operator.getitem, (shape, slice(None, nb - 1)))
    return graph.call_method("unflatten", (node, 0, lead))


def _cast_like(graph: fx.Graph, node: Any, match: AttentionMatch) -> Any:
    """SLA returns the promoted dtype of q, k, v; cast when the dense output had another."""
    want = getattr(node_value(match.output), "dtype", None)
    dtypes = [getattr(node_value(t), "dtype", None) for t in (match.q, match.k, match.v)]
    if want is None or None in dtypes:
        return node
    have = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), dtypes[2])
    return node if have == want else graph.call_method("to", (node, want))


_IMPURE_METHODS = {"copy_", "fill_", "zero_", "index_put_", "scatter_", "masked_scatter_"}


def _erase_dead(graph: fx.Graph, region: list[fx.Node]) -> None:
    """Erase the replaced region, then the pure producers (transposes, scalings) it alone used.
    Only call_function/call_method nodes that are not in-place or asserts are ever erased: a
    blanket dead-code elimination would drop in-place ops and guards elsewhere in the graph."""
    pending = list(reversed(region))
    erased: set[fx.Node] = set()
    while pending:
        node = pending.pop(0)
        if node in erased or node.users or not _pure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)


def _pure(node: fx.Node) -> bool:
    if node.op == "call_module":
        return False
    if node.op == "call_method":
        name = str(node.target)
        return not (name.endswith("_") and not name.endswith("__")) and name not in _IMPURE_METHODS
    if node.op == "call_function":
        return not node.is_impure() and node.target not in (torch._assert, operator.setitem)
    return False


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention and F.multi_head_attention_forward
# --------------------------------------------------------------------------------------------


def sla_multi_head_attention(sla: SparseLinearAttention, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, num_heads: int,
                             in_proj_weight: torch.Tensor | None, in_proj_bias: torch.Tensor | None,
                             out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor | None, *,
                             batch_first: bool, q_proj_weight: torch.Tensor | None = None,
                             k_proj_weight: torch.Tensor | None = None,
                             v_proj_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention as ``nn.MultiheadAttention`` computes it (packed or separate input
    projections, output projection), with SLA for softmax(q k^T / sqrt(D)) v.

    query (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E); key/value likewise
    with S tokens. Returns the attention output in query's layout.
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    elif batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    tokens, batch, embed = query.shape
    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    head_dim = embed // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:  # (L, N, E) -> (N, H, L, D)
        return x.reshape(x.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q = heads(F.linear(query, w_q, b_q))
    k = heads(F.linear(key, w_k, b_k))
    v = heads(F.linear(value, w_v, b_v))
    out = sla(q, k, v)  # (N, H, L, D), scale D**-0.5 as in torch
    out = out.permute(2, 0, 1, 3).reshape(tokens, batch, embed)
    out = F.linear(out.to(query.dtype), out_proj_weight, out_proj_bias)
    if unbatched:
        return out.squeeze(1)
    return out.transpose(0, 1) if batch_first else out


_MHA_FUNCTION_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def sla_multi_head_attention_forward(sla: SparseLinearAttention, *args: Any,
                                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Drop-in for ``F.multi_head_attention_forward(*args, **kwargs)`` computing attention with
    ``sla``; returns ``(output, None)`` (SLA computes no attention weights). Masks, bias_k/v,
    zero-attention and static k/v are refused (such sites are never rewritten)."""
    bound = _MHA_FUNCTION_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    for unsupported in ("key_padding_mask", "attn_mask", "bias_k", "bias_v", "static_k", "static_v"):
        if a[unsupported] is not None:
            raise ValueError(f"SLA multi-head attention does not support {unsupported}")
    if a["add_zero_attn"] or a["is_causal"]:
        raise ValueError("SLA multi-head attention does not support add_zero_attn / is_causal")
    separate = a["use_separate_proj_weight"]
    out = sla_multi_head_attention(
        sla, a["query"], a["key"], a["value"], a["num_heads"],
        None if separate else a["in_proj_weight"], a["in_proj_bias"],
        a["out_proj_weight"], a["out_proj_bias"], batch_first=False,
        q_proj_weight=a["q_proj_weight"], k_proj_weight=a["k_proj_weight"],
        v_proj_weight=a["v_proj_weight"],
    )
    return out, None


def _replace_mha_function(graph: fx.Graph, match: AttentionMatch, name: str) -> None:
    node = match.output
    with graph.inserting_before(node):
        sla = graph.get_attr(name)
        new = graph.call_function(sla_multi_head_attention_forward, (sla, *node.args), dict(node.kwargs))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


class SLAMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` computing attention with SLA.

    Holds the *same* parameter objects under the same names as the module it replaces
    (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``), so checkpoints
    load unchanged; the only new keys are ``sla.proj_l.weight`` / ``.bias``. ``forward`` has
    ``nn.MultiheadAttention``'s signature and returns ``(output, None)``: attention weights are
    not computed (sites whose caller uses them are never rewritten) and masks are refused.
    """

    def __init__(self, mha: nn.MultiheadAttention, config: SLAConfig = SLAConfig()) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("SLAMultiheadAttention: bias_k/bias_v and add_zero_attn are not supported")
        self.embed_dim = mha.embed_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.head_dim = mha.head_dim
        self.add_zero_attn = False
        for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                      "in_proj_bias", "bias_k", "bias_v"):
            self.register_parameter(pname, getattr(mha, pname))
        self.out_proj = mha.out_proj
        device = mha.out_proj.weight.device
        self.sla = SparseLinearAttention(self.head_dim, config).to(device)
        self.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(
                "SLAMultiheadAttention: attention masks are not supported by SLA; this site "
                "should have stayed dense (it was captured without a mask)"
            )
        out = sla_multi_head_attention(
            self.sla, query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, batch_first=self.batch_first,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
        )
        return out, None


# --------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------


def apply_sla(model: nn.Module, sites: Iterable[AttentionSite],
              config_for_site: Callable[[AttentionSite], SLAConfig | None]) -> list[AttentionSite]:
    """Rewrite ``model`` IN PLACE: every rewritable site for which ``config_for_site`` gives a
    config becomes SLA; the others stay dense. Returns the sites with ``rewritten`` set.

    ``sites`` come from :func:`~lite3r_compile.passes.attention.find_attention` on ``model`` or
    on a structural copy of it (the captured graphs are re-bound to ``model``'s modules by path).
    Each rewritten module is put back in its parent under the same name; parameter names are
    unchanged and the only new state-dict keys are ``<path>.sla.proj_l.weight`` / ``.bias``
    (``sla_<i>`` for a module's i-th site).
    """
    sites = list(sites)
    chosen: dict[int, SLAConfig] = {}
    for i, site in enumerate(sites):
        if not site.rewritable:
            continue
        config = config_for_site(site)
        if config is not None:
            chosen[i] = config
    rewritten: set[int] = set()
    notes: dict[int, str] = {}
    graph_groups: dict[str, list[int]] = defaultdict(list)
    for i in chosen:
        site = sites[i]
        if site.capture is None:
            raise ValueError(f"site '{site.path}' has no capture attached; get sites from find_attention")
        match = site.capture.match
        if site.form == "multihead_attention" and (match.module_target is not None or match.output is None):
            _replace_multihead_module(model, site, chosen[i])
            rewritten.add(i)
        else:
            graph_groups[site.capture.module.path].append(i)
    # Deepest modules first: a parent's GraphModule then picks up its rewritten children.
    for path in sorted(graph_groups, key=lambda p: -p.count(".") - (1 if p else 0)):
        indices = graph_groups[path]
        if path == "":
            for i in indices:
                notes[i] = ("attention in the root module's own forward cannot be replaced in "
                            "place; wrap the model in a module and call apply_sla on the wrapper")
            continue
        captured = sites[indices[0]].capture.module
        module = model.get_submodule(path)
        if type(module) is not type(captured.module):
            raise TypeError(
                f"apply_sla: module '{path}' is a {type(module).__name__}, but the site was "
                f"captured on a {type(captured.module).__name__}; find the sites on this model"
            )
        graph, node_map = copy_graph(captured.graph_module.graph)
        gm = graph_module_like(module, graph, constants_from=captured.graph_module)
        for i in sorted(indices, key=lambda j: sites[j].index):
            match = remap_match(sites[i].capture.match, node_map)
            result = rewrite_attention(gm, [match], chosen[i], names=[sites[i].sla_name])
            if result.rewritten:
                rewritten.add(i)
            else:
                notes[i] = result.skipped[0][1]
        _set_submodule(model, path, gm)
    out = []
    for i, site in enumerate(sites):
        if i in notes:
            out.append(dataclasses.replace(site, rewritten=False, reason=notes[i]))
        else:
            out.append(dataclasses.replace(site, rewritten=i in rewritten))
    return out


def _replace_multihead_module(model: nn.Module, site: AttentionSite, config: SLAConfig) -> None:
    module = model.get_submodule(site.path)
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"apply_sla: '{site.path}' is a {type(module).__name__}, expected "
                        "nn.MultiheadAttention")
    _set_submodule(model, site.path, SLAMultiheadAttention(module, config))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def remap_match(match: AttentionMatch, node_map: dict[fx.Node, fx.Node]) -> AttentionMatch:
    """The same match on a copied graph."""
    def m(x: Any) -> Any:
        return node_map.get(x, x) if isinstance(x, fx.Node) else x

    return dataclasses.replace(
        match,
        output=m(match.output), q=m(match.q), k=m(match.k), v=m(match.v),
        scale_nodes=[(kind, m(n)) for kind, n in match.scale_nodes],
        q_factors=[(kind, m(n)) for kind, n in match.q_factors],
        region=[m(n) for n in match.region],
        sizes=dict(match.sizes), problems=list(match.problems),
    )


__all__ = [
    "RewriteResult",
    "SLAMultiheadAttention",
    "apply_sla",
    "copy_graph",
    "remap_match",
    "rewrite_attention",
    "sla_multi_head_attention",
    "sla_multi_head_attention_forward",
]
