"""Locks the kernel releases when their holder dies: an exclusive ``flock`` on a local file (as ``filelock`` takes).

A pid written in a file says nothing about its process from another PID namespace on the same host (a
container, ``unshare --pid``): there a live holder's pid names no process, or another one. A flock belongs to
an open file description, and the kernel drops it when the last process holding that description ends,
however it ends, whichever namespace it ran in. Holders remove their lock file before they let go of it, so a
lock taken on a file that is no longer at its path is dropped and taken again on the one there.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable


def _on_path(fd: int, path: str | os.PathLike) -> bool:
    """Whether the file open as ``fd`` is still the one at ``path`` (not removed, not replaced)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _flock(fd: int, path: str | os.PathLike, wait: bool) -> bool:
    """Take the exclusive flock on ``fd`` (waiting for it when ``wait``); False while another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as err:
        raise OSError(err.errno, f"{path}: this filesystem refuses file locks (flock: {err.strerror}); mealv2 keeps "
                                 "concurrent jobs apart with them: use a local or NFSv4 folder") from None
    return True


def _open(path: str | os.PathLike, create: bool) -> int:
    """``path`` opened to be locked: for writing where this user may (a claim names its holder in it), else read-only
    (another user's claim file, a sweep's candidate: a flock needs no more)."""
    if create:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            if not os.path.lexists(path):
                raise  # a folder this user may not write in
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def try_lock(path: str | os.PathLike, create: bool = False) -> int | None:
    """A descriptor holding the exclusive flock on the file at ``path`` (made there when missing, with ``create``);
    None while another process holds it, or when there is no such file. Closing the descriptor lets go."""
    while True:
        try:
            fd = _open(path, create)
        except FileNotFoundError:
            return None
        try:
            if not _flock(fd, path, wait=False):
                os.close(fd)
                return None
        except BaseException:
            os.close(fd)
            raise
        if _on_path(fd, path):
            return fd
        os.close(fd)  # its holder removed it after use
        if not create:
            return None


def create_locked(path: str | os.PathLike) -> int | None:
    """A new file at ``path`` (FileExistsError if one is there), locked from its first moment on: the descriptor, or
    None when a sweep (remove_unheld) removed it in the instant between its creation and its lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _flock(fd, path, wait=True)  # a sweeper that got there first lets go at once
    except BaseException:
        os.close(fd)
        raise
    if _on_path(fd, path):
        return fd
    os.close(fd)
    return None


def remove_unheld(lock: Path, remove: Callable[[], object]) -> None:
    """Call ``remove()`` (debris of a killed process) if no live process holds ``lock``'s flock; best effort: what
    cannot be told or removed is left."""
    try:
        fd = try_lock(lock)
    except OSError:
        return
    if fd is None:
        return
    try:
        remove()
    except OSError:
        pass
    finally:
        os.close(fd)
