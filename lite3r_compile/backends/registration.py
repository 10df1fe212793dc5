"""The ``lite3r`` torch.compile backend: ``torch.compile(model, backend="lite3r")``.

Registered through the ``torch_dynamo_backends`` entry point (``lite3r =
"lite3r_compile.backends.registration:lite3r_backend"``), so it works after ``pip install`` with no
import of lite3r_compile. For each graph Dynamo captures it

1. rewrites every dense attention it can into Sparse Linear Attention, training-free (``proj_l``
   zero: block-sparse attention over the top ``topk`` key blocks, exact at ``topk=1.0``), on the
   Dynamo graph, before AOTAutograd (:mod:`lite3r_compile.backends.graph_attention`);
2. quantizes the Linear calls to FP8 with dynamic, fused activation scales
   (:mod:`lite3r_compile.backends.graph_fp8`);
3. computes once, at compile time, what does not depend on the inputs (shape-only tensors such as
   the DPT heads' sin/cos pixel embeddings, which Inductor would recompute at every call) and
   reads it from a buffer (:mod:`lite3r_compile.backends.fold_constants`);
4. gives a buffer to each transcendental a fused consumer would otherwise recompute per broadcast
   copy (VGGT's RoPE cos/sin, once per head; :mod:`lite3r_compile.backends.realize_broadcasts`);
5. routes bilinear ``F.interpolate`` calls (the DPT heads' resizing) to one Triton kernel over
   channels-last maps instead of Inductor's per-element gathers
   (:mod:`lite3r_compile.backends.graph_upsample`), on the Dynamo graph;
6. hands the graph to Inductor (or runs it as is with ``compiler="eager"``, for debugging).

Options (``torch.compile(model, backend="lite3r", options={...})``): ``topk``, ``negligible``,
``block_q``, ``block_k``, ``feature_map``, ``dense_rows`` (``(period, count)``: exact attention
for the query rows ``i % period < count``, VGGT's camera and register tokens; see
:class:`~lite3r_compile.sla.config.SLAConfig`),
``sla`` (rewrite attention, default True), ``fp8`` (default True), ``granularity``
(``"rowwise"``/``"tensorwise"``), ``fp8_exclude`` (module-path globs kept high precision),
``fold_constants`` (step 3, default True), ``realize_broadcasts`` (step 4, default True),
``bilinear_kernel`` (step 5, default True), ``compiler`` (``"inductor"``/``"eager"``),
``cuda_graphs``, ``multi_kernel`` (Inductor's ``triton.multi_kernel``: reductions over rows up to
16x wider than its persistent-reduction limit of 1024 also get a persistent variant, and the
faster of the two is picked by timing them on the first call. The FP8 quantization of a
4096-wide GELU output is such a reduction: looped, it computes the GELU twice). ``mode`` is
Inductor's (``"reduce-overhead"`` turns CUDA graphs on). An unknown option is an error.

Where the graph's tensors are not on a GPU with FP8 tensor cores, FP8 is emulated (same
rounding, float32 products) and SLA runs its PyTorch reference off CUDA; one warning says so.
Graph breaks are reported by a :class:`GraphBreakWarning` per distinct reason, and every graph
compiled leaves a :class:`GraphReport` (see :func:`compile_reports`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from lite3r_compile.backends.fold_constants import FoldConfig, FoldConstantsPass, FoldReport, fold_input_independent
from lite3r_compile.backends.fp8_linear import has_fp8_gemm
from lite3r_compile.backends.graph_attention import GraphSite, rewrite_dynamo_attention
from lite3r_compile.backends.graph_fp8 import GraphLinear, graph_prefix, quantize_dynamo_linears
from lite3r_compile.backends.graph_upsample import RoutedUpsample, UpsampleConfig, route_bilinear_upsamples
from lite3r_compile.backends.realize_broadcasts import RealizeBroadcastsPass, RealizeConfig, RealizedValue
from lite3r_compile.config import FP8Config, GRANULARITIES
from lite3r_compile.sla.config import SLAConfig

COMPILERS: tuple[str, ...] = ("inductor", "eager")


class GraphBreakWarning(UserWarning):
    """Dynamo broke the model into several graphs; each piece is compiled on its own and the
    code between pieces runs in Python."""


class NoFP8DeviceWarning(UserWarning):
    """The ``lite3r`` backend compiled for a device without FP8 GEMMs: FP8 is emulated and SLA
    runs its PyTorch reference off CUDA."""


@dataclass(frozen=True)
class CompileOptions:
    """Options of the ``lite3r`` backend (see the module docstring)."""

    topk: float = SLAConfig.topk
    negligible: float = SLAConfig.negligible
    block_q: int = SLAConfig.block_q
    block_k: int = SLAConfig.block_k
    feature_map: str = SLAConfig.feature_map
    dense_rows: tuple[int, int] | None = None
    sla: bool = True
    fp8: bool = True
    granularity: str = "rowwise"
    fp8_exclude: tuple[str, ...] = ()
    fold_constants: bool = True
    realize_broadcasts: bool = True
    bilinear_kernel: bool = True
    compiler: str = "inductor"
    cuda_graphs: bool = False
    multi_kernel: bool = False

    def __post_init__(self) -> None:
        # SLAConfig validates topk, block sizes, the feature map and dense_rows (a list becomes a tuple)
        object.__setattr__(self, "dense_rows", self.sla_config().dense_rows)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"lite3r backend: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"lite3r backend: compiler must be one of {COMPILERS}, got {self.compiler!r}")
        exclude = (self.fp8_exclude,) if isinstance(self.fp8_exclude, str) else tuple(self.fp8_exclude)
        object.__setattr__(self, "fp8_exclude", exclude)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "CompileOptions":
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"lite3r backend: unknown option(s) {unknown}; known options: {known} "
                "(torch.compile(model, backend='lite3r', options={...}))"
            )
        return cls(**options)

    def sla_config(self) -> SLAConfig:
        return SLAConfig(topk=self.topk, negligible=self.negligible, block_q=self.block_q,
                         block_k=self.block_k, feature_map=self.feature_map, dense_rows=self.dense_rows)

    def fp8_config(self) -> FP8Config:
        return FP8Config(enabled=self.fp8, granularity=self.granularity, exclude=self.fp8_exclude)


@dataclass
class GraphReport:
    """What the backend did to one Dynamo graph: the attention sites (rewritten or why not), the
    Linear calls (quantized or why not), the input-independent values computed once (``folded``:
    ``None`` with ``fold_constants`` off, or when Inductor's cache supplied the compiled graph, so
    that the pass ran only when it was first compiled), the graph breaks Dynamo reported before
    this graph, the device, and whether FP8 is emulated there. ``realized``: the values given a
    buffer so that a broadcasting kernel loads them instead of recomputing them (Inductor path
    only; empty when Inductor's cache supplied the graph). ``upsamples``: the graph's
    ``F.interpolate`` calls, routed to ``lite3r::upsample_bilinear2d`` or why not (empty with
    ``bilinear_kernel`` off)."""

    options: CompileOptions
    device: torch.device
    fp8_emulated: bool
    sites: list[GraphSite] = field(default_factory=list)
    linears: list[GraphLinear] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    folded: FoldReport | None = None
    realized: list[RealizedValue] = field(default_factory=list)
    upsamples: list[RoutedUpsample] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def quantized(self) -> int:
        return sum(lin.quantized for lin in self.linears)


_REPORTS: list[GraphReport] = []
_REPORTED_BREAKS: set[str] = set()
_WARNED_DEVICES: set[str] = set()


def compile_reports() -> list[GraphReport]:
    """One :class:`GraphReport` per graph the ``lite3r`` backend compiled in this process, oldest
    first (cleared by :func:`clear_compile_reports`)."""
    return list(_REPORTS)


def clear_compile_reports() -> None:
    _REPORTS.clear()
    _REPORTED_BREAKS.clear()


def _graph_device(example_inputs: list) -> torch.device:
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _one_line(reason: str, limit: int = 600) -> str:
    """Dynamo's multi-line reason (torch >= 2.10: a title, then the explanation, the operator and
    its argument types, hints) as one line: the title alone names no operator."""
    text = " | ".join(line.strip() for line in reason.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _new_graph_breaks() -> list[str]:
    """Graph-break reasons Dynamo counted that were not reported yet."""
    from torch._dynamo.utils import counters

    new = [reason for reason in counters["graph_break"] if reason not in _REPORTED_BREAKS]
    _REPORTED_BREAKS.update(new)
    return new


def _warn_no_fp8_device(device: torch.device, options: CompileOptions) -> None:
    parts = []
    if options.fp8:
        parts.append("FP8 GEMMs are emulated (e4m3 rounding, float32 products)")
    if options.sla and device.type != "cuda":
        parts.append("SLA runs its PyTorch reference instead of the Triton kernels")
    key = str(device)
    if key in _WARNED_DEVICES or not parts:
        return
    _WARNED_DEVICES.add(key)
    warnings.warn(
        f"lite3r backend: {device} is not a GPU of compute capability >= 8.9: " + "; ".join(parts),
        NoFP8DeviceWarning,
        stacklevel=2,
    )


def _inductor(gm: fx.GraphModule, example_inputs: list, options: CompileOptions, mode: str | None,
              report: GraphReport) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    # Round every intermediate a fused kernel computes to its dtype as eager does: the FP8
    # activation scales then come from the bf16 values the fake-quant student was trained on,
    # not from float32 values Inductor would keep in registers. (The 8.7e-2 difference first
    # measured between the compiled and eager VGGT-1B students is mostly a noise floor of random
    # weights: dense compiled against dense eager differs by 3.7e-2; benchmarks/NOTES.md.)
    patches["emulate_precision_casts"] = True
    if options.cuda_graphs:
        patches["triton.cudagraphs"] = True
    if options.multi_kernel:
        patches["triton.multi_kernel"] = 1
    # post-grad passes on the ATen graph Inductor compiles, chained after the one already set
    # (their uuids key Inductor's caches): folding first, so that a folded value is not realized
    post_grad = inductor_config.post_grad_custom_pre_pass
    if options.fold_constants:
        # a folded value becomes a constant as Inductor's freezing makes them
        def record(folded: FoldReport) -> None:
            report.folded = folded if report.folded is None else report.folded.merged(folded)

        post_grad = FoldConstantsPass(FoldConfig(), on_fold=record, after=post_grad)
    if options.realize_broadcasts:
        post_grad = RealizeBroadcastsPass(RealizeConfig(), on_realize=report.realized.extend, after=post_grad)
    if post_grad is not inductor_config.post_grad_custom_pre_pass:
        patches["post_grad_custom_pre_pass"] = post_grad
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _full_path(site: GraphSite, prefix: str | None) -> GraphSite:
    """A site's module path in the outermost module called (Dynamo's is relative to the traced
    frame); unchanged when the frame's place is unknown."""
    if not prefix:
        return site
    return dataclasses.replace(site, path=f"{prefix}.{site.path}" if site.path else prefix)


def lite3r_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                   mode: str | None = None, **more_options: Any) -> Callable:
    """The ``lite3r`` backend (a Dynamo backend: a graph and its example inputs in, a callable
    out). Options come as ``options={...}`` (what ``torch.compile`` passes) or keywords."""
    opts = CompileOptions.from_options({**(options or {}), **more_options})
    device = _graph_device(example_inputs)
    fp8_emulated = opts.fp8 and not has_fp8_gemm(device)
    if not has_fp8_gemm(device):
        _warn_no_fp8_device(device, opts)
    report = GraphReport(opts, device, fp8_emulated, graph_breaks=_new_graph_breaks())
    for reason in report.graph_breaks:
        warnings.warn(
            f"lite3r backend: Dynamo graph break (the model runs as several compiled graphs with "
            f"Python in between): {_one_line(reason)}",
            GraphBreakWarning,
            stacklevel=2,
        )
    prefix = graph_prefix(gm, example_inputs)
    if opts.sla:
        report.sites = [_full_path(site, prefix) for site in rewrite_dynamo_attention(gm, opts.sla_config())]
    site_paths = [site.path for site in report.sites] if prefix is not None else []
    report.linears = quantize_dynamo_linears(gm, example_inputs, opts.fp8_config(), site_paths)
    if opts.bilinear_kernel:
        # Dynamo guards on grad mode, so an inference graph is never reused to train
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        report.upsamples = [
            dataclasses.replace(u, path=f"{prefix}.{u.path}" if u.path else prefix) if prefix else u
            for u in route_bilinear_upsamples(gm, UpsampleConfig(), inference=not needs_grad)
        ]
    _REPORTS.append(report)
    if opts.compiler == "eager":
        if opts.fold_constants:
            report.folded = fold_input_independent(gm)
        return gm.forward
    return _inductor(gm, example_inputs, opts, mode, report)


__all__ = [
    "COMPILERS",
    "CompileOptions",
    "GraphBreakWarning",
    "GraphReport",
    "NoFP8DeviceWarning",
    "clear_compile_reports",
    "compile_reports",
    "lite3r_backend",
]
