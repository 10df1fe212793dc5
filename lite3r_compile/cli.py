"""The ``lite3r`` command line.

Each subcommand lives in its own module under :mod:`lite3r_compile.commands`, which defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Command modules import
nothing heavy at module level (torch, models, Triton are imported inside ``run``), so building the
parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under lite3r_compile.commands
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "zoo": "zoo",
    "inspect": "inspect_model",
    "distill": "distill",
    "eval": "eval_model",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lite3r",
        description="Sparse Linear Attention + FP8 students of 3D reconstruction transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        command = _load(module)
        p = sub.add_parser(name, help=command.HELP, description=command.HELP)
        p.set_defaults(_module=module)
        command.add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(f"lite3r_compile.commands.{module}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(_load(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
