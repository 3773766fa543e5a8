"""The bench's measurements: each returns rates or seconds taken on this machine, in this run."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from mealv2.distill.losses import Discriminator, discriminator_loss, soft_cross_entropy
from mealv2.distill.trainer import TrainConfig, Trainer
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex, load_index
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.sampler import EpochSampler
from mealv2.softlabels.schema import label_spec
from mealv2.softlabels.stats import store_stats
from mealv2.softlabels.store import LabelStore, SlotLabels
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers
from mealv2.softlabels.writer import StoreWriter

TEACHERS = ("resnet10t", "resnet18")
STUDENT = "mobilenetv3_small_050"
BATCH = 64


def save_teachers(folder: Path, classes: int, names: tuple[str, ...] = TEACHERS) -> str:
    """Random-weight teachers (speed does not depend on the weights) saved locally: a --teachers spec."""
    specs = []
    for name in names:
        path = folder / f"{name}.safetensors"
        save_file(timm.create_model(name, num_classes=classes).state_dict(), str(path))
        specs.append(f"{name}={path}")
    return ",".join(specs)


def median_seconds(step, repeats: int, warmup: int = 2, device: str | torch.device = "cpu") -> float:
    """Median seconds of ``step``; on a GPU each step is waited for, so the time is the device's."""
    def timed():
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        timed()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        timed()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_seconds(spec: str, classes: int, res: int, repeats: int, device: str | torch.device = "cpu",
                    batch: int = BATCH) -> float:
    """Seconds per batch of the teacher ensemble on uint8 tensors already on ``device``."""
    ensemble = TeacherEnsemble(parse_teachers(spec, res), classes, device)
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    return median_seconds(lambda: ensemble(images), repeats, device=device)


def student_step_seconds(classes: int, res: int, repeats: int) -> float:
    """Seconds per distillation step of the student alone: forward, soft CE + discriminator, backward, SGD."""
    torch.manual_seed(0)
    student, disc = timm.create_model(STUDENT, num_classes=classes), Discriminator(classes)
    optimizer = torch.optim.SGD([*student.parameters(), *disc.parameters()], lr=0.01, momentum=0.9)
    images = torch.randn(BATCH, 3, res, res)
    target = torch.softmax(torch.randn(BATCH, classes), -1)

    def step():
        logits = student(images)
        loss = soft_cross_entropy(logits, target) + discriminator_loss(disc, F.log_softmax(logits, -1),
                                                                        target.log())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return median_seconds(step, repeats)


class _TorchvisionCrops(Dataset):
    """The same stored crops through torchvision: decode, resized_crop (antialiased), flip."""

    def __init__(self, index: DatasetIndex, boxes: np.ndarray, flips: np.ndarray, res: int):
        self.index, self.boxes, self.flips, self.res = index, boxes, flips, res

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        with open(self.index.file(i), "rb") as handle:
            data = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        top, left, height, width = (int(v) for v in self.boxes[i])
        crop = TF.resized_crop(image, top, left, height, width, [self.res, self.res], antialias=True)
        return (TF.horizontal_flip(crop) if self.flips[i] else crop), i


def _images_per_sec(batches, count: int, device: torch.device = torch.device("cpu")) -> float:
    started = time.perf_counter()
    for _ in batches:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)


def _on_device(batches, device: torch.device):
    """The DataLoader's batches moved to the device, as a training loop would (pinned, non-blocking)."""
    for images, indices in batches:
        yield images.to(device, non_blocking=True), indices


def replay_rate(index: DatasetIndex, res: int, workers: int, rounds: int, device: str = "cpu", batch: int = BATCH,
                decoder: str = "dali", hw_decoder_load: float | None = None) -> float:
    """Median images/s of the replay loader over ``rounds`` passes after a warm one, delivered on the device."""
    device = torch.device(device)
    boxes, flips = CropSpec().draw(0, index.sizes)
    order = EpochSampler().order(len(index), 0)
    replay = ReplayLoader(index, res, batch, device, decoder, "bilinear", workers, hw_decoder_load=hw_decoder_load)
    rates = [_images_per_sec(replay.epoch(order, boxes, flips, progress=False), len(order), device)
             for _ in range(rounds + 1)]
    return statistics.median(rates[1:])


def loader_rates(index: DatasetIndex, res: int, workers: int, rounds: int, seed: int = 0, decoder: str = "dali",
                 device: str = "cpu", batch: int = BATCH) -> tuple[float, float]:
    """Median images/s of the replay loader (``decoder``) and of a torchvision DataLoader doing the same crops.

    Both are warm (graph built, worker processes started) and take turns, pass by pass, so a
    change in the machine's load hits both alike. ``workers`` is the replay's thread count and
    the DataLoader's process count. On a GPU both deliver batches on the device; a pass ends
    when its last batch has arrived there.
    """
    device = torch.device(device)
    boxes, flips = CropSpec().draw(seed, index.sizes)
    order = EpochSampler().order(len(index), 0)
    replay = ReplayLoader(index, res, batch, device, decoder, "bilinear", workers)
    torchvision = DataLoader(_TorchvisionCrops(index, boxes, flips, res), batch_size=batch, num_workers=workers,
                             sampler=order.tolist(), persistent_workers=workers > 0,
                             pin_memory=device.type == "cuda")
    passes = {"replay": lambda: replay.epoch(order, boxes, flips, progress=False),
              "torchvision": lambda: _on_device(torchvision, device)}
    rates: dict[str, list[float]] = {name: [] for name in passes}
    for round_ in range(rounds + 1):  # the first round warms both and is left out
        for name, batches in passes.items():
            rate = _images_per_sec(batches(), len(order), device)
            if round_:
                rates[name].append(rate)
    return statistics.median(rates["replay"]), statistics.median(rates["torchvision"])


def training_rates(root: Path, out: Path, epochs: int, **modes: dict) -> dict[str, float]:
    """Median images/s per training mode, epochs interleaved across modes so load drifts hit all alike.

    The first epoch of each mode warms caches and is left out of the median.
    """
    trainers = {}
    for mode, options in modes.items():
        config = TrainConfig(mode=options.pop("mode", mode), data=str(root), out=str(out / mode), model=STUDENT,
                             init="scratch", epochs=epochs, batch_size=BATCH, progress=False, **options)
        trainers[mode] = Trainer(config, log=lambda *_: None)
    rates: dict[str, list[float]] = {mode: [] for mode in trainers}
    for epoch in range(epochs):
        for mode, trainer in trainers.items():
            rates[mode].append(trainer.train_epoch(epoch)["images_per_sec"])
    return {mode: float(np.median(values[1:])) for mode, values in rates.items()}


def content_fingerprint_seconds(photos: DatasetIndex, folder: Path, count: int, workers: int) -> tuple[float, float]:
    """Seconds `--fingerprint content` takes over ``count`` photo files, and their mean size in KB.

    The files are copies of ``photos``' JPEGs under ``folder`` (each its own file, read from the
    warm page cache, so the figure is hashing and opening, not disk reads).
    """
    for i in range(count):
        target = folder / f"class_{i % 10}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photos.file(i % len(photos)), target)
    index = load_index(folder, cache=False, workers=workers)
    started = time.perf_counter()
    index.fingerprint_of("content", workers)
    return time.perf_counter() - started, float(np.mean(index.byte_sizes)) / 1000


def random_store(path: Path, index: DatasetIndex, slots: int = 1, topk: int = 5, res: int = 224) -> LabelStore:
    """A complete store of ``index``'s images with random top-k rows (sorted Dirichlet values), written with the
    store's own writer. Speed does not depend on the values; every slot shares slot 0's crops."""
    rng = np.random.default_rng(0)
    spec = label_spec(index, [{"name": "synthetic", "pretrained": "synthetic", "mean": [0.5] * 3,
                               "std": [0.5] * 3}], res, "bilinear", topk, "uniform", CropSpec().attrs())
    store = StoreWriter.create_or_extend(str(path), spec, index, list(range(slots)))
    boxes, flips = CropSpec().draw(0, index.sizes)
    for slot in range(slots):
        for chunk in range(store.num_chunks):
            rows = store.rows(chunk)
            n = rows.stop - rows.start
            probs = np.ascontiguousarray(np.sort(rng.dirichlet(np.ones(topk), n), axis=1)[:, ::-1], np.float16)
            spread = np.arange(topk) * max(1, index.num_classes // topk)  # distinct classes in a row, as verify asks
            top = ((rng.integers(0, index.num_classes, (n, 1)) + spread) % index.num_classes).astype(np.uint16)
            store.write_unit(slot, chunk, SlotLabels(probs, top, boxes[rows], flips[rows]))
    store.finalize()
    return LabelStore.open(str(path))


def synthetic_store(path: Path, num_images: int, slots: int = 1, topk: int = 5, classes: int = 1000) -> LabelStore:
    """A random store (random_store) of ``num_images`` made-up 375×500 photos in ``classes`` classes."""
    rng = np.random.default_rng(0)
    index = DatasetIndex(root=str(path.parent), paths=[f"c/{i:08d}.jpg" for i in range(num_images)],
                         labels=rng.integers(0, classes, num_images).astype(np.int32),
                         sizes=np.tile(np.array([[375, 500]], np.int32), (num_images, 1)),
                         byte_sizes=rng.integers(50_000, 150_000, num_images),
                         classes=[f"{c:04d}" for c in range(classes)])
    return random_store(path, index, slots, topk)


def slot_load_seconds(folder: Path, num_images: int, topk: int = 5, classes: int = 1000) -> float:
    """Seconds to read one seed slot whole from a synthetic store of ``num_images`` rows (median of 3)."""
    reader = synthetic_store(folder / f"slot-{num_images}.zarr", num_images, topk=topk, classes=classes)
    return median_seconds(lambda: reader.read_slot(0), repeats=3, warmup=1)


def labels_stats_seconds(folder: Path, num_images: int, slots: int, topk: int = 5, classes: int = 1000) -> float:
    """Seconds `labels stats` takes (every slot read and summarised, no plot) on a synthetic store (median of 3)."""
    store = synthetic_store(folder / f"stats-{num_images}.zarr", num_images, slots, topk, classes)
    return median_seconds(lambda: store_stats(store.url), repeats=3, warmup=1)
