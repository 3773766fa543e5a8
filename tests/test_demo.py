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
    assert set(summary["seconds"]) == {"data", "teacher-test_resnet", "teacher-test_efficientnet", "ensemble",
                                       "cache", "baseline", "distilled", "total"}
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for command in ("$ mealv2 train", "$ mealv2 cache-teachers", "$ mealv2 distill", "$ mealv2 evaluate"):
        assert command in result.output
    assert "MEAL V2 gain" in result.output
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output
