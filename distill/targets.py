"""Where a training batch's targets come from: the label store, teachers in the loop, or hard labels.

Each source plans every epoch (``plan(epoch)`` → EpochPlan): which crops it replays, which
images it trains on and how they are mixed (a SlotMix or None), so the student always sees
the very pixels its targets were computed on; where no teacher saw the composite (hard
labels, a store without mixes) the targets are mixed by area instead.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mealv2.pipeline.composites import BatchMix, DeviceMix
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.mix import MixSpec, SlotMix
from mealv2.softlabels.store import LabelStore, SlotLabels
from mealv2.softlabels.teachers import TeacherEnsemble
from mealv2.softlabels.topk import expand

_LOG_FLOOR = 1e-8  # log of a renormalised top-k target has zeros elsewhere


@dataclass
class BatchTargets:
    """probs: dense (B, C) soft target, or labels: (B,) hard classes or (B, C) their CutMix blend;
    teacher_side: the discriminator's input."""

    probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    teacher_side: torch.Tensor | None = None


Targets = Callable[[torch.Tensor, torch.Tensor, "BatchMix | None"], BatchTargets]  # (images, indices, mix) → targets


@dataclass
class EpochPlan:
    """One epoch: boxes (N, 4) and flips (N,) by dataset position, the positions to train on (``trainable``), the
    CutMix pairing (None: unmixed) and the targets of its batches; ``batch`` turns a decoded batch into both."""

    boxes: np.ndarray
    flips: np.ndarray
    trainable: np.ndarray
    mix: SlotMix | None
    targets: Targets
    _composites: DeviceMix | None = field(init=False, repr=False)

    def __post_init__(self):
        self._composites = DeviceMix(self.mix) if self.mix is not None else None

    def batch(self, images: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, BatchTargets]:
        """(the images the student sees, their targets): with CutMix the composites, made on the device (each
        image was decoded once, its partner is in the batch)."""
        mix = self._composites.batch(indices) if self._composites is not None else None
        if mix is not None:
            images = mix.images(images)
        return images, self.targets(images, indices, mix)


class SlotTargets:
    """One seed slot's stored top-k rows on the device, expanded to dense targets batch by batch."""

    def __init__(self, labels: SlotLabels, device: torch.device, num_classes: int, residual: str,
                 blend_by_area: bool):
        self.device, self.num_classes, self.residual, self.blend_by_area = device, num_classes, residual, blend_by_area
        self._probs = torch.from_numpy(labels.probs).to(device)
        self._classes = torch.from_numpy(labels.classes.astype(np.int64)).to(device)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, mix: BatchMix | None = None) -> BatchTargets:
        at = indices.to(self.device, non_blocking=True)
        probs = expand(self._probs[at], self._classes[at], self.num_classes, self.residual)
        if mix is not None and self.blend_by_area:
            probs = mix.blend(probs)
        return BatchTargets(probs=probs, teacher_side=probs.clamp_min(_LOG_FLOOR).log())


class CachedTargets:
    """Epoch e reads seed slot e mod ``slots`` whole (the next one prefetched in a thread) and expands on the device.

    ``slots`` is fixed for a run: a store extended meanwhile does not change which slot an epoch reads.
    A CutMix store replays its own mixes (scaled to the training ``res``); a store without
    them mixes with ``cutmix`` and blends its labels by area.
    """

    def __init__(self, store: LabelStore, device: torch.device, slots: int | None = None, res: int | None = None,
                 cutmix: MixSpec = MixSpec()):
        self.store = store
        self.device = device
        self.slots = slots or len(store.seeds)
        self.residual = store.residual
        self.num_classes = store.num_classes
        self.res = res or store.res
        self.cutmix = cutmix
        self.blend_by_area = cutmix.enabled and not store.mix.enabled  # no teacher saw the composites
        self._pool = ThreadPoolExecutor(1)
        self._pending: dict[int, Future] = {}

    def _slot(self, epoch: int) -> int:
        return epoch % self.slots

    def _load(self, slot: int) -> SlotLabels:
        future = self._pending.pop(slot, None)
        return future.result() if future is not None else self.store.read_slot(slot)

    def plan(self, epoch: int) -> EpochPlan:
        """Load this epoch's slot and start reading the next; its stored crops, labelled rows, mixes and targets.

        Rows never labelled (images cache-teachers --skip-bad could not decode) are not trained on.
        """
        slot = self._slot(epoch)
        labels = self._load(slot)
        following = self._slot(epoch + 1)
        if following != slot and following not in self._pending:
            self._pending[following] = self._pool.submit(self.store.read_slot, following)
        mix = None
        if labels.mix_partner is not None:
            mix = SlotMix(labels.mix_partner, labels.mix_boxes, self.store.res).at_res(self.res)
        elif self.cutmix.enabled:
            mix = self.cutmix.draw(self.store.seeds[slot], self.store.num_images, self.res)
        targets = SlotTargets(labels, self.device, self.num_classes, self.residual, self.blend_by_area)
        return EpochPlan(labels.boxes, labels.flips, np.flatnonzero(labels.labelled()), mix, targets)


class _SampledCrops:
    """Crops (and mixes) drawn per epoch: seed e mod ``seeds`` (like a store of that many slots), or e when None.

    Each subclass is its epochs' targets (``__call__``)."""

    def __init__(self, index: DatasetIndex, seeds: int | None, crop: CropSpec, cutmix: MixSpec = MixSpec(),
                 res: int = 224):
        self.sizes = index.sizes
        self.seeds = seeds
        self.crop = crop
        self.res = res
        self.cutmix = cutmix

    def plan(self, epoch: int) -> EpochPlan:
        seed = epoch % self.seeds if self.seeds else epoch
        mix = self.cutmix.draw(seed, len(self.sizes), self.res) if self.cutmix.enabled else None
        boxes, flips = self.crop.draw(seed, self.sizes)
        return EpochPlan(boxes, flips, np.arange(len(self.sizes)), mix, self)


class OnlineTargets(_SampledCrops):
    """Teachers in the loop on the same replayed (and mixed) crops: dense mean softmax, and mean logits if asked."""

    def __init__(self, ensemble: TeacherEnsemble, index: DatasetIndex, seeds: int | None, crop: CropSpec,
                 disc_input: str, cutmix: MixSpec = MixSpec(), res: int = 224):
        super().__init__(index, seeds, crop, cutmix, res)
        self.ensemble = ensemble
        self.disc_input = disc_input

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, mix: BatchMix | None = None) -> BatchTargets:
        probs, logits = self.ensemble(images)  # the composites: the teachers see what the student sees
        side = logits if self.disc_input == "logits" else probs.clamp_min(_LOG_FLOOR).log()
        return BatchTargets(probs=probs, teacher_side=side)


class HardTargets(_SampledCrops):
    """Ground-truth classes for plain supervised training (`mealv2 train`); with CutMix, weighted by area."""

    def __init__(self, index: DatasetIndex, seeds: int | None, crop: CropSpec, device: torch.device,
                 cutmix: MixSpec = MixSpec(), res: int = 224):
        super().__init__(index, seeds, crop, cutmix, res)
        self.labels = torch.from_numpy(index.labels.astype(np.int64)).to(device)
        self.num_classes = index.num_classes

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, mix: BatchMix | None = None) -> BatchTargets:
        labels = self.labels[indices.to(self.labels.device, non_blocking=True)]
        if mix is None:
            return BatchTargets(labels=labels)
        return BatchTargets(labels=mix.blend(torch.nn.functional.one_hot(labels, self.num_classes).float()))
