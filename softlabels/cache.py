"""The cache-teachers job: (seed slot, chunk) units → replayed crops → teacher ensemble → top-k → store."""

from __future__ import annotations

import datetime
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mealv2.pipeline.composites import DeviceMix
from mealv2.pipeline.dataset import load_index
from mealv2.pipeline.distributed import setup, use_device
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.mix import SlotMix
from mealv2.pipeline.progress import ProgressLines
from mealv2.pipeline.provenance import provenance
from mealv2.softlabels.cache_config import CacheJob
from mealv2.softlabels.schema import class_dtype, label_spec
from mealv2.softlabels.store import SlotLabels, open_store
from mealv2.softlabels.teachers import TeacherEnsemble, TeacherError, parse_teachers
from mealv2.softlabels.topk import compress
from mealv2.softlabels.writer import StoreWriter


def to_host(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Queue the copies of ``tensors`` (on ``device``) to the host; returns the host tensors and a call that
    waits until they have landed.

    On a GPU the copies go to pinned memory without waiting, on ``device``'s current stream,
    so the event that ends them is recorded on that stream, not the thread's current
    device's (which is GPU 0 with ``--device cuda:1`` and no torchrun).
    """
    if device.type != "cuda":
        return [t.cpu() for t in tensors], lambda: None
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    return host, copied.synchronize


def fixed_batches(batches, size: int):
    """Regroup (images, indices) batches of any sizes into batches of exactly ``size`` rows: (images, indices, n).

    The last is padded with zero rows after its ``n`` real ones, so the teachers see a single
    shape (cuDNN autotunes once, not at every new size that CutMix's partners or --skip-bad make).
    """
    def joined():
        return (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*held))  # no copy of a whole one

    held, count = [], 0
    for images, indices in batches:
        held.append((images, indices))
        count += len(indices)
        while count >= size:
            images, indices = joined()
            held = [(images[size:], indices[size:])]
            count -= size
            yield images[:size], indices[:size], size
    if count:
        images, indices = joined()
        yield torch.cat([images, images.new_zeros((size - count, *images.shape[1:]))]), indices, count


def label_unit(ensemble: TeacherEnsemble, loader: ReplayLoader, slot: int, rows: slice, boxes: np.ndarray,
               flips: np.ndarray, mix: SlotMix | None, topk: int, bar: tqdm) -> Callable[[], SlotLabels]:
    """Queue the teachers on seed slot ``slot``'s unit of ``rows``; returns a call that waits for the device and
    gives the labels, or refuses them (TeacherError) if a teacher's softmax was not finite on one of its crops.

    With ``mix`` the teachers see each mixed row's composite: its partner (from any chunk) is
    decoded in the same batch. A row whose partner could not be decoded is labelled unmixed,
    and stored so. The teachers get batches of the loader's size, whatever the partners
    borrowed from other chunks took (fixed_batches). The top-k gather on the device and come
    back in one copy per unit, so the loop over batches does not wait for the device (the
    next unit is queued while this one is written), except to drop borrowed partners before
    the teachers run (a boolean mask: one wait per loader batch, for the work already queued).
    """
    n = rows.stop - rows.start
    probs = torch.zeros((n, topk), dtype=torch.float16, device=ensemble.device)
    classes = torch.zeros((n, topk), dtype=torch.int32, device=ensemble.device)
    mixed = torch.zeros(n, dtype=torch.bool, device=ensemble.device)
    faulty = torch.zeros(n, dtype=torch.int32, device=ensemble.device)  # 1 + the first unsound teacher, per row
    order = np.arange(rows.start, rows.stop) if mix is None else mix.unit_order(rows.start, rows.stop)
    borrowed = bool(((order < rows.start) | (order >= rows.stop)).any())  # partners decoded from other chunks
    composites = DeviceMix(mix) if mix is not None else None

    def own_rows():
        """The unit's own rows of each decoded batch (composites, with ``mix``)."""
        for images, indices in loader.epoch(order, boxes, flips, progress=False):
            if not len(indices):  # every file of the batch left out (--skip-bad)
                continue
            if mix is not None:
                batch = composites.batch(indices)
                images, composed = batch.images(images), batch.mixed
                if borrowed:  # the teachers label this unit's rows only
                    own = (indices >= rows.start) & (indices < rows.stop)
                    images, indices, composed = images[own], indices[own], composed[own]
                mixed[indices - rows.start] = composed
            yield images, indices

    for images, indices, count in fixed_batches(own_rows(), loader.batch_size):
        mean_probs, _, unsound = ensemble(images, faults=True)
        values, top = compress(mean_probs[:count], topk)
        at = indices.to(ensemble.device) - rows.start
        probs[at] = values
        classes[at] = top.to(torch.int32)
        faulty[at] = unsound[:count]
        bar.update(count)
    (host_probs, host_classes, host_mixed, host_faulty), copied = to_host((probs, classes, mixed, faulty),
                                                                          ensemble.device)
    dtype = class_dtype(ensemble.num_classes)

    def labels() -> SlotLabels:
        copied()
        faults = host_faulty.numpy()
        unsound = np.flatnonzero(faults)
        if len(unsound):
            teacher, image = ensemble.specs[faults[unsound[0]] - 1], loader.index.file(rows.start + int(unsound[0]))
            raise TeacherError(f"{teacher}: its softmax is not finite on {image} "
                               f"(seed slot {slot}, {len(unsound)} of the unit's {n} crops); the unit was not "
                               "written: check this teacher's weights (logits beyond float32's range, 3.4e38, make "
                               "its softmax NaN)")
        labelled = SlotLabels(host_probs.numpy(), host_classes.numpy().astype(dtype), boxes[rows], flips[rows])
        if mix is not None:
            composed = host_mixed.numpy()
            labelled.mix_partner = np.where(composed, mix.partner[rows], -1).astype(np.int32)
            labelled.mix_boxes = np.where(composed[:, None], mix.boxes[rows], 0).astype(np.int32)
        return labelled
    return labels


class UnitWriter:
    """Writes labelled units to the store on a thread of its own, one behind the labelling.

    The thread waits on the copies' CUDA events, so it first makes ``device`` its current one.
    ``written`` holds (time, rows) of each unit written, for the steady rate.
    """

    def __init__(self, store: StoreWriter, device: torch.device = torch.device("cpu")):
        self.store = store
        self._pool = ThreadPoolExecutor(1, initializer=use_device, initargs=(device,))
        self._pending: Future | None = None
        self.written: list[tuple[float, int]] = []

    def submit(self, slot: int, chunk: int, labels: Callable[[], SlotLabels]) -> None:
        """Write a unit once its labels are on the host; waits for the previous write first."""
        self.wait()

        def write():
            unit = labels()
            self.store.write_unit(slot, chunk, unit)
            self.written.append((time.perf_counter(), len(unit.probs)))
        self._pending = self._pool.submit(write)

    def steady_rate(self) -> float | None:
        """Rows/s from the first unit's end to the last's (warm-up left out); None with fewer than two units."""
        if len(self.written) < 2:
            return None
        (first, _), (last, _) = self.written[0], self.written[-1]
        return sum(rows for _, rows in self.written[1:]) / (last - first)

    def wait(self) -> None:
        """Block until every submitted unit is written (re-raising a failed write)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class LabelProgress(ProgressLines):
    """The tqdm bar, and where none is drawn a line every ``interval`` batches or 30 s: images labelled, units
    written, pace."""

    def __init__(self, bar: tqdm, log, interval: int, total: int, units: int, writer: UnitWriter):
        super().__init__(log, interval, shown=not bar.disable)
        self.bar, self.total, self.units, self.writer, self.done = bar, total, units, writer, 0

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        if self.due():
            self.log(f"cache-teachers: {self.done}/{self.total} img labelled, {len(self.writer.written)}/{self.units} "
                     f"unit(s) written | {self.pace(self.done, self.total)}")


def job_log(echo, store: str):
    """``echo`` that also appends each line, timed, to STORE.log beside a local store (a job's record outside a
    terminal); a store on object storage has its lines on the terminal only."""
    if "://" in store or "::" in store:
        return echo
    path = Path(store.rstrip("/") + ".log")

    def log(line: str) -> None:
        echo(line)
        try:
            with open(path, "a") as handle:
                handle.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")
        except OSError as err:
            echo(f"warning: {path}: cannot append this job's log ({first_line(err)})")
    return log


def run_cache(job: CacheJob, log=print) -> dict:
    """Fill this job's share of the store (creating or extending it first); returns the summary.

    Under torchrun rank 0 creates or extends the store, every rank labels its share of the
    (seed, chunk) units (within this job's --shard), and rank 0 finalises after a barrier.
    """
    job.validate()
    world = setup(job.device)
    device = world.device
    shard, num_shards = job.shard
    shard, num_shards = shard * world.world_size + world.rank, num_shards * world.world_size
    log = log if world.is_main else (lambda *_: None)
    started = time.perf_counter()
    index = load_index(Path(job.data) / "train", skip_bad=job.skip_bad, world=world)
    if job.topk > index.num_classes:
        raise ValueError(f"--topk {job.topk}: the data has only {index.num_classes} classes")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its kernels
    ensemble = TeacherEnsemble(parse_teachers(job.teachers, job.res), index.num_classes, device, job.compile)
    batch_size = job.batch_size or ensemble.batch_size(job.res, index.sizes)
    if job.mix.enabled:  # whole pairs in every batch
        batch_size = max(2, batch_size - batch_size % 2)
    spec = label_spec(index, ensemble.records, job.res, job.interpolation, job.topk, job.residual, job.crop.attrs(),
                      job.mix.attrs(), job.fingerprint)
    def create_or_extend() -> None:
        StoreWriter.create_or_extend(job.store, spec, index, list(range(job.seeds)), job.chunk_rows,
                                     job.storage_options)

    world.on_main(create_or_extend)
    store = StoreWriter.open(job.store, job.storage_options)
    undecodable: dict[int, str] = {}  # dataset position → the decoder's reason, with --skip-bad
    loader = ReplayLoader(index, job.res, batch_size, device, job.decoder, job.interpolation, job.workers,
                          on_bad=undecodable.setdefault if job.skip_bad else None, hw_decoder_load=job.hw_decoder_load)
    units = [u for u in store.pending_units(shard, num_shards) if u[0] < job.seeds]
    todo = sum(store.rows(chunk).stop - store.rows(chunk).start for _, chunk in units)
    log(f"cache-teachers: {len(index)} images, {job.seeds} seed slot(s), {len(units)} unit(s) to do "
        f"on {device} with {loader.decoder}, {batch_size} a batch"
        + (f", shard {job.shard[0]}/{job.shard[1]}" if job.shard[1] > 1 else "")
        + (f" (rank 0 of {world.world_size})" if world.distributed else ""))
    crops_slot, boxes, flips, mix = None, None, None, None
    labelling_started = time.perf_counter()  # the rate leaves out set-up (index, teachers, store), paid once
    writer = UnitWriter(store, device)
    with tqdm(total=todo, desc="cache-teachers", unit="img", disable=None if job.progress and world.is_main else True,
              dynamic_ncols=True) as bar:
        progress = LabelProgress(bar, log, job.log_interval, todo, len(units), writer)
        for slot, chunk in units:
            if slot != crops_slot:  # units come slot by slot: draw each slot's crops (and mixes) once
                crops_slot, (boxes, flips) = slot, job.crop.draw(store.seeds[slot], index.sizes)
                mix = job.mix.draw(store.seeds[slot], len(index), job.res) if job.mix.enabled else None
            writer.submit(slot, chunk, label_unit(ensemble, loader, slot, store.rows(chunk), boxes, flips, mix,
                                                  job.topk, progress))
        writer.wait()
    found = world.gather_bytes(json.dumps({index.paths[i]: reason for i, reason in undecodable.items()}).encode())
    left_out = {path: reason for part in found for path, reason in json.loads(part).items()}
    if left_out and world.is_main:
        store.add_skipped([f"{path}: cannot decode image ({reason})" for path, reason in sorted(left_out.items())])
        log(f"left out {len(left_out)} undecodable image(s), listed in the store: " + ", ".join(sorted(left_out)[:5]))
    if world.is_main and units:
        store.add_provenance(provenance(loader.decoder, device))
    todo = int(world.sum(torch.tensor(todo)))  # waits until every rank has written its units
    complete = store.finalize() if world.is_main else bool(store.done().all())
    finished = time.perf_counter()
    seconds, labelling = finished - started, finished - labelling_started
    info = open_store(job.store, job.storage_options).info()
    return {"store": job.store, "images": len(index), "seed_slots": len(store.seeds), "complete": complete,
            "rank": world.rank, "images_labelled": todo, "bytes": info["bytes"], "bytes_per_crop": info["bytes_per_crop"],
            "batch_size": batch_size, "seconds": seconds, "labelling_seconds": labelling,
            "images_per_sec": todo / labelling if labelling else 0.0, "steady_images_per_sec": writer.steady_rate()}
