"""The benchmark's variants: what runs, built through the public API.

======================  ==========================================================================
``dense_eager``         the bf16 model as it is (SDPA attention)
``dense_compiled``      ``torch.compile(model)`` of the same model
``student_fp8_sla``     ``lite(model, backend="fp8")``: SLA (``topk``) on the ``sla_scopes`` sites
                        plus FP8 Linear layers
``student_fp8_only``    ``lite(model, backend="fp8")`` with no SLA site (``sla_scopes=()``)
``student_sla_only``    ``lite(model, backend="fp8")`` with FP8 off (nothing to lower to FP8: the
                        compiled student is what ``backend="inductor"`` gives)
======================  ==========================================================================

All timed students use ``backend="fp8"`` so that one capture of the teacher builds them all (the
capture of a 1B-parameter model costs tens of seconds); the FP8 config decides what is FP8.

Students run through ``student.eval(); student(images)``, whatever backend ``lite()`` installed;
:func:`backend_info` says afterwards what actually ran. Their correctness references are the same
configurations built with ``backend="eager"`` (the fake-quant student), and the exact check is
``topk=1.0`` with FP8 off, compiled, against the dense teacher.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

VARIANTS: tuple[str, ...] = (
    "dense_eager", "dense_compiled", "student_fp8_sla", "student_fp8_only", "student_sla_only",
)
STUDENT_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v.startswith("student_"))
# the exact student of the correctness check (not a timed variant)
EXACT_STUDENT = "student_exact"


@dataclass(frozen=True)
class StudentOptions:
    """How the students are built: SLA ``topk`` and the attention ``sla_scopes`` that get SLA;
    ``bf16_dense_heads``: the timed students run the model's dense-prediction heads in bfloat16
    (``LiteConfig.bf16_heads``; the exact student keeps them as they are); ``backend``, when set,
    replaces every student's backend (``"eager"`` runs them uncompiled, for tests on a CPU);
    ``regional_compile``: every compiled variant, ``dense_compiled`` included, compiles its repeated
    blocks one by one instead of the whole model (``LiteConfig.regional_compile``);
    ``cuda_graphs``: every compiled variant replays its graphs as CUDA graphs
    (``LiteConfig.cuda_graphs``; ``mode="reduce-overhead"`` for ``dense_compiled``);
    ``inductor_multi_kernel``: every compiled variant lets Inductor time persistent against looped
    variants of its wide reductions (``LiteConfig.inductor_multi_kernel``; ``triton.multi_kernel``
    for ``dense_compiled``); ``bf16_all_heads``: the timed students run every head in bfloat16,
    the camera head too (implies ``bf16_dense_heads``); ``head_frames_chunk``: the timed students'
    chunked heads run this many frames at a time (``LiteConfig.head_frames_chunk``);
    ``dense_special_rows``: the SLA students give each frame's camera and register tokens exact
    attention (``SLAConfig.dense_rows``, from :func:`special_token_rows`)."""

    topk: float = 0.1
    sla_scopes: tuple[str, ...] = ("global",)
    backend: str | None = None
    bf16_dense_heads: bool = False
    regional_compile: bool = True
    cuda_graphs: bool = False
    inductor_multi_kernel: bool = False
    bf16_all_heads: bool = False
    head_frames_chunk: int | None = None
    dense_special_rows: bool = False


def special_token_rows(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """``(tokens_per_frame, special_tokens)`` of a VGGT-style model (an ``aggregator`` with
    ``patch_start_idx`` special tokens before each frame's patch grid) on ``images``
    (B, S, 3, H, W): the ``SLAConfig.dense_rows`` that give those tokens exact attention."""
    aggregator = getattr(model, "aggregator", None)
    if aggregator is None or not hasattr(aggregator, "patch_start_idx") or not hasattr(aggregator, "patch_size"):
        raise ValueError(
            f"special tokens' dense rows (--dense-special-rows): {type(model).__name__} has no VGGT-style "
            "aggregator (patch_start_idx special tokens before each frame's patches); run it without them"
        )
    height, width = images.shape[-2:]
    patch = aggregator.patch_size
    special = aggregator.patch_start_idx
    return special + (height // patch) * (width // patch), special


def student_plan(variant: str, options: StudentOptions, dense_heads: tuple[str, ...] = (),
                 dense_rows: tuple[int, int] | None = None) -> tuple[str, Any]:
    """(backend, LiteConfig) of a student variant (or of :data:`EXACT_STUDENT`); ``dense_heads``:
    the model's dense-prediction heads (:class:`models.ModelSpec`); ``dense_rows``: the SLA
    students' ``SLAConfig.dense_rows`` (with ``options.dense_special_rows``)."""
    from lite3r_compile import FP8Config, LiteConfig, SLAConfig

    sla = SLAConfig(topk=options.topk, dense_rows=dense_rows if options.dense_special_rows else None)
    heads = ("*",) if options.bf16_all_heads else dense_heads if options.bf16_dense_heads else ()
    deployed = {"regional_compile": options.regional_compile, "cuda_graphs": options.cuda_graphs,
                "inductor_multi_kernel": options.inductor_multi_kernel}
    timed = {**deployed, "head_frames_chunk": options.head_frames_chunk}
    plans = {
        "student_fp8_sla": ("fp8", LiteConfig(sla=sla, fp8=FP8Config(enabled=True), sla_scopes=options.sla_scopes,
                                              bf16_heads=heads, **timed)),
        "student_fp8_only": ("fp8", LiteConfig(sla=sla, fp8=FP8Config(enabled=True), sla_scopes=(), bf16_heads=heads,
                                               **timed)),
        "student_sla_only": ("fp8", LiteConfig(sla=sla, fp8=FP8Config(enabled=False), sla_scopes=options.sla_scopes,
                                               bf16_heads=heads, **timed)),
        EXACT_STUDENT: ("fp8", LiteConfig(sla=SLAConfig(topk=1.0), fp8=FP8Config(enabled=False),
                                          sla_scopes=options.sla_scopes, **deployed)),
    }
    if variant not in plans:
        raise ValueError(f"lite3r bench: {variant!r} is not a student variant ({', '.join(plans)})")
    backend, config = plans[variant]
    return options.backend or backend, config


@dataclass
class Students:
    """The students of one teacher, by name (timed ones and :data:`EXACT_STUDENT`), and their
    eager references by the same name; ``build_s``: seconds spent in ``lite()``; ``warnings``:
    what ``lite()`` said (unique messages)."""

    timed: dict[str, nn.Module]
    references: dict[str, nn.Module]
    build_s: float
    warnings: list[str]


def build_students(teacher: nn.Module, names: list[str], options: StudentOptions, example_inputs: tuple,
                   *, references: bool, dense_heads: tuple[str, ...] = ()) -> Students:
    """Every student in ``names`` and (with ``references``) its eager fake-quant twin, sharing the
    teacher's weights. Students of one backend come from one capture of the teacher
    (``lite_variants``); a reference whose backend and config equal its student's is that student."""
    import time

    from lite3r_compile.api import lite_variants

    dense_rows = special_token_rows(teacher, example_inputs[0]) if options.dense_special_rows else None
    wanted: dict[tuple[str, str], tuple[str, Any]] = {}
    for name in names:
        backend, config = student_plan(name, options, dense_heads, dense_rows)
        wanted[(name, "timed")] = (backend, config)
        if references and name != EXACT_STUDENT:
            wanted[(name, "reference")] = ("eager", config)
    by_backend: dict[str, list[tuple[str, str]]] = {}
    for key, (backend, _) in wanted.items():
        by_backend.setdefault(backend, []).append(key)

    start = time.perf_counter()
    built: dict[tuple[str, str], nn.Module] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend, keys in by_backend.items():
            configs, unique_keys = [], []
            for key in keys:
                config = wanted[key][1]
                twin = next((k for k in unique_keys if wanted[k][1] == config), None)
                if twin is None:
                    configs.append(config)
                    unique_keys.append(key)
            students = lite_variants(teacher, configs, backend, example_inputs=example_inputs)
            made = dict(zip(unique_keys, students))
            for key in keys:
                twin = next(k for k in unique_keys if wanted[k][1] == wanted[key][1])
                built[key] = made[twin]
    for student in built.values():
        student.eval()
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return Students(
        timed={name: built[(name, "timed")] for name in names},
        references={name: built[(name, "reference")] for name in names if (name, "reference") in built},
        build_s=time.perf_counter() - start,
        warnings=messages,
    )


class CompileWatch:
    """What Dynamo and Inductor did during a ``with`` block: ``graphs`` compiled, ``graph_breaks``
    and their most frequent reasons, ``cudagraph_skips`` (graphs Inductor was asked to record as
    CUDA graphs and did not; it gives the reason only in its ``cudagraphs`` artifact log,
    ``TORCH_LOGS=cudagraphs``), and the warnings they logged (a recompile limit hit, a fallback),
    which Python's ``warnings`` does not see."""

    LOGGERS = ("torch._dynamo", "torch._inductor")

    def __init__(self) -> None:
        import logging

        self.graphs = 0
        self.graph_breaks = 0
        self.cudagraph_skips = 0
        self.frames_after_warmup: int | None = None
        self.break_reasons: dict[str, int] = {}
        self.log_messages: list[str] = []
        watch = self

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                text = record.getMessage().strip()
                message = text.splitlines()[0][:300] if text else ""
                if message and message not in watch.log_messages and len(watch.log_messages) < 20:
                    watch.log_messages.append(message)

        self._handler = Collect(level=logging.WARNING)

    @staticmethod
    def _counts() -> tuple[int, dict[str, int]]:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0)), dict(counters["graph_break"])

    @staticmethod
    def _count(group: str, key: str) -> int:
        from torch._dynamo.utils import counters

        return int(counters[group].get(key, 0))

    def mark_warm(self) -> None:
        """Call after the warm-up calls: Dynamo converting frames after this point (a guard that
        fails on every call) means the timed calls include compile work."""
        self._frames_warm = self._count("frames", "total")

    def __enter__(self) -> "CompileWatch":
        import logging

        self._graphs0, self._breaks0 = self._counts()
        self._skips0 = self._count("inductor", "cudagraph_skips")
        self._frames_warm: int | None = None
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import logging

        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        graphs, breaks = self._counts()
        self.graphs = graphs - self._graphs0
        self.cudagraph_skips = self._count("inductor", "cudagraph_skips") - self._skips0
        self.frames_after_warmup = None if self._frames_warm is None else self._count("frames", "total") - self._frames_warm
        delta = {k: v - self._breaks0.get(k, 0) for k, v in breaks.items() if v > self._breaks0.get(k, 0)}
        self.graph_breaks = sum(delta.values())
        top = sorted(delta.items(), key=lambda kv: -kv[1])[:5]
        self.break_reasons = {str(k).splitlines()[0][:200]: v for k, v in top}

    def summary(self) -> dict[str, Any]:
        return {"graphs_compiled": self.graphs, "graph_breaks": self.graph_breaks,
                "graph_break_reasons": self.break_reasons, "compile_log": self.log_messages,
                "frames_compiled_while_timed": self.frames_after_warmup,
                "cudagraph_skips": self.cudagraph_skips}


def backend_info(module: nn.Module, watch: CompileWatch, caught: list[str]) -> dict[str, Any]:
    """What ran when ``module`` was called: its lite backend (if a student), whether Dynamo
    compiled graphs for it (``watch`` around its first calls), the deployed form's record where
    the student has one, and the warnings of the first calls."""
    info: dict[str, Any] = {**watch.summary(), "compiled": watch.graphs > 0, "warnings": caught}
    record = getattr(module, "lite3r_record", None)
    if record is not None:
        info["requested_backend"] = getattr(module, "lite3r_backend", record.backend)
        info["fp8_gemm_available"] = bool(record.fp8_gemm)
        info["fp8_emulated"] = bool(record.fp8_emulated)
        sla_sites = record.passes.artifacts.get("sla_sites", [])
        info["sla_sites_rewritten"] = sum(bool(getattr(s, "rewritten", False)) for s in sla_sites)
        decisions = record.passes.artifacts.get("fp8_layers", [])
        info["fp8_layers"] = sum(bool(getattr(d, "quantized", False)) for d in decisions)
    deployed = deployed_module(module)
    if deployed is not None and dataclasses.is_dataclass(getattr(deployed, "record", None)):
        rec = dataclasses.asdict(deployed.record)
        info["deployed"] = {k: (len(v) if isinstance(v, list) else v) for k, v in rec.items()}
    info["ran"] = _ran(info)
    return info


def _ran(info: dict[str, Any]) -> str:
    """One word for what ran: ``compiled`` (Dynamo compiled graphs for the call), else ``eager``;
    with ``+fp8`` where a deployed form has float8 layers on FP8 GEMM hardware, and ``+emulated``
    where FP8 is emulated."""
    word = "compiled" if info["compiled"] else "eager"
    deployed = info.get("deployed") or {}
    if deployed.get("float8_layers"):
        word += "+fp8-emulated" if deployed.get("fp8_emulated") else "+fp8"
    elif info.get("fp8_layers"):
        word += "+fp8-fake-quant"
    return word


def deployed_module(student: nn.Module) -> Any:
    """The deployed form a lite eval backend built for ``student`` (``student.forward.deployed``),
    or None when the student has none (eager backend, or the backend is not installed)."""
    router = student.__dict__.get("forward")
    return getattr(router, "deployed", None)


def resident_modules(module: nn.Module) -> list[nn.Module]:
    """The modules whose tensors a call of ``module`` runs on: its deployed form when it has one
    (the inference copy with float8 weights), else itself."""
    deployed = deployed_module(module)
    inner = getattr(deployed, "module", None)
    return [inner] if isinstance(inner, nn.Module) else [module]


def weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of ``modules`` (shared
    storage counted once): the weights a variant keeps in memory."""
    seen: dict[tuple[str, int], int] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def compile_dense(model: nn.Module, backend: str, *, regional: bool = False, cuda_graphs: bool = False,
                  multi_kernel: bool = False) -> nn.Module:
    """``torch.compile(model)`` with Dynamo backend ``backend`` (``inductor`` by default;
    ``eager`` / ``aot_eager`` only trace, for tests), static shapes (each frame count compiles its
    own graphs, as the students' do after ``torch._dynamo.reset()``). With ``regional``, a copy
    of ``model`` sharing its weights, with its repeated blocks and heads compiled one by one
    (:func:`lite3r_compile.backends.regions.compile_blocks`; ``model`` itself stays eager), with
    automatic dynamic shapes as the students' regional blocks: a block class that runs on two
    shapes (frame and global attention) compiles a graph with dynamic token dims.
    ``cuda_graphs``: ``mode="reduce-overhead"``, each call a new CUDA-graph step.
    ``multi_kernel``: Inductor's ``triton.multi_kernel``. Both need the ``inductor`` backend."""
    if (cuda_graphs or multi_kernel) and backend != "inductor":
        raise ValueError(f"compile_dense: cuda_graphs and multi_kernel are Inductor options; the backend is {backend!r}")
    inductor: dict[str, Any] = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if multi_kernel:
        # torch.compile takes a mode or Inductor options, not both
        inductor = {"options": {"triton.multi_kernel": 1, **({"triton.cudagraphs": True} if cuda_graphs else {})}}
    if not regional:
        compiled = torch.compile(model, backend=backend, dynamic=False, **inductor)
    else:
        from lite3r_compile.api import structural_copy
        from lite3r_compile.backends.regions import compile_blocks

        compiled, _ = structural_copy(model)
        compile_blocks(compiled, backend=backend, dynamic=None, **inductor)
    return CudaGraphSteps(compiled) if cuda_graphs else compiled


class CudaGraphSteps(nn.Module):
    """``module`` with each call marked as a new step of Inductor's CUDA graph trees
    (``torch.compiler.cudagraph_mark_step_begin``) and its outputs copied out of the graphs'
    memory, as a deployed student with CUDA graphs does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from lite3r_compile.backends.deploy import copy_tensors

        torch.compiler.cudagraph_mark_step_begin()
        return copy_tensors(self.module(*args, **kwargs))
