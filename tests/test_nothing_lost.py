"""Faults that once lost data without a word: each is now a refusal naming the file, before anything is trained."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from conftest import cache_args, distill_args, replace_at_equal_size, run_cli, store_files
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from bench.imagegen import make_image_folder

import mealv2
from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.softlabels.integrity import slot_problems, structure_problems, unit_record
from mealv2.softlabels.schema import WRITTEN, StoreError
from mealv2.softlabels.store import LabelStore, SlotLabels


@pytest.fixture
def store_copy(reference_store, tmp_path) -> Path:
    """A finished store (2 slots × 4 chunks of 8 rows) to damage."""
    return Path(shutil.copytree(reference_store, tmp_path / "copy.zarr"))


@pytest.mark.parametrize("name", ["probs", "classes", "boxes"])
def test_a_deleted_chunk_is_named_by_info_verify_and_distill_before_training(name, store_copy, small_root, tmp_path):
    (store_copy / name / "c" / "1" / "2" / "0").unlink()  # slot 1, rows 16-23: what a partial upload leaves
    info = run_cli("labels", "info", store_copy)
    assert "complete: False (8/8 units, 1 chunk(s) missing)" in info.output
    verified = run_cli("labels", "verify", store_copy)
    assert verified.exit_code == 1 and f"{name} chunk 1.2.0 is missing" in verified.output
    assert f"slot 1 chunk 2 (rows 16-23): {name} differs from what its writer wrote" in verified.output
    out = tmp_path / "run"
    result = run_cli(*distill_args(small_root, store_copy, out))
    assert result.exit_code == 1 and f"{store_copy}: {name} chunk 1.2.0 is missing" in result.output
    assert not (out / "metrics.jsonl").exists()  # refused before the first step: slot 1 is read in epoch 2 only


def test_a_chunk_replaced_by_another_is_refused_when_its_slot_is_read(store_copy):
    chunks = store_copy / "probs" / "c" / "1"
    shutil.copy(chunks / "1" / "0", chunks / "2" / "0")  # a whole, checksummed chunk in the wrong place
    store = LabelStore.open(str(store_copy))
    store.read_slot(0)
    with pytest.raises(StoreError, match=r"slot 1 chunk 2 \(rows 16-23\): probs differs from what its writer wrote"):
        store.read_slot(1)


def test_only_rows_listed_as_skipped_may_be_empty(store_copy):
    zarr.open_array(store_copy / "probs", mode="r+")[0, 3:5] = 0  # two rows that lost their labels
    paths = zarr.open_array(store_copy / "index" / "paths")[3:5]
    store = LabelStore.open(str(store_copy))
    assert f"slot 0: 2 row(s) hold no labels but their images are not listed as skipped ({paths[0]}, {paths[1]})" \
        in slot_problems(store, 0, store.read_slot(0, checked=False))
    with pytest.raises(StoreError, match="slot 0 chunk 0"):
        store.read_slot(0)


def test_verify_checks_rows_without_teachers_and_keeps_the_per_chunk_report(store_copy, small_root, teacher_files):
    classes = zarr.open_array(store_copy / "classes", mode="r+")
    classes[0, 9] = [1, 1]  # a repeated class
    boxes = zarr.open_array(store_copy / "boxes", mode="r+")
    boxes[1, 29] = [0, 0, 10_000, 5]  # taller than any image
    chunk = store_copy / "flips" / "c" / "1" / "1"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # fails its checksum, so recomputing slot 1 cannot read it
    chunk.write_bytes(bytes(damaged))
    result = run_cli("labels", "verify", store_copy, "--data", small_root, "--recompute", "4",
                     "--teachers", teacher_files, "--device", "cpu")
    assert result.exit_code == 1
    assert "slot 0 chunk 1: classes repeat within a row: 1 row(s), first 9" in result.output
    assert "slot 1 chunk 3: boxes outside the image: 1 row(s), first 29" in result.output
    assert "slot 0 chunk 1 (rows 8-15): classes differs from what its writer wrote" in result.output
    assert "flips chunk 1.1" in result.output and "recompute stopped" in result.output


@pytest.mark.parametrize("namespace", ["same", "another"])
def test_a_second_run_on_one_folder_is_refused_and_a_killed_holder_is_taken_over(namespace, request, small_root,
                                                                                  reference_store, tmp_path):
    """The second run in the first one's PID namespace, or in one of its own (a container on the same host), where
    the first's pid names nothing: there it once took the live run's folder over."""
    prefix = request.getfixturevalue("pid_namespace") if namespace == "another" else []
    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "mealv2", *map(str, distill_args(small_root, reference_store, out,
                                                                                      epochs=50))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-last.pth").exists():  # the first run is training
        assert first.poll() is None and time.time() < deadline, "the first run ended before its first checkpoint"
        time.sleep(0.05)
    second_args = [*prefix, sys.executable, "-m", "mealv2",
                   *map(str, distill_args(small_root, reference_store, out, epochs=2)), "--resume"]
    second = subprocess.run(second_args, capture_output=True, text=True, timeout=600)
    assert first.poll() is None, "the first run ended while the second was refused"
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{out}: another run is training in this folder (pid {first.pid} on" in second.stdout + second.stderr
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    resumed = subprocess.run(second_args, capture_output=True, text=True, timeout=600)  # the kernel let go at once
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one run's lines, in order


@pytest.fixture
def full_disk(tmp_path):
    """(a folder on a 24 KiB tmpfs, a call that frees space): a real full disk where this process may mount one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root; the injected ENOSPC of test_reliability.py covers the rest")
    yield folder, lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a finished run may still hold a handle


def test_a_creation_that_met_a_full_disk_resumes_on_rerun(full_disk, reference_store, small_root, teacher_files):
    folder, free_space = full_disk
    store = folder / "labels.zarr"
    failed = run_cli(*cache_args(small_root, store, teacher_files))
    assert failed.exit_code == 1 and "No space left on device" in failed.output
    assert not LabelStore.exists(str(store))  # creation did not finish
    free_space()
    rerun = run_cli(*cache_args(small_root, store, teacher_files))
    assert rerun.exit_code == 0, rerun.output
    assert store_files(store) == store_files(reference_store)


def test_a_creation_interrupted_by_ctrl_c_resumes_on_rerun(reference_store, small_root, teacher_files, tmp_path,
                                                           monkeypatch):
    store = tmp_path / "labels.zarr"
    real_create = zarr.Group.create_array

    def interrupted(group, name, **kwargs):
        if name == "index/sizes":  # half the arrays exist: a real SIGINT, as Ctrl-C sends
            signal.raise_signal(signal.SIGINT)
        return real_create(group, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", interrupted)
    assert run_cli(*cache_args(small_root, store, teacher_files)).exit_code == 1
    monkeypatch.setattr(zarr.Group, "create_array", real_create)
    assert (store / "probs" / "zarr.json").exists() and not LabelStore.exists(str(store))
    rerun = run_cli(*cache_args(small_root, store, teacher_files))  # the same process: its pid is still alive
    assert rerun.exit_code == 0, rerun.output
    assert store_files(store) == store_files(reference_store)


@pytest.fixture
def data_copy(small_root, tmp_path) -> Path:
    return Path(shutil.copytree(small_root, tmp_path / "data"))


def test_an_image_replaced_at_equal_byte_size_is_refused_by_its_upright_size(data_copy, reference_store, tmp_path):
    picture = data_copy / "train" / "class_0" / "img_003.png"
    replace_at_equal_size(picture, 7, 5)
    result = run_cli(*distill_args(data_copy, reference_store, tmp_path / "run"))
    assert result.exit_code == 1
    assert f"{reference_store}: 1 image(s) of {data_copy}/train changed since their labels were made (other " \
           "height × width): class_0/img_003.png" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    verified = run_cli("labels", "verify", reference_store, "--data", data_copy)
    assert verified.exit_code == 1 and "changed since their labels were made" in verified.output
    assert "class_0/img_003.png" in verified.output


ENTRY_POINTS = ("distill", "labels verify", "labels stats", "ReplayDataset", "StoreLoader")


def refusal(entry: str, root: Path, store: Path, out: Path) -> str | None:
    """What ``entry`` says of ``root`` as the data of ``store``: None when it accepts it, else its refusal."""
    import mealv2

    commands = {"distill": distill_args(root, store, out), "labels verify": ["labels", "verify", store, "--data", root],
                "labels stats": ["labels", "stats", store, "--data", root]}
    if entry in commands:
        result = run_cli(*commands[entry])
        return None if result.exit_code == 0 else result.output
    try:
        if entry == "ReplayDataset":
            mealv2.ReplayDataset(root, mealv2.open_store(str(store)))[0]
        else:
            mealv2.StoreLoader(root, str(store), batch_size=8, device="cpu")
    except StoreError as err:
        return str(err)
    return None


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_fingerprint_content_accepts_the_data_it_was_made_from(entry, content_store, small_root, tmp_path):
    assert refusal(entry, small_root, content_store, tmp_path / "run") is None


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_fingerprint_content_catches_an_image_replaced_at_equal_size_and_dimensions(entry, content_store, data_copy,
                                                                                      tmp_path):
    picture = data_copy / "train" / "class_0" / "img_003.png"
    with Image.open(picture) as image:
        width, height = image.size
    replace_at_equal_size(picture, height, width)
    said = refusal(entry, data_copy, content_store, tmp_path / "run")
    assert said and f"{content_store}: labels are for another dataset than {data_copy}/train (fingerprint " \
                     "differs)" in said
    assert not (tmp_path / "run").exists()


def test_the_index_cache_trusts_an_unchanged_mtime_and_fingerprint_content_does_not(data_copy, reference_store,
                                                                                     teacher_files, tmp_path):
    store = tmp_path / "content.zarr"  # caching scans the split, and the index cache keeps its headers
    made = run_cli(*cache_args(data_copy, store, teacher_files, "--seeds", "1", "--fingerprint", "content"))
    assert made.exit_code == 0, made.output
    picture = data_copy / "train" / "class_0" / "img_003.png"
    before = picture.stat()
    replace_at_equal_size(picture, 7, 5)
    os.utime(picture, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` does
    trusted = run_cli("labels", "verify", reference_store, "--data", data_copy)
    assert trusted.exit_code == 0, trusted.output  # path, byte size and mtime unchanged: the cached header is reused
    result = run_cli(*distill_args(data_copy, store, tmp_path / "run"))
    assert result.exit_code == 1
    assert f"{store}: labels are for another dataset than {data_copy}/train (fingerprint differs)" in result.output


def test_a_decompression_bomb_and_a_symlink_loop_are_named_bad_files(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, "train", classes=2, per_class=2, mixed=False)
    bomb = root / "train" / "class_0" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpixels in a few kB
    (root / "train" / "class_1" / "loop.jpg").symlink_to("loop.jpg")
    result = run_cli("data", "check", root)
    assert result.exit_code == 1, result.output
    assert f"BAD {bomb}: image over the limit of {Image.MAX_IMAGE_PIXELS} pixels" in result.output
    assert "loop.jpg: cannot read image header ([Errno 40] Too many levels of symbolic links" in result.output
    with pytest.raises(DatasetError, match="bomb.png: image over the limit"):
        DatasetIndex.scan(root / "train")


def test_a_pickle_payload_given_to_resume_is_one_line(small_root, reference_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1, "payload": os.getcwd}, out / "checkpoint-last.pth")  # a global: pickle code to run
    result = run_cli(*distill_args(small_root, reference_store, out), "--resume")
    assert result.exit_code == 1
    assert f"{out / 'checkpoint-last.pth'}: not a checkpoint mealv2 can load" in result.output.splitlines()[-1]


def test_a_torn_last_metrics_line_is_dropped_on_resume(small_root, reference_store, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*distill_args(small_root, reference_store, out, epochs=1)).exit_code == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "lr": 0.0')  # killed while writing epoch 2's line
    resumed = run_cli(*distill_args(small_root, reference_store, out, epochs=2), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "ignored its torn last line" in resumed.output
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_while_checkpointing_names_the_folder(full_disk, small_root, reference_store):
    folder, free_space = full_disk
    subprocess.run(["mount", "-o", "remount,size=3m", str(folder)], check=True)  # the weights fit, the checkpoint not
    result = run_cli(*distill_args(small_root, reference_store, folder, epochs=1))
    assert result.exit_code == 1
    assert f"No space left on device: {folder} (writing checkpoint-last.pth)" in result.output
    free_space()
    assert run_cli(*distill_args(small_root, reference_store, folder, epochs=1)).exit_code == 0


def test_damaged_metadata_and_chunks_name_the_store_and_array(store_copy):
    chunk = store_copy / "probs" / "c" / "1" / "1" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match=f"{store_copy}: probs of slot 1 cannot be read"):
        LabelStore.open(str(store_copy)).read_slot(1)
    (store_copy / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    result = run_cli("labels", "info", store_copy)
    assert result.exit_code == 1 and f"{store_copy}: its metadata (zarr.json) cannot be read" in result.output


def test_pack_refuses_links_and_removes_what_a_killed_pack_left(store_copy, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("private key")
    chunk = store_copy / "probs" / "c" / "0" / "0" / "0"
    chunk.unlink()
    chunk.symlink_to(secret)
    out = tmp_path / "labels.zip"
    refused = run_cli("labels", "pack", store_copy, out)
    assert refused.exit_code == 1 and f"{chunk}: a symbolic link inside the store" in refused.output
    assert not out.exists()
    chunk.unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".labels.zip.{dead.pid}.tmp"  # what a pack SIGKILLed mid-write leaves
    left.write_bytes(b"PK half a zip")
    missing = run_cli("labels", "pack", store_copy, out)  # the link is gone, and with it a chunk
    assert missing.exit_code == 1 and "probs chunk 0.0.0 is missing; nothing was packed" in missing.output
    assert not left.exists() and not out.exists()


def sound_rows() -> SlotLabels:
    """Four CutMix rows of a 5-class, 6-image store at res 8 that pass every structural check."""
    return SlotLabels(probs=np.array([[0.5, 0.3], [0.6, 0.1], [0.9, 0.05], [0.4, 0.4]], np.float16),
                      classes=np.array([[0, 1], [2, 4], [3, 0], [1, 2]], np.uint16),
                      boxes=np.array([[0, 0, 10, 12], [2, 3, 5, 5], [0, 0, 1, 1], [9, 11, 1, 1]], np.int32),
                      flips=np.zeros(4, bool), mix_partner=np.array([-1, 0, 5, 1], np.int32),
                      mix_boxes=np.array([[0, 0, 0, 0], [0, 0, 8, 8], [4, 4, 4, 4], [1, 2, 3, 4]], np.int32))


@pytest.mark.parametrize("field, row, value, problem", [
    ("classes", 1, [2, 5], "classes outside 0-4: 1 row(s), first 11"),
    ("probs", 0, [0.3, 0.5], "probs not descending: 1 row(s), first 10"),
    ("probs", 2, [0.9, 0.2], "probs sum above 1: 1 row(s), first 12"),
    ("boxes", 3, [9, 11, 1, 2], "boxes outside the image: 1 row(s), first 13"),
    ("boxes", 1, [2, 3, 0, 5], "boxes outside the image: 1 row(s), first 11"),
    ("mix_partner", 2, 6, "mix partners invalid: 1 row(s), first 12"),
    ("mix_partner", 1, 11, "mix partners invalid: 1 row(s), first 11"),  # mixed with itself
    ("mix_boxes", 3, [1, 5, 3, 4], "mix boxes outside the crop: 1 row(s), first 13"),
])
def test_each_structural_check_names_the_rows_that_break_it(field, row, value, problem):
    sizes, labelled = np.tile([10, 12], (4, 1)), np.ones(4, bool)
    assert structure_problems(sound_rows(), sizes, 5, 6, 8, 10, labelled) == []
    rows = sound_rows()
    getattr(rows, field)[row] = value
    assert structure_problems(rows, sizes, 5, 6, 8, 10, labelled) == [problem]
    labelled[row] = False  # a skipped image's empty row is not checked
    assert structure_problems(rows, sizes, 5, 6, 8, 10, labelled) == []


# -- issue 40: non-finite labels, wrong types, special files ----------------------------------------------------


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> dict[str, Path]:
    """test_resnet weights (those of teacher_files' first teacher) whose class-1 logit overflows float32 on some
    crops ("some": its softmax is NaN there), and weights that are NaN throughout ("all", a diverged checkpoint)."""
    import timm

    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=3).state_dict()
    folder = tmp_path_factory.mktemp("overflowing")
    weight, bias = state["fc.weight"].double(), state["fc.bias"].clone()
    weight[1] *= 2e38  # w·f + b passes float32's 3.4e38 where w·f is largest: about one crop in six here
    bias[1] = 3.3e38
    torch.save(state | {"fc.weight": weight.float(), "fc.bias": bias}, folder / "some.pth")
    torch.save(state | {"fc.weight": torch.full_like(state["fc.weight"], float("nan"))}, folder / "all.pth")
    return {"some": folder / "some.pth", "all": folder / "all.pth"}


@pytest.mark.parametrize("kind", ["some", "all"])
def test_a_teacher_whose_softmax_is_not_finite_is_named_and_its_unit_not_written(kind, overflowing, small_root,
                                                                                 teacher_files, tmp_path):
    spec = f"test_resnet={overflowing[kind]}"
    store = tmp_path / "labels.zarr"
    result = run_cli(*cache_args(small_root, store, f"{teacher_files.split(',')[1]},{spec}"))
    assert result.exit_code == 1, result.output
    assert re.search(rf"{re.escape(spec)}: its softmax is not finite on {small_root}/train/class_\d/img_\d+\.\w+ "
                     r"\(seed slot \d, \d+ of the unit's \d+ crops\); the unit was not written",
                     result.output.splitlines()[-1]), result.output
    opened = LabelStore.open(str(store))
    assert not opened.done().all()
    for slot, chunk in zip(*np.nonzero(opened.done())):  # what was written is finite
        assert np.isfinite(opened.group["probs"][slot, opened.rows(chunk)]).all()


def rewrite_probs(store: Path, slot: int, rows, values) -> None:
    """Put ``values`` into the probs of ``rows`` and record them as their writer would have (digests that match)."""
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group["probs"][slot, rows] = values
    opened = LabelStore.open(str(store))
    for chunk in range(opened.num_chunks):
        unit = opened.rows(chunk)
        group[WRITTEN][slot, chunk] = unit_record(unit.stop - unit.start,
                                                  [group[name][slot, unit] for name in opened.arrays])


@pytest.mark.parametrize("rows, column, value", [([9], 0, np.nan), ([9], 1, np.nan), ([9], 1, -0.25),
                                                 (slice(None), 0, np.nan)])  # the last: an all-NaN teacher's store
def test_non_finite_or_negative_probabilities_are_refused_by_verify_distill_and_the_reader(
        rows, column, value, store_copy, small_root, tmp_path):
    probs = zarr.open_array(store_copy / "probs")[0, rows].astype(np.float32)
    probs[:, column] = value
    rewrite_probs(store_copy, 0, rows, probs)
    paths = [str(path) for path in zarr.open_array(store_copy / "index" / "paths")[rows]]

    def problem(paths):
        return (f"slot 0: {len(paths)} row(s) hold probabilities that are not finite or outside 0-1 "
                f"({', '.join(paths[:3])})")
    verified = run_cli("labels", "verify", store_copy)  # verify reports unit by unit, the first unit of 8 rows here
    assert verified.exit_code == 1 and problem(paths[:8]) in verified.output, verified.output
    out = tmp_path / "run"
    trained = run_cli(*distill_args(small_root, store_copy, out))
    assert trained.exit_code == 1 and problem(paths) in trained.output, trained.output
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(StoreError, match=re.escape(problem(paths))):
        mealv2.open_store(store_copy).targets(0, [9])


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_finite_epoch(small_root, reference_store,
                                                                                   tmp_path):
    out = tmp_path / "run"
    result = run_cli(*distill_args(small_root, reference_store, out, epochs=2), "--lr-steps", "1",
                     "--decay-rate", "1e30")  # epoch 2 at lr 1e28: the weights diverge within a step or two
    assert result.exit_code == 1, result.output
    assert re.search(r"epoch 2/2, step \d+: the loss is (nan|inf); nothing of this epoch was saved", result.output)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in load_file(out / "model.safetensors").values())


def test_online_teachers_that_overflow_stop_the_run_at_its_first_nan_loss(overflowing, small_root, tmp_path):
    out = tmp_path / "run"
    result = run_cli("distill", "--online", "--teachers", f"test_resnet={overflowing['some']}", "--data", small_root,
                     "--student", "test_resnet", "--init", "scratch", "--out", out, "--epochs", "1", "--batch-size",
                     "8", "--res", "32", "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    assert re.search(r"epoch 1/1, step \d+: the loss is nan", result.output), result.output
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("text, message", [
    ("epochs: 1\nlr: true\n", "--config CONFIG: lr: expected a number, got true"),
    ("epochs: 1.9\n", "--config CONFIG: epochs: expected an integer, got 1.9"),
    ("epochs: null\n", "--config CONFIG: epochs: expected an integer, got null"),
    ("epochs: 1\nlr: [0.1]\n", "--config CONFIG: lr: expected a number, got [0.1]"),
    ("epochs: 1\nkd_weight: .inf\n", "--kd-weight inf: expected a finite number"),
    ("epochs: 1\n", "--lr nan: expected a finite number"),  # with --lr nan on the command line
])
def test_a_config_value_of_the_wrong_type_or_not_finite_is_refused_with_its_option(text, message, small_root,
                                                                                    reference_store, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    result = run_cli("distill", "--config", config, "--data", small_root, "--labels", reference_store, "--student",
                     "test_resnet", "--init", "scratch", "--out", out, "--batch-size", "8", "--device", "cpu",
                     "--no-progress", *(["--lr", "nan"] if "--lr" in message else []))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == "Error: " + message.replace("CONFIG", str(config))
    assert not out.exists()


def test_a_corrupt_safetensors_teacher_or_init_is_one_line(small_root, reference_store, teacher_files, tmp_path):
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(Path(teacher_files.split(",")[1].split("=")[1]).read_bytes()[:300])  # a download cut short
    cached = run_cli(*cache_args(small_root, tmp_path / "labels.zarr", f"test_efficientnet={torn}"))
    assert cached.exit_code == 1
    assert cached.output.splitlines()[-1].startswith(f"Error: {torn}: not a readable .safetensors file ("), \
        cached.output
    trained = run_cli(*distill_args(small_root, reference_store, tmp_path / "run"), "--init", torn)
    assert trained.exit_code == 1
    assert trained.output.splitlines()[-1].startswith(f"Error: {torn}: not a readable .safetensors file ("), \
        trained.output


def test_a_seeds_attribute_longer_than_the_arrays_is_one_line(store_copy, small_root, tmp_path):
    metadata = json.loads((store_copy / "zarr.json").read_text())
    metadata["attributes"]["mealv2"]["seeds"] = [0, 1, 2]  # the arrays hold 2 slots
    (store_copy / "zarr.json").write_text(json.dumps(metadata))
    expected = (f"Error: {store_copy}: its attributes list 3 seed slot(s), its arrays hold 2; the store's metadata "
                "is damaged")
    for args in (["labels", "verify", store_copy], ["labels", "info", store_copy],
                 distill_args(small_root, store_copy, tmp_path / "run")):
        result = run_cli(*args)
        assert result.exit_code == 1 and result.output.splitlines()[-1].startswith(expected), result.output


def mealv2_child(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m mealv2 ARGS`` in a child with 2 GiB of data memory, killed after ``timeout`` s: a reader that
    blocks or fills its memory fails the test instead of hanging it or the machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))
    return subprocess.run([sys.executable, "-m", "mealv2", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind, what", [("fifo", "a FIFO, not a regular file"),
                                        ("zero", "a symbolic link to /dev/zero, a character device, not a regular "
                                                 "file"),
                                        ("huge", "more than the 96 bytes a probs chunk can take")])
def test_a_chunk_that_is_a_fifo_a_device_or_too_large_is_named_by_verify_readers_and_pack(kind, what, store_copy,
                                                                                          small_root, tmp_path):
    chunk = store_copy / "probs" / "c" / "0" / "0" / "0"
    chunk.unlink()
    if kind == "fifo":
        os.mkfifo(chunk)  # opened for reading, it waits for a writer for ever
    elif kind == "zero":
        chunk.symlink_to("/dev/zero")  # read whole, it never ends
    else:
        with open(chunk, "wb") as handle:
            handle.truncate(100 << 20)  # a sparse 100 MB file where a chunk of under 100 bytes belongs
    expected = f"{chunk}: {what}"
    out = tmp_path / "labels.zip"
    for args in (["labels", "verify", store_copy], ["labels", "stats", store_copy],
                 distill_args(small_root, store_copy, tmp_path / "run"), ["labels", "pack", store_copy, out]):
        result = mealv2_child(*args)
        assert result.returncode == 1 and expected in result.stdout + result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
    assert not out.exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.timeout(120)
def test_pack_refuses_a_fifo_anywhere_in_the_store(store_copy, tmp_path):
    fifo = store_copy / "notes"
    os.mkfifo(fifo)
    out = tmp_path / "labels.zip"
    result = mealv2_child("labels", "pack", store_copy, out)
    assert result.returncode == 1 and f"{fifo}: a FIFO, not a regular file" in result.stderr, result.stderr
    assert not out.exists()


def test_a_store_rebuilt_at_its_path_during_a_run_stops_it_before_other_labels_are_read(small_root, reference_store,
                                                                                      teacher_files, tmp_path,
                                                                                      monkeypatch):
    from mealv2.distill import trainer

    store = Path(shutil.copytree(reference_store, tmp_path / "labels.zarr"))
    saved = trainer.save_checkpoint

    def rebuilt_after_the_first_epoch(path, **state):
        saved(path, **state)
        if state["epoch"] == 1:  # epoch 2's slot was read during epoch 1; epoch 3's is read from the rebuilt store
            shutil.rmtree(store)
            rebuild = cache_args(small_root, store, teacher_files.split(",")[0])  # one teacher of the two
            done = subprocess.run([sys.executable, "-m", "mealv2", *map(str, rebuild)], capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.setattr(trainer, "save_checkpoint", rebuilt_after_the_first_epoch)
    out = tmp_path / "run"
    result = run_cli(*distill_args(small_root, store, out, 3))
    assert result.exit_code == 1, result.output
    assert f"{store}: was replaced while this run read it (created, teachers differ)" in result.output.splitlines()[-1]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs in ([1], [1, 2])  # nothing was trained on the rebuilt store's labels


def test_a_replay_dataset_refuses_a_store_rebuilt_after_it_was_made(small_root, reference_store, mild_store,
                                                                     tmp_path):
    """The dataset's own process reads each slot, its DataLoader workers only the shared copy: the next slot read
    after the store was rebuilt at its path (milder crops) is refused, before any row of it reaches a worker."""
    store = Path(shutil.copytree(reference_store, tmp_path / "labels.zarr"))
    dataset = mealv2.ReplayDataset(small_root, str(store))
    loader = DataLoader(dataset, batch_size=8, num_workers=2, persistent_workers=True)
    assert sum(len(rows) for _, _, rows in loader) == 30
    shutil.rmtree(store)
    shutil.copytree(mild_store, store)
    with pytest.raises(StoreError, match=r"was replaced while this run read it \(created, crop differ\)"):
        dataset.set_epoch(1)


SLOW_WRITER = """
import sys, time
from pathlib import Path
from mealv2.pipeline.files import atomic_write

def slowly(tmp):
    tmp.write_text(sys.argv[2])
    print("writing", flush=True)
    time.sleep(float(sys.argv[3]))

atomic_write(Path(sys.argv[1]), slowly)
"""


@pytest.mark.parametrize("namespace", ["same", "another"])
def test_a_temporary_being_written_is_never_swept_and_a_killed_writers_is(namespace, pid_namespace, tmp_path):
    target = tmp_path / "config.json"
    second = [*(pid_namespace if namespace == "another" else []), sys.executable, "-c", SLOW_WRITER, target, "second"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, target, "first", "4"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "writing\n"
    done = subprocess.run([*second, "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert first.wait(timeout=120) == 0, first.stderr.read()  # its temporary was still there to rename
    assert target.read_text() == "first" and not list(tmp_path.glob(".*.tmp"))
    killed = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, target, "killed", "60"], stdout=subprocess.PIPE)
    assert killed.stdout.readline() == b"writing\n"
    killed.kill()
    killed.wait()
    assert len(list(tmp_path.glob(".*.tmp"))) == 1  # what a writer SIGKILLed mid-write leaves
    assert subprocess.run([*second, "0"], timeout=120).returncode == 0
    assert target.read_text() == "second" and not list(tmp_path.glob(".*.tmp"))


# A cache-teachers job whose timing the test sets: with a MEETING folder, it waits after opening the store until the
# other job has opened it too (both hold the attributes they read before either writes); with an AFTER file, it
# writes its provenance (its first attribute write at the end) only once that file exists.
TIMED_JOB = """
import os, sys, time
from mealv2.softlabels.writer import StoreWriter
meeting, me, after, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
opened, provenance = StoreWriter.open.__func__, StoreWriter.add_provenance

def opened_then_meet(cls, *a, **k):
    store = opened(cls, *a, **k)
    if meeting != "-" and not os.path.exists(os.path.join(meeting, me)):
        open(os.path.join(meeting, me), "w").close()
        while len(os.listdir(meeting)) < 2:
            time.sleep(0.01)
    return store

def provenance_after(store, record):
    while after != "-" and not os.path.exists(after):
        time.sleep(0.05)
    return provenance(store, record)

StoreWriter.open = classmethod(opened_then_meet)
StoreWriter.add_provenance = provenance_after
from mealv2.cli import main
main.main(args, prog_name="mealv2")
"""


def timed_job(name: str, args: list, meeting="-", after="-") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TIMED_JOB, str(meeting), name, str(after), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_two_shard_jobs_each_meeting_a_bad_image_list_both(small_root, teacher_files, tmp_path):
    data = Path(shutil.copytree(small_root, tmp_path / "data"))
    victims = ["class_0/img_001.jpg", "class_1/img_000.jpg"]  # rows 1 and 10: chunks 0 and 1, one per --shard i/2
    for victim in victims:
        path = data / "train" / victim
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # its header scans, its pixels do not decode
    store, meeting = tmp_path / "labels.zarr", tmp_path / "meeting"
    meeting.mkdir()
    jobs = [timed_job(f"job{i}", cache_args(data, store, teacher_files, "--skip-bad", "--shard", f"{i}/2"), meeting)
            for i in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    for victim, output in zip(victims, outputs):
        assert f"left out 1 undecodable image(s), listed in the store: {victim}" in output
    skipped = LabelStore.open(str(store)).skipped
    assert [entry.split(": ")[0] for entry in skipped] == victims, skipped  # once, one of the two was lost
    verified = run_cli("labels", "verify", store)
    assert verified.exit_code == 0, verified.output


def test_a_job_adding_seeds_keeps_them_while_a_job_of_fewer_seeds_ends_after_it(small_root, teacher_files, tmp_path):
    store, ended = tmp_path / "labels.zarr", tmp_path / "four-ended"
    three = timed_job("three", cache_args(small_root, store, teacher_files, "--seeds", "3"), after=ended)
    deadline = time.monotonic() + 300
    while not LabelStore.exists(str(store)):  # the --seeds 3 job created the store, and read it
        assert three.poll() is None and time.monotonic() < deadline, three.communicate()[0]
        time.sleep(0.05)
    four = subprocess.run([sys.executable, "-m", "mealv2", *map(str, cache_args(small_root, store, teacher_files,
                                                                                "--seeds", "4"))],
                          capture_output=True, text=True, timeout=600)
    assert four.returncode == 0, four.stdout[-3000:] + four.stderr[-3000:]
    ended.touch()  # the --seeds 3 job writes its attributes last
    assert three.wait(timeout=600) == 0, three.communicate()[0]
    labels = LabelStore.open(str(store))
    assert labels.seeds == [0, 1, 2, 3] and labels.done().shape == (4, 4)  # once: seeds [0, 1, 2] over 4 slots
    assert labels.is_complete
    verified = run_cli("labels", "verify", store)
    assert verified.exit_code == 0, verified.output
