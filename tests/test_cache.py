"""cache-teachers end to end: schema read back with plain zarr, labels equal the teachers on PIL crops,
resume after SIGKILL and sharded jobs give the same bytes, mismatches refused, verify catches damage."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import cache_args, run_cli, store_files

from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.pil_replay import replay_pil
from mealv2.softlabels.store import LabelStore
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers

pytestmark = pytest.mark.slow


def with_option(args: list[str], name: str, value: str) -> list[str]:
    """args with option ``name`` set to ``value`` (replaced, or appended when absent)."""
    args = list(args)
    if name in args:
        args[args.index(name) + 1] = value
        return args
    return args + [name, value]


def test_schema_read_back_with_plain_zarr(reference_store, small_root):
    group = zarr.open_group(str(reference_store), mode="r")
    attrs = group.attrs["mealv2"]
    assert attrs["format"] == 1 and attrs["complete"] is True and attrs["seeds"] == [0, 1]
    assert attrs["res"] == 32 and attrs["topk"] == 2 and attrs["residual"] == "uniform"
    assert attrs["crop"]["scale"] == [0.08, 1.0] and attrs["dataset"]["num_images"] == 30
    assert all("checkpoint_sha256" in t and "mean" in t and "std" in t for t in attrs["teachers"])
    expected = {"probs": ((2, 30, 2), "float16", (1, 8, 2)), "classes": ((2, 30, 2), "uint16", (1, 8, 2)),
                "boxes": ((2, 30, 4), "int32", (1, 8, 4)), "flips": ((2, 30), "bool", (1, 8)),
                "done": ((2, 4), "bool", (1, 1)), "index/sizes": ((30, 2), "int32", None),
                "index/labels": ((30,), "int32", None)}
    for name, (shape, dtype, chunks) in expected.items():
        array = group[name]
        assert array.shape == shape and str(array.dtype) == dtype, name
        if chunks:
            assert array.chunks == chunks, name
        codecs = [type(c).__name__ for c in array.metadata.codecs]
        assert codecs[-2:] == ["BloscCodec", "Crc32cCodec"], name
        assert array.metadata.codecs[-2].cname.value == "zstd"
    index = DatasetIndex.scan(small_root / "train")
    assert list(group["index/paths"][:]) == index.paths
    assert attrs["dataset"]["fingerprint"] == index.fingerprint
    probs = group["probs"][:].astype(np.float32)
    assert (np.diff(probs, axis=-1) <= 0).all() and (probs.sum(-1) <= 1.001).all()
    assert group["done"][:].all()


def test_labels_equal_teachers_on_reference_crops(reference_store, small_root, teacher_files):
    store = LabelStore.open(str(reference_store))
    index = DatasetIndex.scan(small_root / "train")
    ensemble = TeacherEnsemble(parse_teachers(teacher_files, 32), 3, "cpu")
    for slot in (0, 1):
        labels = store.read_slot(slot)
        crops = []
        for i in range(len(index)):
            with open(index.file(i), "rb") as handle:
                crops.append(replay_pil(handle.read(), labels.boxes[i], labels.flips[i], 32))
        probs, _ = ensemble(torch.from_numpy(np.stack(crops)))
        expected = probs.gather(1, torch.from_numpy(labels.classes.astype(np.int64)))
        np.testing.assert_allclose(labels.probs.astype(np.float32), expected.numpy(), atol=0.02)
        agree = (probs.argmax(1).numpy() == labels.classes[:, 0]).mean()
        assert agree > 0.9


def test_stored_boxes_are_the_seed_crops(reference_store, small_root):
    from mealv2.pipeline.crops import CropSpec
    store = LabelStore.open(str(reference_store))
    index = DatasetIndex.scan(small_root / "train")
    for slot, seed in enumerate(store.seeds):
        boxes, flips = CropSpec().draw(seed, index.sizes)
        labels = store.read_slot(slot)
        np.testing.assert_array_equal(labels.boxes, boxes)
        np.testing.assert_array_equal(labels.flips, flips)


def test_killed_run_resumes_to_the_same_bytes(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "mealv2", *cache_args(small_root, store, teacher_files)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_cells = store / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (done_cells.exists() and any(
            p.is_file() and not p.name.endswith(".partial") for p in done_cells.rglob("*"))):
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)  # right after the first unit: most of the job is still to do
    process.wait()
    assert not LabelStore.open(str(store)).attrs["complete"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert store_files(store) == store_files(reference_store)


def test_two_shards_fill_the_same_store(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "sharded.zarr"
    first = run_cli(*cache_args(small_root, store, teacher_files, "--shard", "0/2"))
    assert first.exit_code == 0, first.output
    assert "incomplete" in first.output
    second = run_cli(*cache_args(small_root, store, teacher_files, "--shard", "1/2"))
    assert second.exit_code == 0, second.output
    assert store_files(store) == store_files(reference_store)


def test_rate_is_over_the_labelling_and_total_time_is_kept(small_root, teacher_files, tmp_path):
    result = run_cli(*cache_args(small_root, tmp_path / "timed.zarr", teacher_files))
    assert result.exit_code == 0, result.output
    found = re.search(r"(\d+) labelled in ([\d.]+) s \(([\d.]+) img/s; ([\d.]+) s in all\)", result.output)
    assert found, result.output
    labelled, labelling, rate, total = (float(v) for v in found.groups())
    assert 0 < labelling <= total
    # the printed seconds and rate are rounded to 0.1 (on a loaded machine the rate's own rounding dominates)
    assert labelled / (labelling + 0.05) - 0.05 <= rate <= labelled / max(labelling - 0.05, 1e-3) + 0.05


def test_progress_lines_outside_a_terminal_and_in_the_stores_log(small_root, teacher_files, tmp_path):
    """Under nohup or Slurm (no terminal) stage one prints progress lines as training does, and appends every line,
    timed, to STORE.log beside the store."""
    store = tmp_path / "logged.zarr"
    run = subprocess.run([sys.executable, "-m", "mealv2", *map(str, cache_args(small_root, store, teacher_files,
                                                                                "--log-interval", "3"))],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    lines = re.findall(r"cache-teachers: (\d+)/60 img labelled, (\d)/8 unit\(s\) written \| \d+ img/s \| eta \d+ s",
                       run.stdout)
    assert len(lines) >= 4 and [int(done) for done, _ in lines] == sorted(int(done) for done, _ in lines), run.stdout
    log = (tmp_path / "logged.zarr.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in log] == run.stdout.splitlines()  # the summary line too
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d cache-teachers: 30 images, 2 seed slot", log[0])


def test_more_seeds_extend_without_touching_existing_slots(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "grown.zarr"
    shutil.copytree(reference_store, store)
    before = {k: v for k, v in store_files(store).items() if "/c/" in k}
    result = run_cli(*with_option(cache_args(small_root, store, teacher_files), "--seeds", "3"))
    assert result.exit_code == 0, result.output
    after = store_files(store)
    assert all(after[k] == v for k, v in before.items())
    grown = LabelStore.open(str(store))
    assert grown.seeds == [0, 1, 2] and grown.attrs["complete"] and grown.done().all()


@pytest.mark.parametrize("change,message", [
    (("--res", "40"), "res 32 vs 40"),
    (("--topk", "3"), "topk 2 vs 3"),
    (("--residual", "renorm"), "residual uniform vs renorm"),
])
def test_mismatched_jobs_are_refused(reference_store, small_root, teacher_files, change, message, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, store)
    result = run_cli(*with_option(cache_args(small_root, store, teacher_files), *change))
    assert result.exit_code == 1 and message in result.output
    assert store_files(store) == store_files(reference_store)


def test_crop_ranges_are_recorded_and_guarded(mild_store, reference_store, small_root, teacher_files, tmp_path):
    from mealv2.pipeline.crops import CropSpec
    store = LabelStore.open(str(mild_store))
    assert store.attrs["crop"] == CropSpec(scale=(0.5, 1)).attrs()
    index = DatasetIndex.scan(small_root / "train")
    for slot, seed in enumerate(store.seeds):
        np.testing.assert_array_equal(store.read_slot(slot).boxes, CropSpec(scale=(0.5, 1)).draw(seed, index.sizes)[0])
    assert "scale 0.5 1, ratio 0.75 1.333" in run_cli("labels", "info", mild_store).output
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, copy)
    result = run_cli(*cache_args(small_root, copy, teacher_files, "--scale", "0.5", "1"))
    assert result.exit_code == 1 and "crop {'scale': [0.08, 1.0]" in result.output, result.output
    assert store_files(copy) == store_files(reference_store)
    result = run_cli(*cache_args(small_root, tmp_path / "bad.zarr", teacher_files, "--scale", "0.5", "0.2"))
    assert result.exit_code == 1 and "--scale 0.5 0.2: expected 0 < MIN <= MAX <= 1" in result.output


def test_other_teachers_and_other_data_are_refused(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, store)
    one_teacher = teacher_files.split(",")[0]
    result = run_cli(*cache_args(small_root, store, one_teacher))
    assert result.exit_code == 1 and "teachers" in result.output
    other = tmp_path / "other"
    shutil.copytree(small_root, other)
    (other / "train" / "class_0" / "img_000.jpg").unlink()
    result = run_cli(*cache_args(other, store, teacher_files))
    assert result.exit_code == 1 and "dataset fingerprint" in result.output


def test_bad_options_are_one_line_errors(small_root, teacher_files, tmp_path):
    for args, message in [(("--shard", "3/2"), "0 <= I < N"), (("--batch-size", "0"), "--batch-size must be"),
                          (("--topk", "9"), "only 3 classes")]:
        result = run_cli(*with_option(cache_args(small_root, tmp_path / "x.zarr", teacher_files), *args))
        assert result.exit_code == 1 and message in result.output, result.output
    result = run_cli(*cache_args(small_root, tmp_path / "y.zarr", "test_resnet=/nonexistent.pth"))
    assert result.exit_code == 1 and "/nonexistent.pth: checkpoint not found" in result.output
    result = run_cli(*cache_args(small_root, tmp_path / "z.zarr", "not_a_model_name=/x.pth"))
    assert result.exit_code == 1 and "not a timm model name" in result.output


def test_verify_passes_then_catches_altered_labels_and_flipped_bytes(reference_store, small_root, teacher_files,
                                                                     tmp_path):
    ok = run_cli("labels", "verify", reference_store, "--data", small_root, "--recompute", "12",
                 "--teachers", teacher_files, "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    altered = tmp_path / "altered.zarr"
    shutil.copytree(reference_store, altered)
    probs = zarr.open_group(str(altered), mode="r+")["probs"]
    probs[0, 0, 0] = probs[0, 0, 0] - np.float16(0.2)
    result = run_cli("labels", "verify", altered, "--data", small_root, "--recompute", "30",
                     "--teachers", teacher_files, "--device", "cpu")
    assert result.exit_code == 1 and "recomputed labels differ" in result.output
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(reference_store, damaged)
    chunk = damaged / "classes" / "c" / "1" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run_cli("labels", "verify", damaged)
    assert result.exit_code == 1 and "classes chunk 1.2.0" in result.output


def test_verify_checks_every_slot_against_its_own_crops(reference_store, small_root, teacher_files, tmp_path):
    """Labels written against another slot's crops (a misaligned unit) fail the recompute, naming the slot.

    The test teachers are random and barely react to the crop (slots differ by < 0.01), so the tolerance
    is set just above float16 rounding (2.4e-4), which the aligned store passes when the labels are
    recomputed as they were made: on the CPU, in float32 (on a GPU the teachers run in bf16, far coarser).
    """
    tight = ("--data", small_root, "--recompute", "20", "--teachers", teacher_files, "--max-dp", "0.0005",
             "--device", "cpu")
    assert run_cli("labels", "verify", reference_store, *tight).exit_code == 0
    shifted = tmp_path / "shifted.zarr"
    shutil.copytree(reference_store, shifted)
    group = zarr.open_group(str(shifted), mode="r+", use_consolidated=False)
    for name in ("probs", "classes"):
        group[name][1] = group[name][0]  # slot 1 holds slot 0's labels, but its own boxes
    result = run_cli("labels", "verify", shifted, *tight)
    assert result.exit_code == 1 and "recomputed labels differ" in result.output
    assert "over 2 seed slot(s)" in result.output and "(slot 1)" in result.output


def test_info_reports_the_store(reference_store):
    result = run_cli("labels", "info", reference_store, "--json")
    info = json.loads(result.output)
    assert info["images"] == 30 and info["seeds"] == [0, 1] and info["complete"]
    assert info["bytes_per_crop"] > 0 and len(info["teachers"]) == 2


def test_a_store_records_how_its_labels_were_made(reference_store):
    import timm
    import zarr

    info = json.loads(run_cli("labels", "info", reference_store, "--json").output)
    assert info["made_with"] == [{"decoder": "dali", "device": "cpu", "device_name": None, "autocast": "off",
                                  "torch": torch.__version__, "timm": timm.__version__,
                                  "dali": info["made_with"][0]["dali"], "zarr": zarr.__version__}]
    assert info["made_with"][0]["dali"]  # the installed DALI build's version
    shown = run_cli("labels", "info", reference_store).output
    assert f"made with: dali decoder on cpu, autocast off; torch {torch.__version__}" in shown


@pytest.mark.parametrize("extra, most", [((), 8), (("--cutmix", "1", "--mixup-prob", "0.5"), 16)])
def test_stage_one_draws_each_units_crops_not_a_whole_slots(small_root, teacher_files, reference_store, cutmix_store,
                                                           tmp_path, monkeypatch, extra, most):
    """A slot's draw held about 640 bytes an image at its peak, on every rank (8.8 GiB at ImageNet-21k): crops are
    drawn for a unit's 8 rows and, with CutMix, their partners from other chunks; the store is the same store."""
    import mealv2.pipeline.crops as crops

    drawn = []
    real = crops.sample_crops

    def counting(seed, sizes, *args, **kwargs):
        drawn.append(len(sizes))
        return real(seed, sizes, *args, **kwargs)
    monkeypatch.setattr(crops, "sample_crops", counting)
    store = tmp_path / "labels.zarr"
    assert run_cli(*cache_args(small_root, store, teacher_files, *extra)).exit_code == 0
    assert drawn and max(drawn) <= most, drawn
    assert store_files(store) == store_files(cutmix_store if extra else reference_store)
    monkeypatch.setattr(crops, "sample_crops", real)
    sizes, written = DatasetIndex.scan(small_root / "train").sizes, zarr.open_group(str(store), mode="r")
    for slot in range(2):  # the boxes a draw of the whole slot gives
        boxes, flips = crops.CropSpec().draw(slot, sizes)
        assert (written["boxes"][slot] == boxes).all() and (written["flips"][slot] == flips).all()
