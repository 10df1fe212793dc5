"""Training checkpoints of a distillation run: small, atomic, refused when they don't fit.

A checkpoint holds only what training changes (the trainable parameters), the optimizer and
schedule state, the step, every random generator's state, the losses so far, and a fingerprint of
the run (model class, trainable parameter names and shapes, training config) that a resume must
match. Files are written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

CHECKPOINT_NAME = "checkpoint.pt"


# Config fields a resumed run may change: how long it runs, how often it writes, and how it is
# spread over processes and loader workers (the checkpoint's tensors are full, whatever wrote them).
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "log_every", "strategy", "num_workers")


def fingerprint(student: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "model": f"{type(student).__module__}.{type(student).__qualname__}",
        "trainable": {n: list(p.shape) for n, p in student.named_parameters() if p.requires_grad},
        "config": {k: v for k, v in config.items() if k not in RESUMABLE_FIELDS},
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    diffs = []
    if saved["model"] != current["model"]:
        diffs.append(f"model: checkpoint {saved['model']}, now {current['model']}")
    s_tr, c_tr = saved["trainable"], current["trainable"]
    for name in sorted(set(s_tr) | set(c_tr)):
        if name not in c_tr:
            diffs.append(f"trainable parameter {name}: in the checkpoint, not in this model")
        elif name not in s_tr:
            diffs.append(f"trainable parameter {name}: in this model, not in the checkpoint")
        elif s_tr[name] != c_tr[name]:
            diffs.append(f"trainable parameter {name}: shape {s_tr[name]} in the checkpoint, {c_tr[name]} now")
    s_cfg, c_cfg = saved["config"], current["config"]
    for key in sorted(set(s_cfg) | set(c_cfg)):
        if s_cfg.get(key) != c_cfg.get(key):
            diffs.append(f"config {key}: {s_cfg.get(key)!r} in the checkpoint, {c_cfg.get(key)!r} now")
    return diffs


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gather_trainable(student: nn.Module) -> dict[str, Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters."""
    out = {}
    for name, p in student.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone()
    return out


def load_trainable(student: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy full trainable tensors (from :func:`gather_trainable`) into the student's parameters,
    sharded (FSDP2) or not."""
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # an FSDP2 shard: take this process's part
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            p.copy_(value)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no distillation checkpoint at {path}")
    # RNG states hold numpy arrays and Python tuples, so the file is not weights-only; it is one
    # this trainer wrote.
    return torch.load(path, map_location="cpu", weights_only=False)
