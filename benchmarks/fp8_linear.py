"""FP8 Linear layers against bf16 at VGGT/ViT-L shapes on one GPU.

For each Linear of a ViT-L block (qkv 1024->3072, proj 1024->1024, fc1 1024->4096,
fc2 4096->1024) at M = S * 1374 tokens, times (CUDA events via triton's do_bench, median):

- ``bf16``:        F.linear in bf16 (the dense baseline's GEMM)
- ``fp8_gemm``:    torch._scaled_mm on pre-quantized operands (the FP8 ceiling: GEMM only)
- ``fp8_eager``:   Float8Linear eager (activation quantization as separate kernels + GEMM)
- ``fp8_compiled``: LayerNorm -> Float8Linear under torch.compile (quantization fused into the
                   LayerNorm kernel), against ``bf16_compiled`` LayerNorm -> Linear

and a whole pre-norm MLP (LN -> fc1 -> GELU -> fc2) compiled, bf16 against FP8.
Writes JSON (and a PNG when matplotlib is there) under ``--out``.

    python benchmarks/fp8_linear.py --frames 8 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lite3r_compile.backends.fp8_linear import Float8Linear, quantize_to_e4m3

SHAPES = {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 4096), "fc2": (4096, 1024)}


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8])
    parser.add_argument("--granularity", default="rowwise", choices=["rowwise", "tensorwise"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    for frames in args.frames:
        M = frames * 1374
        for name, (K, N) in SHAPES.items():
            flop = 2 * M * K * N
            lin = nn.Linear(K, N, device=dev, dtype=torch.bfloat16)
            norm = nn.LayerNorm(K, device=dev, dtype=torch.bfloat16)
            f8 = Float8Linear.from_linear(lin, granularity=args.granularity)
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_to_e4m3(x, args.granularity == "rowwise")
            ws = f8.weight_scale.t() if args.granularity == "rowwise" else f8.weight_scale
            t_bf16 = bench(lambda: F.linear(x, lin.weight, lin.bias))
            t_gemm = bench(lambda: torch._scaled_mm(xq, f8.weight.t(), scale_a=xs, scale_b=ws, bias=f8.bias, out_dtype=torch.bfloat16))
            t_eager = bench(lambda: f8(x))
            ln_bf16 = torch.compile(lambda t: lin(norm(t)))
            ln_fp8 = torch.compile(lambda t: f8(norm(t)))
            ref = ln_bf16(x)
            err = rel_err(ln_fp8(x), ref)
            t_ln_bf16 = bench(lambda: ln_bf16(x))
            t_ln_fp8 = bench(lambda: ln_fp8(x))
            ln_only = torch.compile(lambda t: norm(t))
            t_ln_only = bench(lambda: ln_only(x))
            rows.append({
                "frames": frames, "layer": name, "M": M, "K": K, "N": N,
                "bf16_ms": t_bf16, "fp8_gemm_ms": t_gemm, "fp8_eager_ms": t_eager,
                "bf16_compiled_ln_linear_ms": t_ln_bf16, "fp8_compiled_ln_linear_ms": t_ln_fp8,
                "compiled_ln_only_ms": t_ln_only,
                "bf16_tflops": flop / t_bf16 / 1e9, "fp8_gemm_tflops": flop / t_gemm / 1e9,
                "fp8_eager_tflops": flop / t_eager / 1e9,
                "fp8_compiled_tflops_incl_quant": flop / max(t_ln_fp8 - t_ln_only, 1e-9) / 1e9,
                "fp8_vs_bf16_rel_err": err,
            })
        # whole MLP: LN -> fc1 -> GELU -> fc2
        K, H = 1024, 4096
        norm = nn.LayerNorm(K, device=dev, dtype=torch.bfloat16)
        fc1 = nn.Linear(K, H, device=dev, dtype=torch.bfloat16)
        fc2 = nn.Linear(H, K, device=dev, dtype=torch.bfloat16)
        q1, q2 = Float8Linear.from_linear(fc1, granularity=args.granularity), Float8Linear.from_linear(fc2, granularity=args.granularity)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        mlp_bf16 = torch.compile(lambda t: t + fc2(F.gelu(fc1(norm(t)))))
        mlp_fp8 = torch.compile(lambda t: t + q2(F.gelu(q1(norm(t)))))
        err = rel_err(mlp_fp8(x) - x, mlp_bf16(x) - x)
        t_b, t_f = bench(lambda: mlp_bf16(x)), bench(lambda: mlp_fp8(x))
        rows.append({"frames": frames, "layer": "mlp_block", "M": M, "bf16_compiled_ms": t_b, "fp8_compiled_ms": t_f,
                     "speedup": t_b / t_f, "fp8_vs_bf16_rel_err": err,
                     "fp8_tflops": 2 * 2 * M * K * H / t_f / 1e9, "bf16_tflops": 2 * 2 * M * K * H / t_b / 1e9})
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "granularity": args.granularity}
    (out_dir / "fp8_linear.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{meta}")
    print(f"{'S':>3} {'layer':>9} {'bf16':>7} {'fp8gemm':>8} {'fp8eager':>8} {'ln+bf16':>8} {'ln+fp8':>8} {'ln':>6} | TFLOP/s bf16 gemm8 eager8 fused8 | err")
    for r in rows:
        if r["layer"] == "mlp_block":
            print(f"{r['frames']:>3} {'mlp':>9} compiled bf16 {r['bf16_compiled_ms']:.3f} ms, fp8 {r['fp8_compiled_ms']:.3f} ms, "
                  f"speedup {r['speedup']:.2f}x, {r['bf16_tflops']:.0f} vs {r['fp8_tflops']:.0f} TFLOP/s, err {r['fp8_vs_bf16_rel_err']:.2e}")
            continue
        print(f"{r['frames']:>3} {r['layer']:>9} {r['bf16_ms']:7.3f} {r['fp8_gemm_ms']:8.3f} {r['fp8_eager_ms']:8.3f} "
              f"{r['bf16_compiled_ln_linear_ms']:8.3f} {r['fp8_compiled_ln_linear_ms']:8.3f} {r['compiled_ln_only_ms']:6.3f} | "
              f"{r['bf16_tflops']:5.0f} {r['fp8_gemm_tflops']:5.0f} {r['fp8_eager_tflops']:5.0f} {r['fp8_compiled_tflops_incl_quant']:6.0f} | {r['fp8_vs_bf16_rel_err']:.2e}")


if __name__ == "__main__":
    main()
