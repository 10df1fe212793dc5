"""Score a student against its teacher and against ground truth on multi-view scenes.

Outputs are read by the upstream names the zoo's 3D models use: ``depth`` (B, S, H, W[, 1]),
``world_points`` (B, S, H, W, 3) and ``pose_enc`` (B, S, 9); references may instead give
``extrinsics`` (B, S, 3, 4), as ground truth does. Keys a model does not produce are skipped.
Against ground truth, predictions are scale-aligned per scene by the median depth ratio (feed-
forward models predict up to scale); against the teacher they are compared as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lite3r_compile.distill import metrics


def _depth(out: Mapping[str, Tensor]) -> Tensor | None:
    d = out.get("depth")
    if d is None:
        return None
    return d[..., 0] if d.dim() >= 5 and d.shape[-1] == 1 else d


def _extrinsics(out: Mapping[str, Tensor]) -> Tensor | None:
    if "extrinsics" in out:
        return out["extrinsics"]
    if "pose_enc" in out:
        return metrics.pose_encoding_to_extrinsics(out["pose_enc"].float())
    return None


def reconstruction_metrics(pred: Mapping[str, Tensor], ref: Mapping[str, Tensor], *, align_scale: bool) -> dict[str, float]:
    """Depth, point-map and camera metrics of one batch of predictions against references."""
    out: dict[str, float] = {}
    d_pred, d_ref = _depth(pred), _depth(ref)
    scale = None
    if d_pred is not None and d_ref is not None:
        d_pred, d_ref = d_pred.float(), d_ref.float().to(d_pred.device)
        if align_scale:
            valid = torch.isfinite(d_ref) & (d_ref > 0) & (d_pred > 0)
            scale = d_ref[valid].median() / d_pred[valid].median().clamp_min(1e-12)
            d_pred = d_pred * scale
        out["depth_abs_rel"] = metrics.depth_abs_rel(d_pred, d_ref)
        out["depth_delta_1.25"] = metrics.depth_delta(d_pred, d_ref)
    if "world_points" in pred and "world_points" in ref:
        p = pred["world_points"].float()
        if scale is not None:
            p = p * scale
        out.update({f"points_{k}": v for k, v in metrics.point_cloud_errors(p, ref["world_points"].float().to(p.device)).items()})
    e_pred, e_ref = _extrinsics(pred), _extrinsics(ref)
    if e_pred is not None and e_ref is not None:
        cams = metrics.camera_metrics(e_pred.float().cpu(), e_ref.float().cpu())
        out.update({f"camera_{k}": v for k, v in cams.items()})
    return out


@torch.no_grad()
def evaluate(
    student: nn.Module, teacher: nn.Module | None, scenes: Iterable[Mapping[str, Any]], *, device: torch.device | str = "cpu"
) -> dict[str, dict[str, float]]:
    """Mean metrics over ``scenes`` (dicts with ``images`` (S, 3, H, W) or (B, S, 3, H, W) and
    optional ground truth): ``{"student_vs_teacher": ..., "student_vs_gt": ..., "teacher_vs_gt": ...}``."""
    student.eval()
    if teacher is not None:
        teacher.eval()
    sums: dict[str, dict[str, list[float]]] = {}

    def add(group: str, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            sums.setdefault(group, {}).setdefault(k, []).append(v)

    for scene in scenes:
        tensors = {k: v for k, v in scene.items() if isinstance(v, Tensor)}
        if tensors["images"].dim() == 4:  # one unbatched scene: every tensor gains B = 1
            tensors = {k: v[None] for k, v in tensors.items()}
        images = tensors.pop("images").to(device)
        gt = tensors
        s_out = student(images)
        has_gt = any(k in gt for k in ("depth", "world_points", "extrinsics"))
        if teacher is not None:
            t_out = teacher(images)
            add("student_vs_teacher", reconstruction_metrics(s_out, t_out, align_scale=False))
            if has_gt:
                add("teacher_vs_gt", reconstruction_metrics(t_out, gt, align_scale=True))
        if has_gt:
            add("student_vs_gt", reconstruction_metrics(s_out, gt, align_scale=True))
    return {group: {k: sum(v) / len(v) for k, v in values.items()} for group, values in sums.items()}
