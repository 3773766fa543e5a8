"""Memory that does not grow with the number of workers: DataLoader workers of `ReplayDataset` read one slot the
dataset's process holds in shared memory and keep the garbage collector off what they inherited, its top-k form is
the store's, and DALI's spawned workers map the index's paths instead of receiving the index."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

import mealv2
from bench.measures import random_store
from mealv2.pipeline.crops import sample_crops
from mealv2.pipeline.dataset import DatasetIndex, load_index
from mealv2.pipeline.epoch_plan import PlanSource, write_plan
from mealv2.softlabels.topk import expand

CLASSES, PER_CLASS, TOPK = 2048, 4, 2000  # 8,192 rows of 8,017 bytes: a 66 MB slot


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, Path]:
    """(ROOT, store): a 4×4 PNG hard-linked 8,192 times under long names, and a 2-slot store of top-2000 rows
    written by the store's own writer (bench's random_store)."""
    folder = tmp_path_factory.mktemp("large")
    source = folder / "one.png"
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(source)
    for c in range(CLASSES):
        (folder / "train" / f"class_{c:04d}").mkdir(parents=True)
        for j in range(PER_CLASS):
            os.link(source, folder / "train" / f"class_{c:04d}" / f"{'long_name_' * 10}{j:03d}.png")
    index = load_index(folder / "train", workers=2)  # and cached: the dataset's own scan reads no header again
    random_store(folder / "labels.zarr", index, slots=2, topk=TOPK, res=16)
    return folder, folder / "labels.zarr"


def _private_bytes(pid: int) -> int:
    """Memory process ``pid`` alone holds (Private_Clean + Private_Dirty: its USS), in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty")) * 1024


def test_a_dataloader_worker_holds_no_slot_of_its_own(large):
    """Each worker read the whole seed slot itself (47 MB at ImageNet-1k, 525 MB at 21k, per worker, and 64× the
    label reads of one rank); now the dataset's process reads it once into shared memory and workers index it."""
    root, store = large
    dataset = mealv2.ReplayDataset(root, str(store), decoder="pil")  # PIL: the quicker with 4×4 pictures
    slot_bytes = len(dataset) * (TOPK * (2 + 2) + 4 * 4 + 1)  # float16 values, uint16 classes, a box, a flip
    before = torch.zeros(2, dtype=torch.int64).share_memory_()
    pids = torch.zeros(2, dtype=torch.int64).share_memory_()

    def start(worker: int) -> None:
        pids[worker], before[worker] = os.getpid(), _private_bytes(os.getpid())

    loader = DataLoader(dataset, batch_size=256, num_workers=2, persistent_workers=True, worker_init_fn=start)
    assert sum(len(rows) for _, _, rows in loader) == len(dataset) == CLASSES * PER_CLASS
    grown = [_private_bytes(int(pid)) - int(was) for pid, was in zip(pids, before)]
    assert max(grown) < slot_bytes / 2, (grown, slot_bytes)


def _collecting(batch):
    """The default collate after a full garbage collection in the worker, as any library's gc.collect() there."""
    gc.collect()
    return default_collate(batch)


def test_a_worker_leaves_the_objects_it_inherited_to_its_parent(reference_store, small_root):
    """A collection in a forked worker writes into every object it visits, so one full collection copied every page
    of the parent's objects into the worker: 104 MB a worker within one epoch of a 100k-image dataset (measured);
    the dataset freezes them at its first item."""
    inherited = [[] for _ in range(1_000_000)]  # a million tracked objects in the parent: 72 MB of them
    dataset = mealv2.ReplayDataset(small_root, str(reference_store))
    before = torch.zeros(1, dtype=torch.int64).share_memory_()
    pid = torch.zeros(1, dtype=torch.int64).share_memory_()

    def start(_: int) -> None:
        pid[0], before[0] = os.getpid(), _private_bytes(os.getpid())

    loader = DataLoader(dataset, batch_size=8, num_workers=1, persistent_workers=True, worker_init_fn=start,
                        collate_fn=_collecting)
    assert sum(len(rows) for _, _, rows in loader) == 30
    grown = _private_bytes(int(pid[0])) - int(before[0])
    assert grown < len(inherited) * sys.getsizeof([]) / 4, grown


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_serve_the_slot_the_dataset_read_and_follow_its_set_epoch(context, reference_store, small_root,
                                                                          tmp_path):
    """Workers, forked or spawned, never open the store: with it moved away they serve the slot the dataset read;
    the dataset refuses to read the next one until it is back, and persistent workers then serve that one."""
    store = Path(shutil.copytree(reference_store, tmp_path / "labels.zarr"))
    opened = mealv2.open_store(str(store))
    dataset = mealv2.ReplayDataset(small_root, opened)
    expected = opened.targets(0, np.arange(30))
    away = store.rename(tmp_path / "away.zarr")
    for persistent in (False, True):
        loader = DataLoader(dataset, batch_size=10, num_workers=1, multiprocessing_context=context,
                            persistent_workers=persistent)
        for _, targets, rows in loader:
            assert torch.equal(targets, expected[rows])
    with pytest.raises(mealv2.StoreError, match="was removed while this run read it"):
        dataset.set_epoch(1)
    away.rename(store)
    dataset.set_epoch(1)
    batches = [(targets, rows) for _, targets, rows in loader]  # the persistent workers of the last loader
    assert sorted(int(row) for _, rows in batches for row in rows) == list(range(30))
    for targets, rows in batches:
        assert torch.equal(targets, opened.targets(1, rows)) and not torch.equal(targets, expected[rows])


@pytest.mark.parametrize("store_name", ["reference_store", "cutmix_store"])
def test_topk_items_are_the_stored_topk_and_expand_to_the_dense_targets(store_name, small_root, request):
    store = mealv2.open_store(str(request.getfixturevalue(store_name)))
    dense = mealv2.ReplayDataset(small_root, store)
    topk = mealv2.ReplayDataset(small_root, store, targets="topk")
    for dataset in (dense, topk):
        dataset.set_epoch(1)
    pairs = zip(DataLoader(dense, batch_size=8, num_workers=1), DataLoader(topk, batch_size=8, num_workers=1))
    for (images, targets, rows), (topk_images, (values, classes), topk_rows) in pairs:
        stored_values, stored_classes = store.targets(1, rows, dense=False)
        assert torch.equal(rows, topk_rows) and torch.equal(images, topk_images)
        assert values.dtype == torch.float16 and classes.dtype == torch.int64 and values.shape == (len(rows), 2)
        assert torch.equal(values, stored_values) and torch.equal(classes, stored_classes)
        assert torch.equal(expand(values, classes, store.num_classes, store.residual), targets)
    with pytest.raises(ValueError, match=r"targets 'sparse': expected one of \('dense', 'topk'\)"):
        mealv2.ReplayDataset(small_root, store, targets="sparse")


def _fake_index(count: int) -> DatasetIndex:
    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i:08d}.JPEG" for i in range(count)]
    return DatasetIndex(root="/data/train", paths=names, labels=np.arange(count) % 1000,
                        sizes=np.ones((count, 2), np.int32), byte_sizes=np.ones(count, np.int64),
                        classes=[f"n{c:08d}" for c in range(1000)])


def test_a_dali_worker_receives_no_index_and_reads_the_right_files(mixed_root, tmp_path):
    """Each spawned DALI worker unpickled the whole index (72 MB at ImageNet-1k) and rebuilt it (about 800 MB a
    worker); now the paths are written into the plan folder once and a worker maps them."""
    sizes = []
    for count in (10, 100_000):
        folder = tmp_path / f"plans-{len(sizes)}"
        folder.mkdir()
        sizes.append(len(pickle.dumps(PlanSource(_fake_index(count), folder, 8))))
    assert sizes[1] == sizes[0] < 2048, sizes
    dali_types = pytest.importorskip("nvidia.dali.types", reason="DALI is not installable on this platform")
    index = DatasetIndex.scan(mixed_root / "train")
    boxes, flips = sample_crops(0, index.sizes)
    order = np.random.default_rng(0).permutation(len(index))
    write_plan(tmp_path, 0, order, boxes, flips)
    worker = pickle.loads(pickle.dumps(PlanSource(index, tmp_path, 5)))
    for iteration, start in enumerate(range(0, len(index), 5)):
        encoded, *_, positions = worker(dali_types.BatchInfo(iteration, 0))
        assert positions.tolist() == order[start:start + 5].tolist()
        assert [e.tobytes() for e in encoded] == [Path(index.file(int(i))).read_bytes() for i in positions]
