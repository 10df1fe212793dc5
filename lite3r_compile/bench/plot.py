"""The benchmark's PNG: latency and peak memory per model / frame count / variant, and the per-op
breakdowns as stacked bars. Needs matplotlib (``pip install lite3r-compile[viz]``); without it
the plot is skipped and the JSON says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lite3r_compile.bench.breakdown import CATEGORIES
from lite3r_compile.bench.variants import VARIANTS


def plot_results(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the figure to ``path``; returns ``{"path": ...}`` or ``{"skipped": reason}``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install matplotlib)"}
    runs = [r for r in result["runs"] if "latency_ms" in r]
    if not runs:
        return {"skipped": "no finished run to plot"}
    groups = sorted({(r["model"], r["frames"]) for r in runs}, key=lambda g: (g[0], g[1]))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    by_key = {(r["model"], r["frames"], r["variant"]): r for r in runs}
    with_bd = [r for r in runs if "breakdown" in r]

    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.6 * len(groups) + 4), 13))
    width = 0.8 / max(1, len(variants))
    for ax, metric, label, scale in ((axes[0], "latency_ms", "latency (ms, median)", 1.0),
                                     (axes[1], "peak_bytes", "peak memory incl. weights (GiB)", 2.0 ** -30)):
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for g, (model, frames) in enumerate(groups):
                r = by_key.get((model, frames, variant))
                if r is not None and r.get(metric) is not None:
                    xs.append(g + (i - (len(variants) - 1) / 2) * width)
                    ys.append(r[metric] * scale)
            ax.bar(xs, ys, width, label=variant)
        ax.set_xticks(range(len(groups)), [f"{m}\nS={s}" for m, s in groups])
        ax.set_ylabel(label)
        if any(r.get(metric) for r in runs):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {metric} on {result.get('meta', {}).get('device', 'this device')}",
                    ha="center", transform=ax.transAxes)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(variants))

    ax = axes[2]
    if with_bd:
        cats = list(CATEGORIES) + ["heads"]
        bottoms = [0.0] * len(with_bd)
        for c in cats:
            values = [r["breakdown"][c] for r in with_bd]
            ax.bar(range(len(with_bd)), values, 0.7, bottom=bottoms, label=c)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        ax.set_xticks(range(len(with_bd)), [f"{r['model']}\nS={r['frames']}\n{r['variant'].replace('student_', 's_')}"
                                            for r in with_bd], fontsize=7)
        ax.set_ylabel("busy time per category (ms)")
        ax.legend(fontsize=8, ncol=4)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no per-op breakdown in this run", ha="center")
    meta = result.get("meta", {})
    fig.suptitle(f"lite3r end-to-end benchmark: {meta.get('device_name', '')}, torch {meta.get('torch', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": str(path)}
