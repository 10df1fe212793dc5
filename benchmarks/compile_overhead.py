"""Where the time of a compiled model goes when the GPU sits idle: eager against several
``torch.compile`` set-ups on a shortened VGGT-1B (full width, fewer blocks, so a compile takes
seconds instead of minutes), with the CPU side of one call profiled.

``benchmarks/e2e.py`` measured VGGT-1B at S=8 compiled at 3.4 s a call against 177 ms eager, with
the GPU busy for 136 ms of it: the rest is host time. This script finds which host work it is.
Per set-up it prints the median latency (CUDA events), the GPU busy time, Dynamo's graph and
recompile counts, and the ops with the most self CPU time in one profiled call.

    python benchmarks/compile_overhead.py --depth 4 --frames 8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETUPS = ("eager", "compiled", "compiled_no_cudnn_sdpa", "compiled_aggregator_only", "compiled_cuda_graphs",
          "regional", "regional_cuda_graphs", "student_regional", "student_regional_cuda_graphs")


def build(depth: int, device: torch.device):
    from lite3r_compile.bench.models import ModelSpec, build_model
    from lite3r_compile.models_zoo.dinov2 import DinoV2Config
    from lite3r_compile.models_zoo.vggt import AggregatorConfig, DPTConfig

    # VGGT-1B's DPT heads read blocks 4, 11, 17 and 23; a shortened model, its first four
    layers = (4, 11, 17, 23) if depth == 24 else tuple(min(i, depth - 1) for i in range(4))
    spec = ModelSpec(
        "vggt-1b", ("camera_head", "depth_head", "point_head"), 518, (8,),
        {"enable_track": False, "aggregator": AggregatorConfig(depth=depth, patch_embed=DinoV2Config(depth=depth)),
         "depth_head": DPTConfig(intermediate_layer_idx=layers), "point_head": DPTConfig(intermediate_layer_idx=layers)},
        ("images", "pose_enc_list"), ("depth_head", "point_head"))
    return spec, build_model(spec, device)


def cpu_table(prof, rows: int) -> list[dict]:
    averages = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:rows]
    return [{"name": a.key[:110], "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3,
             "cpu_total_ms": a.cpu_time_total / 1e3} for a in averages]


def regional_student(model, spec, images, cuda_graphs: bool):
    """The e2e benchmark's fp8+SLA student (topk 0.1 at the global sites, bf16 dense heads),
    deployed with its repeated blocks compiled, and with ``cuda_graphs`` replayed as CUDA graphs."""
    import warnings

    from lite3r_compile.api import lite
    from lite3r_compile.bench.variants import StudentOptions, student_plan

    options = StudentOptions(bf16_dense_heads=True, regional_compile=True, cuda_graphs=cuda_graphs)
    backend, config = student_plan("student_fp8_sla", options, spec.dense_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lite(model, backend=backend, config=config, example_inputs=(images[:, :2],)).eval()


def run_setup(name: str, model, spec, images, args) -> dict:
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    from lite3r_compile.bench import breakdown as bd
    from lite3r_compile.bench.variants import compile_dense

    torch._dynamo.reset()
    counters.clear()
    torch.backends.cuda.enable_cudnn_sdp(name != "compiled_no_cudnn_sdpa")
    if name == "eager":
        module = model
    elif name == "compiled_aggregator_only":
        module = model
        model.aggregator.compile(dynamic=False)
    elif name.startswith("student_"):
        module = regional_student(model, spec, images, cuda_graphs=name.endswith("cuda_graphs"))
    else:
        # the e2e benchmark's dense_compiled, whole or block by block, with or without CUDA graphs
        module = compile_dense(model, "inductor", regional=name.startswith("regional"),
                               cuda_graphs=name.endswith("cuda_graphs"))
    record: dict = {"setup": name}
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        module(images)
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - t
        for _ in range(2):
            module(images)
        samples = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            module(images)
            end.record()
            torch.cuda.synchronize()
            samples.append((start.elapsed_time(end), (time.perf_counter() - wall) * 1e3))
        record["latency_ms"] = statistics.median(s[0] for s in samples)
        record["wall_ms"] = statistics.median(s[1] for s in samples)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            module(images)
            torch.cuda.synchronize()
        # the kernels of one call, as the end-to-end benchmark counts them
        record["gpu_busy_ms"] = bd.breakdown(bd.trace_events(lambda: module(images), images.device), images.device)["busy_ms"]
    record["top_cpu"] = cpu_table(prof, args.rows)
    record["dynamo"] = {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                        "graph_breaks": sum(counters["graph_break"].values()),
                        "recompiles": dict(counters["recompiles"]) if "recompiles" in counters else {},
                        "break_reasons": [str(k)[:160] for k in counters["graph_break"]][:5]}
    if name == "compiled_aggregator_only":
        # undo: the next set-up compiles the whole model from the plain modules
        model.aggregator._compiled_call_impl = None
    torch.backends.cuda.enable_cudnn_sdp(True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="aggregator and DINOv2 blocks (VGGT-1B: 24)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from lite3r_compile.bench.models import make_images

    device = torch.device("cuda")
    spec, model = build(args.depth, device)
    images = make_images(spec, args.frames, device)
    results = []
    for name in args.setups:
        try:
            record = run_setup(name, model, spec, images, args)
        except Exception as err:  # one failing set-up must not lose the others
            record = {"setup": name, "error": f"{type(err).__name__}: {err}"[:500]}
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "top_cpu"}), flush=True)
        for row in record.get("top_cpu", []):
            print(f"    {row['self_cpu_ms']:9.2f} ms self {row['cpu_total_ms']:9.2f} total {row['calls']:6d}x  {row['name']}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"depth": args.depth, "frames": args.frames, "device": torch.cuda.get_device_name(device),
           "torch": torch.__version__, "results": results}
    (args.out / "compile_overhead.json").write_text(json.dumps(out, indent=1))
    print(f"{'setup':<28}{'first s':>9}{'ms':>9}{'wall ms':>9}{'busy ms':>9}{'graphs':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['setup']:<28} failed: {r['error'][:120]}")
        else:
            print(f"{r['setup']:<28}{r['first_call_s']:9.1f}{r['latency_ms']:9.1f}{r['wall_ms']:9.1f}"
                  f"{r['gpu_busy_ms']:9.1f}{r['dynamo']['unique_graphs']:7d}")


if __name__ == "__main__":
    main()
