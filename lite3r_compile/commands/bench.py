"""``lite3r bench``: the end-to-end benchmark of dense models against their lite students.

    lite3r bench --models vggt-1b da3-large --out benchmarks/results --time-budget-s 450
    lite3r bench --device cpu --models vggt-tiny --frames 1 2 --student-backend eager

See :mod:`lite3r_compile.bench` for what is measured and how.
"""

from __future__ import annotations

import argparse

HELP = "end-to-end latency / memory / breakdown benchmark: dense bf16 eager and compiled vs lite students"

_VARIANTS = ("dense_eager", "dense_compiled", "student_fp8_sla", "student_fp8_only", "student_sla_only")
_MODELS = ("vggt-1b", "da3-large", "vggt-tiny", "da3-tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["vggt-1b", "da3-large"], choices=_MODELS,
                        help="models to run, in order (default: vggt-1b da3-large)")
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="frame counts S (default per model: vggt-1b 8 32 1, da3-large 8 32, tiny 1 2)")
    parser.add_argument("--variants", nargs="+", default=list(_VARIANTS), choices=_VARIANTS,
                        help="variants to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder of the JSON and PNG")
    parser.add_argument("--name", default="e2e", help="file name stem of the results (default e2e)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny presets)")
    parser.add_argument("--time-budget-s", type=float, default=450.0,
                        help="wall-clock budget; runs that would not fit are skipped and reported (default 450)")
    parser.add_argument("--topk", type=float, default=0.1, help="SLA critical-block fraction (default 0.1)")
    parser.add_argument("--sla-scopes", nargs="+", default=["global"], choices=("frame", "global", "cross", "self"),
                        help="attention scopes that get SLA (default: global)")
    parser.add_argument("--bf16-dense-heads", action="store_true",
                        help="the timed students run the dense-prediction heads (VGGT's depth and point heads, "
                             "DA3's DualDPT) in bfloat16 (LiteConfig.bf16_heads); default: float32 as the model")
    parser.add_argument("--bf16-all-heads", action="store_true",
                        help="the timed students run every head in bfloat16, the camera head too (LiteConfig.bf16_heads='*')")
    parser.add_argument("--head-frames-chunk", type=int, default=None, metavar="N",
                        help="the timed students' chunked heads (VGGT's DPT heads, 8 upstream) run N frames at a time "
                             "(LiteConfig.head_frames_chunk): less memory, the same outputs")
    parser.add_argument("--dense-special-rows", action="store_true",
                        help="the SLA students give each frame's camera and register tokens exact attention "
                             "(SLAConfig.dense_rows; VGGT-style models)")
    parser.add_argument("--student-backend", default=None, choices=("fp8", "inductor", "eager"),
                        help="build every student with this lite() backend (default fp8; eager runs them uncompiled, for CPU tests)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of dense_compiled (default inductor; eager/aot_eager for tests)")
    parser.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                        help="what every compiled variant compiles: its repeated blocks and heads one by one, the rest eager "
                             "(default; LiteConfig.regional_compile), or the whole model as one graph")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="every compiled variant replays its graphs as CUDA graphs (LiteConfig.cuda_graphs; "
                             "mode='reduce-overhead' for dense_compiled)")
    parser.add_argument("--inductor-multi-kernel", action="store_true",
                        help="every compiled variant lets Inductor time persistent against looped versions of its wide "
                             "reductions (LiteConfig.inductor_multi_kernel; triton.multi_kernel)")
    parser.add_argument("--breakdown-frames", type=int, nargs="*", default=[8, 32],
                        help="frame counts profiled for the per-op breakdown (default 8 32)")
    parser.add_argument("--no-correctness", action="store_true", help="skip the eager-student error checks")
    parser.add_argument("--no-exact-check", action="store_true", help="skip topk=1 / FP8-off student vs teacher")
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM ceilings on the model's shapes")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default 518; tiny presets 28)")
    parser.add_argument("--target-s", type=float, default=2.0, help="seconds of timed calls per run (default 2)")
    parser.add_argument("--min-iters", type=int, default=3, help="fewest timed calls per run (default 3)")
    parser.add_argument("--max-iters", type=int, default=20, help="most timed calls per run (default 20)")
    parser.add_argument("--compile-estimate-s", type=float, default=90.0,
                        help="compile time assumed before one is measured, for the budget (default 90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the dense backbone's dtype (default bfloat16; the heads stay float32)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--resume", default=None, metavar="JSON",
                        help="continue a result cut short: keep its finished runs (same configuration and device), "
                             "run the rest")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="run nothing: judge the claims again (written back into JSON), redraw the PNG and reprint the tables")


def config_from_args(args: argparse.Namespace):
    from lite3r_compile.bench import BenchConfig, StudentOptions

    return BenchConfig(
        models=tuple(args.models), frames=tuple(args.frames) if args.frames else None,
        variants=tuple(args.variants), out=args.out, name=args.name, device=args.device,
        time_budget_s=args.time_budget_s,
        students=StudentOptions(topk=args.topk, sla_scopes=tuple(args.sla_scopes), backend=args.student_backend,
                                bf16_dense_heads=args.bf16_dense_heads,
                                regional_compile=args.compile_scope == "blocks", cuda_graphs=args.cuda_graphs,
                                inductor_multi_kernel=args.inductor_multi_kernel, bf16_all_heads=args.bf16_all_heads,
                                head_frames_chunk=args.head_frames_chunk, dense_special_rows=args.dense_special_rows),
        compile_backend=args.compile_backend, breakdown_frames=tuple(args.breakdown_frames),
        correctness=not args.no_correctness, exact_check=not args.no_exact_check, gemm=not args.no_gemm,
        image_size=args.image_size, target_s=args.target_s, min_iters=args.min_iters, max_iters=args.max_iters,
        compile_estimate_s=args.compile_estimate_s, seed=args.seed, plot=not args.no_plot, resume=args.resume,
        dtype=args.dtype,
    )


def replot(path: str) -> int:
    import json
    from pathlib import Path

    from lite3r_compile.bench.claims import check_claims
    from lite3r_compile.bench.plot import plot_results
    from lite3r_compile.bench.runner import summary_text

    result = json.loads(Path(path).read_text())
    # the claims follow from the records: judged again by this version, and written back
    result["claims"] = check_claims(result["runs"], result["exact_checks"])
    Path(path).write_text(json.dumps(result, indent=1))
    print(summary_text(result))
    print(plot_results(result, Path(path).with_suffix(".png")))
    return 0


def run(args: argparse.Namespace) -> int:
    from lite3r_compile.bench import run_benchmark

    if args.replot:
        return replot(args.replot)
    result = run_benchmark(config_from_args(args))
    failed = [r for r in result["runs"] if "error" in r]
    return 1 if failed or not result["runs"] else 0
