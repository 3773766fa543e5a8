"""DatasetIndex: one scan of an ImageFolder split (paths, labels, upright sizes), saved for reuse.

Sizes come from image headers with the EXIF orientation applied, so a 1.28M-image split
scans in minutes, and the crop boxes drawn from them address the upright picture that
both decoders produce.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mealv2.pipeline.files import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these swap height and width
_INDEX_FORMAT = 2  # 2: strings packed with their ends (1 joined them with newlines, which names may hold)
FINGERPRINTS = ("size", "content")  # what a fingerprint hashes beside path and label: byte sizes, or every byte
_READ_BYTES = 1 << 20


class DatasetError(ValueError):
    """Bad input data: the message names the file or folder and what was expected."""


def safe_join(root: str | os.PathLike, relative: str) -> str:
    """Join a stored relative path under root, refusing absolute paths and '..' escapes."""
    if not relative or relative.startswith(("/", "\\")) or os.path.isabs(relative):
        raise DatasetError(f"{relative!r}: expected a path relative to the split folder")
    parts = posixpath.normpath(relative.replace("\\", "/")).split("/")
    if ".." in parts:
        raise DatasetError(f"{relative!r}: a path relative to the split folder must not contain '..'")
    return os.path.join(os.fspath(root), *parts)


def read_header(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header alone; DatasetError if not a JPEG/PNG."""
    limit = f"over the limit of {Image.MAX_IMAGE_PIXELS} pixels (PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb?)"
    try:
        with Image.open(path) as im:
            if im.format not in IMAGE_FORMATS:
                raise DatasetError(f"{path}: expected a JPEG or PNG image, found {im.format}")
            width, height = im.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise DatasetError(f"{path}: {width}×{height} image, {limit}")
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format == "JPEG" else 1
    except Image.DecompressionBombError:
        raise DatasetError(f"{path}: image {limit}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a readable JPEG or PNG image") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read image header ({err})") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        height, width = width, height
    return height, width


def _file_digest(path: str) -> bytes:
    """sha256 of a file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(_READ_BYTES):
            digest.update(piece)
    return digest.digest()


SCAN_WINDOW = 4096  # files read at once by a scan's threads and queued behind them: a Future each, not one a file
_BLOCK = 65536  # rows whose Python objects (ints, strings) a pass over a split holds at once


def in_windows(pool: ThreadPoolExecutor, work: Callable[[int], object], items: int | Iterable[int]):
    """``work(i)`` on ``pool`` for each i of ``items`` (or of range(items)), results in order, at most SCAN_WINDOW
    submitted ahead of the one consumed (``pool.map`` submits them all at once: memory in proportion to the split)."""
    pending: collections.deque = collections.deque()
    for i in range(items) if isinstance(items, int) else items:
        pending.append(pool.submit(work, i))
        if len(pending) >= SCAN_WINDOW:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _positions(mask: np.ndarray) -> Iterator[int]:
    """The positions where ``mask`` is true, as ints, found _BLOCK at a time (not an array and a list of them all)."""
    for start in range(0, len(mask), _BLOCK):
        yield from (start + np.flatnonzero(mask[start:start + _BLOCK])).tolist()


def _is_utf8(name: str) -> bool:
    """Whether a listed name is text: os.scandir hands bytes that are not UTF-8 over as surrogate escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str | os.PathLike) -> str:
    """``path`` for a message or a record: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class PackedStrings(Sequence):
    """Strings as two arrays, their UTF-8 bytes one after another and where each ends: read-only, one object for a
    million names. Forked DataLoader workers read it without copying it (a list of str objects is copied page by
    page as workers touch each object's reference count), it pickles as two buffers, and a name holding a newline
    stays one name. Surrogate escapes, which stand for a file name's bytes that are not UTF-8, are kept as bytes."""

    def __init__(self, data: np.ndarray, ends: np.ndarray):
        self.data, self.ends = np.asarray(data, np.uint8), np.asarray(ends, np.int64)

    @classmethod
    def of(cls, strings: Sequence[str]) -> PackedStrings:
        if isinstance(strings, PackedStrings):
            return strings
        encoded = [string.encode("utf-8", "surrogateescape") for string in strings]
        return cls(np.frombuffer(b"".join(encoded), np.uint8), np.cumsum([len(e) for e in encoded], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def span(self, start: int, stop: int) -> PackedStrings:
        """Strings ``start`` to ``stop`` (views of these arrays)."""
        first = int(self.ends[start - 1]) if start else 0
        return PackedStrings(self.data[first:int(self.ends[stop - 1]) if stop > start else first],
                             self.ends[start:stop] - first)

    def select(self, keep: np.ndarray) -> PackedStrings:
        """The strings where the boolean ``keep`` is true."""
        lengths = np.diff(self.ends, prepend=0)
        return PackedStrings(self.data[np.repeat(keep, lengths)], np.cumsum(lengths[keep]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative positions, and IndexError past the end
        start = int(self.ends[i - 1]) if i else 0
        return self.data[start:int(self.ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        raw, start = self.data.tobytes(), 0
        for end in self.ends.tolist():
            yield raw[start:end].decode("utf-8", "surrogateescape")
            start = end

    def __eq__(self, other) -> bool:
        if isinstance(other, PackedStrings):
            return np.array_equal(self.ends, other.ends) and np.array_equal(self.data, other.data)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings, {len(self.data)} bytes)"


SETTLED_NS = 2_000_000_000  # a class folder changed within this before its listing is listed again at the next start
_UNSETTLED = (-1, -1, -1)  # such a folder's stamp: equal to no folder's own
RESCAN_VARIABLE = "MEALV2_RESCAN"  # set to 1: every class folder is listed and each of its files looked at again


def _listed(entry: os.DirEntry) -> bool:
    """Whether a folder entry is an image candidate: a file, or an entry that cannot be looked at (a symlink loop).

    The header scan then names such an entry as a bad file, instead of the whole listing failing.
    """
    try:
        return entry.is_file()
    except OSError:
        return True


def _class_names(split_dir: Path) -> list[str]:
    """A split's class folders, sorted; DatasetError if there are none or one is not named in UTF-8."""
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: no such split folder (expected <root>/{split_dir.name}/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{split_dir}: expected one sub-folder per class, found none")
    for name in classes:
        if not _is_utf8(name):
            raise DatasetError(f"{printable_path(split_dir / name)}: class folder name is not valid UTF-8; "
                               "rename it (a store records class names as text)")
    return classes


def _stamp(folder: Path) -> tuple[int, int, int]:
    """A class folder's (mtime, ctime, inode), taken just before it is listed.

    Adding, removing or renaming an entry changes the folder's mtime and ctime (a tool that sets the mtime back,
    as ``rsync -a`` does, still changes the ctime), and a folder put in its place has another inode; a file
    rewritten in place under its own name changes none of them. Timestamps tick coarsely, so a folder changed
    within SETTLED_NS of now gets _UNSETTLED: a second change in the same tick would leave its stamp as it was.
    """
    now, stat = time.time_ns(), os.stat(folder)
    if max(stat.st_mtime_ns, stat.st_ctime_ns) > now - SETTLED_NS:
        return _UNSETTLED
    return stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


@dataclass(frozen=True)
class _Rows:
    """One class folder's rows: paths ("class/name"), byte sizes, mtimes, (height, width), whose header is unread."""

    paths: PackedStrings
    byte_sizes: np.ndarray
    mtimes: np.ndarray
    sizes: np.ndarray
    unread: np.ndarray

    @classmethod
    def of_class(cls, index: DatasetIndex, label: int) -> _Rows:
        """Class ``label``'s rows of ``index`` (a scan's rows are sorted by label), their headers read."""
        start, stop = (int(i) for i in np.searchsorted(index.labels, [label, label + 1]))
        return cls(index.paths.span(start, stop), index.byte_sizes[start:stop], index.mtimes[start:stop],
                   index.sizes[start:stop], np.zeros(stop - start, bool))


def _list_folder(split_dir: Path, name: str, before: _Rows | None) -> _Rows:
    """List a class folder and look at (stat) each file; a file of ``before`` with its name, byte size and mtime
    keeps its header, the others are marked unread. Python objects are held for one folder at a time."""
    entries = sorted((e for e in os.scandir(split_dir / name) if _listed(e) and not e.name.startswith(".")),
                     key=lambda e: e.name)
    if not entries:
        raise DatasetError(f"{split_dir / name}: class folder holds no images")
    known = {} if before is None else {
        path: (nbytes, mtime, size) for path, nbytes, mtime, size in
        zip(before.paths, before.byte_sizes.tolist(), before.mtimes.tolist(), before.sizes.tolist())}
    paths, byte_sizes, mtimes, sizes, unread = [], [], [], [], []
    for entry in entries:
        try:
            stat = entry.stat()
            nbytes, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # the header scan names it as a bad file
            nbytes, mtime = -1, 0
        path = f"{name}/{entry.name}"
        nbytes_before, mtime_before, size = known.get(path, (None, None, (0, 0)))
        paths.append(path)
        byte_sizes.append(nbytes)
        mtimes.append(mtime)
        sizes.append(size)
        unread.append((nbytes_before, mtime_before) != (nbytes, mtime))
    return _Rows(PackedStrings.of(paths), np.asarray(byte_sizes, np.int64), np.asarray(mtimes, np.int64),
                 np.asarray(sizes, np.int32).reshape(-1, 2), np.asarray(unread, bool))


class _Growing:
    """An array filled block by block at its end, its capacity doubled in place when full: ndarray.resize
    reallocates, and the C library moves a large buffer by remapping its pages rather than copying them, so a
    split's listing peaks near what it keeps (a list of blocks joined at the end would hold it twice)."""

    def __init__(self, dtype, row: tuple[int, ...] = ()):
        self.array, self.length = np.empty((0, *row), dtype), 0

    def extend(self, block: np.ndarray) -> None:
        end = self.length + len(block)
        if end > len(self.array):
            self.array.resize((max(end, 2 * len(self.array)), *self.array.shape[1:]), refcheck=False)
        self.array[self.length:end] = block
        self.length = end

    def filled(self) -> np.ndarray:
        self.array.resize((self.length, *self.array.shape[1:]), refcheck=False)
        return self.array


class _Listing:
    """A split's rows as they are listed, class folder after class folder, in growing arrays."""

    def __init__(self):
        self.data, self.ends, self.labels = _Growing(np.uint8), _Growing(np.int64), _Growing(np.int32)
        self.byte_sizes, self.mtimes, self.sizes = _Growing(np.int64), _Growing(np.int64), _Growing(np.int32, (2,))
        self.unread = _Growing(bool)

    def add(self, label: int, rows: _Rows) -> None:
        self.ends.extend(rows.paths.ends + self.data.length)
        self.data.extend(rows.paths.data)
        self.labels.extend(np.full(len(rows.paths), label, np.int32))
        for column in ("byte_sizes", "mtimes", "sizes", "unread"):
            getattr(self, column).extend(getattr(rows, column))


@dataclass(frozen=True)
class DatasetIndex:
    """An ImageFolder split: sorted relative paths, labels, (height, width) after EXIF, byte sizes."""

    root: str
    paths: Sequence[str]  # PackedStrings: any sequence given is packed
    labels: np.ndarray
    sizes: np.ndarray
    byte_sizes: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    mtimes: np.ndarray | None = None  # each file's mtime_ns when its header was read
    stamps: np.ndarray | None = None  # each class folder's (mtime, ctime, inode) when it was listed (_stamp)

    def __post_init__(self):
        object.__setattr__(self, "paths", PackedStrings.of(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over (path, byte size, label) of every image: identifies the split's content. Worked out once
        (seconds at ImageNet-1k), and saved with the index, so that a warm start takes it from the cache."""
        digest = hashlib.sha256()
        for start in range(0, len(self), _BLOCK):  # the Python objects of one block at a time
            stop = min(start + _BLOCK, len(self))
            digest.update("".join(f"{path}\0{nbytes}\0{label}\n" for path, nbytes, label in zip(
                self.paths.span(start, stop), self.byte_sizes[start:stop].tolist(), self.labels[start:stop].tolist(),
            )).encode("utf-8", "surrogateescape"))  # a name's own bytes
        return digest.hexdigest()

    def fingerprint_of(self, mode: str = "size", workers: int = 8) -> str:
        """The fingerprint in ``mode``: "size" (``fingerprint``), or "content", which also hashes every file's bytes

        (read in parallel threads, with a progress bar), so that a picture replaced at the same byte size shows.
        """
        if mode == "size":
            return self.fingerprint
        if mode != "content":
            raise DatasetError(f"--fingerprint {mode!r}: expected one of {FINGERPRINTS}")
        digest = hashlib.sha256(self.fingerprint.encode())
        with ThreadPoolExecutor(max(1, workers)) as pool:
            files = in_windows(pool, lambda i: _file_digest(self.file(i)), len(self))
            for value in tqdm(files, total=len(self), desc="fingerprint content", unit="img", disable=None,
                              leave=False):
                digest.update(value)
        return digest.hexdigest()

    def file(self, i: int) -> str:
        """Absolute path of image i (never outside the split folder)."""
        return safe_join(self.root, self.paths[i])

    @classmethod
    def scan(cls, split_dir: str | os.PathLike, skip_bad: bool = False, workers: int = 8,
             previous: DatasetIndex | None = None, trust_stamps: bool = True) -> DatasetIndex:
        """Walk split_dir and read every header, reusing what ``previous`` (an earlier scan of it) holds.

        A class folder whose stamp (_stamp) is the one ``previous`` recorded keeps its rows without being listed,
        when ``trust_stamps`` and ``previous`` left no file out; the other folders are listed, and their files
        with the name, byte size and mtime of ``previous`` keep their header. With nothing listed, ``previous``
        itself is returned. A bad file raises DatasetError naming it, unless skip_bad: then it is left out and
        listed in ``skipped`` as "path: reason".
        """
        split_dir = Path(split_dir).resolve()
        classes = _class_names(split_dir)
        before = {} if previous is None or previous.mtimes is None else {
            name: label for label, name in enumerate(previous.classes)}
        trusted = previous._stamps_of(split_dir) if trust_stamps and previous is not None else {}
        stamps = np.array([_stamp(split_dir / name) for name in classes], np.int64)  # each before its listing
        kept = [name in before and trusted.get(name) == stamp for name, stamp in zip(classes, map(tuple, stamps))]
        if all(kept) and classes == previous.classes:
            return previous
        listing = _Listing()
        for label, (name, keep) in enumerate(zip(classes, kept)):
            rows = _Rows.of_class(previous, before[name]) if name in before else None
            listing.add(label, rows if keep else _list_folder(split_dir, name, rows))
        paths = PackedStrings(listing.data.filled(), listing.ends.filled())
        sizes, skipped = cls._read_headers(split_dir, paths, listing.sizes.filled(), listing.unread.filled(),
                                           skip_bad, workers)
        labels, byte_sizes, mtimes = listing.labels.filled(), listing.byte_sizes.filled(), listing.mtimes.filled()
        if skipped:
            keep = np.ones(len(paths), bool)
            keep[list(skipped)] = False
            paths, labels, sizes, byte_sizes, mtimes = (paths.select(keep), labels[keep], sizes[keep],
                                                        byte_sizes[keep], mtimes[keep])
        empty = np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)  # O(N), not O(N·C)
        if len(empty):
            raise DatasetError(f"{split_dir / classes[empty[0]]}: class folder holds no usable images")
        return cls(root=str(split_dir), paths=paths, labels=labels, sizes=sizes, byte_sizes=byte_sizes,
                   classes=classes, skipped=[skipped[i] for i in sorted(skipped)], mtimes=mtimes, stamps=stamps)

    def _stamps_of(self, split_dir: Path) -> dict[str, tuple[int, int, int]]:
        """Each class folder's recorded stamp, where its rows may stand for the folder while the stamp holds: a scan
        of ``split_dir`` that left no file out (a file left out is looked at again at each scan)."""
        if self.stamps is None or self.root != str(split_dir) or self.skipped or len(self.stamps) != len(self.classes):
            return {}
        return {name: tuple(stamp) for name, stamp in zip(self.classes, self.stamps.tolist())
                if tuple(stamp) != _UNSETTLED}

    @staticmethod
    def _read_headers(split_dir: Path, paths: PackedStrings, sizes: np.ndarray, unread: np.ndarray, skip_bad: bool,
                      workers: int) -> tuple[np.ndarray, dict[int, str]]:
        """``sizes`` with the headers of the ``unread`` rows read in, and {row: "path: reason"} of the bad files."""
        rows = _positions(unread)

        def header_or_error(row: int) -> tuple[int, int] | str:
            name = paths[row]
            path = str(split_dir / name)
            if not _is_utf8(name):
                return (f"{printable_path(path)}: file name is not valid UTF-8; rename it (a store records names as "
                        "text)")
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                return f"{path}: expected a .jpg, .jpeg or .png image file"
            try:
                return read_header(path)
            except DatasetError as err:
                return str(err)

        bad: dict[int, str] = {}
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = in_windows(pool, header_or_error, rows)
            for row, result in tqdm(zip(_positions(unread), results), total=int(unread.sum()),
                                    desc=f"scan {split_dir.name}", unit="img", disable=None, leave=False):
                if isinstance(result, str):
                    if not skip_bad:
                        raise DatasetError(f"{result} (use --skip-bad to leave bad files out)")
                    bad[row] = result
                else:
                    sizes[row] = result
        return sizes, bad

    def write(self, target: BinaryIO) -> None:
        """The index as a pickle-free .npz into an open binary file (what ``save`` writes and ranks receive)."""
        strings = {name: PackedStrings.of(values) for name, values in
                   (("root", [self.root]), ("paths", self.paths), ("classes", self.classes), ("skipped", self.skipped))}
        np.savez(
            target, format=np.int64(_INDEX_FORMAT), labels=self.labels, sizes=self.sizes, byte_sizes=self.byte_sizes,
            mtimes=self.mtimes if self.mtimes is not None else np.zeros(len(self), np.int64),
            fingerprint=np.str_(self.fingerprint),
            **({"stamps": self.stamps} if self.stamps is not None else {}),  # readers before them ignore them
            **{key: array for name, packed in strings.items() for key, array in ((name, packed.data),
                                                                                  (f"{name}_ends", packed.ends))},
        )

    @classmethod
    def read(cls, source: str | os.PathLike | BinaryIO, name: str = "index") -> DatasetIndex:
        """An index that ``write`` wrote, from a file's path or an open binary file (read array by array)."""
        with np.load(source, allow_pickle=False) as arrays:
            if int(arrays["format"]) != _INDEX_FORMAT:
                raise DatasetError(f"{name}: index format {int(arrays['format'])}, expected {_INDEX_FORMAT}")
            strings = {name: PackedStrings(arrays[name], arrays[f"{name}_ends"])
                       for name in ("root", "paths", "classes", "skipped")}
            index = cls(root=strings["root"][0], paths=strings["paths"], labels=arrays["labels"], sizes=arrays["sizes"],
                        byte_sizes=arrays["byte_sizes"], classes=list(strings["classes"]),
                        skipped=list(strings["skipped"]), mtimes=arrays["mtimes"],
                        stamps=arrays["stamps"] if "stamps" in arrays.files else None)
            if "fingerprint" in arrays.files:  # worked out from these arrays when they were written
                vars(index)["fingerprint"] = str(arrays["fingerprint"])
            return index

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index") -> DatasetIndex:
        return cls.read(io.BytesIO(data), name)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as a pickle-free .npz (atomically: temp file, then rename), array by array."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                self.write(handle)
        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetIndex:
        return cls.read(path, str(path))


def default_cache_path(split_dir: str | os.PathLike) -> Path:
    """Where the index of a split is kept: $MEALV2_CACHE (or ~/.cache/mealv2)/index-<hash of its path>.npz."""
    base = Path(os.environ.get("MEALV2_CACHE", Path.home() / ".cache" / "mealv2"))
    key = hashlib.sha256(os.fsencode(Path(split_dir).resolve())).hexdigest()[:16]
    return base / f"index-{Path(split_dir).name}-{key}.npz"


def _scan_cached(split_dir: str | os.PathLike, skip_bad: bool, cache: bool, workers: int) -> DatasetIndex:
    """Scan a split, reusing its cached index (DatasetIndex.scan; all of it when no class folder changed), and save
    what changed. With MEALV2_RESCAN=1 every class folder is listed and each file looked at (its byte size, mtime)."""
    cache_path = default_cache_path(split_dir)
    previous = None
    if cache and cache_path.exists():
        try:
            previous = DatasetIndex.load(cache_path)
        except (OSError, ValueError, KeyError):
            previous = None  # a damaged cache only costs a full scan
    trust = os.environ.get(RESCAN_VARIABLE, "0") in ("", "0")
    index = DatasetIndex.scan(split_dir, skip_bad=skip_bad, workers=workers, previous=previous, trust_stamps=trust)
    if cache and index is not previous:
        try:
            index.save(cache_path)
        except OSError:
            pass  # a read-only home only costs a rescan next time
    return index


def load_index(split_dir: str | os.PathLike, skip_bad: bool = False, cache: bool = True, workers: int = 8,
               world=None) -> DatasetIndex:
    """The split's index, scanned once per job: under torchrun rank 0 scans and the other ranks receive it.

    ``world`` is a mealv2.pipeline.distributed.World; without one (or with one rank) this process scans.
    """
    if world is None or not world.distributed:
        return _scan_cached(split_dir, skip_bad, cache, workers)
    data = world.on_main(lambda: _scan_cached(split_dir, skip_bad, cache, workers).to_bytes())
    return DatasetIndex.from_bytes(data, f"{split_dir} (from rank 0)")
