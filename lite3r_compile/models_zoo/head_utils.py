"""Pieces shared by VGGT's dense heads: output activations, resizing, UV positional embeddings.

Facts follow upstream `vggt/heads/head_act.py` and `vggt/heads/utils.py`; the numbers (UV spans
normalised by the image diagonal, sin/cos base 100, embedding scale applied by the caller) must
match them for official checkpoints to reproduce their outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POINT_ACTIVATIONS = ("norm_exp", "norm", "exp", "relu", "inv_log", "xy_inv_log", "sigmoid", "linear")
CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")

# F.interpolate indexes its output with 32-bit integers on CUDA; upstream splits the batch
# whenever the output would hold more than this many elements.
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736


def check_activation_names(activation: str, conf_activation: str, where: str) -> None:
    """Raise a ValueError naming `where` if either activation is not one `activate_head` knows."""
    if activation not in POINT_ACTIVATIONS:
        raise ValueError(
            f"{where}: unknown activation {activation!r}; use one of {', '.join(POINT_ACTIVATIONS)}"
        )
    if conf_activation not in CONF_ACTIVATIONS:
        raise ValueError(
            f"{where}: unknown conf_activation {conf_activation!r}; "
            f"use one of {', '.join(CONF_ACTIVATIONS)}"
        )


def inverse_log_transform(y: torch.Tensor) -> torch.Tensor:
    """sign(y) * (exp(|y|) - 1): undoes the log(1 + |x|) compression the heads are trained on."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def activate_head(
    out: torch.Tensor, activation: str = "norm_exp", conf_activation: str = "expp1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a head's raw map into activated predictions and a confidence.

    Args:
        out: (N, C, H, W) raw output; channels [0, C-1) are predictions, channel C-1 confidence.
        activation: one of POINT_ACTIVATIONS, applied to the prediction channels:
            norm_exp: x / |x| * (exp(|x|) - 1) (direction kept, norm expanded);
            norm: x / |x|; exp: exp(x); relu: max(x, 0); inv_log: sign(x) * (exp(|x|) - 1);
            xy_inv_log: z = inv_log(z), then (x * z, y * z, z) (needs C-1 == 3);
            sigmoid: sigmoid(x); linear: x.
        conf_activation: one of CONF_ACTIVATIONS: expp1: 1 + exp(c) (so conf >= 1),
            expp0: exp(c), sigmoid: sigmoid(c).

    Returns:
        preds (N, H, W, C-1) and conf (N, H, W).
    """
    check_activation_names(activation, conf_activation, "activate_head")
    fmap = out.permute(0, 2, 3, 1)
    xyz = fmap[..., :-1]
    conf = fmap[..., -1]

    if activation == "norm_exp":
        norm = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        preds = xyz / norm * torch.expm1(norm)
    elif activation == "norm":
        preds = xyz / xyz.norm(dim=-1, keepdim=True)
    elif activation == "exp":
        preds = torch.exp(xyz)
    elif activation == "relu":
        preds = F.relu(xyz)
    elif activation == "inv_log":
        preds = inverse_log_transform(xyz)
    elif activation == "xy_inv_log":
        xy, z = xyz.split([2, 1], dim=-1)
        z = inverse_log_transform(z)
        preds = torch.cat([xy * z, z], dim=-1)
    elif activation == "sigmoid":
        preds = torch.sigmoid(xyz)
    else:  # "linear"
        preds = xyz

    if conf_activation == "expp1":
        conf_out = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf_out = conf.exp()
    else:  # "sigmoid"
        conf_out = torch.sigmoid(conf)
    return preds, conf_out


def custom_interpolate(
    x: torch.Tensor,
    size: tuple[int, int] | None = None,
    scale_factor: float | None = None,
    mode: str = "bilinear",
    align_corners: bool = True,
) -> torch.Tensor:
    """F.interpolate of (N, C, H, W) that splits N when the output would overflow int32 indexing.

    `size` wins over `scale_factor`; with only `scale_factor` the output is
    (int(H * scale_factor), int(W * scale_factor)), as upstream.
    """
    if size is None:
        if scale_factor is None:
            raise ValueError("custom_interpolate: give size or scale_factor")
        size = (int(x.shape[-2] * scale_factor), int(x.shape[-1] * scale_factor))
    size = (int(size[0]), int(size[1]))
    output_elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if output_elements <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    chunks = torch.chunk(x, chunks=output_elements // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    resized = [F.interpolate(c, size=size, mode=mode, align_corners=align_corners) for c in chunks]
    return torch.cat(resized, dim=0)


def create_uv_grid(
    width: int,
    height: int,
    aspect_ratio: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pixel-centre UV coordinates normalised by the image diagonal (the MoGe convention).

    u spans +-(a / sqrt(1 + a^2)) * (width - 1) / width and v spans
    +-(1 / sqrt(1 + a^2)) * (height - 1) / height, with a = aspect_ratio (default width / height),
    so the corners of any feature map of the same image land on the same diagonal.

    Returns:
        (height, width, 2) tensor, [..., 0] = u (varies along width), [..., 1] = v.
    """
    if aspect_ratio is None:
        aspect_ratio = float(width) / float(height)
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x = aspect_ratio / diagonal
    span_y = 1.0 / diagonal
    u = torch.linspace(
        -span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width, dtype=dtype, device=device
    )
    v = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height, dtype=dtype, device=device
    )
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def make_sincos_pos_embed(embed_dim: int, pos: torch.Tensor, omega_0: float = 100) -> torch.Tensor:
    """1-D sin/cos embedding: [sin(p * w_k), cos(p * w_k)] with w_k = omega_0^(-2k / embed_dim).

    Computed in float64 like upstream (the frequencies span five decades at embed_dim 1024).

    Args:
        pos: positions of any shape, flattened to (M,).

    Returns:
        (M, embed_dim) float32.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"make_sincos_pos_embed: embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / omega_0 ** (omega / (embed_dim / 2.0))
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def position_grid_to_embed(pos_grid: torch.Tensor, embed_dim: int, omega_0: float = 100) -> torch.Tensor:
    """Embed a (H, W, 2) coordinate grid as (H, W, embed_dim): first half from u, second from v.

    embed_dim must be a multiple of 4 (each coordinate gets embed_dim / 2 channels, half sin,
    half cos).
    """
    height, width, grid_dim = pos_grid.shape
    if grid_dim != 2:
        raise ValueError(f"position_grid_to_embed: expected a (H, W, 2) grid, got {tuple(pos_grid.shape)}")
    if embed_dim % 4 != 0:
        raise ValueError(f"position_grid_to_embed: embed_dim must be a multiple of 4, got {embed_dim}")
    flat = pos_grid.reshape(-1, 2)
    emb_u = make_sincos_pos_embed(embed_dim // 2, flat[:, 0], omega_0=omega_0)
    emb_v = make_sincos_pos_embed(embed_dim // 2, flat[:, 1], omega_0=omega_0)
    return torch.cat([emb_u, emb_v], dim=-1).view(height, width, embed_dim)
