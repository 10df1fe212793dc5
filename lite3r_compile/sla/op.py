"""The ``lite3r::sla_forward`` / ``lite3r::sla_backward`` custom ops.

Registered through ``torch.library.custom_op`` with fake implementations and autograd, so the
operator is one opaque node for ``torch.compile(fullgraph=True)``, ``torch.export`` and Inductor.
CUDA tensors go to the Triton kernels of ``lite3r_compile.sla.triton_sla``; every other device runs
the PyTorch reference (``lite3r_compile.sla.reference``).

``sla_forward(q, k, v, proj_weight, proj_bias, scale, topk, negligible, block_q, block_k,
feature_map, save_for_backward) -> (o, o_l, lse, block_class)``:

- ``o`` (B, H, Nq, D) in q's dtype: ``o_s + o_l W^T + b`` computed in float32;
- ``o_l`` (B, H, Nq, D): the linear branch before the projection;
- ``lse`` (B, H, Nq): natural-log logsumexp of ``scale * q.k`` over the critical keys of each row;
- ``block_class`` int8 (B, H, ceil(Nq / block_q), ceil(Nk / block_k)): 2 critical, 1 marginal,
  0 negligible.

``o_l`` and ``lse`` are float32 (float64 for float64 inputs, which only the reference path takes)
and have shape (0,) when ``save_for_backward`` is False. They and ``block_class`` are
non-differentiable outputs: gradients flow through ``o`` only.

``sla_backward(grad_o, q, k, v, o, o_l, lse, block_class, proj_weight, scale, block_q, block_k,
feature_map) -> (dq, dk, dv, d_proj_weight, d_proj_bias)`` differentiates ``o`` with the block
classes held fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lite3r_compile.sla import reference
from lite3r_compile.sla.config import SLAConfig

_NAMESPACE = "lite3r"


def _backward_config(block_q: int, block_k: int, feature_map: str) -> SLAConfig:
    # The backward takes the block classes from the forward, so only the block sizes and the
    # feature map of the config matter to it.
    return SLAConfig(topk=1.0, negligible=0.0, block_q=block_q, block_k=block_k, feature_map=feature_map)


def _triton_sla():
    try:
        from lite3r_compile.sla import triton_sla
    except ImportError as error:
        raise RuntimeError(
            "lite3r::sla_forward/sla_backward on CUDA needs the Triton kernels in "
            f"lite3r_compile.sla.triton_sla, which failed to import ({error}). Install triton, or "
            "move the tensors to the CPU to run the PyTorch reference."
        ) from error
    return triton_sla


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The fake implementations promise contiguous outputs; Inductor checks the strides.
    return tuple(t.contiguous() for t in tensors)


def _empty_saved(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=reference.compute_dtype(q.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::sla_forward", mutates_args=())
def sla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    scale: float,
    topk: float,
    negligible: float,
    block_q: int,
    block_k: int,
    feature_map: str,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    config = SLAConfig(topk=topk, negligible=negligible, block_q=block_q, block_k=block_k, feature_map=feature_map)
    with torch.no_grad():
        o, o_l, lse, block_class = reference.sla_forward(q, k, v, proj_weight, proj_bias, scale, config)
    if not save_for_backward:
        return o.contiguous(), _empty_saved(q), _empty_saved(q), block_class
    return _contiguous(o, o_l, lse, block_class)


@sla_forward.register_kernel("cuda")
def _sla_forward_cuda(q, k, v, proj_weight, proj_bias, scale, topk, negligible, block_q, block_k, feature_map, save_for_backward):
    reference.check_inputs(q, k, v)
    config = SLAConfig(topk=topk, negligible=negligible, block_q=block_q, block_k=block_k, feature_map=feature_map)
    return _contiguous(*_triton_sla().forward(q, k, v, proj_weight, proj_bias, scale, config, save_for_backward))


@sla_forward.register_fake
def _sla_forward_fake(q, k, v, proj_weight, proj_bias, scale, topk, negligible, block_q, block_k, feature_map, save_for_backward):
    reference.check_inputs(q, k, v)
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    saved_dtype = reference.compute_dtype(q.dtype)
    if save_for_backward:
        o_l = q.new_empty((batch, heads, q_len, head_dim), dtype=saved_dtype)
        lse = q.new_empty((batch, heads, q_len), dtype=saved_dtype)
    else:
        o_l = _empty_saved(q)
        lse = _empty_saved(q)
    n_qblocks = (q_len + block_q - 1) // block_q
    n_kblocks = (k_len + block_k - 1) // block_k
    block_class = q.new_empty((batch, heads, n_qblocks, n_kblocks), dtype=torch.int8)
    return q.new_empty(q.shape), o_l, lse, block_class


@torch.library.custom_op(f"{_NAMESPACE}::sla_backward", mutates_args=())
def sla_backward(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    o_l: torch.Tensor,
    lse: torch.Tensor,
    block_class: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    feature_map: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The reference backward recomputes the forward from the saved block classes; o, o_l and lse
    # are what the Triton backward needs, not this one.
    config = _backward_config(block_q, block_k, feature_map)
    return _contiguous(*reference.sla_backward(grad_o, q, k, v, proj_weight, block_class, scale, config))


@sla_backward.register_kernel("cuda")
def _sla_backward_cuda(grad_o, q, k, v, o, o_l, lse, block_class, proj_weight, scale, block_q, block_k, feature_map):
    config = _backward_config(block_q, block_k, feature_map)
    return _contiguous(*_triton_sla().backward(grad_o, q, k, v, o, o_l, lse, block_class, proj_weight, scale, config))


@sla_backward.register_fake
def _sla_backward_fake(grad_o, q, k, v, o, o_l, lse, block_class, proj_weight, scale, block_q, block_k, feature_map):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        proj_weight.new_empty(proj_weight.shape),
        proj_weight.new_empty((proj_weight.shape[0],)),
    )


# sla_forward's inputs after q, k, v, proj_weight, proj_bias: scale ... save_for_backward
_NON_TENSOR_INPUTS = 7


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, proj_weight, _, scale, _, _, block_q, block_k, feature_map, save_for_backward = inputs
    o, o_l, lse, block_class = output
    ctx.mark_non_differentiable(o_l, lse, block_class)
    ctx.save_for_backward(q, k, v, proj_weight, o, o_l, lse, block_class)
    ctx.scale = scale
    ctx.block_q = block_q
    ctx.block_k = block_k
    ctx.feature_map = feature_map
    ctx.saved = save_for_backward


def _backward(ctx, grad_o, grad_o_l, grad_lse, grad_block_class):
    if not ctx.saved:
        raise RuntimeError(
            "lite3r::sla_forward was called with save_for_backward=False, so it kept nothing to "
            "differentiate; call it with save_for_backward=True (sla_attention and "
            "SparseLinearAttention do so whenever grad mode is on and an input requires grad)"
        )
    q, k, v, proj_weight, o, o_l, lse, block_class = ctx.saved_tensors
    dq, dk, dv, d_weight, d_bias = torch.ops.lite3r.sla_backward(
        grad_o.contiguous(), q, k, v, o, o_l, lse, block_class, proj_weight,
        ctx.scale, ctx.block_q, ctx.block_k, ctx.feature_map,
    )
    return (dq, dk, dv, d_weight, d_bias) + (None,) * _NON_TENSOR_INPUTS


sla_forward.register_autograd(_backward, setup_context=_setup_context)


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    scale: float | None = None,
    config: SLAConfig = SLAConfig(),
) -> torch.Tensor:
    """Sparse Linear Attention of q (B, H, Nq, D) over k, v (B, H, Nk, D) -> (B, H, Nq, D) in q's
    dtype, through the ``lite3r::sla_forward`` op. ``proj_weight`` (D, D) and ``proj_bias`` (D,)
    project the linear branch (float32); ``scale=None`` means D**-0.5.

    On CUDA, where every key block is critical (:func:`every_block_critical`: ``topk=1.0``, or a
    sequence of a block or two such as VGGT's camera trunk over S tokens), there is no linear
    branch and SLA is exact softmax attention plus ``proj_bias``: that case runs
    ``F.scaled_dot_product_attention``, faster there and with no Triton kernel to compile for a
    shape seen once (VGGT-1B's float32 camera trunk spent minutes compiling and autotuning kernels
    in its first training step without this). On other devices the op runs the reference, the
    specification, bit for bit. Under ``torch.compile`` / ``torch.export`` the op always runs
    (the same values), so traced graphs do not depend on the sequence's block count.

    With ``config.dense_rows``, those query rows are then recomputed as exact attention (SDPA over
    every key, plus ``proj_bias``, as where every block is critical) and written over SLA's.
    """
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    if q.is_cuda and not torch.compiler.is_compiling() and every_block_critical(k.shape[2], config):
        return dense_attention(q, k, v, proj_weight, proj_bias, scale)
    save_for_backward = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, proj_weight, proj_bias)
    )
    o, _, _, _ = torch.ops.lite3r.sla_forward(
        q, k, v, proj_weight, proj_bias, scale,
        config.topk, config.negligible, config.block_q, config.block_k, config.feature_map,
        save_for_backward,
    )
    if config.dense_rows is not None:
        rows = dense_row_index(q.shape[2], *config.dense_rows, device=q.device)
        exact = dense_attention(q.index_select(2, rows), k, v, proj_weight, proj_bias, scale)
        # in place unless autograd needs o as the op returned it (the op saves it for backward)
        o = o.index_copy(2, rows, exact) if save_for_backward else o.index_copy_(2, rows, exact)
    return o


def dense_row_index(n_queries: int, period: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """int64 indices of the rows ``i < n_queries`` with ``i % period < count``
    (:attr:`SLAConfig.dense_rows`), in ascending order, built without data-dependent ops."""
    # // and %, not divmod: under dynamic shapes n_queries is a SymInt, and a builtin such as
    # divmod is a suspect for the "Failed to trace builtin operator" break torch 2.11 reported
    # (benchmarks/NOTES.md, session 9; not confirmed)
    frames, tail = n_queries // period, n_queries % period
    index = (torch.arange(frames, device=device)[:, None] * period + torch.arange(count, device=device)).flatten()
    extra = min(count, tail)
    if extra:
        index = torch.cat([index, frames * period + torch.arange(extra, device=device)])
    return index


def every_block_critical(n_keys: int, config: SLAConfig) -> bool:
    """Whether all ceil(n_keys / block_k) key blocks of a query block are critical (so SLA has no
    linear branch and no negligible block); False for no keys."""
    n_kblocks = reference.num_blocks(n_keys, config.block_k)
    return n_kblocks > 0 and config.num_critical(n_kblocks) == n_kblocks


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                    proj_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """SLA where every key block is critical: softmax(scale q k^T) v + proj_l(o_l) with o_l = 0,
    i.e. SDPA's output (in q's dtype) + ``proj_bias``, added in float32 and rounded to q's dtype."""
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # d(out)/d(proj_weight) = g^T o_l = 0: keeping the weight in the graph (times zero) gives it
    # the zero gradient the op gives, not None, so optimizers and DDP see every projection.
    bias = proj_bias + 0.0 * proj_weight.sum(dim=1)
    acc = torch.promote_types(torch.promote_types(q.dtype, bias.dtype), torch.float32)
    return (o.to(acc) + bias.to(acc)).to(q.dtype)
