"""`labels pack`: a complete store copied into one read-only zip that teammates open as ``zip::OUT``."""

from __future__ import annotations

import errno
import os
import zipfile

import fsspec

from mealv2.pipeline.files import temporary_file
from mealv2.softlabels.integrity import missing_chunks
from mealv2.softlabels.schema import StoreError
from mealv2.softlabels.store import LabelStore
from mealv2.softlabels.store_files import RegularFileStore


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


def pack(store: LabelStore, out: str | os.PathLike) -> int:
    """Copy a complete store into one zip (entries stored: chunks are compressed already); returns its bytes.

    Readers open the result as ``zip::OUT.zip``; the zip is written to a temporary name
    and linked into place, so a failed pack leaves nothing behind and an existing OUT is
    never replaced. A symbolic link inside a local store is refused: packing would copy
    what it points to, outside the store.
    """
    if not store.marked_complete:
        raise StoreError(f"{store.url}: store is incomplete; finish cache-teachers (or labels finalize) first")
    fs, root = fsspec.core.url_to_fs(store.url, **store.storage_options)
    root = root.rstrip("/")
    out = os.fspath(out)
    with temporary_file(out) as tmp:  # and a killed pack's temporary is removed
        if os.path.lexists(out):
            raise StoreError(f"{out}: exists already; nothing was changed: pack into a new file")
        missing = missing_chunks(store)
        if missing:
            raise StoreError(f"{store.url}: {missing[0]}; nothing was packed: `mealv2 labels verify {store.url}`")
        if "file" in fs.protocol:
            links = [os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files
                     if os.path.islink(os.path.join(folder, name))]
            if links:
                raise StoreError(f"{links[0]}: a symbolic link inside the store; nothing was packed: replace it "
                                 "with the file itself (packing copies files, and would copy what it points to)")
        local = store.group.store if isinstance(store.group.store, RegularFileStore) else None
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(fs.find(root)):  # a local store's files regular and bounded (a FIFO never ends)
                key = path[len(root) + 1:]
                archive.writestr(key, local.read(key) if local else fs.cat_file(path))
        _place_without_replacing(os.fspath(tmp), out)
    return os.path.getsize(out)
