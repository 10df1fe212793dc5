"""Latency, peak memory and output error of one model call.

Latency: the first call (compilation included) is timed on its own and reported as warm-up; one
more untimed call follows; then ``iters`` calls are timed one by one with CUDA events (host clock
after a synchronize on a CPU) and the median is the latency. The number of timed calls adapts to
the call's length: as many as fit in ``target_s``, between ``min_iters`` and ``max_iters``.

Peak memory: ``torch.cuda.reset_peak_memory_stats`` before the timed calls, then
``max_memory_allocated - memory_allocated_before`` plus the free bytes of CUDA graphs' private
memory pools is the call's working memory (activations, workspaces, outputs); adding the bytes of
the weights the call runs on gives the peak of a process that holds that model alone. The
process-wide numbers are kept too.

The pools' term is what CUDA graphs would otherwise hide: a graph's intermediate buffers were
allocated from its private pool while it was recorded and are free blocks of that pool after, so
``memory_allocated`` does not count them, and a replay allocates nothing; yet the pool keeps those
bytes reserved for the graph (``empty_cache`` cannot release them). Without CUDA graphs the term is
zero.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class Timing:
    """``first_call_s``: the first call (compilation included); ``compile_s``: that minus one
    steady call; ``latency_ms``: median of the timed calls, ``samples_ms`` all of them;
    ``working_bytes``: peak allocated during the timed calls minus allocated before them, plus
    ``graph_pool_free_bytes`` (the free bytes of the CUDA graphs' private pools that the warm-up
    calls added); ``allocated_before_bytes`` / ``max_allocated_bytes``: process-wide; ``output``: the
    output of the second call (for error checks)."""

    first_call_s: float
    compile_s: float
    latency_ms: float
    samples_ms: list[float]
    working_bytes: int | None
    allocated_before_bytes: int | None
    max_allocated_bytes: int | None
    graph_pool_free_bytes: int | None = None
    output: Any = field(repr=False, default=None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Collect garbage and give cached blocks back, so the next variant starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_pool_free_bytes(device: torch.device) -> int:
    """Bytes reserved in the CUDA graphs' private memory pools of ``device`` that no live tensor
    occupies (segments whose pool id is not the default pool's (0, 0))."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free = 0
    for segment in torch.cuda.memory_snapshot():
        if segment["device"] == index and tuple(segment["segment_pool_id"]) != (0, 0):
            free += segment["total_size"] - segment["allocated_size"]
    return free


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, output) of one call, synchronized."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def time_forward(fn: Callable[[], Any], device: torch.device, *, target_s: float = 2.0,
                 min_iters: int = 3, max_iters: int = 20, after_warmup: Callable[[], None] | None = None) -> Timing:
    """Warm up, then time ``fn`` (see the module docstring). ``min_iters`` may be 1 (tests).
    ``after_warmup`` is called once the two warm-up calls are done, before the timed ones."""
    cuda = device.type == "cuda"
    # pools left by earlier runs in this process are not this call's
    pools_at_start = graph_pool_free_bytes(device) if cuda else 0
    first_s, _ = timed_call(fn, device)
    second_s, output = timed_call(fn, device)
    if after_warmup is not None:
        after_warmup()
    iters = max(min_iters, min(max_iters, math.ceil(target_s / max(second_s, 1e-6))))

    release_memory(device)
    before = peak = pools = None
    if cuda:
        pools = max(0, graph_pool_free_bytes(device) - pools_at_start)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()  # the output is dropped at once: no two outputs are alive together
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        samples = []
        for _ in range(iters):
            start_t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start_t) * 1e3)
    latency = statistics.median(samples)
    return Timing(
        first_call_s=first_s,
        compile_s=max(0.0, first_s - latency / 1e3),
        latency_ms=latency,
        samples_ms=samples,
        working_bytes=None if peak is None else peak - before + pools,
        allocated_before_bytes=before,
        max_allocated_bytes=peak,
        graph_pool_free_bytes=pools,
        output=output,
    )


def relative_errors(output: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """``||out - ref|| / ||ref||`` (L2, float64) per key of ``reference``; NaN where the output is
    missing, has another shape or is not finite (a NaN never passes a threshold)."""
    errors = {}
    for key, ref in reference.items():
        out = output.get(key)
        if out is None or out.shape != ref.shape:
            errors[key] = math.nan
            continue
        out64, ref64 = out.detach().to(torch.float64), ref.detach().to(device=out.device, dtype=torch.float64)
        if not bool(torch.isfinite(out64).all()):
            errors[key] = math.nan
            continue
        errors[key] = float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
    return errors


def worst(errors: dict[str, float]) -> float:
    """The largest error, NaN if any is NaN (or there are none)."""
    values = list(errors.values())
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return max(values)
