"""Epoch iteration shared by both stages: order → file reads (threads) → replay decode → device batches.

A background thread reads and decodes ahead of the consumer, so the model waits on
neither disk nor decoder while the queue holds batches.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.dali import DALI_AVAILABLE, DaliDecoder
from pipeline.dataset import DatasetError, DatasetIndex
from pipeline.reference import PilDecoder, replay_pil

DECODERS = ("auto", "dali", "pil")


def epoch_order(num_images: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """This rank's dataset indices for one epoch.

    Shuffled by (seed, epoch) when asked; split across ranks round-robin. With more than
    one rank the order is padded by wrapping so every rank gets the same count (and thus
    the same number of steps); with one rank every image comes exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    order = np.arange(num_images, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(order)
    per_rank = -(-num_images // world_size)
    if per_rank * world_size > num_images:
        order = np.resize(order, per_rank * world_size)  # wraps around, like DistributedSampler
    return order[rank::world_size]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" → this process's CUDA device when there is one, else the CPU; "cuda" → cuda:LOCAL_RANK.

    Under torchrun each process on a machine takes the GPU of its local rank; an explicit
    "cuda:N" is taken as given.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def make_decoder(kind: str, res: int, interpolation: str, batch_size: int, device: torch.device,
                 threads: int):
    """DALI when asked or available ("auto"); PIL otherwise."""
    if kind not in DECODERS:
        raise ValueError(f"decoder {kind!r}: expected one of {DECODERS}")
    if kind == "dali" or (kind == "auto" and DALI_AVAILABLE):
        return DaliDecoder(res, interpolation, batch_size, device, threads)
    return PilDecoder(res, interpolation, threads)


def _read_bytes(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from None


def _name_bad_file(index: DatasetIndex, encoded, boxes, flips, positions, error: Exception):
    """A decoder failed on a batch: find the file PIL cannot decode either and name it."""
    for data, box, flip, i in zip(encoded, boxes, flips, positions):
        try:
            replay_pil(data, box, bool(flip), 8)
        except Exception as err:  # noqa: BLE001 - any decoder failure is reported against the file
            return DatasetError(f"{index.file(int(i))}: cannot decode image ({err})")
    return RuntimeError(f"decoder failed on a batch no single file explains: {error}")


@dataclass
class ReplayLoader:
    """Decodes the crops (boxes, flips) of a dataset in a given order, batch by batch, on ``device``."""

    index: DatasetIndex
    res: int
    batch_size: int
    device: torch.device
    decoder: str = "auto"
    interpolation: str = "bilinear"
    workers: int = 2
    prefetch: int = 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.res < 1:
            raise ValueError(f"resolution must be at least 1, got {self.res}")
        self.device = torch.device(self.device)
        self._decoder = make_decoder(self.decoder, self.res, self.interpolation, self.batch_size,
                                     self.device, self.workers)
        self._readers = ThreadPoolExecutor(max(2, 2 * self.workers))

    @property
    def decoder_name(self) -> str:
        return self._decoder.name

    def _decode(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, encoded: list[np.ndarray]):
        box, flip = boxes[order], flips[order]
        try:
            if isinstance(self._decoder, PilDecoder):
                images = torch.from_numpy(self._decoder.decode(encoded, box, flip))
                pin = self.device.type == "cuda"
                images = (images.pin_memory() if pin else images).to(self.device, non_blocking=pin)
                return images, torch.from_numpy(order.copy())
            return self._decoder.decode(encoded, box, flip, order)
        except DatasetError:
            raise
        except Exception as err:  # noqa: BLE001 - turned into an error naming the culprit file
            raise _name_bad_file(self.index, encoded, box, flip, order, err) from err

    def _batches(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
        """Yield decoded batches; the reads of batch b+1 run while batch b decodes."""
        spans = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def read(span):
            return [self._readers.submit(_read_bytes, self.index.file(int(i))) for i in span]

        pending = read(spans[0]) if spans else []
        for b, span in enumerate(spans):
            encoded = [f.result() for f in pending]
            pending = read(spans[b + 1]) if b + 1 < len(spans) else []
            yield self._decode(span, boxes, flips, encoded)

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, desc: str = "epoch",
              progress: bool = True) -> Epoch:
        """Iterate (images uint8 (B,3,res,res) on device, indices int64) over ``order``.

        ``boxes`` (N, 4) and ``flips`` (N,) are indexed by dataset position.
        """
        if len(boxes) != len(self.index) or len(flips) != len(self.index):
            raise ValueError(f"{len(boxes)} boxes and {len(flips)} flips for {len(self.index)} images")
        return Epoch(self._batches(np.asarray(order, np.int64), boxes, flips), len(order), self.prefetch,
                     desc, progress)


class Epoch:
    """One pass: a producer thread fills a bounded queue; ``bar`` is the images/s progress bar."""

    _DONE = object()

    def __init__(self, batches, total: int, prefetch: int, desc: str, progress: bool):
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if progress else True,
                        dynamic_ncols=True, leave=False)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches,), daemon=True)
        self._thread.start()

    def _produce(self, batches):
        try:
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
                self.bar.update(len(item[1]))
                yield item
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
