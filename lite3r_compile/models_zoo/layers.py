"""Transformer building blocks shared by the zoo's VGGT, DINOv2 and DA3 models.

The module and parameter names follow upstream VGGT's `vggt/layers` (itself DINOv2's layers) so
that official checkpoints load by state-dict name: `attn.qkv`, `attn.q_norm`, `attn.proj`,
`ls1.gamma`, `mlp.fc1`, `norm1`, `patch_embed.proj`, ...

The code is written the way upstream writes it, not the way a compiler would like it: attention
calls `F.scaled_dot_product_attention` on (B, H, N, D) tensors unbound from a fused qkv
projection, in bf16 with float32 heads. One exception, measured: upstream's 2D rotary embedding
sizes a frequency table with the data-dependent `int(positions.max()) + 1`, a host sync and a
Dynamo graph break in every block (48 per VGGT forward; compiled VGGT-1B spent 467 ms of 517 ms
idle between the pieces). Here the same angles are computed from the positions directly, which
gives bit-identical values with neither (tests/test_zoo_vggt.py checks both). Code in the wild
that keeps the table is still handled: capture copes with it, and `torch.compile(backend="lite3r")`
reports each such graph break (`lite3r_compile.testing` keeps that pattern for the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RotaryPositionEmbedding2D(nn.Module):
    """2D rotary position embedding (RoPE) over a patch grid, as in VGGT's aggregator.

    The head dimension D is split into a first half rotated by the token's y (row) position and a
    second half rotated by its x (column) position. Within each half of size D/2, frequencies are
    `base ** (-2i / (D/2))` for i in [0, D/4) and the rotation pairs feature j with j + D/4
    ("rotate half" convention).

    Args:
        frequency: the base of the frequency ladder (VGGT: 100).
        scaling_factor: kept for parity with upstream's constructor; upstream does not use it.
    """

    def __init__(self, frequency: float = 100.0, scaling_factor: float = 1.0):
        super().__init__()
        self.base_frequency = frequency
        self.scaling_factor = scaling_factor

    def inverse_frequencies(self, dim: int, device: torch.device) -> Tensor:
        """`base ** (-2i / dim)` for i in [0, dim/2), float32, as upstream computes them."""
        exponents = torch.arange(0, dim, 2, device=device).float() / dim
        return 1.0 / (self.base_frequency**exponents)

    @staticmethod
    def _rotate_features(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _apply_1d_rope(self, tokens: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
        # Row p of upstream's table is (p * inv_freq) rounded to the tokens' dtype, then cos/sin:
        # the same float32 product per element here, so the values are bit-identical, without a
        # table whose length depends on the data. positions (B, N); the head axis broadcasts.
        angles = (positions.to(torch.float32)[..., None] * inv_freq).to(tokens.dtype)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :, :]
        return tokens * angles.cos() + self._rotate_features(tokens) * angles.sin()

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Rotate `tokens` (B, H, N, D) by integer grid `positions` (B, N, 2) holding (y, x)."""
        if tokens.size(-1) % 4 != 0:
            raise ValueError(f"RotaryPositionEmbedding2D: head dim {tokens.size(-1)} must be a multiple of 4")
        if positions.ndim != 3 or positions.shape[-1] != 2:
            raise ValueError(
                f"RotaryPositionEmbedding2D: positions must be (batch, tokens, 2), got {tuple(positions.shape)}"
            )
        vertical, horizontal = tokens.chunk(2, dim=-1)
        inv_freq = self.inverse_frequencies(vertical.size(-1), tokens.device)
        vertical = self._apply_1d_rope(vertical, positions[..., 0], inv_freq)
        horizontal = self._apply_1d_rope(horizontal, positions[..., 1], inv_freq)
        return torch.cat((vertical, horizontal), dim=-1)


class PositionGetter:
    """Integer (y, x) grid positions of patch tokens, cached per grid size.

    `PositionGetter()(b, h, w, device)` returns a (b, h*w, 2) int64 tensor in row-major order.
    Upstream keys its cache on (h, w) only; the device is part of the key here so that a model
    moved between devices does not reuse positions from the old one.
    """

    def __init__(self) -> None:
        self.position_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def __call__(self, batch_size: int, height: int, width: int, device: torch.device) -> Tensor:
        key = (height, width, torch.device(device))
        cached = self.position_cache.get(key)
        if cached is None:
            cached = torch.cartesian_prod(torch.arange(height, device=device), torch.arange(width, device=device))
            # Not inside a compiled graph: the tensor would be one of the graph's outputs, and with
            # CUDA graphs (mode="reduce-overhead") the next replay overwrites it in place.
            if not torch.compiler.is_compiling():
                self.position_cache[key] = cached
        return cached.view(1, height * width, 2).expand(batch_size, -1, -1).clone()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional qk-norm and optional RoPE.

    x (B, N, C) -> qkv Linear (C -> 3C) -> q, k, v each (B, H, N, C/H) -> LayerNorm over the head
    dim of q and k (qk-norm) -> RoPE on q and k -> softmax(q k^T / sqrt(C/H)) v through
    `F.scaled_dot_product_attention` -> (B, N, C) -> proj Linear.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    """fc1 (in -> hidden) -> GELU -> fc2 (hidden -> out), the transformer feed-forward layer."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class LayerScale(nn.Module):
    """x * gamma with a learnable per-channel gamma initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    `init_values` None or 0 drops LayerScale (nn.Identity, no parameters), as upstream does.
    `pos` (B, N, 2) is passed to the attention's RoPE when the block has one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            rope=rope,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=drop,
            bias=ffn_bias,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, embed_dim) through a p x p stride-p conv.

    `img_size` only sets `num_patches` (the length of a ViT's learned position table); any H, W
    that are multiples of the patch size are accepted.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        _, _, H, W = x.shape
        patch_h, patch_w = self.patch_size
        if H % patch_h != 0 or W % patch_w != 0:
            raise ValueError(f"PatchEmbed: image size {H}x{W} is not a multiple of the patch size {patch_h}x{patch_w}")
        x = self.proj(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, H/p * W/p, C)
        return self.norm(x)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, tuple):
        return value
    return (value, value)
