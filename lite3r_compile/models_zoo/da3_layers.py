"""Transformer layers of Depth Anything 3: attention with optional qk-norm and 2D RoPE, pre-norm
block, patch embedding (the MLP, LayerScale and 2D RoPE are the zoo's shared ones, in `layers`).

Facts follow upstream `depth_anything_3/model/dinov2/layers/*` and `model/utils/{attention,
block}.py`; parameter names (`qkv`, `q_norm`, `k_norm`, `proj`, `ls1.gamma`, `mlp.fc1`,
`patch_embed.proj`) match them so official checkpoints load by name.

Two details differ between the backbone and the camera encoder upstream and are parameters here:
the backbone's block LayerNorms use eps 1e-6, the camera encoder's the PyTorch default 1e-5.
The qk-norm LayerNorms use 1e-5 in both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# DA3's 2D RoPE is VGGT's (same frequencies, same rotate-half pairing)
from lite3r_compile.models_zoo.layers import LayerScale, Mlp, RotaryPositionEmbedding2D


def patch_positions(batch: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """Integer (y, x) coordinates of a grid_h x grid_w patch grid, row-major.

    Returns:
        (batch, grid_h * grid_w, 2) int64, [..., 0] = row, [..., 1] = column.
    """
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(rows, cols)
    return grid.view(1, grid_h * grid_w, 2).expand(batch, -1, -1).clone()


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) with a fused qkv projection.

    q, k, v = split(qkv(x)) as (B, H, N, D); q, k = LayerNorm_D(q), LayerNorm_D(k) when qk_norm;
    q, k = RoPE(q, pos), RoPE(k, pos) when a rope module and positions are given;
    out = proj(softmax(q k^T / sqrt(D)) v).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), pos (B, N, 2) int or None -> (B, N, C)."""
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches.

        x = x + ls1(attn(norm1(x), pos));  x = x + ls2(mlp(norm2(x)))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float = 1.0,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        ln_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), pos (B, N, 2) or None -> (B, N, C)."""
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim tokens by one strided conv.

    (N, 3, H, W) -> (N, (H / p) * (W / p), embed_dim), row-major over the patch grid.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
