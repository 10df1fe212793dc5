"""The point tracker behind VGGT's track head (CoTracker / VGGSfM style).

Mirrors upstream `vggt/heads/track_modules/` (`base_track_predictor.py`, `blocks.py`,
`modules.py`, `utils.py`): names, defaults and state-dict keys match so official checkpoints load.
Attention is `nn.MultiheadAttention(batch_first=True)`, as upstream.

A tracker step, for B batches, S frames, N query points and feature maps (B, S, C, h, w):

    correlation of each track feature with a 7-level pyramid of the frame's map, sampled on a
    (2r+1)^2 window around the current estimate -> corr_mlp
    + sin/cos embedding of the displacement from the query + the track feature
    -> EfficientUpdateFormer (attention over time per track, and over tracks per frame through
       64 learned virtual tracks) -> coordinate and feature updates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Embeddings and sampling
# ---------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(p * w_k), cos(p * w_k)], w_k = 10000^(-2k / embed_dim); pos flattened to (M,).

    Returns (1, M, embed_dim) float32 (computed in float64 like upstream).
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"get_1d_sincos_pos_embed_from_grid: embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None].float()


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Sin/cos embedding of an (h, w) pixel grid, (1, embed_dim, h, w).

    Channels [0, embed_dim / 2) embed the x (column) index, the rest the y (row) index;
    embed_dim must be a multiple of 4.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"get_2d_sincos_pos_embed: embed_dim must be a multiple of 4, got {embed_dim}")
    height, width = grid_size
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")  # each (h, w)
    emb = torch.cat(
        [
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_x),
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_y),
        ],
        dim=2,
    )
    return emb.reshape(1, height, width, embed_dim).permute(0, 3, 1, 2)


def get_2d_embedding(xy: torch.Tensor, C: int, cat_coords: bool = True) -> torch.Tensor:
    """Interleaved sin/cos embedding of 2-D points, as CoTracker writes it.

    For each coordinate c in (x, y): pe_c[2k] = sin(c * f_k), pe_c[2k+1] = cos(c * f_k) with
    f_k = 2k * 1000 / C (upstream multiplies by, rather than divides by, the usual frequency).

    Args:
        xy: (B, N, 2).
        C: channels per coordinate, even.

    Returns:
        (B, N, 2C), or (B, N, 2C + 2) with xy prepended when cat_coords.
    """
    if xy.shape[-1] != 2 or C % 2 != 0:
        raise ValueError(f"get_2d_embedding: needs (B, N, 2) points and an even C, got {tuple(xy.shape)}, C={C}")
    freqs = torch.arange(0, C, 2, device=xy.device, dtype=torch.float32) * (1000.0 / C)

    def embed(coord: torch.Tensor) -> torch.Tensor:
        angles = coord * freqs  # (B, N, C / 2)
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)

    pe = torch.cat([embed(xy[..., 0:1]), embed(xy[..., 1:2])], dim=-1)
    if cat_coords:
        pe = torch.cat([xy, pe], dim=-1)
    return pe


def bilinear_sampler(
    input: torch.Tensor, coords: torch.Tensor, align_corners: bool = True, padding_mode: str = "border"
) -> torch.Tensor:
    """grid_sample with pixel coordinates.

    Args:
        input: (B, C, H, W).
        coords: (B, Ho, Wo, 2) as (x, y) pixels; with align_corners, 0 and W-1 are the centres of
            the first and last columns. Coordinates carry no gradient (detached, as upstream):
            the tracker learns through its predicted updates, not through the sampling positions.

    Returns:
        (B, C, Ho, Wo).
    """
    if input.dim() != 4:
        raise ValueError(f"bilinear_sampler: expected a (B, C, H, W) input, got {tuple(input.shape)}")
    coords = coords.detach().to(device=input.device, dtype=input.dtype)
    height, width = input.shape[2:]
    if align_corners:
        scale = [2 / max(width - 1, 1), 2 / max(height - 1, 1)]
    else:
        scale = [2 / width, 2 / height]
    grid = coords * torch.tensor(scale, device=coords.device, dtype=coords.dtype) - 1
    return F.grid_sample(input, grid, align_corners=align_corners, padding_mode=padding_mode)


def sample_features4d(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear features at points: input (B, C, H, W), coords (B, R, 2) pixels -> (B, R, C)."""
    feats = bilinear_sampler(input, coords.unsqueeze(2))  # (B, C, R, 1)
    return feats.permute(0, 2, 1, 3).reshape(input.shape[0], -1, feats.shape[1] * feats.shape[3])


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (upstream's timm-style Mlp; its dropouts are always 0 here)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttnBlock(nn.Module):
    """Self-attention block, (N, L, hidden) -> (N, L, hidden).

    As upstream, the attention residual is taken from the *normalised* input:
        x = norm1(x); x = x + attn(x, x, x); x = x + mlp(norm2(x)).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        # Upstream keeps nn.MultiheadAttention's default need_weights=True (the explicit-softmax
        # path); kept so that captured graphs look like the real model's.
        attn_output, _ = self.attn(x, x, x)
        x = x + attn_output
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block: x (N, Lq, hidden) attends to context (N, Lk, hidden).

        x = norm1(x); c = norm_context(context); x = x + attn(x, c, c); x = x + mlp(norm2(x)).

    `context_dim` is kept for upstream's signature; the context must already be `hidden_size` wide.
    """

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int = 1, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if context_dim != hidden_size:
            raise ValueError(
                f"lite3r_compile.models_zoo.track_modules.CrossAttnBlock: context_dim ({context_dim}) must "
                f"equal hidden_size ({hidden_size}); the attention has no separate key/value width"
            )
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        attn_output, _ = self.cross_attn(x, context, context, attn_mask=mask)
        x = x + attn_output
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Transformer that predicts track updates, (B, N, T, input_dim) -> (B, N, T, output_dim).

    Each of `time_depth` layers attends over the T frames of every track; every
    time_depth // space_depth layers, the tracks of each frame exchange information through
    `num_virtual_tracks` learned tokens (virtual <- points, virtual <-> virtual, points <- virtual),
    which keeps the cost linear in N.
    """

    def __init__(
        self,
        space_depth: int = 6,
        time_depth: int = 6,
        input_dim: int = 320,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        add_space_attn: bool = True,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        where = "lite3r_compile.models_zoo.track_modules.EfficientUpdateFormer"
        if hidden_size % num_heads != 0:
            raise ValueError(f"{where}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if add_space_attn and not 0 < space_depth <= time_depth:
            raise ValueError(f"{where}: need 0 < space_depth <= time_depth, got {space_depth} and {time_depth}")
        self.out_channels = 2
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks

        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size, bias=True)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim, bias=True)

        # "virual_tracks" (sic) is the upstream state-dict name.
        self.virual_tracks = (
            nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size)) if add_space_attn else None
        )
        self.time_blocks = nn.ModuleList(
            [AttnBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(time_depth)]
        )
        if add_space_attn:
            self.space_virtual_blocks = nn.ModuleList(
                [AttnBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(space_depth)]
            )
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(space_depth)]
            )
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(space_depth)]
            )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias; a near-zero flow head so updates start small."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(
        self, input_tensor: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """input_tensor (B, N, T, input_dim) -> (flow (B, N, T, output_dim), None).

        `mask` is the attention mask of the point <-> virtual cross-attentions (upstream's
        argument; the tracker passes None). The second output is None, as upstream.
        """
        tokens = self.input_transform(self.input_norm(input_tensor))
        init_tokens = tokens
        batch, _, frames, _ = tokens.shape
        if self.add_space_attn:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(batch, 1, frames, 1)], dim=1)
        num_tokens = tokens.shape[1]
        num_points = num_tokens - self.num_virtual_tracks if self.add_space_attn else num_tokens

        space_every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0
        space_idx = 0
        for i, time_block in enumerate(self.time_blocks):
            time_tokens = time_block(tokens.reshape(batch * num_tokens, frames, -1))
            tokens = time_tokens.view(batch, num_tokens, frames, -1)
            if self.add_space_attn and i % space_every == 0:
                space_tokens = tokens.permute(0, 2, 1, 3).reshape(batch * frames, num_tokens, -1)
                point_tokens = space_tokens[:, :num_points]
                virtual_tokens = space_tokens[:, num_points:]
                virtual_tokens = self.space_virtual2point_blocks[space_idx](virtual_tokens, point_tokens, mask=mask)
                virtual_tokens = self.space_virtual_blocks[space_idx](virtual_tokens)
                point_tokens = self.space_point2virtual_blocks[space_idx](point_tokens, virtual_tokens, mask=mask)
                space_tokens = torch.cat([point_tokens, virtual_tokens], dim=1)
                tokens = space_tokens.view(batch, frames, num_tokens, -1).permute(0, 2, 1, 3)
                space_idx += 1

        tokens = tokens[:, :num_points] + init_tokens
        return self.flow_head(self.output_norm(tokens)), None


# ---------------------------------------------------------------------------------------------
# Correlation
# ---------------------------------------------------------------------------------------------


class CorrBlock:
    """Multi-scale correlation between track features and frame feature maps.

    Builds a pyramid of `num_levels` maps, each 2x average-pooled from the last. Upstream pools
    every level with a 2x2 window, which fails once a side reaches 1 pixel (small images); here a
    side shorter than 2 keeps its size (window 1 along it). Maps of 2 pixels or more per side pool
    exactly as upstream, so full-size inputs give identical pyramids.
    """

    def __init__(
        self,
        fmaps: torch.Tensor,
        num_levels: int = 4,
        radius: int = 4,
        multiple_track_feats: bool = False,
        padding_mode: str = "zeros",
    ) -> None:
        """fmaps: (B, S, C, H, W)."""
        batch, frames, channels, _, _ = fmaps.shape
        self.num_levels = num_levels
        self.radius = radius
        self.padding_mode = padding_mode
        self.multiple_track_feats = multiple_track_feats

        self.fmaps_pyramid = [fmaps]
        level = fmaps
        for _ in range(num_levels - 1):
            height, width = level.shape[-2:]
            window = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
            pooled = F.avg_pool2d(level.reshape(batch * frames, channels, height, width), window, stride=window)
            level = pooled.reshape(batch, frames, channels, *pooled.shape[-2:])
            self.fmaps_pyramid.append(level)

        # (2r+1, 2r+1, 2) offsets; [i, j] = (lin[i], lin[j]) is added to (x, y), so the row index
        # of the window moves x. Upstream's order, which the corr_mlp weights are trained on.
        lin = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        self.delta = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), dim=-1)

    def corr_sample(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Correlations around each point, one level at a time (no full volume kept).

        Args:
            targets: (B, S, N, C) track features (C // num_levels per level with multiple_track_feats).
            coords: (B, S, N, 2) pixel coordinates at the resolution of level 0.

        Returns:
            (B, S, N, num_levels * (2r+1)^2): <target, fmap> / sqrt(C) bilinearly sampled on the
            window around coords / 2^level, zero outside the map.
        """
        batch, frames, num_points, channels = targets.shape
        if self.multiple_track_feats:
            targets_per_level = torch.split(targets, channels // self.num_levels, dim=-1)
        window = 2 * self.radius + 1
        delta = self.delta.to(device=coords.device, dtype=coords.dtype).view(1, window, window, 2)
        sampled = []
        for level_idx, fmaps in enumerate(self.fmaps_pyramid):
            _, _, level_channels, height, width = fmaps.shape
            target = targets_per_level[level_idx] if self.multiple_track_feats else targets
            flat_fmaps = fmaps.reshape(batch, frames, level_channels, height * width)
            corrs = compute_corr_level(target, flat_fmaps, level_channels)
            centroid = coords.reshape(batch * frames * num_points, 1, 1, 2) / (2**level_idx)
            level_sampled = bilinear_sampler(
                corrs.reshape(batch * frames * num_points, 1, height, width),
                centroid + delta,
                padding_mode=self.padding_mode,
            )
            sampled.append(level_sampled.view(batch, frames, num_points, -1))
        return torch.cat(sampled, dim=-1).contiguous()


def compute_corr_level(fmap1: torch.Tensor, fmap2s: torch.Tensor, C: int) -> torch.Tensor:
    """fmap1 (B, S, N, C) @ fmap2s (B, S, C, HW) / sqrt(C) -> (B, S, N, HW)."""
    return torch.matmul(fmap1, fmap2s) / math.sqrt(C)


# ---------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------


class BaseTrackerPredictor(nn.Module):
    """Iterative point tracker on per-frame feature maps.

    Args:
        stride: feature-map pixels per input pixel along each side are 1 / stride; query points
            and predictions are in input pixels.
        corr_levels / corr_radius: correlation pyramid depth and window radius.
        latent_dim: channels of the feature maps and of the track features (a multiple of 4).
        hidden_size: width of the update transformer (8 heads).
        use_spaceatt: attention across tracks through virtual tracks.
        depth: layers of the update transformer.
        max_scale: displacements are also fed raw, divided by this.
        predict_conf: also predict a per-point confidence.
    """

    def __init__(
        self,
        stride: int = 1,
        corr_levels: int = 5,
        corr_radius: int = 4,
        latent_dim: int = 128,
        hidden_size: int = 384,
        use_spaceatt: bool = True,
        depth: int = 6,
        max_scale: int = 518,
        predict_conf: bool = True,
    ) -> None:
        super().__init__()
        if latent_dim % 4 != 0:
            raise ValueError(
                f"lite3r_compile.models_zoo.track_modules.BaseTrackerPredictor: latent_dim must be a multiple "
                f"of 4 (the displacement embedding splits it in sin/cos pairs per coordinate), got {latent_dim}"
            )
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.hidden_size = hidden_size
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2

        self.corr_mlp = Mlp(
            in_features=corr_levels * (corr_radius * 2 + 1) ** 2,
            hidden_features=hidden_size,
            out_features=latent_dim,
        )
        # displacement embedding (latent_dim + 4) + correlation (latent_dim) + track feature (latent_dim)
        self.transformer_dim = latent_dim * 3 + 4
        # Row 0 marks the query frame, row 1 every other frame.
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0,
            time_depth=depth,
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            output_dim=latent_dim + 2,
            mlp_ratio=4.0,
            add_space_attn=use_spaceatt,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self,
        query_points: torch.Tensor,
        fmaps: torch.Tensor,
        iters: int = 6,
        return_feat: bool = False,
        down_ratio: int = 1,
        apply_sigmoid: bool = True,
    ):
        """Track query points of frame 0 through all frames.

        Args:
            query_points: (B, N, 2) (x, y) pixels in frame 0.
            fmaps: (B, S, latent_dim, h, w) feature maps (h = H / (stride * down_ratio)).
            iters: refinement iterations.
            down_ratio: extra downsampling of the feature maps relative to the query pixels.
            apply_sigmoid: return probabilities instead of logits for vis / conf.

        Returns:
            coord_preds: `iters` tensors (B, S, N, 2) in input pixels (frame 0 pinned to the query),
            vis (B, S, N), conf (B, S, N) or None without predict_conf; with return_feat, also the
            track features (B, S, N, C) and the query features (B, N, C), returned as
            (coord_preds, vis, track_feats, query_track_feat, conf).
        """
        batch, num_points, coord_dim = query_points.shape
        _, frames, _, fmap_h, fmap_w = fmaps.shape
        if coord_dim != 2:
            raise ValueError(
                f"lite3r_compile.models_zoo.track_modules.BaseTrackerPredictor: query_points must be "
                f"(B, N, 2), got {tuple(query_points.shape)}"
            )
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

        if down_ratio > 1:
            query_points = query_points / float(down_ratio)
        query_points = query_points / float(self.stride)

        # Every frame starts its search at the query position.
        coords = query_points.clone().reshape(batch, 1, num_points, 2).repeat(1, frames, 1, 1)
        query_track_feat = sample_features4d(fmaps[:, 0], coords[:, 0])  # (B, N, C)
        track_feats = query_track_feat.unsqueeze(1).repeat(1, frames, 1, 1)  # (B, S, N, C)
        query_coords = coords[:, 0].clone()
        corr_fn = CorrBlock(fmaps, num_levels=self.corr_levels, radius=self.corr_radius)

        # Depends only on the map size and the query positions, both fixed over the iterations.
        pos_embed = get_2d_sincos_pos_embed(self.transformer_dim, (fmap_h, fmap_w), device=fmaps.device)
        sampled_pos_emb = sample_features4d(pos_embed.expand(batch, -1, -1, -1), coords[:, 0])
        sampled_pos_emb = sampled_pos_emb.reshape(batch * num_points, 1, self.transformer_dim)
        query_ref_token = torch.cat(
            [self.query_ref_token[:, 0:1], self.query_ref_token[:, 1:2].expand(-1, frames - 1, -1)], dim=1
        )

        coord_preds = []
        for _ in range(iters):
            # Each iteration learns from its own update; no gradient through earlier coordinates.
            coords = coords.detach()
            fcorrs = corr_fn.corr_sample(track_feats, coords)  # (B, S, N, levels * (2r+1)^2)
            fcorrs = fcorrs.permute(0, 2, 1, 3).reshape(batch * num_points, frames, -1)
            fcorrs = self.corr_mlp(fcorrs)

            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(batch * num_points, frames, 2)
            flows_emb = get_2d_embedding(flows, self.flows_emb_dim, cat_coords=False)
            flows_emb = torch.cat([flows_emb, flows / self.max_scale, flows / self.max_scale], dim=-1)

            track_feats_ = track_feats.permute(0, 2, 1, 3).reshape(batch * num_points, frames, self.latent_dim)
            x = torch.cat([flows_emb, fcorrs, track_feats_], dim=2) + sampled_pos_emb
            x = x + query_ref_token.to(device=x.device, dtype=x.dtype)

            delta, _ = self.updateformer(x.reshape(batch, num_points, frames, self.transformer_dim))
            delta = delta.reshape(batch * num_points * frames, self.latent_dim + 2)
            delta_coords = delta[:, :2]
            delta_feats = delta[:, 2:]

            track_feats_ = track_feats_.reshape(batch * num_points * frames, self.latent_dim)
            track_feats_ = self.ffeat_updater(self.ffeat_norm(delta_feats)) + track_feats_
            track_feats = track_feats_.reshape(batch, num_points, frames, self.latent_dim).permute(0, 2, 1, 3)

            coords = coords + delta_coords.reshape(batch, num_points, frames, 2).permute(0, 2, 1, 3)
            # The query frame's position is given, not predicted.
            coords = torch.cat([query_coords[:, None], coords[:, 1:]], dim=1)
            coord_preds.append(coords * self.stride * (down_ratio if down_ratio > 1 else 1))

        flat_feats = track_feats.reshape(batch * frames * num_points, self.latent_dim)
        vis = self.vis_predictor(flat_feats).reshape(batch, frames, num_points)
        conf = None
        if self.predict_conf:
            conf = self.conf_predictor(flat_feats).reshape(batch, frames, num_points)
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        if return_feat:
            return coord_preds, vis, track_feats, query_track_feat, conf
        return coord_preds, vis, conf
