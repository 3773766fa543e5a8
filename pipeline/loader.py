"""Epoch iteration shared by both stages: a backend's batches, a producer thread ahead of the consumer, the hand-over.

The loader picks its backend once (``backends.py``: DALI's pipelined executor, torchvision
in worker processes, or PIL on threads) and runs each epoch's batches on a background
thread that fills a queue ahead of the consumer, so the model waits on neither disk nor
decoder while the queue holds batches. On a GPU the backend puts each batch on the device
on a copy stream of its own and records an event; the consumer's stream waits for that
event and the tensors are marked as used on it (``record_stream``), so the allocator never
hands their memory to the next copy while the step still reads it. Which positions an epoch
visits, in what order, is the sampler's (``sampler.py``).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mealv2.pipeline.backends import ReplayOptions, backend_for
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.decoders import INTERPOLATIONS, resolve_decoder
from mealv2.pipeline.distributed import as_device, default_workers, use_device


@dataclass
class ReplayLoader:
    """Decodes the crops (boxes, flips) of a dataset in a given order, batch by batch, on ``device``.

    After construction ``decoder`` names the decoder that runs ("auto" resolved), ``device``
    has its index and ``workers`` its count.
    """

    index: DatasetIndex
    res: int
    batch_size: int
    device: torch.device
    decoder: str = "auto"  # dali, torch, pil, or auto: the fastest here (resolve_decoder)
    interpolation: str = "bilinear"
    workers: int | None = None  # decoder threads or processes; None: this machine's CPUs per process (default_workers)
    prefetch: int = 2
    on_bad: Callable[[int, str], None] | None = None  # set: undecodable images are dropped and reported here
    hw_decoder_load: float | None = None  # DALI "mixed": the share of JPEGs for the GPU's hardware decoder

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.res < 1:
            raise ValueError(f"resolution must be at least 1, got {self.res}")
        if self.interpolation not in INTERPOLATIONS:  # checked here: a decoder's failures name a file
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}")
        self.device = as_device(self.device)
        self.workers = self.workers or default_workers()
        self.decoder = resolve_decoder(self.decoder, self.device.type, self.index.sizes)
        self._backend = backend_for(self.decoder, ReplayOptions(
            self.index, self.res, self.batch_size, self.device, self.interpolation, self.workers, self.prefetch,
            self.hw_decoder_load), self.on_bad)

    def close(self) -> None:
        """Shut down now what this loader started: DALI's pipelines and worker processes, torchvision's worker
        processes, the reader and decoder threads. Not left to the garbage collector, which may meet a dropped
        loader in a forked DataLoader worker, where DALI's threads do not exist. The loader is done after."""
        self._backend.close()

    def __enter__(self) -> ReplayLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, desc: str = "epoch",
              progress: bool = True) -> Epoch:
        """Iterate (images uint8 (B,3,res,res), indices int64), both on the device, over ``order``.

        ``boxes`` (N, 4) and ``flips`` (N,) are indexed by dataset position. One batch per
        ``batch_size`` span of ``order``, whatever ``on_bad`` left out: B is 0 where it left out all.
        """
        if len(boxes) != len(self.index) or len(flips) != len(self.index):
            raise ValueError(f"{len(boxes)} boxes and {len(flips)} flips for {len(self.index)} images")
        batches = self._backend.epoch(np.asarray(order, np.int64), boxes, flips)
        return Epoch(batches, len(order), self.prefetch, desc, progress, self.device)


class Epoch:
    """One pass: a producer thread fills a bounded queue; ``bar`` is the images/s progress bar.

    The producer decodes and copies on ``device``, which it makes its current device first
    (a new thread's is GPU 0, see distributed.use_device).
    """

    _DONE = object()

    def __init__(self, batches, total: int, prefetch: int, desc: str, progress: bool,
                 device: torch.device = torch.device("cpu")):
        self.device = device
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if progress else True,
                        dynamic_ncols=True, leave=False)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches,), daemon=True)
        self._thread.start()

    def _produce(self, batches):
        try:
            use_device(self.device)
            for batch in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self._queue.put(err)

    def __iter__(self):
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, indices, ready = item
                if ready is not None:  # on the consumer's thread: its current stream is the step's
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(ready)
                    images.record_stream(stream)
                    indices.record_stream(stream)
                self.bar.update(len(indices))
                yield images, indices
        finally:
            self.close()

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.bar.close()
