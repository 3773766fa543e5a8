"""The bench runs end to end and reports every figure the project tracks (values are not judged here:
speed belongs to the bench's own verdicts, measured on a quiet machine, not to timed tests)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import TARGETS, _target_values, _verdicts

pytestmark = pytest.mark.slow

KEYS = {"stage2_cached_vs_plain", "stage2_cached_vs_online", "stage2_online_ideal", "stage2_online_ideal_cpu",
        "stage1_efficiency", "store_bytes_per_crop", "store_bytes_per_crop_cutmix", "loader_dali_vs_torch",
        "loader_dali_vs_torch_375x500_to_224",
        "loader_auto_vs_torch_375x500_to_224", "fingerprint_content_s_per_10k_photos", "fingerprint_content_photo_kb",
        "label_slot_load_ms_per_million_100k", "label_slot_load_ms_per_million_1000k", "sample_crops_s_per_million"}


def test_quick_bench_writes_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert KEYS <= set(last)
    assert all(math.isfinite(value) and value > 0 for value in last.values())
    record = json.loads((tmp_path / "quick.json").read_text())
    assert record["results"] == last
    assert set(record["targets_met"]) == set(TARGETS) | {"stage2_cached_vs_online", "stage2_cached_vs_online_cpu",
                                                         "label_slot_load_linear"}
    assert (tmp_path / "quick.png").stat().st_size > 10_000


def test_verdicts_compare_each_figure_with_its_target():
    results = {"stage2_cached_vs_plain": 0.96, "stage1_efficiency": 0.89, "store_bytes_per_crop": 28.5,
               "store_bytes_per_crop_cutmix": 27.5,
               "loader_dali_vs_torch": 1.3, "loader_auto_vs_torch_375x500_to_224": 0.99,
               "stage2_cached_vs_online": 2.5, "stage2_online_ideal": 2.9, "stage2_online_ideal_cpu": 2.7,
               "label_slot_load_ms_per_million_100k": 80.0, "label_slot_load_ms_per_million_1000k": 97.0}
    verdicts = _verdicts(results)
    assert verdicts == {"stage2_cached_vs_plain": True, "stage1_efficiency": False, "store_bytes_per_crop": False,
                        "store_bytes_per_crop_cutmix": True,
                        "loader_dali_vs_torch": True, "loader_auto_vs_torch_375x500_to_224": False,
                        "stage2_cached_vs_online": False, "stage2_cached_vs_online_cpu": True,
                        "label_slot_load_linear": False}
    assert _target_values(results)["stage2_cached_vs_online"] == pytest.approx(0.9 * 2.9)
