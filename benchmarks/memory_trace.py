"""What a benchmark model holds at its memory peak, eagerly, traced on the ``meta`` device (no GPU).

    python benchmarks/memory_trace.py --model vggt-1b --frames 8 32

builds the model of the end-to-end benchmark (bf16 backbone, float32 heads; ``--bf16-dense-heads``
as ``benchmarks/e2e.py``) with meta tensors, runs it under
:class:`~lite3r_compile.bench.live_memory.LiveMemory`, and prints per frame count the weights, the
peak of live activations, the op and module at the peak, and the largest groups alive then by
module. Scaled-dot-product attention is replaced by a stand-in that allocates only its output, as
the flash kernel does (on ``meta`` it would decompose into the N x N math kernel). This is a model
of the program, not of the CUDA allocator: compare it with ``e2e.py``'s measured peaks, which
also hold cuDNN workspaces and the allocator's rounding. ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from lite3r_compile.bench.live_memory import LiveMemory
from lite3r_compile.bench.models import MODELS, build_model, make_images, model_spec

GiB = 2**30


def _flash_like_sdpa(q, k, v, *args, **kwargs):
    return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)


def _tensor_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def trace(model_name: str, frames: int, bf16_dense_heads: bool = False, depth: int = 3) -> dict:
    """The peak of live activation bytes of one eager forward of the benchmark model at ``frames``
    frames; modules are labelled by their path cut to ``depth`` components."""
    spec = model_spec(model_name)
    model = build_model(spec, "meta")
    if bf16_dense_heads:
        for name in spec.dense_heads:
            getattr(model, name).module.to(torch.bfloat16)
    memory = LiveMemory()
    stack: list[str] = []

    def enter(path: str) -> None:
        stack.append(path)
        memory.label = path

    def leave() -> None:
        stack.pop()
        memory.label = stack[-1] if stack else ""

    for path, module in model.named_modules():
        if path and path.count(".") < depth:
            module.register_forward_pre_hook(lambda _m, _a, _p=path: enter(_p))
            module.register_forward_hook(lambda _m, _a, _o: leave())
    images = make_images(spec, frames, "meta")
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", _flash_like_sdpa), memory:
        model(images)
    return {
        "model": model_name, "frames": frames, "bf16_dense_heads": bf16_dense_heads,
        "weight_bytes": _tensor_bytes(model), "peak_activation_bytes": memory.peak_bytes, "peak_op": memory.peak_op,
        "alive_at_peak_by_module": memory.by_label(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b", choices=list(MODELS))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--bf16-dense-heads", action="store_true")
    parser.add_argument("--top", type=int, default=6, help="module groups listed per row (default 6)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for frames in args.frames:
        row = trace(args.model, frames, args.bf16_dense_heads)
        rows.append(row)
        total = row["weight_bytes"] + row["peak_activation_bytes"]
        print(f"{args.model} S={frames}: weights {row['weight_bytes'] / GiB:.2f} GiB + activations "
              f"{row['peak_activation_bytes'] / GiB:.2f} GiB = {total / GiB:.2f} GiB, peak at {row['peak_op']}")
        for label, nbytes in list(row["alive_at_peak_by_module"].items())[:args.top]:
            print(f"    {nbytes / GiB:6.2f} GiB made in {label or '(model)'}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
