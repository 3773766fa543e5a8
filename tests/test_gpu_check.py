"""The check a borrowed GPU runs, run here as that machine runs it: from an archive of the tree (mealv2 not
installed), with a python that has the packages on its path but not mealv2; each step in a process group that is
ended with it, figures kept the moment they are measured."""

import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import venv
from pathlib import Path

import pytest

from bench.gpu_check import run_step

ROOT = Path(__file__).resolve().parent.parent
CHEAP_TESTS = "tests/test_gpu_contracts.py -q -p no:cacheprovider -k copy_to_the_host"


def _bare_python(folder: Path) -> Path:
    """A venv whose path holds this environment's packages (torch, timm, zarr, DALI) through a .pth line: the .pth
    files of that folder, such as mealv2's editable install, are not read, so mealv2 cannot be imported."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _archive(folder: Path) -> Path:
    """The tracked tree as committed, or as edited where a stash commit of the working tree exists."""
    tree = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() or "HEAD"
    folder.mkdir()
    archive = subprocess.run(["git", "archive", tree], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(folder)], input=archive, check=True)
    return folder


@pytest.mark.slow
def test_both_tiers_run_from_a_plain_archive_without_mealv2_installed(tmp_path):
    python, tree, out = _bare_python(tmp_path / "venv"), _archive(tmp_path / "tree"), tmp_path / "check"
    assert subprocess.run([python, "-c", "import mealv2"], cwd=tmp_path, capture_output=True).returncode == 1
    no_dali = tmp_path / "no-dali" / "nvidia"  # a regular package named nvidia hides nvidia.dali
    no_dali.mkdir(parents=True)
    (no_dali / "__init__.py").touch()
    check = [python, "-m", "bench.gpu_check", "--out", str(out), "--work", str(tmp_path / "work"), "--device", "cpu",
             "--tiny", "--tests", CHEAP_TESTS]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    tier1 = subprocess.run([*check, "--tier", "1"], cwd=tree, env={**env, "PYTHONPATH": str(no_dali.parent)},
                           capture_output=True, text=True, timeout=300)
    log = (out / "gpu-check.log").read_text()
    assert tier1.returncode == 0, tier1.stdout + tier1.stderr + log[-3000:]
    refused = subprocess.run([*check, "--tier", "2"], cwd=tree, env={**env, "PYTHONPATH": str(no_dali.parent)},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "DALI is not importable" in refused.stderr
    tier2 = subprocess.run([*check, "--tier", "2"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    log = (out / "gpu-check.log").read_text()
    assert tier2.returncode == 0, tier2.stdout + tier2.stderr + log[-3000:]
    tiers = json.loads((out / "gpu-check.json").read_text())["tiers"]
    assert {tier: {step: v["status"] for step, v in steps.items()} for tier, steps in tiers.items()} == {
        "1": dict.fromkeys(("tests", "distill", "stage1", "stage2"), "passed"),
        "2": dict.fromkeys(("decode", "tests", "loader", "stage2", "hw_decoder"), "passed")}
    assert "distill: 2 epochs" in log and "--decoder torch" in log
    assert sorted(path.name for path in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-figures.json"]
    figures = json.loads((out / "gpu-figures.json").read_text())["results"]
    for key in ("gpu_stage1_vs_forward", "gpu_stage1_images_per_sec", "gpu_stage1_forward_images_per_sec",
                "gpu_stage2_vs_bound_test_efficientnet", "gpu_stage2_bound_images_per_sec_test_efficientnet",
                "gpu_loader_vs_torchvision", "gpu_decode_images_per_sec", "gpu_hw_decoder_0_images_per_sec",
                "gpu_hw_decoder_0.9_images_per_sec"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_a_step_past_its_limit_ends_with_its_children_and_keeps_its_figures(tmp_path):
    """A step that starts a child (as distill starts cache-teachers) and runs past its limit: the whole group ends,
    and the figure measured before the limit is on disk."""
    script = textwrap.dedent(f"""
        import subprocess, sys, time, torch
        from pathlib import Path
        from bench.gpu import Figures
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path({str(tmp_path / 'child')!r}).write_text(str(child.pid))
        Figures(Path({str(tmp_path / 'figures.json')!r}), torch.device("cpu")).add(first_figure=1.5)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        status = run_step([sys.executable, "-c", script], 20, log, env)
    assert status == "ran past 20 s" and time.monotonic() - started < 60
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the step's child outlived the step"
    assert json.loads((tmp_path / "figures.json").read_text())["results"] == {"first_figure": 1.5}
