"""Pieces the subcommands share: building a model from a preset name or ``module:factory``,
and the synthetic-or-folder data argument."""

from __future__ import annotations

import argparse
import importlib


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "vggt-tiny") -> None:
    parser.add_argument("--model", default=default, help=f"a zoo preset (see `lite3r zoo`) or module:factory (default {default})")
    parser.add_argument("--weights", default=None, help="a .pt/.pth/.safetensors state dict with the model's key names")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and of the run")


def build_model(spec: str, weights: str | None = None, *, seed: int = 0, device: str = "cpu"):
    """A model from a zoo preset or ``package.module:factory``, optionally loaded from ``weights``."""
    import torch

    from lite3r_compile import models_zoo

    torch.manual_seed(seed)
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"lite3r: cannot build {spec!r}: {exc}") from exc
    else:
        model = models_zoo.create(spec)
    if weights:
        models_zoo.load(model, weights)
    return model.to(device)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic", help="'synthetic' (procedural scenes) or a folder of scene folders")
    parser.add_argument("--scenes", type=int, default=64, help="number of synthetic scenes (default 64)")
    parser.add_argument("--views", type=int, default=4, help="views per scene (default 4)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=(56, 56), help="synthetic image size (default 56 56)")


def build_data(args: argparse.Namespace, *, seed_offset: int = 0):
    from lite3r_compile.distill.data import MultiViewFolder
    from lite3r_compile.distill.synthetic import SyntheticScenes, SyntheticSceneConfig

    if args.data == "synthetic":
        h, w = args.image_size
        return SyntheticScenes(args.scenes, SyntheticSceneConfig(num_views=args.views, height=h, width=w), seed=args.seed + seed_offset)
    return MultiViewFolder(args.data, args.views, seed=args.seed)
