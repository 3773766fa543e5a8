"""Stage one's handle on a label store: creation, seed slots added, units written, the store marked complete.

The writer protocol of docs/store-format.md: one coordinator creates every array and the
attributes; workers write whole (seed slot, chunk) units, each array in one assignment, then
set the unit's ``done`` cell, so concurrent writers never share a chunk and a rerun skips
finished units. Jobs sharing a store change its attributes and seed axis in turn (StoreSite).
Readers open stores with mealv2.softlabels.store.open_store, which has no writing method.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import warnings
from collections.abc import Iterator

import numpy as np
import zarr

from mealv2.pipeline.dataset import DatasetIndex
from mealv2.softlabels.integrity import unit_record
from mealv2.softlabels.schema import (CHUNK_ROWS, FORMAT, WRITTEN, StoreError, compressors, differences,
                                      index_arrays, slot_arrays)
from mealv2.softlabels.site import CREATE_WAIT_SECONDS, StoreSite
from mealv2.softlabels.store import LabelStore, SlotLabels, StoreLayout, open_group, reaching, zarr_store


def _tool_version() -> str:
    """The installed mealv2's version, recorded in each store it creates."""
    try:
        return importlib.metadata.version("mealv2")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class StoreWriter(StoreLayout):
    """A store opened for writing by a cache-teachers job (its coordinator or one of its workers)."""

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> StoreWriter:
        """Open an existing store read-write; its live metadata is read (consolidated copies go stale while units are
        written)."""
        return cls(url, open_group(url, writing=True, storage_options=storage_options), storage_options)

    @classmethod
    def create_or_extend(cls, url: str, spec: dict, index: DatasetIndex, seeds: list[int],
                         chunk_rows: int = CHUNK_ROWS, storage_options: dict | None = None,
                         wait_seconds: float = CREATE_WAIT_SECONDS) -> StoreWriter:
        """Coordinator: create the store, or check an existing one matches ``spec`` and add seed slots.

        A store is created only where nothing is (or in an empty folder): anything else at
        ``url`` is refused and left untouched. When several jobs start at once (--shard jobs
        from a scheduler), one claims the creation and the others wait for it, then extend.
        """
        zarr_store(url, False, storage_options)  # refuses read-only kinds (zip) before anything is looked at
        with reaching(url):
            StoreSite(url, storage_options).create_once(
                lambda: LabelStore.exists(url, storage_options),
                lambda: cls._create(url, spec, index, seeds, chunk_rows, storage_options), wait_seconds)
        store = cls.open(url, storage_options)  # made by this job or another: either way it must agree
        diffs = differences(store.attrs, spec)
        if diffs:
            raise StoreError(f"{url}: store was made for other labels: " + "; ".join(diffs))
        store._add_seeds(seeds)
        return store

    @classmethod
    def _create(cls, url: str, spec: dict, index: DatasetIndex, seeds: list[int], chunk_rows: int,
                storage_options: dict | None) -> StoreWriter:
        """Write a new store where this job holds the claim; the attributes come last (the ready mark).

        Arrays are written over: the claim proves the place was empty, or held a killed creation's files.
        """
        group = zarr.open_group(zarr_store(url, False, storage_options), mode="a", zarr_format=3)
        store = cls(url, group, storage_options)
        store._create_arrays(spec, index, len(seeds), chunk_rows)
        group.attrs["mealv2"] = {
            "format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": _tool_version(), **spec, "seeds": list(seeds), "complete": False,
            "skipped": list(index.skipped),
        }
        return store

    def _create_arrays(self, spec: dict, index: DatasetIndex, num_seeds: int, chunk_rows: int) -> None:
        """The schema's arrays (slot_arrays, index_arrays, the paths): every cell the fill value but the index's."""
        for name, shape, chunks, dtype in slot_arrays(spec, index, num_seeds, chunk_rows):
            self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors(),
                                    fill_value=0, overwrite=True)
        for name, values in index_arrays(index):
            self.group.create_array(name, shape=values.shape, dtype=values.dtype, compressors=compressors(),
                                    overwrite=True)[...] = values
        self._write_paths(index.paths)

    def _write_paths(self, paths) -> None:
        """``index/paths`` as zarr's variable-length text, a chunk at a time in numpy's variable-width strings: one
        fixed-width array of every path would take 4 bytes × the longest path × N (gigabytes at ImageNet-21k)."""
        array = self.group.create_array("index/paths", shape=(len(paths),), dtype=str, compressors=compressors(),
                                        overwrite=True)
        step = array.chunks[0]
        for start in range(0, len(paths), step):
            array[start:start + step] = np.array(paths[start:start + step], dtype=np.dtypes.StringDType())

    def _add_seeds(self, seeds: list[int]) -> None:
        """Grow the seed axis for seeds not stored yet; existing slots stay untouched."""
        with self._changing() as group:
            attrs = dict(group.attrs["mealv2"])
            stored = list(attrs["seeds"])
            if seeds[:len(stored)] != stored[:len(seeds)]:
                raise StoreError(f"{self.url}: holds seeds {stored}, this job asks for {seeds}")
            if len(seeds) <= len(stored):
                return
            for name in self.arrays + ("done",) + self.record:
                array = group[name]
                array.resize((len(seeds),) + array.shape[1:])
            group.attrs["mealv2"] = {**attrs, "seeds": list(seeds), "complete": False}

    @contextlib.contextmanager
    def _changing(self) -> Iterator[zarr.Group]:
        """The store's root as storage holds it now, for this job alone to change (attributes, the seed axis); the
        metadata is consolidated after, and this handle holds the result.

        Jobs sharing the store (--shard jobs, a teammate adding seed slots) take turns here (StoreSite.changing),
        each changing what the others wrote before it: once every job wrote back the attributes it had read at
        its start, and two --skip-bad jobs' store listed one of their two bad images, and a --seeds 3 job that
        ended last took a --seeds 4 job's slot away.
        """
        with StoreSite(self.url, self.storage_options).changing.holding(CREATE_WAIT_SECONDS,
                                                                         "changing the store's metadata"):
            group = zarr.open_group(self.group.store, mode="r+", use_consolidated=False)
            yield group
            self.group = group
            with warnings.catch_warnings():  # zarr notes consolidation is not in the v3 spec yet; we know
                warnings.simplefilter("ignore", UserWarning)
                zarr.consolidate_metadata(self.group.store)  # readers must not see old shapes or attributes

    def pending_units(self, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int]]:
        """(slot, chunk) units not done yet that belong to this shard (unit number % num_shards == shard)."""
        done = self.done()
        return [(slot, chunk) for slot in range(done.shape[0]) for chunk in range(done.shape[1])
                if (slot * done.shape[1] + chunk) % num_shards == shard and not done[slot, chunk]]

    def write_unit(self, slot: int, chunk: int, labels: SlotLabels) -> None:
        """Write one unit, each array in one assignment of whole chunks, record what was written, then mark it done.

        Every chunk is stored even when it holds only the fill value, so that an absent chunk is always a loss.
        """
        rows = self.rows(chunk)
        expected = rows.stop - rows.start
        if len(labels.probs) != expected:
            raise ValueError(f"unit ({slot}, {chunk}) holds {expected} rows, got {len(labels.probs)}")
        written = []
        for name in self.arrays:
            values = getattr(labels, name)
            if values is None:
                raise ValueError(f"unit ({slot}, {chunk}): a CutMix store needs {name} for every unit")
            array = self.group[name].with_config({"write_empty_chunks": True})
            written.append(np.asarray(values, dtype=array.dtype))
            array[slot, rows] = written[-1]
        if self.record:
            self.group[WRITTEN][slot, chunk] = unit_record(expected, written)
        self.group["done"][slot, chunk] = True

    def add_skipped(self, entries: list[str]) -> None:
        """List more images as holding no labels ("path: reason"); their rows stay zero. Sorted, so that jobs listing
        theirs in any order make the same store."""
        with self._changing() as group:
            attrs = dict(group.attrs["mealv2"])
            group.attrs["mealv2"] = {**attrs, "skipped": sorted(set(attrs.get("skipped", [])) | set(entries))}

    def add_provenance(self, record: dict) -> None:
        """Record how this job made its labels (decoder, device, precision, versions), once per kind."""
        with self._changing() as group:
            attrs = dict(group.attrs["mealv2"])
            made_with = list(attrs.get("made_with", []))
            if record not in made_with:
                group.attrs["mealv2"] = {**attrs, "made_with": made_with + [record]}

    def finalize(self) -> bool:
        """Mark complete once every unit is done (any job may: the last to finish does); returns completeness."""
        with self._changing() as group:
            complete = bool(group["done"][...].all())
            attrs = dict(group.attrs["mealv2"])
            if complete and not attrs["complete"]:
                group.attrs["mealv2"] = {**attrs, "complete": True}
        return complete
