"""The GPU figures, one measurement per function, each written the moment it is measured (``Figures``).

bench/gpu_check.py runs each function in a process of its own under its own limit, so a
step cut short keeps what it had measured. Each rate is taken at steady state:

- gpu_stage1_vs_forward: cache-teachers images/s over the units after the first (cuDNN's
  autotuning, the decoder's start) ÷ the teachers' forward-only rate on batches already on
  the device, at the batch size cache-teachers chose;
- gpu_stage2_vs_bound_<student>: cached distill images/s over an epoch of at least
  TIMED_STEPS steps after a warm-up epoch ÷ the same training step's rate on one batch
  already on the device (the synthetic-data bound);
- gpu_loader_vs_torchvision: the replay loader (DALI "mixed") ÷ a torchvision DataLoader with
  as many worker processes doing the same crops, both delivering batches on the device;
- gpu_hw_decoder_<load>_images_per_sec: the DALI replay loader with that share of the JPEGs
  on the GPU's hardware decoder.

Photos are ImageNet's typical 375×500 JPEGs: a pool generated in parallel, the rest of a
folder hard links to it, so a 25,600-image epoch costs no generation while every file is
still opened, read and decoded. Weights and labels are random: speed depends on neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench import measures
from bench.imagegen import make_image_folder
from mealv2.distill.trainer import TrainConfig, Trainer
from mealv2.pipeline.dataset import load_index
from mealv2.pipeline.distributed import default_workers
from mealv2.softlabels.cache import run_cache
from mealv2.softlabels.cache_config import CacheJob

GPU_TEACHERS = ("senet154", "resnet152s")
GPU_STUDENTS = ("resnet50", "mobilenetv3_small_075")
RES, PHOTO_SIZE, QUALITY = 224, (375, 500), 90  # ImageNet's typical photo, saved as its JPEGs are
STUDENT_BATCH = 256
TIMED_STEPS = 100  # stage two is timed over an epoch of at least this many steps, after a warm-up epoch
HW_DECODER_LOADS = (0.0, 0.9)  # DALI's default share is 0.65 (the loader figure)
GPU_TARGETS = {"gpu_stage2_vs_bound_resnet50": 0.9, "gpu_stage2_vs_bound_mobilenetv3_small_075": 0.8,
               "gpu_stage2_images_per_sec_mobilenetv3_small_075": 10_000,
               "gpu_loader_vs_torchvision": 2.0, "gpu_stage1_vs_forward": 0.9}


def versions(device: torch.device) -> dict:
    """The GPU, driver, CUDA, torch and DALI this run measured."""
    record = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import nvidia.dali

        record["dali"] = nvidia.dali.__version__
    except ImportError:
        record["dali"] = None
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        record["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    return record


class Figures:
    """A JSON record of figures, rewritten whole (temporary file, then rename) each time a figure is added."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = Path(path), torch.device(device)
        self.results = json.loads(self.path.read_text())["results"] if self.path.exists() else {}

    def add(self, **figures: float) -> None:
        self.results |= figures
        for key, value in figures.items():
            print(f"{key}: {value:.4g}", flush=True)
        record = {"results": self.results, "targets": GPU_TARGETS, "targets_met": gpu_verdicts(self.results),
                  "versions": versions(self.device)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(self.path)


def gpu_verdicts(results: dict) -> dict[str, bool]:
    return {key: results[key] >= target for key, target in GPU_TARGETS.items() if key in results}


def _pool_part(pool: Path, part: int, count: int, size: tuple[int, int]) -> None:
    make_image_folder(pool, f"part_{part:02d}", classes=1, per_class=count, seed=part, size=size, mixed=False,
                      quality=QUALITY)


def photo_folder(root: Path, images: int, classes: int, unique: int, size: tuple[int, int] = PHOTO_SIZE,
                 workers: int | None = None, split: str = "train") -> Path:
    """ROOT/SPLIT with ``images`` photos in ``classes`` classes: ``unique`` generated in parallel, the rest hard links.

    The pool of unique photos lives beside ROOT and is made once, so every step of one check shares it.
    """
    if (root / split).is_dir():
        return root
    pool = root.parent / f"photo-pool-{unique}-{size[0]}x{size[1]}"
    if not pool.is_dir():
        parts = max(1, min(workers or default_workers(), unique))
        building = pool.with_name(pool.name + ".partial")
        with ProcessPoolExecutor(parts) as executor:
            for future in [executor.submit(_pool_part, building, part, len(range(part, unique, parts)), size)
                           for part in range(parts)]:
                future.result()
        building.rename(pool)
    sources = sorted(pool.rglob("*.jpg"))
    staging = root / f"{split}.partial"
    for i in range(images):
        target = staging / f"class_{i % classes:03d}" / f"img_{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], target)
    staging.rename(root / split)
    return root


def stage1_figures(tmp: Path, device: torch.device, figures: Figures, teachers: tuple[str, ...] = GPU_TEACHERS,
                   images: int = 2_000, unique: int = 2_000, classes: int = 100, seeds: int = 3, repeats: int = 10,
                   decoder: str = "torch", size: tuple[int, int] = PHOTO_SIZE, res: int = RES,
                   workers: int | None = None) -> None:
    """cache-teachers at steady state (the slots after the first unit) ÷ the teachers' forward-only rate."""
    root = photo_folder(tmp / f"photos-{images}", images, classes, unique, size, workers)
    spec = measures.save_teachers(tmp, classes, teachers)
    store = tmp / "stage1.zarr"
    summary = run_cache(CacheJob(data=str(root), store=str(store), res=res, teachers=spec, seeds=seeds,
                                 device=str(device), decoder=decoder, workers=workers, progress=False),
                        log=lambda *_: None)
    steady = summary["steady_images_per_sec"]
    figures.add(gpu_stage1_images_per_sec=steady, gpu_stage1_batch_size=summary["batch_size"])
    forward = summary["batch_size"] / measures.forward_seconds(spec, classes, res, repeats, device,
                                                               summary["batch_size"])
    figures.add(gpu_stage1_forward_images_per_sec=forward, gpu_stage1_vs_forward=steady / forward)


def _step_rate(trainer: Trainer, repeats: int) -> float:
    """Images/s of the same training step on one batch already on the device: the synthetic-data bound."""
    plan = trainer.targets.plan(0)
    batches = trainer.loader.epoch(plan.trainable, plan.boxes, plan.flips, progress=False)
    images, indices = next(iter(batches))
    batches.close()
    seconds = measures.median_seconds(lambda: trainer.step(images, indices, plan), repeats, warmup=5,
                                      device=trainer.device)
    return len(indices) / seconds


def stage2_figures(tmp: Path, device: torch.device, figures: Figures, student: str, decoder: str,
                   batch: int = STUDENT_BATCH, steps: int = TIMED_STEPS, unique: int = 2_000, classes: int = 100,
                   repeats: int = 20, size: tuple[int, int] = PHOTO_SIZE, res: int = RES,
                   workers: int | None = None) -> None:
    """Cached distill over an epoch of ``steps`` steps after a warm-up epoch ÷ the step on a batch on the device."""
    images = batch * steps
    root = photo_folder(tmp / f"photos-{images}", images, classes, unique, size, workers)
    store = tmp / f"stage2-{images}.zarr"
    if not store.exists():
        measures.random_store(store, load_index(root / "train"), res=res)
    trainer = Trainer(TrainConfig(mode="distill", data=str(root), out=str(tmp / f"run-{student}-{decoder}"),
                                  model=student, labels=str(store), init="scratch", epochs=2, batch_size=batch,
                                  device=str(device), decoder=decoder, workers=workers, progress=False,
                                  log_interval=0),  # no step lines: each reads the loss (a device sync)
                      log=lambda *_: None)
    trainer.train_epoch(0)  # builds and warms everything: cuDNN's kernels, the decoder's workers
    cached = trainer.train_epoch(1)["images_per_sec"]
    figures.add(**{f"gpu_stage2_images_per_sec_{student}": cached, "gpu_stage2_steps_timed": steps})
    bound = _step_rate(trainer, repeats)
    figures.add(**{f"gpu_stage2_bound_images_per_sec_{student}": bound, f"gpu_stage2_vs_bound_{student}": cached / bound})


def loader_figures(tmp: Path, device: torch.device, figures: Figures, images: int = 4_000, unique: int = 2_000,
                   classes: int = 100, rounds: int = 2, batch: int = STUDENT_BATCH, size: tuple[int, int] = PHOTO_SIZE,
                   res: int = RES, workers: int | None = None) -> None:
    """The DALI replay loader ÷ a torchvision DataLoader with as many workers, both delivering on the device."""
    root = photo_folder(tmp / f"photos-{images}", images, classes, unique, size, workers)
    replay, torchvision = measures.loader_rates(load_index(root / "train"), res, workers or default_workers(), rounds,
                                                device=str(device), batch=batch)
    figures.add(gpu_decode_images_per_sec=replay, gpu_torchvision_images_per_sec=torchvision,
                gpu_loader_vs_torchvision=replay / torchvision)


def hw_decoder_figures(tmp: Path, device: torch.device, figures: Figures, loads: tuple[float, ...] = HW_DECODER_LOADS,
                       images: int = 4_000, unique: int = 2_000, classes: int = 100, rounds: int = 2,
                       batch: int = STUDENT_BATCH, size: tuple[int, int] = PHOTO_SIZE, res: int = RES,
                       workers: int | None = None) -> None:
    """The DALI replay loader's images/s at each share of the JPEGs given to the GPU's hardware decoder."""
    root = photo_folder(tmp / f"photos-{images}", images, classes, unique, size, workers)
    index = load_index(root / "train")
    for load in loads:
        rate = measures.replay_rate(index, res, workers or default_workers(), rounds, device=str(device), batch=batch,
                                    hw_decoder_load=load)
        figures.add(**{f"gpu_hw_decoder_{load:g}_images_per_sec": rate})


def gpu_figures(tmp: Path, figures: Figures, workers: int | None = None) -> dict:
    """Every GPU figure in one process (`python -m bench --device cuda`), each added to ``figures`` as measured."""
    device = figures.device
    started = time.perf_counter()
    stage1_figures(tmp, device, figures, workers=workers)
    for student in GPU_STUDENTS:
        stage2_figures(tmp, device, figures, student, "auto", workers=workers)
    loader_figures(tmp, device, figures, workers=workers)
    hw_decoder_figures(tmp, device, figures, workers=workers)
    figures.add(gpu_seconds=time.perf_counter() - started)
    return figures.results
