"""A small multi-view 3D transformer assembled from drawn parts, and its ground truth.

Data flow of :class:`GeneratedNet` (B batch, S views, P tokens per view, C width)::

    tokens (B, S, P, C_in) --embed-->           (B, S, P, C)
    images (B, S, 3, 2*gh, 2*gw) --patchify-->  (B, S, P = gh*gw, C)
    [model-level controls: token write, int(max) position table, .item() rescale, view reorder]
    blocks: frame block on (B*S, P, C) or global block on (B, S*P, C), pre-norm attention + MLP,
            optional distractor mixer, optional data-dependent branch in the block
    [two-view decoder (S == 2, DUSt3R-like): ``dec_blocks`` for view 1 and ``dec_blocks2`` for
            view 2; block i self-attends over its own view (B, P, C) and cross-attends to the
            other view's tokens of block i-1]
    heads: points (B, S, P, 3)
    [latent decoder: L learned latents (B, L, C) cross-attend to all tokens (B, S*P, C)]
    [class_probs (B, 5) from a classifier softmax]

Scope ground truth: a frame block's attention is ``"frame"``, a global block's ``"global"``; a
two-view decoder's self-attention is ``"frame"`` (one view's tokens, although its batch is B, not
B*S) and its cross-attention ``"cross"``; a latent decoder's is ``"cross"``. With a single view
(S == 1) frame and global coincide and both are ``"self"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lite3r_compile.testing.attention import SPELLINGS, AttentionSpec, build_attention, mha_mask
from lite3r_compile.testing.distractors import ClassifierHead, build_mixer
from lite3r_compile.testing.ground_truth import GeneratedModel, TrueSite

__all__ = [
    "MODEL_CONTROLS",
    "BlockSpec",
    "TwoViewBlockSpec",
    "ArchitectureSpec",
    "GeneratedNet",
    "build_architecture",
    "one_site_model",
]

# Python control flow in the model's own forward, outside every attention computation; each one
# stops torch.fx.symbolic_trace of the root (DA3 writes camera tokens in place and reorders views,
# VGGT sizes its RoPE table with int(positions.max())).
MODEL_CONTROLS = ("token_write", "int_max_posembed", "item_rescale", "view_reorder")
PATCH_SIZE = 2
TOKEN_CHANNELS = 8
NUM_CLASSES = 5


@dataclass(frozen=True)
class BlockSpec:
    """One encoder block: attention over ``scope`` ("frame" or "global"), an optional distractor
    ``mixer`` (one of ``distractors.MIXER_KINDS``), and ``data_branch``: a data-dependent Python
    branch in the block's forward, outside the attention."""

    scope: str
    attention: AttentionSpec
    mixer: Optional[str] = None
    data_branch: bool = False


@dataclass(frozen=True)
class TwoViewBlockSpec:
    """One layer of a two-view decoder: self-attention over a view, cross-attention to the other
    (``cross=True``). Both decoders (one per view) are built from it with their own weights."""

    self_attention: AttentionSpec
    cross_attention: AttentionSpec


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything drawn for one model; ``build_architecture`` is a pure function of it."""

    seed: int = 0
    batch: int = 1
    views: int = 2
    dim: int = 16
    input_kind: str = "tokens"  # "tokens" (B, S, P, 8) or "images" (B, S, 3, 2*gh, 2*gw)
    grid: tuple[int, int] = (1, 4)  # (gh, gw): P = gh * gw tokens per view
    blocks: tuple[BlockSpec, ...] = field(default_factory=tuple)
    two_view_decoder: tuple[TwoViewBlockSpec, ...] = field(default_factory=tuple)
    decoder: tuple[AttentionSpec, ...] = field(default_factory=tuple)
    num_latents: int = 2
    model_controls: tuple[str, ...] = field(default_factory=tuple)
    classifier: bool = False

    @property
    def tokens_per_view(self) -> int:
        return self.grid[0] * self.grid[1]

    def __post_init__(self) -> None:
        if self.input_kind not in ("tokens", "images"):
            raise ValueError(f"input_kind must be 'tokens' or 'images', got {self.input_kind!r}")
        for block in self.blocks:
            if block.scope not in ("frame", "global"):
                raise ValueError(f"block scope must be 'frame' or 'global', got {block.scope!r}")
            if block.attention.cross:
                raise ValueError("encoder blocks hold self-attention; cross-attention goes in decoder")
        for attention in self.decoder:
            if not attention.cross:
                raise ValueError("decoder attention specs must have cross=True")
        if self.two_view_decoder and self.views != 2:
            raise ValueError(f"a two-view decoder needs views == 2, got {self.views}")
        for layer in self.two_view_decoder:
            if layer.self_attention.cross or not layer.cross_attention.cross:
                raise ValueError("two-view decoder layers take a self-attention and a cross=True cross-attention")
        unknown = set(self.model_controls) - set(MODEL_CONTROLS)
        if unknown:
            raise ValueError(f"unknown model controls {sorted(unknown)}; choose from {MODEL_CONTROLS}")


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class Block(nn.Module):
    """Pre-norm self-attention + MLP on (B', N, C) tokens."""

    def __init__(self, dim: int, spec: BlockSpec) -> None:
        super().__init__()
        self.mha_module = spec.attention.form == "mha_module"
        self.mask_kind = spec.attention.mask_kind
        self.data_branch = spec.data_branch
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build_attention(dim, spec.attention)
        self.mixer = build_mixer(spec.mixer, dim) if spec.mixer is not None else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.data_branch:
            # Data-dependent: symbolic tracing of this block stops here, its children still trace.
            if bool(x.abs().amax() > 1e4):
                x = x.clamp(-1e4, 1e4)
        h = self.norm1(x)
        if self.mha_module:
            mask = mha_mask(self.mask_kind, h.shape[1], h.shape[1], h)
            h = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        else:
            h = self.attn(h, pos=pos)
        x = x + h
        if self.mixer is not None:
            x = x + self.mixer(x)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Latent queries (B, L, C) cross-attend to context tokens (B, M, C), then an MLP."""

    def __init__(self, dim: int, spec: AttentionSpec) -> None:
        super().__init__()
        self.mha_module = spec.form == "mha_module"
        self.mask_kind = spec.mask_kind
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = build_attention(dim, spec)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(latents)
        c = self.norm_context(context)
        if self.mha_module:
            mask = mha_mask(self.mask_kind, q.shape[1], c.shape[1], q)
            h = self.cross_attn(q, c, c, attn_mask=mask, need_weights=False)[0]
        else:
            h = self.cross_attn(q, c)
        latents = latents + h
        return latents + self.mlp(self.norm2(latents))


class TwoViewDecoderBlock(nn.Module):
    """Self-attention over x (B, P, C), cross-attention from x to the other view y, MLP."""

    def __init__(self, dim: int, spec: TwoViewBlockSpec) -> None:
        super().__init__()
        self.self_mha = spec.self_attention.form == "mha_module"
        self.cross_mha = spec.cross_attention.form == "mha_module"
        self.self_mask_kind = spec.self_attention.mask_kind
        self.cross_mask_kind = spec.cross_attention.mask_kind
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build_attention(dim, spec.self_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_y = nn.LayerNorm(dim)
        self.cross_attn = build_attention(dim, spec.cross_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.self_mha:
            mask = mha_mask(self.self_mask_kind, h.shape[1], h.shape[1], h)
            h = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        else:
            h = self.attn(h, pos=pos)
        x = x + h
        q, context = self.norm2(x), self.norm_y(y)
        if self.cross_mha:
            mask = mha_mask(self.cross_mask_kind, q.shape[1], context.shape[1], q)
            h = self.cross_attn(q, context, context, attn_mask=mask, need_weights=False)[0]
        else:
            h = self.cross_attn(q, context)
        x = x + h
        return x + self.mlp(self.norm3(x))


class GeneratedNet(nn.Module):
    """The model assembled from an ``ArchitectureSpec`` (see the module docstring)."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.input_kind = spec.input_kind
        self.model_controls = spec.model_controls
        dim = spec.dim
        if spec.input_kind == "images":
            self.patch_embed = nn.Linear(3 * PATCH_SIZE * PATCH_SIZE, dim)
        else:
            self.embed = nn.Linear(TOKEN_CHANNELS, dim)
        if "token_write" in spec.model_controls:
            self.special_token = nn.Parameter(torch.randn(dim) * 0.5)
        if "int_max_posembed" in spec.model_controls:
            self.pos_table = nn.Parameter(torch.randn(16, dim) * 0.1)
        self.blocks = nn.ModuleList(Block(dim, block) for block in spec.blocks)
        self.block_scopes = [block.scope for block in spec.blocks]
        if spec.two_view_decoder:
            self.dec_blocks = nn.ModuleList(TwoViewDecoderBlock(dim, layer) for layer in spec.two_view_decoder)
            self.dec_blocks2 = nn.ModuleList(TwoViewDecoderBlock(dim, layer) for layer in spec.two_view_decoder)
        if spec.decoder:
            self.latents = nn.Parameter(torch.randn(spec.num_latents, dim) * 0.5)
            self.decoder = nn.ModuleList(CrossBlock(dim, attention) for attention in spec.decoder)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        if spec.classifier:
            self.classifier = ClassifierHead(dim, NUM_CLASSES)

    def _tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "tokens":
            return self.embed(inputs)
        B, S, _, H, W = inputs.shape
        p = PATCH_SIZE
        patches = inputs.reshape(B, S, 3, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return self.patch_embed(patches.reshape(B, S, (H // p) * (W // p), 3 * p * p))

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._tokens(inputs)
        B, S, P, C = x.shape
        frame_pos = torch.arange(P, device=x.device).expand(B * S, P)
        if "token_write" in self.model_controls:
            x = x.clone()
            x[:, :, 0] = self.special_token
        if "int_max_posembed" in self.model_controls:
            table = self.pos_table[: int(frame_pos.max()) + 1]
            x = x + table[frame_pos].reshape(B, S, P, C)
        if "item_rescale" in self.model_controls:
            peak = x.detach().abs().amax().item()
            x = x / max(peak, 1.0)
        if "view_reorder" in self.model_controls:
            reference = int(x.detach().mean(dim=(2, 3))[0].argmax())
            order = [reference] + [view for view in range(S) if view != reference]
            x = x[:, order]
        for block, scope in zip(self.blocks, self.block_scopes):
            if scope == "frame":
                x = block(x.reshape(B * S, P, C), pos=frame_pos).reshape(B, S, P, C)
            else:
                x = block(x.reshape(B, S * P, C), pos=frame_pos.reshape(B, S * P)).reshape(B, S, P, C)
        if "view_reorder" in self.model_controls:
            x = x[:, sorted(range(S), key=order.__getitem__)]
        if self.spec.two_view_decoder:
            f1, f2 = x[:, 0], x[:, 1]
            view_pos = frame_pos[:B]
            for block1, block2 in zip(self.dec_blocks, self.dec_blocks2):
                # both decoders read the other view's previous layer
                f1, f2 = block1(f1, f2, view_pos), block2(f2, f1, view_pos)
            x = torch.stack((f1, f2), dim=1)
        outputs = {"points": self.head(self.norm(x))}
        if self.spec.decoder:
            latents = self.latents.expand(B, -1, -1)
            context = x.reshape(B, S * P, C)
            for block in self.decoder:
                latents = block(latents, context)
            outputs["latents"] = latents
        if self.spec.classifier:
            outputs["class_probs"] = self.classifier(x)
        return outputs


def _describe_attention(attention: AttentionSpec) -> str:
    parts = [attention.spelling, attention.layout, attention.qkv_source, f"H={attention.num_heads}"]
    parts += [name for name, on in (("qk_norm", attention.qk_norm), ("rope", attention.rope)) if on]
    if attention.mask_kind:
        parts.append(f"mask={attention.mask_kind}")
    if attention.custom_scale:
        parts.append("custom_scale")
    if attention.control:
        parts.append(f"control={attention.control}")
    return " ".join(parts)


def _true_site(path: str, scope: str, attention: AttentionSpec, dim: int) -> TrueSite:
    head_dim = dim // attention.num_heads
    return TrueSite(
        path=path,
        scope=scope,
        form=attention.form,
        has_mask=attention.mask_kind is not None,
        num_heads=attention.num_heads,
        head_dim=head_dim,
        spelling=attention.spelling,
        mask_kind=attention.mask_kind,
        scale=attention.scale(head_dim),
        layout=attention.layout,
        qk_norm=attention.qk_norm,
        rope=attention.rope,
        symbolic_traceable=attention.symbolic_traceable(),
        capture=attention.capture(),
    )


def example_inputs_for(spec: ArchitectureSpec) -> tuple[torch.Tensor]:
    """Random inputs for ``spec`` from the current RNG: tokens ~ N(0, 1), images ~ U[0, 1)."""
    if spec.input_kind == "tokens":
        return (torch.randn(spec.batch, spec.views, spec.tokens_per_view, TOKEN_CHANNELS),)
    gh, gw = spec.grid
    return (torch.rand(spec.batch, spec.views, 3, PATCH_SIZE * gh, PATCH_SIZE * gw),)


def build_architecture(spec: ArchitectureSpec) -> GeneratedModel:
    """Build the model of ``spec`` (float32, CPU, eval mode) with its ground truth.

    Deterministic: parameters and example inputs come from ``torch.manual_seed(spec.seed)`` inside
    a forked RNG, so the caller's RNG state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = GeneratedNet(spec).eval()
        example_inputs = example_inputs_for(spec)

    single_view = spec.views == 1
    sites, distractors, untraceable = [], [], []
    lines = [
        f"seed={spec.seed} B={spec.batch} S={spec.views} P={spec.tokens_per_view} C={spec.dim} "
        f"input={spec.input_kind}"
    ]
    if spec.model_controls:
        untraceable.append("")
        lines.append(f"model controls: {', '.join(spec.model_controls)}")
    for index, block in enumerate(spec.blocks):
        scope = "self" if single_view else block.scope
        path = f"blocks.{index}.attn"
        sites.append(_true_site(path, scope, block.attention, spec.dim))
        line = f"blocks.{index}: {block.scope:<6} {_describe_attention(block.attention)}"
        if block.mixer is not None:
            distractors.append(f"blocks.{index}.mixer")
            line += f" + mixer {block.mixer}"
        if block.data_branch:
            untraceable.append(f"blocks.{index}")
            line += " + data branch"
        lines.append(line)
    attention_specs = [block.attention for block in spec.blocks]
    for index, layer in enumerate(spec.two_view_decoder):
        for decoder in ("dec_blocks", "dec_blocks2"):
            sites.append(_true_site(f"{decoder}.{index}.attn", "frame", layer.self_attention, spec.dim))
            sites.append(_true_site(f"{decoder}.{index}.cross_attn", "cross", layer.cross_attention, spec.dim))
            attention_specs += [layer.self_attention, layer.cross_attention]
        lines.append(
            f"dec_blocks(2).{index}: frame  {_describe_attention(layer.self_attention)} | "
            f"cross  {_describe_attention(layer.cross_attention)}"
        )
    for index, attention in enumerate(spec.decoder):
        path = f"decoder.{index}.cross_attn"
        sites.append(_true_site(path, "cross", attention, spec.dim))
        lines.append(f"decoder.{index}: cross  {_describe_attention(attention)} L={spec.num_latents}")
    attention_specs += list(spec.decoder)
    for site, attention in zip(sites, attention_specs):
        if attention.control == "int_rope":
            untraceable.append(f"{site.path}.rope")
        elif not site.symbolic_traceable:
            untraceable.append(site.path)
    if spec.classifier:
        distractors.append("classifier")
        lines.append("classifier: softmax over class logits")
    return GeneratedModel(
        model=model,
        example_inputs=example_inputs,
        sites=sites,
        distractor_paths=distractors,
        description="\n".join(lines),
        untraceable_paths=untraceable,
        spec=spec,
    )


def one_site_model(
    spelling: str,
    *,
    scope: str = "global",
    views: int = 2,
    layout: str = "bhnd",
    qkv_source: Optional[str] = None,
    mask_kind: Optional[str] = None,
    custom_scale: bool = False,
    num_heads: int = 2,
    dim: int = 16,
    seed: int = 0,
) -> GeneratedModel:
    """A model with exactly one attention site written with ``spelling`` (any of
    ``attention.SPELLINGS``); ``scope="cross"`` puts it in a latent cross-attention decoder
    behind a non-attention encoder (no blocks)."""
    form = next((f for f, spellings in SPELLINGS.items() if spelling in spellings), None)
    if form is None:
        raise ValueError(f"unknown spelling {spelling!r}; choose from {sum(SPELLINGS.values(), ())}")
    cross = scope == "cross"
    if qkv_source is None:
        qkv_source = "in_proj" if form in ("mha_module", "mha_functional") else "separate" if cross else "unbind"
    attention = AttentionSpec(
        form=form,
        spelling=spelling,
        num_heads=num_heads,
        layout=layout,
        qkv_source=qkv_source,
        mask_kind=mask_kind,
        custom_scale=custom_scale,
        cross=cross,
    )
    if cross:
        spec = ArchitectureSpec(seed=seed, views=views, dim=dim, decoder=(attention,))
    else:
        spec = ArchitectureSpec(seed=seed, views=views, dim=dim, blocks=(BlockSpec(scope=scope, attention=attention),))
    return build_architecture(spec)
