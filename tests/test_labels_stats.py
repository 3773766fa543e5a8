"""`labels stats`: each slot's figures against a direct computation from the dense targets, skipped rows left
out, CutMix composites kept out of the teachers' top-1, the table, the JSON and the PNG."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import cache_args, run_cli
from PIL import Image

from mealv2.softlabels.stats import dense_entropy
from mealv2.softlabels.store import LabelStore
from mealv2.softlabels.writer import StoreWriter
from mealv2.softlabels.topk import compress, expand


def stats_json(store, *extra) -> dict:
    result = run_cli("labels", "stats", store, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def expected_figures(store_path) -> list[dict]:
    """Each slot's figures computed the long way: dense (N, C) targets from `expand`, rows with labels only."""
    store = LabelStore.open(str(store_path))
    truth = torch.from_numpy(zarr.open_group(str(store_path), mode="r")["index/labels"][...].astype(np.int64))
    top1s, figures = [], []
    for slot in range(len(store.seeds)):
        labels = store.read_slot(slot)
        values = torch.from_numpy(labels.probs.astype(np.float32))
        classes = torch.from_numpy(labels.classes.astype(np.int64))
        labelled = values[:, 0] > 0
        dense = expand(values[labelled], classes[labelled], store.num_classes, store.residual)
        entropy = -(dense * dense.clamp_min(1e-30).log()).sum(1)
        top1 = classes[:, 0]
        mixed = torch.zeros_like(labelled)
        if labels.mix_partner is not None:
            partner = torch.from_numpy(labels.mix_partner.astype(np.int64))
            area = torch.from_numpy(labels.mix_boxes[:, 2] * labels.mix_boxes[:, 3])
            mixed = (partner >= 0) & (area > 0) & labelled
        scored = labelled & ~mixed
        figure = {"rows": int(labelled.sum()), "entropy": float(entropy.mean()),
                  "top1_mass": float(values[labelled, 0].mean()), "topk_mass": float(values[labelled].sum(1).mean()),
                  "teacher_top1": float((top1[scored] == truth[scored]).float().mean()), "mixed": int(mixed.sum())}
        if mixed.any():
            own = top1[mixed] == truth[mixed]
            figure["mixed_top1_either"] = float((own | (top1[mixed] == truth[partner[mixed]])).float().mean())
        figures.append(figure)
        top1s.append(torch.where(labelled, top1, -1))
    for a, figure in enumerate(figures):
        others = []
        for b in range(len(figures)):
            both = (top1s[a] >= 0) & (top1s[b] >= 0)
            if b != a:
                others.append(float((top1s[a][both] == top1s[b][both]).float().mean()))
        figure["agreement"] = float(np.mean(others)) if others else None
    return figures


def assert_figures(report: dict, store_path) -> None:
    expected = expected_figures(store_path)
    assert len(report["slots"]) == len(expected)
    for got, want in zip(report["slots"], expected):
        for key, value in want.items():
            assert got[key] == (None if value is None else pytest.approx(value, abs=1e-5)), (got["slot"], key)


@pytest.mark.parametrize("residual", ["uniform", "renorm"])
@pytest.mark.parametrize("k", [3, 10])
def test_closed_form_entropy_is_the_entropy_of_the_expanded_target(residual, k):
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(64, 10), -1)
    values, classes = compress(probs, k)
    dense = expand(values, classes, 10, residual)
    direct = -(dense * dense.clamp_min(1e-30).log()).sum(1)
    ours = dense_entropy(values.numpy(), 10, residual)
    assert ours == pytest.approx(direct.numpy(), abs=1e-5)
    if k < 10 and residual == "uniform":  # the residual carries entropy of its own: renorm's figure is lower
        assert (ours > dense_entropy(values.numpy(), 10, "renorm") + 1e-3).all()


def test_plain_store_figures_table_and_plot(reference_store, small_root, tmp_path):
    report = stats_json(reference_store, "--data", small_root)
    assert_figures(report, reference_store)
    assert report["num_slots"] == 2 and report["skipped"] == 0
    assert len(report["agreement"]) == 2 and report["agreement"][0][1] == pytest.approx(report["slots"][0]["agreement"])
    store = LabelStore.open(str(reference_store))
    truth = zarr.open_group(str(reference_store), mode="r")["index/labels"][...]
    right = np.concatenate([store.read_slot(slot).classes[:, 0] == truth for slot in range(2)])
    per_class = {name: right[np.tile(truth, 2) == c].mean() for c, name in enumerate(store.attrs["dataset"]["classes"])}
    assert report["class_top1"] == pytest.approx(per_class)

    png = tmp_path / "stats.png"
    result = run_cli("labels", "stats", reference_store, "--plot", png)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "2 of 2 slot(s) written whole" in lines[0]
    first = lines[3].split()
    assert first[:3] == ["0", "0", "30"] and float(first[3]) == pytest.approx(report["slots"][0]["entropy"], abs=1e-4)
    assert lines[-1].startswith("weakest classes")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width > 1000 and 300 < image.height < image.width


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_skipped_rows_are_left_out_and_unfinished_slots_are_not_read(reference_store, tmp_path):
    store_path = tmp_path / "skipped.zarr"
    shutil.copytree(reference_store, store_path)
    store, reader = StoreWriter.open(str(store_path)), LabelStore.open(str(store_path))
    for slot in range(2):  # rows 4 and 21 rewritten as --skip-bad writes images it could not decode: zeros
        labels = reader.read_slot(slot)
        labels.probs[[4, 21]], labels.classes[[4, 21]] = 0, 0
        for chunk in (0, 2):  # 8-row chunks
            rows = store.rows(chunk)
            store.write_unit(slot, chunk, labels.take(slice(rows.start, rows.stop)))
    group = zarr.open_group(str(store_path), mode="r+", use_consolidated=False)
    paths = group["index/paths"][[4, 21]]
    store.add_skipped([f"{p}: cannot decode image (test)" for p in paths])
    zarr.consolidate_metadata(str(store_path))
    report = stats_json(store_path)
    assert [s["rows"] for s in report["slots"]] == [28, 28] and report["skipped"] == 2
    assert_figures(report, store_path)

    group["done"][1, 0] = False  # slot 1 being rewritten: only slot 0 is summarised
    result = run_cli("labels", "stats", store_path)
    assert result.exit_code == 0, result.output
    assert "1 of 2 slot(s) written whole" in result.output and "rows left out (no labels): 2 " in result.output


def test_cutmix_store_keeps_composites_out_of_the_teachers_top1(small_root, teacher_files, tmp_path):
    store_path = tmp_path / "cutmix.zarr"
    result = run_cli(*cache_args(small_root, store_path, teacher_files, "--cutmix", "1", "--mixup-prob", "0.5",
                                  "--seeds", "1"))
    assert result.exit_code == 0, result.output
    report = stats_json(store_path)
    assert_figures(report, store_path)
    assert [s["rows"] for s in report["slots"]] == [30] and 0 < report["slots"][0]["mixed"] < 30
    result = run_cli("labels", "stats", store_path)
    assert "mixed: own/partner" in result.output


def test_clear_errors(reference_store, mixed_root, tmp_path):
    result = run_cli("labels", "stats", tmp_path / "nothing.zarr")
    assert result.exit_code == 1 and "nothing.zarr: no label store there" in result.output
    result = run_cli("labels", "stats", reference_store, "--data", mixed_root)
    assert result.exit_code == 1 and "labels are for another dataset than" in result.output
