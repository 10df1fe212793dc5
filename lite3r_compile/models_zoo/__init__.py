"""The models zoo: faithful, random-initialised 3D reconstruction transformers by preset name.

    from lite3r_compile import models_zoo
    model = models_zoo.create("vggt-tiny")                  # any name from list_presets()
    model = models_zoo.create("vggt-1b", device="meta")     # shapes only, no memory
    model = models_zoo.load("vggt-1b", "vggt.safetensors")  # official weights, by upstream names

Nothing is downloaded: `load` reads a local `.safetensors` / `.pt` / `.pth` file. A preset's model
code is imported only when that preset is created, so one family's absence (or import error)
never breaks the others.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from lite3r_compile.models_zoo.checkpoint import (
    CheckpointMismatchError,
    load_state_dict_into,
    read_state_dict,
    save_state_dict,
)
from lite3r_compile.models_zoo.presets import PRESETS, Preset, PresetUnavailableError, get_preset, resolve_builder

__all__ = [
    "CheckpointMismatchError",
    "Preset",
    "PresetUnavailableError",
    "check_images",
    "count_parameters",
    "create",
    "list_presets",
    "load",
    "save",
]


def list_presets() -> list[str]:
    """Names accepted by `create` and `load`, in registry order."""
    return list(PRESETS)


def create(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> nn.Module:
    """Build the preset `name`, its config fields replaced by `overrides`.

    device: where parameters are created; "meta" builds shapes only (no memory, no init cost).
    dtype: cast the built model's floating-point parameters and buffers to this dtype.
    Raises ValueError for an unknown name and PresetUnavailableError when the preset's module
    is not present.
    """
    builder = resolve_builder(get_preset(name))
    if device is None:
        model = builder(**overrides)
    else:
        with torch.device(device):
            model = builder(**overrides)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def load(
    name_or_model: str | nn.Module,
    checkpoint: str | os.PathLike,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    **overrides,
) -> nn.Module:
    """Load the state dict in the file `checkpoint` into a preset (built on the meta device and
    filled by assignment, then moved to `device` if given) or into a given model (in place).

    Keys follow upstream names; a `model.` or `module.` prefix on every key is stripped.
    strict=True (default): a missing or unexpected key raises CheckpointMismatchError naming the
    first offending keys; a shape mismatch always raises, naming both shapes.
    """
    if isinstance(name_or_model, str):
        model = create(name_or_model, device="meta", **overrides)
    elif isinstance(name_or_model, nn.Module):
        if overrides:
            raise TypeError(f"load: config overrides {sorted(overrides)} only apply when a preset name is given")
        model = name_or_model
    else:
        raise TypeError(f"load: expected a preset name or an nn.Module, got {type(name_or_model).__name__}")
    state_dict = read_state_dict(checkpoint)
    load_state_dict_into(model, state_dict, strict=strict, source=f"checkpoint {os.fspath(checkpoint)}")
    if device is not None:
        model = model.to(device)
    return model


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s state dict to `path` (.safetensors, .pt, .pth or .bin)."""
    save_state_dict(model, path)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once); works on meta models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _nearest_multiples(size: int, patch_size: int) -> str:
    lower = (size // patch_size) * patch_size
    upper = lower + patch_size
    if lower == 0:
        return str(upper)
    return f"{lower} or {upper}"


def check_images(images: Tensor, patch_size: int) -> Tensor:
    """Validate a batch of images for a patch-based model and return it as (B, S, 3, H, W).

    Accepts (B, S, 3, H, W), or (S, 3, H, W) to which a batch axis of 1 is added (as upstream
    VGGT does). The dtype must be floating point (values in [0, 1]); H and W must be positive
    multiples of `patch_size`. Raises ValueError saying which shapes and sizes are valid (the
    nearest valid sizes for a bad H or W).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, S, 3, H, W), got {type(images).__name__}")
    if images.ndim == 4:
        images = images.unsqueeze(0)
    if images.ndim != 5:
        raise ValueError(
            f"images must have shape (B, S, 3, H, W) or (S, 3, H, W); got rank {images.ndim} "
            f"shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point with values in [0, 1]; got dtype {images.dtype} "
            f"(convert 8-bit images with images.float() / 255)"
        )
    _, _, channels, height, width = images.shape
    if channels != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels at dim 2 of (B, S, 3, H, W); got shape {tuple(images.shape)}"
        )
    problems = []
    if height <= 0 or height % patch_size != 0:
        problems.append(f"height {height} (nearest valid: {_nearest_multiples(height, patch_size)})")
    if width <= 0 or width % patch_size != 0:
        problems.append(f"width {width} (nearest valid: {_nearest_multiples(width, patch_size)})")
    if problems:
        raise ValueError(
            f"image {' and '.join(problems)} must be a positive multiple of the patch size {patch_size}; "
            f"valid sizes are {patch_size}, {2 * patch_size}, {3 * patch_size}, ... (e.g. resize or crop to "
            f"{_round_to(height, patch_size)}x{_round_to(width, patch_size)})"
        )
    return images


def _round_to(size: int, patch_size: int) -> int:
    return max(patch_size, round(size / patch_size) * patch_size)
