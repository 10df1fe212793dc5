"""End-to-end benchmark: VGGT-1B and DA3-Large, dense bf16 eager / compiled against the lite
students (FP8 + SLA, FP8 only, SLA only). The same as ``lite3r bench``; see
:mod:`lite3r_compile.bench`.

    python benchmarks/e2e.py --models vggt-1b da3-large --out benchmarks/results --time-budget-s 450
"""

from __future__ import annotations

import argparse
import sys

from lite3r_compile.commands import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=bench.HELP)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
