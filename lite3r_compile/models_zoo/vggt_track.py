"""VGGT's track head: a DPT feature extractor at half resolution feeding the point tracker.

Mirrors upstream `vggt/heads/track_head.py` (signatures, defaults, outputs, state-dict names:
`feature_extractor.*`, `tracker.*`). For VGGT-1B (`TrackHead(dim_in=2048, patch_size=14)`) it
has 65,941,396 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from lite3r_compile.models_zoo.dpt import DPTHead
from lite3r_compile.models_zoo.track_modules import BaseTrackerPredictor


class TrackHead(nn.Module):
    """Track query points of the first frame through all frames.

    Args:
        dim_in: channels of each aggregator token.
        patch_size: pixels per patch side.
        features: channels of the tracking feature maps (a multiple of 4).
        iters: default refinement iterations.
        predict_conf: also predict a per-point confidence.
        stride: feature-map downsampling seen by the tracker; matches the extractor's
            down_ratio of 2.
        corr_levels / corr_radius: correlation pyramid depth and window radius.
        hidden_size: width of the tracker's update transformer (divisible by its 8 heads).
        pos_embed: UV positional embedding in the feature extractor. Upstream hard-codes False
            (the official checkpoint is trained without it).
        out_channels / intermediate_layer_idx: the feature extractor's projection widths and tapped
            aggregator layers. Upstream always uses these defaults (which need a 24-block
            aggregator).

    The last three arguments are not upstream arguments; they default to upstream's behaviour and
    exist so that small presets can build the head.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        pos_embed: bool = False,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        # Feature maps at half the image resolution; the tracker's stride accounts for that.
        self.feature_extractor = DPTHead(
            dim_in=dim_in,
            patch_size=patch_size,
            features=features,
            out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx,
            pos_embed=pos_embed,
            feature_only=True,
            down_ratio=2,
        )
        self.tracker = BaseTrackerPredictor(
            latent_dim=features,
            predict_conf=predict_conf,
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            hidden_size=hidden_size,
        )
        self.iters = iters

    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        query_points: torch.Tensor | None = None,
        iters: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Track `query_points` through the sequence.

        Args:
            aggregated_tokens_list: per aggregator block, tokens (B, S, P, dim_in).
            images: (B, S, 3, H, W); only its shape is used.
            patch_start_idx: number of special tokens before the patch tokens.
            query_points: (B, N, 2) (x, y) pixel positions in frame 0. Required; the default
                None is upstream's signature, where VGGT skips this head without query points.
            iters: refinement iterations (default self.iters).

        Returns:
            coord_preds: one (B, S, N, 2) pixel-position tensor per iteration, last is best;
            vis (B, S, N) and conf (B, S, N) probabilities (conf None without predict_conf).
        """
        if query_points is None:
            raise ValueError(
                "lite3r_compile.models_zoo.vggt_track.TrackHead.forward: query_points (B, N, 2) is required; "
                "VGGT runs the track head only when it is given query points"
            )
        feature_maps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)
        return self.tracker(
            query_points=query_points, fmaps=feature_maps, iters=self.iters if iters is None else iters
        )
