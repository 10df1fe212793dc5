"""Bilinear upsampling in the DPT heads: Inductor's fused lowering against ``lite3r::upsample_bilinear2d``,
at VGGT-1B's head shapes (an 8-frame chunk at 518 x 518, bf16, channels-last), on one GPU.

A DPT fusion step ends in ``interpolate(conv_out + skip, 2x, bilinear, align_corners=True)``;
Inductor fuses the add into the upsampling, so each output element gathers four corners from
both inputs (session 10's profile: 2.1 ms for the 148 -> 296 step of two heads, ~0.5-1 TB/s).
The floor of the unfused form is one read of ``conv_out`` and ``skip`` and one write and read of
their sum (at the input's size) plus one write of the output (4x the input at 2x); that of the
fused form skips the sum. Timed (CUDA events via triton's ``do_bench``, median):

- ``eager``:         ``F.interpolate(a + b)`` in eager PyTorch
- ``inductor``:      the same compiled by Inductor (its fused lowering)
- ``lite3r``:        compiled with the ``lite3r`` backend: the add by Inductor, the resize by the kernel
- ``kernel_c{C}w{W}``: the kernel alone on the sum, channel block C and W warps

with the largest difference from eager relative to eager's largest value. ``--sources`` also
writes Inductor's generated code of the ``inductor`` variant for each shape.

    python benchmarks/upsample.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from lite3r_compile.backends.bilinear_upsample import upsample_bilinear_triton
from lite3r_compile.backends.registration import lite3r_backend

from fp8_linear import bench  # the sibling script: do_bench's median, the same warm-up

# (name, input (N, C, H, W), output size): VGGT-1B's DPT head on 8 frames of 518 x 518
SHAPES = [
    ("refinenet3 37->74", (8, 256, 37, 37), (74, 74)),
    ("refinenet2 74->148", (8, 256, 74, 74), (148, 148)),
    ("refinenet1 148->296", (8, 256, 148, 148), (296, 296)),
    ("output 296->518", (8, 128, 296, 296), (518, 518)),
]
KERNEL_TILES = [(32, 4), (64, 4), (128, 4), (64, 8), (128, 8)]  # (channel block, warps)


def fused(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(a + b, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", action="store_true", help="write Inductor's code of the inductor variant")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    probe = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    copy_tbs = 2 * probe.numel() / bench(lambda: probe.clone()) / 1e9
    del probe
    for name, shape, size in SHAPES:
        a, b = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
                for _ in range(2))
        want = fused(a, b, size).float()
        elem = 2
        in_bytes, out_bytes = a.numel() * elem, shape[0] * shape[1] * size[0] * size[1] * elem
        floors = {"fused": 2 * in_bytes + out_bytes, "unfused": 4 * in_bytes + out_bytes}
        torch._dynamo.reset()
        inductor = torch.compile(fused)
        if args.sources:
            from torch._inductor.utils import run_and_get_code

            _, code = run_and_get_code(inductor, a, b, size)
            (out_dir / f"upsample_inductor_{shape[2]}to{size[0]}.py").write_text("\n\n".join(code))
        candidates = {
            "eager": (fused, "unfused"),
            "inductor": (inductor, "fused"),
            "lite3r": (torch.compile(fused, backend=lite3r_backend, options={"sla": False, "fp8": False}), "unfused"),
        }
        for block_c, warps in KERNEL_TILES:
            candidates[f"kernel_c{block_c}w{warps}"] = (
                lambda x, y, s, c=block_c, w=warps: upsample_bilinear_triton(x, s, True, block_c=c, num_warps=w),
                "kernel")
        summed = a + b
        for variant, (fn, form) in candidates.items():
            inputs = (summed, None, size) if form == "kernel" else (a, b, size)
            got = fn(*inputs).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            ms = bench(lambda: fn(*inputs))
            moved = in_bytes + out_bytes if form == "kernel" else floors[form]
            rows.append({"shape": name, "input": list(shape), "size": list(size), "variant": variant, "ms": ms,
                         "tb_per_s": moved / ms / 1e9, "floor_ms": moved / copy_tbs / 1e9,
                         "bytes": moved, "rel_err": err})
            print(f"{name:>20} {variant:>14} {ms:7.3f} ms {moved / ms / 1e9:5.2f} TB/s  err {err:.1e}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "copy_tb_per_s": copy_tbs, "dtype": "bfloat16", "layout": "channels_last"}
    (out_dir / "upsample.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(meta)
    print(f"{'shape':>20} {'variant':>14} {'ms':>7} {'TB/s':>6} {'floor ms':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['shape']:>20} {r['variant']:>14} {r['ms']:7.3f} {r['tb_per_s']:6.2f} {r['floor_ms']:8.3f} "
              f"{r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
