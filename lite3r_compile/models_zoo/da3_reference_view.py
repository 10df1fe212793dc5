"""Reference-view selection of Depth Anything 3.

With three or more views and no camera conditioning, DA3 picks one view per batch element from
its features just before the first alternating block, moves it to position 0 (the position that
receives the reference camera token, so predicted poses are relative to it), and restores the
input order on the outputs. The choice depends on the data; facts follow upstream
`depth_anything_3/model/reference_view_selector.py` and `utils/constants.py`.
"""

from __future__ import annotations

import torch

# Upstream's THRESH_FOR_REF_SELECTION: fewer views keep their input order.
MIN_VIEWS_FOR_REFERENCE_SELECTION = 3

REFERENCE_VIEW_STRATEGIES = ("first", "middle", "saddle_balanced", "saddle_sim_range")


def _min_max_normalise(metric: torch.Tensor) -> torch.Tensor:
    low = metric.min(dim=1, keepdim=True).values
    high = metric.max(dim=1, keepdim=True).values
    return (metric - low) / (high - low + 1e-8)


def select_reference_view(tokens: torch.Tensor, strategy: str = "saddle_balanced") -> torch.Tensor:
    """Index of the reference view of each batch element.

    Args:
        tokens: (B, S, N, C); token 0 of each view (the cls token) summarises the view.
        strategy: "first" (view 0), "middle" (view S // 2), "saddle_balanced" (the view whose
            mean cosine similarity to the others, cls-token norm and normalised-token variance,
            each min-max normalised over views, are together closest to 0.5),
            "saddle_sim_range" (the view with the widest range of cosine similarities).

    Returns:
        (B,) int64.
    """
    if strategy not in REFERENCE_VIEW_STRATEGIES:
        raise ValueError(
            f"select_reference_view: unknown strategy {strategy!r}; "
            f"use one of {', '.join(REFERENCE_VIEW_STRATEGIES)}"
        )
    batch, views = tokens.shape[:2]
    if views <= 1 or strategy == "first":
        return torch.zeros(batch, dtype=torch.long, device=tokens.device)
    if strategy == "middle":
        return torch.full((batch,), views // 2, dtype=torch.long, device=tokens.device)

    summary = tokens[:, :, 0]
    unit = summary / summary.norm(dim=-1, keepdim=True)
    similarity = torch.matmul(unit, unit.transpose(1, 2))
    off_diagonal = similarity - torch.eye(views, device=similarity.device).unsqueeze(0)
    if strategy == "saddle_balanced":
        mean_similarity = off_diagonal.sum(dim=-1) / (views - 1)
        balance = (
            (_min_max_normalise(mean_similarity) - 0.5).abs()
            + (_min_max_normalise(summary.norm(dim=-1)) - 0.5).abs()
            + (_min_max_normalise(unit.var(dim=-1)) - 0.5).abs()
        )
        return balance.argmin(dim=1)
    similarity_range = off_diagonal.max(dim=-1).values - off_diagonal.min(dim=-1).values
    return similarity_range.argmax(dim=1)


def reorder_by_reference(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Move view reference[b] to position 0, keeping the others in order.

    x (B, S, ...), reference (B,) -> (B, S, ...); e.g. reference 2 of 5 views gives [2, 0, 1, 3, 4].
    """
    batch, views = x.shape[:2]
    if views <= 1:
        return x
    positions = torch.arange(views, device=x.device).unsqueeze(0).expand(batch, -1)
    ref = reference.unsqueeze(1)
    source = torch.where((positions > 0) & (positions <= ref), positions - 1, positions)
    source[:, 0] = reference
    rows = torch.arange(batch, device=x.device).unsqueeze(1)
    return x[rows, source]


def restore_original_order(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Inverse of reorder_by_reference: x (B, S, ...), reference (B,) -> (B, S, ...)."""
    batch, views = x.shape[:2]
    if views <= 1:
        return x
    positions = torch.arange(views, device=x.device).unsqueeze(0).expand(batch, -1)
    ref = reference.unsqueeze(1)
    source = torch.where(positions < ref, positions + 1, positions)
    source = torch.scatter(source, dim=1, index=ref, src=torch.zeros_like(ref))
    rows = torch.arange(batch, device=x.device).unsqueeze(1)
    return x[rows, source]
