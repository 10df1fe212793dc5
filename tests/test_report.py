"""LiteReport rendering: every fact shows in the text table; numbered layers fold into one row."""

from __future__ import annotations

import pytest
from torch import nn

from lite3r_compile.reporting import FailureRow, LayerRow, LiteReport, SiteRow, report


def _report(**overrides):
    sites = tuple(
        SiteRow(f"agg.frame_blocks.{i}.attn", "frame", "sdpa", 4, 16, True, "topk=0.1 negligible=0.0 blocks=64x64")
        for i in range(3)
    ) + (SiteRow("track_head.attn", "cross", "mha_module", 2, 16, False, "scope 'cross' not in sla_scopes"),)
    layers = tuple(
        LayerRow(f"agg.frame_blocks.{i}.mlp.fc1", 64, 256, True, f"in transformer block 'agg.frame_blocks.{i}'")
        for i in range(3)
    ) + (LayerRow("camera_head.fc", 64, 9, False, "in/out features 64/9 not multiples of 16"),)
    fields = dict(
        model="Toy", backend="fp8", fp8_emulated=True, planned=False, sites=sites, fp8_layers=layers,
        capture_failures=(FailureRow("agg", "Aggregator", "could not trace: int(positions.max())"),),
        trainable_params=60, frozen_params=1_000_000, trainable_tensors=6,
        notes=("FP8: 1 Linear layer(s) stay high precision",),
    )
    fields.update(overrides)
    return LiteReport(**fields)


def test_text_table_shows_every_fact_and_folds_layer_indices():
    text = str(_report())
    for fact in (
        "Toy: 3 of 4 attention sites got SLA", "3 of 4 Linear layers got FP8", "FP8 emulated",
        "agg.frame_blocks.*.attn", "topk=0.1", "track_head.attn", "dense", "not in sla_scopes",
        "agg.frame_blocks.*.mlp.fc1", "'agg.frame_blocks.*'", "64 -> 256", "camera_head.fc",
        "not multiples of 16", "int(positions.max())", "Aggregator", "1,000,000", "60",
        "note: FP8: 1 Linear layer(s)",
    ):
        assert fact in text, fact
    assert "frame_blocks.0" not in text  # folded
    assert text.count("agg.frame_blocks.*.attn") == 1


def test_rows_split_by_outcome_and_planned_wording():
    rep = _report(planned=True)
    assert len(rep.sla_sites) == 3 and len(rep.dense_sites) == 1
    assert len(rep.quantized_layers) == 3 and len(rep.skipped_layers) == 1
    assert "would get SLA" in str(rep) and "trainable (planned)" in str(rep)


def test_empty_report_says_nothing_was_found():
    text = str(_report(sites=(), fp8_layers=(), capture_failures=(), trainable_params=0))
    assert "(none found)" in text and "(no Linear layers)" in text
    assert "Modules not captured" not in text


def test_rich_console_renders_it():
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(_report())
    assert "agg.frame_blocks.*.attn" in console.export_text()


def test_report_refuses_a_model_that_is_not_a_student():
    with pytest.raises(ValueError, match="not a lite3r student"):
        report(nn.Linear(2, 2))
