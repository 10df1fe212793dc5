"""Benchmark of the Triton SLA kernels against dense SDPA (flash) and FlexAttention (block-sparse).

Shapes are VGGT's: H=16 heads of D=64, 1374 tokens a frame, bfloat16. Global attention runs over
all frames at once (N = frames x 1374, batch 1); frame attention runs each frame alone (batch 32,
N = 1374). For each size the script times, with CUDA events (median of triton's do_bench):

- SDPA with the flash backend, forward and forward+backward;
- SLA (lite3r_compile.sla.triton_sla, both branches and the projection), forward and
  forward+backward, and its forward split into block map / linear-branch states / fused kernel;
- FlexAttention with a BlockMask built from the same critical blocks (no linear branch),
  forward and forward+backward (compiled once per shape, so only at the sizes --flex-frames lists).

TFLOP/s on computed blocks counts 4 * Nq * (critical keys per query) * D * H for the forward.
Correctness against lite3r_compile.sla.reference runs first (bf16 inputs, fp32 reference).
Writes benchmarks/results/sla_kernel.json and sla_kernel.png.

    python benchmarks/sla_kernel.py                 # the full run (about 8 minutes on an H100)
    python benchmarks/sla_kernel.py --quick         # one size, for a smoke test
    python benchmarks/sla_kernel.py --plot-only benchmarks/results/sla_kernel.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a checkout without installing: the package sits one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS_PER_FRAME = 1374
HEADS = 16
HEAD_DIM = 64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _qkv(batch: int, n: int, dtype: torch.dtype, seed: int, requires_grad: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = [torch.randn(batch, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
           for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def _proj(seed: int, zero: bool):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if zero:
        return (torch.zeros(HEAD_DIM, HEAD_DIM, device="cuda"),
                torch.zeros(HEAD_DIM, device="cuda"))
    return (torch.randn(HEAD_DIM, HEAD_DIM, device="cuda", generator=gen) * HEAD_DIM**-0.5,
            torch.randn(HEAD_DIM, device="cuda", generator=gen) * 0.1)


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def _bench_graph(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph: the GPU time without the Python launch
    cost, which dominates at small sizes (SLA's forward is about a dozen launches)."""
    fn()  # compile and autotune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _bench(graph.replay)


# ----------------------------------------------------------------------------------- correctness


def check_correctness(n_frames_fwd: int, n_frames_bwd: int) -> dict:
    """bf16 SLA against the fp32 reference on the same inputs and block classes."""
    from lite3r_compile.sla import reference, triton_sla
    from lite3r_compile.sla.config import SLAConfig

    results = {}
    scale = HEAD_DIM**-0.5
    for label, frames, topk, fmap in (("global_fwd", n_frames_fwd, 0.1, "softmax"),
                                      ("global_fwd_bwd", n_frames_bwd, 0.1, "softmax"),
                                      ("ragged_elu_fwd_bwd", None, 0.2, "elu")):
        n = frames * TOKENS_PER_FRAME if frames else 3001
        config = SLAConfig(topk=topk, feature_map=fmap)
        q, k, v = _qkv(1, n, torch.bfloat16, seed=11)
        w, b = _proj(12, zero=False)
        with_bwd = "bwd" in label
        o, o_l, lse, block_class = triton_sla.forward(q, k, v, w, b, scale, config, with_bwd)
        ref_class = reference.classify_blocks(q, k, config)
        entry = {"N": n, "topk": topk, "feature_map": fmap,
                 "block_class_match": float((ref_class == block_class).float().mean())}
        ref_in = [t.detach().float().requires_grad_(with_bwd) for t in (q, k, v, w, b)]
        if with_bwd:
            o_ref, _, lse_ref = reference.sla_with_block_class(*ref_in, block_class, scale, config)
            grad = torch.randn_like(q)
            o_ref.backward(grad.float())
            dq, dk, dv, dw, db = triton_sla.backward(grad, q, k, v, o, o_l, lse, block_class, w,
                                                     scale, config)
            entry.update(lse=_rel(lse, lse_ref), dq=_rel(dq, ref_in[0].grad),
                         dk=_rel(dk, ref_in[1].grad), dv=_rel(dv, ref_in[2].grad),
                         dw=_rel(dw, ref_in[3].grad), db=_rel(db, ref_in[4].grad))
            del o_ref
        # The reference's o is rounded to bf16 like ours; compare ours to its fp32 value, and
        # report the error bf16 rounding alone makes.
        with torch.no_grad():
            o_ref32 = _reference_o_fp32(reference, ref_in, block_class, scale, config)
        entry["o"] = _rel(o, o_ref32)
        entry["o_bf16_rounding"] = _rel(o_ref32.to(torch.bfloat16), o_ref32)
        results[label] = entry
        print(f"correctness {label}: {entry}", flush=True)
        del o_ref32, ref_in
        torch.cuda.empty_cache()
    return results


def _reference_o_fp32(reference, ref_in, block_class, scale, config):
    q, k, v, w, b = (t.detach() for t in ref_in)
    o_s, _ = reference.sparse_branch(q, k, v, block_class, scale, config)
    o_l = reference.linear_branch(q, k, v, block_class, config)
    return o_s + o_l @ w.T + b


# ------------------------------------------------------------------------------------- timings


def time_sdpa(batch: int, n: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(batch, n, torch.bfloat16, seed=1, requires_grad=True)
    grad = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            fwd = _bench(lambda: F.scaled_dot_product_attention(q, k, v))
        fwd_bwd = _bench(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad))
        with torch.no_grad():
            fwd_graph = _bench_graph(lambda: F.scaled_dot_product_attention(q, k, v))
    flops = 4.0 * batch * HEADS * n * n * HEAD_DIM
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "fwd_graph_ms": fwd_graph,
            "fwd_tflops": flops / fwd * 1e-9}


def time_sla(batch: int, n: int, topk: float, block_q: int, block_k: int) -> dict:
    from lite3r_compile.sla import triton_sla
    from lite3r_compile.sla.config import SLAConfig
    from lite3r_compile.sla.triton_blockmap import build_block_map

    config = SLAConfig(topk=topk, block_q=block_q, block_k=block_k)
    q, k, v = _qkv(batch, n, torch.bfloat16, seed=2)
    w, b = _proj(3, zero=False)
    scale = HEAD_DIM**-0.5
    grad = torch.randn_like(q)

    def fwd():
        return triton_sla.forward(q, k, v, w, b, scale, config, False)

    def fwd_bwd():
        o, o_l, lse, block_class = triton_sla.forward(q, k, v, w, b, scale, config, True)
        return triton_sla.backward(grad, q, k, v, o, o_l, lse, block_class, w, scale, config)

    from lite3r_compile.sla import triton_blockmap, triton_linear

    # the forward's steps as triton_sla.forward runs them (bf16 states for bf16 inputs)
    def stats_step():
        return triton_linear.block_statistics(q, k, v, config, torch.bfloat16)

    key_states, k_sums, q_means = stats_step()

    def block_map_step():
        return build_block_map(q_means, k_sums, n, config, torch.bfloat16)

    def marginal_step():
        return triton_linear.marginal_sum(block_map.marginal, key_states, dot=triton_linear.DOT_BF16,
                                          out_dtype=torch.bfloat16)

    block_map = block_map_step()
    states = marginal_step()
    marginal_bf16 = block_map.marginal.to(torch.bfloat16)
    cublas = torch.matmul(marginal_bf16, key_states)
    steps_error = {"marginal_sum_cublas_rel_err": _rel(cublas, states)}
    t_fwd = _bench(fwd)
    t_fwd_bwd = _bench(fwd_bwd)
    t_fwd_graph = _bench_graph(fwd)
    steps = {
        "block_statistics_ms": _bench(stats_step),
        "block_scores_ms": _bench(lambda: triton_blockmap.block_scores(q_means, k_sums, n, config)),
        "block_map_ms": _bench(block_map_step),
        "marginal_sum_ms": _bench(marginal_step),
        # the same product through cuBLAS (bf16 in, fp32 accumulation, bf16 out), to decide
        # whether the Triton kernel (~170 TFLOP/s at N = 43,968) should give way to it
        "marginal_sum_cublas_ms": _bench(lambda: torch.matmul(marginal_bf16, key_states)),
        "backward_tables_ms": _bench(
            lambda: triton_blockmap.block_tables(block_map.block_class, torch.bfloat16, torch.float32)),
    }
    t_map = steps["block_map_ms"]
    t_states = steps["block_statistics_ms"] + steps["marginal_sum_ms"]
    t_kernel = _bench(lambda: triton_sla.attention_forward(q, k, v, block_map, states, w, b,
                                                           scale, config, False))
    saved = triton_sla.forward(q, k, v, w, b, scale, config, True)
    t_bwd = _bench(lambda: triton_sla.backward(grad, q, k, v, *saved, w, scale, config))
    n_critical = block_map.critical_lut.shape[-1]
    computed_keys = min(n, n_critical * block_k)
    flops = 4.0 * batch * HEADS * n * computed_keys * HEAD_DIM
    return {
        "fwd_ms": t_fwd, "fwd_bwd_ms": t_fwd_bwd, "bwd_ms": t_bwd, "fwd_graph_ms": t_fwd_graph,
        "block_map_ms": t_map,
        "linear_states_ms": t_states, "fused_kernel_ms": t_kernel,
        "critical_blocks": n_critical, "key_blocks": block_map.block_class.shape[-1],
        "density": computed_keys / n,
        "kernel_tflops_on_computed_blocks": flops / t_kernel * 1e-9,
        "overhead_fraction": (t_map + t_states) / t_fwd,
        "non_kernel_fraction": 1.0 - t_kernel / t_fwd,
        # the same from the forward replayed from a CUDA graph: no Python launch time between
        # the steps, as in a model compiled with CUDA graphs
        "non_kernel_fraction_graph": 1.0 - t_kernel / t_fwd_graph,
        "steps": steps,
        "steps_error": steps_error,
    }


def time_flex(batch: int, n: int, topk: float, block_q: int, block_k: int) -> dict:
    """FlexAttention over the same critical blocks (the block map SLA builds)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from lite3r_compile.sla.config import SLAConfig
    from lite3r_compile.sla.triton_blockmap import build_block_map
    from lite3r_compile.sla.triton_linear import block_statistics

    config = SLAConfig(topk=topk, block_q=block_q, block_k=block_k)
    q, k, v = _qkv(batch, n, torch.bfloat16, seed=2, requires_grad=True)
    grad = torch.randn_like(q)
    _, k_sums, q_means = block_statistics(q.detach(), k.detach(), v.detach(), config, torch.bfloat16)
    block_map = build_block_map(q_means, k_sums, n, config, torch.bfloat16)
    # The critical blocks go in as "full" blocks (no mask_mod evaluated in them), the fastest
    # path FlexAttention has; index rows are (B, H, Mq, Mk) with the used entries first.
    full_indices = torch.zeros(*block_map.block_class.shape, dtype=torch.int32, device="cuda")
    full_indices[..., :block_map.critical_lut.shape[-1]] = block_map.critical_lut
    mask = BlockMask.from_kv_blocks(
        torch.zeros_like(block_map.critical_count), torch.zeros_like(full_indices),
        block_map.critical_count, full_indices, BLOCK_SIZE=(block_q, block_k), seq_lengths=(n, n))
    # FlexAttention's tiles must divide the sparse blocks: below 128 they are set to the blocks
    # (its defaults, 128-wide, are kept otherwise).
    options = {}
    if min(block_q, block_k) < 128:
        options = {"BLOCK_M": min(block_q, 128), "BLOCK_N": min(block_k, 128),
                   "BLOCK_M1": 32, "BLOCK_N1": min(block_k, 64),
                   "BLOCK_M2": min(block_q, 64), "BLOCK_N2": 32}
    flex = torch.compile(flex_attention, dynamic=False)
    computed_keys = min(n, block_map.critical_lut.shape[-1] * block_k)
    flops = 4.0 * batch * HEADS * n * computed_keys * HEAD_DIM
    out = {}
    # A FlexAttention limit is a result to report, not a crash: its backward has no kernel
    # config for 64-wide sparse blocks (without max-autotune), for instance.
    try:
        with torch.no_grad():
            out["fwd_ms"] = _bench(lambda: flex(q, k, v, block_mask=mask, kernel_options=options))
        out["tflops_on_computed_blocks"] = flops / out["fwd_ms"] * 1e-9
        out["fwd_bwd_ms"] = _bench(lambda: flex(q, k, v, block_mask=mask,
                                                kernel_options=options).backward(grad))
    except Exception as error:
        print(f"FlexAttention failed at N={n} blocks {block_q}x{block_k}: "
              f"{str(error).splitlines()[0][:300]}", flush=True)
        out["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return out


# ---------------------------------------------------------------------------------------- main


def run(args, save=lambda result: None) -> dict:
    """The whole benchmark; ``save(result)`` after each measurement, so a run cut by a time
    limit keeps what it measured."""
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"heads": HEADS, "head_dim": HEAD_DIM, "tokens_per_frame": TOKENS_PER_FRAME,
                  "dtype": "bfloat16"},
        "block": [args.block_q, args.block_k],
    }
    import triton

    result["triton"] = triton.__version__
    if not args.skip_correctness:
        result["correctness"] = check_correctness(args.correct_frames, args.correct_bwd_frames)

    sweep = result["sweep"] = []
    sdpa_by_n = {}
    for frames in args.frames:
        n = frames * TOKENS_PER_FRAME
        sdpa = sdpa_by_n[n] = time_sdpa(1, n)
        print(f"global N={n}: sdpa {sdpa}", flush=True)
        for topk in args.topk:
            row = {"scope": "global", "frames": frames, "N": n, "batch": 1, "topk": topk,
                   "sdpa": sdpa,
                   "sla": time_sla(1, n, topk, args.block_q, args.block_k)}
            print(f"  topk={topk}: sla {json.dumps(row['sla'])}", flush=True)
            if frames in args.flex_frames:
                row["flex"] = time_flex(1, n, topk, args.block_q, args.block_k)
            print(f"  topk={topk}: flex {json.dumps(row.get('flex'))}", flush=True)
            sweep.append(row)
            save(result)
        torch.cuda.empty_cache()
    for topk in args.frame_topk:
        n = TOKENS_PER_FRAME
        row = {"scope": "frame", "frames": 1, "N": n, "batch": args.frame_batch, "topk": topk,
               "sdpa": time_sdpa(args.frame_batch, n),
               "sla": time_sla(args.frame_batch, n, topk, args.block_q, args.block_k)}
        print(f"frame: {json.dumps(row)}", flush=True)
        sweep.append(row)
        save(result)
    for block_q, block_k in args.extra_blocks:
        for topk in args.extra_topk:
            n = args.extra_frames * TOKENS_PER_FRAME
            row = {"scope": "global", "frames": args.extra_frames, "N": n, "batch": 1,
                   "topk": topk, "block": [block_q, block_k], "sdpa": sdpa_by_n.get(n),
                   "sla": time_sla(1, n, topk, block_q, block_k)}
            print(f"blocks {block_q}x{block_k} topk={topk}: sla {json.dumps(row['sla'])}",
                  flush=True)
            row["flex"] = time_flex(1, n, topk, block_q, block_k)
            print(f"blocks {block_q}x{block_k}: {json.dumps(row)}", flush=True)
            sweep.append(row)
            save(result)
    return result


def result_from_log(path: Path, device: str) -> dict:
    """Rebuild the result of a run from its log (what the script prints as it goes): for runs
    from before the JSON was saved after each measurement, cut by a time limit. Rows whose
    measurement had not finished are absent."""
    import ast
    import re

    result: dict = {"command": f"(rebuilt from {path.name})", "device": device, "block": [128, 64],
                    "correctness": {}, "sweep": []}
    sdpa, pending = None, None
    for line in path.read_text().splitlines():
        if m := re.match(r"correctness (\S+): (\{.*\})$", line):
            result["correctness"][m[1]] = ast.literal_eval(m[2])
        elif m := re.match(r"global N=(\d+): sdpa (\{.*\})$", line):
            n, sdpa = int(m[1]), ast.literal_eval(m[2])
        elif m := re.match(r"\s+topk=([\d.]+): sla (\{.*\})$", line):
            pending = {"scope": "global", "frames": n // TOKENS_PER_FRAME, "N": n, "batch": 1,
                       "topk": float(m[1]), "sdpa": sdpa, "sla": json.loads(m[2])}
        elif m := re.match(r"\s+topk=([\d.]+): flex (.*)$", line):
            flex = json.loads(m[2])
            if flex is not None:  # printed as null where FlexAttention was not run
                pending["flex"] = flex
            result["sweep"].append(pending)
        elif m := re.match(r"(?:frame|blocks \d+x\d+): (\{.*\})$", line):
            result["sweep"].append(json.loads(m[1]))
    return result


def summary_table(result: dict) -> str:
    lines = [f"{'scope':6} {'blk':7} {'N':>6} {'B':>2} {'topk':>5} | {'sdpa f':>7} {'sla f':>7} "
             f"{'x':>5} {'flex f':>7} {'x/flex':>6} | {'sdpa fb':>8} {'sla fb':>7} {'x':>5} "
             f"{'flex fb':>7} | {'TF/s':>4} {'ovh%':>4} {'nk%g':>4} | {'sdpa g':>7} {'sla g':>7} "
             f"{'x':>5}"]
    for row in result["sweep"]:
        sla, sdpa, flex = row["sla"], row.get("sdpa"), row.get("flex")
        flex = flex if flex and "fwd_ms" in flex else None
        block = row.get("block", result["block"])
        cells = [f"{row['scope']:6} {block[0]:>3}x{block[1]:<3} {row['N']:>6} {row['batch']:>2} "
                 f"{row['topk']:>5} |"]
        cells.append(f"{sdpa['fwd_ms'] if sdpa else float('nan'):7.2f} {sla['fwd_ms']:7.3f} "
                     f"{sdpa['fwd_ms'] / sla['fwd_ms'] if sdpa else float('nan'):5.1f} "
                     f"{flex['fwd_ms'] if flex else float('nan'):7.3f} "
                     f"{flex['fwd_ms'] / sla['fwd_ms'] if flex else float('nan'):6.2f} |")
        cells.append(f"{sdpa['fwd_bwd_ms'] if sdpa else float('nan'):8.2f} "
                     f"{sla['fwd_bwd_ms']:7.2f} "
                     f"{sdpa['fwd_bwd_ms'] / sla['fwd_bwd_ms'] if sdpa else float('nan'):5.1f} "
                     f"{flex.get('fwd_bwd_ms', float('nan')) if flex else float('nan'):7.2f} |")
        cells.append(f"{sla['kernel_tflops_on_computed_blocks']:4.0f} "
                     f"{100 * sla['overhead_fraction']:4.1f} "
                     f"{100 * sla.get('non_kernel_fraction_graph', float('nan')):4.1f} |")
        sdpa_g = sdpa.get("fwd_graph_ms", float("nan")) if sdpa else float("nan")
        sla_g = sla.get("fwd_graph_ms", float("nan"))
        cells.append(f"{sdpa_g:7.3f} {sla_g:7.3f} {sdpa_g / sla_g:5.1f}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["sweep"] if r["scope"] == "global" and "block" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms",
                                                               "forward + backward")):
        for topk in sorted({r["topk"] for r in rows}):
            sel = [r for r in rows if r["topk"] == topk]
            line, = ax.plot([r["N"] for r in sel], [r["sdpa"][key] / r["sla"][key] for r in sel],
                            marker="o", label=f"SLA topk={topk}")
            # Replayed from CUDA graphs: GPU time alone, where small sizes are launch-bound.
            graphs = [r for r in sel if key == "fwd_ms" and "fwd_graph_ms" in r["sla"]
                      and "fwd_graph_ms" in r["sdpa"]]
            if graphs:
                ax.plot([r["N"] for r in graphs],
                        [r["sdpa"]["fwd_graph_ms"] / r["sla"]["fwd_graph_ms"] for r in graphs],
                        linestyle="--", marker=".", color=line.get_color(),
                        label=f"SLA topk={topk}, CUDA graphs")
            flex = [r for r in sel if key in r.get("flex", {})]
            if flex:
                ax.scatter([r["N"] for r in flex], [r["sdpa"][key] / r["flex"][key] for r in flex],
                           marker="x", s=60, label=f"FlexAttention topk={topk}")
        ax.set_xscale("log")
        ax.set_xlabel("N (tokens, 1374 per frame)")
        ax.set_ylabel("speedup over SDPA (flash)")
        ax.set_title(f"{title}, bf16 H=16 D=64, {result['device']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--flex-frames", type=int, nargs="*", default=[32])
    parser.add_argument("--frame-topk", type=float, nargs="*", default=[0.25])
    parser.add_argument("--frame-batch", type=int, default=32)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--extra-blocks", type=lambda s: tuple(int(x) for x in s.split("x")),
                        nargs="*", default=[(64, 64), (128, 128)], help="more QxK block sizes at "
                        "--extra-frames, against FlexAttention")
    parser.add_argument("--extra-topk", type=float, nargs="*", default=[0.05, 0.1])
    parser.add_argument("--extra-frames", type=int, default=32)
    parser.add_argument("--correct-frames", type=int, default=32)
    parser.add_argument("--correct-bwd-frames", type=int, default=4)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--quick", action="store_true", help="32 frames, topk 0.1, no extras")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--plot-only", type=Path, help="redraw the PNG from a JSON result")
    parser.add_argument("--from-log", type=Path, help="rebuild the JSON and PNG from a run's log (into --out)")
    parser.add_argument("--device-name", default="GPU", help="with --from-log: the GPU the log is from")
    args = parser.parse_args()

    if args.plot_only:
        result = json.loads(args.plot_only.read_text())
        plot(result, args.plot_only.with_suffix(".png"))
        print(summary_table(result))
        return
    stem = "sla_kernel" + (f"_{args.tag}" if args.tag else "")
    if args.from_log:
        result = result_from_log(args.from_log, args.device_name)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out / f"{stem}.png")
        print(summary_table(result))
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sla_kernel.py needs a CUDA GPU")
    if args.quick:
        args.frames, args.topk, args.frame_topk, args.extra_blocks = [32], [0.1], [0.25], []
        args.correct_frames = 8
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        result["wall_s"] = time.time() - started
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    result = run(args, save)
    save(result)
    try:
        plot(result, args.out / f"{stem}.png")
    except ImportError as error:
        print(f"no plot ({error}); redraw with --plot-only {args.out / f'{stem}.json'}")
    print(summary_table(result))


if __name__ == "__main__":
    main()
