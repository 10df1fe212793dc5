"""A Fast3R-like multi-view model: per-view encoder, then global attention over all views at once.

Architecture (after Fast3R; upstream sizes are the config defaults: CroCo ViT-L/16 encoder,
ViT-L fusion transformer):

- the CroCo encoder of the DUSt3R-like model (``dust3r.CroCoEncoder``: RoPE, manual attention
  with the scale after the product) runs on every view separately: (B*S, P, C_enc);
- the fusion decoder embeds the tokens to its width, adds a sinusoidal image-index embedding
  (view s gets row s of the table, so views stay distinguishable), concatenates all views and
  runs self-attention over (B, S*P, C_dec) with ``F.scaled_dot_product_attention``;
- two linear pointmap heads: ``head`` predicts points in the first view's frame (``pts3d``,
  ``conf``), ``head_local`` points in each view's own frame (``pts3d_local``, ``conf_local``).

Input: images (B, S, 3, H, W) in [0, 1], any S >= 1, H and W multiples of the patch size.
Outputs: ``pts3d``, ``pts3d_local`` (B, S, H, W, 3); ``conf``, ``conf_local`` (B, S, H, W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite3r_compile.models_zoo.dust3r import CroCoEncoder, LinearPointHead

__all__ = [
    "Fast3RConfig",
    "Fast3RLike",
    "FAST3R_TINY",
    "FusionAttention",
    "FusionBlock",
    "Fast3RDecoder",
    "build_fast3r",
    "build_fast3r_tiny",
]


@dataclass(frozen=True)
class Fast3RConfig:
    """Sizes of a Fast3R-like model. Defaults: CroCo ViT-L/16 encoder, ViT-L fusion decoder.

    ``image_size`` and ``num_views`` shape the example inputs only.
    """

    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 1024
    dec_depth: int = 24
    dec_num_heads: int = 16
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0
    max_image_idx: int = 2048
    image_size: tuple[int, int] = (512, 384)
    num_views: int = 4

    def __post_init__(self) -> None:
        if self.enc_embed_dim % self.enc_num_heads or (self.enc_embed_dim // self.enc_num_heads) % 4:
            raise ValueError(
                f"Fast3RConfig: enc_embed_dim {self.enc_embed_dim} / enc_num_heads {self.enc_num_heads} must "
                "give a head dim divisible by 4 (2D RoPE)"
            )
        if self.dec_embed_dim % self.dec_num_heads or self.dec_embed_dim % 2:
            raise ValueError(
                f"Fast3RConfig: dec_embed_dim {self.dec_embed_dim} must be even and divisible by "
                f"dec_num_heads {self.dec_num_heads}"
            )
        if not 1 <= self.num_views <= self.max_image_idx:
            raise ValueError(f"Fast3RConfig: num_views must be in [1, max_image_idx={self.max_image_idx}]")


FAST3R_TINY = Fast3RConfig(
    patch_size=8,
    enc_embed_dim=32,
    enc_depth=2,
    enc_num_heads=2,
    dec_embed_dim=32,
    dec_depth=2,
    dec_num_heads=2,
    max_image_idx=16,
    image_size=(24, 32),
    num_views=3,
)


class FusionAttention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention``. x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = 0.0

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class FusionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FusionAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_table(length: int, dim: int, device: torch.device) -> Tensor:
    """(length, dim) 1D sin-cos embedding of positions 0..length-1 (sin half, then cos half)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim / 2))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * omega
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class Fast3RDecoder(nn.Module):
    """Fusion transformer: tokens (B, S, P, C_enc) -> (B, S, P, C_dec), attention over all S*P."""

    def __init__(self, config: Fast3RConfig) -> None:
        super().__init__()
        self.max_image_idx = config.max_image_idx
        self.decoder_embed = nn.Linear(config.enc_embed_dim, config.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(
            FusionBlock(config.dec_embed_dim, config.dec_num_heads, config.mlp_ratio) for _ in range(config.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(config.dec_embed_dim, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        B, S, P, _ = tokens.shape
        if S > self.max_image_idx:
            raise ValueError(f"Fast3RDecoder: {S} views exceed max_image_idx={self.max_image_idx}")
        x = self.decoder_embed(tokens)
        C = x.shape[-1]
        # computed, not a buffer: a model built on the meta device and loaded by assignment has no
        # buffer values to restore
        image_idx_emb = sincos_table(S, C, x.device).to(x.dtype)
        x = (x + image_idx_emb[None, :, None, :]).reshape(B, S * P, C)
        for block in self.dec_blocks:
            x = block(x)
        return self.dec_norm(x).reshape(B, S, P, C)


class Fast3RLike(nn.Module):
    """See the module docstring. ``forward(images (B, S, 3, H, W)) -> dict``."""

    def __init__(self, config: Fast3RConfig = FAST3R_TINY) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.encoder = CroCoEncoder(
            config.patch_size, config.enc_embed_dim, config.enc_depth, config.enc_num_heads, config.mlp_ratio, config.rope_freq
        )
        self.decoder = Fast3RDecoder(config)
        self.head = LinearPointHead(config.dec_embed_dim, config.patch_size)
        self.head_local = LinearPointHead(config.dec_embed_dim, config.patch_size)

    def example_inputs(self) -> tuple[Tensor]:
        """One (1, S, 3, H, W) batch in [0, 1] at ``config.num_views`` and ``config.image_size``,
        seeded, on the model's device."""
        device = next(self.parameters()).device
        H, W = self.config.image_size
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(1, self.config.num_views, 3, H, W, generator=generator).to(device),)

    def attention_sites(self, num_views: int) -> dict[str, str]:
        """Ground truth for the attention finder: module path -> scope, for ``num_views`` views."""
        sites = {f"encoder.enc_blocks.{i}.attn": "frame" for i in range(self.config.enc_depth)}
        sites.update({f"decoder.dec_blocks.{i}.attn": "global" for i in range(self.config.dec_depth)})
        return {path: "self" for path in sites} if num_views == 1 else sites

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from lite3r_compile.models_zoo import check_images

        images = check_images(images, self.patch_size)
        B, S, _, H, W = images.shape
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        tokens, _ = self.encoder(images.flatten(0, 1))  # (B*S, P, C_enc)
        fused = self.decoder(tokens.reshape(B, S, grid_h * grid_w, -1)).flatten(0, 1)  # (B*S, P, C_dec)
        pts3d, conf = self.head(fused, grid_h, grid_w)
        pts3d_local, conf_local = self.head_local(fused, grid_h, grid_w)
        return {
            "pts3d": pts3d.reshape(B, S, H, W, 3),
            "conf": conf.reshape(B, S, H, W),
            "pts3d_local": pts3d_local.reshape(B, S, H, W, 3),
            "conf_local": conf_local.reshape(B, S, H, W),
        }


def build_fast3r(config: Fast3RConfig = Fast3RConfig(), **overrides) -> Fast3RLike:
    """A Fast3R-like model from ``config`` with fields replaced by ``overrides``."""
    return Fast3RLike(dataclasses.replace(config, **overrides) if overrides else config)


def build_fast3r_tiny(**overrides) -> Fast3RLike:
    """Fast3R-like at toy sizes: patch 8, width 32, 2 encoder and 2 fusion blocks, 2 heads;
    example inputs (1, 3, 3, 24, 32). Runs forward+backward on a CPU in milliseconds."""
    return build_fast3r(FAST3R_TINY, **overrides)
