"""`mealv2 demo --quick`: the whole method through the real commands on Fashion-MNIST, in about a minute."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from test_fashion_mnist import write_idx_source

from mealv2.cli import main
from mealv2.demo import QUICK, Demo
from mealv2.pretrained import read_manifest, verified_spec
from mealv2.pipeline.fashion_mnist import DEBIAN_SOURCE
from mealv2.pipeline.models import load_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _on_the_cpu():
    """The demo passes its commands no --device, and these tests compare its figures exactly between two runs:
    the CPU repeats them to the bit, a GPU need not (cuDNN's autotuned kernels, bf16 teachers, nvJPEG and the
    hardware decoder taking different JPEGs), so "auto" sees no GPU here, as on the machines the demo is for."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="module")
def fashion_mnist_source(tmp_path_factory):
    """Debian's real files (CI installs them); generated IDX files on a developer machine without apt."""
    if DEBIAN_SOURCE.is_dir():
        return DEBIAN_SOURCE
    assert not os.environ.get("CI"), f"{DEBIAN_SOURCE} missing: .ci/run installs dataset-fashion-mnist"
    return write_idx_source(tmp_path_factory.mktemp("idx"), 600, 300)


@pytest.fixture(scope="module")
def quick_demo(fashion_mnist_source, tmp_path_factory):
    """One `mealv2 demo --quick` run (its tiny teachers trained and pinned in OUT/teachers): (OUT, output)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--source", str(fashion_mnist_source)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_demo_writes_summary_and_report(quick_demo):
    out, output = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teachers"] == ["test_resnet", "test_efficientnet"] and len(summary["teacher_top1"]) == 2
    for key in ("ensemble_top1", "baseline_top1", "distilled_top1"):
        assert 0 <= summary[key] <= 100
    assert summary["val_images"] == 200
    students = json.loads((out / "baseline" / "config.json").read_text())["data"]
    assert students == str(out / "data-students") and len(list((out / "data-students" / "train").rglob("*.jpg"))) == 150
    assert len(list((out / "data" / "train").rglob("*.jpg"))) == 300  # the teachers know more than the students saw
    assert set(summary["seconds"]) == {"data", "teacher-test_resnet", "teacher-test_efficientnet", "teachers",
                                       "ensemble", "cache", "baseline", "distilled", "paired", "total"}
    # the paired figures come from the final weights scored again: they agree with the runs' own validation
    assert summary["gain"] == pytest.approx(summary["distilled_top1"] - summary["baseline_top1"], abs=1e-6)
    low, high = summary["gain_ci95"]
    assert low <= summary["gain"] <= high and 0 <= summary["mcnemar_p"] <= 1
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for command in ("$ mealv2 train", "$ mealv2 cache-teachers", "$ mealv2 distill", "$ mealv2 evaluate"):
        assert command in output
    assert "MEAL V2 gain" in output
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output


def test_trained_teachers_are_pinned_with_the_command_that_made_them(quick_demo):
    out, _ = quick_demo
    teachers, _ = verified_spec(out / "teachers")
    summary = json.loads((out / "summary.json").read_text())
    assert [t.model for t in teachers] == summary["teachers"] and summary["teachers_from"] == str(out / "teachers")
    assert [t.top1 for t in teachers] == summary["teacher_top1"]  # scored with the pinned (float16) weights
    demo = Demo(str(out), 0, QUICK, run_command=None)
    for teacher in teachers:
        assert list(teacher.command) == [str(a) for a in demo.teacher_args(teacher.model)]
        assert {v.dtype for v in load_state_dict(out / "teachers" / teacher.file).values() if v.is_floating_point()} \
            == {torch.float16}


def test_demo_from_pinned_teachers_trains_none_and_reproduces_the_run(quick_demo, fashion_mnist_source, tmp_path):
    """The same seed on the first run's pinned teachers: no teacher trained, every figure the same."""
    first, _ = quick_demo
    out = tmp_path / "again"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--source", str(fashion_mnist_source),
                                       "--teachers-from", str(first / "teachers")])
    assert result.exit_code == 0, result.output
    summary, before = (json.loads((folder / "summary.json").read_text()) for folder in (out, first))
    assert not any(stage.startswith("teacher-") for stage in summary["seconds"]) and not (out / "data").exists()
    for key in ("teacher_top1", "ensemble_top1", "baseline_top1", "distilled_top1", "gain"):
        assert summary[key] == before[key], key


def test_damaged_pinned_teacher_is_refused_before_any_training(quick_demo, tmp_path):
    first, _ = quick_demo
    folder = tmp_path / "teachers"
    shutil.copytree(first / "teachers", folder)
    weights = folder / read_manifest(folder)[0].file
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--teachers-from", str(folder)])
    assert result.exit_code == 1 and f"{weights}: sha256 differs" in result.output
    assert not (out / "baseline").exists()
    both = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "x"), "--teachers-from", str(folder),
                                     "--train-teachers"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_slots_study_miniature_writes_its_curve(quick_demo, fashion_mnist_source, tmp_path):
    """Two points (1 and 2 slots, read from one store of 2) and the online limit, one run seed; the quick demo's
    pinned teachers label the store (training them again is the demo's test)."""
    out = tmp_path / "slots"
    result = CliRunner().invoke(main, ["demo", "--quick", "--slots-study", "--out", str(out), "--seed", "3",
                                       "--source", str(fashion_mnist_source),
                                       "--teachers-from", str(quick_demo[0] / "teachers")])
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


def test_the_report_keeps_hard_and_soft_cross_entropy_on_separate_panels():
    """A cross-entropy to hard labels and one to soft labels are not on one scale: each kind has its own panel."""
    from mealv2.report import report_figure

    row = {"epoch": 1, "val_top1": 50.0}
    curves = {"teacher-resnet10t": [row | {"loss": 0.4, "kd_loss": None}],
              "hard labels": [row | {"loss": 0.9, "kd_loss": None}], "MEAL V2": [row | {"loss": 1.3, "kd_loss": 0.7}]}
    summary = {"plan": {"student": "mobilenetv3_small_075"}, "teachers": ["resnet10t"], "teacher_top1": [88.6],
               "ensemble_top1": 88.5, "baseline_top1": 76.0, "distilled_top1": 77.0, "gain": 1.0,
               "gain_ci95": [0.4, 1.6], "val_images": 10000}
    val, hard, soft, _ = report_figure(curves, summary).axes
    assert [line.get_label() for line in hard.lines] == ["teacher-resnet10t", "hard labels"]
    assert [line.get_label() for line in soft.lines] == ["MEAL V2"] and list(soft.lines[0].get_ydata()) == [0.7]
    assert "hard labels" in hard.get_title() and "soft labels" in soft.get_title() and len(val.lines) == 3
