"""``lite3r distill``: train a lite student against its dense teacher (also under torchrun)."""

from __future__ import annotations

import argparse

from lite3r_compile.commands._common import add_data_arguments, add_model_arguments

HELP = "distill a lite student (SLA + FP8 fake-quant) against its dense teacher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=100, help="total optimizer steps (default 100)")
    parser.add_argument("--topk", type=float, default=0.1, help="SLA critical-block fraction (default 0.1)")
    parser.add_argument("--no-fp8", action="store_true", help="no FP8 fake-quantization")
    parser.add_argument(
        "--trainable", choices=("sla", "all"), default="sla",
        help="what trains: 'sla' the SLA projections lite() left trainable (default), 'all' every "
             "parameter of the student (full fine-tuning, float32 master weights)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1, help="scenes per step and process")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--attention-sites", nargs="+", default=["global"], help="scopes, #index or path globs (default: global)")
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--output-weight", type=float, default=0.1, help="weight of the final-output loss (default 0.1)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32 instead of bf16 autocast")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun (default ddp)")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--log", default=None, help="append per-step metrics to this JSONL file")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import os

    import torch
    import torch.distributed as dist

    from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
    from lite3r_compile.commands._common import build_data, build_model
    from lite3r_compile.distill.trainer import DistillConfig, distill

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else (args.device or "cuda")
        torch.cuda.set_device(device)
    else:
        device = args.device or "cpu"
    try:
        teacher = build_model(args.model, args.weights, seed=args.seed, device=device)
        config = LiteConfig(sla=SLAConfig(topk=args.topk), fp8=FP8Config(enabled=not args.no_fp8))
        student = lite(teacher, backend="eager", config=config)
        result = distill(
            teacher, student, build_data(args), steps=args.steps,
            config=DistillConfig(
                lr=args.lr, warmup_steps=args.warmup_steps, batch_size=args.batch_size, num_views=args.views,
                num_workers=args.workers, attention_sites=tuple(args.attention_sites),
                attention_weight=args.attention_weight, output_weight=args.output_weight,
                activation_checkpointing=args.activation_checkpointing,
                autocast=not args.no_autocast, seed=args.seed, checkpoint_every=args.checkpoint_every,
                strategy=args.strategy, trainable=args.trainable,
            ),
            checkpoint_dir=args.checkpoint_dir, resume=args.resume, log_file=args.log,
            progress=not args.no_progress,
        )
        if rank == 0:
            first = result.losses[0] if result.losses else float("nan")
            last = result.losses[-1] if result.losses else float("nan")
            peak = f", peak memory {result.peak_memory_bytes / 2**30:.2f} GiB" if result.peak_memory_bytes else ""
            print(
                f"distilled {args.model} ({args.trainable}: {result.trainable_params:,} trainable parameters): "
                f"step {result.step}/{args.steps}, loss {first:.4f} -> {last:.4f}, "
                f"{result.seconds_per_step * 1e3:.1f} ms/step on {world} process(es){peak}"
                + (f"; checkpoint {result.checkpoint}" if result.checkpoint else "")
            )
            if result.interrupted:
                print("interrupted: resume with --resume")
        return 130 if result.interrupted else 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
