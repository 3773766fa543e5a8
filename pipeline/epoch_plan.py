"""Epoch plans and the per-batch source DALI's Python workers run on them (numpy only: workers never import torch).

The loader writes each epoch's plan (dataset positions in the epoch's order, with their
boxes and flips) into a folder before DALI runs that epoch. ``PlanSource`` is the
stateless callable DALI's parallel ``external_source`` wants: given (epoch, iteration) it
maps that epoch's plan and the index's paths (written into the folder once), reads the
batch's files and returns them with the graph's inputs, so any worker can compute any
batch, several batches ahead of the training step.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mealv2.pipeline.dataset import DatasetError, DatasetIndex, PackedStrings, safe_join
from mealv2.pipeline.locks import create_locked, remove_unheld

PLAN_DTYPE = np.dtype([("index", np.int64), ("box", np.int32, (4,)), ("flip", np.bool_)])
PLANS_PREFIX = "mealv2-plans-"  # a plan folder in the temporary folder: mealv2-plans-PID-random
_OWNER = "owner.lock"  # in a plan folder: locked by the process it belongs to while that lives
_PATHS = ("paths.npy", "path-ends.npy")  # in a plan folder: the index's packed paths (PackedStrings data, ends)


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as uint8; DatasetError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from None


def replay_inputs(boxes: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, ...]:
    """The graph's per-image inputs: ROI anchor and shape (H, W order) and the resize's relative region.

    A region from x = 1 to x = 0 samples the crop mirrored, so the flip costs no pass of its own.
    """
    boxes = np.ascontiguousarray(boxes, dtype=np.int32).reshape(-1, 4)
    mirrored = np.asarray(flips, dtype=np.float32).reshape(-1)
    roi_start = np.stack([np.zeros_like(mirrored), mirrored], axis=1)
    roi_end = np.stack([np.ones_like(mirrored), 1 - mirrored], axis=1)
    return boxes[:, :2].copy(), boxes[:, 2:].copy(), roi_start, roi_end


def _exit_with_parent(parent: int, folder: str, every: float = 1.0) -> None:
    """Exit this worker once ``parent`` (the process that pickled its source) is no longer its parent, at once if it
    never was here: DALI's workers outlive a parent killed by a signal otherwise, holding its stdout.

    The parent's plan folder goes too: a killed parent never ran the cleanup that removes it.
    """
    while os.getppid() == parent:
        time.sleep(every)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


class PlanFolder:
    """The temporary folder of one stream's epoch plans, named after its process, which holds the folder's lock
    (flock) while it lives. Folders whose lock no process holds (theirs was killed before it or its workers could
    remove them) are removed when the next one is made, on this machine, whichever PID namespace made them."""

    def __init__(self):
        for stale in Path(tempfile.gettempdir()).glob(f"{PLANS_PREFIX}*"):
            remove_unheld(stale / _OWNER, functools.partial(shutil.rmtree, stale))
        lock = None
        while lock is None:  # None: a sweep met the new folder in the instant before its lock was taken
            self.name = tempfile.mkdtemp(prefix=f"{PLANS_PREFIX}{os.getpid()}-")
            lock = create_locked(Path(self.name) / _OWNER)
        self.cleanup = weakref.finalize(self, _remove_folder, self.name, lock)  # at the latest when the stream goes


def _remove_folder(folder: str, lock: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(lock)


def plan_path(folder: str | os.PathLike, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch}.npy"


def write_plan(folder: str | os.PathLike, epoch: int, order: np.ndarray, boxes: np.ndarray,
               flips: np.ndarray) -> None:
    """Write epoch ``epoch``'s plan; ``boxes`` and ``flips`` are indexed by dataset position."""
    plan = np.empty(len(order), PLAN_DTYPE)
    plan["index"], plan["box"], plan["flip"] = order, boxes[order], flips[order]
    tmp = Path(folder) / f".epoch-{epoch}.tmp"
    with open(tmp, "wb") as handle:
        np.save(handle, plan)
    os.replace(tmp, plan_path(folder, epoch))  # a worker never maps a half-written plan


def write_paths(folder: str | os.PathLike, paths: PackedStrings) -> None:
    """Write an index's packed paths into a plan folder once, as the two .npy files ``mapped_paths`` maps."""
    for name, values in zip(_PATHS, (paths.data, paths.ends)):
        np.save(Path(folder) / name, values)


def mapped_paths(folder: str | os.PathLike) -> PackedStrings:
    """The paths ``write_paths`` wrote, memory-mapped: the page cache holds them once for every worker that reads."""
    return PackedStrings(*(np.load(Path(folder) / name, mmap_mode="r") for name in _PATHS))


class PlanSource:
    """Per-batch source for DALI's parallel external_source, keyed by ``BatchInfo`` (epoch, iteration).

    Returns (encoded bytes, anchors, shapes, roi starts, roi ends, dataset positions) of one
    batch, the last one of an epoch possibly short; raises StopIteration past the end, as
    often as asked (DALI prefetches beyond it). Files are read by a few threads per worker.
    The index's paths are written into the plan folder once and mapped by each worker, so a
    worker receives only the split's root and the folder, whatever the size of the index.
    """

    def __init__(self, index: DatasetIndex, folder: str | os.PathLike, batch_size: int, read_threads: int = 4):
        write_paths(folder, index.paths)
        self.root = index.root
        self.folder = str(folder)
        self.batch_size = batch_size
        self.read_threads = read_threads
        self._paths = None
        self._plans: dict[int, np.ndarray] = {}
        self._reader = None

    def __getstate__(self):
        """Pickled for DALI's workers by the process that starts them: their parent, whose pid goes with it."""
        return {**self.__dict__, "_paths": None, "_plans": {}, "_reader": None, "_parent": os.getpid()}

    def __setstate__(self, state):
        """Unpickled in a DALI worker: leave with the process that spawned it, tidying up; at once if it was killed
        before this worker got here (the first of our code a worker runs: it waits on the parent for nothing before).

        Not PR_SET_PDEATHSIG: its "parent" is the thread that started the worker, and the loader's threads that
        build DALI's pipelines end with their epoch, which would kill the workers of a live stream.
        """
        self.__dict__.update(state)
        if multiprocessing.parent_process() is not None:
            threading.Thread(target=_exit_with_parent, args=(self._parent, self.folder), daemon=True).start()

    def _plan(self, epoch: int) -> np.ndarray:
        if epoch not in self._plans:
            self._plans = {epoch: np.load(plan_path(self.folder, epoch), mmap_mode="r")}
        return self._plans[epoch]

    def __call__(self, info) -> tuple:
        plan = self._plan(info.epoch_idx)
        start = info.iteration * self.batch_size
        if start >= len(plan):
            raise StopIteration
        rows = np.asarray(plan[start:start + self.batch_size])
        if self._paths is None:
            self._paths = mapped_paths(self.folder)
            self._reader = ThreadPoolExecutor(max(1, self.read_threads))
        files = (safe_join(self.root, self._paths[int(i)]) for i in rows["index"])
        encoded = list(self._reader.map(read_bytes, files))
        return (encoded, *replay_inputs(rows["box"], rows["flip"]), rows["index"].copy())
