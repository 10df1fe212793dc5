"""DualDPT: Depth Anything 3's dense head, predicting depth and per-pixel rays from four layers.

Facts follow upstream `depth_anything_3/model/{dualdpt,dpt}.py` and `model/utils/head_utils.py`;
state-dict names match (`head.scratch.refinenet1_aux.resConfUnit2.conv1.weight`, ...).

    4 x (B*S, P, 2C) --LayerNorm, 1x1 conv, +UV embed, resize--> maps at 4x, 2x, 1x, 1/2x the grid
    --3x3 conv to `features`--> two independent top-down fusion chains over the same maps:
      depth: refinenet4..1 -> 3x3 conv -> bilinear to H x W -> +UV -> conv, ReLU, 1x1 conv (2 ch)
             depth = exp(c0), depth_conf = 1 + exp(c1)
      ray:   refinenet4_aux..1_aux -> five 3x3 convs -> +UV -> conv, LayerNorm, ReLU, 1x1 conv (7 ch)
             at 8x the patch grid; ray = c0..5 (linear), ray_conf = 1 + exp(c6)

Unlike VGGT's DPT head, the residual conv units here use a ReLU that does not write in place, so
their skip adds the unactivated input; and the sin/cos UV embedding is computed in float32.
Upstream builds the ray head's neck for every pyramid level but returns only the finest; the
coarser necks (`output_conv1_aux.0-2`, `output_conv2_aux.0-2`) are kept as parameters so
checkpoints load, and not computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from lite3r_compile.models_zoo.head_utils import create_uv_grid, custom_interpolate

# Width of the hidden layer of the prediction convs; fixed upstream, independent of `features`.
_OUTPUT_HIDDEN_CHANNELS = 32
# Channels of the ray output: 6 ray values (origin, direction) + 1 confidence.
_RAY_CHANNELS = 7
# Scale of the UV embedding added to feature maps.
_UV_EMBED_RATIO = 0.1


def _sincos_embed(embed_dim: int, pos: torch.Tensor, omega_0: float = 100.0) -> torch.Tensor:
    """[sin(p * w_k), cos(p * w_k)], w_k = omega_0^(-2k / embed_dim), in float32: (M,) -> (M, D)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float32, device=pos.device)
    omega = omega / (embed_dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = torch.outer(pos.reshape(-1).float(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def add_uv_embedding(x: torch.Tensor, image_width: int, image_height: int) -> torch.Tensor:
    """x (N, C, h, w) + 0.1 * sincos(UV grid of the image's aspect ratio), C % 4 == 0.

    Channels [0, C/2) embed u (along the width), [C/2, C) embed v, each half [sin, cos].
    """
    height, width, channels = x.shape[-2], x.shape[-1], x.shape[1]
    uv = create_uv_grid(width, height, aspect_ratio=image_width / image_height, dtype=x.dtype, device=x.device)
    flat = uv.reshape(-1, 2)
    embed = torch.cat(
        [_sincos_embed(channels // 2, flat[:, 0]), _sincos_embed(channels // 2, flat[:, 1])], dim=-1
    )
    # Upstream adds the float32 embedding as is; casting it to x's dtype changes nothing for
    # float32 maps and keeps a bfloat16 model in bfloat16.
    embed = (embed.view(height, width, channels) * _UV_EMBED_RATIO).to(x.dtype)
    return x + embed.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)


class Permute(nn.Module):
    """x.permute(*dims), for use inside nn.Sequential (a LayerNorm over channels of a conv map)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ResidualConvUnit(nn.Module):
    """conv2(relu(conv1(relu(x)))) + x, x (N, C, h, w)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.activation(self.conv1(self.activation(x))))
        return out + x


class FeatureFusionBlock(nn.Module):
    """out_conv(resize(rcu2(x + rcu1(skip)))); bilinear, align_corners, to `size` or 2x.

    rcu1 and the skip exist only with has_residual (the coarsest level has none).
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.has_residual = has_residual
        self.resConfUnit1 = ResidualConvUnit(features) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0, bias=True)

    def forward(self, *xs: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """xs: (x,) or (x, skip), each (N, F, h, w) -> (N, F, *size) or (N, F, 2h, 2w)."""
        y = xs[0]
        if self.resConfUnit1 is not None and len(xs) > 1:
            y = y + self.resConfUnit1(xs[1])
        y = self.resConfUnit2(y)
        if size is None:
            y = custom_interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            y = custom_interpolate(y, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(y)


class DualDPT(nn.Module):
    """Depth + ray dense head (upstream DualDPT with its defaults: exp / expp1 activations, UV
    embeddings on, 4 ray pyramid levels with 5-conv necks, output at full resolution).

    Args:
        dim_in: channels of the backbone features (2C).
        patch_size: backbone patch size.
        output_dim: depth channels incl. confidence (2).
        features: fusion width.
        out_channels: widths of the four reassembled maps.
        chunk_size: views decoded at once (memory bound); None decodes all together.
    """

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        output_dim: int = 2,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        chunk_size: int | None = 8,
        aux_pyramid_levels: int = 4,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.chunk_size = chunk_size
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, 1, 1, 0) for oc in out_channels])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        hidden = _OUTPUT_HIDDEN_CHANNELS
        neck = features // 2
        scratch = nn.Module()
        for level, in_ch in enumerate(out_channels, start=1):
            setattr(scratch, f"layer{level}_rn", nn.Conv2d(in_ch, features, 3, 1, 1, bias=False))
        for suffix in ("", "_aux"):
            for level in (1, 2, 3):
                setattr(scratch, f"refinenet{level}{suffix}", FeatureFusionBlock(features))
            setattr(scratch, f"refinenet4{suffix}", FeatureFusionBlock(features, has_residual=False))
        scratch.output_conv1 = nn.Conv2d(features, neck, 3, 1, 1)
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(neck, hidden, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, output_dim, 1, 1, 0),
        )
        scratch.output_conv1_aux = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(features, neck, 3, 1, 1),
                    nn.Conv2d(neck, features, 3, 1, 1),
                    nn.Conv2d(features, neck, 3, 1, 1),
                    nn.Conv2d(neck, features, 3, 1, 1),
                    nn.Conv2d(features, neck, 3, 1, 1),
                )
                for _ in range(aux_pyramid_levels)
            ]
        )
        # One LayerNorm instance serves every level, as upstream builds it once and splices it
        # into each Sequential: its parameters count once but appear under every level's name
        # in the state dict.
        shared_ray_norm = nn.LayerNorm(hidden)
        scratch.output_conv2_aux = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(neck, hidden, 3, 1, 1),
                    Permute((0, 2, 3, 1)),
                    shared_ray_norm,
                    Permute((0, 3, 1, 2)),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden, _RAY_CHANNELS, 1, 1, 0),
                )
                for _ in range(aux_pyramid_levels)
            ]
        )
        self.scratch = scratch

    def forward(
        self, feats: Sequence[tuple[torch.Tensor, torch.Tensor]], height: int, width: int
    ) -> dict[str, torch.Tensor]:
        """Dense predictions from the backbone's four (patch features, camera token) pairs.

        Args:
            feats: four pairs; patch features (B, S, P, dim_in), P = (H/p) * (W/p).
            height, width: image size.

        Returns:
            depth (B, S, H, W), depth_conf (B, S, H, W),
            ray (B, S, 8H/p, 8W/p, 6), ray_conf (B, S, 8H/p, 8W/p).
        """
        batch, views, tokens, channels = feats[0][0].shape
        flat = [f[0].reshape(batch * views, tokens, channels) for f in feats]
        if self.chunk_size is None or self.chunk_size >= views:
            outputs = self._decode(flat, height, width)
        else:
            chunks = [
                self._decode([f[start : start + self.chunk_size] for f in flat], height, width)
                for start in range(0, batch * views, self.chunk_size)
            ]
            outputs = {key: torch.cat([c[key] for c in chunks], dim=0) for key in chunks[0]}
        return {key: value.reshape(batch, views, *value.shape[1:]) for key, value in outputs.items()}

    def _decode(self, feats: list[torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
        """feats: four (N, P, dim_in) -> per-frame outputs with leading dim N."""
        frames, _, channels = feats[0].shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        maps = []
        for project, resize, x in zip(self.projects, self.resize_layers, feats):
            x = self.norm(x)
            x = x.permute(0, 2, 1).reshape(frames, channels, grid_h, grid_w)
            x = project(x)
            x = add_uv_embedding(x, width, height)
            maps.append(resize(x))

        depth_features, ray_features = self._fuse(maps)

        depth_features = custom_interpolate(
            depth_features, (grid_h * self.patch_size, grid_w * self.patch_size), mode="bilinear", align_corners=True
        )
        depth_features = add_uv_embedding(depth_features, width, height)
        depth_logits = self.scratch.output_conv2(depth_features).permute(0, 2, 3, 1)
        depth = torch.exp(depth_logits[..., :-1]).squeeze(-1)
        depth_conf = torch.exp(depth_logits[..., -1]) + 1

        ray_features = add_uv_embedding(ray_features, width, height)
        ray_logits = self.scratch.output_conv2_aux[-1](ray_features).permute(0, 2, 3, 1)
        ray = ray_logits[..., :-1]
        ray_conf = torch.exp(ray_logits[..., -1]) + 1
        return {"depth": depth, "depth_conf": depth_conf, "ray": ray, "ray_conf": ray_conf}

    def _fuse(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two top-down fusion chains over the same four maps -> (depth neck, finest ray neck)."""
        s = self.scratch
        l1 = s.layer1_rn(maps[0])
        l2 = s.layer2_rn(maps[1])
        l3 = s.layer3_rn(maps[2])
        l4 = s.layer4_rn(maps[3])

        out = s.refinenet4(l4, size=l3.shape[2:])
        aux = s.refinenet4_aux(l4, size=l3.shape[2:])
        out = s.refinenet3(out, l3, size=l2.shape[2:])
        aux = s.refinenet3_aux(aux, l3, size=l2.shape[2:])
        out = s.refinenet2(out, l2, size=l1.shape[2:])
        aux = s.refinenet2_aux(aux, l2, size=l1.shape[2:])
        out = s.refinenet1(out, l1)
        aux = s.refinenet1_aux(aux, l1)
        return s.output_conv1(out), s.output_conv1_aux[-1](aux)
