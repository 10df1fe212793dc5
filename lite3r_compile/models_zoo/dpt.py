"""VGGT's DPT head: dense depth / point-map prediction from four aggregator layers.

Mirrors upstream `vggt/heads/dpt_head.py` (constructor and forward signatures, defaults, return
values and state-dict names), so official checkpoints load by name. The architecture follows
"Vision Transformers for Dense Prediction" (Ranftl et al., 2021) as adapted by Depth Anything V2:

    4 token layers --LayerNorm, 1x1 conv, +UV embed, resize--> maps at 4x, 2x, 1x, 1/2x the patch grid
    --3x3 conv to `features`--> fusion from coarse to fine (residual conv units, 2x bilinear steps)
    --3x3 conv, bilinear to the image size / down_ratio, +UV embed--> features   (feature_only)
    --3x3 conv, ReLU, 1x1 conv, activate_head--> (preds, conf)                    (otherwise)

For VGGT-1B (dim_in 2048): point head (output_dim 4) 32,654,628 parameters, depth head
(output_dim 2) 32,654,562.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lite3r_compile.models_zoo.head_utils import (
    activate_head,
    check_activation_names,
    create_uv_grid,
    custom_interpolate,
    position_grid_to_embed,
)

# Width of the hidden layer of the prediction convs; fixed upstream, independent of `features`.
_OUTPUT_HIDDEN_CHANNELS = 32


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus a skip from relu(x).

    Upstream applies an in-place ReLU to the input before the first conv, so the skip branch
    adds relu(x), not x; this writes that out without the mutation:
        out = conv2(relu(conv1(relu(x)))) + relu(x),   x: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """One refinement step: merge a skip map, refine, resize, mix channels.

        out = out_conv(resize(rcu2(x + rcu1(skip))))   (rcu1 and skip only when has_residual)

    The resize is bilinear with align_corners=True, to `size` when given, else 2x.
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.has_residual = has_residual
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, *xs: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """xs: (x,) or (x, skip), each (N, features, h, w). Returns (N, features, *size or 2h, 2w)."""
        output = xs[0]
        if self.has_residual:
            output = output + self.resConfUnit1(xs[1])
        output = self.resConfUnit2(output)
        if size is None:
            output = custom_interpolate(output, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            output = custom_interpolate(output, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(output)


class DPTScratch(nn.Module):
    """The fusion trunk (`scratch.*` in upstream state dicts).

    layer{k}_rn bring each resized map to `features` channels (3x3, no bias); refinenet4..1 fuse
    from the coarsest map up; output_conv1 is the first output conv (to `features` channels when
    the head returns features, to features // 2 otherwise); output_conv2 (prediction heads only)
    is conv3x3 -> ReLU -> conv1x1 to `output_dim`.
    """

    def __init__(
        self, out_channels: Sequence[int], features: int, output_dim: int, feature_only: bool
    ) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(out_channels[0], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(out_channels[1], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(out_channels[2], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(out_channels[3], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.output_conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1)
        else:
            self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
            self.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, _OUTPUT_HIDDEN_CHANNELS, kernel_size=3, stride=1, padding=1),
                nn.ReLU(),
                nn.Conv2d(_OUTPUT_HIDDEN_CHANNELS, output_dim, kernel_size=1, stride=1, padding=0),
            )

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """layers: four maps (N, out_channels[k], h_k, w_k), finest first.

        Returns (N, C1, 2 * h_1, 2 * w_1) with C1 the output_conv1 width.
        """
        layer_1, layer_2, layer_3, layer_4 = layers
        layer_1_rn = self.layer1_rn(layer_1)
        layer_2_rn = self.layer2_rn(layer_2)
        layer_3_rn = self.layer3_rn(layer_3)
        layer_4_rn = self.layer4_rn(layer_4)
        out = self.refinenet4(layer_4_rn, size=layer_3_rn.shape[2:])
        out = self.refinenet3(out, layer_3_rn, size=layer_2_rn.shape[2:])
        out = self.refinenet2(out, layer_2_rn, size=layer_1_rn.shape[2:])
        out = self.refinenet1(out, layer_1_rn)
        return self.output_conv1(out)


# forward's default chunk: the head's own ``frames_chunk_size`` attribute
MODULE_CHUNK = object()


class DPTHead(nn.Module):
    """DPT head over VGGT aggregator tokens.

    Args:
        dim_in: channels of each aggregator token (2 * embed_dim: frame and global outputs).
        patch_size: pixels per patch side; the patch grid is (H // patch_size, W // patch_size).
        output_dim: raw output channels; the last one is the confidence.
        activation / conf_activation: see `head_utils.activate_head`.
        features: width of the fusion trunk.
        out_channels: projection widths of the four tapped layers.
        intermediate_layer_idx: which entries of `aggregated_tokens_list` are tapped (four).
        pos_embed: add a 0.1-scaled UV sin/cos embedding after projection and after upsampling.
        feature_only: return the (B, S, features, H', W') feature map instead of predictions.
        down_ratio: output resolution is the patch-covered image size divided by this.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        where = "lite3r_compile.models_zoo.dpt.DPTHead"
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError(
                f"{where}: the DPT trunk fuses exactly four layers; got out_channels={list(out_channels)} "
                f"and intermediate_layer_idx={list(intermediate_layer_idx)} (repeat an index to tap a "
                "shallow aggregator twice)"
            )
        if not feature_only:
            check_activation_names(activation, conf_activation, where)
            if output_dim < 2:
                raise ValueError(f"{where}: output_dim must be >= 2 (predictions + confidence), got {output_dim}")
        if pos_embed:
            # The UV embedding gives each coordinate half the channels, half sin and half cos.
            embedded = list(out_channels) + [features if feature_only else features // 2]
            if any(c % 4 != 0 for c in embedded):
                raise ValueError(
                    f"{where}: with pos_embed, out_channels and the output width ({embedded[-1]}) must be "
                    f"multiples of 4; got out_channels={list(out_channels)}, features={features}"
                )
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.frames_chunk_size: int | None = 8
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = list(intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(
            [nn.Conv2d(dim_in, oc, kernel_size=1, stride=1, padding=0) for oc in out_channels]
        )
        # Patch-grid maps go to 4x, 2x, 1x and 1/2x resolution before fusion.
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = DPTScratch(out_channels, features, output_dim, feature_only)

    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        frames_chunk_size: int | None | object = MODULE_CHUNK,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the head, `frames_chunk_size` frames at a time (None: all at once) to bound memory;
        by default the module's `frames_chunk_size` attribute (8, upstream's default; a deployment
        may lower it, `LiteConfig.head_frames_chunk`).

        Args:
            aggregated_tokens_list: per aggregator block, tokens (B, S, P, dim_in) with the patch
                tokens at [patch_start_idx:], row-major over the patch grid.
            images: (B, S, 3, H, W); only its shape is used.
            patch_start_idx: number of special (camera, register) tokens before the patches.

        Returns:
            feature_only: (B, S, features, H' / down_ratio, W' / down_ratio), where
            H' = (H // patch_size) * patch_size and likewise W'.
            Otherwise: preds (B, S, H', W', output_dim - 1) and conf (B, S, H', W').
        """
        num_frames = images.shape[1]
        if frames_chunk_size is MODULE_CHUNK:
            frames_chunk_size = self.frames_chunk_size
        if frames_chunk_size is None or frames_chunk_size >= num_frames:
            return self._forward_impl(aggregated_tokens_list, images, patch_start_idx)
        if frames_chunk_size <= 0:
            raise ValueError(
                f"lite3r_compile.models_zoo.dpt.DPTHead.forward: frames_chunk_size must be positive or "
                f"None, got {frames_chunk_size}"
            )
        chunks = [
            self._forward_impl(
                aggregated_tokens_list, images, patch_start_idx, start, min(start + frames_chunk_size, num_frames)
            )
            for start in range(0, num_frames, frames_chunk_size)
        ]
        if self.feature_only:
            return torch.cat(chunks, dim=1)
        preds, conf = zip(*chunks)
        return torch.cat(preds, dim=1), torch.cat(conf, dim=1)

    def _forward_impl(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        frames_start_idx: int | None = None,
        frames_end_idx: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The head on frames [frames_start_idx, frames_end_idx) (all frames when either is None)."""
        chunked = frames_start_idx is not None and frames_end_idx is not None
        if chunked:
            images = images[:, frames_start_idx:frames_end_idx]
        batch, frames, _, height, width = images.shape
        patch_h, patch_w = height // self.patch_size, width // self.patch_size

        resized = []
        for dpt_idx, layer_idx in enumerate(self.intermediate_layer_idx):
            x = aggregated_tokens_list[layer_idx][:, :, patch_start_idx:]
            if chunked:
                x = x[:, frames_start_idx:frames_end_idx]
            x = self.norm(x.reshape(batch * frames, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(batch * frames, x.shape[-1], patch_h, patch_w)
            x = self.projects[dpt_idx](x)
            if self.pos_embed:
                x = self._apply_pos_embed(x, width, height)
            resized.append(self.resize_layers[dpt_idx](x))

        out = self.scratch(resized)
        out_size = (
            int(patch_h * self.patch_size / self.down_ratio),
            int(patch_w * self.patch_size / self.down_ratio),
        )
        out = custom_interpolate(out, out_size, mode="bilinear", align_corners=True)
        if self.pos_embed:
            out = self._apply_pos_embed(out, width, height)
        if self.feature_only:
            return out.view(batch, frames, *out.shape[1:])

        out = self.scratch.output_conv2(out)
        preds, conf = activate_head(out, activation=self.activation, conf_activation=self.conf_activation)
        return preds.view(batch, frames, *preds.shape[1:]), conf.view(batch, frames, *conf.shape[1:])

    def _apply_pos_embed(self, x: torch.Tensor, W: int, H: int, ratio: float = 0.1) -> torch.Tensor:
        """x (N, C, h, w) + ratio * UV sin/cos embedding of the h x w grid of a W x H image.

        The embedding is built in float32 and cast to x's dtype (upstream would promote a bf16 x
        to float32; VGGT runs its heads in float32, where the two agree).
        """
        uv = create_uv_grid(x.shape[-1], x.shape[-2], aspect_ratio=W / H, dtype=x.dtype, device=x.device)
        embed = position_grid_to_embed(uv, x.shape[1]) * ratio
        return x + embed.to(x.dtype).permute(2, 0, 1)[None]
