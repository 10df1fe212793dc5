"""The end-to-end benchmark run: models x frame counts x variants within a time budget.

Per model: build the bf16 teacher once (:func:`models.build_model`), then all students from as
few captures as possible (:func:`variants.build_students`, one ``lite_variants`` call per
backend; they share the teacher's weights). Then the runs, most important first (the issue's
targets: S=8 dense eager / compiled / fp8+SLA, S=32 dense eager / fp8+SLA, S=1 dense compiled /
FP8 only, S=8 FP8 only), then the rest in the order asked. Each run starts from a clean state
(``torch._dynamo.reset()``, garbage collected, cache emptied), so a compiled variant compiles
its own static-shape graphs and the compile time is its own.

Before each run its duration is estimated from the runs so far (the same variant at another
frame count, or other variants at this one, plus a compile estimate for compiled variants); a run
that would not fit in what is left of ``time_budget_s`` is skipped with the reason. The JSON is
rewritten after every run, so a run cut short by a time limit loses nothing finished, and
``resume`` (``lite3r bench --resume JSON``) continues such a result in another process: its
finished runs and exact checks are kept as they are and not run again (dense eager always runs
again: it takes seconds and is every other run's reference), after checking that it was measured
with the same configuration on the same device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lite3r_compile.bench import breakdown as bd
from lite3r_compile.bench import gemm
from lite3r_compile.bench.claims import EXACT_ERROR_MAX, STUDENT_ERROR_MAX, check_claims
from lite3r_compile.bench.models import ModelSpec, build_model, make_images, model_spec, output_tensors
from lite3r_compile.bench.timing import relative_errors, release_memory, time_forward, worst
from lite3r_compile.bench.variants import (
    EXACT_STUDENT,
    STUDENT_VARIANTS,
    VARIANTS,
    StudentOptions,
    Students,
    backend_info,
    CompileWatch,
    build_students,
    compile_dense,
    resident_modules,
    weight_bytes,
)

# (frames, variant) run first when asked for: the runs the targets need
PRIORITY_RUNS: tuple[tuple[int, str], ...] = (
    (8, "dense_eager"), (8, "dense_compiled"), (8, "student_fp8_sla"),
    (32, "dense_eager"), (32, "student_fp8_sla"),
    (1, "dense_compiled"), (1, "student_fp8_only"),
    (8, "student_fp8_only"),
)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark runs (see ``lite3r bench --help`` for each field)."""

    models: tuple[str, ...] = ("vggt-1b", "da3-large")
    frames: tuple[int, ...] | None = None
    variants: tuple[str, ...] = VARIANTS
    out: str = "benchmarks/results"
    name: str = "e2e"
    device: str = "cuda"
    time_budget_s: float = 450.0
    students: StudentOptions = field(default_factory=StudentOptions)
    compile_backend: str = "inductor"
    breakdown_frames: tuple[int, ...] = (8, 32)
    correctness: bool = True
    exact_check: bool = True
    gemm: bool = True
    image_size: int | None = None
    target_s: float = 2.0
    min_iters: int = 3
    max_iters: int = 20
    compile_estimate_s: float = 90.0
    min_model_s: float = 60.0
    seed: int = 0
    plot: bool = True
    resume: str | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"lite3r bench: dtype must be bfloat16 or float32, got {self.dtype!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"lite3r bench: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        for m in self.models:
            model_spec(m)


def log(message: str) -> None:
    print(message, flush=True)


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
        env["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Benchmark:
    """One benchmark run; :meth:`run` does everything and returns the result dict."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("lite3r bench: --device cuda but CUDA is not available; use --device cpu with tiny presets")
        # a model with a graph break in each of its 24-48 repeated blocks must not run into
        # Dynamo's recompile limit and fall back to eager unseen; the same for every variant
        # (raised for the run, restored after it). A guard that fails on every call is reported
        # instead, as frames_compiled_while_timed.
        self.dynamo_limits = {knob: getattr(torch._dynamo.config, knob)
                              for knob in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, knob)}
        limits = {knob: max(value, 64) for knob, value in self.dynamo_limits.items()}
        self.start = time.perf_counter()
        self.deadline = self.start + config.time_budget_s
        self.out_dir = Path(config.out)
        self.result: dict[str, Any] = {
            "meta": _environment(self.device),
            "config": _jsonable(config),
            "models": {},
            "runs": [],
            "skipped": [],
            "exact_checks": [],
            "claims": [],
        }
        self.result["meta"]["dynamo_limits"] = limits
        # dense teacher outputs per (model, frames), on the CPU, for the exact check
        self.teacher_outputs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.previous_runs: dict[tuple[str, int, str], dict[str, Any]] = {}
        self.previous_exact: dict[str, dict[str, Any]] = {}
        if config.resume:
            self.load_previous(Path(config.resume))

    # fields of the configuration that change what a run measures
    SAME_FOR_RESUME = ("students", "compile_backend", "image_size", "seed", "target_s", "min_iters", "max_iters")

    def load_previous(self, path: Path) -> None:
        """Keep the finished runs of the result at ``path`` (see the module docstring)."""
        previous = json.loads(path.read_text())
        config = self.result["config"]
        differences = [f"{k}: {previous['config'].get(k)!r} there, {config.get(k)!r} here"
                       for k in self.SAME_FOR_RESUME if previous["config"].get(k) != config.get(k)]
        there, here = previous["meta"].get("device_name"), self.result["meta"].get("device_name")
        if there != here:
            differences.append(f"device: {there!r} there, {here!r} here")
        if differences:
            raise SystemExit(f"lite3r bench --resume {path}: measured under another configuration; "
                             + "; ".join(differences))
        for run in previous["runs"]:
            if "error" not in run and run["variant"] != "dense_eager":
                self.previous_runs[(run["model"], run["frames"], run["variant"])] = {**run, "resumed_from": str(path)}
        for entry in previous["exact_checks"]:
            if "max" in entry:
                self.previous_exact[entry["model"]] = {**entry, "resumed_from": str(path)}
        self.result["meta"]["resumed_from"] = str(path)
        log(f"lite3r bench: resuming {path}: {len(self.previous_runs)} runs and {len(self.previous_exact)} "
            "exact checks kept")

    # ------------------------------------------------------------------ bookkeeping
    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> Path:
        self.result["elapsed_s"] = time.perf_counter() - self.start
        self.result["claims"] = check_claims(self.result["runs"], self.result["exact_checks"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.config.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(self.result), indent=1))
        os.replace(tmp, path)
        return path

    def skip(self, model: str, frames: int | None, variant: str, reason: str) -> None:
        self.result["skipped"].append({"model": model, "frames": frames, "variant": variant, "reason": reason})
        log(f"  skip {model} S={frames} {variant}: {reason}")

    # ------------------------------------------------------------------ planning
    def frames_for(self, spec: ModelSpec) -> tuple[int, ...]:
        return tuple(self.config.frames) if self.config.frames else spec.frames

    def plan(self, frames: tuple[int, ...]) -> list[tuple[int, str]]:
        wanted = [(s, v) for s in frames for v in self.config.variants]
        first = [p for p in PRIORITY_RUNS if p in wanted]
        return first + [p for p in wanted if p not in first]

    def is_compiled(self, variant: str, students: Students | None) -> bool:
        if variant == "dense_compiled":
            return True  # Dynamo traces it whatever the backend
        if variant.startswith("student_") and students is not None:
            module = students.timed.get(variant)
            return module is not None and getattr(module, "lite3r_backend", "eager") != "eager"
        return False

    def estimate_s(self, model: str, frames: int, variant: str, compiled: bool) -> float:
        """Seconds the run will take, from the finished runs of this model."""
        done = [r for r in self.result["runs"] if r["model"] == model and "latency_ms" in r]
        compile_guess = max([r["compile_s"] for r in done if r.get("compiled")], default=self.config.compile_estimate_s)
        same = [r for r in done if r["variant"] == variant]
        at_frames = [r for r in done if r["frames"] == frames]
        if same:
            ref = min(same, key=lambda r: abs(math.log(r["frames"] / frames)))
            latency_s = ref["latency_ms"] / 1e3 * max(0.1, frames / ref["frames"]) ** 1.5
            compile_s = ref["compile_s"]
        elif at_frames:
            latency_s = max(r["latency_ms"] for r in at_frames) / 1e3
            compile_s = compile_guess if compiled else 0.0
        elif done:
            ref = max(done, key=lambda r: r["latency_ms"])
            latency_s = ref["latency_ms"] / 1e3 * max(0.1, frames / ref["frames"]) ** 1.5
            compile_s = compile_guess if compiled else 0.0
        else:
            return (self.config.compile_estimate_s if compiled else 0.0) + 10.0
        iters = max(self.config.min_iters, min(self.config.max_iters, math.ceil(self.config.target_s / max(latency_s, 1e-6))))
        # warm-up, timed calls, reference, profiled call, and eager twin (slower) for students
        return compile_s + latency_s * (iters + 6)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        raised = self.result["meta"]["dynamo_limits"]
        try:
            for knob, value in raised.items():
                setattr(torch._dynamo.config, knob, value)
            return self._run()
        finally:
            for knob, value in self.dynamo_limits.items():
                setattr(torch._dynamo.config, knob, value)

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        log(f"lite3r bench: models {list(cfg.models)}, variants {list(cfg.variants)}, budget {cfg.time_budget_s:.0f} s, "
            f"device {self.device}")
        for model in cfg.models:
            spec = model_spec(model)
            if cfg.image_size:
                spec = dataclasses.replace(spec, image_size=cfg.image_size)
            frames = self.frames_for(spec)
            if self.left_s() < cfg.min_model_s:
                for s, v in self.plan(frames):
                    self.skip(model, s, v, f"time budget: {self.left_s():.0f} s left, a model needs >= {cfg.min_model_s:.0f} s")
                self.save()
                continue
            try:
                self.run_model(model, spec, frames)
            except Exception as err:  # a model that cannot be built fails alone; its runs say why
                reason = "".join(traceback.format_exception_only(type(err), err)).strip()
                log(f"  {model} failed: {reason}")
                self.result["models"].setdefault(model, {})["error"] = reason
                attempted = {(r["model"], r["frames"], r["variant"]) for r in self.result["runs"] + self.result["skipped"]}
                for s, v in self.plan(frames):
                    if (model, s, v) not in attempted:
                        self.skip(model, s, v, f"model failed: {reason[:300]}")
            release_memory(self.device)
            self.save()
        path = self.save()
        if cfg.plot:
            from lite3r_compile.bench.plot import plot_results

            self.result["plot"] = plot_results(self.result, self.out_dir / f"{cfg.name}.png")
            path = self.save()
        log(summary_text(self.result))
        log(f"results: {path}")
        return self.result

    def run_model(self, model: str, spec: ModelSpec, frames: tuple[int, ...]) -> None:
        cfg = self.config
        log(f"== {model}: frames {list(frames)}, {spec.image_size}x{spec.image_size}")
        t0 = time.perf_counter()
        teacher = build_model(spec, self.device, seed=cfg.seed, dtype=getattr(torch, cfg.dtype))
        info: dict[str, Any] = {
            "preset": spec.preset, "image_size": spec.image_size, "heads": list(spec.heads),
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "weight_bytes": weight_bytes([teacher]), "build_s": time.perf_counter() - t0,
        }
        self.result["models"][model] = info
        names = [v for v in cfg.variants if v in STUDENT_VARIANTS]
        if cfg.exact_check:
            names.append(EXACT_STUDENT)
        students = None
        if names:
            example = (make_images(spec, 2, self.device, seed=cfg.seed),)
            try:
                students = build_students(teacher, names, cfg.students, example, references=cfg.correctness,
                                          dense_heads=spec.dense_heads)
                info["students_build_s"] = students.build_s
                info["lite_warnings"] = students.warnings
                log(f"  lite(): {len(names)} students in {students.build_s:.1f} s")
            except Exception as err:
                info["students_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
                log(f"  lite() failed: {info['students_error']}")
        self.save()

        for s, variant in self.plan(frames):
            if variant in STUDENT_VARIANTS and students is None:
                self.skip(model, s, variant, "lite() failed: " + info.get("students_error", "no students"))
                continue
            kept = self.previous_runs.get((model, s, variant))
            if kept is not None:
                self.result["runs"].append(kept)
                log(f"  {model} S={s} {variant}: {kept['latency_ms']:.2f} ms (kept from {kept['resumed_from']})")
                continue
            compiled = self.is_compiled(variant, students)
            need = self.estimate_s(model, s, variant, compiled)
            if need > self.left_s():
                self.skip(model, s, variant, f"time budget: needs ~{need:.0f} s, {max(0.0, self.left_s()):.0f} s left")
                continue
            record = self.run_variant(model, spec, s, variant, teacher, students)
            self.result["runs"].append(record)
            self.save()

        if cfg.exact_check and model in self.previous_exact:
            self.result["exact_checks"].append(self.previous_exact[model])
        elif cfg.exact_check and students is not None:
            self.exact_check(model, spec, min(frames), teacher, students)
        elif cfg.exact_check:
            entry = {"model": model, "frames": min(frames), "threshold": EXACT_ERROR_MAX,
                     "skipped": "lite() failed: " + info.get("students_error", "no students")}
            self.result["exact_checks"].append(entry)
        del teacher, students
        torch._dynamo.reset()

    def run_variant(self, model: str, spec: ModelSpec, frames: int, variant: str, teacher, students) -> dict[str, Any]:
        cfg = self.config
        torch._dynamo.reset()
        release_memory(self.device)
        record: dict[str, Any] = {"model": model, "frames": frames, "variant": variant}
        started = time.perf_counter()
        try:
            images = make_images(spec, frames, self.device, seed=cfg.seed)
            if variant == "dense_eager":
                module = teacher
            elif variant == "dense_compiled":
                module = compile_dense(teacher, cfg.compile_backend, regional=cfg.students.regional_compile,
                                       cuda_graphs=cfg.students.cuda_graphs,
                                       multi_kernel=cfg.students.inductor_multi_kernel)
            else:
                module = students.timed[variant]

            def call():
                return module(images)

            with warnings.catch_warnings(record=True) as caught, torch.no_grad(), CompileWatch() as watch:
                warnings.simplefilter("always")
                timing = time_forward(call, self.device, target_s=cfg.target_s, min_iters=cfg.min_iters,
                                      max_iters=cfg.max_iters, after_warmup=watch.mark_warm)
            messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            backend = backend_info(module, watch, messages)
            own_bytes = weight_bytes(resident_modules(module if variant != "dense_compiled" else teacher))
            record.update({
                "latency_ms": timing.latency_ms, "samples_ms": timing.samples_ms, "first_call_s": timing.first_call_s,
                "compile_s": timing.compile_s if backend["compiled"] else 0.0, "compiled": backend["compiled"],
                "weight_bytes": own_bytes, "working_bytes": timing.working_bytes,
                "peak_bytes": None if timing.working_bytes is None else timing.working_bytes + own_bytes,
                "allocated_before_bytes": timing.allocated_before_bytes,
                "max_allocated_bytes": timing.max_allocated_bytes,
                "graph_pool_free_bytes": timing.graph_pool_free_bytes, "backend": backend,
            })
            outputs = {k: v.detach().to("cpu") for k, v in output_tensors(timing.output, spec.passthrough_outputs).items()}
            del timing
            log(f"  {model} S={frames} {variant}: {record['latency_ms']:.2f} ms, "
                f"first call {record['first_call_s']:.1f} s, ran {backend['ran']}"
                + (f", peak {record['peak_bytes'] / 2**30:.2f} GiB" if record["peak_bytes"] else ""))
            if backend["frames_compiled_while_timed"]:
                log(f"  WARNING {model} S={frames} {variant}: Dynamo compiled {backend['frames_compiled_while_timed']} "
                    "frame(s) during the timed calls (a guard fails on every call): the latency includes compile work")
            if backend["cudagraph_skips"]:
                log(f"  WARNING {model} S={frames} {variant}: Inductor did not record {backend['cudagraph_skips']} "
                    "graph(s) as CUDA graphs (TORCH_LOGS=cudagraphs says why)")

            if variant == "dense_eager":
                self.teacher_outputs[(model, frames)] = outputs
            elif (model, frames) in self.teacher_outputs:
                errors = relative_errors(outputs, self.teacher_outputs[(model, frames)])
                record["error_vs_dense_eager"] = {"per_key": errors, "max": worst(errors)}
            if variant in STUDENT_VARIANTS and cfg.correctness:
                twin = students.references[variant]
                if twin is module:  # the student is its own eager reference (student backend "eager")
                    reference = outputs
                else:
                    with torch.no_grad():
                        reference = output_tensors(twin(images), spec.passthrough_outputs)
                errors = relative_errors(outputs, reference)
                record["error_vs_eager_student"] = {"per_key": errors, "max": worst(errors),
                                                    "threshold": STUDENT_ERROR_MAX,
                                                    "reference_is_same_module": twin is module}
                del reference
            if frames in cfg.breakdown_frames or variant == "student_fp8_only":
                with torch.no_grad():
                    events = bd.trace_events(call, self.device)
                record["breakdown"] = bd.breakdown(events, self.device)
                record["top_kernels"] = bd.top_kernels(events, self.device)
                del events
            if variant == "student_fp8_only" and cfg.gemm:
                record["linear_vs_gemm"] = self.linear_vs_gemm(spec, frames, teacher, module, images, record)
        except Exception as err:
            record["error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
            log(f"  {model} S={frames} {variant} failed: {record['error']}")
            log(traceback.format_exc(limit=-12))  # the log keeps where it failed; the JSON, what
        record["wall_s"] = time.perf_counter() - started
        release_memory(self.device)
        return record

    def linear_vs_gemm(self, spec: ModelSpec, frames: int, teacher, student, images, record) -> dict[str, Any]:
        """The backbone's Linear + quantization time of the FP8-only student against the GEMM
        rates of its own shapes (FP8 layers at ``_scaled_mm``'s rate, the others at bf16's)."""
        with torch.no_grad():
            calls = gemm.linear_calls(teacher, lambda: teacher(images))
        shapes = gemm.shapes_of(calls, spec.heads)
        rates = gemm.gemm_rates(shapes, self.device)
        decisions = student.lite3r_record.passes.artifacts.get("fp8_layers", [])
        fp8_paths = {d.path for d in decisions if d.quantized}
        expected = gemm.expected_linear_ms(calls, fp8_paths, rates, spec.heads)
        out: dict[str, Any] = {"rates": rates, "expected": expected}
        parts = record.get("breakdown")
        if parts is not None:
            measured = parts["linear"] + parts["quantization"]
            out["measured_linear_ms"] = parts["linear"]
            out["measured_quantization_ms"] = parts["quantization"]
            if expected["fp8_student_ms"] is not None and measured > 0:
                out["efficiency"] = expected["fp8_student_ms"] / measured
        return out

    def exact_check(self, model: str, spec: ModelSpec, frames: int, teacher, students: Students) -> None:
        """topk=1, FP8 off, compiled student against the dense eager teacher at ``frames``."""
        student = students.timed[EXACT_STUDENT]
        compiled = getattr(student, "lite3r_backend", "eager") != "eager"
        need = self.estimate_s(model, frames, EXACT_STUDENT, compiled)
        entry: dict[str, Any] = {"model": model, "frames": frames, "threshold": EXACT_ERROR_MAX}
        if need > self.left_s():
            entry["skipped"] = f"time budget: needs ~{need:.0f} s, {max(0.0, self.left_s()):.0f} s left"
            self.skip(model, frames, EXACT_STUDENT, entry["skipped"])
            self.result["exact_checks"].append(entry)
            return
        torch._dynamo.reset()
        release_memory(self.device)
        started = time.perf_counter()
        try:
            images = make_images(spec, frames, self.device, seed=self.config.seed)
            with torch.no_grad():
                reference = self.teacher_outputs.get((model, frames))
                if reference is None:
                    reference = output_tensors(teacher(images), spec.passthrough_outputs)
                with warnings.catch_warnings(record=True) as caught, CompileWatch() as watch:
                    warnings.simplefilter("always")
                    out = output_tensors(student(images), spec.passthrough_outputs)
                messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            errors = relative_errors(out, reference)
            entry.update({"per_key": errors, "max": worst(errors), "backend": backend_info(student, watch, messages)})
            log(f"  {model} S={frames} exact student vs teacher: max rel err {entry['max']:.2e}")
        except Exception as err:
            entry["error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
            log(f"  {model} exact check failed: {entry['error']}")
        entry["wall_s"] = time.perf_counter() - started
        self.result["exact_checks"].append(entry)
        self.save()


def summary_text(result: dict[str, Any]) -> str:
    """The short tables printed last: latency / memory / speedups per run, the breakdowns, the
    claims."""
    lines = []
    runs = [r for r in result["runs"] if "latency_ms" in r]
    base = {(r["model"], r["frames"], r["variant"]): r["latency_ms"] for r in runs}
    lines.append(f"{'model':<10} {'S':>3} {'variant':<17} {'ms':>9} {'xEager':>6} {'xComp':>6} {'peakGiB':>7} "
                 f"{'compile':>7} {'err':>8}  ran")
    for r in runs:
        eager = base.get((r["model"], r["frames"], "dense_eager"))
        comp = base.get((r["model"], r["frames"], "dense_compiled"))
        err = (r.get("error_vs_eager_student") or r.get("error_vs_dense_eager") or {}).get("max")
        lines.append(
            f"{r['model']:<10} {r['frames']:>3} {r['variant']:<17} {r['latency_ms']:>9.2f} "
            f"{(eager / r['latency_ms']) if eager else float('nan'):>6.2f} {(comp / r['latency_ms']) if comp else float('nan'):>6.2f} "
            f"{(r['peak_bytes'] or 0) / 2**30:>7.2f} {r['compile_s']:>7.1f} {err if err is not None else float('nan'):>8.1e}  "
            f"{r['backend']['ran']}")
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"FAILED {r['model']} S={r['frames']} {r['variant']}: {r['error'][:200]}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['model']} S={s['frames']} {s['variant']}: {s['reason']}")
    with_bd = [r for r in runs if "breakdown" in r]
    if with_bd:
        cols = list(bd.CATEGORIES) + ["heads"]
        lines.append("breakdown (ms busy): " + " ".join(f"{c[:9]:>9}" for c in cols) + f" {'idle':>8}")
        for r in with_bd:
            b = r["breakdown"]
            lines.append(f"  {r['model'][:10]:<10} {r['frames']:>3} {r['variant'][:17]:<17}"
                         + " ".join(f"{b[c]:>9.2f}" for c in cols) + f" {max(0.0, b['span_ms'] - b['busy_ms']):>8.2f}")
    for e in result["exact_checks"]:
        lines.append(f"exact {e['model']} S={e['frames']}: " + (f"max rel err {e['max']:.2e}" if "max" in e else
                                                              e.get("skipped") or e.get("error", "")))
    for c in result["claims"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["passed"]]
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        note = ""
        if "worst_output" in c:
            note = f"; worst: {c['worst_output']}"
            if "floor" in c:
                note += f", where dense compiled vs eager is {c['floor']:.2g}"
        lines.append(f"[{mark}] {c['model']} S={c['frames']} {c['claim']}: {value} (target {c['target']}{note})")
    return "\n".join(lines)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark of ``config``; returns the result dict (also written as JSON)."""
    return Benchmark(config).run()
