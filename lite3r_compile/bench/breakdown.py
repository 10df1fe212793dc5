"""Per-op time breakdown of one model call from a ``torch.profiler`` trace.

On CUDA every GPU kernel (and memcpy / memset) of the call is put in one category by its name:

==================  ===========================================================================
``attention``       FlashAttention / cuDNN / memory-efficient SDPA kernels, the SLA Triton kernels
``linear``          GEMMs: cuBLAS(Lt) (``gemm``, ``nvjet``, ``xmma``, ``sm90``), CUTLASS,
                    ``_scaled_mm``, Inductor's mm templates, split-K reductions
``conv``            convolutions (the patch embedding; in the heads, DPT's convolutions)
``quantization``    kernels that produce float8: eager casts to ``Float8_e4m3fn`` and Inductor
                    kernels whose fused ops include an absmax (``amax``), also when the
                    quantization is fused into the producing LayerNorm or elementwise kernel
``norm_elementwise`` LayerNorm, softmax outside attention, RoPE, GELU, residual adds, copies:
                    every other ATen elementwise / reduction kernel and Inductor
                    pointwise / reduction / persistent kernel
``other``           memcpy, memset and anything unmatched
``heads``           every kernel after the first head marker (:func:`models.head_marker`), whatever
                    its kind; ``heads_detail`` splits the heads by the categories above
==================  ===========================================================================

On a CPU the same is done with the leaf ATen ops of the trace (their self time).
Times are sums of kernel durations in milliseconds (busy time); ``span_ms`` is the first kernel's
start to the last one's end, so ``span_ms - busy_ms`` is time the GPU sat idle (launch gaps).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import torch

from lite3r_compile.bench.models import HEADS_RANGE_PREFIX, MARKER_KERNEL

CATEGORIES: tuple[str, ...] = ("attention", "linear", "conv", "quantization", "norm_elementwise", "other")

_ATTENTION = ("flash", "fmha", "attention", "sdpa", "_sla_", "_block_mean_kernel", "_classify_kernel",
              "_critical_lut_kernel", "_key_block_state_kernel", "_marginal_sum_kernel", "sla_forward")
_CONV = ("conv", "fprop", "dgrad", "wgrad", "winograd", "implicit_gemm", "im2col", "col2im")
_LINEAR = ("gemm", "nvjet", "xmma", "cutlass", "scaled_mm", "splitk", "triton_tem_", "aten::mm", "aten::addmm",
           "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "cublas", "sm90_", "sm80_", "ampere_", "hopper")
_QUANT = ("float8", "fp8", "e4m3", "amax", "quant")
_ELEMENTWISE = ("triton_poi", "triton_red", "triton_per", "elementwise", "reduce", "norm", "softmax", "copy",
                "cat", "index", "gather", "scatter", "fill", "aten::", "vectorized", "unrolled", "upsample",
                "interp", "pool", "gelu", "silu", "sum", "mean", "where", "distribution")


def classify(name: str) -> str:
    """The category of a kernel (or CPU op) called ``name``."""
    low = name.lower()
    if any(p in low for p in _ATTENTION):
        return "attention"
    if any(p in low for p in _CONV) and "triton" not in low:
        return "conv"
    # an Inductor kernel's name lists the ops fused into it: a LayerNorm + absmax kernel that
    # feeds _scaled_mm carries "_scaled_mm" in its name, and is quantization, not a GEMM
    if low.startswith(("triton_poi", "triton_red", "triton_per")) and any(p in low for p in _QUANT):
        return "quantization"
    if any(p in low for p in _LINEAR):
        return "linear"
    if any(p in low for p in _QUANT):
        return "quantization"
    if low.startswith(("memcpy", "memset")) or "memcpy" in low or "memset" in low:
        return "other"
    if any(p in low for p in _ELEMENTWISE):
        return "norm_elementwise"
    return "other"


def trace_events(fn: Callable[[], Any], device: torch.device) -> list[dict]:
    """The chrome-trace events of one call of ``fn`` under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def _self_times(events: list[dict]) -> list[tuple[dict, float, str | None]]:
    """(event, self time in µs, category forced by an ancestor) of CPU ops, per thread: the
    duration minus that of the ops nested in it. Ops nested in an attention op (the SLA reference
    runs as matmuls and softmax inside ``lite3r::sla_forward``) count as attention."""
    out: list[tuple[dict, float, str | None]] = []
    by_thread: dict[Any, list[dict]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack: list[list] = []  # [event, end, child time, forced category]
        done: list[list] = []
        for e in thread:
            start, dur = float(e["ts"]), float(e.get("dur", 0))
            while stack and stack[-1][1] <= start:
                done.append(stack.pop())
            forced = None
            if stack:
                stack[-1][2] += dur
                forced = stack[-1][3]
            if forced is None and classify(e["name"]) == "attention":
                forced = "attention"
            stack.append([e, start + dur, 0.0, forced])
        done.extend(stack)
        out.extend((e, max(0.0, float(e.get("dur", 0)) - child), forced) for e, _, child, forced in done)
    return out


def breakdown(events: list[dict], device: torch.device) -> dict[str, Any]:
    """Milliseconds per category (see the module docstring) of the trace ``events``."""
    if device.type == "cuda":
        items = [(e, float(e.get("dur", 0)), None) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset", "Kernel", "Memcpy", "Memset")]
        markers = [float(e["ts"]) for e, _, _ in items if MARKER_KERNEL in e["name"]]
        items = [item for item in items if MARKER_KERNEL not in item[0]["name"]]
    else:
        cpu_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "Operator")]
        markers = [float(e["ts"]) for e in cpu_ops if e["name"].startswith(HEADS_RANGE_PREFIX)]
        ops = [e for e in cpu_ops if e.get("cat") != "user_annotation" and not e["name"].startswith("lite3r.bench")]
        items = _self_times(ops)
    heads_start = min(markers) if markers else None
    totals = {c: 0.0 for c in CATEGORIES}
    heads = {c: 0.0 for c in CATEGORIES}
    first = last = None
    for e, dur, forced in items:
        start = float(e["ts"])
        first = start if first is None else min(first, start)
        last = start + float(e.get("dur", 0)) if last is None else max(last, start + float(e.get("dur", 0)))
        target = heads if heads_start is not None and start >= heads_start else totals
        target[forced or classify(e["name"])] += dur / 1e3
    result: dict[str, Any] = {c: totals[c] for c in CATEGORIES}
    result["heads"] = sum(heads.values())
    result["heads_detail"] = heads
    result["busy_ms"] = sum(totals.values()) + result["heads"]
    result["span_ms"] = 0.0 if first is None else (last - first) / 1e3
    result["heads_marked"] = heads_start is not None
    result["source"] = "cuda kernels" if device.type == "cuda" else "cpu ops (self time)"
    return result


def top_kernels(events: list[dict], device: torch.device, n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` kernels (CPU: ops) with the most total time: name (cut to 120 characters),
    category, calls, milliseconds."""
    if device.type == "cuda":
        items = [(e["name"], float(e.get("dur", 0))) for e in events if e.get("cat") in ("kernel", "Kernel")]
    else:
        ops = [e for e in events if e.get("cat") in ("cpu_op", "Operator")]
        items = [(e["name"], t) for e, t, _ in _self_times(ops)]
    table: dict[str, list[float]] = {}
    for name, dur in items:
        row = table.setdefault(name, [0, 0.0])
        row[0] += 1
        row[1] += dur / 1e3
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": name[:120], "category": classify(name), "calls": int(calls), "ms": ms}
            for name, (calls, ms) in rows]
