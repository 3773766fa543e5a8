"""The training loop behind `distill` (cached or online MEAL V2) and `train` (hard labels).

One loop, one code path for CPU and GPU: SGD with a step schedule (×0.1 at each listed epoch),
bf16 autocast on CUDA, per-epoch metrics, atomic checkpoints and an exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distill.evaluate import evaluate
from distill.losses import Discriminator, discriminator_loss, soft_cross_entropy
from distill.student import create_student
from distill.targets import CachedTargets, HardTargets, OnlineTargets
from pipeline.crops import CropSpec
from pipeline.dataset import load_index
from pipeline.distributed import World, join
from pipeline.loader import ReplayLoader, epoch_order, resolve_device
from softlabels.store import LabelStore, StoreError
from softlabels.teachers import Normalize, TeacherEnsemble, autocast, normalization, parse_teachers

MODES = ("distill", "online", "train")
CHECKPOINT = "checkpoint-last.pth"
_POSTFIX_EVERY = 20  # steps between progress-bar loss updates (each one waits for the device)


@dataclass
class TrainConfig:
    """Resolved options of one run (written to OUT/config.json); defaults are the paper's distill setting."""

    mode: str
    data: str
    out: str
    model: str
    labels: str | None = None
    teachers: str | None = None
    epochs: int = 180
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (100,)
    batch_size: int = 512
    res: int | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    d_lr: float | None = None
    discriminator: bool = True
    disc_input: str = "logprobs"
    kd_weight: float = 1.0
    disc_weight: float = 1.0
    init: str = "pretrained"
    seeds: int | None = None
    scale: tuple[float, float] | None = None  # RandomResizedCrop ranges: None is the store's, or CropSpec's default
    ratio: tuple[float, float] | None = None
    interpolation: str = "bilinear"
    device: str = "auto"
    decoder: str = "auto"
    workers: int = 2
    seed: int = 0
    resume: bool = False
    amp: bool = True
    val_every: int = 1
    skip_bad: bool = False
    storage_options: dict = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {MODES}")
        for name in ("epochs", "batch_size", "val_every", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.mode == "distill" and not self.labels:
            raise ValueError("distill needs --labels STORE (or --online --teachers SPEC,...)")
        if self.mode == "online" and not self.teachers:
            raise ValueError("--online needs --teachers SPEC[,SPEC...]")
        if self.disc_input not in ("logprobs", "logits"):
            raise ValueError(f"--disc-input {self.disc_input!r}: expected logprobs or logits")
        if self.disc_input == "logits" and self.mode != "online":
            raise ValueError("--disc-input logits needs --online: a label store holds probabilities, not logits")

    def public(self) -> dict:
        """The options as JSON, without storage options (they may carry credentials)."""
        options = dataclasses.asdict(self)
        options.pop("storage_options")
        options["lr_steps"] = list(self.lr_steps)
        return options


def _atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk, say) leaves the old file and no debris


class Trainer:
    """Builds the run from a TrainConfig and trains it epoch by epoch (one process, or one rank under torchrun).

    Under torchrun the student and discriminator are DistributedDataParallel, each rank
    trains on its share of every epoch's permutation with batch_size / world_size images
    per step, and rank 0 alone logs and writes outputs.
    """

    def __init__(self, config: TrainConfig, log=print):
        config.validate()
        self.config = config
        self.world = join(resolve_device(config.device).type)
        if config.batch_size % self.world.world_size:
            raise ValueError(f"--batch-size {config.batch_size}: must split evenly over {self.world.world_size} ranks")
        self.log = log if self.world.is_main else (lambda *_: None)
        self.progress = config.progress and self.world.is_main
        self.out = Path(config.out)
        self.device = resolve_device(config.device, self.world.local_rank)
        self.store = self._open_store() if config.mode == "distill" else None
        # files the store left out (cache-teachers --skip-bad) are left out here too
        skip_bad = config.skip_bad or bool(self.store and self.store.attrs.get("skipped"))
        self.index = load_index(Path(config.data) / "train", skip_bad=skip_bad)
        if self.store and self.store.attrs["dataset"]["fingerprint"] != self.index.fingerprint:
            raise StoreError(f"{config.labels}: labels are for another dataset than "
                             f"{config.data}/train (fingerprint differs)")
        res = config.res or (self.store.attrs["res"] if self.store else 224)
        if self.store:  # replay the crops as the teachers saw them
            config.interpolation = self.store.attrs["interpolation"]
        self.crop = self._crop_spec()
        self.config.res = res
        torch.manual_seed(config.seed)
        self.student = create_student(config.model, self.index.num_classes, config.init).to(self.device)
        if self.device.type == "cuda":
            self.student = self.student.to(memory_format=torch.channels_last)
            if self.world.distributed:  # gloo on the CPU has no SyncBatchNorm: there BN statistics stay per rank
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.normalize = Normalize(*normalization(self.student)).to(self.device)
        use_disc = config.discriminator and config.mode != "train"
        self.discriminator = Discriminator(self.index.num_classes).to(self.device) if use_disc else None
        self.student_step, self.discriminator_step = self._parallel(self.student), self._parallel(self.discriminator)
        self.targets = self._targets()
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(config.lr_steps), gamma=0.1)
        rank_batch = config.batch_size // self.world.world_size
        self.loader = ReplayLoader(self.index, res, rank_batch, self.device, config.decoder,
                                   config.interpolation, config.workers)
        val_dir = Path(config.data) / "val"
        self.val_loader = ReplayLoader(load_index(val_dir, skip_bad=config.skip_bad), res, rank_batch,
                                       self.device, config.decoder, "bilinear", config.workers) \
            if val_dir.is_dir() else None
        self.start_epoch = 0

    def _parallel(self, module: nn.Module | None) -> nn.Module | None:
        """The module the training step calls: DDP-wrapped under torchrun, else the module itself."""
        if module is None or not self.world.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _open_store(self) -> LabelStore:
        store = LabelStore.open(self.config.labels, "r", self.config.storage_options)
        if not (store.attrs["complete"] and store.done().all()):
            raise StoreError(f"{self.config.labels}: store is incomplete; finish cache-teachers first")
        return store

    def _crop_spec(self) -> CropSpec:
        """The options' crop ranges, or the store's when distilling from one (asking for others is an error)."""
        asked = CropSpec.from_options(self.config.scale, self.config.ratio)
        crop = CropSpec.from_attrs(self.store.attrs["crop"]) if self.store else asked
        for name in ("scale", "ratio"):
            wanted, stored = getattr(asked, name), getattr(crop, name)
            if getattr(self.config, name) is not None and wanted != stored:
                raise StoreError(f"--{name} {' '.join(map(str, wanted))}: {self.config.labels} holds crops drawn with "
                                 f"{name} {' '.join(map(str, stored))}, and distill replays those")
        self.config.scale, self.config.ratio = crop.scale, crop.ratio
        return crop

    def _targets(self):
        if self.config.mode == "distill":
            return CachedTargets(self.store, self.device)
        if self.config.mode == "online":
            ensemble = TeacherEnsemble(parse_teachers(self.config.teachers, self.config.res),
                                       self.index.num_classes, self.device)
            return OnlineTargets(ensemble, self.index, self.config.seeds, self.crop, self.config.disc_input)
        return HardTargets(self.index, self.config.seeds, self.crop, self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        """One SGD over the student and the discriminator (its own lr, by default the student's)."""
        groups = [{"params": self.student.parameters(), "lr": self.config.lr}]
        if self.discriminator is not None:
            groups.append({"params": self.discriminator.parameters(), "lr": self.config.d_lr or self.config.lr})
        return torch.optim.SGD(groups, lr=self.config.lr, momentum=self.config.momentum,
                               weight_decay=self.config.weight_decay)

    # -- one step, one epoch -------------------------------------------------------------------

    def _losses(self, images: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = self.targets(images, indices)
        x = self.normalize(images).contiguous(
            memory_format=torch.channels_last if self.device.type == "cuda" else torch.contiguous_format)
        with autocast(self.device, self.config.amp):
            logits = self.student_step(x).float()
        if targets.labels is not None:
            loss = F.cross_entropy(logits, targets.labels)
            return {"loss": loss}
        kd = soft_cross_entropy(logits, targets.probs)
        losses = {"kd_loss": kd, "loss": self.config.kd_weight * kd}
        if self.discriminator is not None:
            student_side = logits if self.config.disc_input == "logits" else F.log_softmax(logits, -1)
            disc = discriminator_loss(self.discriminator_step, student_side, targets.teacher_side)
            losses["disc_loss"] = disc
            losses["loss"] = losses["loss"] + self.config.disc_weight * disc
        return losses

    def train_epoch(self, epoch: int) -> dict:
        self.student.train()
        boxes, flips = self.targets.prepare(epoch)
        order = epoch_order(len(self.index), self.config.seed, epoch, shuffle=True, rank=self.world.rank,
                            world_size=self.world.world_size)
        sums: dict[str, torch.Tensor] = {}
        steps = images_seen = 0
        started = time.perf_counter()
        batches = self.loader.epoch(order, boxes, flips, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                                    progress=self.progress)
        for images, indices in batches:
            losses = self._losses(images, indices)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
            for key, value in losses.items():  # summed on the device: no host sync per step
                sums[key] = sums.get(key, 0.0) + value.detach()
            steps += 1
            images_seen += len(indices)
            if steps % _POSTFIX_EVERY == 1:
                batches.bar.set_postfix(loss=f"{float(sums['loss']) / steps:.4f}", refresh=False)
        keys = sorted(sums)
        totals = self.world.sum(torch.stack([sums[k].float() for k in keys] + [torch.tensor(
            float(images_seen), device=self.device)]))  # waits for the device and for every rank
        means = {k: float(v) / max(steps, 1) / self.world.world_size for k, v in zip(keys, totals)}
        seconds = time.perf_counter() - started
        images = float(totals[-1])
        return means | {"images_per_sec": images / seconds if seconds else 0.0, "seconds": seconds}

    # -- outputs ---------------------------------------------------------------------------------

    def _checkpoint(self, epoch: int) -> dict:
        store = {}
        if self.store is not None:
            attrs = self.store.attrs
            store = {"url": self.config.labels, "fingerprint": attrs["dataset"]["fingerprint"],
                     "created": attrs["created"], "seeds": list(attrs["seeds"])}
        return {
            "student": self.student.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "options": json.dumps(self.config.public()),
            "store": store,
        }

    def _write_outputs(self, epoch: int, metrics: dict) -> None:
        """metrics line first, then the checkpoint: a resume drops metrics past the checkpoint's epoch."""
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _atomic(self.out / "model.safetensors", lambda tmp: save_model(self.student, str(tmp)))
        _atomic(self.out / CHECKPOINT, lambda tmp: torch.save(self._checkpoint(epoch), tmp))

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["options"])
        for key in ("mode", "model", "labels", "teachers", "scale", "ratio"):
            current = json.loads(json.dumps(getattr(self.config, key)))  # tuples as the lists JSON saved
            if key in saved and saved[key] != current:  # checkpoints older than --scale lack it
                raise ValueError(f"{path}: was written with --{key} {saved[key]}, not {current}")
        self.student.load_state_dict(state["student"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.start_epoch = int(state["epoch"])
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.world.is_main:
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= self.start_epoch]
            _atomic(metrics, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        self.log(f"resumed from {path} after epoch {self.start_epoch}")

    def fit(self) -> list[dict]:
        """Train from the start (or the checkpoint with resume) to the last epoch; returns the new metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.config.resume:
            self._resume()
        elif (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out}: holds a run already; pass --resume or choose another --out")
        if self.world.is_main:
            _atomic(self.out / "config.json",
                    lambda tmp: tmp.write_text(json.dumps(self.config.public(), indent=2)))
        history = []
        for epoch in range(self.start_epoch, self.config.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self.train_epoch(epoch)
            self.scheduler.step()
            metrics = {"epoch": epoch + 1, "lr": lr, "loss": stats["loss"], "kd_loss": stats.get("kd_loss"),
                       "disc_loss": stats.get("disc_loss"), "val_top1": None, "val_top5": None,
                       "images_per_sec": stats["images_per_sec"], "seconds": stats["seconds"]}
            last = epoch + 1 == self.config.epochs
            if self.val_loader is not None and ((epoch + 1) % self.config.val_every == 0 or last):
                result = evaluate(self.student, self.normalize, self.val_loader, self.config.amp, world=self.world,
                                  progress=self.progress)
                metrics["val_top1"], metrics["val_top5"] = result["top1"], result["top5"]
            if self.world.is_main:
                self._write_outputs(epoch + 1, metrics)
            history.append(metrics)
            self.log(_summary_line(metrics, self.config.epochs))
        self.world.barrier()  # no rank leaves before rank 0 has written the last checkpoint
        return history


def _summary_line(metrics: dict, epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{epochs}", f"lr {metrics['lr']:.4g}", f"loss {metrics['loss']:.4f}"]
    if metrics["kd_loss"] is not None:
        parts.append(f"kd {metrics['kd_loss']:.4f}")
    if metrics["disc_loss"] is not None:
        parts.append(f"disc {metrics['disc_loss']:.4f}")
    if metrics["val_top1"] is not None:
        parts.append(f"val top-1 {metrics['val_top1']:.2f}% top-5 {metrics['val_top5']:.2f}%")
    parts.append(f"{metrics['images_per_sec']:.0f} img/s, {metrics['seconds']:.1f} s")
    return " | ".join(parts)

