"""A stand-in for ``xformers.ops.memory_efficient_attention`` (xformers is not installed here).

Real 3D-transformer code (DINOv2's ``MemEffAttention``, π3, CroCo forks) calls
``xformers.ops.memory_efficient_attention(q, k, v, attn_bias)`` on tensors in the (B, N, H, D)
layout. This module gives generated test models the same call with the same signature and
semantics, so the attention finder can be tested on that form without xformers.

How it looks to a graph capture (this is what the finder matches):

- The Python function :func:`memory_efficient_attention` has ``__name__ ==
  "memory_efficient_attention"`` and a ``__module__`` containing ``"xformers"``
  (``lite3r_compile.testing.xformers_ops`` here, ``xformers.ops.fmha`` for the real one). A tracer
  that treats it as a leaf (``torch.fx.Tracer(autowrap_functions=(memory_efficient_attention,))``)
  records one ``call_function`` node with that function as target.
- Traced through (plain ``torch.fx.symbolic_trace``, ``make_fx``, ``torch.export``), the function
  body is a single torch op: ``torch.ops.xformers_standin.memory_efficient_attention`` (FX symbolic
  trace records the ``OpOverloadPacket``; make_fx and export record ``.default``). Its arguments
  are always positional: ``(query, key, value, attn_bias, p, scale)``.

Both are recognised by one rule: the target is named ``memory_efficient_attention`` and its module
or op namespace contains ``"xformers"``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["memory_efficient_attention", "is_xformers_attention"]


def _reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    scale: Optional[float],
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v on (B, N, H, D) tensors; returns (B, Nq, H, Dv)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bnhd,bmhd->bhnm", query, key) * scale
    if attn_bias is not None:
        logits = logits + attn_bias
    weights = logits.softmax(dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", weights, value)


def _check_arguments(query, key, value, attn_bias, p) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "memory_efficient_attention (stand-in) takes query, key, value of shape (B, N, H, D); "
            f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape[:-1] != value.shape[:-1] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "memory_efficient_attention (stand-in): key and value must agree on (B, M, H) and "
            f"query and key on D; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        raise TypeError(
            "memory_efficient_attention (stand-in): attn_bias must be an additive float tensor "
            "(as in xformers); convert a boolean mask with masked_fill(~keep, -inf)"
        )
    if p != 0.0:
        raise NotImplementedError(
            "memory_efficient_attention (stand-in) implements p=0.0 only; generated test models "
            "never draw attention dropout"
        )


@torch.library.custom_op("xformers_standin::memory_efficient_attention", mutates_args=())
def _memory_efficient_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    p: float,
    scale: Optional[float],
) -> torch.Tensor:
    _check_arguments(query, key, value, attn_bias, p)
    return _reference(query, key, value, attn_bias, scale).contiguous()


@_memory_efficient_attention_op.register_fake
def _memory_efficient_attention_fake(query, key, value, attn_bias, p, scale):
    _check_arguments(query, key, value, attn_bias, p)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_bias, _p, scale = inputs
    ctx.save_for_backward(query, key, value, attn_bias)
    ctx.scale = scale


def _backward(ctx, grad_output):
    # The stand-in is a test fixture, not a kernel: recomputing the reference under autograd is
    # the simplest backward that is exact.
    query, key, value, attn_bias = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
        output = _reference(*inputs, attn_bias, ctx.scale)
        grads = torch.autograd.grad(output, inputs, grad_output)
    return grads[0], grads[1], grads[2], None, None, None


_memory_efficient_attention_op.register_autograd(_backward, setup_context=_setup_context)


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor] = None,
    p: float = 0.0,
    scale: Optional[float] = None,
    *,
    op=None,
    output_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Dense attention on (B, N, H, D) tensors with xformers' signature.

    Args:
        query: (B, Nq, H, D).
        key, value: (B, Nk, H, D) and (B, Nk, H, Dv).
        attn_bias: additive float tensor broadcastable to (B, H, Nq, Nk), or None.
        p: dropout probability; only 0.0 is implemented.
        scale: softmax scale, default D^-0.5.
        op, output_dtype: accepted for signature compatibility; ``op`` picks an xformers kernel
            and has no meaning here, ``output_dtype`` must be None.

    Returns:
        (B, Nq, H, Dv) = softmax(q k^T * scale + attn_bias) v per head.
    """
    if output_dtype is not None:
        raise NotImplementedError("memory_efficient_attention (stand-in): output_dtype is not supported")
    # No Python control flow on tensors here, so plain symbolic tracing records one op node.
    return torch.ops.xformers_standin.memory_efficient_attention(query, key, value, attn_bias, p, scale)


def is_xformers_attention(target: object) -> bool:
    """Whether an FX ``call_function`` target is xformers' memory-efficient attention.

    True for the Python function (real ``xformers.ops.fmha.memory_efficient_attention`` or this
    stand-in) and for the torch op this stand-in registers (packet or overload).
    """
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = target._qualified_op_name if isinstance(target, torch._ops.OpOverloadPacket) else target.name()
        namespace, _, name = qualified.partition("::")
        return "xformers" in namespace and name.split(".")[0] == "memory_efficient_attention"
    return (
        getattr(target, "__name__", None) == "memory_efficient_attention"
        and "xformers" in (getattr(target, "__module__", None) or "")
    )
