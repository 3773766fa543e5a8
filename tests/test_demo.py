"""`mealv2 demo --quick`: the whole method through the real commands on Fashion-MNIST, in about a minute."""

import json
import os

import pytest
from click.testing import CliRunner
from test_fashion_mnist import write_idx_source

from mealv2.cli import main
from pipeline.fashion_mnist import DEBIAN_SOURCE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion_mnist_source(tmp_path_factory):
    """Debian's real files (CI installs them); generated IDX files on a developer machine without apt."""
    if DEBIAN_SOURCE.is_dir():
        return DEBIAN_SOURCE
    assert not os.environ.get("CI"), f"{DEBIAN_SOURCE} missing: .ci/run installs dataset-fashion-mnist"
    return write_idx_source(tmp_path_factory.mktemp("idx"), 600, 300)


def test_quick_demo_writes_summary_and_report(fashion_mnist_source, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--source", str(fashion_mnist_source)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["teacher_top1"]) == 2
    for key in ("ensemble_top1", "baseline_top1", "distilled_top1"):
        assert 0 <= summary[key] <= 100
    assert summary["val_images"] == 200
    students = json.loads((out / "baseline" / "config.json").read_text())["data"]
    assert students == str(out / "data-students") and len(list((out / "data-students" / "train").rglob("*.jpg"))) == 150
    assert len(list((out / "data" / "train").rglob("*.jpg"))) == 300  # the teachers know more than the students saw
    assert set(summary["seconds"]) == {"data", "teacher-test_resnet", "teacher-test_efficientnet", "ensemble",
                                       "cache", "baseline", "distilled", "paired", "total"}
    # the paired figures come from the final weights scored again: they agree with the runs' own validation
    assert summary["gain"] == pytest.approx(summary["distilled_top1"] - summary["baseline_top1"], abs=1e-6)
    low, high = summary["gain_ci95"]
    assert low <= summary["gain"] <= high and 0 <= summary["mcnemar_p"] <= 1
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for command in ("$ mealv2 train", "$ mealv2 cache-teachers", "$ mealv2 distill", "$ mealv2 evaluate"):
        assert command in result.output
    assert "MEAL V2 gain" in result.output
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output


def test_slots_study_miniature_writes_its_curve(fashion_mnist_source, tmp_path):
    """Two points (1 and 2 slots, read from one store of 2) and the online limit, one run seed."""
    out = tmp_path / "slots"
    result = CliRunner().invoke(main, ["demo", "--quick", "--slots-study", "--out", str(out), "--seed", "3",
                                       "--source", str(fashion_mnist_source)])
    assert result.exit_code == 0, result.output
    study = json.loads((out / "slots.json").read_text())
    assert study["slots"] == [1, 2] and study["run_seeds"] == [3]
    assert all(0 <= v <= 100 for values in study["top1"].values() for v in values) and len(study["online_top1"]) == 1
    for run, mode, slots in (("slots-1-seed-3", "distill", 1), ("slots-2-seed-3", "distill", 2),
                             ("online-seed-3", "online", None)):
        config = json.loads((out / run / "config.json").read_text())
        assert (config["mode"], config["seeds"], config["seed"]) == (mode, slots, 3), run
    assert study["bytes_per_slot"] > 0 and "| online" in (out / "slots.md").read_text()
    assert (out / "slots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
