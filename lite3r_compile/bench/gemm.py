"""GEMM ceilings on the model's own Linear shapes, measured in the benchmark's run.

:func:`linear_calls` records every ``nn.Linear`` call of one eager forward (path, M rows, K in,
N out). :func:`gemm_rates` times, for each distinct shape, the bf16 GEMM (``F.linear``) and the
FP8 GEMM alone (``torch._scaled_mm`` on operands quantized beforehand, rowwise e4m3 scales as
:class:`~lite3r_compile.backends.fp8_linear.Float8Linear` uses), with
``triton.testing.do_bench`` (CUDA events, median). :func:`expected_linear_ms` adds up what the
backbone's Linear layers would take at those rates (FP8 layers at the FP8 rate, the rest at the
bf16 rate): the student's measured Linear + quantization time is compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LinearCall:
    """One call of an ``nn.Linear``: module ``path``, input rows ``m`` (all leading dims),
    ``k`` in-features, ``n`` out-features, ``bias``, the input ``dtype`` name."""

    path: str
    m: int
    k: int
    n: int
    bias: bool
    dtype: str


def linear_calls(model: nn.Module, call: Callable[[], Any]) -> list[LinearCall]:
    """The Linear calls of one ``call()`` of ``model`` (forward hooks, removed afterwards)."""
    calls: list[LinearCall] = []
    handles = []

    def record(path: str):
        def hook(module: nn.Linear, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            calls.append(LinearCall(path, x.numel() // x.shape[-1], module.in_features, module.out_features,
                                    module.bias is not None, str(x.dtype).replace("torch.", "")))
        return hook

    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(record(path)))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _bench_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import statistics
    import time

    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def gemm_rates(shapes: set[tuple[int, int, int, bool]], device: torch.device) -> list[dict[str, Any]]:
    """For each (m, k, n, bias): bf16 and (where the device has FP8 GEMMs) FP8 GEMM milliseconds
    and TFLOP/s. Operands are random normal, never zeros."""
    from lite3r_compile.backends.fp8_linear import has_fp8_gemm, quantize_to_e4m3

    fp8 = has_fp8_gemm(device)
    rows = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n, bias in sorted(shapes):
        x = torch.randn(m, k, generator=generator).to(device=device, dtype=torch.bfloat16)
        w = (torch.randn(n, k, generator=generator) * k ** -0.5).to(device=device, dtype=torch.bfloat16)
        b = torch.randn(n, generator=generator).to(device=device, dtype=torch.bfloat16) if bias else None
        flop = 2.0 * m * k * n
        row: dict[str, Any] = {"m": m, "k": k, "n": n, "bias": bias}
        row["bf16_ms"] = _bench_ms(lambda: F.linear(x, w, b), device)
        row["bf16_tflops"] = flop / row["bf16_ms"] / 1e9
        if fp8:
            x_q, x_scale = quantize_to_e4m3(x, True)
            w_q, w_scale = quantize_to_e4m3(w, True)
            w_t, w_scale_t = w_q.t(), w_scale.t()
            row["fp8_ms"] = _bench_ms(lambda: torch._scaled_mm(x_q, w_t, scale_a=x_scale, scale_b=w_scale_t, bias=b,
                                                               out_dtype=torch.bfloat16), device)
            row["fp8_tflops"] = flop / row["fp8_ms"] / 1e9
        rows.append(row)
        del x, w, b
    return rows


def expected_linear_ms(calls: list[LinearCall], fp8_paths: set[str], rates: list[dict[str, Any]],
                       exclude_prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Milliseconds the Linear calls (minus those under ``exclude_prefixes``, the heads) take at the
    measured GEMM rates: ``fp8_student_ms`` with the layers in ``fp8_paths`` at the FP8 rate and
    the others at bf16's, ``bf16_ms`` all at bf16's. ``None`` where a rate is missing."""
    by_shape = {(r["m"], r["k"], r["n"], r["bias"]): r for r in rates}
    student: float | None = 0.0
    dense = 0.0
    counted = fp8_calls = 0
    for c in calls:
        if any(c.path == p or c.path.startswith(p + ".") for p in exclude_prefixes):
            continue
        row = by_shape[(c.m, c.k, c.n, c.bias)]
        counted += 1
        dense += row["bf16_ms"]
        if c.path in fp8_paths:
            fp8_calls += 1
            student = None if student is None or "fp8_ms" not in row else student + row["fp8_ms"]
        elif student is not None:
            student += row["bf16_ms"]
    return {"calls": counted, "fp8_calls": fp8_calls, "bf16_ms": dense, "fp8_student_ms": student}


def shapes_of(calls: list[LinearCall], exclude_prefixes: tuple[str, ...] = ()) -> set[tuple[int, int, int, bool]]:
    """The distinct (m, k, n, bias) of the calls outside ``exclude_prefixes``."""
    return {(c.m, c.k, c.n, c.bias) for c in calls
            if not any(c.path == p or c.path.startswith(p + ".") for p in exclude_prefixes)}
