"""The public Python API (`mealv2.open_store`, `ReplayDataset`, `StoreLoader`) and the one import namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import mealv2
from mealv2.pipeline.pil_replay import replay_pil
from mealv2.softlabels.topk import expand

SHADOWED = ("pipeline", "softlabels", "distill")


def contract_crop(root: Path, store, epoch: int, row: int) -> np.ndarray:
    """The crop contract replayed with PIL (the oracle), composites included, straight from the store's arrays."""
    crops, paths = store.crops(epoch), store.index.paths

    def replay(i):
        encoded = (root / "train" / paths[i]).read_bytes()
        return replay_pil(encoded, crops.boxes[i], bool(crops.flips[i]), store.res, store.interpolation)

    image = np.array(replay(row))
    if crops.mix_partner is not None and crops.mix_partner[row] >= 0:
        top, left, height, width = crops.mix_boxes[row]
        image[:, top:top + height, left:left + width] = replay(crops.mix_partner[row])[:, top:top + height,
                                                                                        left:left + width]
    return image


def assert_contract(root: Path, store, epoch: int, images: torch.Tensor, targets: torch.Tensor, rows) -> None:
    values, classes = store.topk(epoch, rows)
    assert torch.equal(targets, expand(values, classes, store.num_classes, store.residual))
    for image, row in zip(images, rows):
        diff = np.abs(image.numpy().astype(int) - contract_crop(root, store, epoch, int(row)))
        assert diff.mean() < 1.0 and diff.max() <= 8, row  # the decoders' tolerance (tests/test_replay.py)


def test_open_store_reads_what_cache_teachers_wrote(reference_store):
    import zarr

    store = mealv2.open_store(str(reference_store))
    group = zarr.open_group(str(reference_store), mode="r")
    assert store.num_slots == 2 and store.num_images == 30 and store.num_classes == 3 and store.res == 32
    assert store.index.paths == [str(p) for p in group["index/paths"][...]]
    assert np.array_equal(store.index.sizes, group["index/sizes"][...])
    crops = store.crops(3)  # epoch 3 reads slot 1
    assert np.array_equal(crops.boxes, group["boxes"][1]) and np.array_equal(crops.flips, group["flips"][1])
    assert crops.mix_partner is None
    values, classes = store.topk(3, [4, 0])
    assert torch.equal(values, torch.from_numpy(group["probs"][1, [4, 0]]))
    dense = store.targets(3, [4, 0])
    assert dense.dtype == torch.float32 and dense.shape == (2, 3)
    assert torch.allclose(dense.sum(1), torch.ones(2), atol=1e-3)
    assert torch.equal(dense.argmax(1), classes[:, 0])
    with pytest.warns(DeprecationWarning, match="is LabelStore.topk"):  # the alias the store's early users call
        alias = store.targets(3, [4, 0], dense=False)
    assert torch.equal(alias[0], values) and torch.equal(alias[1], classes)
    with pytest.raises(mealv2.StoreError, match="no label store"):
        mealv2.open_store(str(reference_store.parent / "absent.zarr"))


def test_open_store_only_reads_and_targets_come_in_one_form(reference_store):
    """The store open_store gives has no writing method (stage one writes through StoreWriter) and opens no other
    way; targets gives a dense float32 (B, C) tensor and nothing else, topk the stored pair."""
    store = mealv2.open_store(str(reference_store))
    writing = ("create_or_extend", "pending_units", "write_unit", "add_skipped", "add_provenance", "finalize")
    assert [name for name in writing if hasattr(store, name)] == []
    with pytest.raises(ValueError, match=r"mode 'r\+': a LabelStore only reads"):
        mealv2.LabelStore.open(str(reference_store), "r+")
    dense = store.targets(1, np.array([2, 7]))
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.float32 and dense.shape == (2, 3)
    values, classes = store.topk(1, np.array([2, 7]))
    assert values.dtype == torch.float16 and classes.dtype == torch.int64 and values.shape == classes.shape == (2, 2)
    assert torch.equal(dense, expand(values, classes, store.num_classes, store.residual))


@pytest.mark.parametrize("store_name", ["reference_store", "cutmix_store"])
def test_replay_dataset_through_worker_processes_keeps_the_crop_contract(store_name, small_root, request):
    store = mealv2.open_store(str(request.getfixturevalue(store_name)))
    dataset = mealv2.ReplayDataset(small_root, store)
    assert len(dataset) == 30
    loader = DataLoader(dataset, batch_size=8, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)  # reaches the persistent workers: the epoch is in shared memory
        for images, targets, rows in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert_contract(small_root, store, epoch, images, targets, rows)
            seen.append((epoch, rows.tolist()))
    assert sorted(r for e, rows in seen if e == 1 for r in rows) == list(range(30))
    if store.mix.enabled:
        assert (store.crops(0).mix_partner >= 0).any()  # the composites were exercised


def test_replay_dataset_splits_with_distributed_sampler(reference_store, small_root):
    dataset = mealv2.ReplayDataset(small_root, str(reference_store))
    shares = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        shares.append([int(r) for _, _, rows in DataLoader(dataset, batch_size=4, sampler=sampler) for r in rows])
    assert len(shares[0]) == len(shares[1]) == 15 and sorted(shares[0] + shares[1]) == list(range(30))


def test_replay_dataset_refuses_another_dataset(reference_store, mixed_root):
    with pytest.raises(mealv2.StoreError, match="another dataset"):
        mealv2.ReplayDataset(mixed_root, str(reference_store))


@pytest.mark.parametrize("store_name", ["reference_store", "cutmix_store"])
def test_store_loader_hands_a_loop_batches_with_their_targets(store_name, small_root, request):
    store = mealv2.open_store(str(request.getfixturevalue(store_name)))
    loader = mealv2.StoreLoader(small_root, store, batch_size=8, device="cpu", decoder="torch", workers=1)
    rows_seen = []
    for images, targets, rows in loader.epoch(1, progress=False):
        assert_contract(small_root, store, 1, images, targets, rows)
        rows_seen += rows.tolist()
    assert sorted(rows_seen) == list(range(30))


def test_one_namespace_a_users_own_packages_shadow_nothing(reference_store, small_root, tmp_path):
    """Run from a folder holding its own pipeline/, softlabels/ and distill/: mealv2 imports only its own."""
    for name in SHADOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    script = tmp_path / "read_store.py"
    script.write_text(textwrap.dedent(f"""
        import mealv2
        from torch.utils.data import DataLoader
        if __name__ == "__main__":
            dataset = mealv2.ReplayDataset({str(small_root)!r}, mealv2.open_store({str(reference_store)!r}))
            for epoch in range(2):
                dataset.set_epoch(epoch)
                print(sum(len(rows) for _, _, rows in DataLoader(dataset, batch_size=8, num_workers=2)))
    """))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["30", "30"]
    cli = subprocess.run([str(Path(sys.executable).parent / "mealv2"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "cache-teachers" in cli.stdout, cli.stderr


def test_the_distribution_installs_only_the_mealv2_name(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print([n for n in ('pipeline', 'softlabels', 'distill') if u.find_spec(n)])"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def _run_script(folder: Path, body: str, timeout: float = 300) -> subprocess.CompletedProcess:
    script = folder / "train_at_import.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=timeout)


def test_a_dali_loader_built_at_import_time_is_one_clear_error(reference_store, small_root, tmp_path):
    """DALI spawns its workers, which import the main script again: unguarded, it would run (and train) twice."""
    build = (f"import mealv2\n"
             f"loader = mealv2.StoreLoader({str(small_root)!r}, {str(reference_store)!r}, 8, 'cpu', decoder='dali')\n"
             f"print('batches', len(list(loader.epoch(0, progress=False))))\n")
    trapped = _run_script(tmp_path, build)
    assert trapped.returncode == 1 and "batches" not in trapped.stdout
    assert trapped.stderr.count("SpawnTrap:") == 1  # raised once, in the script itself, before any worker
    assert 'train_at_import.py:2: builds a DALI loader at import time' in trapped.stderr
    assert 'put that code under `if __name__ == "__main__":`' in trapped.stderr
    guarded = _run_script(tmp_path, "import mealv2\nif __name__ == \"__main__\":\n" + textwrap.indent(
        build.split("\n", 1)[1], "    "))
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.split() == ["batches", "4"] and "RuntimeWarning" not in guarded.stderr


def test_dataloader_workers_after_a_dali_loader_was_closed_or_dropped(reference_store, small_root, tmp_path):
    """A DALI StoreLoader, closed by ``with`` or merely dropped, then the documented ReplayDataset in forked
    DataLoader workers whose garbage collector runs: DALI's pipelines are never destroyed in a forked child (their
    threads are not there: it hung or aborted), and ``with`` shuts them down before the workers fork."""
    script = textwrap.dedent(f"""
        import gc
        import mealv2
        from torch.utils.data import DataLoader

        def replay_dataset_epochs(store):
            dataset = mealv2.ReplayDataset({str(small_root)!r}, store)
            loader = DataLoader(dataset, batch_size=8, num_workers=2, worker_init_fn=lambda _: gc.collect())
            return sum(len(rows) for _, _, rows in loader)

        if __name__ == "__main__":
            store = mealv2.open_store({str(reference_store)!r})
            with mealv2.StoreLoader({str(small_root)!r}, store, 8, "cpu", decoder="dali", workers=1) as loader:
                list(loader.epoch(0, progress=False))
            print("closed", replay_dataset_epochs(store), flush=True)
            loader = mealv2.StoreLoader({str(small_root)!r}, store, 8, "cpu", decoder="dali", workers=1)
            list(loader.epoch(0, progress=False))
            del loader
            print("dropped", replay_dataset_epochs(store), flush=True)
    """)
    result = _run_script(tmp_path, script, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["closed", "30", "dropped", "30"]


def _python_blocks(doc: Path) -> list[str]:
    text = doc.read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.parametrize("doc", ["store-format.md", "api.md"])
def test_the_docs_snippets_run(doc, reference_store, small_root, tmp_path, monkeypatch):
    """Each page's python blocks run in order, in a folder where labels.zarr and data/ are a real store and its data."""
    import torch as torch_module

    (tmp_path / "labels.zarr").symlink_to(reference_store)
    (tmp_path / "data").symlink_to(small_root)
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(Path(__file__).parents[1] / "docs" / doc)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, doc, "exec"), namespace)  # noqa: S102 - the documentation's own code
    if doc == "store-format.md":  # the numpy reader agrees with the store's own rule
        store = mealv2.open_store(str(reference_store))
        expected = store.targets(0, np.flatnonzero(namespace["labelled"]))
        assert np.allclose(namespace["dense"], expected.numpy(), atol=1e-6)
    else:
        assert namespace["images"].dtype == torch_module.uint8 and namespace["targets"].shape[1] == 3


def test_the_own_loop_example_trains(reference_store, small_root):
    example = Path(__file__).parents[1] / "docs" / "examples" / "own_loop.py"
    run = subprocess.run([sys.executable, str(example), "--data", str(small_root), "--store", str(reference_store),
                          "--model", "test_efficientnet", "--epochs", "2", "--batch-size", "8", "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    losses = [float(line.rsplit(" ", 1)[1]) for line in run.stdout.splitlines() if "soft cross-entropy" in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(example.read_text().splitlines()) <= 50
