"""Writing files so that a kill or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from mealv2.pipeline.locks import create_locked, remove_unheld

_FULL_BYTES = 1 << 20  # a write that failed with less than this left free failed for want of space


@contextlib.contextmanager
def temporary_file(path: str | os.PathLike) -> Iterator[Path]:
    """A new file beside ``path`` for this process to write before it is renamed: hidden, named after the process
    (and a random part: pids repeat across PID namespaces), locked (flock) while it exists, removed at the end.

    Temporaries beside it that no live process holds locked (their writer was killed mid-write) are removed
    first, so that kills leave no debris behind; the lock, not the pid, tells, so a writer in another
    container's PID namespace never loses its temporary to a sweep.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        remove_unheld(stale, stale.unlink)
    fd = None
    while fd is None:  # None: a sweep took the new file before it was locked
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        fd = create_locked(tmp)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)  # before the lock goes: no sweep meets it unlocked
        os.close(fd)


def new_file_mode() -> int:
    """The mode open() gives a new file here: 0o666 less the umask (read without setting it, where Linux says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    A failed write (a full disk, say) leaves the old file and no debris; a full disk is said so,
    naming the folder, whatever the writer raised (torch and safetensors name no file). The temporary
    name carries the process id, so processes writing the same path at once never share one. The file
    gets the mode the user's umask gives every new file (safetensors writes its own as 0600).
    """
    path = Path(path)
    try:
        with temporary_file(path) as tmp:
            write(tmp)
            os.chmod(tmp, new_file_mode())
            os.replace(tmp, path)
    except Exception as err:
        if getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < _FULL_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device: {path.parent} (writing {path.name}); the "
                                        "previous one is kept: free space and run again") from err
        raise
