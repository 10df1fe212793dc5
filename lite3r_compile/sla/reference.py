"""Sparse Linear Attention in plain PyTorch: the specification every kernel is tested against.

Shapes: ``q`` is (B, H, Nq, D); ``k`` and ``v`` are (B, H, Nk, D). Queries are cut into
``Mq = ceil(Nq / block_q)`` blocks, keys into ``Mk = ceil(Nk / block_k)`` blocks; the last block of
either may be ragged (fewer real rows). Ragged rows are masked everywhere (pooling, softmax, the
linear-branch sums), never padded into a result.

The operator, for query block i and key block j:

1. Block scores ``S[i, j] = mean_{t in Q_i} q_t . mean_{s in K_j} (k_s - kbar)`` where ``kbar`` is
   the mean of k over all Nk keys. Means run over real rows only.
2. Classes per query block: the ``config.num_critical(Mk)`` highest scores are critical (2), the
   ``config.num_negligible(Mk)`` lowest are negligible (0), the rest marginal (1). Ties: scores are
   ordered by a stable descending sort, so among equal scores the lower key-block index ranks
   higher (it is the one that becomes critical first and negligible last).
3. Sparse branch: exact softmax attention of each query row over the real keys of the critical
   blocks of its query block, ``o_s = softmax(scale * q K_c^T) V_c``; ``lse`` is the natural-log
   logsumexp of ``scale * q K_c^T`` over those keys.
4. Linear branch with feature map phi (``softmax`` over the head dim, ``elu`` = elu + 1, ``relu``):
   ``h_j = phi(K_j)^T V_j`` (D x D) and ``z_j = phi(K_j)^T 1`` (D) per key block, over real rows;
   ``H_i = sum_{j marginal} h_j``, ``Z_i = sum_{j marginal} z_j``;
   ``o_l[t] = phi(q_t) H_i / (phi(q_t) . Z_i + LINEAR_DENOMINATOR_EPS)``.
   The epsilon (1e-6, for every feature map) keeps relu's denominator, which can be exactly zero,
   finite, and makes an empty marginal set give ``o_l = 0`` with finite gradients (H_i and Z_i are
   then exact zeros). It shifts softmax/elu results by about 1e-6 relative.
5. ``o = o_s + o_l W^T + b`` with ``W``, ``b`` the float32 ``proj_l`` parameters, cast to q's dtype.

All math runs in ``compute_dtype(q.dtype)``: float32, or float64 for float64 inputs (gradcheck).
No Nq x Nk tensor is built: the sparse branch walks the critical blocks of every query block a few
at a time with an online softmax, and the linear branch only forms (D x D) block summaries. The
linear branch sums the marginal blocks directly (a 0/1 (Mq x Mk) matrix product) rather than
"total minus critical minus negligible": it is the same sum, but with no cancellation, so an empty
marginal set is exactly zero. Everything is differentiable by autograd with ``block_class`` held
fixed (the classification is piecewise constant); ``sla_backward`` writes the same gradients out
by hand, as the specification of the backward kernels and the op's backward off CUDA.
Autocast is switched off inside: the spec's precision does not depend on the caller's region.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lite3r_compile.sla.config import SLAConfig

CRITICAL = 2
MARGINAL = 1
NEGLIGIBLE = 0

#: Added to the linear-branch denominator ``phi(q) . Z`` for every feature map.
LINEAR_DENOMINATOR_EPS = 1e-6

#: Keys per step of the sparse branch's online softmax (a multiple of block_k, at least one block):
#: bounds the score tile at (Nq x 512) per head.
_SPARSE_KEYS_PER_STEP = 512


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SLA computes in for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def default_scale(head_dim: int) -> float:
    return head_dim**-0.5


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q (B, H, Nq, D), k and v (B, H, Nk, D) fit together."""
    where = "lite3r_compile.sla (lite3r::sla_forward)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them first (SparseLinearAttention does so under autocast)"
        )
    batch, heads, _, head_dim = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:2] != (batch, heads):
        raise ValueError(
            f"{where}: q, k, v must share (B, H), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError(
            f"{where}: q, k, v must share the head dim D, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{where}: k and v must have the same length, got {k.shape[2]} and {v.shape[2]}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{where}: empty sequences are not supported (Nq={q.shape[2]}, Nk={k.shape[2]})")


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block), block, D), zero rows appended to the last block."""
    length = x.shape[2]
    padded = num_blocks(length, block) * block
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    return x.unflatten(2, (padded // block, block))


def _from_blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, M, block, ...) -> (B, H, length, ...), dropping the padded rows."""
    return x.flatten(2, 3)[:, :, :length]


def _row_valid(length: int, block: int, device: torch.device) -> torch.Tensor:
    """(M, block) bool: which rows of each block are real."""
    blocks = num_blocks(length, block)
    return (torch.arange(blocks * block, device=device) < length).view(blocks, block)


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, M, D): mean over the real rows of each block."""
    length = x.shape[2]
    sums = _to_blocks(x, block).sum(dim=3)
    counts = _row_valid(length, block, x.device).sum(dim=1).to(x.dtype)
    return sums / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, config: SLAConfig) -> torch.Tensor:
    """(B, H, Mq, Mk) scores, in compute dtype: pooled q per query block times pooled
    (k - mean over all keys of k) per key block. Softmax and 1/sqrt(D) are left out: they do not
    change the ranking."""
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)
    kf = k.to(dtype)
    pooled_q = _block_means(qf, config.block_q)
    pooled_k = _block_means(kf - kf.mean(dim=2, keepdim=True), config.block_k)
    return pooled_q @ pooled_k.transpose(-1, -2)


def classify_scores(scores: torch.Tensor, config: SLAConfig) -> torch.Tensor:
    """(B, H, Mq, Mk) scores -> int8 classes: CRITICAL (2), MARGINAL (1), NEGLIGIBLE (0).

    Deterministic: a stable descending sort ranks equal scores by ascending key-block index.
    """
    n_kblocks = scores.shape[-1]
    n_critical = config.num_critical(n_kblocks)
    n_negligible = config.num_negligible(n_kblocks)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    classes_by_rank = torch.full((n_kblocks,), MARGINAL, dtype=torch.int8, device=scores.device)
    classes_by_rank[:n_critical] = CRITICAL
    if n_negligible:
        classes_by_rank[n_kblocks - n_negligible :] = NEGLIGIBLE
    block_class = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    block_class.scatter_(-1, order, classes_by_rank.expand(scores.shape).contiguous())
    return block_class


def classify_blocks(q: torch.Tensor, k: torch.Tensor, config: SLAConfig) -> torch.Tensor:
    """int8 (B, H, Mq, Mk) block classes of q (B, H, Nq, D) against k (B, H, Nk, D)."""
    with torch.no_grad(), _no_autocast(q):
        return classify_scores(block_scores(q, k, config), config)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    # The spec computes in compute_dtype(q.dtype); an enclosing autocast region (the op's
    # implementation runs inside the caller's) must not lower the matmuls to bf16/fp16.
    return torch.autocast(x.device.type, enabled=False)


def _check_block_class(block_class: torch.Tensor, q: torch.Tensor, k: torch.Tensor, config: SLAConfig) -> None:
    expected = (
        q.shape[0],
        q.shape[1],
        num_blocks(q.shape[2], config.block_q),
        num_blocks(k.shape[2], config.block_k),
    )
    if tuple(block_class.shape) != expected:
        raise ValueError(
            f"lite3r_compile.sla: block_class has shape {tuple(block_class.shape)}, expected "
            f"(B, H, Mq, Mk) = {expected} for block_q={config.block_q}, block_k={config.block_k}"
        )


class _CriticalTile(NamedTuple):
    """A few critical key blocks of every query block, gathered side by side."""

    index: torch.Tensor  # (B, H, Mq, s) key-block index of each slot
    keys: torch.Tensor  # (B, H, Mq, s * bk, D)
    values: torch.Tensor  # (B, H, Mq, s * bk, D)
    valid: torch.Tensor  # (B, H, Mq, 1, s * bk) bool: a real key of a critical block


def _critical_tiles(
    k_blocks: torch.Tensor, v_blocks: torch.Tensor, k_len: int, block_class: torch.Tensor
) -> Iterator[_CriticalTile]:
    """Walk the critical key blocks of every query block, ``_SPARSE_KEYS_PER_STEP`` keys at a time.

    ``k_blocks``, ``v_blocks``: (B, H, Mk, bk, D). Query blocks with fewer critical blocks than
    the most have invalid slots in the last tiles, masked in ``valid``.
    """
    batch, heads, _, block_k, head_dim = k_blocks.shape
    is_critical = block_class == CRITICAL
    n_critical = is_critical.sum(dim=-1)
    if bool((n_critical == 0).any()):
        raise ValueError("lite3r_compile.sla.reference: a query block has no critical key block")
    # Critical key-block indices first, in ascending index order; slot s of a query block is valid
    # while s < its number of critical blocks.
    slot_order = torch.sort(is_critical.to(torch.int8), dim=-1, descending=True, stable=True)
    key_valid = _row_valid(k_len, block_k, k_blocks.device)  # (Mk, bk)
    k_flat, v_flat = k_blocks.flatten(3), v_blocks.flatten(3)  # (B, H, Mk, bk * D)
    n_qblocks = block_class.shape[2]
    slots_per_step = max(1, _SPARSE_KEYS_PER_STEP // block_k)
    for first in range(0, int(n_critical.max()), slots_per_step):
        index = slot_order.indices[..., first : first + slots_per_step]
        n_step = index.shape[-1]
        gather_index = index.flatten(2)[..., None].expand(-1, -1, -1, k_flat.shape[-1])
        tile_shape = (batch, heads, n_qblocks, n_step * block_k, head_dim)
        valid = key_valid[index] & slot_order.values[..., first : first + n_step, None].bool()
        yield _CriticalTile(
            index=index,
            keys=torch.gather(k_flat, 2, gather_index).view(tile_shape),
            values=torch.gather(v_flat, 2, gather_index).view(tile_shape),
            valid=valid.flatten(3)[:, :, :, None, :],
        )


def _scatter_add_tile(grad_blocks: torch.Tensor, index: torch.Tensor, grad_tile: torch.Tensor) -> None:
    """Add a tile's (B, H, Mq, s * bk, D) gradient into (B, H, Mk, bk, D) at its key blocks."""
    grad_flat = grad_blocks.flatten(3)
    n_rows = index.shape[2] * index.shape[3]
    gather_index = index.flatten(2)[..., None].expand(-1, -1, -1, grad_flat.shape[-1])
    grad_flat.scatter_add_(2, gather_index, grad_tile.reshape(*index.shape[:2], n_rows, -1))


def _sparse_blocks(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    k_len: int,
    block_class: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax over the critical tiles: blocked o_s (B, H, Mq, bq, D), lse (B, H, Mq, bq)."""
    running_max = q_blocks.new_full(q_blocks.shape[:-1], -math.inf)
    running_sum = q_blocks.new_zeros(q_blocks.shape[:-1])
    acc = torch.zeros_like(q_blocks)
    for tile in _critical_tiles(k_blocks, v_blocks, k_len, block_class):
        logits = (q_blocks @ tile.keys.transpose(-1, -2)) * scale  # (B, H, Mq, bq, s * bk)
        logits = logits.masked_fill(~tile.valid, -math.inf)
        # The result does not depend on the running max (it cancels between numerator and
        # denominator), so it is held constant for autograd.
        new_max = torch.maximum(running_max, logits.amax(dim=-1)).detach()
        rescale = torch.exp(running_max - new_max)
        probs = torch.exp(logits - new_max[..., None])
        running_sum = running_sum * rescale + probs.sum(dim=-1)
        acc = acc * rescale[..., None] + probs @ tile.values
        running_max = new_max
    return acc / running_sum[..., None], running_max + torch.log(running_sum)


def sparse_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_class: torch.Tensor,
    scale: float | None,
    config: SLAConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the critical key blocks.

    Returns ``o_s`` (B, H, Nq, D) and ``lse`` (B, H, Nq), both in compute dtype. Every query
    block needs at least one critical key block (ValueError otherwise).
    """
    _check_block_class(block_class, q, k, config)
    dtype = compute_dtype(q.dtype)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    with _no_autocast(q):
        o_s, lse = _sparse_blocks(
            _to_blocks(q.to(dtype), config.block_q),
            _to_blocks(k.to(dtype), config.block_k),
            _to_blocks(v.to(dtype), config.block_k),
            k.shape[2],
            block_class,
            scale,
        )
    q_len = q.shape[2]
    return _from_blocks(o_s, q_len), _from_blocks(lse[..., None], q_len)[..., 0]


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi of the linear branch, applied row-wise over the head dim."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"lite3r_compile.sla: unknown feature_map {name!r}; use 'softmax', 'elu' or 'relu'")


class _LinearBlocks(NamedTuple):
    """Intermediate values of the linear branch, blocked; padded rows are zeros."""

    phi_q: torch.Tensor  # (B, H, Mq, bq, D)
    phi_k: torch.Tensor  # (B, H, Mk, bk, D)
    v: torch.Tensor  # (B, H, Mk, bk, D)
    marginal: torch.Tensor  # (B, H, Mq, Mk) 0/1 in compute dtype
    kv: torch.Tensor  # H_i = sum_{j marginal} phi(K_j)^T V_j: (B, H, Mq, D, D)
    k_sum: torch.Tensor  # Z_i = sum_{j marginal} phi(K_j)^T 1: (B, H, Mq, D)
    denominator: torch.Tensor  # phi(q) . Z_i + eps: (B, H, Mq, bq, 1)
    o_l: torch.Tensor  # (B, H, Mq, bq, D)


def _linear_blocks(q, k, v, block_class, config: SLAConfig) -> _LinearBlocks:
    dtype = compute_dtype(q.dtype)
    # phi is applied before padding so that the padded rows stay exact zeros (phi(0) != 0).
    phi_q = _to_blocks(feature_map(q.to(dtype), config.feature_map), config.block_q)
    phi_k = _to_blocks(feature_map(k.to(dtype), config.feature_map), config.block_k)
    v_blocks = _to_blocks(v.to(dtype), config.block_k)

    block_kv = phi_k.transpose(-1, -2) @ v_blocks  # h_j: (B, H, Mk, D, D)
    block_k_sum = phi_k.sum(dim=3)  # z_j: (B, H, Mk, D)
    marginal = (block_class == MARGINAL).to(dtype)
    kv = (marginal @ block_kv.flatten(3)).unflatten(3, block_kv.shape[3:])
    k_sum = marginal @ block_k_sum
    denominator = phi_q @ k_sum[..., None] + LINEAR_DENOMINATOR_EPS
    o_l = (phi_q @ kv) / denominator
    return _LinearBlocks(phi_q, phi_k, v_blocks, marginal, kv, k_sum, denominator, o_l)


def linear_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_class: torch.Tensor,
    config: SLAConfig,
) -> torch.Tensor:
    """Linear attention over the marginal key blocks: (B, H, Nq, D) in compute dtype (float32
    for bf16/fp16/fp32 inputs). Query blocks without marginal key blocks get exact zeros."""
    _check_block_class(block_class, q, k, config)
    with _no_autocast(q):
        return _from_blocks(_linear_blocks(q, k, v, block_class, config).o_l, q.shape[2])


def sla_with_block_class(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    block_class: torch.Tensor,
    scale: float | None,
    config: SLAConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA with given block classes: ``(o, o_l, lse)``; ``o`` in q's dtype, the others in
    compute dtype. Differentiable in q, k, v, proj_weight, proj_bias."""
    check_inputs(q, k, v)
    dtype = compute_dtype(q.dtype)
    with _no_autocast(q):
        o_s, lse = sparse_branch(q, k, v, block_class, scale, config)
        o_l = linear_branch(q, k, v, block_class, config)
        projected = o_l @ proj_weight.to(dtype).transpose(0, 1) + proj_bias.to(dtype)
        return (o_s + projected).to(q.dtype), o_l, lse


def sla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    scale: float | None,
    config: SLAConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole operator: ``(o, o_l, lse, block_class)``.

    ``o`` (B, H, Nq, D) in q's dtype; ``o_l`` (B, H, Nq, D) and ``lse`` (B, H, Nq) in compute
    dtype; ``block_class`` int8 (B, H, Mq, Mk). ``scale=None`` means D**-0.5.
    """
    check_inputs(q, k, v)
    block_class = classify_blocks(q, k, config)
    o, o_l, lse = sla_with_block_class(q, k, v, proj_weight, proj_bias, block_class, scale, config)
    return o, o_l, lse, block_class


def feature_map_backward(x: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor, name: str) -> torch.Tensor:
    """d loss / d x from d loss / d phi(x), with ``phi = feature_map(x, name)``."""
    if name == "softmax":
        return phi * (grad_phi - (grad_phi * phi).sum(dim=-1, keepdim=True))
    if name == "elu":
        return grad_phi * torch.where(x > 0, 1.0, phi)  # d(elu(x) + 1)/dx = exp(x) = phi for x <= 0
    if name == "relu":
        return grad_phi * (x > 0)
    raise ValueError(f"lite3r_compile.sla: unknown feature_map {name!r}; use 'softmax', 'elu' or 'relu'")


def sla_backward(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    block_class: torch.Tensor,
    scale: float | None,
    config: SLAConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``o = sla_with_block_class(q, k, v, W, b, block_class, scale, config)[0]``:
    ``(dq, dk, dv, dW, db)`` in the dtypes of q, k, v, W, W, with the classes held fixed.

    Written out (not autograd) as the specification of the backward kernels, with g = grad_o:

    - projection: ``dW = sum g^T o_l``, ``db = sum g``, ``g_l = g W``;
    - sparse branch (FlashAttention backward): ``P = exp(scale q.k - lse)`` over critical keys,
      ``delta = rowsum(g * o_s)``, ``dV += P^T g``, ``dS = P * (g V^T - delta)``,
      ``dq += scale dS K``, ``dK += scale dS^T q``;
    - linear branch: ``dN = g_l / den``, ``dden = -rowsum(g_l * o_l) / den``;
      ``dphi(q) = dN H_i^T + dden Z_i``, ``dH_i = phi(q)^T dN``, ``dZ_i = phi(q)^T dden``;
      ``dh_j = sum_{i: j marginal} dH_i``, ``dz_j`` likewise; ``dphi(K_j) = V_j dh_j^T + 1 dz_j^T``,
      ``dV_j += phi(K_j) dh_j``; then through phi (``feature_map_backward``).
    """
    check_inputs(q, k, v)
    _check_block_class(block_class, q, k, config)
    dtype = compute_dtype(q.dtype)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    q_len, k_len = q.shape[2], k.shape[2]
    with torch.no_grad(), _no_autocast(q):
        grad = grad_o.to(dtype)
        weight = proj_weight.to(dtype)
        lin = _linear_blocks(q, k, v, block_class, config)
        o_l = _from_blocks(lin.o_l, q_len)
        d_weight = torch.einsum("bhne,bhnd->ed", grad, o_l)
        d_bias = grad.sum(dim=(0, 1, 2))

        # sparse branch
        q_blocks = _to_blocks(q.to(dtype), config.block_q)
        k_blocks = _to_blocks(k.to(dtype), config.block_k)
        v_blocks = _to_blocks(v.to(dtype), config.block_k)
        grad_blocks = _to_blocks(grad, config.block_q)
        o_s, lse = _sparse_blocks(q_blocks, k_blocks, v_blocks, k_len, block_class, scale)
        delta = (grad_blocks * o_s).sum(dim=-1, keepdim=True)  # (B, H, Mq, bq, 1)
        dq_blocks = torch.zeros_like(q_blocks)
        dk_blocks = torch.zeros_like(k_blocks)
        dv_blocks = torch.zeros_like(v_blocks)
        for tile in _critical_tiles(k_blocks, v_blocks, k_len, block_class):
            logits = (q_blocks @ tile.keys.transpose(-1, -2)) * scale
            probs = torch.exp(logits.masked_fill(~tile.valid, -math.inf) - lse[..., None])
            _scatter_add_tile(dv_blocks, tile.index, probs.transpose(-1, -2) @ grad_blocks)
            d_logits = probs * (grad_blocks @ tile.values.transpose(-1, -2) - delta) * scale
            dq_blocks += d_logits @ tile.keys
            _scatter_add_tile(dk_blocks, tile.index, d_logits.transpose(-1, -2) @ q_blocks)

        # linear branch
        grad_l = _to_blocks(grad @ weight, config.block_q)  # (B, H, Mq, bq, D)
        d_numerator = grad_l / lin.denominator
        d_denominator = -(grad_l * lin.o_l).sum(dim=-1, keepdim=True) / lin.denominator
        d_phi_q = d_numerator @ lin.kv.transpose(-1, -2) + d_denominator * lin.k_sum[..., None, :]
        d_kv = lin.phi_q.transpose(-1, -2) @ d_numerator  # (B, H, Mq, D, D)
        d_k_sum = (lin.phi_q * d_denominator).sum(dim=3)  # (B, H, Mq, D)
        marginal_t = lin.marginal.transpose(-1, -2)  # (B, H, Mk, Mq)
        d_block_kv = (marginal_t @ d_kv.flatten(3)).unflatten(3, d_kv.shape[3:])  # (B, H, Mk, D, D)
        d_block_k_sum = marginal_t @ d_k_sum  # (B, H, Mk, D)
        d_phi_k = lin.v @ d_block_kv.transpose(-1, -2) + d_block_k_sum[..., None, :]
        dv_blocks += lin.phi_k @ d_block_kv

        qf, kf = q.to(dtype), k.to(dtype)
        dq = _from_blocks(dq_blocks, q_len) + feature_map_backward(
            qf, _from_blocks(lin.phi_q, q_len), _from_blocks(d_phi_q, q_len), config.feature_map
        )
        dk = _from_blocks(dk_blocks, k_len) + feature_map_backward(
            kf, _from_blocks(lin.phi_k, k_len), _from_blocks(d_phi_k, k_len), config.feature_map
        )
        dv = _from_blocks(dv_blocks, k_len)
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        d_weight.to(proj_weight.dtype),
        d_bias.to(proj_weight.dtype),
    )
