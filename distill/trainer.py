"""The training loop behind `distill` (cached or online MEAL V2) and `train` (hard labels).

One loop, one code path for CPU and GPU: timm's optimizer, schedule and EMA (distill.recipe; by
default the paper's SGD with lr ×0.1 at each listed epoch), mixed precision on CUDA, per-epoch
metrics (distill.runlog), atomic checkpoints and an exact resume. The
options are resolved first (from the store, the checkpoint and the defaults) into a new
TrainConfig, and the run is built from that.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mealv2.distill.checkpoint import (CHECKPOINT, check_same_run, check_same_store, load_checkpoint, metrics_until,
                                restore_rng_state, rng_state, save_checkpoint)
from mealv2.distill.config import TrainConfig, run_file
from mealv2.distill.evaluate import EvalTransform, evaluate
from mealv2.distill.finite import FiniteLoss
from mealv2.distill.losses import Discriminator, discriminator_loss, soft_cross_entropy
from mealv2.distill.recipe import clip_gradients, create_ema, create_optimizer, create_scheduler
from mealv2.distill.run_lock import holding_run_folder
from mealv2.distill.runlog import SUMMARY, RunLog, StepLines
from mealv2.distill.student import create_student, synchronize_batchnorm
from mealv2.distill.targets import CachedTargets, EpochPlan, HardTargets, OnlineTargets
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import load_index
from mealv2.pipeline.distributed import setup
from mealv2.pipeline.files import atomic_write
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.models import AMP_DTYPES, Normalize, autocast, file_sha256, normalization
from mealv2.pipeline.progress import bars_shown
from mealv2.pipeline.provenance import provenance
from mealv2.pipeline.sampler import EpochSampler
from mealv2.softlabels.integrity import check_slots
from mealv2.softlabels.store import LabelStore, StoreError
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers

OUTPUTS = ("config.json", "metrics.jsonl", "model.safetensors", CHECKPOINT)
REPORTS = ("model_ema.safetensors", SUMMARY, "log.txt")  # a new run's own; a killed first epoch's are replaced
_POSTFIX_EVERY = 20  # steps between progress-bar loss updates (each one waits for the device)
INERT_DISCRIMINATOR = 1e-4  # a discriminator loss this close to ln 2 all epoch long is not learning


def _store_slots(store: LabelStore, asked: int | None, url: str) -> int:
    """How many seed slots a run reads: those asked for, or every slot written whole so far."""
    stored, ready = len(store.seeds), store.complete_slots()
    if asked is not None:
        if asked > stored:
            raise StoreError(f"--seeds {asked}: {url} holds {stored} seed slot(s)")
        if asked > ready:
            raise StoreError(f"--seeds {asked}: {url} is incomplete from slot {ready} on; "
                             "finish cache-teachers first, or read fewer slots")
        return asked
    if ready < stored and store.marked_complete:
        raise StoreError(f"{url}: marked complete but slot {ready} is incomplete: run labels verify")
    if ready == 0:
        raise StoreError(f"{url}: store is incomplete (no seed slot is written whole yet); "
                         "finish cache-teachers first")
    return ready


def resolve_config(config: TrainConfig, store: LabelStore | None, saved: dict | None) -> TrainConfig:
    """A complete config: resolution, interpolation, crop ranges and slots from the store, the resumed run
    (its slot count stays fixed even when the store has grown since) or the defaults."""
    asked = CropSpec.from_options(config.scale, config.ratio)
    crop = store.crop if store else asked
    for name in ("scale", "ratio"):
        wanted, stored = getattr(asked, name), getattr(crop, name)
        if getattr(config, name) is not None and wanted != stored:
            raise StoreError(f"--{name} {' '.join(map(str, wanted))}: {config.labels} holds crops drawn with "
                             f"{name} {' '.join(map(str, stored))}, and distill replays those")
    if store is not None and store.mix.enabled and config.mix.enabled:
        raise StoreError(f"--cutmix {config.cutmix}: {config.labels} replays the mixes it was made with "
                         f"({store.mix.describe()}); leave --cutmix out")
    seeds = config.seeds
    if store is not None:
        if seeds is None and saved is not None:
            seeds = saved.get("seeds")
        seeds = _store_slots(store, seeds, config.labels)
    return dataclasses.replace(config, res=config.res or (store.res if store else 224),
                               interpolation=store.interpolation if store else config.interpolation,
                               scale=crop.scale, ratio=crop.ratio, seeds=seeds)


class Trainer:
    """Builds the run from a TrainConfig and trains it epoch by epoch (one process, or one rank under torchrun).

    Under torchrun the student and discriminator are DistributedDataParallel, each rank
    trains on its share of every epoch's permutation with batch_size / world_size images
    per step, and rank 0 alone logs and writes outputs.
    """

    def __init__(self, config: TrainConfig, log=print):
        config.validate()
        self.world = setup(config.device)
        self.device = self.world.device
        if config.batch_size % self.world.world_size:
            raise ValueError(f"--batch-size {config.batch_size}: must split evenly over {self.world.world_size} ranks")
        self.out = Path(config.out)
        self.runlog = RunLog(self.out, log) if self.world.is_main else None
        self.log = self.runlog if self.world.is_main else (lambda *_: None)
        self.progress = config.progress and self.world.is_main
        self.resumed = load_checkpoint(self.out / CHECKPOINT, self.device) if config.resume else None
        self.store = LabelStore.open(config.labels, "r", config.storage_options) if config.mode == "distill" else None
        split = Path(config.data) / "train"
        self.index = (self.store.matching_index(split, config.skip_bad, self.world) if self.store
                      else load_index(split, skip_bad=config.skip_bad, world=self.world))
        self.config = resolve_config(config, self.store, self.resumed["options"] if self.resumed else None)
        if self.store:  # every slot the run will read, before the first step (a missing chunk reads as zeros)
            check_slots(self.store, self.config.seeds)
        rank_batch = self.config.batch_size // self.world.world_size
        if (self.config.mix.enabled or (self.store and self.store.mix.enabled)) and rank_batch % 2:
            raise ValueError(f"--batch-size {self.config.batch_size}: CutMix batches whole pairs; expected an even "
                             f"number of images per rank, got {rank_batch}")
        if self.resumed:
            check_same_run(self.out / CHECKPOINT, self.resumed["options"], self.config.without_credentials())
            check_same_store(self.out / CHECKPOINT, self.resumed["store"], self._store_identity(), config.labels)
        if self.store and self.config.seeds < len(self.store.seeds):
            self.log(f"reading seed slots 0-{self.config.seeds - 1} of the store's {len(self.store.seeds)}")
        self._build()

    def _build(self) -> None:
        config, device = self.config, self.device
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its kernels
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        drops = {key: value for key, value in (("drop_rate", config.drop), ("drop_path_rate", config.drop_path))
                 if value is not None}
        self.student = create_student(config.model, self.index.num_classes, config.init, self.log,
                                      **drops).to(device)
        if device.type == "cuda":
            self.student = self.student.to(memory_format=torch.channels_last)
        if config.sync_bn and self.world.distributed:
            if device.type != "cuda":
                raise ValueError("--sync-bn: batch norm statistics are synchronised over GPUs (NCCL); "
                                 "on the CPU each rank keeps its own")
            self.student = synchronize_batchnorm(self.student)
        self.normalize = Normalize(*normalization(self.student)).to(device)
        self.eval_transform = EvalTransform.of([self.student], config.crop_pct, config.eval_interpolation)
        use_disc = config.discriminator and config.mode != "train"
        self.discriminator = Discriminator(self.index.num_classes, head=config.disc_head).to(device) if use_disc else None
        torch.manual_seed(config.seed + self.world.rank)  # each rank draws its own dropout masks, as timm does
        self.student_parallel = self._parallel(self.student)
        if config.compile:  # after DDP, so that DDP's optimizer splits the graph at its gradient buckets
            self.student_parallel = torch.compile(self.student_parallel)
        self.discriminator_parallel = self._parallel(self.discriminator)
        self.targets = self._targets()
        self.sampler = EpochSampler(config.seed, rank=self.world.rank, world_size=self.world.world_size)
        self.optimizer = create_optimizer(config, self.student, self.discriminator)
        self.scheduler = create_scheduler(config, self.optimizer)
        self.ema = create_ema(config, self.student)
        self.updates = 0  # optimisation steps so far (the EMA's warm-up counts them)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16" and device.type == "cuda")
        rank_batch = config.batch_size // self.world.world_size
        self.loader = ReplayLoader(self.index, config.res, rank_batch, device, config.decoder, config.interpolation,
                                   config.workers, on_bad=self._left_out if config.skip_bad else None,
                                   hw_decoder_load=config.hw_decoder_load)
        val_dir = Path(config.data) / "val"
        self.val_loader = ReplayLoader(load_index(val_dir, skip_bad=config.skip_bad, world=self.world), config.res,
                                       rank_batch, device, config.decoder, self.eval_transform.interpolation,
                                       config.workers) if val_dir.is_dir() else None
        self.lines = StepLines(self.log, config.log_interval if self.world.is_main else 0, bars_shown(self.progress))
        self.finite = FiniteLoss(self.world, device)
        self.start_epoch = 0

    def _left_out(self, position: int, reason: str) -> None:
        """--skip-bad: an image the decoder fails on is dropped from its batch, and said so."""
        self.log(f"left out {self.index.file(position)}: cannot decode image ({reason})")

    def _parallel(self, module: nn.Module | None) -> nn.Module | None:
        """The module the training step calls: DDP-wrapped under torchrun, else the module itself."""
        if module is None or not self.world.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _store_identity(self) -> dict:
        """The store this run reads, as its checkpoint records it (none for train and online runs)."""
        if self.store is None:
            return {}
        return {"url": self.config.labels, **self.store.identity(), "seeds": self.store.seeds[:self.config.seeds]}

    def _targets(self):
        config, cutmix = self.config, self.config.mix
        if config.mode == "distill":
            return CachedTargets(self.store, self.device, config.seeds, config.res, cutmix)
        crop = CropSpec(config.scale, config.ratio)
        if config.mode == "online":
            ensemble = TeacherEnsemble(parse_teachers(config.teachers, config.res),
                                       self.index.num_classes, self.device, config.compile)
            return OnlineTargets(ensemble, self.index, config.seeds, crop, config.disc_input, cutmix, config.res)
        return HardTargets(self.index, config.seeds, crop, self.device, cutmix, config.res)

    # -- one step, one epoch -------------------------------------------------------------------

    def _losses(self, images: torch.Tensor, indices: torch.Tensor, plan: EpochPlan) -> dict[str, torch.Tensor]:
        images, targets = plan.batch(images, indices)
        x = self.normalize(images).contiguous(
            memory_format=torch.channels_last if self.device.type == "cuda" else torch.contiguous_format)
        with autocast(self.device, self.config.amp):
            logits = self.student_parallel(x).float()
        if targets.labels is not None:
            loss = F.cross_entropy(logits, targets.labels)
            return {"loss": loss}
        kd = soft_cross_entropy(logits, targets.probs)
        losses = {"kd_loss": kd, "loss": self.config.kd_weight * kd}
        if self.discriminator is not None:
            student_side = logits if self.config.disc_input == "logits" else F.log_softmax(logits, -1)
            disc = discriminator_loss(self.discriminator_parallel, student_side, targets.teacher_side)
            losses["disc_loss"] = disc
            losses["loss"] = losses["loss"] + self.config.disc_weight * disc
        return losses

    def step(self, images: torch.Tensor, indices: torch.Tensor, plan: EpochPlan) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch (uint8 images, dataset positions) of ``plan``'s epoch; the losses stay
        on the device."""
        losses = self._losses(images, indices, plan)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16's scaler)
            clip_gradients(self.config, self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.student, step=self.updates)
        return losses

    def _step_runs(self, images: int, desc: str) -> bool:
        """Whether to step on a batch of ``images``; none are left when --skip-bad left out the whole batch.

        Under torchrun every rank gets the same number of batches, and the ranks agree on each step
        (one small all-reduce a step, with --skip-bad only): a rank that skipped alone would take one
        step fewer while the others waited in DDP's all-reduce until the collective timed out.
        """
        if not (self.world.distributed and self.config.skip_bad):
            return images > 0
        without = int(self.world.sum(torch.tensor([float(images == 0)]))[0])
        if without:
            self.log(f"{desc}: a step skipped on every rank: {without} rank(s) had no decodable image in it")
        return not without

    def train_epoch(self, epoch: int) -> dict:
        self.student.train()
        plan = self.targets.plan(epoch)
        order = self.sampler.order(plan.trainable, epoch, plan.mix)
        sums: dict[str, torch.Tensor] = {}
        steps = images_seen = 0
        drift = torch.zeros((), device=self.device)  # the discriminator loss's largest distance from ln 2
        desc, lr = f"epoch {epoch + 1}/{self.config.epochs}", self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        self.lines.start()
        batches = self.loader.epoch(order, plan.boxes, plan.flips, desc=desc, progress=self.progress)
        for images, indices in batches:
            if not self._step_runs(len(indices), desc):
                continue
            losses = self.step(images, indices, plan)
            for key, value in losses.items():  # summed on the device: no host sync per step
                sums[key] = sums.get(key, 0.0) + value.detach()
            if "disc_loss" in losses:
                drift = torch.maximum(drift, (losses["disc_loss"].detach() - math.log(2)).abs())
            steps += 1
            self.finite.step(losses["loss"], desc, steps)
            images_seen += len(indices)
            synced = steps % _POSTFIX_EVERY == 1 and not batches.bar.disable  # the one figure a shown bar reads
            if synced:
                batches.bar.set_postfix(loss=f"{float(sums['loss']) / steps:.4f}", refresh=False)
            synced |= self.lines.step(desc, steps, images_seen, len(order), sums["loss"] / steps, lr)
            if synced:  # the device was just waited for: looking at the loss record costs nothing more
                self.finite.check_here()
        if "disc_loss" in sums and float(drift) < INERT_DISCRIMINATOR:
            cause = ("(its last ReLU can give 0 for every input; it may wake later, or never; --disc-head "
                     "linear learned in every run measured)" if self.config.disc_head == "relu"
                     else "(a larger --d-lr may wake it)")
            self.log(f"warning: {desc}: the discriminator's loss stayed within {INERT_DISCRIMINATOR:g} of ln 2 = "
                     f"{math.log(2):.4f} at every step: it did not learn in this epoch {cause} (docs/recipes.md)")
        keys = sorted(sums)
        totals = self.world.sum(torch.stack([sums[k].float() for k in keys] + [torch.tensor(
            float(images_seen), device=self.device)]))  # waits for the device and for every rank
        means = {k: float(v) / max(steps, 1) / self.world.world_size for k, v in zip(keys, totals)}
        seconds = time.perf_counter() - started
        images = float(totals[-1])
        return means | {"images_per_sec": images / seconds if seconds else 0.0, "seconds": seconds}

    # -- outputs ---------------------------------------------------------------------------------

    def _save(self, epoch: int, metrics: dict) -> None:
        """Every rank hands over its random state; rank 0 writes the metrics line, then weights and checkpoint.

        A resume drops metrics past the checkpoint's epoch, so a kill between the two writes loses nothing.
        """
        rng_states = self.world.gather_bytes(rng_state(self.device))
        if not self.world.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write(self.out / "model.safetensors", lambda tmp: save_model(self.student, str(tmp)))
        if self.ema is not None:
            atomic_write(self.out / "model_ema.safetensors", lambda tmp: save_model(self.ema.module, str(tmp)))
        save_checkpoint(self.out / CHECKPOINT, modules={"student": self.student, "discriminator": self.discriminator,
                                                        "scaler": self.scaler, "ema": self.ema},
                        optimizer=self.optimizer, scheduler=self.scheduler, epoch=epoch, updates=self.updates,
                        rng_states=rng_states, options=self.config.without_credentials(),
                        store=self._store_identity())
        self.runlog.epoch(metrics, header=not (self.out / SUMMARY).exists())

    def _restore(self) -> None:
        state = self.resumed
        self.student.load_state_dict(state["student"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.updates = int(state["epoch"]), int(state.get("updates", 0))
        self.scheduler.step(self.start_epoch)  # timm's schedules are a function of the epochs done
        if len(state["rng"]) == self.world.world_size:
            restore_rng_state(state["rng"][self.world.rank], self.device)
        else:  # weights, order and crops still continue exactly; only dropout masks come from new seeds
            torch.manual_seed(self.config.seed + self.world.rank + 7919 * self.start_epoch)
            self.log(f"resuming on {self.world.world_size} rank(s) a run saved on {len(state['rng'])}: "
                     "random draws (dropout, drop-path) start from new seeds")
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.world.is_main:
            kept = metrics_until(metrics, self.start_epoch, self.log)
            atomic_write(metrics, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
            self.runlog.rewrite_summary([json.loads(line) for line in kept])
        self.log(f"resumed from {self.out / CHECKPOINT} after epoch {self.start_epoch}")

    def _start_fresh(self) -> None:
        """A new run writes only into a new or empty folder, or over a run of its own killed before a checkpoint."""
        if (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out}: holds a run already; pass --resume or choose another --out")
        present = [name for name in OUTPUTS if (self.out / name).exists()]
        if present and not _is_run_config(self.out / "config.json"):
            raise FileExistsError(f"{self.out}: holds {', '.join(present)} of something else; nothing was "
                                  "changed: choose another --out")
        if self.world.is_main:  # a killed first epoch's lines, never checkpointed
            for name in ("metrics.jsonl", *REPORTS):
                (self.out / name).unlink(missing_ok=True)

    @holding_run_folder
    def fit(self) -> list[dict]:
        """Train from the start (or the checkpoint with resume) to the last epoch; returns the new metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            self._restore()
            if self.start_epoch >= self.config.epochs:
                self.log(f"nothing to train: {self.out} has trained {self.start_epoch} epoch(s) of --epochs "
                         f"{self.config.epochs}; a larger --epochs continues it")
                return []
        else:
            self._start_fresh()
        if self.world.is_main:
            self.runlog.open(self.config.log_tb, self.config.without_credentials() if self.config.log_wandb else None)
            atomic_write(self.out / "config.json",
                         lambda tmp: tmp.write_text(json.dumps(run_file(self.config, self._ran()), indent=2)))
            self.log(self._start_line())
            if warning := self._too_few_slots():
                self.log(warning)
        history = []
        for epoch in range(self.start_epoch, self.config.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self.train_epoch(epoch)
            self.finite.check()  # before anything of the epoch is evaluated or saved
            self.scheduler.step(epoch + 1)
            metrics = {"epoch": epoch + 1, "lr": lr, "loss": stats["loss"], "kd_loss": stats.get("kd_loss"),
                       "disc_loss": stats.get("disc_loss"), "val_top1": None, "val_top5": None,
                       "images_per_sec": stats["images_per_sec"], "seconds": stats["seconds"]}
            last = epoch + 1 == self.config.epochs
            if self.val_loader is not None and ((epoch + 1) % self.config.val_every == 0 or last):
                result = evaluate(self.student, self.normalize, self.val_loader, self.eval_transform,
                                  self.config.amp, world=self.world, progress=self.progress)
                metrics["val_top1"], metrics["val_top5"] = result["top1"], result["top5"]
                if self.ema is not None:  # the EMA's weights, scored the same way
                    result = evaluate(self.ema.module, self.normalize, self.val_loader, self.eval_transform,
                                      self.config.amp, world=self.world, progress=self.progress)
                    metrics["val_top1_ema"], metrics["val_top5_ema"] = result["top1"], result["top5"]
                metrics |= {f"val_{key}": value for key, value in self.eval_transform.record().items()}
            self._save(epoch + 1, metrics)
            history.append(metrics)
            self.log(_summary_line(metrics, self.config.epochs))
        self.world.barrier()  # no rank leaves before rank 0 has written the last checkpoint
        if self.world.is_main:
            self._report_best(history)
            self.runlog.close()
        return history

    def _report_best(self, history: list[dict]) -> None:
        """With --model-ema: which of the two weights scored better on the last validation, and where it lies."""
        last = history[-1] if history else {}
        if last.get("val_top1_ema") is None:
            return
        ema_wins = last["val_top1_ema"] > last["val_top1"]
        self.log(f"best: {'the EMA' if ema_wins else 'the trained'} weights, top-1 "
                 f"{max(last['val_top1'], last['val_top1_ema']):.2f}% "
                 f"({self.out / ('model_ema.safetensors' if ema_wins else 'model.safetensors')})")

    def _start_line(self) -> str:
        config, ranks = self.config, self.world.world_size
        recipe = f"{config.opt} lr {config.lr:g}, {config.sched} schedule" + (
            f" after {config.warmup_epochs} warm-up epoch(s)" if config.warmup_epochs else "")
        slots = (f"; {config.seeds} seed slot(s): each crop seen up to {-(-config.epochs // config.seeds)} times"
                 if config.seeds else "; new crops every epoch")
        return (f"{config.mode} {config.model} for {config.epochs} epochs: batch {config.batch_size} global "
                f"({config.batch_size // ranks} per rank × {ranks}), {recipe}"
                + (", EMA of the weights" if self.ema is not None else "") + slots
                + f"; on {self.device}, {self.loader.decoder} decoder, outputs in {self.out}")

    def _too_few_slots(self) -> str | None:
        """A warning where crops repeat more than docs/slots.md advises (S >= epochs / 2); None otherwise."""
        config = self.config
        if not config.seeds or 2 * config.seeds >= config.epochs:
            return None
        wanted = -(-config.epochs // 2)
        cure = (f"cache-teachers --seeds {wanted} extends the store" if config.mode == "distill"
                else f"--seeds {wanted}, or leave --seeds out for new crops every epoch")
        return (f"warning: {config.seeds} seed slot(s) for {config.epochs} epochs shows each crop up to "
                f"{-(-config.epochs // config.seeds)} times; docs/slots.md measured 1.1 top-1 points lost at one slot "
                f"per 12 epochs and 8.5 at one slot for 96: give at least one slot per two epochs ({cure})")

    def _ran(self) -> dict:
        """What actually ran, for config.json: decoder, device, world size, autocast, versions, store, init."""
        made = provenance(self.loader.decoder, self.device)
        dtype = AMP_DTYPES[self.config.amp] if self.device.type == "cuda" else None
        made["autocast"] = str(dtype).removeprefix("torch.") if dtype else "off"
        init = self.config.init
        return made | {"world_size": self.world.world_size, "store": self._store_identity(),
                       "init_sha256": file_sha256(init) if init not in ("pretrained", "scratch") else None}


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is the config.json of a mealv2 run (then its folder's outputs are ours to replace)."""
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(options, dict) and {"mode", "model", "data", "out"} <= options.keys()


def _summary_line(metrics: dict, epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{epochs}", f"lr {metrics['lr']:.4g}", f"loss {metrics['loss']:.4f}"]
    if metrics["kd_loss"] is not None:
        parts.append(f"kd {metrics['kd_loss']:.4f}")
    if metrics["disc_loss"] is not None:
        parts.append(f"disc {metrics['disc_loss']:.4f}")
    if metrics["val_top1"] is not None:
        parts.append(f"val top-1 {metrics['val_top1']:.2f}% top-5 {metrics['val_top5']:.2f}%")
    if metrics.get("val_top1_ema") is not None:
        parts.append(f"EMA top-1 {metrics['val_top1_ema']:.2f}%")
    parts.append(f"{metrics['images_per_sec']:.0f} img/s, {metrics['seconds']:.1f} s")
    return " | ".join(parts)
