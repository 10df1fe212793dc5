"""``report(student)``: what ``lite()`` rewrote, quantized, froze and left trainable, as a table.

A :class:`LiteReport` holds the facts as rows; ``print(report)`` (or ``str``) renders them as text
tables, and a rich console renders them in colour. Rows whose paths differ only in layer indices
(``blocks.0.attn`` ... ``blocks.23.attn``) with the same outcome fold into one ``blocks.*.attn``
row with a count; ``LiteReport.sites`` and ``LiteReport.fp8_layers`` keep every row.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

# A layer index inside a dotted module path: "blocks.3.attn", "0.weight", "'layers.12'".
PATH_INDEX = re.compile(r"(?:(?<=\.)|(?<=^)|(?<='))\d+(?=\.|$|')")
QUOTED = re.compile(r"'[^']*'")


@dataclass(frozen=True)
class SiteRow:
    """One attention site: ``sla`` is whether it is (or, in a plan, would be) Sparse Linear
    Attention; ``detail`` gives the SLA settings, or why it stays dense."""

    path: str
    scope: str
    form: str
    num_heads: int | None
    head_dim: int | None
    sla: bool
    detail: str


@dataclass(frozen=True)
class LayerRow:
    """One Linear layer: whether it is fake-quantized to FP8, and the rule that decided."""

    path: str
    in_features: int
    out_features: int
    quantized: bool
    reason: str


@dataclass(frozen=True)
class FailureRow:
    """A module whose forward could not be captured (its children were captured on their own)."""

    path: str
    module_type: str
    reason: str


@dataclass(frozen=True)
class LiteReport:
    """What ``lite()`` did to a model (``planned=False``) or would do (``planned=True``, from
    ``lite3r inspect``). Parameter counts are elements; tied parameters count once."""

    model: str
    backend: str
    fp8_emulated: bool
    planned: bool
    sites: tuple[SiteRow, ...]
    fp8_layers: tuple[LayerRow, ...]
    capture_failures: tuple[FailureRow, ...]
    trainable_params: int
    frozen_params: int
    trainable_tensors: int
    notes: tuple[str, ...] = ()

    @property
    def sla_sites(self) -> tuple[SiteRow, ...]:
        return tuple(s for s in self.sites if s.sla)

    @property
    def dense_sites(self) -> tuple[SiteRow, ...]:
        return tuple(s for s in self.sites if not s.sla)

    @property
    def quantized_layers(self) -> tuple[LayerRow, ...]:
        return tuple(r for r in self.fp8_layers if r.quantized)

    @property
    def skipped_layers(self) -> tuple[LayerRow, ...]:
        return tuple(r for r in self.fp8_layers if not r.quantized)

    def __rich_console__(self, console: Any, options: Any):
        yield from self._renderables()

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=140, color_system=None, force_terminal=False)
        for renderable in self._renderables():
            console.print(renderable)
        return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines()) + "\n"

    def _renderables(self) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        verb = "would get" if self.planned else "got"
        head = Text(
            f"{self.model}: {len(self.sla_sites)} of {len(self.sites)} attention sites {verb} SLA, "
            f"{len(self.quantized_layers)} of {len(self.fp8_layers)} Linear layers {verb} FP8 "
            f"fake-quant; backend {self.backend!r}"
            + (" (FP8 emulated)" if self.fp8_emulated else ""),
            style="bold",
        )
        out: list[Any] = [head]

        sites = Table(title="Attention sites", title_justify="left", expand=False)
        for column in ("path", "n", "scope", "form", "heads x dim", "", "detail"):
            sites.add_column(column, overflow="fold")
        for (path, scope, form, heads, sla, detail), n in _fold(
            (s.path, s.scope, s.form, _heads(s), s.sla, s.detail) for s in self.sites
        ):
            sites.add_row(path, str(n), scope, form, heads,
                          Text("SLA", "green") if sla else Text("dense", "yellow"), detail)
        if not self.sites:
            sites.add_row("(none found)", "", "", "", "", "", "")
        out.append(sites)

        layers = Table(title="FP8 fake-quant (Linear layers)", title_justify="left")
        for column in ("path", "n", "in -> out", "", "rule"):
            layers.add_column(column, overflow="fold")
        for (path, dims, quantized, reason), n in _fold(
            (r.path, f"{r.in_features} -> {r.out_features}", r.quantized, r.reason)
            for r in self.fp8_layers
        ):
            layers.add_row(path, str(n), dims,
                           Text("FP8", "green") if quantized else Text("high", "yellow"), reason)
        if not self.fp8_layers:
            layers.add_row("(no Linear layers)", "", "", "", "")
        out.append(layers)

        if self.capture_failures:
            failures = Table(title="Modules not captured (their children were)", title_justify="left")
            for column in ("path", "n", "type", "reason"):
                failures.add_column(column, overflow="fold")
            for (path, kind, reason), n in _fold(
                (f.path, f.module_type, f.reason) for f in self.capture_failures
            ):
                failures.add_row(path, str(n), kind, _short(reason, 160))
            out.append(failures)

        total = self.trainable_params + self.frozen_params
        params = Table(title="Parameters", title_justify="left")
        for column in ("", "elements", "share"):
            params.add_column(column, justify="right")
        label = "trainable (planned)" if self.planned else "trainable"
        params.add_row(label, f"{self.trainable_params:,}", _share(self.trainable_params, total))
        params.add_row("frozen", f"{self.frozen_params:,}", _share(self.frozen_params, total))
        out.append(params)
        for note in self.notes:
            out.append(Text(f"note: {note}", style="italic"))
        return out


def _heads(site: SiteRow) -> str:
    if site.num_heads is None or site.head_dim is None:
        return "?"
    return f"{site.num_heads} x {site.head_dim}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _share(n: int, total: int) -> str:
    return f"{100.0 * n / total:.3f}%" if total else "-"


def _fold(rows: Iterable[tuple]) -> list[tuple[tuple, int]]:
    """Rows whose first field is a module path, with layer indices replaced by ``*`` in that path
    and in quoted paths of the other text fields, merged when equal, in first-seen order, with
    their counts."""
    counts: dict[tuple, int] = {}
    for path, *rest in rows:
        key = (PATH_INDEX.sub("*", path),) + tuple(
            QUOTED.sub(lambda m: PATH_INDEX.sub("*", m.group()), v) if isinstance(v, str) else v
            for v in rest
        )
        counts[key] = counts.get(key, 0) + 1
    return list(counts.items())


def site_rows(sites: Iterable[Any], config: Any, is_sla: Any) -> tuple[SiteRow, ...]:
    """Rows for ``sites`` (AttentionSite). ``is_sla(site)``: whether the site is SLA;
    ``config``: the LiteConfig, for the SLA settings and the configured reasons to stay dense."""
    rows = []
    for site in sites:
        sla_config, why_not = config.sla_for(site.path, site.scope)
        sla = bool(is_sla(site))
        if sla:
            c = sla_config or config.sla
            detail = f"topk={c.topk} negligible={c.negligible} blocks={c.block_q}x{c.block_k}"
        elif not site.rewritable:
            detail = site.reason or "not rewritable"
        elif sla_config is None:
            detail = why_not
        else:
            detail = site.reason or "not rewritten"
        rows.append(SiteRow(site.path, site.scope, site.form, site.num_heads, site.head_dim, sla, detail))
    return tuple(rows)


def layer_rows(decisions: Iterable[Any]) -> tuple[LayerRow, ...]:
    """Rows for the FP8 pass's ``FP8LayerDecision`` records."""
    return tuple(
        LayerRow(d.path, d.in_features, d.out_features, d.quantized, d.reason) for d in decisions
    )


def failure_rows(failures: Iterable[Any]) -> tuple[FailureRow, ...]:
    """Rows for the capture's ``CaptureFailure`` records."""
    return tuple(FailureRow(f.path, f.module_type, f.reason) for f in failures)


def _counts(module: nn.Module) -> tuple[int, int, int]:
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return sum(p.numel() for p in trainable), sum(p.numel() for p in frozen), len(trainable)


def report(student: nn.Module) -> LiteReport:
    """The :class:`LiteReport` of a student built by :func:`lite3r_compile.lite`.

    Parameter counts are read from the student now (so they reflect any later unfreezing).
    """
    from lite3r_compile.api import is_student

    if not is_student(student):
        raise ValueError(
            f"report(): {type(student).__name__} is not a lite3r student; build one with "
            "lite3r_compile.lite(model) first (or run `lite3r inspect` for a plan)"
        )
    record = student.lite3r_record
    artifacts = record.passes.artifacts

    trainable, frozen, n_trainable = _counts(student)
    return LiteReport(
        model=type(student).__name__,
        backend=record.backend,
        fp8_emulated=record.fp8_emulated,
        planned=False,
        sites=site_rows(artifacts["sla_sites"], record.config, lambda site: site.rewritten),
        fp8_layers=layer_rows(artifacts["fp8_layers"]),
        capture_failures=failure_rows(artifacts["capture_failures"]),
        trainable_params=trainable,
        frozen_params=frozen,
        trainable_tensors=n_trainable,
        notes=tuple(record.passes.notes()),
    )
