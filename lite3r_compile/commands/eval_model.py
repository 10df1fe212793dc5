"""``lite3r eval``: depth, point and camera metrics of a student, against its teacher and ground truth."""

from __future__ import annotations

import argparse

from lite3r_compile.commands._common import add_data_arguments, add_model_arguments

HELP = "score a lite student against its teacher and the ground truth (depth, points, cameras)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--checkpoint-dir", default=None, help="a `lite3r distill` checkpoint to load into the student")
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
    from lite3r_compile.commands._common import build_data, build_model
    from lite3r_compile.distill import checkpoint as ckpt
    from lite3r_compile.distill.evaluate import evaluate

    teacher = build_model(args.model, args.weights, seed=args.seed, device=args.device)
    student = lite(teacher, backend="eager", config=LiteConfig(sla=SLAConfig(topk=args.topk), fp8=FP8Config(enabled=not args.no_fp8)))
    if args.checkpoint_dir:
        ckpt.load_trainable(student, ckpt.load(args.checkpoint_dir)["trainable"])
    # held-out scenes: seeds past the ones distillation draws from
    results = evaluate(student, teacher, build_data(args, seed_offset=1_000_000), device=args.device)
    table = Table(title=f"lite3r eval: {args.model}, {args.views} views")
    table.add_column("metric")
    groups = list(results)
    for g in groups:
        table.add_column(g, justify="right")
    for key in sorted({k for values in results.values() for k in values}):
        table.add_row(key, *(f"{results[g][key]:.4f}" if key in results[g] else "-" for g in groups))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
