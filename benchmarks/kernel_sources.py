"""Copy the Triton source of the hottest Inductor kernels of an e2e result out of the cache.

The end-to-end benchmark names each run's slowest kernels (``top_kernels`` in its JSON). For the
ones Inductor generated (``triton_*``), this finds the generated source in Inductor's cache
directory (the files that define ``def <name>(``) and copies them, with the runs and times that
named it, so the launch shapes (``xnumel``, ``r0_numel``), the loads and the reduction strategy
(``triton_per_`` persistent, ``triton_red_`` looped) can be read after the machine is gone.

    python benchmarks/kernel_sources.py benchmarks/results/e2e.json --out $OUT/kernels
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def hot_triton_kernels(result: dict, top: int) -> dict[str, list[str]]:
    """``kernel name -> ["model S=.. variant: ms over calls", ...]`` for the ``top`` slowest
    Inductor kernels of every compiled run."""
    named: dict[str, list[str]] = {}
    for run in result.get("runs", []):
        kernels = [k for k in run.get("top_kernels") or [] if k["name"].startswith("triton_")]
        for k in kernels[:top]:
            where = f"{run['model']} S={run['frames']} {run['variant']}: {k['ms']:.2f} ms over {k['calls']} calls"
            named.setdefault(k["name"], []).append(where)
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="an e2e JSON (benchmarks/e2e.py)")
    parser.add_argument("--cache-dir", default=None, help="Inductor's cache (default: torch's)")
    parser.add_argument("--top", type=int, default=6, help="kernels per run (default 6)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = Path(args.cache_dir or cache_dir())
    named = hot_triton_kernels(json.loads(Path(args.result).read_text()), args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Inductor writes each kernel to a file of its own as well as into the graph's output code
    # (which also defines ``call``). It numbers kernels per graph, so one name can be several
    # kernels of several graphs (the dense and the student's, float32 and bfloat16): all are kept,
    # as name.0.py, name.1.py, ..., and the reader matches them to a run by their shapes and dtypes.
    found: dict[str, list[Path]] = {name: [] for name in named}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.stat().st_size):
        text = path.read_text(errors="replace")
        if "def call(" in text:
            continue
        for name in named:
            if f"def {name}(" in text:
                found[name].append(path)
                copy = out / f"{name}.{len(found[name]) - 1}.py"
                copy.write_text(f"# {path}\n# " + "\n# ".join(named[name]) + "\n" + text)
    index = {name: {"runs": runs, "sources": [str(p) for p in found[name]]} for name, runs in named.items()}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    for name, entry in index.items():
        count = len(entry["sources"])
        print(f"{f'{count} found' if count else 'MISSING':>8} {name}: {entry['runs'][0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
