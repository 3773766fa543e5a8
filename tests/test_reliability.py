"""Faults and bad input: kills at many moments, a full disk, read-only and damaged inputs, no pickle anywhere."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from conftest import cache_args, run_cli, store_files

from mealv2.softlabels.store import LabelStore

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def mealv2_process(*args):
    return subprocess.Popen([sys.executable, "-m", "mealv2", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def kill_when(process, ready, what: str, timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it ended first."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def done_units(store: Path) -> int:
    cells = store / "done" / "c"
    return sum(1 for p in cells.rglob("*") if p.is_file()) if cells.exists() else 0


def test_cache_killed_at_five_moments_ends_byte_identical(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "killed.zarr"
    args = cache_args(small_root, store, teacher_files)
    moments = [("the store's arrays exist", lambda: (store / "probs" / "zarr.json").exists())]
    moments += [(f"{n} of 8 units", lambda n=n: done_units(store) >= n) for n in (1, 3, 5, 7)]
    for what, ready in moments:
        kill_when(mealv2_process(*args), ready, what)
    assert done_units(store) < 8 and not LabelStore.open(str(store)).attrs["complete"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert store_files(store) == store_files(reference_store)


def fit_args(mode, root, out, epochs, store=None):
    model = ["--student", "test_resnet", "--labels", store] if mode == "distill" else ["--model", "test_resnet"]
    return [mode, "--data", root, *model, "--init", "scratch", "--out", out, "--epochs", epochs, "--lr", "0.05",
            "--lr-steps", "2", "--batch-size", "8", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("mode", ["distill", "train"])
def test_training_killed_mid_run_resumes_to_the_same_weights(mode, small_root, reference_store, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run([sys.executable, "-m", "mealv2",
                           *map(str, fit_args(mode, small_root, whole, 3, reference_store))]).returncode == 0
    metrics = killed / "metrics.jsonl"
    kill_when(mealv2_process(*fit_args(mode, small_root, killed, 3, reference_store)),
              lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, "two epochs")
    resumed = subprocess.run([sys.executable, "-m", "mealv2",
                              *map(str, fit_args(mode, small_root, killed, 3, reference_store)), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "checkpoint-last.pth", weights_only=True)["student"]
    b = torch.load(killed / "checkpoint-last.pth", weights_only=True)["student"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_full_disk_while_caching_fails_cleanly_and_resumes(reference_store, small_root, teacher_files, tmp_path,
                                                           monkeypatch):
    store = tmp_path / "full.zarr"
    real_set = zarr.storage.LocalStore.set
    label_chunks = {"written": 0}

    async def set_until_full(self, key, value):
        if key.startswith("probs/c/"):
            label_chunks["written"] += 1
            if label_chunks["written"] > 2:  # the third unit's first chunk finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_full)
    result = run_cli(*cache_args(small_root, store, teacher_files))
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert len(result.output.strip().splitlines()[-1]) < 300
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    assert not LabelStore.open(str(store)).attrs["complete"] and done_units(store) == 2
    assert run_cli(*cache_args(small_root, store, teacher_files)).exit_code == 0
    assert store_files(store) == store_files(reference_store)


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(small_root, reference_store, tmp_path,
                                                                      monkeypatch):
    from mealv2.distill import trainer

    out = tmp_path / "run"
    real_save, saves = torch.save, {"count": 0}

    def save_until_full(obj, path, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] > 1:  # the second epoch's checkpoint: half written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", save_until_full)
    result = run_cli(*fit_args("distill", small_root, out, 2, reference_store))
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    names = sorted(p.name for p in out.iterdir())
    assert {"checkpoint-last.pth", "config.json", "metrics.jsonl", "model.safetensors"} <= set(names)
    assert not [name for name in names if ".tmp" in name], names  # the half-written save left nothing behind
    monkeypatch.setattr(trainer.torch, "save", real_save)
    resumed = run_cli(*fit_args("distill", small_root, out, 2, reference_store), "--resume")
    assert resumed.exit_code == 0, resumed.output


def truncated_copy(root: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    victim = sorted((copy / "train" / "class_1").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    return copy, str(victim.relative_to(copy / "train"))


def test_truncated_jpeg_is_named_or_skipped_and_recorded(small_root, teacher_files, tmp_path):
    data, victim = truncated_copy(small_root, tmp_path)
    store = tmp_path / "labels.zarr"
    failed = run_cli(*cache_args(data, store, teacher_files))
    assert failed.exit_code == 1 and victim in failed.output
    skipped = run_cli(*cache_args(data, store, teacher_files, "--skip-bad"))
    assert skipped.exit_code == 0, skipped.output
    attrs = LabelStore.open(str(store)).attrs
    assert attrs["complete"] and attrs["dataset"]["num_images"] == 29
    assert any(victim in entry for entry in attrs["skipped"])
    distilled = run_cli(*fit_args("distill", data, tmp_path / "run", 1, store))  # leaves the same file out
    assert distilled.exit_code == 0, distilled.output


def test_bad_inputs_are_one_line_errors(small_root, reference_store, teacher_files, tmp_path):
    import timm

    five_classes = tmp_path / "five.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), five_classes)
    no_train = tmp_path / "empty-root"
    no_train.mkdir()
    packed = tmp_path / "labels.zip"
    assert run_cli("labels", "pack", reference_store, packed).exit_code == 0
    packed_bytes = packed.read_bytes()
    cases = [
        (cache_args(small_root, tmp_path / "a.zarr", f"test_resnet={five_classes}"), "head has 5 classes"),
        (cache_args(no_train, tmp_path / "b.zarr", teacher_files), "train: no such split folder"),
        (cache_args(small_root, f"zip::{packed}", teacher_files), "zip archive is read-only"),
        (fit_args("distill", small_root, tmp_path / "c", 1, tmp_path / "missing.zarr"), "no label store there"),
        (["evaluate", "--data", small_root, "--model", "test_resnet", "--checkpoint", five_classes, "--res", "32",
          "--device", "cpu"], "five.pth"),
        (fit_args("train", small_root, tmp_path / "d", 1) + ["--batch-size", "-4"], "--batch-size"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code != 0, args
        last = result.output.strip().splitlines()[-1]
        assert message in last and len(last) < 300, (args, result.output)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    assert packed.read_bytes() == packed_bytes  # the refused writer did not touch the archive


def test_no_pickle_anywhere():
    sources = [p for package in ("pipeline", "softlabels", "distill", "mealv2", "bench")
               for p in (REPO / package).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "allow_pickle=True" not in text, path
