"""`python -m bench --device cuda`: both stages on a GPU, each against its bound, on generated ImageNet-like JPEGs.

- gpu_stage2_vs_bound_<student>: cached distill images/s ÷ the same training step's rate on a
  batch already on the GPU (the synthetic-data bound);
- gpu_loader_vs_torchvision: the replay loader (DALI "mixed") ÷ a torchvision DataLoader with as
  many worker processes doing the same crops, both delivering batches on the GPU;
- gpu_stage1_vs_forward: cache-teachers images/s ÷ the teachers' forward-only rate on batches
  already on the GPU, at the batch size cache-teachers chose.

Every rate is taken at steady state: the first unit of stage one (cuDNN's autotuning, DALI's
workers starting), the first epoch of stage two and the first round of the loaders are left
out, and each timed part holds enough batches (3 timed seed slots of 4,000 photos; 3 timed
epochs of 16 steps) for the rate to settle.

Weights are random: speed does not depend on them. Any device runs it (the tests run it on
the CPU with tiny models); the targets are for a GPU.
"""

from __future__ import annotations

import json
import statistics
import subprocess
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
GPU_TARGETS = {"gpu_stage2_vs_bound_resnet50": 0.9, "gpu_stage2_vs_bound_mobilenetv3_small_075": 0.8,
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


def _distill_rate(trainer: Trainer, epochs: int) -> float:
    """Median images/s of the cached distill epochs after the first (which builds and warms everything)."""
    rates = [trainer.train_epoch(epoch)["images_per_sec"] for epoch in range(epochs)]
    return statistics.median(rates[1:])


def _step_rate(trainer: Trainer, repeats: int) -> float:
    """Images/s of the same training step on one batch already on the device: the synthetic-data bound."""
    boxes, flips = trainer.targets.crops(0)
    batches = trainer.loader.epoch(trainer.targets.trainable, boxes, flips, progress=False)
    images, indices = next(iter(batches))
    batches.close()
    seconds = measures.median_seconds(lambda: trainer.step(images, indices), repeats, warmup=5,
                                       device=trainer.device)
    return len(indices) / seconds


def gpu_figures(tmp: Path, device: str = "cuda", quick: bool = False, workers: int | None = None,
                teachers: tuple[str, ...] = GPU_TEACHERS, students: tuple[str, ...] = GPU_STUDENTS,
                classes: int = 100, images: int | None = None, student_batch: int = STUDENT_BATCH) -> dict:
    """Every GPU figure and the absolute rates behind it, measured in this run."""
    device = torch.device(device)
    images = images or (4_000 if quick else 8_000)
    epochs, repeats, rounds = (4, 10, 2) if quick else (5, 30, 3)
    root = tmp / "photos"
    make_image_folder(root, "train", classes=classes, per_class=-(-images // classes), size=PHOTO_SIZE,
                      mixed=False, quality=QUALITY)
    index = load_index(root / "train")
    workers = workers or default_workers()
    results: dict = {}

    replay, torchvision = measures.loader_rates(index, RES, workers, rounds, device=str(device), batch=student_batch)
    results |= {"gpu_decode_images_per_sec": replay, "gpu_torchvision_images_per_sec": torchvision,
                "gpu_loader_vs_torchvision": replay / torchvision}

    spec = measures.save_teachers(tmp, classes, teachers)
    store = tmp / "labels.zarr"
    summary = run_cache(CacheJob(data=str(root), store=str(store), res=RES, teachers=spec, seeds=4,
                                 device=str(device), workers=workers, progress=False), log=lambda *_: None)
    steady = summary["steady_images_per_sec"]  # the units after the first
    forward = summary["batch_size"] / measures.forward_seconds(spec, classes, RES, repeats, device,
                                                               summary["batch_size"])
    results |= {"gpu_stage1_images_per_sec": steady, "gpu_stage1_forward_images_per_sec": forward,
                "gpu_stage1_batch_size": summary["batch_size"], "gpu_stage1_vs_forward": steady / forward}

    for student in students:
        trainer = Trainer(TrainConfig(mode="distill", data=str(root), out=str(tmp / f"run-{student}"), model=student,
                                      labels=str(store), init="scratch", epochs=epochs, batch_size=student_batch,
                                      device=str(device), workers=workers, progress=False), log=lambda *_: None)
        cached = _distill_rate(trainer, epochs)
        bound = _step_rate(trainer, repeats)
        results |= {f"gpu_stage2_images_per_sec_{student}": cached, f"gpu_stage2_bound_images_per_sec_{student}": bound,
                    f"gpu_stage2_vs_bound_{student}": cached / bound}
    return results


def gpu_verdicts(results: dict) -> dict[str, bool]:
    return {key: results[key] >= target for key, target in GPU_TARGETS.items() if key in results}


def write_record(out: Path, name: str, results: dict, device: torch.device, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "targets": GPU_TARGETS, "targets_met": gpu_verdicts(results),
              "versions": versions(device), "seconds": seconds}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
