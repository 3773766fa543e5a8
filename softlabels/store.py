"""LabelStore: the Zarr v3 soft-label store of docs/store-format.md — schema, writer protocol, reader, verify.

Work is cut into (seed slot, chunk) units. The coordinator creates every array and the
attributes; workers write whole units in one assignment each and then set the unit's
`done` cell, so concurrent writers never share a chunk and a rerun skips finished units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import importlib.metadata
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex, PackedStrings, load_index
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.files import temporary_file
from mealv2.pipeline.mix import MixSpec
from mealv2.softlabels.cache_config import CHUNK_ROWS
from mealv2.softlabels.integrity import WRITTEN, record_mismatches, unit_record, unsound_rows
from mealv2.softlabels.site import CREATE_WAIT_SECONDS, StoreSite
from mealv2.softlabels.store_files import RegularFileStore
from mealv2.softlabels.topk import class_dtype, expand

FORMAT = 1
LABEL_ARRAYS = ("probs", "classes", "boxes", "flips")
MIX_ARRAYS = ("mix_partner", "mix_boxes")  # CutMix stores only (docs/store-format.md)
INDEX_ARRAYS = ("index/paths", "index/sizes", "index/labels")
# attributes that fix what the labels mean: a store is only extended by a job that agrees on all
IDENTITY_KEYS = ("res", "interpolation", "topk", "residual", "crop", "mix")


class StoreError(ValueError):
    """A store that cannot serve the request: the message names it and what differs."""


class StoreUnreachable(StoreError):
    """A store that could not be reached at all: an endpoint down, no credentials, no such bucket."""


# where the errors of reaching a remote store come from (fsspec's backends and their HTTP stacks)
_REMOTE_LIBRARIES = {"aiobotocore", "aiohttp", "adlfs", "azure", "botocore", "fsspec", "gcsfs", "google", "requests",
                     "s3fs", "urllib3"}


@contextlib.contextmanager
def reaching(url: str):
    """Turn a failure to reach ``url`` (an OSError, or any error of fsspec's backends) into one StoreUnreachable line
    naming the URL and what to check; ``mealv2 --debug`` shows the library's own error behind it."""
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except Exception as err:
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in _REMOTE_LIBRARIES:
            raise
        raise StoreUnreachable(f"{url}: cannot reach the store ({first_line(err, 300)}); check the URL, the "
                               "--storage-option values (endpoint_url, credentials) and the network") from err


def _compressors():
    """blosc-zstd, then a crc32c checksum so `labels verify` finds damaged chunks."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def _zarr_store(url: str, read_only: bool, storage_options: dict | None):
    """A zarr store for a path or any fsspec URL (s3://, gs://, zip::..., file://); zip archives only read."""
    if not read_only and url.startswith("zip:"):
        raise StoreError(f"{url}: a zip archive is read-only; write to a folder or bucket, then `labels pack` it")
    if "://" in url or "::" in url:
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return RegularFileStore(url, read_only=read_only)  # a FIFO or a link to a device among its files is named


def _tool_version() -> str:
    """The installed mealv2's version, recorded in each store it creates."""
    try:
        return importlib.metadata.version("mealv2")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _place_without_replacing(tmp: str, out: str) -> None:
    """Give ``tmp`` the name ``out`` unless ``out`` exists (a hard link fails then; a rename would replace it)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise StoreError(f"{out}: appeared while packing; nothing was changed: pack into a new file") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(out):  # a filesystem without hard links: check, then rename
            raise StoreError(f"{out}: appeared while packing; nothing was changed") from None
        os.rename(tmp, out)


def teacher_identity(records: list[dict]) -> list[tuple]:
    """(name, sha256 or pretrained tag) per teacher: what makes two ensembles the same."""
    return [(t["name"], t.get("checkpoint_sha256") or t.get("pretrained")) for t in records]


def _fingerprint_mode(dataset: dict) -> str:
    """The --fingerprint mode of a store's ``dataset`` attribute (stores made before content mode name none: size)."""
    return dataset.get("fingerprint_mode", "size")


def _differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable list of what makes two label specs disagree."""
    diffs = []
    modes = [_fingerprint_mode(spec["dataset"]) for spec in (stored, wanted)]
    if modes[0] != modes[1]:
        diffs.append(f"--fingerprint {modes[0]} vs {modes[1]}")
    elif stored["dataset"]["fingerprint"] != wanted["dataset"]["fingerprint"]:
        diffs.append(f"dataset fingerprint {stored['dataset']['fingerprint'][:12]}… vs "
                     f"{wanted['dataset']['fingerprint'][:12]}…")
    for key in IDENTITY_KEYS:
        if stored.get(key) != wanted.get(key):
            diffs.append(f"{key} {stored.get(key)} vs {wanted.get(key)}")
    if teacher_identity(stored["teachers"]) != teacher_identity(wanted["teachers"]):
        diffs.append(f"teachers {teacher_identity(stored['teachers'])} vs {teacher_identity(wanted['teachers'])}")
    return diffs


def label_spec(index: DatasetIndex, teachers: list[dict], res: int, interpolation: str, topk: int, residual: str,
               crop: dict, mix: dict | None = None, fingerprint: str = "size") -> dict:
    """The attributes (less seeds, dates and completeness) that define a store's labels.

    ``mix`` (MixSpec.attrs) only for a CutMix store: a store without it mixes nothing, as before mixing existed.
    ``fingerprint`` "content" also hashes every image's bytes (DatasetIndex.fingerprint_of), and is recorded.
    """
    dataset = {"fingerprint": index.fingerprint_of(fingerprint), "num_images": len(index),
               "num_classes": index.num_classes, "classes": list(index.classes)}
    spec = {
        "dataset": dataset | ({"fingerprint_mode": fingerprint} if fingerprint != "size" else {}),
        "teachers": teachers, "res": res, "interpolation": interpolation, "topk": topk,
        "residual": residual, "crop": crop,
    }
    return spec | ({"mix": mix} if mix else {})


class _Attribute:
    """A read-only store attribute (under the group's "mealv2" key), converted on the way out."""

    def __init__(self, key: str, convert=lambda value: value):
        self.key, self.convert = key, convert

    def __get__(self, store: LabelStore | None, owner=None):
        return self if store is None else self.convert(store.attrs[self.key])


@dataclasses.dataclass
class SlotLabels:
    """One seed slot's rows, whole, in memory: what stage two indexes by sample."""

    probs: np.ndarray    # (N, k) float16
    classes: np.ndarray  # (N, k) uint16 or int32
    boxes: np.ndarray    # (N, 4) int32
    flips: np.ndarray    # (N,) bool
    mix_partner: np.ndarray | None = None  # CutMix stores: (N,) int32, -1 where not mixed
    mix_boxes: np.ndarray | None = None    # CutMix stores: (N, 4) int32 at the store's res

    def labelled(self) -> np.ndarray:
        """(N,) bool: the rows that hold labels; an image left out (cache-teachers --skip-bad) has a row of zeros.

        The one test of "this row has no labels" that every reader uses.
        """
        return self.probs[:, 0] > 0

    def take(self, rows: slice) -> SlotLabels:
        """The labels of ``rows`` only."""
        return SlotLabels(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                             for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class SlotCrops:
    """What one seed slot replays: per image its box and flip, and in a CutMix store its partner and pasted box."""

    boxes: np.ndarray    # (N, 4) int32 (top, left, height, width) in upright source pixels
    flips: np.ndarray    # (N,) bool: flip horizontally after the crop
    mix_partner: np.ndarray | None = None  # CutMix stores: (N,) int32, -1 where not mixed
    mix_boxes: np.ndarray | None = None    # CutMix stores: (N, 4) int32 (top, left, height, width) at ``res``


@dataclasses.dataclass(frozen=True)
class StoreIndex:
    """The images a store's rows belong to, in row order."""

    paths: Sequence[str]  # relative to the split folder, e.g. "n01440764/x.JPEG" (PackedStrings)
    sizes: np.ndarray    # (N, 2) int32 (height, width) after EXIF orientation
    labels: np.ndarray   # (N,) int32 ground-truth class (distillation never reads it)


class LabelStore:
    """A label store opened by path or fsspec URL; read-only unless opened for writing."""

    def __init__(self, url: str, group: zarr.Group, writable: bool, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.writable = writable
        self.storage_options = dict(storage_options or {})
        self._held: tuple[int, SlotLabels] | None = None  # the slot crops()/targets() read last
        self._opened_as: dict | None = None  # the identity its slots are read under (its own, unless reopened)

    def __reduce__(self):
        """Pickled as its address and identity: unpickled (in a worker process) it is opened again and still read
        under the identity of the store first opened, so a store rebuilt meanwhile is refused, not read."""
        return _reopened, (self.url, self.storage_options, self.opened_as)

    def reopened(self) -> LabelStore:
        """This store opened again (a forked worker's own handle), its slots read under this handle's identity."""
        return _reopened(self.url, self.storage_options, self.opened_as)

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> LabelStore:
        """Open an existing store: mode "r" (readers) or "r+" (workers writing units)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode {mode!r}: expected 'r' or 'r+'")
        try:
            with reaching(url):  # writers read the live metadata: consolidated copies go stale while units are written
                group = zarr.open_group(_zarr_store(url, mode == "r", storage_options), mode=mode,
                                        use_consolidated=None if mode == "r" else False)
        except FileNotFoundError:
            raise StoreError(f"{url}: no label store there") from None
        except StoreError:
            raise
        except ValueError as err:  # a torn or edited zarr.json
            raise StoreError(f"{url}: its metadata (zarr.json) cannot be read ({first_line(err)}); "
                             "restore the store from a copy") from None
        attrs = group.attrs.get("mealv2")
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise StoreError(f"{url}: not a mealv2 label store of format {FORMAT}")
        slots = group["done"].shape[0]  # a job adding slots grows the arrays before it lists their seeds
        if len(attrs.get("seeds", ())) > slots:
            raise StoreError(f"{url}: its attributes list {len(attrs['seeds'])} seed slot(s), its arrays hold {slots}; "
                             "the store's metadata is damaged: restore zarr.json from a copy of the store")
        return cls(url, group, writable=mode == "r+", storage_options=storage_options)

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        try:
            cls.open(url, "r", storage_options)
        except StoreUnreachable:
            raise
        except StoreError:
            return False
        return True

    @classmethod
    def create_or_extend(cls, url: str, spec: dict, index: DatasetIndex, seeds: list[int],
                         chunk_rows: int = CHUNK_ROWS, storage_options: dict | None = None,
                         wait_seconds: float = CREATE_WAIT_SECONDS) -> LabelStore:
        """Coordinator: create the store, or check an existing one matches ``spec`` and add seed slots.

        A store is created only where nothing is (or in an empty folder): anything else at
        ``url`` is refused and left untouched. When several jobs start at once (--shard jobs
        from a scheduler), one claims the creation and the others wait for it, then extend.
        """
        _zarr_store(url, False, storage_options)  # refuses read-only kinds (zip) before anything is looked at
        with reaching(url):
            StoreSite(url, storage_options).create_once(
                lambda: cls.exists(url, storage_options),
                lambda: cls._create(url, spec, index, seeds, chunk_rows, storage_options), wait_seconds)
        store = cls.open(url, "r+", storage_options)  # made by this job or another: either way it must agree
        diffs = _differences(store.attrs, spec)
        if diffs:
            raise StoreError(f"{url}: store was made for other labels: " + "; ".join(diffs))
        store._add_seeds(seeds)
        return store

    @classmethod
    def _create(cls, url: str, spec: dict, index: DatasetIndex, seeds: list[int], chunk_rows: int,
                storage_options: dict | None) -> LabelStore:
        """Write a new store where this job holds the claim; the attributes come last (the ready mark).

        Arrays are written over: the claim proves the place was empty, or held a killed creation's files.
        """
        group = zarr.open_group(_zarr_store(url, False, storage_options), mode="a", zarr_format=3)
        store = cls(url, group, writable=True, storage_options=storage_options)
        store._create_arrays(spec, index, len(seeds), chunk_rows, mixes=bool(spec.get("mix")))
        group.attrs["mealv2"] = {
            "format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": _tool_version(), **spec, "seeds": list(seeds), "complete": False,
            "skipped": list(index.skipped),
        }
        return store

    def _create_arrays(self, spec: dict, index: DatasetIndex, num_seeds: int, chunk_rows: int, mixes: bool) -> None:
        n, k, num_classes = len(index), spec["topk"], index.num_classes
        rows = min(chunk_rows, max(n, 1))
        units = -(-n // rows)
        arrays = [
            ("probs", (num_seeds, n, k), (1, rows, k), "float16"),
            ("classes", (num_seeds, n, k), (1, rows, k), class_dtype(num_classes)),
            ("boxes", (num_seeds, n, 4), (1, rows, 4), "int32"),
            ("flips", (num_seeds, n), (1, rows), "bool"),
            ("done", (num_seeds, units), (1, 1), "bool"),
        ]
        if mixes:
            arrays += [("mix_partner", (num_seeds, n), (1, rows), "int32"),
                       ("mix_boxes", (num_seeds, n, 4), (1, rows, 4), "int32")]
        columns = 1 + len(LABEL_ARRAYS) + (len(MIX_ARRAYS) if mixes else 0)
        arrays.append((WRITTEN, (num_seeds, units, columns), (1, 1, columns), "uint64"))
        for name, shape, chunks, dtype in arrays:
            self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=_compressors(),
                                    fill_value=0, overwrite=True)
        for name, values in [("index/paths", np.asarray(index.paths, dtype=str)),
                             ("index/sizes", index.sizes.astype(np.int32)),
                             ("index/labels", index.labels.astype(np.int32))]:
            array = self.group.create_array(name, shape=values.shape, dtype=values.dtype if name != "index/paths"
                                            else str, compressors=_compressors(), overwrite=True)
            array[...] = values

    def _add_seeds(self, seeds: list[int]) -> None:
        """Grow the seed axis for seeds not stored yet; existing slots stay untouched."""
        with self._changing() as group:
            attrs = dict(group.attrs["mealv2"])
            stored = list(attrs["seeds"])
            if seeds[:len(stored)] != stored[:len(seeds)]:
                raise StoreError(f"{self.url}: holds seeds {stored}, this job asks for {seeds}")
            if len(seeds) <= len(stored):
                return
            for name in self.arrays + ("done",) + self._record:
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
        if not self.writable:
            raise StoreError(f"{self.url}: opened read-only")
        with StoreSite(self.url, self.storage_options).changing.holding(CREATE_WAIT_SECONDS,
                                                                         "changing the store's metadata"):
            group = zarr.open_group(self.group.store, mode="r+", use_consolidated=False)
            yield group
            self.group = group
            self._consolidate()  # readers must not see old shapes or attributes

    # -- shape of the work -----------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs["mealv2"])

    seeds = _Attribute("seeds", list)  # the crop seed of each slot
    res = _Attribute("res", int)
    interpolation = _Attribute("interpolation")
    topk = _Attribute("topk", int)
    residual = _Attribute("residual")
    marked_complete = _Attribute("complete", bool)  # set by finalize once every unit was written

    @property
    def crop(self) -> CropSpec:
        """The RandomResizedCrop ranges its boxes were drawn with."""
        return CropSpec.from_attrs(self.attrs["crop"])

    @property
    def mix(self) -> MixSpec:
        """The CutMix its labels were computed on (disabled for a store without mixes)."""
        return MixSpec.from_attrs(self.attrs.get("mix"))

    @property
    def arrays(self) -> tuple[str, ...]:
        """The per-slot arrays it holds: the labels, and the mixes in a CutMix store."""
        return LABEL_ARRAYS + (MIX_ARRAYS if self.mix.enabled else ())

    @property
    def fingerprint(self) -> str:
        """The dataset fingerprint of its rows, in the store's --fingerprint mode (DatasetIndex.fingerprint_of)."""
        return self.attrs["dataset"]["fingerprint"]

    def matching_index(self, split_dir: str | os.PathLike, skip_bad: bool = False, world=None) -> DatasetIndex:
        """The index of ``split_dir`` (load_index: one scan per job) if its images are the ones the rows are for.

        The one test of a dataset's identity: the fingerprint in the store's mode, then the upright sizes, which
        the scan reads anyway and which change when a picture is replaced at equal byte size; StoreError if not.
        Files the store left out (``skipped``) are left out of the scan too.
        """
        index = load_index(split_dir, skip_bad=skip_bad or bool(self.skipped), world=world)
        if index.fingerprint_of(_fingerprint_mode(self.attrs["dataset"])) != self.fingerprint:
            raise StoreError(f"{self.url}: labels are for another dataset than {split_dir} (fingerprint differs); "
                             "point at the split the store was cached from")
        changed = np.flatnonzero((self.group["index/sizes"][...] != index.sizes).any(axis=1))
        if len(changed):
            raise StoreError(f"{self.url}: {len(changed)} image(s) of {split_dir} changed since their labels were "
                             f"made (other height × width): {', '.join(index.paths[i] for i in changed[:3])}; their "
                             "labels are for the pictures cached: restore those, or cache the split into a new --store")
        return index

    @property
    def skipped(self) -> list[str]:
        """"path: reason" of the images it holds no labels for."""
        return list(self.attrs.get("skipped", []))

    @property
    def teachers(self) -> list[dict]:
        return list(self.attrs["teachers"])

    @property
    def is_complete(self) -> bool:
        return self.marked_complete and bool(self.done().all())

    def identity(self) -> dict:
        """What tells this store from another at the same or another URL: creation, data, teachers, labels."""
        attrs = self.attrs
        return {"created": attrs["created"], "fingerprint": self.fingerprint,
                "teachers": [list(t) for t in teacher_identity(self.teachers)],
                **{key: attrs[key] for key in IDENTITY_KEYS if key in attrs}}

    @property
    def opened_as(self) -> dict:
        """The identity of the store this handle was opened on (the first handle's, for one reopened)."""
        if self._opened_as is None:
            self._opened_as = self.identity()
        return self._opened_as

    def _check_unchanged(self, slot: int) -> None:
        """Refuse to read on from a store rebuilt or removed at its URL since it was opened: its rows would be another
        store's labels. Cheap: the identity is in the root's attributes, one small file."""
        try:
            now = LabelStore.open(self.url, "r", self.storage_options).identity()
        except StoreUnreachable:
            raise
        except StoreError as err:
            raise StoreError(f"{self.url}: was removed while this run read it ({first_line(err)}); nothing was read "
                             f"for seed slot {slot}: put the store back, then --resume") from None
        then = self.opened_as
        differing = [key for key in {**then, **now} if then.get(key) != now.get(key)]
        if differing:
            raise StoreError(f"{self.url}: was replaced while this run read it ({', '.join(differing)} differ); "
                             f"nothing was read for seed slot {slot}: write a rebuilt store to a new --store path, "
                             "and put this one back to --resume the run")

    def complete_slots(self) -> int:
        """How many leading seed slots are written whole: a store being extended serves those already."""
        done = self.done().all(axis=1)
        return int(done.size if done.all() else done.argmin())

    @property
    def num_images(self) -> int:
        return self.group["probs"].shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.attrs["dataset"]["num_classes"])

    @property
    def chunk_rows(self) -> int:
        return self.group["probs"].chunks[1]

    @property
    def num_chunks(self) -> int:
        return self.group["done"].shape[1]

    def rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_images))

    def done(self) -> np.ndarray:
        """(seed slots, chunks) bool: which units are written."""
        return self.group["done"][...]

    def pending_units(self, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int]]:
        """(slot, chunk) units not done yet that belong to this shard (unit number % num_shards == shard)."""
        done = self.done()
        return [(slot, chunk) for slot in range(done.shape[0]) for chunk in range(done.shape[1])
                if (slot * done.shape[1] + chunk) % num_shards == shard and not done[slot, chunk]]

    # -- writing and reading ---------------------------------------------------------------

    @property
    def _record(self) -> tuple[str, ...]:
        """The written-units record array, where the store has one (stores made before it existed have not)."""
        return (WRITTEN,) if WRITTEN in self.group else ()

    def write_unit(self, slot: int, chunk: int, labels: SlotLabels) -> None:
        """Write one unit, each array in one assignment of whole chunks, record what was written, then mark it done.

        Every chunk is stored even when it holds only the fill value, so that an absent chunk is always a loss.
        """
        if not self.writable:
            raise StoreError(f"{self.url}: opened read-only")
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
        if self._record:
            self.group[WRITTEN][slot, chunk] = unit_record(expected, written)
        self.group["done"][slot, chunk] = True

    def read_slot(self, slot: int, checked: bool = True) -> SlotLabels:
        """Seed slot ``slot``'s rows whole (stage two reads one per epoch; never random rows per batch).

        Refuses a store replaced at its URL since this handle was opened (StoreError naming what differs).
        ``checked``: refuse rows that differ from what their writers recorded, and empty rows of images
        not listed as skipped (StoreError naming the first problem).
        """
        self._check_unchanged(slot)
        values = {}
        for name in self.arrays:
            try:
                values[name] = self.group[name][slot]
            except (ValueError, RuntimeError, OSError) as err:  # a checksum that fails, a torn chunk
                raise StoreError(f"{self.url}: {name} of slot {slot} cannot be read ({first_line(err)}); "
                                 f"`mealv2 labels verify {self.url}` names the damaged chunk") from None
        self._check_unchanged(slot)  # and not while its chunks were read
        labels = SlotLabels(**values)
        if checked:
            problems = self.slot_problems(slot, labels)
            if problems:
                raise StoreError(f"{self.url}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                 if len(problems) > 1 else "") + f"; refused before training on it: run "
                                 f"`mealv2 labels verify {self.url}` for the whole list")
        return labels

    def slot_problems(self, slot: int, labels: SlotLabels, first_chunk: int = 0) -> list[str]:
        """One line per unit whose rows differ from the record, and for empty rows not listed as skipped.

        ``labels``: the rows of slot ``slot`` from chunk ``first_chunk`` on (a whole slot, or one unit).
        """
        problems, offset = [], self.rows(first_chunk).start
        chunks = range(first_chunk, self.num_chunks if offset + len(labels.probs) >= self.num_images
                       else first_chunk + len(labels.probs) // self.chunk_rows)
        for chunk in chunks if self._record else ():
            rows = self.rows(chunk)
            unit = labels.take(slice(rows.start - offset, rows.stop - offset))
            problems += [f"slot {slot} chunk {chunk} (rows {rows.start}-{rows.stop - 1}): {what}" for what in
                         record_mismatches(self.arrays, self.group[WRITTEN][slot, chunk], rows.stop - rows.start,
                                           [getattr(unit, name) for name in self.arrays])]
        empty = offset + np.flatnonzero(~labels.labelled())
        unsound = offset + np.flatnonzero(unsound_rows(labels.probs))
        unlisted = np.setdiff1d(np.setdiff1d(empty, unsound), self.skipped_rows()) if len(empty) else empty
        paths = self.index.paths
        if len(unlisted):
            problems.append(f"slot {slot}: {len(unlisted)} row(s) hold no labels but their images are not listed "
                            f"as skipped ({', '.join(str(paths[i]) for i in unlisted[:3])})")
        if len(unsound):  # what a teacher whose logits overflowed left, written before stage one refused it
            problems.append(f"slot {slot}: {len(unsound)} row(s) hold probabilities that are not finite or "
                            f"outside 0-1 ({', '.join(str(paths[i]) for i in unsound[:3])})")
        return problems

    def missing_chunks(self, slots: int | None = None) -> list[str]:
        """One line per chunk of the first ``slots`` slots (default all) that storage does not hold; reads no chunk.

        A store made before the written-units record may lack chunks that held only zeros: only its
        probs and boxes, never all zero, are looked for there.
        """
        slots = len(self.seeds) if slots is None else slots
        names = self.arrays + self._record if self._record else ("probs", "boxes")
        missing = []
        for name in names:
            array = self.group[name]
            prefix = array.store_path.path

            async def listing():
                return {key async for key in array.store_path.store.list_prefix(prefix)}
            held = sync(listing())
            for coords in np.ndindex(*array.cdata_shape):
                if coords[0] < slots and f"{prefix}/{array.metadata.encode_chunk_key(coords)}" not in held:
                    missing.append(f"{name} chunk {'.'.join(map(str, coords))} is missing")
        return missing

    def check_slots(self, slots: int) -> None:
        """Refuse, before any training, a run whose first ``slots`` slots lack a chunk (one listing per array)."""
        missing = self.missing_chunks(slots)
        if missing:
            raise StoreError(f"{self.url}: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                             else "") + "; nothing was trained: restore the missing files from a copy of the "
                             "store, or rebuild it with cache-teachers into a new --store")

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

    def pack(self, out: str | os.PathLike) -> int:
        """Copy a complete store into one zip (entries stored: chunks are compressed already); returns bytes.

        Readers open the result as ``zip::OUT.zip``; the zip is written to a temporary name
        and linked into place, so a failed pack leaves nothing behind and an existing OUT is
        never replaced. A symbolic link inside a local store is refused: packing would copy
        what it points to, outside the store.
        """
        if not self.attrs["complete"]:
            raise StoreError(f"{self.url}: store is incomplete; finish cache-teachers (or labels finalize) first")
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        root = root.rstrip("/")
        out = os.fspath(out)
        with temporary_file(out) as tmp:  # and a killed pack's temporary is removed
            if os.path.lexists(out):
                raise StoreError(f"{out}: exists already; nothing was changed: pack into a new file")
            missing = self.missing_chunks()
            if missing:
                raise StoreError(f"{self.url}: {missing[0]}; nothing was packed: `mealv2 labels verify {self.url}`")
            if "file" in fs.protocol:
                links = [os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files
                         if os.path.islink(os.path.join(folder, name))]
                if links:
                    raise StoreError(f"{links[0]}: a symbolic link inside the store; nothing was packed: replace it "
                                     "with the file itself (packing copies files, and would copy what it points to)")
            local = self.group.store if isinstance(self.group.store, RegularFileStore) else None
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
                for path in sorted(fs.find(root)):  # a local store's files regular and bounded (a FIFO never ends)
                    key = path[len(root) + 1:]
                    archive.writestr(key, local.read(key) if local else fs.cat_file(path))
            _place_without_replacing(os.fspath(tmp), out)
        return os.path.getsize(out)

    def _consolidate(self) -> None:
        with warnings.catch_warnings():  # zarr notes consolidation is not in the v3 spec yet; we know
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(self.group.store)

    # -- reporting -------------------------------------------------------------------------

    def nbytes_stored(self) -> int:
        """Bytes the store takes on its filesystem or bucket."""
        if "::" in self.url:  # a chained URL (zip::...): the outermost file holds everything
            fs, path = fsspec.core.url_to_fs(self.url.split("::")[-1], **self.storage_options)
            return int(fs.size(path))
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return int(fs.du(path, total=True))

    def info(self) -> dict:
        attrs = self.attrs
        done = self.done()
        crops = len(attrs["seeds"]) * self.num_images
        nbytes = self.nbytes_stored()
        missing = self.missing_chunks()
        return {
            "url": self.url, "teachers": attrs["teachers"], "res": attrs["res"],
            "interpolation": attrs["interpolation"], "topk": attrs["topk"], "residual": attrs["residual"],
            "crop": attrs["crop"], "mix": attrs.get("mix"), "seeds": attrs["seeds"], "images": self.num_images,
            "classes": attrs["dataset"]["num_classes"],
            "complete": self.is_complete and not missing, "missing_chunks": len(missing), "units_done": int(done.sum()), "units": int(done.size),
            "bytes": nbytes, "bytes_per_crop": nbytes / crops if crops else 0.0,
            "fingerprint": attrs["dataset"]["fingerprint"], "created": attrs["created"],
            "skipped": len(attrs.get("skipped", [])), "made_with": attrs.get("made_with", []),
        }

    def verify_chunks(self) -> list[str]:
        """Decode every chunk of every array (crc32c checked); one line per damaged chunk."""
        problems = []
        for name in self.arrays + ("done",) + self._record + INDEX_ARRAYS:
            array = self.group[name]
            for coords in np.ndindex(*array.cdata_shape):
                region = tuple(slice(c * size, min((c + 1) * size, extent))
                               for c, size, extent in zip(coords, array.chunks, array.shape))
                try:
                    array[region]
                except Exception as err:  # noqa: BLE001 - any decode failure is a damaged chunk
                    problems.append(f"{name} chunk {'.'.join(map(str, coords))}: {first_line(err)}")
        return problems

    # -- the public reader (mealv2.open_store) -----------------------------------------------

    @property
    def num_slots(self) -> int:
        """Seed slots; epoch e reads slot e mod num_slots."""
        return len(self.seeds)

    @functools.cached_property
    def index(self) -> StoreIndex:
        """Paths, upright sizes and labels of the images, in row order; read once (a store's index never changes,
        and reading it for each unit made `labels verify` O(units × images))."""
        return StoreIndex(paths=PackedStrings.of([str(p) for p in self.group["index/paths"][...]]),
                          sizes=self.group["index/sizes"][...], labels=self.group["index/labels"][...])

    def skipped_rows(self) -> np.ndarray:
        """Rows of the images listed in ``skipped`` that are rows (left out while decoding): no slot need label them.

        The one reader of the list's "path: reason" entries, whose paths may themselves hold ": ".
        """
        if not self.skipped:
            return np.zeros(0, np.int64)
        paths = {path: row for row, path in enumerate(self.index.paths)}
        rows = set()
        for entry in self.skipped:  # "path: reason"; a path may itself hold ": "
            starts = [i for i in range(len(entry)) if entry.startswith(": ", i)]
            rows.update(paths[entry[:i]] for i in starts if entry[:i] in paths)
        return np.asarray(sorted(rows), np.int64)

    def _slot_of(self, epoch: int) -> SlotLabels:
        """Epoch ``epoch``'s slot, read whole once and held until another epoch's slot is asked for."""
        slot = epoch % self.num_slots
        if self._held is None or self._held[0] != slot:
            self._held = (slot, self.read_slot(slot))
        return self._held[1]

    def crops(self, epoch: int) -> SlotCrops:
        """The boxes and flips (and, in a CutMix store, the mixes) of slot ``epoch`` mod num_slots."""
        labels = self._slot_of(epoch)
        return SlotCrops(labels.boxes, labels.flips, labels.mix_partner, labels.mix_boxes)

    def targets(self, epoch: int, indices, dense: bool = True):
        """The soft targets of rows ``indices`` in slot ``epoch`` mod num_slots.

        dense: float32 tensor (B, C) by the store's residual rule (mealv2.softlabels.topk.expand);
        otherwise the stored top-k as tensors (values float16 (B, k), classes int64 (B, k)).
        Rows of skipped images are all zero.
        """
        labels = self._slot_of(epoch)
        rows = np.asarray(indices, np.int64).reshape(-1)
        values = torch.from_numpy(labels.probs[rows])
        classes = torch.from_numpy(labels.classes[rows].astype(np.int64))
        if not dense:
            return values, classes
        empty = torch.from_numpy(~labels.labelled()[rows])
        return expand(values, classes, self.num_classes, self.residual).masked_fill_(empty[:, None], 0.0)


def _reopened(url: str, storage_options: dict, opened_as: dict) -> LabelStore:
    store = LabelStore.open(url, "r", storage_options)
    store._opened_as = opened_as
    return store


def open_store(url: str, storage_options: dict | None = None) -> LabelStore:
    """Open a label store read-only from a path or any fsspec URL (``s3://``, ``zip::labels.zip``, ...)."""
    return LabelStore.open(os.fspath(url), "r", storage_options)
