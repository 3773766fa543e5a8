"""Epoch iteration shared by both stages: order → file reads → replay decode → device batches.

With DALI, epochs run on its asynchronous pipelined executor (``DaliStream``: worker
processes read the files of the batches ahead while DALI decodes); with torchvision,
torch's DataLoader replays image by image in worker processes (``worker_replay``); with
PIL, reader threads fetch batch b+1 while a thread pool decodes batch b. Either way a background
thread fills a queue ahead of the consumer, so the model waits on neither disk nor
decoder while the queue holds batches. On a GPU the producer puts each
batch on the device on a copy stream of its own and records an event; the consumer's
stream waits for that event and the tensors are marked as used on it (``record_stream``),
so the allocator never hands their memory to the next copy while the step still reads it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mealv2.pipeline.dali import DaliDecoder, DaliStream
from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.pipeline.decoders import INTERPOLATIONS, resolve_decoder
from mealv2.pipeline.distributed import as_device, default_workers, use_device
from mealv2.pipeline.epoch_plan import read_bytes
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.mix import SlotMix
from mealv2.pipeline.pil_replay import PilDecoder
from mealv2.pipeline.spawn_guard import check_main_is_guarded
from mealv2.pipeline.torch_replay import TorchDecoder
from mealv2.pipeline.worker_replay import WorkerReplay

def epoch_order(images: int | np.ndarray, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, mix: SlotMix | None = None) -> np.ndarray:
    """This rank's dataset indices for one epoch, of ``images`` (a count, or the positions to train on).

    Shuffled by (seed, epoch) when asked; split across ranks round-robin. With more than
    one rank the order is padded by wrapping so every rank gets the same count (and thus
    the same number of steps); with one rank every image comes exactly once. With ``mix``
    the images go two by two (each CutMix pair whole, SlotMix.groups), so that batches of
    an even size hold whole pairs; a last image without a companion comes last.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    order = np.arange(images, dtype=np.int64) if np.ndim(images) == 0 else np.asarray(images, np.int64)
    units = order[:, None] if mix is None else mix.groups(order)  # rows of images that stay together
    if shuffle:
        units = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(units)
    per_rank = -(-len(units) // world_size)
    if per_rank * world_size > len(units):
        units = np.resize(units, (per_rank * world_size, units.shape[1]))  # wraps around, like DistributedSampler
    mine = units[rank::world_size]
    mine = mine[np.argsort((mine < 0).any(axis=1), kind="stable")]  # the companionless row last
    return mine[mine >= 0]


@dataclass
class ReplayLoader:
    """Decodes the crops (boxes, flips) of a dataset in a given order, batch by batch, on ``device``."""

    index: DatasetIndex
    res: int
    batch_size: int
    device: torch.device
    decoder: str = "auto"  # dali, torch, pil, or auto: the fastest here (resolve_decoder)
    interpolation: str = "bilinear"
    workers: int | None = None  # decoder threads; None: this machine's CPUs per process (default_workers)
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
        self.decoder_name = resolve_decoder(self.decoder, self.device.type, self.index.sizes)
        self._stream = None
        if self.decoder_name == "dali":
            check_main_is_guarded("a DALI loader")
            self._stream = DaliStream(self.index, self.res, self.interpolation, self.batch_size, self.device,
                                      self.workers, self.hw_decoder_load, self.prefetch)
        self._workers = None  # torchvision's worker processes, started with the first epoch
        self._batch_decoder = None  # made when first needed: PIL's epochs, or one DALI batch gone wrong
        self._readers = ThreadPoolExecutor(max(2, 2 * self.workers))
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        """Shut down now what this loader started: DALI's pipelines and worker processes, torchvision's worker
        processes, the reader and decoder threads. Not left to the garbage collector, which may meet a dropped
        loader in a forked DataLoader worker, where DALI's threads do not exist. The loader is done after."""
        for part in (self._stream, self._workers, self._batch_decoder):
            if part is not None:
                part.close()
        self._stream = self._workers = self._batch_decoder = None
        self._readers.shutdown()

    def __enter__(self) -> ReplayLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _decoder(self):
        """The batch-at-a-time decoder of this loader's kind."""
        if self._batch_decoder is None:
            if self.decoder_name == "dali":
                self._batch_decoder = DaliDecoder(self.res, self.interpolation, self.batch_size, self.device,
                                                  self.workers, self.hw_decoder_load)
            else:
                kind = PilDecoder if self.decoder_name == "pil" else TorchDecoder
                self._batch_decoder = kind(self.res, self.interpolation, self.device, self.workers)
        return self._batch_decoder

    def _decode(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, encoded: list[np.ndarray]):
        """(images, indices, ready): the batch on the device and, on a GPU, the event its copies end with.

        A batch the decoder fails on is decoded again without its undecodable images when
        ``on_bad`` is set (an empty batch when none is left, so that every rank counts the
        same batches); otherwise the error names the first one.
        """
        try:
            return self._to_device(order, boxes, flips, encoded)
        except DatasetError:
            raise
        except Exception as err:  # noqa: BLE001 - turned into an error naming the culprit file
            bad = self._undecodable(order, boxes, flips, encoded)
            if not bad:
                raise RuntimeError(f"decoder failed on a batch no single file explains: {err}") from err
            if self.on_bad is None:
                first = next(iter(bad))
                raise DatasetError(f"{self.index.file(int(order[first]))}: cannot decode image ({bad[first]}); "
                                   "--skip-bad leaves such files out") from None
            for j, reason in bad.items():
                self.on_bad(int(order[j]), reason)
            keep = [j for j in range(len(order)) if j not in bad]
            if not keep:
                with self._on_copy_stream():
                    return self._handed_over(self._no_images(), order[:0])
            return self._to_device(order[keep], boxes, flips, [encoded[j] for j in keep])

    def _no_images(self) -> torch.Tensor:
        """The images of a batch whose every file was left out: none, in the batches' shape, on the device."""
        return torch.empty((0, 3, self.res, self.res), dtype=torch.uint8, device=self.device)

    def _on_copy_stream(self):
        """On a GPU, the context that makes the copy stream current (batches are allocated and copied on it)."""
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()

    def _to_device(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, encoded: list[np.ndarray]):
        with self._on_copy_stream():
            return self._handed_over(self._decoder.decode(encoded, boxes[order], flips[order]), order)

    def _handed_over(self, images: torch.Tensor, order: np.ndarray):
        """(images, indices, ready): on a GPU, called on the copy stream; its event ``ready`` ends the batch's copies."""
        indices = torch.from_numpy(np.array(order, np.int64))
        if self._copy_stream is None:
            return images, indices, None
        indices = indices.pin_memory().to(self.device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(self._copy_stream)
        return images, indices, ready

    def _undecodable(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                     encoded: list[np.ndarray]) -> dict[int, str]:
        """{position in the batch: reason} of the images this very decoder fails on, one at a time."""
        bad = {}
        for j, i in enumerate(order):
            try:
                self._decoder.decode([encoded[j]], boxes[[i]], flips[[i]])
            except Exception as err:  # noqa: BLE001 - any failure on a lone image is that image's
                bad[j] = first_line(err, 200)
        return bad

    def _streamed(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
        """Yield DALI's pipelined batches; from a batch it fails on, go on batch by batch (which names the file).

        Only a file explains such a failure: if the batch-at-a-time decoder decodes the batches
        that were in flight, the pipelined path itself cannot run here, and that is the error.
        """
        delivered = 0
        try:
            with self._on_copy_stream():
                for images, positions in self._stream.epoch(order, boxes, flips, self._copy_stream):
                    delivered += len(positions)
                    yield self._handed_over(images, positions.numpy())
        except Exception as err:  # noqa: BLE001 - a bad file goes on batch by batch below, anything else re-raises
            rest = order[delivered:]
            if not self._fails_on_a_file(rest[:(self._stream.prefetch + 1) * self.batch_size], boxes, flips):
                raise RuntimeError(f"DALI's pipelined executor failed on batches that decode one at a time: "
                                   f"{first_line(err, 200)}") from err
            warnings.warn(f"DALI's pipelined epoch stopped after {delivered} images ({first_line(err, 200)}); "
                          "going on batch by batch", RuntimeWarning, stacklevel=2)
            yield from self._batches(rest, boxes, flips)

    def _fails_on_a_file(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> bool:
        """Whether the batch-at-a-time decoder fails on a batch of ``order`` (a file it cannot read raises here)."""
        for start in range(0, len(order), self.batch_size):
            span = order[start:start + self.batch_size]
            try:
                self._to_device(span, boxes, flips, [read_bytes(self.index.file(int(i))) for i in span])
            except DatasetError:
                raise
            except Exception:  # noqa: BLE001 - any decoder failure is a file's, found out batch by batch
                return True
        return False

    def _planned(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
        """torchvision's epochs: image by image in worker processes (torch's DataLoader), batches in order."""
        if self._workers is None:  # started once: later epochs hand the same processes their plans
            self._workers = WorkerReplay(self.index, self.res, self.interpolation, self.decoder_name,
                                         self.batch_size, self.workers, pin_memory=self._copy_stream is not None)
        for images, positions, failed in self._workers.batches(order, boxes, flips):
            for position, reason in failed.items():
                if self.on_bad is None:
                    raise DatasetError(f"{self.index.file(position)}: cannot decode image ({reason}); "
                                       "--skip-bad leaves such files out")
                self.on_bad(position, reason)
            with self._on_copy_stream():
                images = self._no_images() if images is None else images.to(self.device, non_blocking=True)
                yield self._handed_over(images, positions)

    def _batches(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
        """Yield decoded batches one at a time; the reads of batch b+1 run while batch b decodes."""
        spans = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def read(span):
            return [self._readers.submit(read_bytes, self.index.file(int(i))) for i in span]

        pending = read(spans[0]) if spans else []
        for b, span in enumerate(spans):
            encoded = [f.result() for f in pending]
            pending = read(spans[b + 1]) if b + 1 < len(spans) else []
            yield self._decode(span, boxes, flips, encoded)

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, desc: str = "epoch",
              progress: bool = True) -> Epoch:
        """Iterate (images uint8 (B,3,res,res), indices int64), both on the device, over ``order``.

        ``boxes`` (N, 4) and ``flips`` (N,) are indexed by dataset position. One batch per
        ``batch_size`` span of ``order``, whatever ``on_bad`` left out: B is 0 where it left out all.
        """
        if len(boxes) != len(self.index) or len(flips) != len(self.index):
            raise ValueError(f"{len(boxes)} boxes and {len(flips)} flips for {len(self.index)} images")
        order = np.asarray(order, np.int64)
        if self._stream is not None:
            batches = self._streamed(order, boxes, flips)
        elif self.decoder_name == "torch":
            batches = self._planned(order, boxes, flips)
        else:
            batches = self._batches(order, boxes, flips)
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
                    stream = torch.cuda.current_stream(images.device)
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
