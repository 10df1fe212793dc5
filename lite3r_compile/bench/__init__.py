"""The end-to-end benchmark (``lite3r bench``, ``benchmarks/e2e.py``): dense bf16 eager and
compiled models against their lite students (FP8 + SLA, FP8 only, SLA only), with latency, peak
memory, per-op breakdown, GEMM ceilings on the model's own shapes and correctness, written as
JSON and a PNG.

    from lite3r_compile.bench import BenchConfig, run_benchmark
    run_benchmark(BenchConfig(models=("vggt-tiny",), device="cpu", frames=(1, 2)))

Modules: ``models`` (bf16 backbone, float32 heads), ``variants`` (what runs and how it is built),
``timing``, ``breakdown`` (profiler categories), ``gemm`` (GEMM ceilings), ``claims`` (the
targets), ``plot``, ``runner`` (the run within a time budget).
"""

from __future__ import annotations

from lite3r_compile.bench.runner import BenchConfig, run_benchmark
from lite3r_compile.bench.variants import VARIANTS, StudentOptions

__all__ = ["BenchConfig", "StudentOptions", "VARIANTS", "run_benchmark"]
