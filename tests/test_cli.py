"""The command line: every command listed; `python -m mealv2` works (so `torchrun -m mealv2` does)."""

import os
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


def test_an_error_is_one_line_and_debug_shows_its_traceback(tmp_path):
    missing = tmp_path / "nothing.zarr"
    plain = subprocess.run([sys.executable, "-m", "mealv2", "labels", "info", str(missing)], capture_output=True,
                           text=True)
    assert plain.returncode == 1 and plain.stderr.splitlines() == [f"Error: {missing}: no label store there"]
    debug = subprocess.run([sys.executable, "-m", "mealv2", "--debug", "labels", "info", str(missing)],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    assert f"StoreError: {missing}: no label store there" in debug.stderr and "store.py" in debug.stderr


def test_first_line_is_the_gist_of_any_error():
    from mealv2.pipeline.errors import first_line

    dali = RuntimeError("\x1b[31mCritical error in pipeline:\x1b[0m\n\nError in CPU operator `image_slice`:\n"
                        "Current pipeline object is no longer valid.")
    assert first_line(dali) == "Error in CPU operator `image_slice`:"
    assert first_line(ValueError("x" * 300), 200) == "x" * 200
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(ValueError()) == "ValueError"


def test_the_command_line_starts_without_torch(tmp_path):
    """`mealv2 --help` and `mealv2 distill --help` with torch made unimportable (a torch package whose import raises,
    first on the path): the command line imports torch only when a command runs."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('raise ImportError("torch is unimportable in this test")\n')
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    for args in (["--help"], ["distill", "--help"]):
        result = subprocess.run([sys.executable, "-m", "mealv2", *args], capture_output=True, text=True, cwd=tmp_path,
                                env=os.environ | {"PYTHONPATH": path})
        assert result.returncode == 0 and result.stdout.startswith("Usage: python -m mealv2"), result.stderr[-3000:]


def test_long_helps_group_every_option_once():
    """distill, train and cache-teachers list their options under timm-style headings: every option in exactly one
    group (none falls to "Other options" but --help), and no group names an option the command lacks."""
    for name in ("distill", "train", "cache-teachers"):
        command = main.commands[name]
        names = [n for _, group in command.groups for n in group]
        params = {param.name for param in command.params}
        assert len(names) == len(set(names)), f"{name}: an option listed in two groups"
        assert set(names) == params, f"{name}: ungrouped {params - set(names)}, unknown {set(names) - params}"
    shown = CliRunner().invoke(main, ["distill", "--help"], terminal_width=100).output
    headings = [line for line in shown.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["Data:", "Model:", "Distillation:", "Optimizer:", "Learning rate schedule:", "Augmentation:",
                        "Validation:", "Logging:", "Runtime:", "Other options:"]
    other = shown.split("Other options:")[1]
    assert "--help" in other and other.count("--") == 1
