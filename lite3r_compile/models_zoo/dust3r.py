"""A DUSt3R-like two-view model (CroCo encoder, two cross-attention decoders, pointmap heads).

Architecture (after DUSt3R / CroCo v2; upstream sizes are the config defaults: ViT-L encoder,
ViT-B decoder, patch 16):

- a shared ViT encoder runs on each view separately: tokens (B*2, P, C_enc), 2D RoPE in every
  attention;
- ``decoder_embed`` maps to the decoder width; two decoders (``dec_blocks`` for view 1,
  ``dec_blocks2`` for view 2) run in lockstep: block i of each decoder self-attends over its own
  view's tokens (B, P, C_dec) and cross-attends to the other view's tokens from block i-1;
- a linear head per view predicts, per pixel, a 3D point (view 2's in view 1's frame) and a
  confidence (``1 + exp``).

Attention is written as CroCo writes it: manual, the scale applied after the product,
``(q @ k.transpose(-2, -1)) * scale``; the cross-attention has separate ``projq`` / ``projk`` /
``projv``. The RoPE builds its table up to ``int(positions.max()) + 1`` (CroCo's PyTorch
fallback), so ``torch.fx.symbolic_trace`` cannot trace any attention module here.

Input: images (B, 2, 3, H, W) in [0, 1], H and W multiples of the patch size.
Output: ``pts3d`` (B, 2, H, W, 3) and ``conf`` (B, 2, H, W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DUSt3RConfig",
    "DUSt3RLike",
    "DUST3R_TINY",
    "RoPE2D",
    "CroCoAttention",
    "CroCoCrossAttention",
    "EncoderBlock",
    "DecoderBlock",
    "CroCoEncoder",
    "LinearPointHead",
    "grid_positions",
    "build_dust3r",
    "build_dust3r_tiny",
]


@dataclass(frozen=True)
class DUSt3RConfig:
    """Sizes of a DUSt3R-like model. Defaults: DUSt3R ViT-L encoder / ViT-B decoder, patch 16.

    ``image_size`` and ``num_views`` are the example inputs' shape (``example_inputs``); the model
    takes any H, W that are multiples of ``patch_size``, and exactly 2 views.
    """

    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0
    image_size: tuple[int, int] = (512, 384)
    num_views: int = 2

    def __post_init__(self) -> None:
        for name, dim, heads in (
            ("enc", self.enc_embed_dim, self.enc_num_heads),
            ("dec", self.dec_embed_dim, self.dec_num_heads),
        ):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(
                    f"DUSt3RConfig: {name}_embed_dim {dim} / {name}_num_heads {heads} must give a head dim "
                    "divisible by 4 (2D RoPE splits it into y and x halves of rotating pairs)"
                )
        if self.num_views != 2:
            raise ValueError(f"DUSt3RConfig: a DUSt3R-like model takes exactly 2 views, got num_views={self.num_views}")


DUST3R_TINY = DUSt3RConfig(
    patch_size=8,
    enc_embed_dim=32,
    enc_depth=2,
    enc_num_heads=2,
    dec_embed_dim=32,
    dec_depth=2,
    dec_num_heads=2,
    image_size=(32, 24),
)


def grid_positions(batch: int, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
    """(batch, grid_h * grid_w, 2) int64 (y, x) patch coordinates, row-major."""
    y = torch.arange(grid_h, device=device)
    x = torch.arange(grid_w, device=device)
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(grid_h * grid_w, 2)
    return grid.expand(batch, -1, -1)


class RoPE2D(nn.Module):
    """2D rotary embedding: the first half of the head dim rotates with y, the second with x.

    tokens (B, H, N, D), positions (B, N, 2) int64. The angle table is built up to
    ``int(positions.max()) + 1`` as CroCo's PyTorch RoPE does.
    """

    def __init__(self, freq: float = 100.0) -> None:
        super().__init__()
        self.base = freq

    def _cos_sin(self, dim: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = torch.arange(length, device=device).float()[:, None] * inv_freq  # (length, dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rotate(tokens: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos = F.embedding(positions, cos)[:, None]  # (B, 1, N, D/2)
        sin = F.embedding(positions, sin)[:, None]
        first, second = tokens.chunk(2, dim=-1)
        return tokens * cos + torch.cat((-second, first), dim=-1) * sin

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        half = tokens.size(3) // 2
        cos, sin = self._cos_sin(half, int(positions.max()) + 1, tokens.device, tokens.dtype)
        y, x = tokens.chunk(2, dim=-1)
        y = self._rotate(y, positions[:, :, 0], cos, sin)
        x = self._rotate(x, positions[:, :, 1], cos, sin)
        return torch.cat((y, x), dim=-1)


class CroCoAttention(nn.Module):
    """Self-attention, manual, scale after the product. x (B, N, C), xpos (B, N, 2)."""

    def __init__(self, dim: int, num_heads: int, rope: Optional[RoPE2D]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor, xpos: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).transpose(1, 3)  # (B, H, 3, N, D)
        q, k, v = [qkv[:, :, i] for i in range(3)]
        if self.rope is not None:
            q = self.rope(q, xpos)
            k = self.rope(k, xpos)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class CroCoCrossAttention(nn.Module):
    """Cross-attention with separate q / k / v projections, manual, scale after the product.

    query (B, Nq, C), key and value (B, Nk, C), qpos (B, Nq, 2), kpos (B, Nk, 2).
    """

    def __init__(self, dim: int, num_heads: int, rope: Optional[RoPE2D]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, query: Tensor, key: Tensor, value: Tensor, qpos: Tensor, kpos: Tensor) -> Tensor:
        B, Nq, C = query.shape
        Nk = key.shape[1]
        H = self.num_heads
        q = self.projq(query).reshape(B, Nq, H, C // H).permute(0, 2, 1, 3)
        k = self.projk(key).reshape(B, Nk, H, C // H).permute(0, 2, 1, 3)
        v = self.projv(value).reshape(B, Nk, H, C // H).permute(0, 2, 1, 3)
        if self.rope is not None:
            q = self.rope(q, qpos)
            k = self.rope(k, kpos)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, Nq, C)
        return self.proj(x)


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block with RoPE self-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: Optional[RoPE2D]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CroCoAttention(dim, num_heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, xpos: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), xpos)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention over x, cross-attention from x to y, MLP (CroCo's decoder block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: Optional[RoPE2D]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CroCoAttention(dim, num_heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CroCoCrossAttention(dim, num_heads, rope)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _mlp(dim, mlp_ratio)
        self.norm_y = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, y: Tensor, xpos: Tensor, ypos: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), xpos)
        y_ = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y_, y_, xpos, ypos)
        return x + self.mlp(self.norm3(x))


class CroCoEncoder(nn.Module):
    """Patch embedding + ViT blocks + norm, run on each image: (N, 3, H, W) -> (N, P, C), (N, P, 2)."""

    def __init__(self, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, rope_freq: float):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.rope = RoPE2D(rope_freq)
        self.enc_blocks = nn.ModuleList(EncoderBlock(dim, num_heads, mlp_ratio, self.rope) for _ in range(depth))
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.patch_embed(images)  # (N, C, h, w)
        N, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = grid_positions(N, h, w, x.device)
        for block in self.enc_blocks:
            x = block(x, pos)
        return self.enc_norm(x), pos


class LinearPointHead(nn.Module):
    """Per-patch Linear to patch_size^2 pixels of (x, y, z, conf); DUSt3R's 'exp' depth mode
    (direction * expm1(norm)) and confidence 1 + exp(c). tokens (B, h*w, C) -> (B, H, W, 3), (B, H, W)."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, 4 * patch_size * patch_size)

    def forward(self, tokens: Tensor, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
        B = tokens.shape[0]
        p = self.patch_size
        out = self.proj(tokens).reshape(B, grid_h, grid_w, p, p, 4)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, grid_h * p, grid_w * p, 4)
        xyz, conf = out[..., :3], out[..., 3]
        distance = xyz.norm(dim=-1, keepdim=True)
        pts3d = xyz / distance.clamp(min=1e-8) * torch.expm1(distance)
        return pts3d, 1.0 + conf.exp()


class DUSt3RLike(nn.Module):
    """See the module docstring. ``forward(images (B, 2, 3, H, W)) -> {"pts3d", "conf"}``."""

    def __init__(self, config: DUSt3RConfig = DUST3R_TINY) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.encoder = CroCoEncoder(
            config.patch_size, config.enc_embed_dim, config.enc_depth, config.enc_num_heads, config.mlp_ratio, config.rope_freq
        )
        self.decoder_embed = nn.Linear(config.enc_embed_dim, config.dec_embed_dim)
        self.rope = RoPE2D(config.rope_freq)
        dec = (config.dec_embed_dim, config.dec_num_heads, config.mlp_ratio, self.rope)
        self.dec_blocks = nn.ModuleList(DecoderBlock(*dec) for _ in range(config.dec_depth))
        self.dec_blocks2 = nn.ModuleList(DecoderBlock(*dec) for _ in range(config.dec_depth))
        self.dec_norm = nn.LayerNorm(config.dec_embed_dim, eps=1e-6)
        self.head1 = LinearPointHead(config.dec_embed_dim, config.patch_size)
        self.head2 = LinearPointHead(config.dec_embed_dim, config.patch_size)

    def example_inputs(self) -> tuple[Tensor]:
        """One (1, 2, 3, H, W) batch of images in [0, 1] at ``config.image_size``, seeded, on the
        model's device."""
        device = next(self.parameters()).device
        H, W = self.config.image_size
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(1, 2, 3, H, W, generator=generator).to(device),)

    def attention_sites(self) -> dict[str, str]:
        """Ground truth for the attention finder: module path -> scope."""
        sites = {f"encoder.enc_blocks.{i}.attn": "frame" for i in range(self.config.enc_depth)}
        for decoder in ("dec_blocks", "dec_blocks2"):
            for i in range(self.config.dec_depth):
                sites[f"{decoder}.{i}.attn"] = "frame"
                sites[f"{decoder}.{i}.cross_attn"] = "cross"
        return sites

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from lite3r_compile.models_zoo import check_images

        images = check_images(images, self.patch_size)
        B, S, _, H, W = images.shape
        if S != 2:
            raise ValueError(
                f"DUSt3RLike takes exactly 2 views (images of shape (B, 2, 3, H, W)), got {S} views; "
                "run pairs of views, or use a multi-view model (fast3r-tiny, pi3-tiny)"
            )
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        tokens, pos = self.encoder(images.flatten(0, 1))  # (B*2, P, C_enc)
        tokens = self.decoder_embed(tokens).reshape(B, 2, grid_h * grid_w, -1)
        pos = pos.reshape(B, 2, grid_h * grid_w, 2)
        f1, f2 = tokens[:, 0], tokens[:, 1]
        pos1, pos2 = pos[:, 0], pos[:, 1]
        for block1, block2 in zip(self.dec_blocks, self.dec_blocks2):
            # both decoders read the previous layer of the other view
            f1, f2 = block1(f1, f2, pos1, pos2), block2(f2, f1, pos2, pos1)
        pts1, conf1 = self.head1(self.dec_norm(f1), grid_h, grid_w)
        pts2, conf2 = self.head2(self.dec_norm(f2), grid_h, grid_w)
        return {"pts3d": torch.stack((pts1, pts2), dim=1), "conf": torch.stack((conf1, conf2), dim=1)}


def build_dust3r(config: DUSt3RConfig = DUSt3RConfig(), **overrides) -> DUSt3RLike:
    """A DUSt3R-like model from ``config`` with fields replaced by ``overrides``."""
    return DUSt3RLike(dataclasses.replace(config, **overrides) if overrides else config)


def build_dust3r_tiny(**overrides) -> DUSt3RLike:
    """DUSt3R-like at toy sizes: patch 8, width 32, 2 encoder blocks, 2+2 decoder blocks, 2 heads;
    example inputs (1, 2, 3, 32, 24). Runs forward+backward on a CPU in milliseconds."""
    return build_dust3r(DUST3R_TINY, **overrides)
