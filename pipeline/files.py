"""Writing files so that a kill or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

_FULL_BYTES = 1 << 20  # a write that failed with less than this left free failed for want of space


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    A failed write (a full disk, say) leaves the old file and no debris; a full disk is said so,
    naming the folder, whatever the writer raised (torch and safetensors name no file). The temporary
    name carries the process id, so processes writing the same path at once never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < _FULL_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device: {path.parent} (writing {path.name}); the "
                                        "previous one is kept: free space and run again") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
