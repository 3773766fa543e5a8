"""The cache-teachers job: (seed slot, chunk) units → replayed crops → teacher ensemble → top-k → store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.crops import CropSpec
from pipeline.dataset import load_index
from pipeline.distributed import join
from pipeline.loader import ReplayLoader, resolve_device
from softlabels.store import CHUNK_ROWS, LabelStore, SlotLabels, label_spec
from softlabels.teachers import TeacherEnsemble, parse_teachers
from softlabels.topk import RESIDUALS, compress


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" → (I, N) with 0 <= I < N."""
    try:
        shard, num_shards = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, for example 0/4") from None
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {text}: expected I/N with 0 <= I < N")
    return shard, num_shards


@dataclass
class CacheJob:
    """Everything cache-teachers needs; defaults follow the paper at 224."""

    data: str
    store: str
    res: int = 224
    teachers: str | None = None
    seeds: int = 1
    topk: int = 5
    residual: str = "uniform"
    interpolation: str = "bilinear"
    batch_size: int = 64
    device: str = "auto"
    decoder: str = "auto"
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    skip_bad: bool = False
    chunk_rows: int = CHUNK_ROWS
    crop: CropSpec = CropSpec()
    storage_options: dict = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        for name in ("res", "seeds", "topk", "batch_size", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"--residual {self.residual!r}: expected one of {RESIDUALS}")


def label_unit(ensemble: TeacherEnsemble, loader: ReplayLoader, rows: slice, boxes: np.ndarray,
               flips: np.ndarray, topk: int, bar: tqdm) -> SlotLabels:
    """Teacher labels of one unit's rows, in row order."""
    n = rows.stop - rows.start
    probs = np.zeros((n, topk), np.float16)
    classes = None
    for images, indices in loader.epoch(np.arange(rows.start, rows.stop), boxes, flips, progress=False):
        mean_probs, _ = ensemble(images)
        values, top = compress(mean_probs, topk)
        at = indices.numpy() - rows.start
        probs[at] = values.cpu().numpy()
        top = top.cpu().numpy()
        if classes is None:
            classes = np.zeros((n, topk), top.dtype)
        classes[at] = top
        bar.update(len(at))
    return SlotLabels(probs, classes, boxes[rows], flips[rows])


def run_cache(job: CacheJob, log=print) -> dict:
    """Fill this job's share of the store (creating or extending it first); returns the summary.

    Under torchrun rank 0 creates or extends the store, every rank labels its share of the
    (seed, chunk) units (within this job's --shard), and rank 0 finalises after a barrier.
    """
    job.validate()
    world = join(resolve_device(job.device).type)
    shard, num_shards = job.shard
    shard, num_shards = shard * world.world_size + world.rank, num_shards * world.world_size
    log = log if world.is_main else (lambda *_: None)
    started = time.perf_counter()
    index = load_index(Path(job.data) / "train", skip_bad=job.skip_bad)
    if job.topk > index.num_classes:
        raise ValueError(f"--topk {job.topk}: the data has only {index.num_classes} classes")
    device = resolve_device(job.device, world.local_rank)
    ensemble = TeacherEnsemble(parse_teachers(job.teachers, job.res), index.num_classes, device)
    spec = label_spec(index, ensemble.records, job.res, job.interpolation, job.topk, job.residual, job.crop.attrs())
    if world.is_main:
        LabelStore.create_or_extend(job.store, spec, index, list(range(job.seeds)), job.chunk_rows,
                                    job.storage_options)
    world.barrier()
    store = LabelStore.open(job.store, "r+", job.storage_options)
    loader = ReplayLoader(index, job.res, job.batch_size, device, job.decoder, job.interpolation, job.workers)
    units = [u for u in store.pending_units(shard, num_shards) if u[0] < job.seeds]
    todo = sum(store.rows(chunk).stop - store.rows(chunk).start for _, chunk in units)
    log(f"cache-teachers: {len(index)} images, {job.seeds} seed slot(s), {len(units)} unit(s) to do "
        f"on {device} with {loader.decoder_name}" + (f" (rank 0 of {world.world_size})" if world.distributed else ""))
    crops_slot, boxes, flips = None, None, None
    labelling_started = time.perf_counter()  # the rate leaves out set-up (index, teachers, store), paid once
    with tqdm(total=todo, desc="cache-teachers", unit="img", disable=None if job.progress and world.is_main else True,
              dynamic_ncols=True) as bar:
        for slot, chunk in units:
            if slot != crops_slot:  # units come slot by slot: draw each slot's crops once
                crops_slot, (boxes, flips) = slot, job.crop.draw(store.seeds[slot], index.sizes)
            store.write_unit(slot, chunk, label_unit(ensemble, loader, store.rows(chunk), boxes, flips,
                                                     job.topk, bar))
    todo = int(world.sum(torch.tensor(todo)))  # waits until every rank has written its units
    complete = store.finalize() if world.is_main else bool(store.done().all())
    finished = time.perf_counter()
    seconds, labelling = finished - started, finished - labelling_started
    info = store.info()
    return {"store": job.store, "images": len(index), "seed_slots": len(store.seeds), "complete": complete,
            "rank": world.rank, "images_labelled": todo, "bytes": info["bytes"], "bytes_per_crop": info["bytes_per_crop"],
            "seconds": seconds, "labelling_seconds": labelling,
            "images_per_sec": todo / labelling if labelling else 0.0}
