"""DatasetIndex: one scan of an ImageFolder split (paths, labels, upright sizes), saved for reuse.

Sizes come from image headers with the EXIF orientation applied, so a 1.28M-image split
scans in minutes, and the crop boxes drawn from them address the upright picture that
both decoders produce.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class _Listing:
    """What a directory walk sees: relative paths, labels, byte sizes, mtimes and class names."""

    paths: list[str]
    labels: np.ndarray
    byte_sizes: np.ndarray
    mtimes: np.ndarray
    classes: list[str]


def _listed(entry: os.DirEntry) -> bool:
    """Whether a folder entry is an image candidate: a file, or an entry that cannot be looked at (a symlink loop).

    The header scan then names such an entry as a bad file, instead of the whole listing failing.
    """
    try:
        return entry.is_file()
    except OSError:
        return True


def _list_split(split_dir: Path) -> _Listing:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: no such split folder (expected <root>/{split_dir.name}/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{split_dir}: expected one sub-folder per class, found none")
    paths, labels, byte_sizes, mtimes = [], [], [], []
    for label, name in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / name) if _listed(e) and not e.name.startswith(".")),
            key=lambda e: e.name,
        )
        if not entries:
            raise DatasetError(f"{split_dir / name}: class folder holds no images")
        for entry in entries:
            try:
                stat = entry.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # the header scan names it as a bad file
                size, mtime = -1, 0
            paths.append(f"{name}/{entry.name}")
            labels.append(label)
            byte_sizes.append(size)
            mtimes.append(mtime)
    return _Listing(paths, np.asarray(labels, np.int32), np.asarray(byte_sizes, np.int64),
                    np.asarray(mtimes, np.int64), classes)


def _file_digest(path: str) -> bytes:
    """sha256 of a file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(_READ_BYTES):
            digest.update(piece)
    return digest.digest()


SCAN_WINDOW = 4096  # files read at once by a scan's threads and queued behind them: a Future each, not one a file


def in_windows(pool: ThreadPoolExecutor, work: Callable[[int], object], count: int):
    """``work(0)``, ``work(1)``, … ``work(count - 1)`` on ``pool``, results in order, at most SCAN_WINDOW submitted
    ahead of the one consumed (``pool.map`` submits all ``count`` at once: memory in proportion to the split)."""
    pending: collections.deque = collections.deque()
    for i in range(count):
        pending.append(pool.submit(work, i))
        if len(pending) >= SCAN_WINDOW:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    mtimes: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", PackedStrings.of(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """sha256 over (path, byte size, label) of every image: identifies the split's content."""
        digest = hashlib.sha256()
        for path, nbytes, label in zip(self.paths, self.byte_sizes.tolist(), self.labels.tolist()):
            digest.update(f"{path}\0{nbytes}\0{label}\n".encode("utf-8", "surrogateescape"))  # a name's own bytes
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
             previous: DatasetIndex | None = None) -> DatasetIndex:
        """Walk split_dir and read every header (files unchanged since ``previous`` are reused).

        A bad file raises DatasetError naming it, unless skip_bad: then it is left out and
        listed in ``skipped`` as "path: reason".
        """
        split_dir = Path(split_dir).resolve()
        listing = _list_split(split_dir)
        known = {}
        if previous is not None and previous.mtimes is not None:
            known = {(p, int(b), int(m)): tuple(s) for p, b, m, s in zip(
                previous.paths, previous.byte_sizes, previous.mtimes, previous.sizes.tolist())}
        keys = [(p, int(b), int(m)) for p, b, m in zip(listing.paths, listing.byte_sizes, listing.mtimes)]

        for name in listing.classes:
            if not _is_utf8(name):
                raise DatasetError(f"{printable_path(split_dir / name)}: class folder name is not valid UTF-8; "
                                   "rename it (a store records class names as text)")

        def header_or_error(i: int) -> tuple[int, int] | str:
            path = str(split_dir / listing.paths[i])
            if not _is_utf8(listing.paths[i]):
                return (f"{printable_path(path)}: file name is not valid UTF-8; rename it (a store records names as "
                        "text)")
            if (key := keys[i]) in known:
                return known[key]
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                return f"{path}: expected a .jpg, .jpeg or .png image file"
            try:
                return read_header(path)
            except DatasetError as err:
                return str(err)

        sizes = np.zeros((len(keys), 2), np.int32)
        bad: dict[int, str] = {}
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = in_windows(pool, header_or_error, len(keys))
            for i, result in tqdm(zip(range(len(keys)), results), total=len(keys), desc=f"scan {split_dir.name}",
                                  unit="img", disable=None, leave=False):
                if isinstance(result, str):
                    if not skip_bad:
                        raise DatasetError(f"{result} (use --skip-bad to leave bad files out)")
                    bad[i] = result
                else:
                    sizes[i] = result
        keep = np.asarray([i not in bad for i in range(len(keys))], bool)
        index = cls(
            root=str(split_dir),
            paths=[p for p, k in zip(listing.paths, keep) if k],
            labels=listing.labels[keep],
            sizes=sizes[keep],
            byte_sizes=listing.byte_sizes[keep],
            classes=listing.classes,
            skipped=[bad[i] for i in sorted(bad)],
            mtimes=listing.mtimes[keep],
        )
        empty = np.flatnonzero(np.bincount(index.labels, minlength=len(index.classes)) == 0)  # O(N), not O(N·C)
        if len(empty):
            raise DatasetError(f"{split_dir / index.classes[empty[0]]}: class folder holds no usable images")
        return index

    def to_bytes(self) -> bytes:
        """The index as a pickle-free .npz, in memory (what ``save`` writes and ranks receive)."""
        buffer = io.BytesIO()
        strings = {name: PackedStrings.of(values) for name, values in
                   (("root", [self.root]), ("paths", self.paths), ("classes", self.classes), ("skipped", self.skipped))}
        np.savez(
            buffer, format=np.int64(_INDEX_FORMAT), labels=self.labels, sizes=self.sizes, byte_sizes=self.byte_sizes,
            mtimes=self.mtimes if self.mtimes is not None else np.zeros(len(self), np.int64),
            **{key: array for name, packed in strings.items() for key, array in ((name, packed.data),
                                                                                  (f"{name}_ends", packed.ends))},
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index") -> DatasetIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if int(arrays["format"]) != _INDEX_FORMAT:
                raise DatasetError(f"{name}: index format {int(arrays['format'])}, expected {_INDEX_FORMAT}")
            strings = {name: PackedStrings(arrays[name], arrays[f"{name}_ends"])
                       for name in ("root", "paths", "classes", "skipped")}
            return cls(root=strings["root"][0], paths=strings["paths"], labels=arrays["labels"], sizes=arrays["sizes"],
                       byte_sizes=arrays["byte_sizes"], classes=list(strings["classes"]),
                       skipped=list(strings["skipped"]), mtimes=arrays["mtimes"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as a pickle-free .npz (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(self.to_bytes()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetIndex:
        return cls.from_bytes(Path(path).read_bytes(), str(path))


def default_cache_path(split_dir: str | os.PathLike) -> Path:
    """Where the index of a split is kept: $MEALV2_CACHE (or ~/.cache/mealv2)/index-<hash of its path>.npz."""
    base = Path(os.environ.get("MEALV2_CACHE", Path.home() / ".cache" / "mealv2"))
    key = hashlib.sha256(os.fsencode(Path(split_dir).resolve())).hexdigest()[:16]
    return base / f"index-{Path(split_dir).name}-{key}.npz"


def _scan_cached(split_dir: str | os.PathLike, skip_bad: bool, cache: bool, workers: int) -> DatasetIndex:
    """Scan a split, reusing the headers of unchanged files from its cached index, and save it."""
    cache_path = default_cache_path(split_dir)
    previous = None
    if cache and cache_path.exists():
        try:
            previous = DatasetIndex.load(cache_path)
        except (OSError, ValueError, KeyError):
            previous = None  # a damaged cache only costs a full scan
    index = DatasetIndex.scan(split_dir, skip_bad=skip_bad, workers=workers, previous=previous)
    if cache:
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
