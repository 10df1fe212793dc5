"""The SLA forward, piece by piece, to choose the fused kernel's variant and find the block map's
cost (issue 3: the operator against FlexAttention, and the block map plus linear branch under 15%).

Shapes: bf16, H=16, D=64, global attention over frames x 1374 tokens, 128x64 blocks. For each
size the script times (median of triton's do_bench, CUDA events):

- the steps before the fused kernel: block statistics, block scores, classification, the
  marginal sums of the states (the Triton kernel, and the same product through cuBLAS);
- the fused kernel in every variant: exponential (float32, packed float16, packed bfloat16) x
  one or two key blocks a step x launch config (warps, stages), with its error against the
  float32 reference on the same block classes;
- FlexAttention on the same critical blocks (forward), the peer of issue 3.

FLOPs on the computed blocks: 4 * N * (critical blocks * 64) * D * H. Writes
``sla_forward_variants.json`` under --out and prints a table.

    python benchmarks/sla_forward_variants.py --frames 32 --out benchmarks/results/session14
"""

from __future__ import annotations

import argparse
import itertools
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
    _proj,
    _qkv,
    _reference_o_fp32,
    _rel,
    time_flex,
)

LAUNCH_CONFIGS = [(4, 3), (4, 4), (8, 2), (8, 3), (8, 4)]


def _with_launch(kernel, warps: int, stages: int):
    """The same jitted forward kernel fixed to one launch config (an autotuner of one choice
    times nothing). Under the CPU interpreter the kernel is not autotuned: it is returned as it
    is, launch configs mean nothing there."""
    import triton

    if not isinstance(kernel, triton.runtime.Autotuner):
        return kernel
    return triton.autotune([triton.Config({}, num_warps=warps, num_stages=stages)],
                           key=[])(kernel.fn)


def steps(n: int, config) -> tuple[dict, tuple]:
    """Times of the steps before the fused kernel; returns them and the inputs the kernel needs."""
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
    times = {
        "block_statistics_ms": _bench(stats),
        "block_scores_ms": _bench(scores),
        "block_map_ms": _bench(block_map_fn),
        "marginal_sum_ms": _bench(marginal),
        "marginal_sum_cublas_ms": _bench(lambda: torch.matmul(block_map.marginal, key_states)),
        "marginal_sum_cublas_rel_err": _rel(cublas, states),
    }
    times["classify_ms"] = times["block_map_ms"] - times["block_scores_ms"]
    times["non_kernel_ms"] = (times["block_statistics_ms"] + times["block_map_ms"]
                              + times["marginal_sum_ms"])
    return times, (q, k, v, block_map, states)


def kernel_variants(n: int, config, inputs, launch_configs) -> list[dict]:
    from lite3r_compile.sla import reference, triton_attention, triton_sla

    q, k, v, block_map, states = inputs
    w, b = _proj(3, zero=False)
    scale = HEAD_DIM**-0.5
    with torch.no_grad():
        ref_in = [t.float() for t in (q, k, v, w, b)]
        o_ref = _reference_o_fp32(reference, ref_in, block_map.block_class, scale, config)
    del ref_in
    n_critical = block_map.critical_lut.shape[-1]
    flops = 4.0 * HEADS * n * min(n, n_critical * config.block_k) * HEAD_DIM
    tuned = triton_sla._sla_fwd_kernel
    rows = []
    exps = {"f32": triton_attention.EXP_F32, "f16x2": triton_attention.EXP_F16X2,
            "bf16x2": triton_attention.EXP_BF16X2}
    try:
        for (exp_name, exp), pair, (warps, stages) in itertools.product(
                exps.items(), (False, True), launch_configs):
            triton_sla._sla_fwd_kernel = _with_launch(tuned, warps, stages)
            row = {"exp": exp_name, "pair": pair, "num_warps": warps, "num_stages": stages}
            try:
                run = lambda: triton_sla.attention_forward(  # noqa: E731
                    q, k, v, block_map, states, w, b, scale, config, False, exp=exp, pair=pair)
                o = run()[0]
                row["rel_err"] = _rel(o, o_ref)
                row["ms"] = _bench(run)
                row["tflops"] = flops / row["ms"] * 1e-9
            except Exception as error:  # a config that does not fit is a result, not a crash
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"  N={n} {json.dumps(row)}", flush=True)
            rows.append(row)
    finally:
        triton_sla._sla_fwd_kernel = tuned
    row = {"exp": "default", "pair": None, "autotuned": True,
           "variant": list(triton_sla.forward_variant(q, config))}
    run = lambda: triton_sla.attention_forward(  # noqa: E731
        q, k, v, block_map, states, w, b, scale, config, False)
    row["rel_err"] = _rel(run()[0], o_ref)
    row["ms"] = _bench(run)
    row["tflops"] = flops / row["ms"] * 1e-9
    row["bf16_rounding_of_reference"] = _rel(o_ref.to(torch.bfloat16), o_ref)
    print(f"  N={n} {json.dumps(row)}", flush=True)
    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32])
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--variant-frames", type=int, nargs="*", default=[32],
                        help="sizes at which every kernel variant is timed (others: steps only)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from lite3r_compile.sla.config import SLAConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    config = SLAConfig(topk=args.topk, block_q=128, block_k=64)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python"] + sys.argv), "topk": args.topk,
              "block": [128, 64], "sizes": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sla_forward_variants.json"
    for frames in args.frames:
        n = frames * TOKENS_PER_FRAME
        times, inputs = steps(n, config)
        print(f"N={n} steps {json.dumps(times)}", flush=True)
        entry = {"frames": frames, "N": n, "steps": times}
        if frames in args.variant_frames:
            entry["kernel"] = kernel_variants(n, config, inputs, LAUNCH_CONFIGS)
        del inputs
        torch.cuda.empty_cache()
        if not args.no_flex:
            entry["flex"] = time_flex(1, n, args.topk, 128, 64)
            print(f"N={n} flex {json.dumps(entry['flex'])}", flush=True)
        result["sizes"].append(entry)
        path.write_text(json.dumps(result, indent=1))

    print("\n| N | variant | warps, stages | ms | TF/s | rel. err |\n|---|---|---|---|---|---|")
    for entry in result["sizes"]:
        for row in sorted((r for r in entry.get("kernel", []) if "ms" in r),
                          key=lambda r: r["ms"])[:12]:
            print(f"| {entry['N']} | {row['exp']}{' pair' if row.get('pair') else ''} | "
                  f"{row.get('num_warps', 'auto')}, {row.get('num_stages', '')} | "
                  f"{row['ms']:.3f} | {row['tflops']:.0f} | {row['rel_err']:.2e} |")
        print(f"| {entry['N']} | steps | | non-kernel {entry['steps']['non_kernel_ms']:.3f} | | |")
        if "fwd_ms" in entry.get("flex", {}):
            print(f"| {entry['N']} | FlexAttention | | {entry['flex']['fwd_ms']:.3f} | "
                  f"{entry['flex']['tflops_on_computed_blocks']:.0f} | |")


if __name__ == "__main__":
    main()
