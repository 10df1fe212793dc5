"""A π3-like permutation-equivariant multi-view model: alternating frame/global attention, no
camera token and no reference view.

Architecture (after π3; upstream sizes are the config defaults: ViT-L/14 encoder, 36 decoder
blocks at width 1024):

- a ViT encoder runs on every view separately: (B*S, P, C);
- ``register_token`` adds R learned tokens to every view (the same for all views, so the model
  treats views symmetrically: no camera token, no special first view);
- the decoder alternates frame attention (even blocks, (B*S, R+P, C)) and global attention (odd
  blocks, (B, S*(R+P), C)), all with one Attention class (2D RoPE on patch coordinates + 1,
  registers at 0; ``F.scaled_dot_product_attention``);
- three light heads read the concatenation of the last two decoder outputs: a point decoder +
  linear head (local points, depth through exp), a confidence decoder + head, and a camera decoder
  whose pooled tokens give a rotation (6D, Gram-Schmidt) and a translation per view.

Input: images (B, S, 3, H, W) in [0, 1], any S >= 1, H and W multiples of the patch size.
Outputs: ``local_points`` and ``pts3d`` (B, S, H, W, 3), ``conf`` (B, S, H, W) logits,
``camera_poses`` (B, S, 4, 4) camera-to-world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite3r_compile.models_zoo.layers import LayerScale

__all__ = [
    "Pi3Config",
    "Pi3Like",
    "PI3_TINY",
    "RotaryEmbedding2D",
    "Attention",
    "Block",
    "HeadDecoder",
    "build_pi3",
    "build_pi3_tiny",
]


@dataclass(frozen=True)
class Pi3Config:
    """Sizes of a π3-like model. Defaults: ViT-L/14 encoder, 36 alternating decoder blocks.

    ``image_size`` and ``num_views`` shape the example inputs only.
    """

    patch_size: int = 14
    embed_dim: int = 1024
    num_heads: int = 16
    enc_depth: int = 24
    dec_depth: int = 36
    head_depth: int = 5
    num_register_tokens: int = 5
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0
    layer_scale_init: float = 0.01
    image_size: tuple[int, int] = (224, 224)
    num_views: int = 4

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"Pi3Config: embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head dim "
                "divisible by 4 (2D RoPE)"
            )
        if self.dec_depth < 2 or self.dec_depth % 2:
            raise ValueError(f"Pi3Config: dec_depth must be an even number >= 2 (frame/global pairs), got {self.dec_depth}")


PI3_TINY = Pi3Config(
    patch_size=7,
    embed_dim=32,
    num_heads=2,
    enc_depth=1,
    dec_depth=4,
    head_depth=1,
    num_register_tokens=2,
    image_size=(28, 21),
    num_views=3,
)


class RotaryEmbedding2D(nn.Module):
    """2D RoPE computed directly from positions (no cached table, so it traces symbolically):
    the first half of the head dim rotates with y, the second half with x.
    tokens (B, H, N, D), positions (B, N, 2) int64."""

    def __init__(self, freq: float = 100.0) -> None:
        super().__init__()
        self.base = freq

    def _rotate(self, tokens: Tensor, positions: Tensor) -> Tensor:
        dim = tokens.shape[-1]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=tokens.device).float() / dim))
        angles = positions.float()[..., None] * inv_freq  # (B, N, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, N, D)
        cos, sin = angles.cos().to(tokens.dtype), angles.sin().to(tokens.dtype)
        first, second = tokens.chunk(2, dim=-1)
        return tokens * cos + torch.cat((-second, first), dim=-1) * sin

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        y, x = tokens.chunk(2, dim=-1)
        return torch.cat((self._rotate(y, positions[..., 0]), self._rotate(x, positions[..., 1])), dim=-1)


class Attention(nn.Module):
    """One attention class for frame and global attention alike: x (B, N, C), pos (B, N, 2) or None."""

    def __init__(self, dim: int, num_heads: int, rope: RotaryEmbedding2D | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm block with LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float, rope) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rope)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class HeadDecoder(nn.Module):
    """Linear from the concatenated last two decoder outputs (2C) to C, then frame-attention blocks."""

    def __init__(self, config: Pi3Config, rope: RotaryEmbedding2D) -> None:
        super().__init__()
        self.input_proj = nn.Linear(2 * config.embed_dim, config.embed_dim)
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, 1.0, rope) for _ in range(config.head_depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x, pos)
        return self.norm(x)


def _rotation_from_6d(six: Tensor) -> Tensor:
    """(..., 6) -> (..., 3, 3) rotation by Gram-Schmidt on two column vectors."""
    a, b = six[..., :3], six[..., 3:]
    x = F.normalize(a, dim=-1)
    y = F.normalize(b - (x * b).sum(-1, keepdim=True) * x, dim=-1)
    z = torch.cross(x, y, dim=-1)
    return torch.stack((x, y, z), dim=-1)


class Pi3Like(nn.Module):
    """See the module docstring. ``forward(images (B, S, 3, H, W)) -> dict``."""

    def __init__(self, config: Pi3Config = PI3_TINY) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        dim = config.embed_dim
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.encoder_blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, 1.0, None) for _ in range(config.enc_depth)
        )
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 1, config.num_register_tokens, dim) * 1e-2)
        self.rope = RotaryEmbedding2D(config.rope_freq)
        self.decoder = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.layer_scale_init, self.rope)
            for _ in range(config.dec_depth)
        )
        self.point_decoder = HeadDecoder(config, self.rope)
        self.point_head = nn.Linear(dim, 3 * config.patch_size**2)
        self.conf_decoder = HeadDecoder(config, self.rope)
        self.conf_head = nn.Linear(dim, config.patch_size**2)
        self.camera_decoder = HeadDecoder(config, self.rope)
        self.camera_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 9))

    def example_inputs(self) -> tuple[Tensor]:
        """One (1, S, 3, H, W) batch in [0, 1] at ``config.num_views`` and ``config.image_size``,
        seeded, on the model's device."""
        device = next(self.parameters()).device
        H, W = self.config.image_size
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(1, self.config.num_views, 3, H, W, generator=generator).to(device),)

    def attention_sites(self, num_views: int) -> dict[str, str]:
        """Ground truth for the attention finder: module path -> scope, for ``num_views`` views."""
        sites = {f"encoder_blocks.{i}.attn": "frame" for i in range(self.config.enc_depth)}
        sites.update(
            {f"decoder.{i}.attn": "frame" if i % 2 == 0 else "global" for i in range(self.config.dec_depth)}
        )
        for head in ("point_decoder", "conf_decoder", "camera_decoder"):
            sites.update({f"{head}.blocks.{i}.attn": "frame" for i in range(self.config.head_depth)})
        return {path: "self" for path in sites} if num_views == 1 else sites

    def _unpatchify(self, x: Tensor, grid_h: int, grid_w: int, channels: int) -> Tensor:
        """(N, h*w, channels*p*p) -> (N, h*p, w*p, channels)."""
        p = self.patch_size
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(x.shape[0], grid_h * p, grid_w * p, channels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from lite3r_compile.models_zoo import check_images

        images = check_images(images, self.patch_size)
        B, S, _, H, W = images.shape
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        P = grid_h * grid_w
        R = self.config.num_register_tokens

        x = self.patch_embed(images.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*S, P, C)
        for block in self.encoder_blocks:
            x = block(x)
        x = self.encoder_norm(x)
        C = x.shape[-1]

        x = torch.cat((self.register_token.expand(B, S, R, C).reshape(B * S, R, C), x), dim=1)
        N = R + P
        y, xx = torch.meshgrid(
            torch.arange(grid_h, device=x.device), torch.arange(grid_w, device=x.device), indexing="ij"
        )
        patch_pos = torch.stack((y, xx), dim=-1).reshape(P, 2) + 1
        pos = torch.cat((torch.zeros(R, 2, dtype=patch_pos.dtype, device=x.device), patch_pos), dim=0)
        frame_pos = pos.expand(B * S, N, 2)
        global_pos = frame_pos.reshape(B, S * N, 2)

        outputs = []
        for i, block in enumerate(self.decoder):
            if i % 2 == 0:
                x = block(x.reshape(B * S, N, C), frame_pos)
            else:
                x = block(x.reshape(B, S * N, C), global_pos)
            outputs.append(x.reshape(B * S, N, C))
        hidden = torch.cat((outputs[-1], outputs[-2]), dim=-1)  # (B*S, N, 2C)

        points = self.point_head(self.point_decoder(hidden, frame_pos)[:, R:])
        points = self._unpatchify(points, grid_h, grid_w, 3)
        xy, z = points.split((2, 1), dim=-1)
        z = z.exp()
        local_points = torch.cat((xy * z, z), dim=-1).reshape(B, S, H, W, 3)

        conf = self.conf_head(self.conf_decoder(hidden, frame_pos)[:, R:])
        conf = self._unpatchify(conf, grid_h, grid_w, 1).reshape(B, S, H, W)

        camera = self.camera_head(self.camera_decoder(hidden, frame_pos)[:, R:].mean(dim=1))  # (B*S, 9)
        rotation = _rotation_from_6d(camera[:, :6])
        translation = camera[:, 6:]
        poses = torch.eye(4, dtype=x.dtype, device=x.device).repeat(B * S, 1, 1)
        poses = torch.cat(
            (torch.cat((rotation, translation[:, :, None]), dim=2), poses[:, 3:]), dim=1
        ).reshape(B, S, 4, 4)

        pts3d = torch.einsum("bsij,bshwj->bshwi", poses[..., :3, :3], local_points) + poses[:, :, None, None, :3, 3]
        return {"local_points": local_points, "pts3d": pts3d, "conf": conf, "camera_poses": poses}


def build_pi3(config: Pi3Config = Pi3Config(), **overrides) -> Pi3Like:
    """A π3-like model from ``config`` with fields replaced by ``overrides``."""
    return Pi3Like(dataclasses.replace(config, **overrides) if overrides else config)


def build_pi3_tiny(**overrides) -> Pi3Like:
    """π3-like at toy sizes: patch 7, width 32, 2 heads, 1 encoder block, 4 decoder blocks
    (frame, global, frame, global), 2 registers, 1-block heads; example inputs (1, 3, 3, 28, 21).
    Runs forward+backward on a CPU in milliseconds."""
    return build_pi3(PI3_TINY, **overrides)
