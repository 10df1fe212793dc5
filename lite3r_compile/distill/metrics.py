"""Reconstruction metrics: depth, point maps and cameras.

Every function takes batched tensors and returns a Python float (a mean over the batch), so the
same code scores student-vs-teacher and student-vs-ground-truth. Conventions follow the
multi-view reconstruction literature (VGGT, DUSt3R evaluations):

- depth: AbsRel = mean |d - d*| / d*, and delta<1.25 = fraction of pixels with
  max(d / d*, d* / d) < 1.25, over pixels where the reference is valid (finite, > 0). Predictions
  of scale-ambiguous models are aligned per view by the median ratio first (``align="median"``).
- points: accuracy = mean distance from each predicted point to its nearest reference point,
  completeness = the same from reference to prediction, Chamfer = their mean.
- cameras: extrinsics are world-to-camera (..., 3, 4) [R | t]. For every ordered pair of views
  (i, j), the relative rotation error is the angle of R_ij^T R*_ij and the relative translation
  error the angle between t_ij and t*_ij (scale-free); AUC@T integrates, over thresholds 1..T
  degrees, the fraction of pairs whose larger error is under the threshold.
"""

from __future__ import annotations


import torch
from torch import Tensor


def _valid_depth(ref: Tensor, mask: Tensor | None) -> Tensor:
    valid = torch.isfinite(ref) & (ref > 0)
    return valid if mask is None else valid & mask.bool()


def align_depth_median(pred: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scale each view of ``pred`` (..., H, W) so its median over valid pixels equals ``ref``'s."""
    valid = _valid_depth(ref, mask) & torch.isfinite(pred) & (pred > 0)
    nan = torch.tensor(float("nan"), dtype=pred.dtype, device=pred.device)
    med_p = torch.where(valid, pred, nan).flatten(-2).nanmedian(dim=-1).values
    med_r = torch.where(valid, ref.to(pred.dtype), nan).flatten(-2).nanmedian(dim=-1).values
    # a view without a valid pixel keeps its scale
    scale = torch.nan_to_num(med_r / med_p.clamp_min(1e-12), nan=1.0)
    return pred * scale[..., None, None]


def depth_abs_rel(pred: Tensor, ref: Tensor, mask: Tensor | None = None, *, align: str | None = None) -> float:
    """Mean absolute relative depth error over valid pixels of ``ref`` ((..., H, W))."""
    if align == "median":
        pred = align_depth_median(pred, ref, mask)
    elif align is not None:
        raise ValueError(f"depth_abs_rel: align must be None or 'median', got {align!r}")
    valid = _valid_depth(ref, mask)
    if not valid.any():
        raise ValueError("depth_abs_rel: the reference depth has no valid pixel")
    return ((pred[valid] - ref[valid]).abs() / ref[valid]).mean().item()


def depth_delta(
    pred: Tensor, ref: Tensor, mask: Tensor | None = None, *, threshold: float = 1.25, align: str | None = None
) -> float:
    """Fraction of valid pixels with max(pred/ref, ref/pred) < ``threshold``."""
    if align == "median":
        pred = align_depth_median(pred, ref, mask)
    elif align is not None:
        raise ValueError(f"depth_delta: align must be None or 'median', got {align!r}")
    valid = _valid_depth(ref, mask)
    if not valid.any():
        raise ValueError("depth_delta: the reference depth has no valid pixel")
    p = pred[valid].clamp_min(1e-12)
    r = ref[valid]
    return (torch.maximum(p / r, r / p) < threshold).float().mean().item()


def _nearest_distance(src: Tensor, dst: Tensor, chunk: int = 4096) -> Tensor:
    """For each point of ``src`` (N, 3), the distance to its nearest point of ``dst`` (M, 3).

    Exact either way: on a CPU a k-d tree (scipy), O((N + M) log M), since the brute-force search
    takes seconds a cloud there (2.2 s for 20k points on 2 cores, which made the evaluation the
    slowest part of a CPU quality study); elsewhere ``torch.cdist`` in chunks, so that no N x M
    matrix larger than ``chunk`` x M is built.
    """
    if src.device.type == "cpu":
        from scipy.spatial import cKDTree

        distance, _ = cKDTree(dst.double().numpy()).query(src.double().numpy(), k=1)
        return torch.from_numpy(distance).to(src.dtype)
    out = []
    for start in range(0, src.shape[0], chunk):
        out.append(torch.cdist(src[start : start + chunk], dst).min(dim=1).values)
    return torch.cat(out)


def point_cloud_errors(
    pred: Tensor, ref: Tensor, mask: Tensor | None = None, *, max_points: int = 20_000, seed: int = 0
) -> dict[str, float]:
    """Accuracy, completeness and Chamfer distance between point maps (..., H, W, 3).

    Points where ``mask`` is false or the reference is not finite are dropped; at most
    ``max_points`` points of each cloud (a fixed random subset) enter the nearest-neighbour search.
    """
    p = pred.reshape(-1, 3).float()
    r = ref.reshape(-1, 3).float()
    valid = torch.isfinite(r).all(-1) & torch.isfinite(p).all(-1)
    if mask is not None:
        valid &= mask.reshape(-1).bool()
    p, r = p[valid], r[valid]
    if p.shape[0] == 0:
        raise ValueError("point_cloud_errors: no valid point")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if p.shape[0] > max_points:
        p = p[torch.randperm(p.shape[0], generator=gen)[:max_points].to(p.device)]
    if r.shape[0] > max_points:
        r = r[torch.randperm(r.shape[0], generator=gen)[:max_points].to(r.device)]
    accuracy = _nearest_distance(p, r).mean().item()
    completeness = _nearest_distance(r, p).mean().item()
    return {"accuracy": accuracy, "completeness": completeness, "chamfer": 0.5 * (accuracy + completeness)}


def _relative_poses(extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Relative rotations and translations of every ordered pair i != j of (S, 3, 4) extrinsics.

    With world-to-camera [R_i | t_i], the pose of camera j relative to camera i is
    R_ij = R_j R_i^T and t_ij = t_j - R_ij t_i. Returns (P, 3, 3) and (P, 3), P = S (S - 1).
    """
    R, t = extrinsics[..., :3, :3].double(), extrinsics[..., :3, 3].double()
    S = R.shape[0]
    i, j = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    off = i != j
    i, j = i[off], j[off]
    R_ij = R[j] @ R[i].transpose(-1, -2)
    t_ij = t[j] - (R_ij @ t[i].unsqueeze(-1)).squeeze(-1)
    return R_ij, t_ij


def rotation_angle_deg(R: Tensor) -> Tensor:
    """Angle in degrees of rotation matrices (..., 3, 3)."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def camera_pair_errors(pred: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Relative rotation and translation-direction errors (degrees) of all ordered view pairs.

    ``pred``/``ref``: world-to-camera extrinsics (S, 3, 4) or (B, S, 3, 4). Translation errors are
    angles between directions, so they are invariant to the global scale; a pair whose reference
    baseline is zero has no direction and is given 0 when the prediction's is zero too, else 90.
    """
    if pred.dim() == 4:
        errs = [camera_pair_errors(p, r) for p, r in zip(pred, ref)]
        return torch.cat([e[0] for e in errs]), torch.cat([e[1] for e in errs])
    if pred.shape != ref.shape or pred.shape[-2:] != (3, 4):
        raise ValueError(f"camera_pair_errors: need matching (S, 3, 4) extrinsics, got {tuple(pred.shape)} and {tuple(ref.shape)}")
    R_p, t_p = _relative_poses(pred)
    R_r, t_r = _relative_poses(ref)
    rot_err = rotation_angle_deg(R_p.transpose(-1, -2) @ R_r)
    n_p, n_r = t_p.norm(dim=-1), t_r.norm(dim=-1)
    cos = (t_p * t_r).sum(-1) / (n_p * n_r).clamp_min(1e-12)
    trans_err = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    degenerate = n_r < 1e-9
    trans_err = torch.where(degenerate, torch.where(n_p < 1e-9, 0.0, 90.0).double(), trans_err)
    return rot_err.float(), trans_err.float()


def pose_auc(rot_err: Tensor, trans_err: Tensor, max_threshold: int = 30) -> float:
    """AUC of the accuracy curve of max(rotation, translation) error over thresholds 1..T degrees."""
    err = torch.maximum(rot_err, trans_err)
    thresholds = torch.arange(1, max_threshold + 1, dtype=err.dtype, device=err.device)
    return (err[None, :] < thresholds[:, None]).float().mean().item()


def camera_metrics(pred: Tensor, ref: Tensor, max_threshold: int = 30) -> dict[str, float]:
    """Mean relative rotation / translation error (degrees) and pose AUC@``max_threshold``."""
    rot, trans = camera_pair_errors(pred, ref)
    return {
        "rotation_error_deg": rot.mean().item(),
        "translation_error_deg": trans.mean().item(),
        f"auc@{max_threshold}": pose_auc(rot, trans, max_threshold),
    }


def quaternion_to_matrix(quat: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4) stored (x, y, z, w), as VGGT does."""
    x, y, z, w = torch.unbind(quat / quat.norm(dim=-1, keepdim=True).clamp_min(1e-12), dim=-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quat.shape[:-1], 3, 3)


def pose_encoding_to_extrinsics(pose_enc: Tensor) -> Tensor:
    """World-to-camera extrinsics (..., 3, 4) from VGGT's 9-D pose encoding.

    VGGT's absolute pose encoding is [t (3), quaternion (x, y, z, w) (4), fov_h, fov_w].
    """
    if pose_enc.shape[-1] != 9:
        raise ValueError(f"pose_encoding_to_extrinsics: expected (..., 9), got {tuple(pose_enc.shape)}")
    R = quaternion_to_matrix(pose_enc[..., 3:7])
    return torch.cat([R, pose_enc[..., :3, None]], dim=-1)


def fov_to_focal(fov: Tensor, size: int) -> Tensor:
    """Focal length in pixels of a field of view (radians) across ``size`` pixels."""
    return size / (2 * torch.tan(fov / 2))


def depth_to_world_points(depth: Tensor, extrinsics: Tensor, intrinsics: Tensor) -> Tensor:
    """Unproject depth (..., H, W) with world-to-camera extrinsics (..., 3, 4) and intrinsics
    (..., 3, 3) to world points (..., H, W, 3)."""
    H, W = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(H, dtype=depth.dtype, device=depth.device) + 0.5,
        torch.arange(W, dtype=depth.dtype, device=depth.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3), pixel centres
    rays = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(intrinsics), pix)
    cam = rays * depth[..., None]
    R, t = extrinsics[..., :3, :3], extrinsics[..., :3, 3]
    # x_cam = R x_world + t  =>  x_world = R^T (x_cam - t)
    return torch.einsum("...ji,...hwj->...hwi", R, cam - t[..., None, None, :])


__all__ = [
    "align_depth_median",
    "camera_metrics",
    "camera_pair_errors",
    "depth_abs_rel",
    "depth_delta",
    "depth_to_world_points",
    "fov_to_focal",
    "point_cloud_errors",
    "pose_auc",
    "pose_encoding_to_extrinsics",
    "quaternion_to_matrix",
    "rotation_angle_deg",
]
