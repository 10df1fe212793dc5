"""``lite()``: a dense model in, its SLA + FP8 fake-quant student out.

The student is a structural copy of the teacher: every module object is new, every Parameter is
a new ``nn.Parameter`` sharing storage with the teacher's (no weight is copied, the teacher's
Parameters keep their ``requires_grad``), buffers are cloned (they are small, and modules such as
BatchNorm write to them in place). The passes then run on the student only:

    find_attention -> sla_rewrite -> fp8_qat -> freeze

ordered by :mod:`lite3r_compile.passes.manager` from what each requires and provides.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lite3r_compile.config import LiteConfig
from lite3r_compile.passes.manager import Pass, PassRecord, PassResult, run_passes

BACKENDS: tuple[str, ...] = ("fp8", "inductor", "eager")


class FP8EmulationWarning(UserWarning):
    """``backend="fp8"`` on a machine without FP8 GEMMs: the student emulates FP8 (fake-quant)."""


class NoAttentionWarning(UserWarning):
    """The model has no attention that SLA can rewrite: the student is FP8-only."""


@dataclass
class LiteRecord:
    """What ``lite()`` did, stored on the student as ``student.lite3r_record`` for ``report()``.

    ``fp8_gemm``: the student's device has FP8 GEMMs (a CUDA GPU of compute capability >= 8.9).
    ``fp8_emulated``: FP8 was asked for (backend ``"fp8"``, FP8 fake-quant on) and runs as
    fake-quant because the device has no FP8 GEMMs.
    ``cloned_buffer_bytes``: bytes of teacher buffers cloned into the student.
    """

    backend: str
    config: LiteConfig
    passes: PassRecord
    fp8_gemm: bool
    fp8_emulated: bool
    cloned_buffer_bytes: int


def lite(
    model: nn.Module,
    backend: str = "fp8",
    *,
    config: LiteConfig | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Build the Sparse-Linear-Attention + FP8 student of ``model``.

    ``model`` is never modified. The student's frozen parameters share storage with ``model``'s
    (loading other weights into the student, ``load_state_dict`` included, writes into the
    teacher's tensors). Its state dict holds every key of ``model``'s with the same values, plus
    ``<site>.sla.proj_l.{weight,bias}`` for each rewritten attention site; only those are trainable.

    ``backend``: ``"fp8"``, ``"inductor"`` or ``"eager"``, recorded as ``student.lite3r_backend``.
    Training mode always runs the fake-quant student. In eval mode, ``"fp8"`` and ``"inductor"``
    run the deployed form of :func:`lite3r_compile.backends.deploy.deploy` (float8 weights and
    real FP8 GEMMs for ``"fp8"``; Inductor-compiled on a CUDA device), built on the first eval call
    and kept in step with the student's weights; ``"eager"`` runs the fake-quant student. Where the
    machine cannot run FP8 GEMMs (no GPU of compute capability >= 8.9), ``"fp8"`` emulates them
    with the same rounding, said once by an :class:`FP8EmulationWarning`.

    ``example_inputs``: a positional tuple (or one tensor) or a kwargs dict for the model's forward,
    used to capture the attention; ``None`` lets the finder use ``model.example_inputs()``.
    """
    return lite_variants(model, [config], backend, example_inputs=example_inputs)[0]


def lite_variants(
    model: nn.Module,
    configs: Sequence[LiteConfig | None],
    backend: str = "fp8",
    *,
    example_inputs: Any = None,
) -> list[nn.Module]:
    """One student of ``model`` per config, as :func:`lite` builds them, from a single capture
    of the model (the attention sites are found once and rewritten in each student)."""
    if backend not in BACKENDS:
        raise ValueError(f"lite(): backend must be one of {BACKENDS}, got {backend!r}")
    configs = [LiteConfig() if c is None else c for c in configs]
    for config in configs:
        if not isinstance(config, LiteConfig):
            raise TypeError(f"lite(): config must be a LiteConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lite(): model must be an nn.Module, got {type(model).__name__}")
    _refuse_student(model)

    students = []
    seeded: dict[str, Any] = {"example_inputs": example_inputs}
    found: list[PassResult] = []
    for config in configs:
        student, cloned_bytes = structural_copy(model)
        passes = [p for p in default_passes() if not set(p.provides) <= set(seeded)]
        record = run_passes(student, config, passes, seeded=seeded)
        if not found:
            # Later students reuse the sites: their captured graphs re-bind to each copy by path.
            found = [r for r in record.results if r.name == "find_attention"]
            seeded = {k: record.artifacts[k] for k in ("example_inputs", "sites", "capture_failures")}
        else:
            record.results[:0] = found
        students.append(_finish(model, student, backend, config, record, cloned_bytes))
    return students


def _finish(
    model: nn.Module, student: nn.Module, backend: str, config: LiteConfig, record: PassRecord,
    cloned_bytes: int,
) -> nn.Module:
    # The student keeps plain site records, not the captured graphs behind them (the first
    # student's record shares its find_attention result with the later ones).
    plain = {
        name: [dataclasses.replace(s, capture=None) for s in record.artifacts[name]]
        for name in ("sites", "sla_sites")
    }
    results = [
        dataclasses.replace(r, artifacts={k: plain.get(k, v) for k, v in r.artifacts.items()})
        for r in record.results
    ]
    record = PassRecord(results, {**record.artifacts, **plain})
    fp8_gemm = _has_fp8_gemm(student)
    emulated = backend == "fp8" and config.fp8.enabled and not fp8_gemm
    student.lite3r_backend = backend
    student.lite3r_record = LiteRecord(backend, config, record, fp8_gemm, emulated, cloned_bytes)
    if backend != "eager":
        from lite3r_compile.backends.deploy import install_eval_backend

        install_eval_backend(student, backend)

    if emulated:
        warnings.warn(
            f"lite(backend='fp8'): this machine has no FP8 GEMMs ({_fp8_device_text(student)}); "
            "the student emulates FP8: fake-quantization (float8 e4m3 rounding, high-precision "
            "matmuls) in training, float8 weights with float32 products in eval",
            FP8EmulationWarning,
            stacklevel=3,
        )
    if not any(s.rewritten for s in record.artifacts["sla_sites"]):
        found = len(record.artifacts["sites"])
        kind = "FP8-only (fake-quant, no SLA)" if config.fp8.enabled else "dense, like the teacher"
        warnings.warn(
            f"lite(): no attention of {type(model).__name__} was rewritten to SLA ({found} found, "
            f"report(student) says why); the student is {kind}, with no SLA projection to train",
            NoAttentionWarning,
            stacklevel=3,
        )
    return student


def is_student(model: nn.Module) -> bool:
    """Whether ``model`` came out of :func:`lite`."""
    return isinstance(getattr(model, "lite3r_record", None), LiteRecord)


def _refuse_student(model: nn.Module) -> None:
    from lite3r_compile.passes.fp8_qat import FP8FakeQuantLinear
    from lite3r_compile.sla.module import SparseLinearAttention

    if is_student(model):
        raise ValueError(
            f"lite(): {type(model).__name__} is already a lite3r student (it has lite3r_record); "
            "call lite() on the dense teacher model instead"
        )
    for path, m in model.named_modules():
        if isinstance(m, (SparseLinearAttention, FP8FakeQuantLinear)):
            raise ValueError(
                f"lite(): {type(model).__name__} holds a lite3r {type(m).__name__} at {path!r}, "
                "so it is (part of) a student; call lite() on the dense teacher model instead"
            )


def structural_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose modules are new objects, whose Parameters are new
    ``nn.Parameter`` objects (``requires_grad=False``) sharing storage with ``model``'s, and whose
    buffers are clones. Returns the copy and the bytes of buffers cloned.

    Tied parameters stay tied (one new Parameter per teacher Parameter).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    cloned = 0
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
        cloned += b.numel() * b.element_size()
    try:
        return copy.deepcopy(model, memo), cloned
    except Exception as err:
        raise TypeError(
            f"lite(): cannot copy the structure of {type(model).__name__} (copy.deepcopy failed: "
            f"{err}); the student is built as a copy whose Parameters share the teacher's storage, "
            "so every module attribute must support deepcopy"
        ) from err


def _find_attention_pass(module: nn.Module, config: LiteConfig, example_inputs: Any) -> PassResult:
    from lite3r_compile.passes.attention import locate_attention

    analysis = locate_attention(module, example_inputs)
    result = PassResult(
        "find_attention", {"sites": analysis.sites, "capture_failures": analysis.failures}
    )
    if analysis.failures:
        result.notes.append(
            f"capture: {len(analysis.failures)} module(s) could not be traced as a whole (their "
            "children were); see 'Modules not captured'"
        )
    return result


def _sla_rewrite_pass(module: nn.Module, config: LiteConfig, sites: list) -> PassResult:
    from lite3r_compile.passes.sla_rewrite import apply_sla

    def config_for_site(site):
        return config.sla_for(site.path, site.scope)[0]

    return PassResult("sla_rewrite", {"sla_sites": apply_sla(module, sites, config_for_site)})


def _fp8_pass(module: nn.Module, config: LiteConfig, sites: list, example_inputs: Any) -> PassResult:
    from lite3r_compile.passes.fp8_qat import fp8_qat

    return fp8_qat(module, config, sites, example_inputs)


def _freeze_pass(module: nn.Module, config: LiteConfig) -> PassResult:
    from lite3r_compile.passes.freeze import freeze

    return freeze(module, config)


def default_passes() -> list[Pass]:
    """The passes of :func:`lite`. FP8 runs after the SLA rewrite so that it sees (and skips) the
    SLA projections; freezing runs last, over the final set of parameters."""
    return [
        Pass("find_attention", _find_attention_pass, requires=("example_inputs",),
             provides=("sites", "capture_failures")),
        Pass("sla_rewrite", _sla_rewrite_pass, requires=("sites",), provides=("sla_sites",)),
        Pass("fp8_qat", _fp8_pass, requires=("sites", "example_inputs"), provides=("fp8_layers",), after=("sla_rewrite",)),
        Pass("freeze", _freeze_pass, provides=("freeze",), after=("sla_rewrite", "fp8_qat")),
    ]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _has_fp8_gemm(model: nn.Module) -> bool:
    device = _model_device(model)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_device_text(model: nn.Module) -> str:
    device = _model_device(model)
    if device.type != "cuda":
        return f"the model is on {device.type}, not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} < 8.9"
