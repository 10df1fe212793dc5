"""Dense attention on an FX graph, found by dataflow semantics.

A *manual* attention is a softmax over the last dimension whose input is, up to scaling, casts
and masking, a product contracting two tensors q and k over their shared head dimension, and
whose output, up to dropout and casts, is contracted with a third tensor v over the key dimension
the softmax ran over. Spellings do not matter: ``@``, ``torch.matmul``, ``bmm``, ``baddbmm`` and
``einsum`` are all read as einsum-style contractions with one letter per dimension, and every
check is made on letters and on the fake values (``node.meta["val"]``) that capture left on the
nodes. ``F.scaled_dot_product_attention``, xFormers' ``memory_efficient_attention``,
``F.multi_head_attention_forward`` and ``nn.MultiheadAttention`` calls are sites directly.

Letters of a match are *roles*: ``n`` queries, ``m`` keys, ``d`` the q/k head dimension, ``e``
the value head dimension, and ``a``, ``b``, ``c``, ... the batch dimensions (batch, heads, ...)
in the order the scores have them. ``q_letters`` gives q's dimensions in q's own order, e.g.
``"abnd"`` for (B, H, N, D) and ``"anbd"`` for (B, N, H, D).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lite3r_compile.capture import is_xformers_attention, node_value

_aten = torch.ops.aten

# call_function targets -> semantic kind (torch-level spellings and their ATen ops)
_FUNCTION_KINDS: dict[Any, str] = {
    **dict.fromkeys((F.softmax, torch.softmax, torch.special.softmax, _aten.softmax.int,
                     _aten._softmax.default), "softmax"),
    **dict.fromkeys((F.scaled_dot_product_attention,
                     _aten.scaled_dot_product_attention.default), "sdpa"),
    **dict.fromkeys((operator.matmul, torch.matmul, _aten.matmul.default), "matmul"),
    **dict.fromkeys((torch.bmm, _aten.bmm.default), "bmm"),
    **dict.fromkeys((torch.baddbmm, _aten.baddbmm.default), "baddbmm"),
    **dict.fromkeys((torch.einsum, _aten.einsum.default), "einsum"),
    **dict.fromkeys((F.dropout, torch.dropout, _aten.dropout.default), "dropout"),
    **dict.fromkeys((operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar), "mul"),
    **dict.fromkeys((operator.truediv, torch.div, torch.true_divide, _aten.div.Tensor,
                     _aten.div.Scalar), "div"),
    **dict.fromkeys((operator.add, torch.add, _aten.add.Tensor), "add"),
    **dict.fromkeys((operator.sub, torch.sub, _aten.sub.Tensor), "sub"),
    torch.masked_fill: "masked_fill",
    torch.where: "where",
    F.multi_head_attention_forward: "mha_function",
}

# call_method names -> semantic kind (in-place forms read like their results; capture rewires
# later uses of a tensor mutated in place to the in-place node)
_METHOD_KINDS: dict[str, str] = {
    "softmax": "softmax", "matmul": "matmul", "__matmul__": "matmul", "bmm": "bmm",
    "baddbmm": "baddbmm", "mul": "mul", "mul_": "mul", "__mul__": "mul", "div": "div",
    "div_": "div", "__truediv__": "div", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    **dict.fromkeys(("to", "float", "half", "bfloat16", "double", "type", "type_as",
                     "contiguous"), "cast"),
}


def _fn_kind(node: fx.Node, gm: fx.GraphModule | None) -> str | None:
    """The semantic kind of a node: softmax, sdpa, matmul, bmm, baddbmm, einsum, dropout, cast,
    mul, div, add, sub, masked_fill, where, xformers, mha_function, mha_module, or None."""
    if node.op == "call_function":
        try:
            kind = _FUNCTION_KINDS.get(node.target)
        except TypeError:  # an unhashable target
            kind = None
        if kind is None and is_xformers_attention(node.target):
            kind = "xformers"
        return kind
    if node.op == "call_method":
        return _METHOD_KINDS.get(str(node.target))
    if node.op == "call_module" and gm is not None:
        try:
            module = gm.get_submodule(str(node.target))
        except AttributeError:
            return None
        if isinstance(module, nn.Softmax):
            return "softmax"
        if isinstance(module, nn.Dropout):
            return "dropout"
        if isinstance(module, nn.MultiheadAttention):
            return "mha_module"
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor) or hasattr(value, "shape"):
        try:
            return tuple(int(s) for s in value.shape)
        except (TypeError, ValueError):
            return None
    return None


def _rank(node: Any) -> int | None:
    shape = _shape(node_value(node))
    return None if shape is None else len(shape)


@dataclass
class Contraction:
    """A two-operand einsum view of a product node: ``out = sum_{lhs & rhs - out} lhs * rhs``."""

    node: fx.Node
    lhs: Any
    rhs: Any
    lhs_letters: str
    rhs_letters: str
    out_letters: str
    kind: str
    extra_scale: float = 1.0          # baddbmm's alpha
    bias: Any = None                  # baddbmm's input when beta != 0


def _matmul_letters(rank_a: int, rank_b: int) -> tuple[str, str, str] | None:
    if rank_a < 2 or rank_b < 2:
        return None
    out_rank = max(rank_a, rank_b)
    batch = "abcdefgh"[: out_rank - 2].upper()  # upper case: never clash with the n/m/k letters
    lhs = batch[len(batch) - (rank_a - 2):] + "NK"
    rhs = batch[len(batch) - (rank_b - 2):] + "KM"
    return lhs, rhs, batch + "NM"


def _einsum_letters(equation: str, ranks: list[int]) -> tuple[str, str, str] | None:
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    used = set(equation)
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)
    ellipsis = None
    expanded = []
    for part, rank in zip(parts, ranks):
        if "..." in part:
            n = rank - (len(part) - 3)
            if ellipsis is None:
                ellipsis = "".join(next(spare) for _ in range(n))
            elif len(ellipsis) < n:
                return None
            part = part.replace("...", ellipsis[len(ellipsis) - n:])
        expanded.append(part)
    if "..." in out:
        out = out.replace("...", ellipsis or "")
    return expanded[0], expanded[1], out


def as_contraction(node: fx.Node, gm: fx.GraphModule | None) -> Contraction | None:
    """Read a matmul / bmm / baddbmm / einsum node as a two-operand contraction."""
    kind = _fn_kind(node, gm)
    if kind in ("matmul", "bmm"):
        lhs, rhs = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        ranks = (_rank(lhs), _rank(rhs))
        if None in ranks:
            return None
        letters = _matmul_letters(*ranks)
        return None if letters is None else Contraction(node, lhs, rhs, *letters, kind=kind)
    if kind == "baddbmm":
        bias, lhs, rhs = node.args[0], node.args[1], node.args[2]
        beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            return None
        ranks = (_rank(lhs), _rank(rhs))
        if None in ranks:
            return None
        letters = _matmul_letters(*ranks)
        if letters is None:
            return None
        return Contraction(node, lhs, rhs, *letters, kind=kind, extra_scale=float(alpha),
                           bias=None if beta == 0 else bias)
    if kind == "einsum":
        equation = node.args[0]
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or len(operands) != 2:
            return None
        ranks = [_rank(o) for o in operands]
        if None in ranks:
            return None
        letters = _einsum_letters(equation, ranks)
        if letters is None:
            return None
        return Contraction(node, operands[0], operands[1], *letters, kind=kind)
    return None


@dataclass
class AttentionMatch:
    """One dense attention in a graph.

    ``output`` is the node whose value is the attention output (before any head merge or output
    projection). q, k, v are the nodes (or values) feeding it; ``*_letters`` give their
    dimensions in role letters (see module docstring). ``scale`` is the static softmax scale
    (None: the default ``head_dim ** -0.5``); ``scale_nodes`` are run-time scalar factors
    (("mul" | "div", node)); ``q_factors`` are tensors that scale the scores per query row and
    are folded into q. ``region`` holds the nodes the rewrite replaces. ``problems`` lists why
    it cannot be rewritten (empty: it can).
    """

    form: str
    output: fx.Node
    q: Any
    k: Any
    v: Any
    q_letters: str
    k_letters: str
    v_letters: str
    out_letters: str
    sizes: dict[str, int]
    scale: float | None = None
    scale_nodes: list[tuple[str, Any]] = field(default_factory=list)
    q_factors: list[tuple[str, Any]] = field(default_factory=list)
    mask: str | None = None
    dropout_p: float = 0.0
    region: list[fx.Node] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    module_target: str | None = None     # for nn.MultiheadAttention: the call_module target
    mha_batch_first: bool | None = None
    operand_scale: float = 1.0           # a scale already applied to q or k (``q = q * scale``)

    @property
    def softmax_scale(self) -> float | None:
        """The scale of the scores as written: the region's and the one folded into q or k."""
        return None if self.scale is None else self.scale * self.operand_scale

    @property
    def batch_letters(self) -> str:
        return "".join(c for c in self.q_letters if c not in "nd")

    @property
    def layout(self) -> str:
        """'bhnd', 'bnhd', 'bnd' (heads folded into batch), or the role letters."""
        canonical = {"abnd": "bhnd", "anbd": "bnhd", "and": "bnd", "nd": "nd"}
        return canonical.get(self.q_letters, self.q_letters)

    @property
    def head_dim(self) -> int | None:
        return self.sizes.get("d")

    @property
    def q_len(self) -> int | None:
        return self.sizes.get("n")

    @property
    def kv_len(self) -> int | None:
        return self.sizes.get("m")

    @property
    def batch_size(self) -> int:
        return math.prod(self.sizes.get(c, 1) for c in self.batch_letters)


def _record_sizes(name: str, letters: str, value: Any, sizes: dict[str, int]) -> str | None:
    """Record the sizes of an operand's letters; the problem, if its shape is unknown or
    disagrees with the other operands' (broadcast heads, as in grouped-query attention)."""
    shape = _shape(value)
    if shape is None:
        return f"the shape of {name} is unknown at capture"
    if len(shape) != len(letters) or any(sizes.setdefault(c, n) != n for c, n in zip(letters, shape)):
        return (f"{name} is broadcast against the other operands (grouped/multi-query heads), "
                "which SLA does not take")
    return None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _depends_on_input(node: Any) -> bool:
    """Whether a value depends on a graph input (placeholder), not only on parameters."""
    if not isinstance(node, fx.Node):
        return False
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        stack.extend(current.all_input_nodes)
    return False


_SCORE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "cast"}
_PROB_OPS = {"dropout", "cast"}


class _ScoreChain:
    """What happens between the q.k product and the softmax."""

    def __init__(self) -> None:
        self.nodes: list[fx.Node] = []
        self.scale = 1.0
        self.scale_nodes: list[tuple[str, Any]] = []
        self.score_factors: list[tuple[str, Any]] = []
        self.masks: list[str] = []
        self.problems: list[str] = []


def _walk_scores(node: Any, gm: fx.GraphModule | None, chain: _ScoreChain,
                 depth: int = 0) -> Contraction | None:
    """Follow the score chain backwards from the softmax input to the q.k contraction."""
    if not isinstance(node, fx.Node) or depth > 12:
        return None
    contraction = as_contraction(node, gm)
    if contraction is not None:
        return contraction
    kind = _fn_kind(node, gm)
    if kind not in _SCORE_OPS:
        return None
    out_shape = _shape(node_value(node))
    chain.nodes.append(node)
    if kind == "cast":
        return _walk_scores(node.args[0], gm, chain, depth + 1)
    if kind in ("masked_fill", "where"):
        if kind == "masked_fill":
            data = node.args[0]
        else:  # torch.where(mask, scores, fill) or torch.where(mask, fill, scores)
            data = node.args[1] if isinstance(node.args[1], fx.Node) else node.args[2]
        chain.masks.append("boolean")
        return _walk_scores(data, gm, chain, depth + 1)
    left, right = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    # Which operand continues the chain: the one with the scores' shape that leads to a product.
    for chain_side, other in ((left, right), (right, left)):
        if not isinstance(chain_side, fx.Node) or _shape(node_value(chain_side)) != out_shape:
            continue
        if kind == "div" and chain_side is right:
            continue
        saved = (len(chain.nodes), chain.scale, list(chain.scale_nodes),
                 list(chain.score_factors), list(chain.masks))
        _account_operand(kind, other, out_shape, chain)
        found = _walk_scores(chain_side, gm, chain, depth + 1)
        if found is not None:
            return found
        (n, chain.scale, chain.scale_nodes, chain.score_factors, chain.masks) = saved
        del chain.nodes[n:]
    chain.nodes.pop()
    return None


def _account_operand(kind: str, other: Any, out_shape: tuple[int, ...] | None,
                     chain: _ScoreChain) -> None:
    value = node_value(other)
    if kind in ("mul", "div"):
        if _is_scalar(other):
            chain.scale = chain.scale * other if kind == "mul" else chain.scale / other
        elif isinstance(other, fx.Node) and _is_scalar(value):
            chain.scale_nodes.append((kind, other))
        elif isinstance(other, fx.Node) and isinstance(value, torch.Tensor):
            chain.score_factors.append((kind, other))
        else:
            chain.problems.append(f"score scaling by {other!r} is not understood")
    else:  # add / sub
        if _is_scalar(other) or (isinstance(other, fx.Node) and _is_scalar(value)):
            return  # a constant shift: softmax ignores it
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            chain.masks.append("boolean")
        else:
            chain.masks.append("additive")


def _walk_probs(softmax: fx.Node, gm: fx.GraphModule | None,
                ) -> tuple[list[fx.Node], Contraction | None, float, list[str]]:
    """Follow the softmax output forward through dropout and casts to the contraction with v."""
    nodes: list[fx.Node] = []
    problems: list[str] = []
    dropout_p = 0.0
    current = softmax
    for _ in range(8):
        users = list(current.users)
        contractions = [c for c in (as_contraction(u, gm) for u in users) if c is not None]
        chain_users = [u for u in users if _fn_kind(u, gm) in _PROB_OPS]
        if contractions:
            if len(users) > 1:
                problems.append(
                    "attention probabilities are also used outside the attention "
                    f"({', '.join(u.name for u in users if u is not contractions[0].node)})"
                )
            return nodes, contractions[0], dropout_p, problems
        if len(chain_users) != 1:
            return nodes, None, dropout_p, problems
        if len(users) > 1:
            problems.append(
                "attention probabilities are also used outside the attention "
                f"({', '.join(u.name for u in users if u is not chain_users[0])})"
            )
        nxt = chain_users[0]
        if _fn_kind(nxt, gm) == "dropout":
            dropout_p = max(dropout_p, _dropout_p(nxt, gm))
        nodes.append(nxt)
        current = nxt
    return nodes, None, dropout_p, problems


def _dropout_p(node: fx.Node, gm: fx.GraphModule | None) -> float:
    if node.op == "call_module" and gm is not None:
        module = gm.get_submodule(str(node.target))
        return float(module.p) if module.training else 0.0
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "training", True) if node.target is not torch.dropout else _arg(node, 2, "train", True)
    return float(p) if _is_scalar(p) and training is True else 0.0


def _softmax_dim(node: fx.Node, gm: fx.GraphModule | None) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)).dim if gm is not None else None
    return _arg(node, 1, "dim")


def match_manual(softmax: fx.Node, gm: fx.GraphModule | None) -> AttentionMatch | None:
    """A manual attention around ``softmax``, or None if this softmax is not one."""
    value = node_value(softmax)
    shape = _shape(value)
    if shape is None:
        return None
    dim = _softmax_dim(softmax, gm)
    if not isinstance(dim, int):
        return None
    dim = dim % len(shape)
    chain = _ScoreChain()
    qk = _walk_scores(softmax.args[0], gm, chain)
    if qk is None:
        return None
    # Role letters: the softmax dimension is the key dimension m.
    scores = qk.out_letters
    if len(scores) != len(shape):
        return None
    key = scores[dim]
    contracted = [c for c in qk.lhs_letters if c in qk.rhs_letters and c not in scores]
    queries = [c for c in qk.lhs_letters if c in scores and c not in qk.rhs_letters]
    if (key in qk.lhs_letters or key not in qk.rhs_letters or len(contracted) != 1
            or len(queries) != 1
            or set(qk.lhs_letters) - set(scores) - set(contracted)
            or set(qk.rhs_letters) - set(scores) - set(contracted)):
        return None
    batch = [c for c in scores if c not in (key, queries[0])]
    if not (_depends_on_input(qk.rhs)):
        return None
    prob_nodes, pv, dropout_p, prob_problems = _walk_probs(softmax, gm)
    if pv is None:
        return None
    probs = prob_nodes[-1] if prob_nodes else softmax
    if pv.lhs is not probs or not _depends_on_input(pv.rhs):
        return None
    # Map the P operand's letters to roles positionally (the prob chain keeps the score layout).
    role_of_score = {c: "abcdefgh"[i] for i, c in enumerate(batch)}
    role_of_score[queries[0]] = "n"
    role_of_score[key] = "m"
    role_of_score[contracted[0]] = "d"
    if len(pv.lhs_letters) != len(scores):
        return None
    pv_role = {raw: role_of_score[s] for raw, s in zip(pv.lhs_letters, scores)}
    pv_contracted = [c for c in pv.lhs_letters if c in pv.rhs_letters and c not in pv.out_letters]
    if pv_contracted != [c for c in pv.lhs_letters if pv_role[c] == "m"]:
        return None
    value_dims = [c for c in pv.rhs_letters if c not in pv.lhs_letters]
    if len(value_dims) != 1 or set(pv.out_letters) != (set(pv.lhs_letters) - set(pv_contracted)) | set(value_dims):
        return None
    pv_role[value_dims[0]] = "e"
    q_letters = "".join(role_of_score[c] for c in qk.lhs_letters)
    k_letters = "".join(role_of_score[c] for c in qk.rhs_letters)
    v_letters = "".join(pv_role[c] for c in pv.rhs_letters)
    out_letters = "".join(pv_role[c] for c in pv.out_letters)

    form = qk.kind
    match = AttentionMatch(
        form=form, output=pv.node, q=qk.lhs, k=qk.rhs, v=pv.rhs, q_letters=q_letters,
        k_letters=k_letters, v_letters=v_letters, out_letters=out_letters,
        sizes={}, dropout_p=dropout_p,
    )
    problems = match.problems
    problems.extend(prob_problems)
    problems.extend(chain.problems)
    for name, letters, operand in (("q", q_letters, qk.lhs), ("k", k_letters, qk.rhs),
                                   ("v", v_letters, pv.rhs)):
        problem = _record_sizes(name, letters, node_value(operand), match.sizes)
        if problem:
            problems.append(problem)
    full = len(batch) + 2
    if len(q_letters) != full or len(k_letters) != full or len(v_letters) != full:
        problems.append("q, k and v do not all carry the batch and head dimensions (broadcast "
                        "operands), which SLA does not take")
    if match.sizes.get("d") != match.sizes.get("e"):
        problems.append("value head dim differs from the query/key head dim")
    scale = chain.scale * qk.extra_scale
    match.scale = scale
    match.operand_scale = _operand_scale(qk.lhs) * _operand_scale(qk.rhs)
    match.scale_nodes = chain.scale_nodes
    if qk.bias is not None:
        chain.masks.append("additive")
    for kind, factor in chain.score_factors:
        fshape = _shape(node_value(factor))
        if fshape is not None and _foldable_into_q(fshape, scores, key, qk.lhs_letters):
            match.q_factors.append((kind, factor))
        else:
            problems.append("the scores are scaled per key, which cannot be folded into q")
    if chain.masks:
        match.mask = "boolean" if "boolean" in chain.masks else "additive"
        problems.append(f"attention mask ({match.mask}) is not supported by SLA")
    for node in chain.nodes + [qk.node]:
        extra = [u for u in node.users if u not in chain.nodes and u is not softmax]
        if extra:
            problems.append(f"attention scores ({node.name}) are also used outside the attention")
            break
    match.region = [qk.node, *chain.nodes, softmax, *prob_nodes, pv.node]
    return match


_VIEW_METHODS = {"transpose", "permute", "reshape", "view", "contiguous", "flatten", "unflatten"}


def _operand_scale(node: Any) -> float:
    """A constant factor applied to an operand on its way to the product (``q * scale``,
    ``k.transpose(-2, -1) / sqrt(d)``): it is part of the softmax scale as written. The rewrite
    keeps such factors where they are (q and k are taken after them)."""
    factor = 1.0
    for _ in range(8):
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_method" and node.target in _VIEW_METHODS or (
                node.op == "call_function" and node.target is getattr and node.args[1] == "mT"):
            node = node.args[0]
            continue
        kind = _fn_kind(node, None)
        if kind in ("mul", "div") and len(node.args) == 2:
            left, right = node.args
            if _is_scalar(right):
                factor = factor * right if kind == "mul" else factor / right
                node = left
                continue
            if kind == "mul" and _is_scalar(left):
                factor *= left
                node = right
                continue
        break
    return factor


def _foldable_into_q(factor_shape: tuple[int, ...], scores: str, key: str, q_raw: str) -> bool:
    """A score factor with size 1 along the key dimension multiplies whole query rows; it can
    scale q instead when q's dimensions line up with the scores' (key letter -> head dim)."""
    offset = len(scores) - len(factor_shape)
    if offset < 0:
        return False
    key_pos = scores.index(key)
    if key_pos >= offset and factor_shape[key_pos - offset] != 1:
        return False
    return len(q_raw) == len(scores) and all(
        q == s for q, s in zip(q_raw, scores) if s != key
    )


def match_sdpa(node: fx.Node) -> AttentionMatch:
    q, k, v = node.args[0], node.args[1], node.args[2]
    attn_mask = _arg(node, 3, "attn_mask")
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    enable_gqa = _arg(node, 7, "enable_gqa", False)
    rank = _rank(q) or 4
    batch = "abcdefgh"[: rank - 2]
    match = AttentionMatch("sdpa", node, q, k, v, batch + "nd", batch + "md", batch + "me",
                           batch + "ne", {}, dropout_p=float(dropout_p) if _is_scalar(dropout_p) else 0.0)
    _fill_sizes(match)
    if attn_mask is not None:
        value = node_value(attn_mask)
        match.mask = "boolean" if getattr(value, "dtype", None) == torch.bool else "additive"
        match.problems.append(f"attention mask ({match.mask}) is not supported by SLA")
    if is_causal is not False:
        match.mask = "causal"
        match.problems.append("attention mask (causal) is not supported by SLA")
    if enable_gqa is not False:
        match.problems.append("grouped-query attention (enable_gqa) is not supported by SLA")
    if _is_scalar(scale):
        match.scale = float(scale)
    elif isinstance(scale, fx.Node):
        match.scale = 1.0
        match.scale_nodes.append(("mul", scale))
    match.region = [node]
    return match


def match_xformers(node: fx.Node) -> AttentionMatch:
    q, k, v = node.args[0], node.args[1], node.args[2]
    attn_bias = _arg(node, 3, "attn_bias")
    p = _arg(node, 4, "p", 0.0)
    scale = _arg(node, 5, "scale")
    rank = _rank(q) or 4
    letters = ("anbd", "ambd", "ambe", "anbe") if rank == 4 else ("and", "amd", "ame", "ane")
    match = AttentionMatch("xformers", node, q, k, v, *letters, {},
                           dropout_p=float(p) if _is_scalar(p) else 0.0)
    _fill_sizes(match)
    if attn_bias is not None:
        value = node_value(attn_bias)
        match.mask = "additive" if isinstance(value, torch.Tensor) else type(value).__name__
        match.problems.append(f"attention mask ({match.mask}) is not supported by SLA")
    if _is_scalar(scale):
        match.scale = float(scale)
    elif isinstance(scale, fx.Node):
        match.scale = 1.0
        match.scale_nodes.append(("mul", scale))
    match.region = [node]
    return match


def _fill_sizes(match: AttentionMatch) -> None:
    for name, letters, operand in (("q", match.q_letters, match.q), ("k", match.k_letters, match.k),
                                   ("v", match.v_letters, match.v)):
        problem = _record_sizes(name, letters, node_value(operand), match.sizes)
        if problem:
            match.problems.append(problem)
    if match.sizes.get("d") is not None and match.sizes.get("d") != match.sizes.get("e"):
        match.problems.append("value head dim differs from the query/key head dim")


def match_mha(node: fx.Node, gm: fx.GraphModule | None) -> AttentionMatch:
    """An ``nn.MultiheadAttention`` call (module) or ``F.multi_head_attention_forward`` call."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target)) if gm is not None else None
        batch_first = bool(getattr(module, "batch_first", False))
        num_heads = int(module.num_heads)
        embed_dim = int(module.embed_dim)
        masks = {"key_padding_mask": _arg(node, 3, "key_padding_mask"),
                 "attn_mask": _arg(node, 5, "attn_mask")}
        need_weights = _arg(node, 4, "need_weights", True)
        is_causal = _arg(node, 7, "is_causal", False)
        unsupported = []
        if module.bias_k is not None or module.bias_v is not None:
            unsupported.append("bias_k/bias_v (add_bias_kv)")
        if module.add_zero_attn:
            unsupported.append("add_zero_attn")
        form = "multihead_attention"
        target = str(node.target)
    else:
        batch_first = False
        embed_dim = _arg(node, 3, "embed_dim_to_check")
        num_heads = _arg(node, 4, "num_heads")
        masks = {"key_padding_mask": _arg(node, 14, "key_padding_mask"),
                 "attn_mask": _arg(node, 16, "attn_mask")}
        need_weights = _arg(node, 15, "need_weights", True)
        is_causal = _arg(node, 24, "is_causal", False)
        unsupported = []
        if _arg(node, 7, "bias_k") is not None or _arg(node, 8, "bias_v") is not None:
            unsupported.append("bias_k/bias_v")
        if _arg(node, 9, "add_zero_attn", False):
            unsupported.append("add_zero_attn")
        if _arg(node, 21, "static_k") is not None or _arg(node, 22, "static_v") is not None:
            unsupported.append("static_k/static_v")
        form = "multihead_attention"
        target = None
    shape_q = _shape(node_value(q))
    shape_k = _shape(node_value(k))
    head_dim = embed_dim // num_heads if isinstance(embed_dim, int) and isinstance(num_heads, int) else None
    sizes: dict[str, int] = {}
    if shape_q is not None and shape_k is not None:
        seq = 1 if batch_first and len(shape_q) == 3 else 0
        sizes["n"] = shape_q[seq]
        sizes["m"] = shape_k[seq]
        if len(shape_q) == 3:
            sizes["a"] = shape_q[0 if batch_first else 1]
    if isinstance(num_heads, int):
        sizes["b"] = num_heads
    if head_dim is not None:
        sizes["d"] = sizes["e"] = head_dim
    layout_q = "anbd" if batch_first else "nabd"
    match = AttentionMatch(form, node, q, k, v, layout_q, layout_q.replace("n", "m"),
                           layout_q.replace("n", "m").replace("d", "e"),
                           layout_q.replace("d", "e"), sizes, module_target=target,
                           mha_batch_first=batch_first)
    for name, mask in masks.items():
        if mask is not None:
            value = node_value(mask)
            match.mask = "boolean" if getattr(value, "dtype", None) == torch.bool else "additive"
            match.problems.append(f"attention mask ({match.mask}, {name}) is not supported by SLA")
    if is_causal is not False:
        match.mask = match.mask or "causal"
        match.problems.append("attention mask (causal) is not supported by SLA")
    for what in unsupported:
        match.problems.append(f"{what} is not supported by SLA")
    weights = [u for u in node.users
               if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0)]
    weights_used = any(
        not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and not u.users)
        for u in weights
    )
    if need_weights is not False and weights_used:
        match.problems.append("the attention weights are used by the caller; SLA does not "
                              "compute them")
    match.region = [node]
    return match


def find_matches(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Every dense attention in ``gm``'s graph, in graph order."""
    matches: list[AttentionMatch] = []
    for node in gm.graph.nodes:
        kind = _fn_kind(node, gm)
        if kind == "softmax":
            match = match_manual(node, gm)
        elif kind == "sdpa":
            match = match_sdpa(node)
        elif kind == "xformers":
            match = match_xformers(node)
        elif kind in ("mha_module", "mha_function"):
            match = match_mha(node, gm)
        else:
            continue
        if match is not None:
            matches.append(match)
    return matches


def infer_num_heads(match: AttentionMatch) -> int | None:
    """Heads of a match: the batch letter just before the rows in q (bhnd) or after them
    (bnhd); for (B*H, N, D) forms, found by looking back through q's reshapes."""
    sizes = match.sizes
    if match.form == "multihead_attention":
        return sizes.get("b")
    batch = match.batch_letters
    if len(batch) >= 2:
        # the heads are the batch dimension adjacent to the token/feature dims in q
        return sizes.get(batch[-1])
    d, n = sizes.get("d"), sizes.get("n")
    total = sizes.get(batch[0]) if batch else 1
    node = match.q
    for _ in range(8):
        if not isinstance(node, fx.Node) or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
        shape = _shape(node_value(node))
        if shape is None or len(shape) != 4 or d is None or n is None:
            continue
        if shape[-1] == d and shape[2] == n and shape[0] * shape[1] == total:
            return shape[1]
        if shape[-1] == d and shape[1] == n and shape[0] * shape[2] == total:
            return shape[2]
    return None


__all__ = [
    "AttentionMatch",
    "Contraction",
    "as_contraction",
    "find_matches",
    "infer_num_heads",
    "match_manual",
    "match_mha",
    "match_sdpa",
    "match_xformers",
]
