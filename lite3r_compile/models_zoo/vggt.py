"""VGGT (Visual Geometry Grounded Transformer): aggregator, camera head and the full model.

Architecture (VGGT-1B):

- patch embed: DINOv2 ViT-L/14 with 4 registers; only its normalised patch tokens are kept.
- aggregator: per frame, tokens [camera (1), registers (4), patches (h*w)]; the camera and
  register tokens take one learned value on frame 0 and another on all other frames. Then
  `depth` frame blocks and `depth` global blocks run interleaved (frame 0, global 0, frame 1, ...):
  a frame block attends within each frame over (B*S, P, C), a global block over all frames at
  once, (B, S*P, C). Blocks are pre-norm with qk-norm, 2D RoPE (positions on the patch grid + 1,
  special tokens at 0, the same per-frame positions in global attention) and LayerScale 0.01.
  The output is, per block pair, concat(frame output, global output) along channels: 2C.
- camera head: the last layer's camera tokens through a 4-block trunk at 2C, AdaLN-modulated by
  an embedding of the current pose estimate, refined 4 times; 9-D pose encoding
  (translation 3, quaternion 4, field of view 2).
- depth and point heads: DPT (`lite3r_compile.models_zoo.dpt.DPTHead`) on layers 4, 11, 17, 23.
- track head: `lite3r_compile.models_zoo.vggt_track.TrackHead`, used when query points are given.

Heads run in float32 with autocast disabled, as upstream does. Names of modules and parameters
follow upstream `vggt/models/aggregator.py`, `vggt/heads/camera_head.py`, `vggt/models/vggt.py`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lite3r_compile.models_zoo import check_images
from lite3r_compile.models_zoo.dinov2 import DinoV2Config, DinoVisionTransformer
from lite3r_compile.models_zoo.dpt import DPTHead
from lite3r_compile.models_zoo.layers import Block, Mlp, PatchEmbed, PositionGetter, RotaryPositionEmbedding2D
from lite3r_compile.models_zoo.vggt_track import TrackHead

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)
POSE_ENCODING_DIM = 9  # absT_quaR_FoV: translation (3), quaternion (4), field of view (2)


@dataclass(frozen=True)
class AggregatorConfig:
    """The alternating-attention trunk. Defaults: VGGT-1B.

    patch_embed: the DINOv2 encoder's shape, or None for a plain conv patch embedding.
    aa_order / aa_block_size: attention types run per step and blocks of each type per step.
    rope_freq: RoPE base frequency; <= 0 disables RoPE.
    gradient_checkpointing: in training mode each block runs under
        `torch.utils.checkpoint` (non-reentrant), as upstream does; eval mode never does. A built
        model can switch it with `model.aggregator.gradient_checkpointing = False`.
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_embed: DinoV2Config | None = DinoV2Config()
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class CameraHeadConfig:
    """The iterative camera head. Its input width is 2 * the aggregator's embed_dim."""

    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01
    trans_act: str = "linear"
    quat_act: str = "linear"
    fl_act: str = "relu"
    num_iterations: int = 4


@dataclass(frozen=True)
class DPTConfig:
    """Sizes of a DPT head (arguments of `DPTHead` with upstream's names)."""

    features: int = 256
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)


@dataclass(frozen=True)
class TrackHeadConfig:
    """Arguments of `TrackHead` (upstream names and defaults).

    out_channels / intermediate_layer_idx size the track head's DPT feature extractor; upstream
    always uses the defaults (which need a 24-block aggregator), tiny presets shrink them.
    """

    features: int = 128
    iters: int = 4
    predict_conf: bool = True
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)


@dataclass(frozen=True)
class VGGTConfig:
    """A whole VGGT. Defaults: VGGT-1B (1,256,537,516 parameters with all heads)."""

    aggregator: AggregatorConfig = AggregatorConfig()
    camera_head: CameraHeadConfig = CameraHeadConfig()
    depth_head: DPTConfig = DPTConfig()
    point_head: DPTConfig = DPTConfig()
    track_head: TrackHeadConfig = TrackHeadConfig()
    enable_camera: bool = True
    enable_point: bool = True
    enable_depth: bool = True
    enable_track: bool = True


VGGT_1B = VGGTConfig()

_TINY_DPT = DPTConfig(features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 1, 2, 3))
VGGT_TINY = VGGTConfig(
    aggregator=AggregatorConfig(
        img_size=56,
        embed_dim=64,
        depth=4,
        num_heads=4,
        patch_embed=DinoV2Config(img_size=56, embed_dim=64, depth=2, num_heads=4, num_register_tokens=4),
    ),
    camera_head=CameraHeadConfig(trunk_depth=2, num_heads=4),
    depth_head=_TINY_DPT,
    point_head=_TINY_DPT,
    track_head=TrackHeadConfig(
        features=16,
        iters=2,
        corr_levels=3,
        corr_radius=2,
        hidden_size=32,
        out_channels=_TINY_DPT.out_channels,
        intermediate_layer_idx=_TINY_DPT.intermediate_layer_idx,
    ),
)


def slice_expand_and_flatten(token_tensor: Tensor, B: int, S: int) -> Tensor:
    """(1, 2, X, C) learned tokens -> (B*S, X, C): entry 0 for frame 0, entry 1 for frames 1..S-1."""
    query = token_tensor[:, 0:1, ...].expand(B, 1, *token_tensor.shape[2:])
    others = token_tensor[:, 1:, ...].expand(B, S - 1, *token_tensor.shape[2:])
    combined = torch.cat([query, others], dim=1)
    return combined.view(B * S, *combined.shape[2:])


class Aggregator(nn.Module):
    """Alternating frame / global attention over the tokens of all frames.

    forward(images (B, S, 3, H, W) in [0, 1]) -> (outputs, patch_start_idx): `outputs` holds one
    (B, S, P, 2C) tensor per frame/global block pair, P = 1 + num_register_tokens + (H/p)(W/p),
    patch tokens at [patch_start_idx, P).
    """

    def __init__(self, config: AggregatorConfig = AggregatorConfig()) -> None:
        super().__init__()
        self.config = config
        if config.depth % config.aa_block_size != 0:
            raise ValueError(
                f"Aggregator: depth ({config.depth}) must be divisible by aa_block_size ({config.aa_block_size})"
            )
        if sorted(config.aa_order) != ["frame", "global"]:
            # each step's output concatenates one frame and one global result
            raise ValueError(f"Aggregator: aa_order {config.aa_order} must hold 'frame' and 'global' once each")
        self.patch_embed = self._build_patch_embed(config)

        self.rope = RotaryPositionEmbedding2D(frequency=config.rope_freq) if config.rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None
        self.frame_blocks = nn.ModuleList([self._build_block(config, self.rope) for _ in range(config.depth)])
        self.global_blocks = nn.ModuleList([self._build_block(config, self.rope) for _ in range(config.depth)])

        self.depth = config.depth
        self.aa_order = list(config.aa_order)
        self.patch_size = config.patch_size
        self.aa_block_size = config.aa_block_size
        self.aa_block_num = config.depth // config.aa_block_size

        # Index 0: frame 0 (the reference frame); index 1: every other frame.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, config.embed_dim))
        self.register_token = nn.Parameter(torch.randn(1, 2, config.num_register_tokens, config.embed_dim))
        self.patch_start_idx = 1 + config.num_register_tokens
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

        self.init_non_persistent_buffers()
        # Mutable copies of the config switches, so a built model can turn checkpointing off
        # (e.g. `model.aggregator.gradient_checkpointing = False`) without being rebuilt.
        self.gradient_checkpointing = config.gradient_checkpointing
        self.use_reentrant = False

    def init_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the ImageNet normalisation constants; `load` calls this after a meta build."""
        for name, value in (("_resnet_mean", _RESNET_MEAN), ("_resnet_std", _RESNET_STD)):
            self.register_buffer(
                name, torch.tensor(value, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1), persistent=False
            )

    def _build_patch_embed(self, config: AggregatorConfig) -> nn.Module:
        if config.patch_embed is None:
            return PatchEmbed(
                img_size=config.img_size, patch_size=config.patch_size, in_chans=3, embed_dim=config.embed_dim
            )
        dino = config.patch_embed
        if dino.embed_dim != config.embed_dim or dino.patch_size != config.patch_size:
            raise ValueError(
                f"Aggregator: the DINOv2 patch embed (embed_dim {dino.embed_dim}, patch {dino.patch_size}) "
                f"must match the aggregator (embed_dim {config.embed_dim}, patch {config.patch_size})"
            )
        encoder = DinoVisionTransformer(dino)
        # Upstream freezes the (unused) mask token of the DINOv2 encoder.
        encoder.mask_token.requires_grad_(False)
        return encoder

    @staticmethod
    def _build_block(config: AggregatorConfig, rope: RotaryPositionEmbedding2D | None) -> Block:
        return Block(
            dim=config.embed_dim,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            proj_bias=config.proj_bias,
            ffn_bias=config.ffn_bias,
            init_values=config.init_values,
            qk_norm=config.qk_norm,
            rope=rope,
        )

    def forward(self, images: Tensor) -> tuple[list[Tensor], int]:
        images = check_images(images, self.patch_size)
        B, S, C_in, H, W = images.shape

        images = (images - self._resnet_mean) / self._resnet_std
        images = images.view(B * S, C_in, H, W)
        patch_tokens = self.patch_embed(images)
        if isinstance(patch_tokens, dict):
            patch_tokens = patch_tokens["x_norm_patchtokens"]

        camera_token = slice_expand_and_flatten(self.camera_token, B, S)
        register_token = slice_expand_and_flatten(self.register_token, B, S)
        tokens = torch.cat([camera_token, register_token, patch_tokens], dim=1)

        pos = None
        if self.rope is not None:
            pos = self.position_getter(B * S, H // self.patch_size, W // self.patch_size, device=images.device)
        if self.patch_start_idx > 0 and pos is not None:
            # Special tokens sit at position 0, patches at their grid position + 1.
            pos = pos + 1
            pos_special = torch.zeros(B * S, self.patch_start_idx, 2).to(images.device).to(pos.dtype)
            pos = torch.cat([pos_special, pos], dim=1)

        _, P, C = tokens.shape
        frame_idx = 0
        global_idx = 0
        output_list = []
        for _ in range(self.aa_block_num):
            for attn_type in self.aa_order:
                if attn_type == "frame":
                    tokens, frame_idx, frame_intermediates = self._process_frame_attention(
                        tokens, B, S, P, C, frame_idx, pos=pos
                    )
                else:
                    tokens, global_idx, global_intermediates = self._process_global_attention(
                        tokens, B, S, P, C, global_idx, pos=pos
                    )
            for i in range(len(frame_intermediates)):
                output_list.append(torch.cat([frame_intermediates[i], global_intermediates[i]], dim=-1))
        return output_list, self.patch_start_idx

    def _run_block(self, block: nn.Module, tokens: Tensor, pos: Tensor | None) -> Tensor:
        if self.training and self.gradient_checkpointing:
            return checkpoint(block, tokens, pos, use_reentrant=self.use_reentrant)
        return block(tokens, pos=pos)

    def _process_frame_attention(self, tokens, B, S, P, C, frame_idx, pos=None):
        """Blocks over each frame's own tokens: tokens and positions as (B*S, P, .)."""
        if tokens.shape != (B * S, P, C):
            tokens = tokens.view(B, S, P, C).view(B * S, P, C)
        if pos is not None and pos.shape != (B * S, P, 2):
            pos = pos.view(B, S, P, 2).view(B * S, P, 2)
        intermediates = []
        for _ in range(self.aa_block_size):
            tokens = self._run_block(self.frame_blocks[frame_idx], tokens, pos)
            frame_idx += 1
            intermediates.append(tokens.view(B, S, P, C))
        return tokens, frame_idx, intermediates

    def _process_global_attention(self, tokens, B, S, P, C, global_idx, pos=None):
        """Blocks over all frames' tokens together: tokens and positions as (B, S*P, .)."""
        if tokens.shape != (B, S * P, C):
            tokens = tokens.view(B, S, P, C).view(B, S * P, C)
        if pos is not None and pos.shape != (B, S * P, 2):
            pos = pos.view(B, S, P, 2).view(B, S * P, 2)
        intermediates = []
        for _ in range(self.aa_block_size):
            tokens = self._run_block(self.global_blocks[global_idx], tokens, pos)
            global_idx += 1
            intermediates.append(tokens.view(B, S, P, C))
        return tokens, global_idx, intermediates


def _base_pose_act(x: Tensor, act: str) -> Tensor:
    if act == "linear":
        return x
    if act == "inv_log":
        return torch.sign(x) * torch.expm1(torch.abs(x))
    if act == "exp":
        return torch.exp(x)
    if act == "relu":
        return F.relu(x)
    raise ValueError(f"unknown pose activation {act!r}; use linear, inv_log, exp or relu")


def activate_pose(
    pred_pose_enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear"
) -> Tensor:
    """Activate a raw (..., 9) pose encoding part by part: translation, quaternion, field of view."""
    translation = _base_pose_act(pred_pose_enc[..., :3], trans_act)
    quaternion = _base_pose_act(pred_pose_enc[..., 3:7], quat_act)
    field_of_view = _base_pose_act(pred_pose_enc[..., 7:], fl_act)
    return torch.cat([translation, quaternion, field_of_view], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation (DiT): x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class CameraHead(nn.Module):
    """Iterative camera-pose head on the camera tokens of the aggregator's last layer.

    forward(list of (B, S, P, dim_in)) -> list of `num_iterations` (B, S, 9) activated encodings.
    Each iteration embeds the previous estimate (detached; a learned empty pose at first),
    derives AdaLN shift / scale / gate from it, modulates the normalised camera tokens, runs the
    trunk and adds a predicted delta to the estimate.
    """

    def __init__(self, dim_in: int = 2048, config: CameraHeadConfig = CameraHeadConfig()) -> None:
        super().__init__()
        self.config = config
        self.target_dim = POSE_ENCODING_DIM
        self.trans_act = config.trans_act
        self.quat_act = config.quat_act
        self.fl_act = config.fl_act
        self.trunk_depth = config.trunk_depth
        self.trunk = nn.Sequential(
            *[
                Block(
                    dim=dim_in,
                    num_heads=config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    init_values=config.init_values,
                )
                for _ in range(config.trunk_depth)
            ]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in, bias=True))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(in_features=dim_in, hidden_features=dim_in // 2, out_features=self.target_dim, drop=0)

    def forward(self, aggregated_tokens_list: list[Tensor], num_iterations: int | None = None) -> list[Tensor]:
        num_iterations = self.config.num_iterations if num_iterations is None else num_iterations
        tokens = aggregated_tokens_list[-1]
        pose_tokens = self.token_norm(tokens[:, :, 0])  # (B, S, C): the camera token of each frame
        return self.trunk_fn(pose_tokens, num_iterations)

    def trunk_fn(self, pose_tokens: Tensor, num_iterations: int) -> list[Tensor]:
        B, S, _ = pose_tokens.shape
        pred_pose_enc = None
        pred_pose_enc_list = []
        for _ in range(num_iterations):
            if pred_pose_enc is None:
                module_input = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1))
            else:
                # No backpropagation through the refinement chain, as upstream.
                pred_pose_enc = pred_pose_enc.detach()
                module_input = self.embed_pose(pred_pose_enc)
            shift_msa, scale_msa, gate_msa = self.poseLN_modulation(module_input).chunk(3, dim=-1)
            pose_tokens_modulated = gate_msa * modulate(self.adaln_norm(pose_tokens), shift_msa, scale_msa)
            pose_tokens_modulated = pose_tokens_modulated + pose_tokens
            pose_tokens_modulated = self.trunk(pose_tokens_modulated)
            pred_pose_enc_delta = self.pose_branch(self.trunk_norm(pose_tokens_modulated))
            pred_pose_enc = pred_pose_enc_delta if pred_pose_enc is None else pred_pose_enc + pred_pose_enc_delta
            pred_pose_enc_list.append(
                activate_pose(pred_pose_enc, trans_act=self.trans_act, quat_act=self.quat_act, fl_act=self.fl_act)
            )
        return pred_pose_enc_list


def _dpt_kwargs(config: DPTConfig) -> dict:
    return {
        "features": config.features,
        "out_channels": list(config.out_channels),
        "intermediate_layer_idx": list(config.intermediate_layer_idx),
    }


class VGGT(nn.Module):
    """The full VGGT: images (B, S, 3, H, W) or (S, 3, H, W) in [0, 1] -> dict of predictions.

    Outputs (upstream names): pose_enc (B, S, 9) and pose_enc_list (one per refinement),
    depth (B, S, H, W, 1), depth_conf (B, S, H, W), world_points (B, S, H, W, 3),
    world_points_conf (B, S, H, W); with query_points (N, 2) or (B, N, 2) in pixels also
    track (B, S, N, 2), vis (B, S, N), conf (B, S, N). In eval mode `images` (the 5-D input)
    is returned as well, as upstream does.
    """

    def __init__(self, config: VGGTConfig = VGGTConfig()) -> None:
        super().__init__()
        self.config = config
        agg = config.aggregator
        self.patch_size = agg.patch_size
        dim_in = 2 * agg.embed_dim
        for head_name, enabled, indices in (
            ("depth_head", config.enable_depth, config.depth_head.intermediate_layer_idx),
            ("point_head", config.enable_point, config.point_head.intermediate_layer_idx),
            ("track_head", config.enable_track, config.track_head.intermediate_layer_idx),
        ):
            if enabled:
                _check_layer_indices(head_name, indices, agg.depth)

        self.aggregator = Aggregator(agg)
        self.camera_head = CameraHead(dim_in=dim_in, config=config.camera_head) if config.enable_camera else None
        self.point_head = None
        self.depth_head = None
        self.track_head = None
        if config.enable_point:
            self.point_head = DPTHead(
                dim_in=dim_in,
                patch_size=agg.patch_size,
                output_dim=4,
                activation="inv_log",
                conf_activation="expp1",
                **_dpt_kwargs(config.point_head),
            )
        if config.enable_depth:
            self.depth_head = DPTHead(
                dim_in=dim_in,
                patch_size=agg.patch_size,
                output_dim=2,
                activation="exp",
                conf_activation="expp1",
                **_dpt_kwargs(config.depth_head),
            )
        if config.enable_track:
            track = config.track_head
            self.track_head = TrackHead(
                dim_in=dim_in,
                patch_size=agg.patch_size,
                features=track.features,
                iters=track.iters,
                predict_conf=track.predict_conf,
                stride=track.stride,
                corr_levels=track.corr_levels,
                corr_radius=track.corr_radius,
                hidden_size=track.hidden_size,
                pos_embed=False,  # upstream's track head builds its DPT extractor without UV embedding
                out_channels=list(track.out_channels),
                intermediate_layer_idx=list(track.intermediate_layer_idx),
            )

    def example_inputs(self, num_frames: int = 2, image_size: int | None = None, num_queries: int = 4) -> tuple[Tensor, Tensor]:
        """Seeded ``(images, query_points)`` on the model's device that run every branch: images
        (1, S, 3, H, H) in [0, 1] and query points (1, N, 2) in pixels for the track head.

        S >= 2 so that frame attention (P tokens) and global attention (S * P tokens) see
        different lengths; H defaults to two patches, enough to trace and cheap even for VGGT-1B.
        """
        device = next(self.parameters()).device
        size = image_size or 2 * self.patch_size
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1, num_frames, 3, size, size, generator=generator)
        queries = torch.rand(1, num_queries, 2, generator=generator) * (size - 1)
        return images.to(device), queries.to(device)

    def forward(self, images: Tensor, query_points: Tensor | None = None) -> dict[str, Tensor | list[Tensor]]:
        images = check_images(images, self.patch_size)
        if query_points is not None and query_points.ndim == 2:
            query_points = query_points.unsqueeze(0)

        aggregated_tokens_list, patch_start_idx = self.aggregator(images)

        predictions: dict[str, Tensor | list[Tensor]] = {}
        with _autocast_disabled(images.device.type):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(aggregated_tokens_list)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(
                    aggregated_tokens_list, images=images, patch_start_idx=patch_start_idx
                )
                predictions["depth"] = depth
                predictions["depth_conf"] = depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(
                    aggregated_tokens_list, images=images, patch_start_idx=patch_start_idx
                )
                predictions["world_points"] = points
                predictions["world_points_conf"] = points_conf

        if self.track_head is not None and query_points is not None:
            track_list, vis, conf = self.track_head(
                aggregated_tokens_list, images=images, patch_start_idx=patch_start_idx, query_points=query_points
            )
            predictions["track"] = track_list[-1]
            predictions["vis"] = vis
            predictions["conf"] = conf

        if not self.training:
            predictions["images"] = images
        return predictions


def _check_layer_indices(head_name: str, indices: tuple[int, ...], depth: int) -> None:
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"VGGT {head_name}: intermediate_layer_idx {list(indices)} has {bad} outside the "
            f"aggregator's {depth} layers; give indices in [0, {depth})"
        )


def _autocast_disabled(device_type: str):
    """Upstream runs the heads with CUDA autocast off; the same for whatever device autocast runs on."""
    # Dynamo cannot trace is_autocast_available (a C builtin): on CUDA the call was a graph break,
    # and the resumed frame guarded on the fresh context object of each call, so it recompiled on
    # every call (3-4 s a call of VGGT-1B, benchmarks/NOTES.md). Every device Dynamo compiles for
    # has autocast.
    if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def build_vggt(config: VGGTConfig = VGGT_1B, **overrides) -> VGGT:
    """A VGGT from `config` with top-level fields replaced by `overrides` (e.g. enable_track=False)."""
    return VGGT(dataclasses.replace(config, **overrides) if overrides else config)


def build_vggt_1b(**overrides) -> VGGT:
    """VGGT-1B as released (1,256,537,516 parameters with all heads)."""
    return build_vggt(VGGT_1B, **overrides)


def build_vggt_tiny(**overrides) -> VGGT:
    """VGGT with every code path of VGGT-1B at toy sizes: embed 64, 4+4 blocks, 4 heads, a 2-block
    DINOv2 patch embed with 4 registers, patch 14; runs on 28x28 .. 56x56 images on a CPU."""
    return build_vggt(VGGT_TINY, **overrides)
