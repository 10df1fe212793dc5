"""Quality study: what the Lite3R pipeline costs in reconstruction quality, component by component.

On held-out synthetic scenes (seeds from ``train_teacher.HELDOUT_SEED``), against ground truth and
against the dense teacher trained by ``benchmarks/train_teacher.py``:

- ``teacher``: the dense model;
- ``fp8``: FP8 fake-quant only (SLA off). Nothing trains in such a student (Lite3R trains only the
  SLA projections), so it has no distilled form;
- ``sla@topk``, ``sla+fp8@topk`` (Lite3R; SLA at the ``--sla-scopes`` sites, global attention by
  default): each without distillation (``proj_l`` at its zero
  initialisation: block-sparse attention) and distilled for ``--steps`` steps with
  :func:`lite3r_compile.distill` (partial attention distillation at the global sites + outputs);
- ``bf16 dense heads``: the teacher with its depth and point heads in bfloat16
  (``LiteConfig.bf16_heads``, evaluated in the deployed form, where that option acts), the same
  with the camera head too, and the main configuration distilled with the dense heads in
  bfloat16: what the heads' precision costs;
- ``--full-finetune``: the main configuration with every parameter trained (the baseline the
  projections-only recipe is measured against), at ``--full-lr``;
- FP8 sensitivity: ``sla+fp8@0.1`` distilled, with the ``--keep`` most FP8-sensitive blocks in
  high precision (``FP8Config.keep_high_precision``) against the same number of the *least*
  sensitive blocks kept (same speed: the same number of FP8 layers), and the sensitivity of every
  block (a plot by block and scope);
- drift: the relative change of each site's ``proj_l`` between logged steps of the main run
  and, with ``--long-steps``, of the same configuration distilled that many steps (what a longer
  schedule does).

Metrics: depth AbsRel and delta<1.25 (median-aligned), point Chamfer, pose AUC@30. Latency and peak
memory (CUDA only) per configuration at ``--latency-frames`` (distillation changes weights, not
speed, so one figure per configuration), through ``--latency-backend``, each student compiled
block by block with CUDA graphs as ``benchmarks/e2e.py`` compiles its students; the teacher runs
eagerly (dense eager, the end-to-end benchmark's baseline) and, in a speed-only row, compiled as
the students are (dense compiled).

Writes ``quality.json``, ``quality.md`` (the table) and ``quality.png`` / ``quality_sensitivity.png``
/ ``quality_drift.png`` under ``--out``.

    python benchmarks/quality.py --out benchmarks/results            # GPU, the trained teacher
    python benchmarks/quality.py --tiny --out /tmp/q                  # CPU smoke run

The committed study (``benchmarks/results/quality_cpu/``, 31 minutes on 2 CPU cores; 32x32 SLA
blocks, so that the 552 global tokens of the 112x112 teacher make 18 key blocks)::

    python benchmarks/quality.py --device cpu --block-q 32 --block-k 32 --steps 200 --long-steps 800 \
        --train-scenes 64 --eval-scenes 32 --workers 2 --keep 2 --out benchmarks/results/quality_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
import tempfile
import time
import warnings
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
from lite3r_compile.backends.deploy import deploy
from lite3r_compile.bench.variants import special_token_rows
from lite3r_compile.distill.evaluate import evaluate
from lite3r_compile.distill.synthetic import RenderedScenes
from lite3r_compile.distill.trainer import DistillConfig, distill
from lite3r_compile.sensitivity import block_globs, fp8_sensitivity

HERE = Path(__file__).resolve().parent
METRICS = ("depth_abs_rel", "depth_delta_1.25", "points_chamfer", "camera_auc@30")
# the teacher's heads that predict per-pixel maps: the ones worth running in bfloat16
DENSE_HEADS = ("depth_head", "point_head")


def _train_teacher_module():
    spec = importlib.util.spec_from_file_location("lite3r_benchmark_train_teacher", HERE / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Variant:
    """One student: its ``lite()`` config, whether it is distilled, and the configuration its speed
    is measured under (``speed_key``: variants that differ only in training share it)."""

    name: str
    config: LiteConfig | None  # None: the teacher itself
    distilled: bool
    speed_key: str
    steps: int = 0  # distillation steps; 0: --steps
    log_drift: bool = False  # log its projections every step (the main run and the long run)
    trainable: str = "sla"  # DistillConfig.trainable: "all" is full fine-tuning (the baseline)
    deployed: bool = False  # evaluate the deployed form (what LiteConfig.bf16_heads changes), not the eager student


def main_variant_name(topk: float) -> str:
    return f"sla+fp8@{topk}+distill"


def variants(topks: list[float], keep: int, sensitivity: list, main_topk: float,
             scopes: tuple[str, ...], blocks: tuple[int, int] = (SLAConfig.block_q, SLAConfig.block_k),
             long_steps: int = 0, full_finetune: bool = False,
             dense_rows: tuple[int, int] | None = None) -> list[Variant]:
    no_fp8 = FP8Config(enabled=False)

    def sla_at(topk: float) -> SLAConfig:
        return SLAConfig(topk=topk, block_q=blocks[0], block_k=blocks[1], dense_rows=dense_rows)

    out = [Variant("teacher", None, False, "teacher"),
           Variant("fp8", LiteConfig(sla_scopes=(), fp8=FP8Config()), False, "fp8")]
    for topk in topks:
        sla = sla_at(topk)
        for name, fp8 in ((f"sla@{topk}", no_fp8), (f"sla+fp8@{topk}", FP8Config())):
            config = LiteConfig(sla=sla, fp8=fp8, sla_scopes=scopes)
            out.append(Variant(name, config, False, name))
            out.append(Variant(name + "+distill", config, True, name,
                               log_drift=name + "+distill" == main_variant_name(main_topk)))
    if keep and sensitivity:
        sla = sla_at(main_topk)
        least = sorted(sensitivity, key=lambda b: b.relative_change)[:keep]
        out.append(Variant(f"sla+fp8@{main_topk}+distill, {keep} most sensitive blocks high precision",
                           LiteConfig(sla=sla, fp8=FP8Config(keep_high_precision=keep), sla_scopes=scopes), True, f"keep{keep}"))
        out.append(Variant(f"sla+fp8@{main_topk}+distill, {keep} least sensitive blocks high precision",
                           LiteConfig(sla=sla, fp8=FP8Config(exclude=block_globs(least)), sla_scopes=scopes), True, f"keep{keep}"))
    sla = sla_at(main_topk)
    out.append(Variant("bf16 dense heads", LiteConfig(sla_scopes=(), fp8=no_fp8, bf16_heads=DENSE_HEADS), False,
                       "bf16 dense heads", deployed=True))
    out.append(Variant("bf16 heads, camera head too", LiteConfig(sla_scopes=(), fp8=no_fp8, bf16_heads=("*",)), False,
                       "bf16 heads", deployed=True))
    out.append(Variant(f"{main_variant_name(main_topk)}, bf16 dense heads",
                       LiteConfig(sla=sla, fp8=FP8Config(), sla_scopes=scopes, bf16_heads=DENSE_HEADS), True,
                       f"sla+fp8@{main_topk}, bf16 dense heads", deployed=True))
    if long_steps:
        sla = sla_at(main_topk)
        out.append(Variant(f"{main_variant_name(main_topk)}, {long_steps} steps",
                           LiteConfig(sla=sla, fp8=FP8Config(), sla_scopes=scopes), True,
                           f"sla+fp8@{main_topk}", steps=long_steps, log_drift=True))
    if full_finetune:
        sla = sla_at(main_topk)
        out.append(Variant(f"sla+fp8@{main_topk}+full fine-tuning", LiteConfig(sla=sla, fp8=FP8Config(), sla_scopes=scopes),
                           True, f"sla+fp8@{main_topk}", trainable="all"))
    return out


def build_student(teacher: nn.Module, variant: Variant, example: torch.Tensor, data, args, log_file: Path | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8 emulation on a CPU warns once per student
        student = lite(teacher, backend="eager", config=variant.config, example_inputs=(example,))
    record: dict[str, Any] = {}
    if variant.distilled:
        steps = variant.steps or args.steps
        full = variant.trainable == "all"
        result = distill(teacher, student, data, steps=steps, progress=False, log_file=log_file,
                         config=DistillConfig(lr=args.full_lr if full else args.lr, warmup_steps=max(1, steps // 10),
                                              num_views=args.views, autocast=example.is_cuda, seed=args.seed,
                                              trainable=variant.trainable))
        record = {"steps": steps, "losses": result.losses, "attention_losses": result.attention_losses,
                  "seconds_per_step": result.seconds_per_step}
    if variant.deployed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FP8 emulation on a CPU
            return deploy(student.eval(), "fp8", compile=False), record
    return student.eval(), record


def measure_speed(model: nn.Module, frames: int, size: int, device: torch.device) -> dict[str, float]:
    from lite3r_compile.bench.timing import release_memory, time_forward

    images = torch.rand(1, frames, 3, size, size, device=device)
    release_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        timing = time_forward(lambda: model(images), device, target_s=1.0)
    return {"latency_ms": timing.latency_ms, "peak_bytes": timing.max_allocated_bytes}


def measure_speeds(model: nn.Module, frames: list[int], size: int, device: torch.device) -> dict[str, dict]:
    """:func:`measure_speed` at each frame count, compiled from an empty Dynamo cache and left
    empty: every student's heads share the head's cache entries, and past the recompile limit a
    head would run eagerly with only a warning (session 10's first GPU table: sla+fp8 16.4 ms
    against 3.4); here a limit hit is an error."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return {str(s): measure_speed(model, s, size, device) for s in frames}
    finally:
        torch._dynamo.reset()


def _cell(values: dict[str, float], metric: str) -> str:
    return f"{values[metric]:.4f}" if metric in values else "-"


def markdown(rows: list[dict[str, Any]], frames: list[int]) -> str:
    head = ["variant"] + [f"{m} (gt)" for m in METRICS] + [f"{m} (vs teacher)" for m in ("depth_abs_rel", "camera_auc@30")]
    head += [f"S={s} ms / GiB" for s in frames]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"]]
        cells += [_cell(r["vs_gt"], m) for m in METRICS]
        cells += [_cell(r["vs_teacher"], m) for m in ("depth_abs_rel", "camera_auc@30")]
        for s in frames:
            speed = r.get("speed", {}).get(str(s))
            cells.append("-" if not speed else f"{speed['latency_ms']:.1f} / {speed['peak_bytes'] / 2**30:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plots"] = "skipped: matplotlib is not installed"
        return
    rows = [r for r in result["rows"] if r["vs_gt"]]  # not the speed-only row
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 6))
    for ax, metric in zip(axes, METRICS):
        ax.barh([r["variant"] for r in rows], [r["vs_gt"].get(metric, 0.0) for r in rows])
        ax.set_title(f"{metric} (vs ground truth)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)

    sens = result["sensitivity"]
    if sens:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sens)), 4))
        colors = {"frame": "tab:blue", "global": "tab:orange"}
        ax.bar(range(len(sens)), [b["relative_change"] for b in sens],
               color=[colors.get(b["scope"], "tab:gray") for b in sens])
        ax.set_xticks(range(len(sens)), [b["block"].split(".", 1)[-1] for b in sens], rotation=90, fontsize=7)
        ax.set_ylabel("relative output change, block alone in FP8")
        ax.set_title("FP8 sensitivity by block (blue: frame, orange: global)")
        fig.tight_layout()
        fig.savefig(out / "quality_sensitivity.png", dpi=100)

    runs = result["drift"]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4), squeeze=False)
        for ax, (name, drift) in zip(axes[0], runs.items()):
            for site in drift[0]["proj_l_drift"]:
                ax.plot([d["step"] for d in drift[1:]], [d["proj_l_drift"][site] for d in drift[1:]], lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("||W_t - W_prev|| / ||W_t|| of proj_l")
            ax.set_title(f"drift of each site's projection\n{name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "quality_drift.png", dpi=100)
    result["plots"] = "written"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=None, help="default: benchmarks/assets/teacher_vggt_small.safetensors")
    parser.add_argument("--tiny", action="store_true", help="train a toy teacher for a few steps first (CPU smoke run)")
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--sla-scopes", nargs="*", default=["global"],
                        help="attention scopes that get SLA (default: global, as in benchmarks/e2e.py)")
    parser.add_argument("--block-q", type=int, default=SLAConfig.block_q,
                        help="SLA query block (default: SLAConfig's; small models need small blocks for "
                             "the topk sweep to mean anything: 0.05 and 0.2 of 5 key blocks are both 1)")
    parser.add_argument("--block-k", type=int, default=SLAConfig.block_k, help="SLA key block")
    parser.add_argument("--dense-special-rows", action="store_true",
                        help="every SLA student gives the teacher's camera and register tokens exact attention "
                             "(SLAConfig.dense_rows = (tokens per frame, patch_start_idx))")
    parser.add_argument("--main-topk", type=float, default=0.1, help="the topk of the sensitivity and drift runs")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per distilled variant")
    parser.add_argument("--long-steps", type=int, default=0,
                        help="also distill the main variant this many steps (what a longer schedule does; 0: off)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-finetune", action="store_true",
                        help="also fine-tune the whole main-variant student (the baseline the projections-only recipe "
                             "is measured against), at --full-lr")
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--only", nargs="*", default=None, metavar="GLOB",
                        help="run only the variants whose names match one of these globs (the teacher always runs)")
    parser.add_argument("--train-scenes", type=int, default=64)
    parser.add_argument("--eval-scenes", type=int, default=16)
    parser.add_argument("--keep", type=int, default=2, help="blocks kept high precision in the sensitivity rows (0: none)")
    parser.add_argument("--latency-frames", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--latency-backend", choices=("fp8", "inductor", "eager"), default="fp8")
    parser.add_argument("--workers", type=int, default=8, help="processes that render the scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new variant after this many seconds; the result lists those left out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="run nothing: redraw the PNGs of a quality.json into its folder")
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        plots(result, args.replot.parent)
        args.replot.write_text(json.dumps(result, indent=1))
        print(result["plots"])
        return 0
    device = torch.device(args.device)
    tt = _train_teacher_module()
    t_start = time.perf_counter()

    teacher_path = args.teacher
    if args.tiny:
        assets = Path(tempfile.mkdtemp(prefix="lite3r-quality-"))
        tt.main(["--tiny", "--max-steps", "3", "--batch-size", "2", "--assets", str(assets), "--device", "cpu"])
        teacher_path = assets / f"{tt.TEACHER_NAME}.safetensors"
    teacher_path = teacher_path or tt.ASSETS / f"{tt.TEACHER_NAME}.safetensors"
    if not teacher_path.exists():
        raise SystemExit(f"quality: no teacher at {teacher_path}; train one with `python benchmarks/train_teacher.py`")
    teacher, record = tt.load_teacher(teacher_path, device=device)
    sampling = tt.SceneSampling(**record["sampling"])
    args.views, size = sampling.views, sampling.image_size
    heldout = tt.heldout_batches(args.eval_scenes, sampling, workers=args.workers, device=device)
    data = RenderedScenes(args.train_scenes, sampling.scene_config(sampling.views),
                          seed=args.seed, processes=args.workers)
    example = heldout[0]["images"]

    # measured on the dense teacher (the students' FP8 layers are the teacher's Linears)
    sensitivity = fp8_sensitivity(teacher, (example,)) if args.keep else []
    if args.keep > len(sensitivity):
        args.keep = 0
    dense_rows = special_token_rows(teacher, example) if args.dense_special_rows else None
    main_name = main_variant_name(args.main_topk)
    rows, drift, speeds, left_out = [], {}, {}, []
    started = time.perf_counter()
    log_dir = Path(tempfile.mkdtemp(prefix="lite3r-quality-logs-"))
    for variant in variants(args.topk, args.keep, sensitivity, args.main_topk, tuple(args.sla_scopes),
                            (args.block_q, args.block_k), args.long_steps, args.full_finetune, dense_rows):
        if args.only is not None and variant.config is not None and not any(fnmatch(variant.name, g) for g in args.only):
            continue
        t0 = time.perf_counter()
        if args.time_budget_s is not None and t0 - started > args.time_budget_s:
            left_out.append(variant.name)
            print(f"{variant.name}: left out, past the {args.time_budget_s:.0f} s budget", flush=True)
            continue
        log_file = log_dir / f"{len(rows)}.jsonl" if variant.log_drift else None
        if variant.config is None:
            model, train_record = teacher, {}
        else:
            model, train_record = build_student(teacher, variant, example, data, args, log_file)
        scores = evaluate(model, teacher if variant.config is not None else None, heldout, device=device)
        row = {"variant": variant.name, "distilled": variant.distilled, "vs_gt": scores.get("student_vs_gt", {}),
               "vs_teacher": scores.get("student_vs_teacher", {}), **train_record}
        if device.type == "cuda" and args.latency_frames and variant.speed_key not in speeds:
            # speed from the deployed form of the same configuration (training changes weights only),
            # compiled as benchmarks/e2e.py compiles its students: block by block, CUDA graphs
            # (a whole-model compile took 115 s a configuration on an H200, session 9)
            timed = dataclasses.replace(variant.config, regional_compile=True, cuda_graphs=True) \
                if variant.config is not None else None
            deployed = teacher if timed is None else lite(
                teacher, backend=args.latency_backend, config=timed, example_inputs=(example,)).eval()
            speeds[variant.speed_key] = measure_speeds(deployed, args.latency_frames, size, device)
            del deployed
        row["speed"] = speeds.get(variant.speed_key, {})
        rows.append(row)
        if variant.config is None and device.type == "cuda" and args.latency_frames:
            # the dense teacher compiled as the students are, the baseline their speed-up is against
            from lite3r_compile.bench.variants import compile_dense

            compiled = compile_dense(teacher, "inductor", regional=True, cuda_graphs=True)
            rows.append({"variant": "teacher, compiled", "distilled": False, "vs_gt": {}, "vs_teacher": {},
                         "speed": measure_speeds(compiled, args.latency_frames, size, device)})
            del compiled
        if log_file is not None and log_file.exists():
            drift[variant.name] = [json.loads(line) for line in log_file.read_text().splitlines()]
        print(f"{variant.name}: {json.dumps({m: round(row['vs_gt'].get(m, float('nan')), 4) for m in METRICS})} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        del model

    result = {
        "command": shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher": str(teacher_path), "sla_dense_rows": dense_rows,
        "teacher_record": {k: record[k] for k in ("arch", "sampling", "steps") if k in record},
        "eval_scenes": args.eval_scenes, "steps": args.steps, "main_variant": main_name,
        "sla_blocks": [args.block_q, args.block_k], "sla_scopes": list(args.sla_scopes),
        "rows": rows, "sensitivity": [dataclasses.asdict(b) for b in sensitivity],
        "drift": {name: [{"step": d["step"], "proj_l_drift": d["proj_l_drift"], "proj_l_norm": d.get("proj_l_norm")}
                         for d in log] for name, log in drift.items()},
        "seconds": round(time.perf_counter() - t_start, 1), "left_out_for_time": left_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.latency_frames if device.type == "cuda" else [])
    (args.out / "quality.md").write_text(f"`{result['command']}` on {result['device']}\n\n" + table)
    plots(result, args.out)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
