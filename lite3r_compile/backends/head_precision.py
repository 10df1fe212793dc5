"""Prediction heads in bfloat16 in the deployed student (``LiteConfig.bf16_heads``).

Feed-forward 3D models run their heads (DPT depth and point heads, camera heads) in float32:
upstream turns autocast off around them. At 518x518 those float32 convolutions and elementwise
passes over full-resolution feature maps are half of a compiled VGGT-1B student's GPU time at
S=8 (57 of 114 ms, ``benchmarks/NOTES.md``); bfloat16 halves their bytes and runs their
convolutions on the bf16 tensor cores instead of tf32. On the trained teacher of the quality
study, bfloat16 depth and point heads leave depth AbsRel where it was (0.2820 against 0.2821)
and move the depth by 0.19% (the notes give the run). A camera head is cheap (it sees tokens,
not pixels) and its pose encoding amplifies rounding, so the dense-prediction heads are the ones
worth naming.

A head is a module whose own name matches :data:`~lite3r_compile.config.HEAD_NAME_GLOBS`, that
sits in no other head and not in a patch embedding (DINOv2's classifier ``head`` is part of the
backbone), and that holds parameters or buffers. :func:`lower_head_precision` casts the float32
parameters and buffers of each head that ``LiteConfig.bf16_heads`` names to bfloat16 and hooks
it: floating-point tensors entering it (also inside lists, tuples and dicts) are cast to
bfloat16, list items as the head reads them (:mod:`~lite3r_compile.backends.input_cast`: VGGT
passes all 24 aggregator layers to each head), floating-point tensors leaving it are cast back to
float32, so the rest of the model sees the dtypes it saw before. Left as they are, with the
reason in the record: named heads with no float32 tensor, and the tensors of modules whose
precision is part of their definition (a ``Float8Linear``'s float8 weight and float32 scales, an
SLA site's float32 projection).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from lite3r_compile.backends.fp8_linear import Float8Linear
from lite3r_compile.backends.input_cast import cast_floats, cast_head_inputs
from lite3r_compile.config import HEAD_NAME_GLOBS, PATCH_EMBED_NAME_GLOBS, ancestor_named, matches_any
from lite3r_compile.sla.module import SparseLinearAttention

# modules whose tensors keep their dtype inside a bf16 head
KEEP_PRECISION: tuple[type[nn.Module], ...] = (Float8Linear, SparseLinearAttention)


def find_heads(module: nn.Module) -> list[str]:
    """Paths of the heads of ``module`` (see the module docstring), outermost first."""
    heads = []
    for path, m in module.named_modules():
        if not path or ancestor_named(path, HEAD_NAME_GLOBS) != path or ancestor_named(path, PATCH_EMBED_NAME_GLOBS):
            continue
        if next(iter((*m.parameters(), *m.buffers())), None) is not None:
            heads.append(path)
    return heads


def _kept(module: nn.Module) -> set[int]:
    """ids of the submodules of ``module`` (itself included) inside a :data:`KEEP_PRECISION` one."""
    kept: set[int] = set()
    for m in module.modules():
        if isinstance(m, KEEP_PRECISION):
            kept.update(id(sub) for sub in m.modules())
    return kept


def lower_head_precision(module: nn.Module, student: nn.Module, globs: tuple[str, ...], dtype: torch.dtype,
                         ) -> tuple[list[str], list[tuple[str, str]], list[tuple[Tensor, Tensor]]]:
    """Run the heads of ``module`` (an inference copy of ``student``, same paths) whose paths match
    ``globs`` in ``dtype``.

    Returns the paths of the heads lowered, (path, why) of the named heads left as they are, and
    (``dtype`` copy, the student's tensor) pairs, from which the deployed form refreshes the
    copies after the student's weights change. A glob that names no head is an error.
    """
    heads = find_heads(module)
    unmatched = [g for g in globs if not any(fnmatchcase(h, g) for h in heads)]
    if unmatched:
        raise ValueError(
            f"LiteConfig.bf16_heads: {unmatched} name no head of {type(module).__name__} (its heads: "
            f"{heads or 'none'}; a head is a module named like {HEAD_NAME_GLOBS} outside the patch embedding)"
        )
    student_tensors = {**dict(student.named_parameters(remove_duplicate=False)),
                       **dict(student.named_buffers(remove_duplicate=False))}
    lowered: list[str] = []
    kept_heads: list[tuple[str, str]] = []
    sources: list[tuple[Tensor, Tensor]] = []
    for path in heads:
        if not matches_any(path, globs):
            continue
        head = module.get_submodule(path)
        kept = _kept(head)
        cast = 0
        for sub_path, sub in head.named_modules(remove_duplicate=False):
            if id(sub) in kept:
                continue
            prefix = ".".join(p for p in (path, sub_path) if p)
            for name, p in list(sub._parameters.items()):
                if p is not None and p.dtype == torch.float32:
                    low = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    sub._parameters[name] = low
                    sources.append((low, student_tensors[f"{prefix}.{name}"]))
                    cast += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.dtype == torch.float32:
                    sub._buffers[name] = b.to(dtype)
                    sources.append((sub._buffers[name], student_tensors[f"{prefix}.{name}"]))
                    cast += 1
        if not cast:
            kept_heads.append((path, "no float32 parameter or buffer"))
            continue
        head.register_forward_pre_hook(lambda m, args, kwargs: cast_head_inputs(args, kwargs, dtype), with_kwargs=True)
        head.register_forward_hook(lambda m, args, output: cast_floats(output, torch.float32))
        lowered.append(path)
    return lowered, kept_heads, sources
