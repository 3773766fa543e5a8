"""Memory that does not grow with the number of workers: DataLoader workers of `ReplayDataset` read one slot the
dataset's process holds in shared memory, and DALI's spawned workers map the index's paths instead of receiving it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mealv2.pipeline.crops import sample_crops
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.epoch_plan import PlanSource, write_plan

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
