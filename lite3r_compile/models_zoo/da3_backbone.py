"""The Depth Anything 3 backbone: a DINOv2 ViT whose later blocks alternate per-view and
all-view attention, with a camera token in place of the cls token from the first alternating
block on.

Facts follow upstream `depth_anything_3/model/dinov2/{dinov2,vision_transformer}.py`:

- tokens per view: [cls, patches]; learned absolute position embedding for a 518x518 image (37x37
  patches + cls), bicubically resized to other grids with upstream's +0.1 offset;
- blocks [0, alt_start) attend within each view: (B*S, N, C);
- from alt_start on, odd blocks attend over all views at once: (B, S*N, C); even blocks per view;
- qk-norm from qknorm_start, 2D RoPE (base 100) from rope_start. Per-view blocks see patch
  positions (row + 1, col + 1) and the special token at (0, 0); all-view blocks see every patch at
  (1, 1) and the special token at (0, 0), so RoPE adds no spatial bias across views;
- at block alt_start, token 0 of every view is overwritten in place by a camera token: a learned
  one for the reference view (position 0) and another for the other views, or per-view tokens
  from the camera encoder when cameras are given;
- with >= 3 views and no camera tokens, a reference view is chosen from the features entering
  block alt_start - 1 and moved to position 0 (see da3_reference_view); outputs are put back in
  the input order;
- the output of block i in out_layers is concat(output of the last per-view block up to i,
  output of block i), 2C channels; the final LayerNorm applies to the second half only; the
  first token is split off as the camera token (before that norm).

State-dict names match upstream (`backbone.pretrained.blocks.8.attn.q_norm.weight`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lite3r_compile.models_zoo.da3_layers import (
    Block,
    PatchEmbed,
    RotaryPositionEmbedding2D,
    patch_positions,
)
from lite3r_compile.models_zoo.da3_reference_view import (
    MIN_VIEWS_FOR_REFERENCE_SELECTION,
    reorder_by_reference,
    restore_original_order,
    select_reference_view,
)

# Upstream's DINOv2 work-around for floating-point error in the position-embedding resize:
# the bicubic scale factor is (grid + 0.1) / trained_grid rather than grid / trained_grid.
_POS_EMBED_INTERPOLATE_OFFSET = 0.1


class DA3VisionTransformer(nn.Module):
    """DINOv2 ViT with DA3's alternating attention and camera token (upstream DinoVisionTransformer).

    Args:
        img_size: training image side; fixes the learned position-embedding grid (img_size / patch).
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the ViT shape.
        alt_start: first block with alternating attention and the camera token (>= 1).
        qknorm_start, rope_start: first block with qk-norm / RoPE.
        rope_freq: RoPE base frequency.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        alt_start: int,
        qknorm_start: int,
        rope_start: int,
        rope_freq: float,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.alt_start = alt_start
        self.rope_start = rope_start
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # [reference-view token, other-view token]
        self.camera_token = nn.Parameter(torch.randn(1, 2, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq)
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    init_values=1.0,
                    qk_norm=i >= qknorm_start,
                    rope=self.rope if i >= rope_start else None,
                    ln_eps=1e-6,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)

    def interpolate_pos_encoding(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embedding for tokens (N, 1 + (H/p)*(W/p), C) of an image of height x width.

        The trained grid of a square image is used as stored; any other grid is resized
        bicubically in float32 and cast to the tokens' dtype, as upstream.
        """
        trained_patches = self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == trained_patches and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        trained_grid = int(math.sqrt(trained_patches))
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        patch_pos = F.interpolate(
            patch_pos.reshape(1, trained_grid, trained_grid, self.embed_dim).permute(0, 3, 1, 2),
            scale_factor=(
                (grid_h + _POS_EMBED_INTERPOLATE_OFFSET) / trained_grid,
                (grid_w + _POS_EMBED_INTERPOLATE_OFFSET) / trained_grid,
            ),
            mode="bicubic",
            antialias=False,
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, self.embed_dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(tokens.dtype)

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, 3, H, W) normalised images -> (B, S, 1 + P, C) tokens [cls, patches] + pos."""
        batch, views, _, height, width = images.shape
        x = self.patch_embed(images.reshape(batch * views, *images.shape[2:]))
        cls = self.cls_token.expand(batch * views, -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        return x.reshape(batch, views, x.shape[1], self.embed_dim)

    def rope_positions(
        self, batch: int, views: int, height: int, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions for per-view and all-view blocks, each (B, S, 1 + P, 2) int64."""
        grid = patch_positions(batch * views, height // self.patch_size, width // self.patch_size, device)
        grid = grid.reshape(batch, views, grid.shape[1], 2)
        special = torch.zeros(batch, views, 1, 2, dtype=grid.dtype, device=device)
        local_pos = torch.cat((special, grid + 1), dim=2)
        global_pos = torch.cat((special, torch.ones_like(grid)), dim=2)
        return local_pos, global_pos

    @staticmethod
    def _run_block(
        block: Block, x: torch.Tensor, pos: torch.Tensor | None, attend_all_views: bool
    ) -> torch.Tensor:
        """x (B, S, N, C) through one block, per view or over all views; pos (B, S, N, 2) or None."""
        batch, views, tokens, channels = x.shape
        groups = batch if attend_all_views else batch * views
        flat_pos = None if pos is None else pos.reshape(groups, -1, 2)
        out = block(x.reshape(groups, -1, channels), pos=flat_pos)
        return out.reshape(batch, views, tokens, channels)

    def forward(
        self,
        images: torch.Tensor,
        out_layers: Sequence[int],
        cam_token: torch.Tensor | None = None,
        ref_view_strategy: str = "saddle_balanced",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Features of the blocks in out_layers.

        Args:
            images: (B, S, 3, H, W), ImageNet-normalised, H and W multiples of the patch size.
            out_layers: block indices to return, ascending.
            cam_token: (B, S, C) camera tokens from the camera encoder, or None for learned ones.
            ref_view_strategy: see da3_reference_view.select_reference_view.

        Returns:
            one (patch features (B, S, P, 2C), camera token (B, S, 2C)) pair per out layer.
        """
        batch, views, _, height, width = images.shape
        x = self.prepare_tokens(images)
        local_pos, global_pos = self.rope_positions(batch, views, height, width, x.device)
        reference = None
        local_x = x
        taken = []
        for i, block in enumerate(self.blocks):
            if (
                i == self.alt_start - 1
                and views >= MIN_VIEWS_FOR_REFERENCE_SELECTION
                and cam_token is None
            ):
                reference = select_reference_view(x, strategy=ref_view_strategy)
                x = reorder_by_reference(x, reference)
            if i == self.alt_start:
                if cam_token is None:
                    ref_token = self.camera_token[:, :1].expand(batch, -1, -1)
                    other_tokens = self.camera_token[:, 1:].expand(batch, views - 1, -1)
                    cam_token = torch.cat((ref_token, other_tokens), dim=1)
                x[:, :, 0] = cam_token
            attend_all_views = i >= self.alt_start and i % 2 == 1
            if i < self.rope_start:
                pos = None
            else:
                pos = global_pos if attend_all_views else local_pos
            x = self._run_block(block, x, pos, attend_all_views)
            if not attend_all_views:
                local_x = x
            if i in out_layers:
                out = torch.cat((local_x, x), dim=-1)
                if reference is not None:
                    out = restore_original_order(out, reference)
                taken.append(out)
        features = []
        for out in taken:
            camera = out[:, :, 0]
            normed = torch.cat((out[..., : self.embed_dim], self.norm(out[..., self.embed_dim :])), dim=-1)
            features.append((normed[:, :, 1:], camera))
        return features


class DA3Backbone(nn.Module):
    """Holds the ViT as `pretrained`, as upstream's DinoV2 wrapper does, so that state-dict names
    read `backbone.pretrained.*`; fixes which blocks are returned."""

    def __init__(self, out_layers: Sequence[int], **vit_kwargs) -> None:
        super().__init__()
        self.out_layers = tuple(out_layers)
        self.pretrained = DA3VisionTransformer(**vit_kwargs)

    def forward(
        self,
        images: torch.Tensor,
        cam_token: torch.Tensor | None = None,
        ref_view_strategy: str = "saddle_balanced",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """See DA3VisionTransformer.forward; returns the pairs for `out_layers`."""
        return self.pretrained(
            images, self.out_layers, cam_token=cam_token, ref_view_strategy=ref_view_strategy
        )
