"""``lite3r inspect`` and ``lite3r demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lite3r_compile.cli import main
from lite3r_compile.commands.demo import difference_table


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps tables at 80 columns when stdout is not a terminal; keep rows on one line
    monkeypatch.setenv("COLUMNS", "200")


def test_command_modules_import_nothing_heavy():
    code = (
        "import sys, lite3r_compile.commands.demo, lite3r_compile.commands.inspect_model; "
        "heavy = [m for m in ('torch', 'triton', 'torchao', 'rich') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inspect_prints_sites_and_plan(capsys):
    assert main(["inspect", "test_lite_api:Toy", "--topk", "0.5"]) == 0
    out = capsys.readouterr().out
    for fact in ("Toy: 2 of 2 attention sites would get SLA", "blocks.*.attn", "topk=0.5",
                 "blocks.*.mlp.*", "FP8", "patch_embed", "trainable (planned)", "544"):
        assert fact in out, fact


def test_inspect_plan_follows_the_options(capsys):
    assert main(["inspect", "test_lite_api:Toy", "--scopes", "global", "--no-fp8"]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 attention sites would get SLA" in out and "not in LiteConfig.sla_scopes" in out
    assert "0 of 8 Linear layers would get FP8" not in out  # the head and patch embed count too
    assert "FP8Config.enabled is False" in out


def test_inspect_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model preset 'vggt-huge'"):
        main(["inspect", "vggt-huge"])
    with pytest.raises(SystemExit, match="cannot import 'no_such_module:f'"):
        main(["inspect", "no_such_module:f"])


def test_inspect_needs_inputs_for_a_model_without_them():
    with pytest.raises(SystemExit, match="give --images"):
        main(["inspect", "torch.nn:Identity"])


def test_demo_on_a_small_model(capsys):
    assert main(["demo", "--model", "test_lite_api:Toy", "--own-inputs"]) == 0
    out = capsys.readouterr().out
    for fact in ("attention sites got SLA", "Student vs dense teacher", "topk=1, no FP8",
                 "topk=0.1, FP8 on", "FP8 emulated", "done in"):
        assert fact in out, fact


def test_demo_on_inputs_the_model_rejects_names_the_module():
    # the toy takes (B, N, 48) tokens, not the demo's default (1, 4, 3, 56, 56) images
    with pytest.raises(SystemExit, match=r"lite3r demo: .* in module 'patch_embed'"):
        main(["demo", "--model", "test_lite_api:Toy"])


def test_difference_table_measures_each_output():
    from rich.console import Console

    dense = {"depth": torch.ones(2, 3), "list": [torch.zeros(2), torch.full((2,), 2.0)]}
    same = {"depth": torch.ones(2, 3), "list": [torch.zeros(2), torch.full((2,), 2.0)]}
    off = {"depth": torch.ones(2, 3) * 1.5, "list": [torch.zeros(2), torch.full((2,), 2.0)]}
    console = Console(record=True, width=200)
    console.print(difference_table(dense, {"same": same, "off": off}))
    text = console.export_text()
    assert "depth" in text and "list[1]" in text and "2x3" in text
    assert "0.00e+00 / 0.00e+00" in text and "5.00e-01 / 5.00e-01" in text


@pytest.mark.slow
def test_demo_claims_on_vggt_tiny():
    """What `lite3r demo` shows: the topk=1, FP8-off student reproduces VGGT; the default one
    (FP8 fake-quant, untrained SLA) does not. Images only (the track head, which needs query
    points, stays out to keep this fast); 4 frames of 4x4 patches give global attention 84 tokens,
    two key blocks, so the default student's SLA has a marginal block."""
    from lite3r_compile import models_zoo
    from lite3r_compile.api import lite_variants
    from lite3r_compile.commands.demo import call, differences
    from lite3r_compile.config import FP8Config, LiteConfig
    from lite3r_compile.reporting import report
    from lite3r_compile.sla.config import SLAConfig

    torch.manual_seed(0)
    teacher = models_zoo.create("vggt-tiny").eval()
    inputs = (torch.rand(1, 4, 3, 56, 56, generator=torch.Generator().manual_seed(0)),)
    exact_config = LiteConfig(sla=SLAConfig(topk=1.0), fp8=FP8Config(enabled=False))
    exact, default = lite_variants(teacher, [exact_config, LiteConfig()], backend="eager", example_inputs=inputs)
    with torch.no_grad():
        rows = differences(call(teacher, inputs), {"exact": call(exact, inputs), "default": call(default, inputs)})
    assert rows and all(cells[0][0] < 1e-4 for _, _, cells in rows), rows
    assert max(cells[1][0] for _, _, cells in rows) > 1e-3
    assert len(report(exact).sla_sites) == len(report(default).sla_sites) > 0


@pytest.mark.slow
def test_inspect_vggt_1b_on_meta(capsys):
    """The 1.26B-parameter preset, shapes only: FP8 goes to the 4 Linear layers of each of the 48
    frame/global blocks and of the 24 blocks of the DINOv2 backbone (which VGGT names
    `patch_embed`); the heads stay high precision."""
    assert main(["inspect", "vggt-1b", "--meta"]) == 0
    out = capsys.readouterr().out
    assert "288 of" in out and "Linear layers would get FP8" in out
    for fact in ("aggregator.frame_blocks.*.attn", "aggregator.global_blocks.*.attn", "16 x 64",
                 "'aggregator.patch_embed.blocks.*'", "under head 'camera_head'"):
        assert fact in out, fact
