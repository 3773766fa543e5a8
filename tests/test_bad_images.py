"""A JPEG whose header is fine and whose pixels are not: found by `data check`, named or skipped by stage one,
never met by stage two."""

import shutil

import numpy as np
import pytest
import torch
from conftest import cache_args, run_cli

from mealv2.distill.targets import CachedTargets
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.softlabels.store import LabelStore

pytestmark = pytest.mark.slow
TRUNCATED = "class_1/img_004.jpg"


@pytest.fixture(scope="module")
def damaged_root(small_root, tmp_path_factory):
    """small_root with one JPEG cut in half: its header still scans."""
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(small_root, root)
    path = root / "train" / TRUNCATED
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert TRUNCATED in DatasetIndex.scan(root / "train").paths  # the header scan does not see it
    return root


def test_data_check_lists_the_undecodable_file(damaged_root, small_root):
    result = run_cli("data", "check", damaged_root)
    assert result.exit_code == 1
    assert f"BAD {damaged_root / 'train' / TRUNCATED}: cannot decode image" in result.output
    assert "train: 30 images, 1 cannot be decoded" in result.output and "val: 12 images, 0" in result.output
    clean = run_cli("data", "check", small_root)
    assert clean.exit_code == 0 and "BAD" not in clean.output


def test_stage_one_names_the_file_then_skips_it_and_stage_two_never_meets_it(damaged_root, teacher_files,
                                                                               tmp_path):
    store = tmp_path / "labels.zarr"
    failed = run_cli(*cache_args(damaged_root, store, teacher_files))
    assert failed.exit_code == 1
    assert f"{damaged_root / 'train' / TRUNCATED}: cannot decode image" in failed.output
    assert "--skip-bad" in failed.output
    done = LabelStore.open(str(store)).done()
    assert not done.all()  # the unit holding the file was not written, partly or wholly
    resumed = run_cli(*cache_args(damaged_root, store, teacher_files, "--skip-bad"))
    assert resumed.exit_code == 0, resumed.output
    assert "left out 1 undecodable image(s)" in resumed.output
    opened = LabelStore.open(str(store))
    assert opened.is_complete
    assert any(entry.startswith(f"{TRUNCATED}: cannot decode image") for entry in opened.skipped)
    row = DatasetIndex.scan(damaged_root / "train", skip_bad=True).paths.index(TRUNCATED)
    for slot in range(2):
        labels = opened.read_slot(slot)
        assert (labels.probs[row] == 0).all() and (labels.probs[np.arange(30) != row, 0] > 0).all()
    trainable = CachedTargets(opened, torch.device("cpu")).plan(0).trainable
    assert row not in trainable and len(trainable) == 29
    run = run_cli("distill", "--data", damaged_root, "--labels", store, "--student", "test_resnet", "--init",
                  "scratch", "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "8", "--no-progress",
                  "--no-discriminator", "--device", "cpu")
    assert run.exit_code == 0, run.output  # the file is in train/, but no epoch asks for it
    verify = run_cli("labels", "verify", store, "--data", damaged_root, "--recompute", "20", "--teachers",
                     teacher_files, "--device", "cpu")
    assert verify.exit_code == 0, verify.output


def test_an_unlabelled_row_is_the_same_to_every_reader_even_when_its_path_holds_a_colon(damaged_root, teacher_files,
                                                                                         tmp_path):
    import mealv2

    root = tmp_path / "data"
    shutil.copytree(damaged_root, root)
    named = "class_1/img: 004.jpg"  # the skipped list reads "PATH: REASON"
    (root / "train" / TRUNCATED).rename(root / "train" / named)
    store = tmp_path / "labels.zarr"
    cached = run_cli(*cache_args(root, store, teacher_files, "--seeds", "1", "--skip-bad"))
    assert cached.exit_code == 0, cached.output
    opened = mealv2.open_store(str(store))
    row = opened.index.paths.index(named)
    assert np.flatnonzero(~opened.read_slot(0).labelled()).tolist() == [row] == opened.skipped_rows().tolist()
    assert not opened.targets(0, [row]).any() and opened.targets(0, [row - 1]).sum() == pytest.approx(1)
    trainable = CachedTargets(opened, torch.device("cpu")).plan(0).trainable
    assert row not in trainable and len(trainable) == 29
    assert row not in mealv2.ReplayDataset(root, opened).rows
    stats = run_cli("labels", "stats", store, "--json")
    assert stats.exit_code == 0 and '"rows": 29' in stats.output, stats.output
    verified = run_cli("labels", "verify", store)
    assert verified.exit_code == 0, verified.output


def test_file_names_holding_a_newline_or_bytes_that_are_not_utf8(small_root, teacher_files, tmp_path):
    """A name holding a newline, beside a stray file named like its second line: every image keeps its own labels
    in DALI's workers (which receive the index) and recompute with torchvision agrees. A name that is not UTF-8
    is one line naming it, and --skip-bad leaves it out."""
    import os

    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    folder = root / "train" / "class_0"
    shutil.copyfile(folder / "img_000.jpg", f"{folder / 'img_000.jpg'}\nzz.jpg")
    shutil.copyfile(folder / "img_004.jpg", folder / "zz.jpg")
    store = tmp_path / "names.zarr"
    made = run_cli(*cache_args(root, store, teacher_files, "--seeds", "1", "--decoder", "dali"))
    assert made.exit_code == 0, made.output
    assert "class_0/img_000.jpg\nzz.jpg" in LabelStore.open(str(store)).index.paths
    recomputed = run_cli("labels", "verify", store, "--data", root, "--recompute", "40", "--decoder", "torch",
                         "--teachers", teacher_files, "--device", "cpu")
    assert recomputed.exit_code == 0 and f"{store}: ok" in recomputed.output, recomputed.output

    os.rename(folder / "img_001.jpg", os.fsencode(folder) + b"/caf\xe9.jpg")
    refused = run_cli(*cache_args(root, tmp_path / "refused.zarr", teacher_files, "--seeds", "1"))
    assert refused.exit_code == 1
    assert f"{folder}/caf\\xe9.jpg: file name is not valid UTF-8" in refused.output
    skipped = tmp_path / "skipped.zarr"
    made = run_cli(*cache_args(root, skipped, teacher_files, "--seeds", "1", "--skip-bad"))
    assert made.exit_code == 0, made.output
    assert len(LabelStore.open(str(skipped)).index.paths) == 31  # 30, one more, one left out


def test_verify_reads_the_paths_once_whatever_the_units_holding_skipped_rows(damaged_root, teacher_files, tmp_path,
                                                                            monkeypatch):
    """Each unit with an empty row read the whole paths array again (O(units × images): 26 s instead of 8 s for
    20 skipped images at ImageNet size, hours at 21k × 16 slots); the store's index is read once."""
    import zarr

    from mealv2.softlabels.verify import verify

    store = tmp_path / "skipped.zarr"
    assert run_cli(*cache_args(damaged_root, store, teacher_files, "--skip-bad", "--seeds", "4")).exit_code == 0
    reads, read = [], zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda array, key: reads.append(array.path) or read(array, key))
    assert verify(str(store), device="cpu")["problems"] == []
    assert reads.count("probs") >= 4  # every slot's units were read
    assert reads.count("index/paths") == 2  # its checksums once, the index once: not again for each of 4 slots
