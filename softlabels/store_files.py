"""The files of a local label store: regular files only, none larger than its place in the schema allows.

zarr's LocalStore reads whatever a chunk's path holds: a FIFO blocks the reader for ever, and a chunk that
links to /dev/zero fills its memory. Here each file is opened without blocking and checked on the open handle
(fstat) before a byte is read, and a read stops one byte past the most that file can hold (allocating what the
file holds, not that most); listings name a special file where they meet one. Object stores (s3://, gs://) hold no special files.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore
from zarr.storage._utils import _normalize_byte_range_index

METADATA_BYTES = 64 << 20  # a zarr.json (the root's holds the attributes, skipped images included), or another file
CODEC_BYTES = 64  # what blosc (a 16-byte header on data it cannot shrink) and crc32c (4 bytes) add, and spare
STRING_BYTES = 4 + 4096  # one element of index/paths: its length, then at most PATH_MAX bytes of UTF-8
KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket"}


class StoreFileError(ValueError):
    """A file in a store that is not a regular file, or larger than its place allows: the message names it."""


def _not_regular(path: Path, mode: int | None) -> StoreFileError:
    """The error for ``path``, whose (followed) file type is ``mode`` (None: a link to nothing)."""
    kind = "nothing" if mode is None else KINDS.get(stat.S_IFMT(mode), "not a file")
    if os.path.islink(path):
        kind = f"a symbolic link to {os.readlink(path)}, {kind}"
    return StoreFileError(f"{path}: {kind}, not a regular file; a label store holds regular files only: replace "
                          "it with the file from a copy of the store, or remove it")


def read_regular(path: Path, limit: int, what: str = "its place in the store") -> bytes:
    """The bytes of ``path``, a regular file (or a link to one) of at most ``limit`` bytes (``what`` holds)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        info = os.fstat(fd)
        mode, size = info.st_mode, info.st_size
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        data = b""
        if size <= limit:
            with open(fd, "rb", closefd=False) as handle:
                # what the file holds and a byte more, to see it grow: read(limit + 1) allocated the limit at every
                # read (64 MiB a zarr.json, gigabytes an index/paths chunk at ImageNet-21k)
                data = handle.read(size + 1)
                if len(data) > size:  # it grew since fstat: read on, to one past the limit
                    data += handle.read(limit + 1 - len(data))
    finally:
        os.close(fd)
    if size > limit or len(data) > limit:
        raise StoreFileError(f"{path}: more than the {limit} bytes {what} can take; restore it from a copy of the "
                             "store")
    return data


def chunk_bytes(metadata: dict) -> int:
    """The most bytes one stored chunk of the array with this zarr.json can take: the raw chunk and the codecs."""
    kind = metadata["data_type"]
    item = STRING_BYTES if kind == "string" else np.dtype(kind).itemsize
    return CODEC_BYTES + math.prod(metadata["chunk_grid"]["configuration"]["chunk_shape"]) * item


class RegularFileStore(LocalStore):
    """zarr's LocalStore reading regular files only, each chunk bounded by its array's chunk shape and dtype."""

    def __init__(self, root: Path | str, *, read_only: bool = False):
        super().__init__(root, read_only=read_only)
        self._limits: dict[str, tuple[int, str]] = {}

    def limit(self, key: str) -> tuple[int, str]:
        """(the most bytes ``key`` may hold, what it is): a chunk by its array's schema, other files METADATA_BYTES."""
        array, separator, _ = key.rpartition("/c/")
        if not separator:
            return METADATA_BYTES, "a metadata file"
        if array not in self._limits:
            metadata = json.loads(read_regular(self.root / array / "zarr.json", METADATA_BYTES, "a metadata file"))
            self._limits[array] = chunk_bytes(metadata), f"a {array} chunk"
        return self._limits[array]

    def read(self, key: str) -> bytes:
        """The bytes under ``key`` (FileNotFoundError where there is no file); StoreFileError for a special file."""
        return read_regular(self.root / key, *self.limit(key))

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        prototype = prototype or default_buffer_prototype()
        try:
            data = prototype.buffer.from_bytes(await asyncio.to_thread(self.read, key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        start, stop = _normalize_byte_range_index(data, byte_range)
        return prototype.buffer.from_buffer(data[start:stop])

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        """The regular files under ``prefix``; a special file (or a link to one, or to nothing) is named."""
        root = self.root.as_posix() + "/"
        for path in (self.root / prefix.rstrip("/")).rglob("*"):
            if path.is_file():
                yield path.as_posix().removeprefix(root)
            elif not path.is_dir():
                raise _not_regular(path, path.stat().st_mode if path.exists() else None)
