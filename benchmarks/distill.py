"""Distillation benchmark: the Lite3R recipe (train only the SLA projections of an FP8 fake-quant
student) against full fine-tuning of the same student, on synthetic multi-view scenes.

For each mode the same teacher (a zoo preset with a bf16 backbone and float32 heads, random
weights, as in the end-to-end benchmark) and the same ``lite()`` student (SLA at ``--topk`` on
the ``--sla-scopes`` sites, global attention by default as in the end-to-end benchmark, FP8
fake-quant) run ``lite3r_compile.distill`` with bf16 autocast:

- ``sla``: what ``lite()`` leaves trainable, the ``proj_l`` weights and biases;
- ``all``: every parameter of the student (float32 master weights, AdamW state for all of them).

Reported per mode: median step time after ``--warmup`` steps (wall clock; the trainer reads the
loss every step, so each step ends synchronised), scenes/s, peak GPU memory over the run (weights
included; ``torch.cuda.max_memory_allocated``), trainable parameters, optimizer state, and the
loss curve. JSON and PNG under ``--out``.

    python benchmarks/distill.py --model vggt-1b --frames 8 --steps 200 --full-steps 30 --out $OUT

``--full-steps`` may be shorter than ``--steps``: step time and memory are steady after the first
few steps; the JSON records how many steps each mode ran. With ``--time-budget-s`` a mode stops
early when its share of the budget (in proportion to its steps) is spent.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def run_mode(mode: str, args: argparse.Namespace, device: torch.device, deadline: float) -> dict[str, Any]:
    from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
    from lite3r_compile.bench.models import build_model, model_spec
    from lite3r_compile.distill.synthetic import RenderedScenes, SyntheticSceneConfig
    from lite3r_compile.distill.trainer import DistillConfig, distill

    spec = model_spec(args.model)
    side = args.image_size or spec.image_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    teacher = build_model(spec, device, seed=args.seed)
    config = LiteConfig(sla=SLAConfig(topk=args.topk), fp8=FP8Config(enabled=not args.no_fp8),
                        sla_scopes=tuple(args.sla_scopes))
    example = torch.rand(1, args.frames, 3, side, side, device=device, dtype=torch.bfloat16)
    student = lite(teacher, backend="eager", config=config, example_inputs=(example,))
    build_s = time.perf_counter() - t_build
    print(f"{mode}: teacher built and lite() done in {build_s:.1f} s", flush=True)
    t_data = time.perf_counter()
    data = RenderedScenes(args.scenes, SyntheticSceneConfig(num_views=args.frames, height=side, width=side),
                          seed=args.seed, processes=args.workers)
    print(f"{mode}: {len(data)} scenes rendered in {time.perf_counter() - t_data:.1f} s", flush=True)
    steps = args.steps if mode == "sla" else args.full_steps
    marks: list[float] = [time.perf_counter()]

    def on_step(step: int, loss: float) -> bool:
        marks.append(time.perf_counter())
        if step <= 3 or step % 25 == 0:
            print(f"{mode}: step {step} loss {loss:.4g} ({marks[-1] - marks[-2]:.2f} s)", flush=True)
        # out of time: stop here (the record says how many steps ran) rather than lose the run
        return marks[-1] > deadline

    result = distill(
        teacher, student, data, steps=steps, on_step=on_step, progress=False,
        config=DistillConfig(lr=args.lr if mode == "sla" else args.full_lr, warmup_steps=min(10, steps // 5), num_views=args.frames,
                             num_workers=0, trainable=mode, seed=args.seed,
                             activation_checkpointing=args.activation_checkpointing),
    )
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    steady = step_s[args.warmup:] or step_s
    median = statistics.median(steady)
    record = {
        "mode": mode, "steps": result.step, "steps_asked": steps, "stopped_by_time_budget": result.interrupted,
        "build_and_lite_s": build_s,
        "median_step_s": median, "mean_step_s": statistics.fmean(steady),
        "first_step_s": step_s[0] if step_s else None,
        "scenes_per_s": 1.0 / median,
        "peak_bytes": result.peak_memory_bytes,
        "trainable_params": result.trainable_params,
        "trainable_bytes": result.trainable_bytes,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "losses": result.losses,
        "attention_losses": result.attention_losses,
        "output_losses": result.output_losses,
        "attention_sites": len(result.attention_sites), "scenes": len(data),
    }
    del teacher, student, result, data
    gc.collect()
    return record


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plot"] = {"skipped": "matplotlib is not installed"}
        return
    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in runs:
        axes[0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['mode']} (total)")
        axes[0].plot(range(1, len(r["attention_losses"]) + 1), r["attention_losses"], "--",
                     label=f"{r['mode']} (attention)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    names = [r["mode"] for r in runs]
    axes[1].bar(names, [r["median_step_s"] * 1e3 for r in runs])
    axes[1].set_ylabel("median step time (ms)")
    axes[2].bar(names, [(r["peak_bytes"] or 0) / 2**30 for r in runs])
    axes[2].set_ylabel("peak memory (GiB, weights included)")
    meta = result["meta"]
    fig.suptitle(f"distill {meta['model']} S={meta['frames']} topk={meta['topk']} on {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    result["plot"] = {"path": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b", help="a model of lite3r_compile.bench.models.MODELS")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's (518 for VGGT)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the SLA-only (Lite3R) run")
    parser.add_argument("--full-steps", type=int, default=30, help="steps of the full fine-tuning run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    parser.add_argument("--modes", nargs="+", choices=("sla", "all"), default=["sla", "all"])
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--sla-scopes", nargs="*", default=["global"],
                        help="attention scopes that get SLA (default: global, as in benchmarks/e2e.py)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the SLA projections")
    parser.add_argument("--full-lr", type=float, default=1e-5,
                        help="learning rate of full fine-tuning (1e-3 moves a pretrained backbone far off)")
    parser.add_argument("--scenes", type=int, default=16, help="synthetic scenes, rendered up front and cycled")
    parser.add_argument("--workers", type=int, default=8, help="processes that render the scenes")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--time-budget-s", type=float, default=0.0,
                        help="stop each mode's training when its share of this budget is spent (0: no limit)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = "distill" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "frames": args.frames, "topk": args.topk, "fp8": not args.no_fp8,
        "sla_scopes": args.sla_scopes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "command": " ".join(["python", "benchmarks/distill.py", *sys.argv[1:]]),
    }
    result: dict[str, Any] = {"meta": meta, "runs": []}
    start = time.perf_counter()
    for i, mode in enumerate(args.modes):
        # each mode may use what is left of the budget in proportion to the steps it asks for
        left = args.time_budget_s - (time.perf_counter() - start)
        asked = [args.steps if m == "sla" else args.full_steps for m in args.modes[i:]]
        deadline = time.perf_counter() + left * asked[0] / sum(asked) if args.time_budget_s else float("inf")
        record = run_mode(mode, args, device, deadline)
        result["runs"].append(record)
        print(f"{mode}: {record['steps']} steps, median {record['median_step_s'] * 1e3:.1f} ms/step, "
              f"peak {(record['peak_bytes'] or 0) / 2**30:.2f} GiB, {record['trainable_params']:,} trainable, "
              f"loss {record['losses'][0]:.4g} -> {record['losses'][-1]:.4g}", flush=True)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    by_mode = {r["mode"]: r for r in result["runs"]}
    if {"sla", "all"} <= by_mode.keys():
        sla, full = by_mode["sla"], by_mode["all"]
        result["sla_vs_full"] = {
            "step_time_ratio": full["median_step_s"] / sla["median_step_s"],
            "peak_memory_ratio": (full["peak_bytes"] or 0) / max(1, sla["peak_bytes"] or 0),
            "trainable_ratio": full["trainable_params"] / max(1, sla["trainable_params"]),
            "optimizer_state_ratio": full["optimizer_state_bytes"] / max(1, sla["optimizer_state_bytes"]),
        }
    plot(result, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{'mode':<6}{'steps':>7}{'ms/step':>10}{'scenes/s':>10}{'peak GiB':>10}{'trainable':>15}{'optim MiB':>12}")
    for r in result["runs"]:
        print(f"{r['mode']:<6}{r['steps']:>7}{r['median_step_s'] * 1e3:>10.1f}{r['scenes_per_s']:>10.2f}"
              f"{(r['peak_bytes'] or 0) / 2**30:>10.2f}{r['trainable_params']:>15,}{r['optimizer_state_bytes'] / 2**20:>12.3f}")
    if "sla_vs_full" in result:
        print("full fine-tuning / Lite3R:", {k: round(v, 2) for k, v in result["sla_vs_full"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
