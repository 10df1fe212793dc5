"""Depth Anything 3 (DA3): multi-view depth, rays and cameras from one DINOv2 backbone.

A faithful re-implementation of upstream `depth_anything_3.model.da3.DepthAnything3Net` with the
`da3-large` configuration (ByteDance-Seed/Depth-Anything-3, `configs/da3-large.yaml`):

    images (B, S, 3, H, W) in [0, 1] --ImageNet normalisation-->
    backbone: DINOv2 ViT-L/14, 24 blocks; per-view attention in blocks 0-7; from block 8 odd
              blocks attend over all views, even blocks per view; qk-norm and 2D RoPE from 8;
              a camera token replaces the cls token at block 8 (da3_backbone)
    -> outputs of blocks 11, 15, 19, 23 as concat(per-view, latest) = 2048 channels
    head:    DualDPT -> depth, depth_conf (B, S, H, W); ray (B, S, 8H/14, 8W/14, 6), ray_conf
    cam_dec: camera token of block 23 -> pose encoding -> extrinsics (B, S, 3, 4) world-to-camera
             (relative to the reference view), intrinsics (B, S, 3, 3)
    cam_enc: optional known cameras (extrinsics + intrinsics) -> camera tokens for block 8

Upstream drops `ray` / `ray_conf` from its output when the camera decoder is present (always for
DA3-Large); `keep_ray=True` keeps them. Upstream's ray-based pose solver (`use_ray_pose`), the
Gaussian-splatting head and auxiliary feature export are not part of DA3-Large's default forward
and are not implemented. The heads and the camera encoder run with autocast disabled, as upstream.

Parameter names equal upstream's, so an official checkpoint loads with `load_state_dict`, or with
`models_zoo.load("da3-large", path)` also from the hub wrapper's format (keys prefixed `model.`).
DA3-Large has 410,941,767 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from lite3r_compile.models_zoo import check_images
from lite3r_compile.models_zoo.da3_backbone import DA3Backbone
from lite3r_compile.models_zoo.da3_camera import (
    CameraDec,
    CameraEnc,
    affine_inverse,
    pose_encoding_to_extri_intri,
)
from lite3r_compile.models_zoo.da3_dualdpt import DualDPT
from lite3r_compile.models_zoo.da3_reference_view import REFERENCE_VIEW_STRATEGIES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DA3Config:
    """Shape of a DA3 model; the defaults are DA3-Large.

    Backbone: img_size (fixes the learned position-embedding grid), patch_size, embed_dim, depth,
    num_heads, mlp_ratio; alt_start (first block with alternating attention and the camera token),
    qknorm_start, rope_start, rope_freq; out_layers (four blocks fed to the heads).
    Head: head_features, head_out_channels, head_chunk_size (views decoded at once; None = all).
    Camera encoder: cam_enc_depth blocks of cam_enc_heads heads at embed_dim.
    ref_view_strategy: how a reference view is picked from >= 3 uncalibrated views
    ("saddle_balanced" upstream; "first" keeps view 0 as the reference).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    alt_start: int = 8
    qknorm_start: int = 8
    rope_start: int = 8
    rope_freq: float = 100.0
    out_layers: tuple[int, int, int, int] = (11, 15, 19, 23)
    head_features: int = 256
    head_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    head_chunk_size: int | None = 8
    cam_enc_depth: int = 4
    cam_enc_heads: int = 16
    ref_view_strategy: str = "saddle_balanced"

    def __post_init__(self) -> None:
        where = "DA3Config"
        if self.embed_dim % self.num_heads != 0 or (self.embed_dim // self.num_heads) % 4 != 0:
            raise ValueError(
                f"{where}: embed_dim / num_heads must be a multiple of 4 (2D RoPE splits the head "
                f"dim in rows and columns), got {self.embed_dim} / {self.num_heads}"
            )
        if not 1 <= self.alt_start < self.depth:
            raise ValueError(f"{where}: alt_start must lie in [1, depth), got {self.alt_start} for depth {self.depth}")
        if len(self.out_layers) != 4 or list(self.out_layers) != sorted(set(self.out_layers)):
            raise ValueError(f"{where}: out_layers must be 4 ascending block indices, got {self.out_layers}")
        if not all(self.alt_start <= i < self.depth for i in self.out_layers):
            raise ValueError(
                f"{where}: out_layers must lie in [alt_start, depth) = [{self.alt_start}, {self.depth}) "
                f"(the camera decoder reads the camera token), got {self.out_layers}"
            )
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"{where}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        uv_channels = (*self.head_out_channels, self.head_features // 2)
        if len(self.head_out_channels) != 4 or any(c % 4 != 0 for c in uv_channels):
            raise ValueError(
                f"{where}: the four head_out_channels and head_features / 2 must be multiples of 4 "
                f"(sin/cos UV embeddings), got {self.head_out_channels} and {self.head_features}"
            )
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise ValueError(f"{where}: head_chunk_size must be None or >= 1, got {self.head_chunk_size}")
        if self.embed_dim % self.cam_enc_heads != 0:
            raise ValueError(
                f"{where}: embed_dim {self.embed_dim} is not divisible by cam_enc_heads {self.cam_enc_heads}"
            )
        if self.ref_view_strategy not in REFERENCE_VIEW_STRATEGIES:
            raise ValueError(
                f"{where}: unknown ref_view_strategy {self.ref_view_strategy!r}; "
                f"use one of {', '.join(REFERENCE_VIEW_STRATEGIES)}"
            )


# Every code path of DA3-Large at toy sizes: per-view blocks 0-1, alternation from block 2 with
# qk-norm and RoPE, camera token, global and per-view out layers, two-block camera encoder.
DA3_TINY = DA3Config(
    img_size=28,
    embed_dim=64,
    depth=6,
    num_heads=4,
    alt_start=2,
    qknorm_start=2,
    rope_start=2,
    out_layers=(2, 3, 4, 5),
    head_features=16,
    head_out_channels=(16, 32, 32, 32),
    head_chunk_size=8,
    cam_enc_depth=2,
    cam_enc_heads=4,
)


class DepthAnything3(nn.Module):
    """Depth Anything 3 network (upstream DepthAnything3Net) with input normalisation built in.

    Submodules and state-dict prefixes: `backbone` (DA3Backbone; `backbone.pretrained.*`), `head`
    (DualDPT), `cam_dec` (CameraDec), `cam_enc` (CameraEnc).
    """

    def __init__(self, config: DA3Config = DA3Config()) -> None:
        super().__init__()
        self.config = config
        self.backbone = DA3Backbone(
            config.out_layers,
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            alt_start=config.alt_start,
            qknorm_start=config.qknorm_start,
            rope_start=config.rope_start,
            rope_freq=config.rope_freq,
        )
        self.head = DualDPT(
            2 * config.embed_dim,
            patch_size=config.patch_size,
            output_dim=2,
            features=config.head_features,
            out_channels=config.head_out_channels,
            chunk_size=config.head_chunk_size,
        )
        self.cam_dec = CameraDec(dim_in=2 * config.embed_dim)
        self.cam_enc = CameraEnc(
            dim_out=config.embed_dim,
            trunk_depth=config.cam_enc_depth,
            num_heads=config.cam_enc_heads,
            mlp_ratio=config.mlp_ratio,
        )
        # Not in upstream's state dict: upstream normalises while preprocessing.
        self.register_buffer("image_mean", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.init_non_persistent_buffers(self.image_mean.device)

    def init_non_persistent_buffers(self, device: torch.device) -> None:
        """(Re)fill the normalisation constants on `device`; models_zoo.load calls this after
        filling a meta-device model from a checkpoint."""
        self.image_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        self.image_std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)

    def example_inputs(self, num_views: int = 2, image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Seeded ``(images, extrinsics, intrinsics)`` on the model's device that run every
        branch, the camera encoder included: images (1, S, 3, H, H) in [0, 1], world-to-camera
        extrinsics (1, S, 4, 4) (small translations along x) and pinhole intrinsics (1, S, 3, 3).

        S >= 2 so that per-view and global attention see different lengths; H defaults to two
        patches, enough to trace and cheap even for DA3-Large.
        """
        device = next(self.parameters()).device
        size = image_size or 2 * self.config.patch_size
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1, num_views, 3, size, size, generator=generator)
        extrinsics = torch.eye(4).repeat(1, num_views, 1, 1)
        extrinsics[0, :, 0, 3] = torch.arange(num_views, dtype=torch.float32) * 0.1
        intrinsics = torch.tensor([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]]).repeat(1, num_views, 1, 1)
        return images.to(device), extrinsics.to(device), intrinsics.to(device)

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        ref_view_strategy: str | None = None,
        keep_ray: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Depth and cameras for every view.

        Args:
            images: (B, S, 3, H, W) in [0, 1] (or (S, 3, H, W), taken as B = 1); H and W
                multiples of the patch size (14).
            extrinsics: optional known cameras, (B, S, 4, 4) or (B, S, 3, 4) world-to-camera;
                give intrinsics (B, S, 3, 3) in pixels with them.
            ref_view_strategy: overrides config.ref_view_strategy for this call.
            keep_ray: also return the ray head's outputs, which upstream computes and drops.

        Returns:
            depth (B, S, H, W), depth_conf (B, S, H, W) (>= 1), extrinsics (B, S, 3, 4)
            world-to-camera, intrinsics (B, S, 3, 3); with keep_ray also ray
            (B, S, 8H/14, 8W/14, 6) and ray_conf (B, S, 8H/14, 8W/14).
        """
        images = check_images(images, self.config.patch_size)
        batch, views, _, height, width = images.shape
        cam_token = None
        if extrinsics is not None or intrinsics is not None:
            self._check_cameras(extrinsics, intrinsics, batch, views)
            with torch.autocast(device_type=images.device.type, enabled=False):
                cam_token = self.cam_enc(extrinsics, intrinsics, (height, width))
        normalised = (images - self.image_mean) / self.image_std
        feats = self.backbone(
            normalised,
            cam_token=cam_token,
            ref_view_strategy=ref_view_strategy or self.config.ref_view_strategy,
        )
        with torch.autocast(device_type=images.device.type, enabled=False):
            output = self.head(feats, height, width)
            pose_encoding = self.cam_dec(feats[-1][1])
            cam_to_world, output["intrinsics"] = pose_encoding_to_extri_intri(pose_encoding, (height, width))
            output["extrinsics"] = affine_inverse(cam_to_world)
        if not keep_ray:
            del output["ray"], output["ray_conf"]
        return output

    @staticmethod
    def _check_cameras(
        extrinsics: torch.Tensor | None, intrinsics: torch.Tensor | None, batch: int, views: int
    ) -> None:
        if extrinsics is None or intrinsics is None:
            raise ValueError(
                "DepthAnything3.forward: camera conditioning needs both extrinsics and intrinsics; "
                "give both or neither"
            )
        if extrinsics.shape not in ((batch, views, 4, 4), (batch, views, 3, 4)):
            raise ValueError(
                f"DepthAnything3.forward: extrinsics must be ({batch}, {views}, 4, 4) or "
                f"({batch}, {views}, 3, 4) to match the images, got {tuple(extrinsics.shape)}"
            )
        if intrinsics.shape != (batch, views, 3, 3):
            raise ValueError(
                f"DepthAnything3.forward: intrinsics must be ({batch}, {views}, 3, 3) to match the "
                f"images, got {tuple(intrinsics.shape)}"
            )


def build_da3_large(**overrides) -> DepthAnything3:
    """DA3-Large (410,941,767 parameters); keyword overrides replace DA3Config fields."""
    return DepthAnything3(replace(DA3Config(), **overrides))


def build_da3_tiny(**overrides) -> DepthAnything3:
    """DA3 at toy sizes (embed 64, 6 blocks, 28x28 training grid); forward+backward on a CPU in
    well under a second. Keyword overrides replace DA3Config fields."""
    return DepthAnything3(replace(DA3_TINY, **overrides))
