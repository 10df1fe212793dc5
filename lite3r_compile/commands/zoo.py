"""`lite3r zoo`: list the models zoo's presets with their parameter counts.

Counts come from building each preset on the meta device (shapes only, no memory). A preset
whose module is not present is listed as unavailable with the reason, not skipped.
"""

from __future__ import annotations

import argparse

HELP = "list the models zoo's presets with their parameter counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets",
        nargs="*",
        metavar="PRESET",
        help="presets to show (default: all)",
    )
    parser.add_argument(
        "--no-count",
        action="store_true",
        help="do not build the presets to count parameters (faster)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lite3r_compile import models_zoo
    from lite3r_compile.models_zoo.presets import PRESETS

    names = args.presets or models_zoo.list_presets()
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        print(f"lite3r zoo: unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
        return 2

    table = Table(title="lite3r-compile models zoo")
    table.add_column("preset", style="bold")
    if not args.no_count:
        table.add_column("parameters", justify="right")
    table.add_column("builder")
    table.add_column("description")
    for name in names:
        preset = PRESETS[name]
        row = [name]
        if not args.no_count:
            row.append(_count(models_zoo, name))
        row += [preset.target, preset.description]
        table.add_row(*row)
    Console().print(table)
    return 0


def _count(models_zoo, name: str) -> str:
    try:
        model = models_zoo.create(name, device="meta")
    except models_zoo.PresetUnavailableError as error:
        return f"unavailable: {error.__cause__ or error}"
    return f"{models_zoo.count_parameters(model):,}"
