"""Cold start of the SLA op on CUDA: the first forward and backward of each shape (Triton
compilation and autotuning included) against later calls.

A user's first training step compiles and autotunes every SLA kernel for every (dtype, head dim,
block) combination the model has; this measures what that costs. Shapes are VGGT-1B's at S=8
(global: 1 x 16 heads x 11,032 tokens; frame: 8 x 16 x 1,379) and a small float32 case (the
float32 heads' attention). Run on a machine whose Triton cache is empty (a fresh one, or
``TRITON_CACHE_DIR`` pointing to an empty folder) to see the cold numbers.

    python benchmarks/sla_cold_start.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.op import sla_attention

# name -> (batch, heads, tokens, head dim, dtype, topk, block_q)
SHAPES = {
    "float32_small": (1, 2, 700, 64, torch.float32, 0.2, 64),
    "global_bf16_vggt_s8": (1, 16, 11032, 64, torch.bfloat16, 0.1, 128),
    "frame_bf16_vggt_s8": (8, 16, 1379, 64, torch.bfloat16, 0.1, 128),
}


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, repeats: int) -> dict:
    B, H, N, D, dtype, topk, block_q = SHAPES[name]
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.zeros(D, D, device="cuda", requires_grad=True)
    b = torch.zeros(D, device="cuda", requires_grad=True)
    config = SLAConfig(topk=topk, block_q=block_q, block_k=64)
    fwd, bwd = [], []
    for _ in range(1 + repeats):
        out = {}
        fwd.append(_timed(lambda: out.setdefault("o", sla_attention(q, k, v, w, b, None, config))))
        bwd.append(_timed(lambda: out["o"].float().square().mean().backward()))
    record = {"shape": [B, H, N, D], "dtype": str(dtype), "topk": topk, "block_q": block_q,
              "first_fwd_s": fwd[0], "first_bwd_s": bwd[0],
              "later_fwd_ms": statistics.median(fwd[1:]) * 1e3, "later_bwd_ms": statistics.median(bwd[1:]) * 1e3}
    print(f"{name}: first forward {fwd[0]:.1f} s, first backward {bwd[0]:.1f} s; later "
          f"{record['later_fwd_ms']:.2f} / {record['later_bwd_ms']:.2f} ms", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sla_cold_start: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python", "benchmarks/sla_cold_start.py", *sys.argv[1:]]),
              "runs": {name: measure(name, args.repeats) for name in args.shapes}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sla_cold_start.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
