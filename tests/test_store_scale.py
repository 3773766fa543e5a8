"""What a store costs at ImageNet-21k size: creation memory that does not grow with the longest path times N, and
completeness answered by one listing instead of a read of every unit's cell."""

import shutil
import tracemalloc

import numpy as np
import zarr

from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.softlabels.schema import compressors, label_spec
from mealv2.softlabels.store import LabelStore
from mealv2.softlabels.store_files import RegularFileStore
from mealv2.softlabels.writer import StoreWriter


def synthetic_index(count: int, long_path: str) -> DatasetIndex:
    """``count`` images of two classes, the last under a path of ``long_path``'s length (no files behind them)."""
    paths = [f"a/{i:06d}.jpg" for i in range(count - 1)] + [f"b/{long_path}.jpg"]
    labels = np.asarray([0] * (count - 1) + [1], np.int32)
    return DatasetIndex(root="/nowhere", paths=paths, labels=labels, sizes=np.full((count, 2), 32, np.int32),
                        byte_sizes=np.full(count, 100, np.int64), classes=["a", "b"])


def test_creating_a_store_holds_no_fixed_width_array_of_every_path(tmp_path):
    """One 2,000-character path among 50,000: a fixed-width array of them all is 400 MB; the store's paths are
    written a chunk at a time as variable-width text, and read back as written, byte for byte as zarr's text."""
    index = synthetic_index(50_000, "x" * 1_990)
    spec = label_spec(index, [{"name": "t"}], 32, "bilinear", 2, "uniform", CropSpec().attrs())
    tracemalloc.start()
    try:
        StoreWriter.create_or_extend(str(tmp_path / "s.zarr"), spec, index, [0], chunk_rows=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"creation peaked at {peak / 1e6:.0f} MB"
    assert list(LabelStore.open(str(tmp_path / "s.zarr")).index.paths) == list(index.paths)
    reference = zarr.open_group(str(tmp_path / "reference.zarr"), mode="w")
    reference.create_array("p", shape=(len(index),), dtype=str, compressors=compressors())[...] = np.asarray(index.paths, dtype=str)
    assert ((tmp_path / "s.zarr/index/paths/c/0").read_bytes() == (tmp_path / "reference.zarr/p/c/0").read_bytes())


def test_completeness_is_one_listing_not_a_read_per_unit(reference_store, tmp_path, monkeypatch):
    """done() of a 2-slot × 4-chunk store reads none of its 8 cells; a unit whose cell is lost reads as not done."""
    store = tmp_path / "labels.zarr"
    shutil.copytree(reference_store, store)
    read = []
    real_get = RegularFileStore.get

    async def counting_get(self, key, *args, **kwargs):
        read.append(key)
        return await real_get(self, key, *args, **kwargs)
    monkeypatch.setattr(RegularFileStore, "get", counting_get)
    opened = LabelStore.open(str(store))
    read.clear()
    assert opened.done().all() and opened.done().shape == (2, 4)
    assert not [key for key in read if key.startswith("done/")]
    (store / "done/c/1/2").unlink()
    assert opened.done().tolist() == [[True] * 4, [True, True, False, True]]


def test_reading_a_store_allocates_what_its_files_hold_not_what_they_may_hold(reference_store):
    """Opening a store and reading its index: each file read allocated its limit (64 MiB a zarr.json, 4 KiB a path
    times the chunk's paths), which at ImageNet-21k is gigabytes for an index/paths chunk."""
    tracemalloc.start()
    try:
        opened = LabelStore.open(str(reference_store))
        assert len(opened.index.paths) == opened.num_images
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16e6, f"opening and reading the index peaked at {peak / 1e6:.0f} MB"
