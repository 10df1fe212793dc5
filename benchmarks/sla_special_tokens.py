"""Diagnostic: does SLA cost pose because the camera tokens share their query blocks with patches?

VGGT puts a camera token and register tokens (``patch_start_idx`` of them) in front of each
frame's patch tokens. In global attention over S frames of P tokens, the special tokens of frame
f sit at rows f * P + [0, patch_start_idx), inside a query block of ``block_q`` rows that is
otherwise patches. SLA picks that block's critical key blocks from its mean query, i.e. from what
the patches need, and the camera head reads nothing but the special tokens' outputs.

This script evaluates a trained teacher and its ``sla+fp8`` student (no distillation) on the
held-out scenes, then the same student with every query block that holds a special token made
fully critical (all its key blocks computed exactly). If pose comes back with the second and not
with the first, the query blocks are the cause, and the fix is to give the special tokens dense
(or separate) query rows. It runs the PyTorch reference of SLA (CPU, or ``--device`` without the
Triton path), whose block map it overrides for the second student; the Triton kernels compute
their own block map, which this does not touch.

    python benchmarks/sla_special_tokens.py --teacher benchmarks/assets/teacher_vggt_small_room_h200.safetensors \
        --topk 0.1 --block 32 --eval-scenes 32

Prints one JSON line per model (depth AbsRel, pose AUC@30, rotation error against ground truth)
and writes them to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch

from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
from lite3r_compile.bench.variants import special_token_rows
from lite3r_compile.sla import reference

BENCHMARKS = Path(__file__).resolve().parent


def _train_teacher_module():
    spec = importlib.util.spec_from_file_location("benchmark_train_teacher", BENCHMARKS / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def special_query_blocks(n_queries: int, tokens_per_frame: int, special: int, block_q: int) -> list[int]:
    """Indices of the query blocks that hold a special token, for a sequence of
    ``n_queries // tokens_per_frame`` frames of ``tokens_per_frame`` tokens, the first ``special``
    of each frame special."""
    frames = n_queries // tokens_per_frame
    return sorted({(f * tokens_per_frame + i) // block_q for f in range(frames) for i in range(special)})


@contextlib.contextmanager
def special_queries_dense(tokens_per_frame: int, special: int) -> Iterator[None]:
    """Within the block, the SLA reference marks every key block CRITICAL for the query blocks
    that hold special tokens, wherever the query sequence spans more than one frame (global
    attention); frame attention is left as it is."""
    original = reference.classify_blocks

    def classify(q, k, config):
        block_class = original(q, k, config)
        if q.shape[2] > tokens_per_frame:
            rows = special_query_blocks(q.shape[2], tokens_per_frame, special, config.block_q)
            block_class[:, :, rows, :] = reference.CRITICAL
        return block_class

    reference.classify_blocks = classify
    try:
        yield
    finally:
        reference.classify_blocks = original


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=None,
                        help="default: benchmarks/assets/teacher_vggt_small.safetensors")
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--block", type=int, default=32, help="SLA query and key block (default 32)")
    parser.add_argument("--eval-scenes", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    tt = _train_teacher_module()
    teacher, record = tt.load_teacher(args.teacher or tt.ASSETS / f"{tt.TEACHER_NAME}.safetensors",
                                      device=args.device)
    teacher.eval()
    sampling = tt.SceneSampling(**record["sampling"])
    batches = tt.heldout_batches(args.eval_scenes, sampling, device=args.device)
    tokens_per_frame, special = special_token_rows(teacher, batches[0]["images"])
    config = LiteConfig(sla=SLAConfig(topk=args.topk, block_q=args.block, block_k=args.block),
                        fp8=FP8Config(enabled=True), sla_scopes=("global",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8 emulation off a GPU
        student = lite(teacher, backend="eager", config=config, example_inputs=(batches[0]["images"],))
    student.eval()

    rows = []

    def evaluate(name: str, model: torch.nn.Module) -> None:
        metrics = tt.evaluate_model(model, batches, autocast=False)
        row = {"model": name, **{k: round(metrics[k], 4)
                                 for k in ("depth_abs_rel", "camera_auc@30", "camera_rotation_error_deg")}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    evaluate("teacher", teacher)
    evaluate(f"sla+fp8@{args.topk}", student)
    with special_queries_dense(tokens_per_frame, special):
        evaluate(f"sla+fp8@{args.topk}, special-token query blocks dense", student)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python benchmarks/sla_special_tokens.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
