"""DINOv2 vision transformer, the part VGGT and Depth Anything 3 use as their image encoder.

Only what those models need: patch embedding, cls token, optional register tokens, a learned
position table interpolated (bicubic) to the input's patch grid, a stack of pre-norm blocks with
LayerScale, and a final LayerNorm. Parameter names follow upstream DINOv2 (`patch_embed.proj`,
`cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`,
`norm`) so that official checkpoints load by name. `mask_token` is unused in the forward pass
here (no masked-image modelling) but is part of every DINOv2 checkpoint.

Token layout after `prepare_tokens_with_masks`: [cls, registers (R), patches (h*w)].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from lite3r_compile.models_zoo.layers import Block, PatchEmbed


@dataclass(frozen=True)
class DinoV2Config:
    """Shape of a DINOv2 ViT. Defaults: ViT-L/14 with 4 registers, as VGGT builds it.

    `img_size` sets the learned position table (img_size/patch_size)^2 + 1 entries; other input
    sizes interpolate it. `init_values` is the LayerScale initialisation (None: no LayerScale).
    """

    img_size: int = 518
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    init_values: float | None = 1.0
    num_register_tokens: int = 4
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    qk_norm: bool = False


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT: images (B, 3, H, W) -> dict of normalised cls / register / patch tokens."""

    def __init__(self, config: DinoV2Config = DinoV2Config()) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.interpolate_antialias = config.interpolate_antialias
        self.interpolate_offset = config.interpolate_offset
        self.num_tokens = 1  # the cls token; registers are inserted after position encoding
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(
            img_size=config.img_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            embed_dim=config.embed_dim,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, config.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.embed_dim))
            if config.num_register_tokens
            else None
        )
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=config.embed_dim,
                    num_heads=config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    proj_bias=config.proj_bias,
                    ffn_bias=config.ffn_bias,
                    norm_layer=norm_layer,
                    init_values=config.init_values,
                    qk_norm=config.qk_norm,
                )
                for _ in range(config.depth)
            ]
        )
        self.norm = norm_layer(config.embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, config.embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's initialisation: truncated normal position table and Linear weights, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """The position table resized (bicubic) to the patch grid of a `height` x `width` image.

        x: (B, 1 + h*w, C) tokens (cls first). Returns (1, 1 + h*w, C) in x's dtype; the cls entry
        is never interpolated. The interpolation runs in float32, as upstream does.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        grid_h = height // self.patch_size
        grid_w = width // self.patch_size
        M = int(math.sqrt(N))  # the stored table is square
        if M * M != N:
            raise ValueError(f"DinoVisionTransformer: position table of {N} patches is not square")
        kwargs: dict = {}
        if self.interpolate_offset:
            # DINO's historical offset against floating-point error in scale_factor sizing.
            kwargs["scale_factor"] = (
                float(grid_h + self.interpolate_offset) / M,
                float(grid_w + self.interpolate_offset) / M,
            )
        else:
            kwargs["size"] = (grid_h, grid_w)
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1 + R + h*w, C): cls, registers, patches.

        `masks` (B, h*w) bool replaces masked patch embeddings by `mask_token`.
        """
        _, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Run all blocks. Returns x_norm_clstoken (B, C), x_norm_regtokens (B, R, C),
        x_norm_patchtokens (B, h*w, C), x_prenorm (B, 1 + R + h*w, C) and masks."""
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : self.num_register_tokens + 1],
            "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        return self.forward_features(x, masks)
