"""Reading, matching and writing state dicts with upstream key names.

Formats: `.safetensors` (safetensors), `.pt` / `.pth` / `.bin` (a `torch.load`-able dict, read
with `weights_only=True`; a dict that wraps the state dict under "model" or "state_dict" is
unwrapped). Keys saved with a wrapper prefix (`model.`, as Depth Anything 3's hub wrapper saves
them, or `module.` from DistributedDataParallel) are matched to the bare module names.

A model built on the `meta` device is loaded by assignment: the checkpoint's tensors become the
parameters, so a 1.2B-parameter model is never allocated twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WRAPPER_PREFIXES = ("model.", "module.")
_SHOW_KEYS = 5  # offending keys named in an error message, per kind


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model's."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors stored in `path`, on the CPU, keyed as saved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (nothing is downloaded: pass a local file)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in TORCH_SUFFIXES:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return _unwrap(loaded, path)
    raise ValueError(
        f"checkpoint {path}: unknown file type {suffix!r}; use one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _unwrap(loaded: object, path: Path) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping) and not all(isinstance(v, Tensor) for v in loaded.values()):
        for key in ("model", "state_dict"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
    if isinstance(loaded, Mapping) and all(isinstance(v, Tensor) for v in loaded.values()):
        return dict(loaded)
    raise ValueError(
        f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict of tensors "
        f"(nor one under the key 'model' or 'state_dict')"
    )


def strip_wrapper_prefix(state_dict: Mapping[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Drop a `model.` / `module.` prefix carried by every checkpoint key but by no model key."""
    for prefix in WRAPPER_PREFIXES:
        if (
            state_dict
            and all(key.startswith(prefix) for key in state_dict)
            and not any(key.startswith(prefix) for key in model_keys)
        ):
            return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOW_KEYS])
    more = f", ... ({len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return shown + more


def mismatch_report(
    model_state: Mapping[str, Tensor], checkpoint_state: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(missing keys, unexpected keys, (key, model shape, checkpoint shape) shape mismatches),
    each in the model's (or for unexpected keys the checkpoint's) key order."""
    missing = [key for key in model_state if key not in checkpoint_state]
    unexpected = [key for key in checkpoint_state if key not in model_state]
    mismatched = [
        (key, _shape(value), _shape(checkpoint_state[key]))
        for key, value in model_state.items()
        if key in checkpoint_state and _shape(value) != _shape(checkpoint_state[key])
    ]
    return missing, unexpected, mismatched


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> nn.Module:
    """Load `state_dict` into `model` (in place) and return the model.

    strict=True: any missing or unexpected key raises CheckpointMismatchError; strict=False
    loads the keys both have. A shape mismatch always raises. The error names the first
    offending keys and, for shapes, both shapes.
    """
    model_state = model.state_dict()
    state_dict = strip_wrapper_prefix(state_dict, set(model_state))
    missing, unexpected, mismatched = mismatch_report(model_state, state_dict)
    on_meta = any(t.is_meta for t in model_state.values())
    if mismatched or (strict and (missing or unexpected)) or (on_meta and missing):
        raise CheckpointMismatchError(
            _mismatch_message(model, source, strict, missing, unexpected, mismatched, on_meta)
        )
    matching = {key: value for key, value in state_dict.items() if key in model_state}
    model.load_state_dict(matching, strict=False, assign=on_meta)
    if on_meta:
        _materialize_non_persistent_buffers(model, source)
    return model


def _mismatch_message(model, source, strict, missing, unexpected, mismatched, on_meta) -> str:
    lines = [f"{source} does not match {type(model).__name__} (strict={strict}):"]
    if missing:
        lines.append(
            f"  {len(missing)} missing key(s), in the model but not in the checkpoint: {_format_keys(missing)}"
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s), in the checkpoint but not in the model: {_format_keys(unexpected)}"
        )
    if mismatched:
        shown = "; ".join(
            f"{key!r}: model {model_shape} vs checkpoint {ckpt_shape}"
            for key, model_shape, ckpt_shape in mismatched[:_SHOW_KEYS]
        )
        more = f"; ... ({len(mismatched) - _SHOW_KEYS} more)" if len(mismatched) > _SHOW_KEYS else ""
        lines.append(f"  {len(mismatched)} shape mismatch(es): {shown}{more}")
    if on_meta and missing and not strict:
        lines.append(
            "  The model was built on the meta device, so keys absent from the checkpoint would stay "
            "without data: build the model on a real device to load a partial checkpoint."
        )
    lines.append(
        "Check that the checkpoint belongs to this model and preset; strict=False skips missing and "
        "unexpected keys, shape mismatches always fail."
    )
    return "\n".join(lines)


def _materialize_non_persistent_buffers(model: nn.Module, source: str) -> None:
    """After an assign-load into a meta model, rebuild buffers that no checkpoint holds."""
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    for module in model.modules():
        has_meta_buffer = any(b.is_meta for b in module.buffers(recurse=False))
        if has_meta_buffer and hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers(device)
    still_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointMismatchError(
            f"after loading {source} into a model built on the meta device, {len(still_meta)} tensor(s) "
            f"have no data: {_format_keys(still_meta)}. Their modules need an "
            f"`init_non_persistent_buffers(device)` method, or build the model on a real device."
        )


def save_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict to `path` (.safetensors, or .pt / .pth / .bin through torch.save)."""
    path = Path(path)
    state = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    )
    on_meta = [key for key, value in state.items() if value.is_meta]
    if on_meta:
        raise ValueError(
            f"cannot save to {path}: {len(on_meta)} tensor(s) are on the meta device and hold no data "
            f"({_format_keys(on_meta)}); build or load the model on a real device first"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage: give each its own contiguous copy.
        seen: set[int] = set()
        tensors: dict[str, Tensor] = {}
        for key, value in state.items():
            value = value.detach()
            storage = value.untyped_storage().data_ptr()
            if storage in seen or not value.is_contiguous():
                value = value.clone(memory_format=torch.contiguous_format)
            seen.add(value.untyped_storage().data_ptr())
            tensors[key] = value
        save_file(tensors, str(path))
    elif suffix in TORCH_SUFFIXES:
        torch.save({key: value.detach() for key, value in state.items()}, path)
    else:
        raise ValueError(
            f"cannot save to {path}: unknown file type {suffix!r}; use one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    return path
