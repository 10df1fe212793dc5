"""GELU + rowwise FP8 quantization of an MLP's hidden activations: Inductor's kernel against
the alternatives, at VGGT-1B shapes, on one GPU.

In the FP8 student, ``fc2``'s input ``gelu(fc1(x))`` (M x 4096, bf16, M = S * 1374 tokens) is
quantized rowwise: per row, ``scale = max(|y|) / 448`` and ``q = clamp(y / scale) -> e4m3``.
Inductor fuses the GELU into that reduction, but as a looped reduction (the row is wider than its
persistent limit of 1024), which reads the row and computes erf twice: 0.165 ms at S=8 and
0.67 ms at S=32 in session 5, 0.8 TB/s (``benchmarks/NOTES.md``). The floor is one read of
2 bytes and one write of 1 byte an element: M * 4096 * 3 bytes.

Timed (CUDA events via triton's ``do_bench``, median), each against the floor at the measured
copy bandwidth:

- ``gelu``:          compiled ``gelu(y)`` alone, bf16 in and out (4 bytes an element; reference)
- ``inductor``:      compiled ``quantize_to_e4m3(gelu(y))``, Inductor's defaults
- ``multi_kernel``:  the same with ``triton.multi_kernel=1`` (a persistent variant, timed at run time)
- ``coordinate_descent``: the same with ``coordinate_descent_tuning=True``
- ``triton_rows``:   the deployed student's kernel (``lite3r::gelu_quant_rowwise``,
                     :mod:`lite3r_compile.backends.gelu_quant`): a row or a few a program, each
                     loaded once, a branch-free fitted erfc, amax, scale and e4m3 stores, at its default
                     tile and at the others of a small sweep (``triton_r{rows}w{warps}``)
- ``triton_erf``:    the same kernel with eager's erf (libdevice) in place of its fitted erfc
- ``triton_no_gelu``: the same kernel with no GELU at all, the bound on what a cheaper GELU
                     can save (its bytes are not a GELU's, so its agreement columns mean nothing)

and, for each, whether its e4m3 bytes and scales equal the eager reference's.

``--layernorm`` does the same for a block's LayerNorm + rowwise quantization (x (M, 1024) bf16,
the input of qkv and fc1): ``ln_inductor`` (compiled ``quantize_to_e4m3(F.layer_norm(x))``)
against ``ln_triton_rows`` (``lite3r::layernorm_quant_rowwise``,
:mod:`lite3r_compile.backends.layernorm_quant`) at its default tile and at the other tiles of a
small sweep (``ln_triton_r{rows}w{warps}``).

    python benchmarks/fp8_quant.py --frames 8 32 --layernorm --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from lite3r_compile.backends.fp8_linear import quantize_to_e4m3
from lite3r_compile.backends.gelu_quant import gelu_quant_rowwise, gelu_quantize_triton
from lite3r_compile.backends.layernorm_quant import layernorm_quant_rowwise, layernorm_quantize_triton

from fp8_linear import bench  # the sibling script: do_bench's median, the same warm-up

HIDDEN = 4096
WIDTH = 1024  # VGGT-1B's embedding width: the LayerNorms' rows
GELU_TILES = [(1, 2), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16)]  # (rows, warps) of the GELU sweep
LN_TILES = [(1, 4), (2, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8)]  # (rows, warps) of the sweep
TOKENS_PER_FRAME = 1374


def reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_to_e4m3(F.gelu(y), rowwise=True)


def agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Fraction of e4m3 bytes equal to the reference's, and the scales' largest relative error."""
    q, s = got
    equal = (q.view(torch.uint8) == want[0].view(torch.uint8)).float().mean().item()
    return {"q_equal": equal, "scale_rel_err": ((s - want[1]).abs() / want[1]).max().item()}


def layernorm_rows(frames: int, copy_tbs: float) -> list[dict]:
    """The LayerNorm + quantization candidates at M = frames * 1374, N = 1024, bf16."""
    M = frames * TOKENS_PER_FRAME
    x = torch.randn(M, WIDTH, device="cuda", dtype=torch.bfloat16) * 2 + 0.5
    weight = (1 + 0.3 * torch.randn(WIDTH, device="cuda")).to(torch.bfloat16)
    bias = (0.3 * torch.randn(WIDTH, device="cuda")).to(torch.bfloat16)

    def eager(t):
        return quantize_to_e4m3(F.layer_norm(t, (WIDTH,), weight, bias, 1e-6), rowwise=True)

    want = eager(x)
    floor_bytes = x.numel() * 3 + M * 4
    torch._dynamo.reset()
    candidates = {"ln_inductor": torch.compile(eager), "ln_triton_rows": lambda t: layernorm_quant_rowwise(t, weight, bias, 1e-6)}
    for r, w in LN_TILES:
        candidates[f"ln_triton_r{r}w{w}"] = lambda t, r=r, w=w: layernorm_quantize_triton(t, weight, bias, 1e-6, rows=r, num_warps=w)
    out_rows = []
    for name, fn in candidates.items():
        out = fn(x)
        ms = bench(lambda: fn(x))
        out_rows.append({"frames": frames, "M": M, "N": WIDTH, "variant": name, "ms": ms,
                         "tb_per_s": floor_bytes / ms / 1e9, "floor_ms": floor_bytes / copy_tbs / 1e9,
                         "copy_tb_per_s": copy_tbs, **agreement(out, want)})
    return out_rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--layernorm", action="store_true", help="also LayerNorm + quantization at width 1024")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    for frames in args.frames:
        M = frames * TOKENS_PER_FRAME
        y = torch.randn(M, HIDDEN, device=dev, dtype=torch.bfloat16) * 2
        want = reference(y)
        copy_ms = bench(lambda: y.clone())
        copy_tbs = 2 * y.numel() * 2 / copy_ms / 1e9
        floor_bytes = y.numel() * 3 + M * 4
        candidates = {"gelu": torch.compile(F.gelu)}
        for name, options in {"inductor": {}, "multi_kernel": {"triton.multi_kernel": 1},
                              "coordinate_descent": {"coordinate_descent_tuning": True}}.items():
            candidates[name] = torch.compile(reference, options=options)
        candidates["triton_rows"] = gelu_quant_rowwise
        candidates["triton_erf"] = lambda t: gelu_quantize_triton(t, gelu_form="erf")
        candidates["triton_no_gelu"] = lambda t: gelu_quantize_triton(t, gelu_form="identity")
        for r, w in GELU_TILES:
            candidates[f"triton_r{r}w{w}"] = lambda t, r=r, w=w: gelu_quantize_triton(t, rows=r, num_warps=w)
        for name, fn in candidates.items():
            torch._dynamo.reset()  # each compiled candidate compiles on its first call, with its own options
            out = fn(y)
            ms = bench(lambda: fn(y))
            bytes_moved = y.numel() * 4 if name == "gelu" else floor_bytes
            row = {"frames": frames, "M": M, "N": HIDDEN, "variant": name, "ms": ms,
                   "tb_per_s": bytes_moved / ms / 1e9, "floor_ms": floor_bytes / copy_tbs / 1e9,
                   "copy_tb_per_s": copy_tbs}
            if name != "gelu":
                row.update(agreement(out, want))
            rows.append(row)
        if args.layernorm:
            rows += layernorm_rows(frames, copy_tbs)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    (out_dir / "fp8_quant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(meta)
    print(f"{'S':>3} {'variant':>19} {'ms':>7} {'TB/s':>6} {'floor ms':>8} {'q equal':>8} {'scale err':>9}")
    for r in rows:
        print(f"{r['frames']:>3} {r['variant']:>19} {r['ms']:7.3f} {r['tb_per_s']:6.2f} {r['floor_ms']:8.3f} "
              f"{r.get('q_equal', float('nan')):8.4f} {r.get('scale_rel_err', float('nan')):9.2e}")


if __name__ == "__main__":
    main()
