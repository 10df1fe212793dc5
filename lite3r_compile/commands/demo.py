"""``lite3r demo``: ``lite()`` on a zoo model on the CPU, its report, and how far the student's
outputs are from the dense teacher's.

Two students are built from one random-initialised teacher: one with ``topk=1.0`` and FP8 off,
which must reproduce the teacher (every key block is critical, ``proj_l`` starts at zero), and
one with the default config (SLA at ``topk=0.1`` plus e4m3 fake-quant), untrained, whose
difference is what distillation then reduces.

Inputs: random images of shape ``--images`` (default 1 x 4 x 3 x 56 x 56: on vggt-tiny global
attention then spans 84 tokens, two 64-token key blocks, so SLA's sparsity shows), or with
``--own-inputs`` the model's ``example_inputs()`` (for VGGT these add query points, so the track
head runs too, at about twice the time).
"""

from __future__ import annotations

import argparse

from lite3r_compile.commands.inspect_model import add_plan_arguments

HELP = "run lite() on vggt-tiny on the CPU: the report and the dense-vs-student output difference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vggt-tiny",
                        help="a zoo preset (see `lite3r zoo`) or module:factory (default vggt-tiny)")
    parser.add_argument("--own-inputs", action="store_true",
                        help="use the model's example_inputs() instead of random images")
    add_plan_arguments(parser, default_images=DEMO_IMAGES)


DEMO_IMAGES = (1, 4, 56, 56)  # B, S, H, W


def demo_inputs(model, args: argparse.Namespace):
    """The demo's inputs (see the module docstring)."""
    from lite3r_compile.commands.inspect_model import example_inputs

    if args.own_inputs:
        return example_inputs(model, None, seed=args.seed)
    return example_inputs(model, args.images, seed=args.seed)


def _leaves(prefix: str, value) -> list[tuple[str, object]]:
    """Named tensors of a model output (a tensor, or dicts / lists / tuples of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, dict):
        return [
            leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}" if prefix else str(k), v)
        ]
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(f"{prefix}[{i}]", v)]
    return []


def call(model, inputs):
    """``model`` on example inputs given as a tuple, one tensor or a kwargs dict."""
    import torch

    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)


def differences(dense, students: dict[str, object]) -> list[tuple[str, tuple, list[tuple[float, float]]]]:
    """For each output tensor of ``dense``: its name, shape, and for each student the relative L2
    error ``||s - d|| / ||d||`` and the largest absolute difference ``max |s - d|``."""
    columns = {name: dict(_leaves("", out)) for name, out in students.items()}
    rows = []
    for key, d in _leaves("", dense):
        d = d.float()
        cells = []
        for name in students:
            diff = columns[name][key].float() - d
            cells.append(((diff.norm() / d.norm().clamp(min=1e-30)).item(), diff.abs().max().item()))
        rows.append((key, tuple(d.shape), cells))
    return rows


def difference_table(dense, students: dict[str, object]):
    """:func:`differences` as a rich table."""
    from rich.table import Table

    table = Table(
        title="Student vs dense teacher (relative L2 error / max |diff|)",
        title_justify="left",
        caption="topk=1 without FP8 is exact SLA: it must match the teacher. The default student "
                "(untrained SLA + FP8 fake-quant) is what distillation then trains.",
        caption_justify="left",
    )
    table.add_column("output")
    table.add_column("shape")
    for name in students:
        table.add_column(name, justify="right")
    for key, shape, cells in differences(dense, students):
        values = (f"{rel:.2e} / {peak:.2e}" for rel, peak in cells)
        table.add_row(key, "x".join(map(str, shape)), *values)
    return table


def run(args: argparse.Namespace) -> int:
    import time
    import warnings

    import torch
    from rich.text import Text

    from lite3r_compile.api import lite_variants
    from lite3r_compile.capture import CaptureError
    from lite3r_compile.commands.inspect_model import build_model, lite_config, make_console
    from lite3r_compile.config import FP8Config, LiteConfig
    from lite3r_compile.reporting import report
    from lite3r_compile.sla.config import SLAConfig

    console = make_console()
    start = time.perf_counter()
    teacher = build_model(args.model, seed=args.seed)
    inputs = demo_inputs(teacher, args)
    config = lite_config(args)
    exact = LiteConfig(
        sla=SLAConfig(topk=1.0), fp8=FP8Config(enabled=False), sla_scopes=config.sla_scopes
    )
    default_name = f"topk={config.sla.topk}, FP8 {'on' if config.fp8.enabled else 'off'}"

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            student, exact_student = lite_variants(teacher, [config, exact], example_inputs=inputs)
        except CaptureError as err:
            raise SystemExit(f"lite3r demo: {err}") from err
        dense = call(teacher, inputs)
        outputs = {"topk=1, no FP8": call(exact_student, inputs), default_name: call(student, inputs)}

    console.print(report(student))
    for w in {str(w.message): w for w in caught}.values():
        console.print(Text.assemble(("warning: ", "yellow"), str(w.message)))
    console.print(difference_table(dense, outputs))
    shapes = [tuple(leaf.shape) for _, leaf in _leaves("", inputs)]
    console.print(
        f"{args.model}: {sum(p.numel() for p in teacher.parameters()):,} parameters, inputs "
        f"{', '.join('x'.join(map(str, s)) for s in shapes)}; "
        f"done in {time.perf_counter() - start:.1f} s"
    )
    return 0
