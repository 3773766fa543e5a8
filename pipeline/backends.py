"""The loader's three ways to replay an epoch, behind one protocol: ``epoch(order, boxes, flips)`` → batches, ``close()``.

``DaliBackend`` runs DALI's pipelined executor (``dali.DaliStream``) and, from a batch it
fails on, goes on batch by batch; ``WorkerBackend`` replays image by image with
torchvision in DataLoader worker processes (``worker_replay``); ``BatchBackend`` reads
each batch's files on threads one batch ahead and decodes it whole (PIL on a thread
pool, or DALI one batch at a time). Each yields (images, indices, ready) on the
loader's device through one ``HandOver``, and leaves an undecodable file to one
``BadImages`` rule: named in an error, or left out with --skip-bad (a batch whose every
file is left out is an empty batch, so that every rank counts the same batches).
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from mealv2.pipeline.dali import DaliDecoder, DaliStream
from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.pipeline.epoch_plan import read_bytes
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.pil_replay import PilDecoder
from mealv2.pipeline.spawn_guard import check_main_is_guarded
from mealv2.pipeline.worker_replay import WorkerReplay

Batch = tuple[torch.Tensor, torch.Tensor, "torch.cuda.Event | None"]  # images, dataset positions, copies' end


class Backend(Protocol):
    """One decoder's epochs. ``order``: dataset positions; ``boxes`` (N, 4) and ``flips`` (N,) by dataset position."""

    name: str  # the decoder: dali, torch or pil

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> Iterator[Batch]: ...

    def close(self) -> None: ...


@dataclass
class ReplayOptions:
    """What every backend replays with: the loader's options, checked and resolved once by the loader."""

    index: DatasetIndex
    res: int
    batch_size: int
    device: torch.device
    interpolation: str
    workers: int  # decoder threads, or torchvision's worker processes
    prefetch: int
    hw_decoder_load: float | None


class HandOver:
    """Batches put on the device. On a GPU they are allocated and copied on a copy stream of their own, and each
    batch ends with an event recorded on it, which the consumer's stream waits for (loader.Epoch)."""

    def __init__(self, device: torch.device, res: int):
        self.device, self.res = device, res
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copying(self):
        """The context in which a batch is allocated and copied: on a GPU, the copy stream made current."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def __call__(self, images: torch.Tensor | None, positions: np.ndarray) -> Batch:
        """(images, indices, ready) of a batch already on the device; called in ``copying()``. None: no images."""
        if images is None:
            images = torch.empty((0, 3, self.res, self.res), dtype=torch.uint8, device=self.device)
        indices = torch.from_numpy(np.array(positions, np.int64))
        if self.stream is None:
            return images, indices, None
        indices = indices.pin_memory().to(self.device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return images, indices, ready


@dataclass
class BadImages:
    """What happens to files a decoder cannot read: with ``on_bad`` (--skip-bad) each is reported there and left
    out; without, the first one stops the epoch with a DatasetError naming it."""

    index: DatasetIndex
    on_bad: Callable[[int, str], None] | None

    def __call__(self, failed: dict[int, str]) -> None:
        """``failed``: {dataset position: reason}."""
        for position, reason in failed.items():
            if self.on_bad is None:
                raise DatasetError(f"{self.index.file(position)}: cannot decode image ({reason}); "
                                   "--skip-bad leaves such files out")
            self.on_bad(position, reason)


class BatchBackend:
    """A batch at a time: the files of batch b+1 are read on threads while ``decoder`` decodes batch b whole.

    A batch the decoder fails on is decoded image by image to find the files it cannot
    decode, which ``bad`` names or leaves out; then the rest is decoded again.
    """

    def __init__(self, options: ReplayOptions, decoder, hand_over: HandOver, bad: BadImages):
        self.name, self.options, self.decoder = decoder.name, options, decoder
        self.hand_over, self.bad = hand_over, bad
        self._readers = ThreadPoolExecutor(max(2, 2 * options.workers))

    def close(self) -> None:
        self.decoder.close()
        self._readers.shutdown()

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> Iterator[Batch]:
        size, index = self.options.batch_size, self.options.index
        spans = [order[s:s + size] for s in range(0, len(order), size)]

        def read(span):
            return [self._readers.submit(read_bytes, index.file(int(i))) for i in span]

        pending = read(spans[0]) if spans else []
        for b, span in enumerate(spans):
            encoded = [f.result() for f in pending]
            pending = read(spans[b + 1]) if b + 1 < len(spans) else []
            yield self._decoded(span, boxes, flips, encoded)

    def decode(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, encoded: list[np.ndarray]) -> Batch:
        """One batch on the device, as the decoder gives it (its failure raised as it comes)."""
        with self.hand_over.copying():
            return self.hand_over(self.decoder.decode(encoded, boxes[order], flips[order]), order)

    def _decoded(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, encoded: list[np.ndarray]) -> Batch:
        """One batch on the device, less the files ``bad`` leaves out (an empty batch when none is left)."""
        try:
            return self.decode(order, boxes, flips, encoded)
        except DatasetError:
            raise
        except Exception as err:  # noqa: BLE001 - turned into an error naming the culprit file
            failed = self._undecodable(order, boxes, flips, encoded)
            if not failed:
                raise RuntimeError(f"decoder failed on a batch no single file explains: {err}") from err
            self.bad({int(order[j]): reason for j, reason in failed.items()})
            keep = [j for j in range(len(order)) if j not in failed]
            if not keep:
                with self.hand_over.copying():
                    return self.hand_over(None, order[:0])
            return self.decode(order[keep], boxes, flips, [encoded[j] for j in keep])

    def _undecodable(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                     encoded: list[np.ndarray]) -> dict[int, str]:
        """{place in the batch: reason} of the images this very decoder fails on, one at a time."""
        failed = {}
        for j, i in enumerate(order):
            try:
                self.decoder.decode([encoded[j]], boxes[[i]], flips[[i]])
            except Exception as err:  # noqa: BLE001 - any failure on a lone image is that image's
                failed[j] = first_line(err, 200)
        return failed


class WorkerBackend:
    """torchvision's epochs: image by image in persistent DataLoader worker processes, batches in order.

    The processes start with the first epoch; later epochs hand the same processes their plans.
    """

    name = "torch"

    def __init__(self, options: ReplayOptions, hand_over: HandOver, bad: BadImages):
        self.options, self.hand_over, self.bad = options, hand_over, bad
        self._replay: WorkerReplay | None = None

    def close(self) -> None:
        if self._replay is not None:
            self._replay.close()
        self._replay = None

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> Iterator[Batch]:
        o = self.options
        if self._replay is None:
            self._replay = WorkerReplay(o.index, o.res, o.interpolation, self.name, o.batch_size, o.workers,
                                        pin_memory=self.hand_over.stream is not None)
        for images, positions, failed in self._replay.batches(order, boxes, flips):
            self.bad(failed)
            with self.hand_over.copying():
                yield self.hand_over(None if images is None else images.to(o.device, non_blocking=True), positions)


class DaliBackend:
    """DALI's epochs on its pipelined executor; from a batch it fails on, batch by batch (which names the file).

    Only a file explains such a failure: if the batch-at-a-time decoder decodes the batches
    that were in flight, the pipelined path itself cannot run here, and that is the error.
    """

    name = "dali"

    def __init__(self, options: ReplayOptions, hand_over: HandOver, bad: BadImages):
        check_main_is_guarded("a DALI loader")
        o = self.options = options
        self.hand_over, self.bad = hand_over, bad
        self.stream = DaliStream(o.index, o.res, o.interpolation, o.batch_size, o.device, o.workers,
                                 o.hw_decoder_load, o.prefetch)
        self._fallback: BatchBackend | None = None

    @property
    def fallback(self) -> BatchBackend:
        """DALI a batch at a time, made the first time a pipelined epoch fails."""
        if self._fallback is None:
            o = self.options
            decoder = DaliDecoder(o.res, o.interpolation, o.batch_size, o.device, o.workers, o.hw_decoder_load)
            self._fallback = BatchBackend(o, decoder, self.hand_over, self.bad)
        return self._fallback

    def close(self) -> None:
        self.stream.close()
        if self._fallback is not None:
            self._fallback.close()
        self._fallback = None

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> Iterator[Batch]:
        delivered = 0
        try:
            with self.hand_over.copying():
                for images, positions in self.stream.epoch(order, boxes, flips, self.hand_over.stream):
                    delivered += len(positions)
                    yield self.hand_over(images, positions.numpy())
        except Exception as err:  # noqa: BLE001 - a bad file goes on batch by batch below, anything else re-raises
            rest = order[delivered:]
            if not self._fails_on_a_file(rest[:(self.stream.prefetch + 1) * self.options.batch_size], boxes, flips):
                raise RuntimeError(f"DALI's pipelined executor failed on batches that decode one at a time: "
                                   f"{first_line(err, 200)}") from err
            warnings.warn(f"DALI's pipelined epoch stopped after {delivered} images ({first_line(err, 200)}); "
                          "going on batch by batch", RuntimeWarning, stacklevel=2)
            yield from self.fallback.epoch(rest, boxes, flips)

    def _fails_on_a_file(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> bool:
        """Whether the batch-at-a-time decoder fails on a batch of ``order`` (a file it cannot read raises here)."""
        size, index = self.options.batch_size, self.options.index
        for start in range(0, len(order), size):
            span = order[start:start + size]
            try:
                self.fallback.decode(span, boxes, flips, [read_bytes(index.file(int(i))) for i in span])
            except DatasetError:
                raise
            except Exception:  # noqa: BLE001 - any decoder failure is a file's, found out batch by batch
                return True
        return False


def backend_for(decoder: str, options: ReplayOptions, on_bad: Callable[[int, str], None] | None) -> Backend:
    """The backend of ``decoder`` (dali, torch or pil, already resolved), with one hand-over and one bad-file rule."""
    hand_over, bad = HandOver(options.device, options.res), BadImages(options.index, on_bad)
    if decoder == "dali":
        return DaliBackend(options, hand_over, bad)
    if decoder == "torch":
        return WorkerBackend(options, hand_over, bad)
    o = options
    return BatchBackend(options, PilDecoder(o.res, o.interpolation, o.device, o.workers), hand_over, bad)
