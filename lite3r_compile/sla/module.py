"""``SparseLinearAttention``: the module that replaces a dense attention site."""

from __future__ import annotations

import torch
from torch import nn

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.op import sla_attention

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class SparseLinearAttention(nn.Module):
    """Sparse Linear Attention over heads of size ``head_dim``.

    ``forward(q, k, v, scale=None)``: q (B, H, Nq, D), k and v (B, H, Nk, D) -> (B, H, Nq, D) in
    q's dtype; ``scale=None`` means D**-0.5. The math is in ``lite3r_compile.sla.reference``.

    ``proj_l`` (``nn.Linear(D, D)``) projects the linear branch. It is initialised to zero, so a
    fresh module is exactly block-sparse attention (dense attention at ``topk=1.0``), and it stays
    in float32: casting the module to float16/bfloat16 (``.to``, ``.half()``, ``.bfloat16()``)
    moves ``proj_l`` to the new device but keeps its dtype; ``.double()`` makes it float64.

    Under autocast, q, k and v are cast to the autocast dtype (as SDPA does); otherwise to their
    common dtype (q, k in float32 after a qk-norm and v in bfloat16 meet in float32).
    """

    def __init__(self, head_dim: int, config: SLAConfig = SLAConfig()) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.config = config
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"SparseLinearAttention(head_dim={self.head_dim}): got q with head dim {q.shape[-1]}"
            )
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))
        return sla_attention(q, k, v, self.proj_l.weight, self.proj_l.bias, scale, self.config)

    def _apply(self, fn, recurse=True):
        def keep_projection_precision(t: torch.Tensor) -> torch.Tensor:
            converted = fn(t)
            if converted.dtype in _LOW_PRECISION and t.dtype not in _LOW_PRECISION:
                return t.to(device=converted.device)
            return converted

        return super()._apply(keep_projection_precision, recurse)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"head_dim={self.head_dim}, topk={c.topk}, negligible={c.negligible}, "
            f"block_q={c.block_q}, block_k={c.block_k}, feature_map={c.feature_map!r}"
            + (f", dense_rows={c.dense_rows}" if c.dense_rows is not None else "")
        )
