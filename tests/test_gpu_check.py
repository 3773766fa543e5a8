"""The one command a borrowed GPU machine runs: `make gpu-check` keeps the carried wheels' path, and
bench.gpu_check's four steps run end to end on the CPU with tiny models (the figures are not judged here)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import GPU_TARGETS
from mealv2.softlabels.teachers import CPU_BATCH

ROOT = Path(__file__).resolve().parent.parent


def test_make_gpu_check_keeps_the_callers_pythonpath(tmp_path):
    """The wheels carried to the GPU machine sit on the caller's PYTHONPATH: the target puts the project before it."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$PYTHONPATH|$*" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": "/tmp/site"}
    subprocess.run(["make", "-s", "gpu-check", f"PYTHON={fake}", f"GPU_CHECK={tmp_path / 'out'}"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "calls").read_text().splitlines() == [
        f".:/tmp/site|-m bench.gpu_check --out {tmp_path / 'out'} --device cuda"]


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """Every step and every GPU figure, with tiny models (the targets are for resnet50 and the paper's teachers)."""
    out = tmp_path / "check"
    tests = "tests/test_gpu_contracts.py -q -p no:cacheprovider -k copy_to_the_host"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--device", "cpu", "--tiny",
                          "--tests", tests], cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = (out / "gpu-check.log").read_text()
    assert run.returncode == 0, run.stdout + log[-3000:]
    steps = json.loads((out / "gpu-check.json").read_text())["steps"]
    assert {step: v["status"] for step, v in steps.items()} == dict.fromkeys(("decode", "tests", "distill", "bench"),
                                                                             "passed")
    assert "1 passed" in log and "distill: 2 epochs" in log
    record = json.loads((out / "gpu-quick.json").read_text())
    figures = record["results"]
    for key in ("gpu_loader_vs_torchvision", "gpu_stage1_vs_forward", "gpu_stage2_vs_bound_test_efficientnet",
                "gpu_decode_images_per_sec", "gpu_stage1_images_per_sec",
                "gpu_stage2_bound_images_per_sec_test_efficientnet"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["gpu_stage1_batch_size"] == CPU_BATCH
    assert set(record["targets_met"]) == set(GPU_TARGETS) & set(figures)
    assert record["versions"]["torch"] == torch.__version__
