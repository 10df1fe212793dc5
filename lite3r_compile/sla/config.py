"""Configuration of Sparse Linear Attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureMap = Literal["softmax", "elu", "relu"]
FEATURE_MAPS: tuple[str, ...] = ("softmax", "elu", "relu")


@dataclass(frozen=True)
class SLAConfig:
    """How Sparse Linear Attention splits the key blocks of each query block.

    Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k`` rows. For
    each query block, the ``ceil(topk * n_kblocks)`` highest-scoring key blocks (at least one) are
    *critical* and get exact softmax attention; the ``floor(negligible * n_kblocks)``
    lowest-scoring ones are *negligible* and skipped; the rest are *marginal* and go through the
    linear-attention branch with feature map ``feature_map``.

    ``topk=1.0`` makes every block critical: SLA then computes exact dense attention.

    The default blocks, 128 queries x 64 keys, were measured faster than 64 x 64 on an H100 at
    every size (benchmarks/NOTES.md, SLA kernels): half as many query blocks halve the block map
    and the linear branch's marginal sums, and the fused kernel's tiles are larger. Any powers of
    two >= 16 work.

    ``dense_rows=(period, count)``: the query rows whose index modulo ``period`` is below
    ``count`` get exact softmax attention over every key instead (their SLA output is replaced).
    VGGT puts a camera token and register tokens at the start of each frame's tokens; in global
    attention they share a query block with patch tokens, whose mean query then picks their key
    blocks, and the camera head reads nothing else: ``(tokens_per_frame, patch_start_idx)`` gives
    them dense rows for a few rows' cost (benchmarks/NOTES.md, session 8). ``None``: no dense rows.
    """

    topk: float = 0.1
    negligible: float = 0.0
    block_q: int = 128
    block_k: int = 64
    feature_map: FeatureMap = "softmax"
    dense_rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"SLAConfig.topk must be in (0, 1], got {self.topk}")
        if not 0.0 <= self.negligible < 1.0:
            raise ValueError(f"SLAConfig.negligible must be in [0, 1), got {self.negligible}")
        if self.topk + self.negligible > 1.0:
            raise ValueError(
                f"SLAConfig.topk + negligible must be <= 1, got {self.topk} + {self.negligible}"
            )
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"SLAConfig.{name} must be a power of two >= 16, got {size}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"SLAConfig.feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}"
            )
        if self.dense_rows is not None:
            rows = tuple(self.dense_rows)  # JSON gives a list
            if len(rows) != 2 or not all(isinstance(r, int) for r in rows) or not 0 < rows[1] <= rows[0]:
                raise ValueError(
                    f"SLAConfig.dense_rows must be (period, count) with 0 < count <= period, got {self.dense_rows!r}"
                )
            object.__setattr__(self, "dense_rows", rows)

    def num_critical(self, n_kblocks: int) -> int:
        """Critical key blocks per query block: ``ceil(topk * n_kblocks)``, at least 1."""
        return max(1, min(n_kblocks, _ceil(self.topk * n_kblocks)))

    def num_negligible(self, n_kblocks: int) -> int:
        """Negligible key blocks per query block: ``floor(negligible * n_kblocks)``, never
        eating into the critical ones."""
        return max(0, min(n_kblocks - self.num_critical(n_kblocks), int(self.negligible * n_kblocks)))


def _ceil(x: float) -> int:
    # Guard against float noise: 0.1 * 30 = 3.0000000000000004 must give 3, not 4.
    return int(-(-round(x, 9) // 1))
