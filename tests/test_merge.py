"""Merging label stores: the weighted mean of the parents' rows, rebuilt by their residual rules, cut to top-k."""

import pytest
import torch

from mealv2.pipeline.mix import MIX_ALGORITHM
from mealv2.softlabels.merge import merge_topk
from mealv2.softlabels.topk import compress, expand


def teacher_rows(rows: int, classes: int, seed: int) -> torch.Tensor:
    """A teacher ensemble's softmax on ``rows`` crops: peaked, every row different."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(rows, classes, generator=generator), dim=-1)


@pytest.mark.parametrize("residual", ["uniform", "renorm"])
def test_the_merge_is_the_weighted_mean_where_no_class_falls_outside_the_kept_ones(residual):
    classes = 12
    a, b = compress(teacher_rows(500, classes, 0), 3), compress(teacher_rows(500, classes, 1), 4)
    values, kept = merge_topk([(*a, residual), (*b, residual)], [2, 1], classes, 7)  # 7 >= 3 + 4 classes kept
    mean = (2 * expand(*a, classes, residual) + expand(*b, classes, residual)) / 3
    assert torch.allclose(expand(values, kept, classes, residual), mean, atol=1e-3)
    assert values.dtype == torch.float16 and (values[:, :-1] >= values[:, 1:]).all()


def test_a_smaller_k_keeps_the_largest_classes_of_the_mean():
    classes = 50
    a, b = compress(teacher_rows(300, classes, 2), 5), compress(teacher_rows(300, classes, 3), 5)
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 5)
    mean = (expand(*a, classes) + expand(*b, classes)) / 2
    best, best_classes = mean.topk(6, dim=-1)
    assert torch.allclose(values.float(), best[:, :5], atol=1e-3)
    clear = (best[:, :-1] - best[:, 1:] > 1e-3).all(-1)  # rows whose top-5 is not decided by float16 rounding
    assert clear.sum() > 200 and (kept.long()[clear] == best_classes[clear, :5]).all()


def test_weights_count_teachers():
    """A store of two teachers and one of one: the mean of three, not of two stores."""
    classes = 8
    a, b = compress(teacher_rows(64, classes, 4), classes), compress(teacher_rows(64, classes, 5), classes)
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [2, 1], classes, classes)
    even, _ = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, classes)
    dense = expand(values, kept, classes)
    assert torch.allclose(dense, (2 * expand(*a, classes) + expand(*b, classes)) / 3, atol=1e-3)
    assert not torch.allclose(values.float(), even.float(), atol=1e-2)


def test_a_row_both_skipped_stays_empty_and_one_skipped_by_one_store_is_refused():
    classes = 10
    a, b = compress(teacher_rows(6, classes, 6), 3), compress(teacher_rows(6, classes, 7), 3)
    for values, _ in (a, b):
        values[2] = 0
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 3)
    assert (values[2] == 0).all() and (values[[0, 1, 3, 4, 5], 0] > 0).all()
    a[0][4] = 0
    with pytest.raises(ValueError, match="row 4: labelled in some stores and empty in others"):
        merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 3)


def test_rows_are_merged_alike_whatever_block_they_fall_in(monkeypatch):
    import mealv2.softlabels.merge as merge

    classes = 20
    parents = [(*compress(teacher_rows(1000, classes, s), 4), "uniform") for s in (8, 9, 10)]
    whole = merge_topk(parents, [1, 2, 1], classes, 6)
    monkeypatch.setattr(merge, "ROWS_AT_ONCE", 7)
    blocks = merge_topk(parents, [1, 2, 1], classes, 6)
    assert all(torch.equal(x, y) for x, y in zip(whole, blocks))


# -- labels merge on real stores ------------------------------------------------------------------------------------

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from conftest import cache_args, run_cli, store_files  # noqa: E402


@pytest.fixture(scope="module")
def parents(small_root, teacher_files, reference_store, tmp_path_factory):
    """The reference run's two teachers cached one per store: the second with --like the first."""
    first, second = teacher_files.split(",")
    folder = tmp_path_factory.mktemp("parents")
    a, b = folder / "a.zarr", folder / "b.zarr"
    assert run_cli(*cache_args(small_root, a, first)).exit_code == 0
    result = run_cli("cache-teachers", "--data", small_root, "--store", b, "--teachers", second, "--like", a,
                     "--device", "cpu", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return a, b


@pytest.fixture(scope="module")
def merged(parents, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "ab.zarr"
    before = [store_files(p) for p in parents]
    result = run_cli("labels", "merge", *parents, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert [store_files(p) for p in parents] == before  # the parents are only read
    return out


def test_a_teacher_added_by_merging_labels_as_both_cached_at_once(merged, reference_store):
    """3 classes, top-2 each: every class is kept or rebuilt exactly, so the merge is the two-teacher store's labels
    (to float16 rounding), on the same crops, and its identity names both parents."""
    got, want = zarr.open_group(str(merged), mode="r"), zarr.open_group(str(reference_store), mode="r")
    for name in ("boxes", "flips", "classes"):
        assert np.array_equal(got[name][...], want[name][...]), name
    assert np.abs(got["probs"][...].astype(np.float32) - want["probs"][...].astype(np.float32)).max() < 2e-3
    info = run_cli("labels", "info", merged)
    assert info.exit_code == 0 and "merged from" in info.output and "a.zarr" in info.output
    stats = [run_cli("labels", "stats", store).output.splitlines()[1:] for store in (merged, reference_store)]
    assert stats[0] == stats[1]  # the same table as any store's (its first line names the store)


def test_a_merged_store_recomputes_from_all_its_teachers(merged, small_root, teacher_files):
    result = run_cli("labels", "verify", merged, "--data", small_root, "--recompute", "12", "--teachers",
                     teacher_files, "--device", "cpu")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("other, difference", [("mild_store", "crop differs"), ("content_store", "dataset differs")])
def test_stores_of_other_crops_or_data_are_refused(reference_store, other, difference, request, tmp_path):
    result = run_cli("labels", "merge", reference_store, request.getfixturevalue(other), "--out", tmp_path / "m.zarr")
    assert result.exit_code == 1 and difference in result.output and "--like" in result.output
    assert not (tmp_path / "m.zarr").exists()


def test_like_refuses_a_flag_that_would_make_other_crops(parents, small_root, teacher_files, tmp_path):
    result = run_cli("cache-teachers", "--data", small_root, "--store", tmp_path / "c.zarr", "--teachers",
                     teacher_files.split(",")[1], "--like", parents[0], "--scale", "0.5", "1", "--device", "cpu")
    assert result.exit_code == 2 and "--scale (0.5, 1.0)" in result.output and "leave the flag out" in result.output


def test_a_killed_merge_resumes_to_the_same_store(parents, merged, tmp_path):
    """What a kill leaves (some units done, one written without its done cell, the rest absent) is finished by the
    same command into the store an uninterrupted merge made."""
    out = tmp_path / "ab.zarr"
    shutil.copytree(merged, out)
    for chunk in range(4):  # slot 1's units not marked done: chunk 3 never written, the others written whole
        (out / f"done/c/1/{chunk}").unlink()
    for name in ("probs", "classes", "boxes", "flips", "written"):
        shutil.rmtree(out / name / "c/1/3") if (out / name / "c/1/3").is_dir() else (out / name / "c/1/3").unlink()
    attrs = (out / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    (out / "zarr.json").write_text(attrs)
    result = run_cli("labels", "merge", *parents, "--out", out, "--no-progress")
    assert result.exit_code == 0 and "4 unit(s) merged" in result.output, result.output
    assert store_files(out) == store_files(merged)


@pytest.mark.parametrize("key, value, named", [
    ("seeds", [0, 7], "seeds"), ("res", 48, "res"), ("interpolation", "bicubic", "interpolation"),
    ("mix", {"prob": 0.5, "algorithm": MIX_ALGORITHM}, "mix"), ("skipped", ["c0/x.png: cannot decode"], "skipped images"),
    ("residual", "renorm", "residual"), ("dataset.classes", ["a", "b", "c"], "dataset")])
def test_each_difference_that_makes_other_crops_is_named(reference_store, key, value, named, tmp_path):
    """A copy of the store with one attribute changed in its zarr.json (consolidated copy too) is refused by name."""
    import json

    other = tmp_path / "other.zarr"
    shutil.copytree(reference_store, other)
    meta = json.loads((other / "zarr.json").read_text())
    for attrs in [meta["attributes"]["mealv2"]] + [m["attributes"]["mealv2"] for k, m in meta.get(
            "consolidated_metadata", {}).get("metadata", {}).items() if k == ""]:
        outer, _, inner = key.rpartition(".")
        (attrs[outer] if outer else attrs)[inner] = value
    (other / "zarr.json").write_text(json.dumps(meta))
    result = run_cli("labels", "merge", reference_store, other, "--out", tmp_path / "m.zarr")
    assert result.exit_code == 1 and f"its {named} differs" in result.output, result.output
    assert not (tmp_path / "m.zarr").exists()
