"""Writing files so that a kill or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import errno
import glob
import os
import shutil
from pathlib import Path
from typing import Callable

_FULL_BYTES = 1 << 20  # a write that failed with less than this left free failed for want of space


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_path(path: str | os.PathLike) -> Path:
    """Where this process writes ``path`` before renaming it: beside it, hidden, named after the process.

    Those of processes that are gone (killed mid-write) are removed first, so that kills leave no debris behind.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except Exception as err:
        if getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < _FULL_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device: {path.parent} (writing {path.name}); the "
                                        "previous one is kept: free space and run again") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
