"""Depth Anything 3's camera encoder and decoder, and the 9-D pose encoding between them.

Facts follow upstream `depth_anything_3/model/{cam_enc,cam_dec}.py`, `model/utils/transform.py`
and `utils/geometry.py`; state-dict names match (`cam_enc.trunk.0.attn.qkv.weight`,
`cam_dec.fc_qvec.weight`, ...).

Pose encoding (B, S, 9) = [t (3), quaternion xyzw (4), a, b] of a camera-to-world matrix [R | t],
with a = 2 atan(W / (2 fx)), b = 2 atan(H / (2 fy)). Decoding reads fy = (H/2) / tan(a/2) and
fx = (W/2) / tan(b/2): the two angles swap roles between encoder and decoder upstream, which is
harmless for the square images DA3 trains on and is reproduced here as is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lite3r_compile.models_zoo.da3_layers import Block
from lite3r_compile.models_zoo.layers import Mlp

POSE_ENCODING_DIM = 9


def affine_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid transform [R | t] (..., 3, 4) or (..., 4, 4): [R^T | -R^T t], last row kept."""
    rotation = matrix[..., :3, :3]
    translation = matrix[..., :3, 3:]
    bottom = matrix[..., 3:, :]
    top = torch.cat([rotation.mT, -rotation.mT @ translation], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def quat_to_mat(quaternions: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4), xyzw (real part last), any norm."""
    i, j, k, r = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    entries = torch.stack(
        (
            1 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
            two_s * (i * j + k * r),
            1 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1 - two_s * (i * i + j * j),
        ),
        -1,
    )
    return entries.reshape(quaternions.shape[:-1] + (3, 3))


def _sqrt_positive_part(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with a zero subgradient where x <= 0."""
    out = torch.zeros_like(x)
    positive = x > 0
    if torch.is_grad_enabled():
        out[positive] = torch.sqrt(x[positive])
    else:
        out = torch.where(positive, torch.sqrt(x), out)
    return out


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Quaternions (..., 4), xyzw with non-negative real part, of rotation matrices (..., 3, 3).

    Of the four algebraically equal candidates (each divides by one of |r|, |i|, |j|, |k|) the
    best conditioned, with the largest divisor, is taken.
    """
    batch_shape = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(matrix.reshape(batch_shape + (9,)), dim=-1)
    q_abs = _sqrt_positive_part(
        torch.stack(
            [
                1.0 + m00 + m11 + m22,
                1.0 + m00 - m11 - m22,
                1.0 - m00 + m11 - m22,
                1.0 - m00 - m11 + m22,
            ],
            dim=-1,
        )
    )
    quat_by_rijk = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    floor = torch.tensor(0.1).to(dtype=q_abs.dtype, device=q_abs.device)
    candidates = quat_by_rijk / (2.0 * q_abs[..., None].max(floor))
    # upstream picks the row with a boolean mask (a data-dependent `nonzero`, a graph break);
    # gathering the argmax row selects the same values with static shapes
    best = q_abs.argmax(dim=-1)[..., None, None].expand(batch_shape + (1, 4))
    rijk = candidates.gather(-2, best).squeeze(-2)
    xyzw = rijk[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def extri_intri_to_pose_encoding(
    extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_size_hw: tuple[int, int]
) -> torch.Tensor:
    """(B, S, 3|4, 4) camera-to-world and (B, S, 3, 3) pinhole intrinsics -> (B, S, 9) float32."""
    rotation = extrinsics[:, :, :3, :3]
    translation = extrinsics[:, :, :3, 3]
    quat = mat_to_quat(rotation)
    height, width = image_size_hw
    angle_from_fy = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    angle_from_fx = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([translation, quat, angle_from_fx[..., None], angle_from_fy[..., None]], dim=-1).float()


def pose_encoding_to_extri_intri(
    pose_encoding: torch.Tensor, image_size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, 9) -> camera-to-world (B, S, 3, 4) and intrinsics (B, S, 3, 3), principal point
    at the image centre."""
    translation = pose_encoding[..., :3]
    quat = pose_encoding[..., 3:7]
    first_angle = pose_encoding[..., 7]
    second_angle = pose_encoding[..., 8]
    extrinsics = torch.cat([quat_to_mat(quat), translation[..., None]], dim=-1)
    height, width = image_size_hw
    fy = (height / 2.0) / torch.clamp(torch.tan(first_angle / 2.0), 1e-6)
    fx = (width / 2.0) / torch.clamp(torch.tan(second_angle / 2.0), 1e-6)
    intrinsics = torch.zeros(pose_encoding.shape[:2] + (3, 3), device=pose_encoding.device)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


class CameraEnc(nn.Module):
    """Known cameras -> one backbone token per view.

        token = trunk_norm(trunk(token_norm(pose_branch(pose_encoding(inverse(w2c), K)))))

    The trunk is `trunk_depth` transformer blocks (LayerScale 0.01, LayerNorm eps 1e-5, no
    qk-norm, no RoPE) attending over the views of each batch element: (B, S, dim_out).
    """

    def __init__(
        self,
        dim_out: int = 1024,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            *[
                Block(dim_out, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, ln_eps=1e-5)
                for _ in range(trunk_depth)
            ]
        )
        self.token_norm = nn.LayerNorm(dim_out)
        self.trunk_norm = nn.LayerNorm(dim_out)
        self.pose_branch = Mlp(POSE_ENCODING_DIM, dim_out // 2, dim_out)

    def forward(
        self, extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_size_hw: tuple[int, int]
    ) -> torch.Tensor:
        """extrinsics (B, S, 3|4, 4) world-to-camera, intrinsics (B, S, 3, 3) -> (B, S, dim_out)."""
        pose_encoding = extri_intri_to_pose_encoding(affine_inverse(extrinsics), intrinsics, image_size_hw)
        # float32 as upstream unless the encoder itself was cast to another dtype
        pose_encoding = pose_encoding.to(self.pose_branch.fc1.weight.dtype)
        tokens = self.token_norm(self.pose_branch(pose_encoding))
        return self.trunk_norm(self.trunk(tokens))


class CameraDec(nn.Module):
    """Camera token of the last backbone layer (B, S, dim_in) -> pose encoding (B, S, 9).

        h = relu(W2 relu(W1 x)); [fc_t(h), fc_qvec(h), relu(fc_fov(h))].
    """

    def __init__(self, dim_in: int = 2048) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(dim_in, dim_in),
            nn.ReLU(),
            nn.Linear(dim_in, dim_in),
            nn.ReLU(),
        )
        self.fc_t = nn.Linear(dim_in, 3)
        self.fc_qvec = nn.Linear(dim_in, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim_in, 2), nn.ReLU())

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        batch, views = feat.shape[:2]
        # Upstream feeds the output layers float32 (.float()); following the layers' dtype is the
        # same for a float32 decoder and keeps a bfloat16 one working.
        hidden = self.backbone(feat.reshape(batch * views, -1)).to(self.fc_t.weight.dtype)
        translation = self.fc_t(hidden).reshape(batch, views, 3)
        quat = self.fc_qvec(hidden).reshape(batch, views, 4)
        fov = self.fc_fov(hidden).reshape(batch, views, 2)
        return torch.cat([translation, quat, fov], dim=-1)
