"""The label store as every reader sees it (docs/store-format.md): ``open_store`` gives a read-only ``LabelStore``.

Its identity, its images, and each seed slot's crops and soft targets, read one slot whole at
a time and checked against the written-units record (integrity.py). Stage one writes through
mealv2.softlabels.writer.StoreWriter, which shares this module's opening and row layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Sequence

import fsspec
import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex, PackedStrings, load_index
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.mix import MixSpec
from mealv2.softlabels.integrity import missing_chunks, slot_problems
from mealv2.softlabels.schema import (FORMAT, IDENTITY_KEYS, LABEL_ARRAYS, MIX_ARRAYS, WRITTEN, StoreError,
                                      StoreUnreachable, fingerprint_mode, teacher_identity)
from mealv2.softlabels.store_files import RegularFileStore
from mealv2.softlabels.topk import expand

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


def zarr_store(url: str, read_only: bool, storage_options: dict | None):
    """A zarr store for a path or any fsspec URL (s3://, gs://, zip::..., file://); zip archives only read."""
    if not read_only and url.startswith("zip:"):
        raise StoreError(f"{url}: a zip archive is read-only; write to a folder or bucket, then `labels pack` it")
    if "://" in url or "::" in url:
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return RegularFileStore(url, read_only=read_only)  # a FIFO or a link to a device among its files is named


def open_group(url: str, writing: bool = False, storage_options: dict | None = None) -> zarr.Group:
    """The zarr group of the mealv2 store at ``url`` (StoreError if there is none, or its metadata is damaged).

    Readers take the consolidated metadata; writers read the live files (a consolidated copy goes stale while
    units are written).
    """
    try:
        with reaching(url):
            group = zarr.open_group(zarr_store(url, not writing, storage_options), mode="r+" if writing else "r",
                                    use_consolidated=False if writing else None)
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
    return group


class _Attribute:
    """A read-only store attribute (under the group's "mealv2" key), converted on the way out."""

    def __init__(self, key: str, convert=lambda value: value):
        self.key, self.convert = key, convert

    def __get__(self, store: StoreLayout | None, owner=None):
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



class StoreLayout:
    """An opened store's zarr group and how its rows are cut: seed slots × chunks of rows, a (slot, chunk) unit being
    one writer's assignment. What the reader (LabelStore) and the writer (StoreWriter) both ask."""

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.storage_options = dict(storage_options or {})

    @property
    def attrs(self) -> dict:
        """A copy of the group's "mealv2" attributes (docs/store-format.md)."""
        return dict(self.group.attrs["mealv2"])

    seeds = _Attribute("seeds", list)  # the crop seed of each slot

    @property
    def mix(self) -> MixSpec:
        """The CutMix its labels were computed on (disabled for a store without mixes)."""
        return MixSpec.from_attrs(self.attrs.get("mix"))

    @property
    def arrays(self) -> tuple[str, ...]:
        """The per-slot arrays it holds: the labels, and the mixes in a CutMix store."""
        return LABEL_ARRAYS + (MIX_ARRAYS if self.mix.enabled else ())

    @property
    def record(self) -> tuple[str, ...]:
        """The written-units record array, where the store has one (stores made before it existed have not)."""
        return (WRITTEN,) if WRITTEN in self.group else ()

    @property
    def num_images(self) -> int:
        """Rows per seed slot: the images of its index."""
        return self.group["probs"].shape[1]

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk (the last chunk may hold fewer)."""
        return self.group["probs"].chunks[1]

    @property
    def num_chunks(self) -> int:
        """Chunks per seed slot."""
        return self.group["done"].shape[1]

    def rows(self, chunk: int) -> slice:
        """The rows of chunk ``chunk``."""
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_images))

    def stored_chunks(self, name: str) -> set[str]:
        """The keys of array ``name``'s chunks that storage holds: one listing, no chunk read."""
        array = self.group[name]

        async def listing():
            return {key async for key in array.store_path.store.list_prefix(array.store_path.path)}
        return sync(listing())

    def chunk_key(self, name: str, coords: tuple[int, ...]) -> str:
        """The storage key of array ``name``'s chunk at ``coords``."""
        array = self.group[name]
        return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"

    def done(self) -> np.ndarray:
        """(seed slots, chunks) bool: which units are written.

        A writer stores a unit's ``done`` cell (a chunk of its own) only when it sets it, so one listing answers
        instead of a read of every cell (6,944 objects for ImageNet-21k's 16 slots, at every completeness check).
        """
        array = self.group["done"]
        if array.chunks != (1, 1):  # not a layout this tool makes: read the cells
            return array[...]
        held = self.stored_chunks("done")
        return np.asarray([[self.chunk_key("done", (slot, chunk)) in held for chunk in range(array.shape[1])]
                           for slot in range(array.shape[0])], bool).reshape(array.shape)


class LabelStore(StoreLayout):
    """A label store opened read-only (``open_store``): its identity, its images, each seed slot's crops and targets.

    ``crops``, ``targets`` and ``topk`` read epoch e's slot (e mod ``num_slots``) whole on first use and hold it
    until another slot is asked for: one slot's rows in memory, tens of MB at ImageNet scale. Every slot read
    refuses a store replaced at its URL since it was opened, and rows that differ from what their writers recorded.
    Pickled (to DataLoader workers), it travels as its URL and identity and is opened again there.
    """

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        super().__init__(url, group, storage_options)
        self._held: tuple[int, SlotLabels] | None = None  # the slot crops()/targets()/topk() read last
        self._opened_as: dict | None = None  # the identity its slots are read under (its own, unless reopened)

    def __reduce__(self):
        """Pickled as its address and identity: unpickled (in a worker process) it is opened again and still read
        under the identity of the store first opened, so a store rebuilt meanwhile is refused, not read."""
        return _reopened, (self.url, self.storage_options, self.opened_as)

    def reopened(self) -> LabelStore:
        """This store opened again (a forked worker's own handle), its slots read under this handle's identity."""
        return _reopened(self.url, self.storage_options, self.opened_as)

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> LabelStore:
        """Open an existing store to read it.

        Args:
            url: a path or any fsspec URL (``s3://``, ``gs://``, ``zip::labels.zip``, ...).
            mode: "r", the only mode: stage one writes through mealv2.softlabels.writer.StoreWriter.
            storage_options: passed to fsspec (endpoint, credentials).

        Raises StoreError where there is no store, or its metadata is damaged; StoreUnreachable where ``url``
        cannot be reached.
        """
        if mode != "r":
            raise ValueError(f"mode {mode!r}: a LabelStore only reads ('r'); stage one writes with "
                             "mealv2.softlabels.writer.StoreWriter")
        return cls(url, open_group(url, storage_options=storage_options), storage_options)

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        """Whether a mealv2 store opens at ``url`` (StoreUnreachable where ``url`` cannot be reached)."""
        try:
            cls.open(url, "r", storage_options)
        except StoreUnreachable:
            raise
        except StoreError:
            return False
        return True

    # -- what its labels are -------------------------------------------------------------------

    res = _Attribute("res", int)  # the side of the square crops the teachers saw, in pixels
    interpolation = _Attribute("interpolation")  # the resize filter of the crops (pipeline.decoders.INTERPOLATIONS)
    k = _Attribute("topk", int)  # probabilities stored per row: the teachers' top k
    residual = _Attribute("residual")  # how a dense target rebuilds the mass beyond the top k (schema.RESIDUALS)
    marked_complete = _Attribute("complete", bool)  # set by finalize once every unit was written

    @property
    def crop(self) -> CropSpec:
        """The RandomResizedCrop ranges its boxes were drawn with."""
        return CropSpec.from_attrs(self.attrs["crop"])

    @property
    def fingerprint(self) -> str:
        """The dataset fingerprint of its rows, in the store's --fingerprint mode (DatasetIndex.fingerprint_of)."""
        return self.attrs["dataset"]["fingerprint"]

    @property
    def skipped(self) -> list[str]:
        """"path: reason" of the images it holds no labels for."""
        return list(self.attrs.get("skipped", []))

    @property
    def teachers(self) -> list[dict]:
        """One record per teacher: name, checkpoint sha256 or pretrained tag, mean and std."""
        return list(self.attrs["teachers"])

    @property
    def num_classes(self) -> int:
        """C, the classes of its dataset: the width of a dense target."""
        return int(self.attrs["dataset"]["num_classes"])

    @property
    def num_slots(self) -> int:
        """Seed slots; epoch e reads slot e mod num_slots."""
        return len(self.seeds)

    @property
    def is_complete(self) -> bool:
        """Marked complete, and every unit written."""
        return self.marked_complete and bool(self.done().all())

    def complete_slots(self) -> int:
        """How many leading seed slots are written whole: a store being extended serves those already."""
        done = self.done().all(axis=1)
        return int(done.size if done.all() else done.argmin())

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

    # -- its images ----------------------------------------------------------------------------

    @functools.cached_property
    def index(self) -> StoreIndex:
        """Paths, upright sizes and labels of the images, in row order; read once (a store's index never changes,
        and reading it for each unit made `labels verify` O(units × images))."""
        return StoreIndex(paths=PackedStrings.of([str(p) for p in self.group["index/paths"][...]]),
                          sizes=self.group["index/sizes"][...], labels=self.group["index/labels"][...])

    def matching_index(self, split_dir: str | os.PathLike, skip_bad: bool = False, world=None) -> DatasetIndex:
        """The index of ``split_dir`` (load_index: one scan per job) if its images are the ones the rows are for.

        The one test of a dataset's identity: the fingerprint in the store's mode, then the upright sizes, which
        the scan reads anyway and which change when a picture is replaced at equal byte size; StoreError if not.
        Files the store left out (``skipped``) are left out of the scan too.

        Args:
            split_dir: the split folder the store was cached from (ROOT/train).
            skip_bad: leave out files that do not decode (--skip-bad), as the scan of a store with skipped images does.
            world: the process group (pipeline.distributed): rank 0 scans, the others receive its index.
        """
        index = load_index(split_dir, skip_bad=skip_bad or bool(self.skipped), world=world)
        if index.fingerprint_of(fingerprint_mode(self.attrs["dataset"])) != self.fingerprint:
            raise StoreError(f"{self.url}: labels are for another dataset than {split_dir} (fingerprint differs); "
                             "point at the split the store was cached from")
        changed = np.flatnonzero((self.group["index/sizes"][...] != index.sizes).any(axis=1))
        if len(changed):
            raise StoreError(f"{self.url}: {len(changed)} image(s) of {split_dir} changed since their labels were "
                             f"made (other height × width): {', '.join(index.paths[i] for i in changed[:3])}; their "
                             "labels are for the pictures cached: restore those, or cache the split into a new --store")
        return index

    def skipped_rows(self) -> np.ndarray:
        """Rows (int64, sorted) of the images listed in ``skipped`` that are rows (left out while decoding): no slot
        need label them.

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

    # -- its rows ------------------------------------------------------------------------------

    def read_slot(self, slot: int, checked: bool = True) -> SlotLabels:
        """Seed slot ``slot``'s rows whole (stage two reads one per epoch; never random rows per batch).

        Args:
            slot: 0 <= slot < num_slots.
            checked: refuse rows that differ from what their writers recorded, and empty rows of images
                not listed as skipped (StoreError naming the first problem).

        Returns the slot's arrays (SlotLabels: probs float16 (N, k), classes uint16 or int32 (N, k), boxes int32
        (N, 4), flips bool (N,), and in a CutMix store mix_partner int32 (N,) and mix_boxes int32 (N, 4)).
        Refuses a store replaced at its URL since this handle was opened (StoreError naming what differs).
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
            problems = slot_problems(self, slot, labels)
            if problems:
                raise StoreError(f"{self.url}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                 if len(problems) > 1 else "") + f"; refused before training on it: run "
                                 f"`mealv2 labels verify {self.url}` for the whole list")
        return labels

    def _slot_of(self, epoch: int) -> SlotLabels:
        """Epoch ``epoch``'s slot, read whole once and held until another epoch's slot is asked for."""
        slot = epoch % self.num_slots
        if self._held is None or self._held[0] != slot:
            self._held = (slot, self.read_slot(slot))
        return self._held[1]

    def crops(self, epoch: int) -> SlotCrops:
        """What epoch ``epoch`` replays: the crops of slot ``epoch`` mod num_slots.

        Args:
            epoch: any epoch number, 0 or more.

        Returns SlotCrops: boxes int32 (N, 4) (top, left, height, width) in upright source pixels, flips bool (N,),
        and in a CutMix store mix_partner int32 (N,) (-1 where not mixed) and mix_boxes int32 (N, 4) at ``res``.
        """
        labels = self._slot_of(epoch)
        return SlotCrops(labels.boxes, labels.flips, labels.mix_partner, labels.mix_boxes)

    def targets(self, epoch: int, indices, dense: bool = True) -> torch.Tensor:
        """The soft targets of rows ``indices`` in slot ``epoch`` mod num_slots, dense.

        Args:
            epoch: any epoch number, 0 or more.
            indices: B row numbers (int sequence or array, any shape: flattened).
            dense: kept for the store's early users: ``dense=False`` is ``topk(epoch, indices)``.

        Returns a float32 tensor (B, C) built from the stored top-k by the store's residual rule
        (mealv2.softlabels.topk.expand); rows of skipped images are all zero.
        """
        if not dense:
            warnings.warn("LabelStore.targets(..., dense=False) is LabelStore.topk(epoch, indices)", DeprecationWarning,
                          stacklevel=2)
            return self.topk(epoch, indices)
        labels = self._slot_of(epoch)
        rows = np.asarray(indices, np.int64).reshape(-1)
        values, classes = self.topk(epoch, rows)
        empty = torch.from_numpy(~labels.labelled()[rows])
        return expand(values, classes, self.num_classes, self.residual).masked_fill_(empty[:, None], 0.0)

    def topk(self, epoch: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored top-k of rows ``indices`` in slot ``epoch`` mod num_slots.

        Args:
            epoch: any epoch number, 0 or more.
            indices: B row numbers (int sequence or array, any shape: flattened).

        Returns (values float16 (B, k), the teachers' averaged softmax in descending order; classes int64 (B, k)).
        Rows of skipped images hold zeros.
        """
        labels = self._slot_of(epoch)
        rows = np.asarray(indices, np.int64).reshape(-1)
        return torch.from_numpy(labels.probs[rows]), torch.from_numpy(labels.classes[rows].astype(np.int64))

    # -- reporting -----------------------------------------------------------------------------

    def nbytes_stored(self) -> int:
        """Bytes the store takes on its filesystem or bucket."""
        if "::" in self.url:  # a chained URL (zip::...): the outermost file holds everything
            fs, path = fsspec.core.url_to_fs(self.url.split("::")[-1], **self.storage_options)
            return int(fs.size(path))
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return int(fs.du(path, total=True))

    def info(self) -> dict:
        """What `labels info` prints: the identity, the shape of the work, completeness (chunks looked for) and size."""
        attrs = self.attrs
        done = self.done()
        crops = len(attrs["seeds"]) * self.num_images
        nbytes = self.nbytes_stored()
        missing = missing_chunks(self)
        return {
            "url": self.url, "teachers": attrs["teachers"], "res": attrs["res"],
            "interpolation": attrs["interpolation"], "topk": attrs["topk"], "residual": attrs["residual"],
            "crop": attrs["crop"], "mix": attrs.get("mix"), "seeds": attrs["seeds"], "images": self.num_images,
            "classes": attrs["dataset"]["num_classes"],
            "complete": self.is_complete and not missing, "missing_chunks": len(missing), "units_done": int(done.sum()), "units": int(done.size),
            "bytes": nbytes, "bytes_per_crop": nbytes / crops if crops else 0.0,
            "fingerprint": attrs["dataset"]["fingerprint"], "created": attrs["created"],
            "skipped": len(attrs.get("skipped", [])), "made_with": attrs.get("made_with", []),
            "merged_from": attrs.get("merged_from", []),
        }


def _reopened(url: str, storage_options: dict, opened_as: dict) -> LabelStore:
    store = LabelStore.open(url, "r", storage_options)
    store._opened_as = opened_as
    return store


def open_store(url: str | os.PathLike, storage_options: dict | None = None) -> LabelStore:
    """Open a label store read-only from a path or any fsspec URL (``s3://``, ``zip::labels.zip``, ...)."""
    return LabelStore.open(os.fspath(url), "r", storage_options)
