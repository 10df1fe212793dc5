"""Find every dense attention of a model: ``find_attention(model, example_inputs)``.

Capture (:mod:`lite3r_compile.capture`) gives one shallow FX graph per module; the matcher
(:mod:`lite3r_compile.passes.attention_patterns`) finds attention in each graph by dataflow; this
file turns matches into :class:`AttentionSite` records and decides each site's *scope*, which the
attention code itself cannot tell (VGGT, DA3, pi3 use one Attention class for frame and global
attention):

- ``"cross"``: q and k come from different inputs of the module (different placeholders), or have
  different lengths;
- ``"frame"`` / ``"global"``: the per-view token count P is learned from two groups of
  self-attention sites that see the same tokens as (B*S, P) and as (B, S*P), or, when the
  example input has a views axis (B, S, ...), from sites whose token batch is B*S; attention over
  P tokens is ``"frame"`` and over S*P tokens ``"global"``;
- module paths naming ``frame`` / ``global`` break the remaining ties; everything else (one view,
  single-scope models) is ``"self"``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from lite3r_compile.capture import (
    CapturedModule,
    CaptureFailure,
    ModelCapture,
    ModuleRecord,
    TensorSpec,
    capture_model,
    normalize_example_inputs,
)
from lite3r_compile.passes.attention_patterns import AttentionMatch, find_matches, infer_num_heads

SCOPES = ("frame", "global", "cross", "self")


@dataclass
class SiteCapture:
    """Where a site lives in the captured graphs: the captured module whose forward holds it
    (for ``nn.MultiheadAttention``, the caller's, or None when the caller could not be
    captured) and the match, whose nodes belong to that module's graph."""

    module: CapturedModule | None
    match: AttentionMatch


@dataclass(frozen=True)
class AttentionSite:
    """One dense attention of a model.

    ``path`` is the qualified name of the innermost module whose forward holds the attention
    (for ``nn.MultiheadAttention``, that module). ``form``: "sdpa", "matmul", "bmm", "einsum",
    "baddbmm", "xformers" or "multihead_attention". ``layout`` is q's layout ("bhnd", "bnhd",
    "bnd" for heads folded into the batch, "nbhd" for sequence-first MHA). ``q_len``/``kv_len``
    are the token counts at capture; ``scale`` the softmax scale as written, including one folded
    into q (``q = q * scale``) (None: ``head_dim ** -0.5``).
    ``mask`` is None, "additive", "boolean", "causal" or an attention-bias type name.
    ``rewritable`` says whether SLA can replace it; ``reason`` says why not. ``index`` orders the
    sites of one module (the SLA submodule of site ``i`` is ``sla`` for 0, ``sla_<i>`` after).
    ``rewritten`` is set by :func:`~lite3r_compile.passes.sla_rewrite.apply_sla`.
    """

    path: str
    form: str
    scope: str
    num_heads: int | None
    head_dim: int | None
    q_len: int | None
    kv_len: int | None
    layout: str
    mask: str | None
    rewritable: bool
    reason: str
    scale: float | None = None
    dropout_p: float = 0.0
    index: int = 0
    rewritten: bool = False
    capture: SiteCapture | None = field(default=None, compare=False, repr=False, hash=False)

    @property
    def sla_name(self) -> str:
        """Attribute name of this site's SparseLinearAttention in the module at ``path``."""
        return "sla" if self.index == 0 else f"sla_{self.index}"


@dataclass
class AttentionAnalysis:
    """Everything :func:`locate_attention` learned: the sites (with their graphs), the
    capture of every module, and the modules that could not be captured (path + reason)."""

    sites: list[AttentionSite]
    capture: ModelCapture
    failures: list[CaptureFailure]


def find_attention(model: nn.Module, example_inputs: Any = None) -> list[AttentionSite]:
    """Every dense attention of ``model``, in module order.

    ``example_inputs``: a tuple of positional arguments or a dict of keyword arguments for
    ``model``; ``None`` uses ``model.example_inputs()``. The model runs once on them (under
    ``torch.no_grad``; a meta-device model on meta inputs computes nothing). Modules whose forward
    cannot be captured are listed by :func:`locate_attention`.
    """
    return locate_attention(model, example_inputs).sites


def locate_attention(model: nn.Module, example_inputs: Any = None) -> AttentionAnalysis:
    """:func:`find_attention` with everything behind it (graphs, capture failures)."""
    capture = capture_model(model, example_inputs,
                            skip=lambda path, module: isinstance(module, nn.MultiheadAttention))
    found: list[tuple[str, SiteCapture]] = []
    seen_mha: set[str] = set()
    for path, captured in capture.modules.items():
        for match in find_matches(captured.graph_module):
            site_path = path
            if match.module_target is not None:
                site_path = f"{path}.{match.module_target}" if path else match.module_target
                seen_mha.add(site_path)
            found.append((site_path, SiteCapture(captured, match)))
    for path, record in capture.records.items():
        if isinstance(record.module, nn.MultiheadAttention) and path not in seen_mha:
            match = _mha_match_from_record(record)
            if match is not None:
                found.append((path, SiteCapture(None, match)))
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    found.sort(key=lambda item: order.get(item[0], len(order)))

    views = _views_of_inputs(model, example_inputs)
    scopes = _scopes([(path, site.match) for path, site in found], views)
    sites: list[AttentionSite] = []
    per_module: dict[str, int] = defaultdict(int)
    for (path, site_capture), scope in zip(found, scopes):
        match = site_capture.match
        index = per_module[path]
        per_module[path] += 1
        problems = list(dict.fromkeys(match.problems))
        sites.append(AttentionSite(
            path=path,
            form=match.form,
            scope=scope,
            num_heads=infer_num_heads(match),
            head_dim=match.head_dim,
            q_len=match.q_len,
            kv_len=match.kv_len,
            layout=match.layout,
            mask=match.mask,
            rewritable=not problems,
            reason="; ".join(problems),
            scale=match.softmax_scale,
            dropout_p=match.dropout_p,
            index=index,
            capture=site_capture,
        ))
    return AttentionAnalysis(sites, capture, capture.failures)


def _mha_match_from_record(record: ModuleRecord) -> AttentionMatch | None:
    """An ``nn.MultiheadAttention`` whose caller could not be captured: a site from its
    recorded call alone (whether the caller uses the weights is then unknown)."""
    module = record.module
    call = record.calls[0]
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    bound = dict(zip(names, call.args))
    bound.update(call.kwargs)
    q, k = bound.get("query"), bound.get("key")
    if not isinstance(q, TensorSpec) or not isinstance(k, TensorSpec):
        return None
    batch_first = bool(module.batch_first)
    seq = 1 if batch_first and len(q.shape) == 3 else 0
    heads = int(module.num_heads)
    sizes = {"n": q.shape[seq], "m": k.shape[seq], "b": heads,
             "d": module.embed_dim // heads, "e": module.embed_dim // heads}
    if len(q.shape) == 3:
        sizes["a"] = q.shape[0 if batch_first else 1]
    letters = "anbd" if batch_first else "nabd"
    match = AttentionMatch("multihead_attention", None, q, k, bound.get("value"), letters,
                           letters.replace("n", "m"), letters.replace("n", "m").replace("d", "e"),
                           letters.replace("d", "e"), sizes, mha_batch_first=batch_first)
    for name in ("key_padding_mask", "attn_mask"):
        mask = bound.get(name)
        if mask is not None:
            match.mask = "boolean" if getattr(mask, "dtype", None) == torch.bool else "additive"
            match.problems.append(f"attention mask ({match.mask}, {name}) is not supported by SLA")
    if bound.get("is_causal", False):
        match.mask = match.mask or "causal"
        match.problems.append("attention mask (causal) is not supported by SLA")
    if module.bias_k is not None or module.add_zero_attn:
        match.problems.append("bias_k/bias_v or add_zero_attn is not supported by SLA")
    return match


def _views_of_inputs(model: nn.Module, example_inputs: Any) -> tuple[int, int] | None:
    """(B, S) from the first example input with a views axis: (B, S, 3, H, W) images or
    (B, S, P, C) tokens."""
    try:
        args, kwargs = normalize_example_inputs(model, example_inputs)
    except (TypeError, ValueError):
        return None
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 4:
            return int(leaf.shape[0]), int(leaf.shape[1])
    return None


def _placeholders(node: Any) -> frozenset[str]:
    if not isinstance(node, fx.Node):
        return frozenset()
    seen: set[fx.Node] = set()
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(str(current.target))
        stack.extend(current.all_input_nodes)
    return frozenset(found)


def _is_cross(match: AttentionMatch) -> bool:
    if match.q_len is not None and match.kv_len is not None and match.q_len != match.kv_len:
        return True
    if isinstance(match.q, fx.Node) and isinstance(match.k, fx.Node):
        return _placeholders(match.q) != _placeholders(match.k)
    return False


def _token_batch(match: AttentionMatch) -> int | None:
    """The batch of token sequences a site sees (its batch dimensions without the heads)."""
    heads = infer_num_heads(match)
    if not heads:
        return None
    total = match.batch_size
    return total // heads if total % heads == 0 else None


def _path_hint(path: str) -> str | None:
    parts = path.lower().split(".")
    if any("global" in part for part in parts):
        return "global"
    if any("frame" in part for part in parts):
        return "frame"
    return None


def _scopes(sites: list[tuple[str, AttentionMatch]], views: tuple[int, int] | None) -> list[str]:
    """The scope of each site (see the module docstring for the rule).

    The per-view token count P is learned first, from pairs of self-attention sites that see
    the same tokens as (B*S, P) and as (B, S*P), and from sites whose token batch is B*S when the
    input has a views axis (B, S, ...); a self-attention over P tokens is then ``"frame"`` (also
    a two-view decoder's, whose batch is B) and one over S*P tokens ``"global"``.
    """
    shapes: list[tuple[int, int] | None] = []
    cross: list[bool] = []
    for _, match in sites:
        is_cross = _is_cross(match)
        cross.append(is_cross)
        batch = _token_batch(match)
        ok = not is_cross and batch is not None and match.q_len is not None
        shapes.append((batch, match.q_len) if ok else None)
    distinct = {shape for shape in shapes if shape is not None}
    frame_lengths: set[int] = set()
    global_lengths: set[int] = set()
    for small in distinct:
        for big in distinct:
            ratio, rest = divmod(big[1], small[1])
            if big[1] > small[1] and rest == 0 and big[0] * ratio == small[0]:
                frame_lengths.add(small[1])
                global_lengths.add(big[1])
    single_view = views is not None and views[1] == 1
    if views is not None and not single_view:
        batch, seq = views
        for tokens_batch, length in distinct:
            if tokens_batch == batch * seq:
                frame_lengths.add(length)
        for tokens_batch, length in distinct:
            if tokens_batch == batch and length % seq == 0 and length // seq in frame_lengths:
                global_lengths.add(length)
        if not frame_lengths:  # global attention only: its length is S * P
            for tokens_batch, length in distinct:
                if tokens_batch == batch and length % seq == 0 and length > seq:
                    global_lengths.add(length)
    result = []
    for (path, _), is_cross, shape in zip(sites, cross, shapes):
        if is_cross:
            scope = "cross"
        elif single_view:
            scope = "self"
        elif shape is not None and shape[1] in global_lengths:
            scope = "global"
        elif shape is not None and shape[1] in frame_lengths:
            scope = "frame"
        else:
            scope = _path_hint(path) or "self"
        result.append(scope)
    return result


def site_summary(sites: list[AttentionSite]) -> dict[str, int]:
    """Counts of sites per scope, and rewritable ones, for logs."""
    counts: dict[str, int] = defaultdict(int)
    for site in sites:
        counts[site.scope] += 1
        counts["rewritable"] += int(site.rewritable)
    counts["total"] = len(sites)
    return dict(counts)


__all__ = [
    "AttentionAnalysis",
    "AttentionSite",
    "SCOPES",
    "SiteCapture",
    "find_attention",
    "locate_attention",
    "site_summary",
]

