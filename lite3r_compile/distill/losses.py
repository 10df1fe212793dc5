"""Distillation losses: final outputs and partial attention distillation.

Both are model-agnostic. The output loss walks the teacher's output pytree; every floating-point
tensor leaf is compared with the student's leaf at the same place. The attention loss compares,
at selected attention sites, the output of the module holding the site in the student (its SLA
attention followed by the frozen output projection) with the same module's output in the teacher
(dense attention, same projection). Outputs are captured with forward hooks; neither model is
edited.

Every term is normalised by the teacher's magnitude, so depth in metres, unit quaternions and
1024-wide attention outputs weigh alike:

    output term    w_k * mean(c * |s - t|) / mean(c * |t|)        (c: teacher confidence, or 1)
    attention term mean over sites of ||s - t||^2 / ||t||^2
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten_with_path, keystr

# Defaults for the zoo's 3D models (upstream output names); any other leaf weighs 1.
DEFAULT_OUTPUT_WEIGHTS: dict[str, float] = {
    "pose_enc": 1.0,
    # VGGT's per-iteration poses: the last one is pose_enc, the earlier ones would weigh the
    # camera four times over
    "pose_enc_list": 0.0,
    "depth": 1.0,
    "world_points": 1.0,
    "depth_conf": 0.05,
    "world_points_conf": 0.05,
}
# A prediction weighted by the teacher's confidence in it, where the output has both.
CONFIDENCE_OF: dict[str, str] = {"depth": "depth_conf", "world_points": "world_points_conf"}
EPS = 1e-6


@dataclass(frozen=True)
class OutputLossConfig:
    """Per-leaf weights by top-level key (``weights``); ``default_weight`` for the rest. A weight
    of 0 drops a leaf. ``confidence_weighting`` weights a prediction per pixel by the teacher's
    confidence in it (normalised to mean 1) where :data:`CONFIDENCE_OF` names one."""

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_OUTPUT_WEIGHTS))
    default_weight: float = 1.0
    confidence_weighting: bool = True


def _top_key(path) -> str:
    first = path[0] if path else None
    return str(getattr(first, "key", getattr(first, "idx", "")))


def output_loss(student_out, teacher_out, config: OutputLossConfig = OutputLossConfig()) -> tuple[Tensor, dict[str, float]]:
    """Weighted, normalised L1 over the floating-point tensor leaves of the student's output
    pytree, each against the teacher's leaf at the same place.

    Leaves only the teacher has are ignored (a model may return more in eval mode, as VGGT returns
    its input images); a leaf only the student has is an error.
    """
    teacher_leaves = {keystr(path): leaf for path, leaf in tree_flatten_with_path(teacher_out)[0]}
    teacher_by_key = teacher_out if isinstance(teacher_out, Mapping) else {}
    total, parts = None, {}
    for path, s in tree_flatten_with_path(student_out)[0]:
        if not (isinstance(s, Tensor) and s.is_floating_point()):
            continue
        name = keystr(path)
        if name not in teacher_leaves:
            raise ValueError(f"output_loss: the student returns {name}, the teacher does not")
        key = _top_key(path)
        weight = config.weights.get(key, config.default_weight)
        if weight == 0:
            continue
        t = teacher_leaves[name]
        if t.shape != s.shape:
            raise ValueError(f"output_loss: {name} has shape {tuple(s.shape)} in the student, {tuple(t.shape)} in the teacher")
        s, t = s.float(), t.detach().float()
        err, ref = (s - t).abs(), t.abs()
        conf_key = CONFIDENCE_OF.get(key)
        if config.confidence_weighting and conf_key in teacher_by_key:
            conf = teacher_by_key[conf_key].detach().float()
            conf = conf / conf.mean().clamp_min(EPS)
            conf = conf.reshape(conf.shape + (1,) * (err.dim() - conf.dim()))
            err, ref = err * conf, ref * conf
        term = weight * err.mean() / ref.mean().clamp_min(EPS)
        parts[name] = term.item()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("output_loss: the outputs hold no floating-point tensor to compare")
    return total, parts


def attention_loss(student_acts: Mapping[str, Tensor], teacher_acts: Mapping[str, Tensor]) -> Tensor:
    """Mean over sites of the relative squared error ||s - t||^2 / ||t||^2."""
    if not student_acts:
        raise ValueError("attention_loss: no attention output was captured")
    terms = []
    for path, s in student_acts.items():
        if path not in teacher_acts:
            raise KeyError(f"attention_loss: the teacher produced no output at site {path!r}")
        t = teacher_acts[path].detach().float()
        terms.append((s.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(EPS))
    return torch.stack(terms).mean()


@contextmanager
def capture_outputs(model: nn.Module, paths: Iterable[str]):
    """Record the output of each module at ``paths`` during the forward passes in the block.

    Yields a dict path -> latest output tensor; hooks are removed on exit.
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for path in paths:
            module = model.get_submodule(path)

            def hook(_module, _args, output, _path=path):
                if isinstance(output, (tuple, list)):
                    output = output[0]  # nn.MultiheadAttention returns (output, weights)
                store[_path] = output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
