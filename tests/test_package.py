"""The package's own face: lazy public API, the CLI entry point, README <-> CI agreement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import lite3r_compile
from lite3r_compile import cli

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", text)
    assert match, f"README.md has no fenced command after <!-- {marker} -->"
    return match.group(1)


def test_readme_commands_pin_torch_through_constraints():
    for marker in ("main-command", "test-command"):
        command = _readme_command(marker)
        installs = re.findall(r"pip install[^&]*", command)
        assert installs, command
        for install in installs:
            assert "-c constraints.txt" in install, f"unpinned install in README: {install!r}"
    assert re.search(r"^torch==\d", (ROOT / "constraints.txt").read_text(), re.M)


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    script = (ROOT / ".ci" / "run").read_text()
    # .ci/run reads the command from the README rather than repeating it
    assert "<!-- test-command -->" in script
    assert "rm -rf .venv" in script
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == _readme_command("test-command")
    assert "python3 -m venv .venv" in extracted and "pytest" in extracted


def test_public_names_resolve_lazily():
    assert "lite" in dir(lite3r_compile)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lite3r_compile.not_a_name  # noqa: B018
    # importing the package pulls in neither Triton nor torchao
    code = "import sys, lite3r_compile; print('triton' in sys.modules, 'torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cli_lists_every_subcommand():
    parser = cli.build_parser()
    help_text = parser.format_help()
    for name in cli.COMMANDS:
        assert name in help_text


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "lite3r_compile.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage: lite3r" in out.stdout


def test_lite3r_backend_is_registered_through_the_entry_point():
    # a fresh process that never imports lite3r_compile: Dynamo finds the backend by entry point
    code = "import torch._dynamo; print('lite3r' in torch._dynamo.list_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    "first",
    ["import lite3r_compile", "import lite3r_compile.distill.metrics", "from lite3r_compile.distill import trainer"],
)
def test_distill_is_the_trainer_and_the_package_whatever_is_imported_first(first):
    # also: a public function never shares its name with a submodule that an import could
    # put in its place (lite3r_compile.report once did)
    code = (
        f"{first}\n"
        "import lite3r_compile, lite3r_compile.distill.metrics, inspect\n"
        "from lite3r_compile.distill.trainer import distill\n"
        "assert callable(lite3r_compile.distill)\n"
        "import lite3r_compile.reporting, lite3r_compile.api\n"
        "assert inspect.isfunction(lite3r_compile.report) and inspect.isfunction(lite3r_compile.lite)\n"
        "assert inspect.isfunction(lite3r_compile.find_attention)\n"
        "assert lite3r_compile.distill.metrics.depth_abs_rel\n"
        "try:\n"
        "    lite3r_compile.distill(None, None, None, steps=0)\n"
        "except ValueError as e:\n"
        "    assert 'steps must be >= 1' in str(e), e\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
