"""The SLA forward, piece by piece: the cost of each step before the fused kernel, and the kernel at
each launch config (issue 3: the operator against FlexAttention, and the block map plus linear
branch under 15%).

Shapes: bf16, H=16, D=64, global attention over frames x 1374 tokens, 128x64 blocks. For each
size the script times (median of triton's do_bench, CUDA events):

- the steps before the fused kernel: block statistics, block scores, classification (its
  threshold search stopping early, as the operator runs it, and running all 32 bits, whose
  classes must be equal), the marginal sums of the
  states (the Triton kernel, and the same product through cuBLAS), each
  launched from Python and replayed from a CUDA graph (``*_graph_ms``: GPU time alone; a
  model compiled with CUDA graphs sees these);
- the fused kernel at every launch config (warps, stages) and autotuned, key blocks loaded
  through pointers and through TMA tensor descriptors (and, with --warp-specialize, TMA with
  Triton's automatic warp specialisation of the loop), with its error against the float32
  reference on the same block classes;
- FlexAttention on the same critical blocks (forward), the peer of issue 3.

Session 14 also timed kernel variants here that lost and were removed (packed float16 and
bfloat16 exponentials, two key blocks a step; commit 11aa277 has them, benchmarks/NOTES.md the
numbers). Session 15 added the TMA loads, the register caps and the warp-specialised loop, and
timed a radix-select classification that lost (removed in session 16; commit fcb2de2 has it).

FLOPs on the computed blocks: 4 * N * (critical blocks * 64) * D * H. Writes
``sla_forward_variants.json`` under --out and prints a table.

    python benchmarks/sla_forward_variants.py --frames 32 --out benchmarks/results/session14
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sla_kernel import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    TOKENS_PER_FRAME,
    _bench,
    _bench_graph,
    _proj,
    _qkv,
    _reference_o_fp32,
    _rel,
    time_flex,
)

LAUNCH_CONFIGS = ["4x3", "4x4", "8x2", "8x3", "8x4"]


def _with_launch(kernel, warps: int, stages: int, maxnreg: int | None = None,
                 warp_specialize: bool = False):
    """The same jitted forward kernel fixed to one launch config (an autotuner of one choice
    times nothing), optionally capped at ``maxnreg`` registers a thread (a cap of 168 lets three
    4-warp programs share an SM's 64K registers, where the uncapped kernel fits two), its
    key-block loop optionally warp-specialised. Under the CPU interpreter the kernel is not
    autotuned: it is returned as it is, launch configs mean nothing there."""
    import triton

    if not isinstance(kernel, triton.runtime.Autotuner):
        return kernel
    fixed = triton.autotune([triton.Config({}, num_warps=warps, num_stages=stages,
                                           maxnreg=maxnreg)], key=[])(kernel.fn)
    if not warp_specialize:
        return fixed

    class _WarpSpecialized:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: fixed[grid](*args, WARP_SPECIALIZE=True, **kwargs)

    return _WarpSpecialized()


def _launch_config(text: str) -> tuple[int, int, int | None]:
    """"4x3" -> (4 warps, 3 stages, no register cap); "4x3r168" -> (4, 3, 168)."""
    warps, rest = text.split("x")
    stages, _, maxnreg = rest.partition("r")
    return int(warps), int(stages), int(maxnreg) if maxnreg else None


def steps(n: int, config, time_them: bool = True) -> tuple[dict, tuple]:
    """Times of the steps before the fused kernel (none unless ``time_them``); returns them and
    the inputs the kernel needs."""
    from lite3r_compile.sla import triton_blockmap, triton_linear

    q, k, v = _qkv(1, n, torch.bfloat16, seed=2)
    stats = lambda: triton_linear.block_statistics(q, k, v, config, torch.bfloat16)  # noqa: E731
    key_states, k_sums, q_means = stats()
    scores = lambda: triton_blockmap.block_scores(q_means, k_sums, n, config)  # noqa: E731
    block_map_fn = lambda: triton_blockmap.build_block_map(  # noqa: E731
        q_means, k_sums, n, config, torch.bfloat16)
    block_map = block_map_fn()
    marginal = lambda: triton_linear.marginal_sum(  # noqa: E731
        block_map.marginal, key_states, dot=triton_linear.DOT_BF16, out_dtype=torch.bfloat16)
    states = marginal()
    cublas = torch.matmul(block_map.marginal, key_states)
    named = {"block_statistics": stats, "block_scores": scores, "block_map": block_map_fn,
             "marginal_sum": marginal,
             "marginal_sum_cublas": lambda: torch.matmul(block_map.marginal, key_states)}
    times = {}
    if not time_them:
        return times, (q, k, v, block_map, states)
    full = lambda: triton_blockmap.build_block_map(  # noqa: E731
        q_means, k_sums, n, config, torch.bfloat16, early_exit=False)
    times["full_search_classes_equal"] = torch.equal(full().block_class, block_map.block_class)
    named["block_map_full_search"] = full
    for name, fn in named.items():
        times[f"{name}_ms"] = _bench(fn)
        times[f"{name}_graph_ms"] = _bench_graph(fn)
    times["marginal_sum_cublas_rel_err"] = _rel(cublas, states)
    for suffix in ("_ms", "_graph_ms"):
        times["classify" + suffix] = times["block_map" + suffix] - times["block_scores" + suffix]
        times["classify_full_search" + suffix] = (times["block_map_full_search" + suffix]
                                                  - times["block_scores" + suffix])
        times["non_kernel" + suffix] = (times["block_statistics" + suffix]
                                        + times["block_map" + suffix]
                                        + times["marginal_sum" + suffix])
    return times, (q, k, v, block_map, states)


def kernel_configs(n: int, config, inputs, launch_configs, warp_specialize: bool) -> list[dict]:
    """The fused kernel at each (warps, stages) of ``launch_configs``, key blocks loaded through
    pointers and through TMA descriptors (and, with ``warp_specialize``, TMA with the loop
    warp-specialised), then autotuned as the operator runs it: time, TFLOP/s on the computed
    blocks, error against the float32 reference."""
    from lite3r_compile.sla import reference, triton_sla

    q, k, v, block_map, states = inputs
    w, b = _proj(3, zero=False)
    scale = HEAD_DIM**-0.5
    with torch.no_grad():
        ref_in = [t.float() for t in (q, k, v, w, b)]
        o_ref = _reference_o_fp32(reference, ref_in, block_map.block_class, scale, config)
    del ref_in
    n_critical = block_map.critical_lut.shape[-1]
    flops = 4.0 * HEADS * n * min(n, n_critical * config.block_k) * HEAD_DIM

    def measure(row: dict) -> dict:
        run = lambda: triton_sla.attention_forward(  # noqa: E731
            q, k, v, block_map, states, w, b, scale, config, False, tma=row["tma"])
        try:
            row["rel_err"] = _rel(run()[0], o_ref)
            row["ms"] = _bench(run)
            row["tflops"] = flops / row["ms"] * 1e-9
        except Exception as error:  # a config that does not fit is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(f"  N={n} {json.dumps(row)}", flush=True)
        return row

    tuned = triton_sla._sla_fwd_kernel
    rows = []
    loads = [(False, False), (True, False)] + ([(True, True)] if warp_specialize else [])
    try:
        for tma, specialised in loads:
            for warps, stages, maxnreg in launch_configs:
                triton_sla._sla_fwd_kernel = _with_launch(tuned, warps, stages, maxnreg,
                                                          specialised)
                rows.append(measure({"tma": tma, "warp_specialize": specialised,
                                     "num_warps": warps, "num_stages": stages,
                                     "maxnreg": maxnreg}))
    finally:
        triton_sla._sla_fwd_kernel = tuned
    rounding = _rel(o_ref.to(torch.bfloat16), o_ref)
    for tma in (False, True):
        rows.append(measure({"tma": tma, "autotuned": True, "bf16_rounding_of_reference": rounding}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32])
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--config-frames", type=int, nargs="*", default=[32],
                        help="sizes at which every launch config is timed (others: autotuned only)")
    parser.add_argument("--launch", nargs="*", default=LAUNCH_CONFIGS,
                        help="launch configs WARPSxSTAGES or WARPSxSTAGESrMAXNREG timed at "
                             "--config-frames")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--warp-specialize", action="store_true",
                        help="also time TMA loads with the loop warp-specialised (Triton's "
                             "Hopper pass may fail to compile it; run it in a process of its own)")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip timing the steps before the fused kernel")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from lite3r_compile.sla.config import SLAConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    config = SLAConfig(topk=args.topk, block_q=128, block_k=64)
    launch = [_launch_config(text) for text in args.launch]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python"] + sys.argv), "topk": args.topk,
              "block": [128, 64], "sizes": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sla_forward_variants.json"
    for frames in args.frames:
        n = frames * TOKENS_PER_FRAME
        times, inputs = steps(n, config, time_them=not args.no_steps)
        print(f"N={n} steps {json.dumps(times)}", flush=True)
        entry = {"frames": frames, "N": n, "steps": times}
        entry["kernel"] = kernel_configs(n, config, inputs,
                                         launch if frames in args.config_frames else [],
                                         args.warp_specialize)
        del inputs
        torch.cuda.empty_cache()
        if not args.no_flex:
            entry["flex"] = time_flex(1, n, args.topk, 128, 64)
            print(f"N={n} flex {json.dumps(entry['flex'])}", flush=True)
        result["sizes"].append(entry)
        path.write_text(json.dumps(result, indent=1))

    print("\n| N | loads | kernel: warps, stages | ms | TF/s | rel. err | non-kernel ms (graph) | Flex ms |")
    print("|---|---|---|---|---|---|---|---|")
    for entry in result["sizes"]:
        steps_ = entry["steps"]
        non_kernel = (f"{steps_['non_kernel_ms']:.3f} ({steps_['non_kernel_graph_ms']:.3f})"
                      if steps_ else "")
        flex = entry.get("flex", {}).get("fwd_ms")
        for row in entry["kernel"]:
            if "ms" not in row:
                continue
            loads = ("TMA, warp-specialised" if row.get("warp_specialize")
                     else "TMA" if row["tma"] else "pointers")
            launch = ("autotuned" if row.get("autotuned") else
                      f"{row['num_warps']}, {row['num_stages']}"
                      + (f", <= {row['maxnreg']} registers" if row.get("maxnreg") else ""))
            print(f"| {entry['N']} | {loads} | {launch} | {row['ms']:.3f} | {row['tflops']:.0f} | "
                  f"{row['rel_err']:.2e} | {non_kernel} | {flex if flex is None else f'{flex:.3f}'} |")


if __name__ == "__main__":
    main()
