"""The command line: every command listed; `python -m mealv2` works (so `torchrun -m mealv2` does)."""

import subprocess
import sys

from click.testing import CliRunner

from mealv2.cli import main


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("cache-teachers", "distill", "train", "evaluate", "labels", "data", "demo"):
        assert command in result.output


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "mealv2", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "mealv2" in result.stdout
