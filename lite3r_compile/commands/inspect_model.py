"""``lite3r inspect MODEL``: the attention sites of a model and what ``lite()`` would do to it
(which sites get SLA, which Linear layers get FP8 fake-quant, what stays trainable), without
building the student.

MODEL is a zoo preset (``lite3r zoo`` lists them) or ``package.module:factory``. ``--meta`` builds
the model on the meta device (shapes only), so the 1B-parameter presets cost no memory.
"""

from __future__ import annotations

import argparse

HELP = "show a model's attention sites and the SLA / FP8 plan of lite()"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a zoo preset (see `lite3r zoo`) or module:factory")
    parser.add_argument("--meta", action="store_true",
                        help="build the model on the meta device: no memory, no weights "
                             "(for large presets whose forward runs on meta tensors)")
    add_plan_arguments(parser)


def add_plan_arguments(
    parser: argparse.ArgumentParser, default_images: tuple[int, int, int, int] | None = None
) -> None:
    """Options shared with ``lite3r demo``: the example inputs and the LiteConfig."""
    if default_images is None:
        default_text = "the model's example_inputs(), else (1, 2, 3, 4p, 4p) for a patch size p"
    else:
        default_text = " ".join(map(str, default_images))
    parser.add_argument("--images", type=int, nargs=4, metavar=("B", "S", "H", "W"),
                        default=None if default_images is None else list(default_images),
                        help=f"random example images (B, S, 3, H, W) (default: {default_text})")
    parser.add_argument("--topk", type=float, default=None, help="SLAConfig.topk (default 0.1)")
    parser.add_argument("--scopes", nargs="+", default=None, metavar="SCOPE",
                        help="attention scopes that get SLA (default: frame global cross self)")
    parser.add_argument("--no-fp8", action="store_true", help="no FP8 fake-quant")
    parser.add_argument("--fp8-granularity", choices=("rowwise", "tensorwise"), default="rowwise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def make_console():
    """A rich console; output that is not a terminal (a pipe, a log file) gets 140 columns
    rather than rich's 80, so that module paths stay on one line."""
    import os

    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=140)
    return console


def lite_config(args: argparse.Namespace):
    """The LiteConfig the command-line options describe."""
    from lite3r_compile.config import FP8Config, LiteConfig
    from lite3r_compile.sla.config import SLAConfig

    sla = SLAConfig() if args.topk is None else SLAConfig(topk=args.topk)
    fp8 = FP8Config(enabled=not args.no_fp8, granularity=args.fp8_granularity)
    if args.scopes is None:
        return LiteConfig(sla=sla, fp8=fp8)
    return LiteConfig(sla=sla, fp8=fp8, sla_scopes=tuple(args.scopes))


def build_model(spec: str, *, meta: bool = False, seed: int = 0):
    """A model from a zoo preset or ``package.module:factory``, in eval mode."""
    import importlib
    import os
    import sys

    import torch

    from lite3r_compile import models_zoo

    torch.manual_seed(seed)
    device = torch.device("meta") if meta else None
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        # `module:factory` names a module of the user's project, as `python -m` would find it
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            make = getattr(importlib.import_module(module_name), factory)
        except (ImportError, AttributeError) as err:
            raise SystemExit(f"lite3r: cannot import {spec!r}: {err}") from err
        if device is None:
            model = make()
        else:
            with device:
                model = make()
    else:
        try:
            model = models_zoo.create(spec, device=device)
        except ValueError as err:
            raise SystemExit(f"lite3r: {err}") from err
    return model.eval()


def example_inputs(model, images: list[int] | None, *, seed: int = 0):
    """Example inputs of ``model``: random images of shape ``images`` = (B, S, H, W), else the
    model's ``example_inputs()``, else (1, 2, 3, 4p, 4p) images for its ``patch_size`` p."""
    import torch

    tensor = next(model.parameters(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    if images is None and callable(getattr(model, "example_inputs", None)):
        return model.example_inputs()
    if images is None:
        patch = getattr(model, "patch_size", None)
        if not isinstance(patch, int):
            raise SystemExit(
                f"lite3r: {type(model).__name__} has no example_inputs() and no integer patch_size; "
                "give --images B S H W"
            )
        images = [1, 2, 4 * patch, 4 * patch]
    b, s, h, w = images
    x = torch.rand(b, s, 3, h, w, generator=generator)
    return (x.to(device),)


def plan(model, config, inputs):
    """The report ``lite(model, config=config)`` would give, from the attention finder and the
    FP8 planner, without building the student."""
    from lite3r_compile.config import matches_any
    from lite3r_compile.passes.attention import locate_attention
    from lite3r_compile.passes.fp8_qat import plan_fp8
    from lite3r_compile.reporting import LiteReport, failure_rows, layer_rows, site_rows

    analysis = locate_attention(model, inputs)
    sites = analysis.sites

    def planned(site) -> bool:
        return site.rewritable and config.sla_for(site.path, site.scope)[0] is not None

    # each SLA site adds proj_l = nn.Linear(head_dim, head_dim)
    sla_params = sum((s.head_dim or 0) * ((s.head_dim or 0) + 1) for s in sites if planned(s))
    params = dict(model.named_parameters())
    extra = sum(p.numel() for n, p in params.items() if matches_any(n, config.trainable))
    total = sum(p.numel() for p in params.values())
    decisions = plan_fp8(model, config.fp8, [s.path for s in sites])
    return LiteReport(
        model=type(model).__name__,
        backend="fp8",
        fp8_emulated=False,
        planned=True,
        sites=site_rows(sites, config, planned),
        fp8_layers=layer_rows(decisions),
        capture_failures=failure_rows(analysis.failures),
        trainable_params=sla_params + extra,
        frozen_params=total - extra,
        trainable_tensors=2 * sum(planned(s) for s in sites),
    )


def run(args: argparse.Namespace) -> int:
    from lite3r_compile.capture import CaptureError

    console = make_console()
    model = build_model(args.model, meta=args.meta, seed=args.seed)
    inputs = example_inputs(model, args.images, seed=args.seed)
    try:
        console.print(plan(model, lite_config(args), inputs))
    except CaptureError as err:
        hint = " (the model needs real values there; run without --meta)" if args.meta else ""
        raise SystemExit(f"lite3r inspect: {err}{hint}") from err
    return 0
