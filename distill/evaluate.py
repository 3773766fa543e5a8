"""Top-1 / top-5 on a validation split through the same replay pipeline (centre boxes, no flip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm.utils import accuracy
from torch import nn

from distill.student import create_student
from pipeline.crops import center_boxes
from pipeline.dataset import DatasetIndex, load_index
from pipeline.distributed import World
from pipeline.loader import ReplayLoader, resolve_device
from softlabels.teachers import Normalize, TeacherEnsemble, autocast, normalization, parse_teachers

EVAL_CROP_PCT = 0.875


@torch.inference_mode()
def evaluate(model: nn.Module, normalize: nn.Module, loader: ReplayLoader, amp: bool = True,
             crop_pct: float = EVAL_CROP_PCT, world: World = World(), progress: bool = True) -> dict:
    """{"top1", "top5"} in percent over ``loader.index``, each image scored once (ranks share the work)."""
    index: DatasetIndex = loader.index
    boxes = center_boxes(index.sizes, crop_pct)
    flips = np.zeros(len(index), bool)
    labels = torch.from_numpy(index.labels.astype(np.int64))
    order = np.arange(len(index))[world.rank::world.world_size]  # no padding: nothing is counted twice
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    for images, indices in loader.epoch(order, boxes, flips, desc="eval", progress=progress):
        with autocast(loader.device, amp):
            logits = model(normalize(images))
        top1, top5 = accuracy(logits.float(), labels[indices].to(logits.device), topk=(1, min(5, logits.shape[1])))
        counts += torch.tensor([top1.item() * len(indices) / 100, top5.item() * len(indices) / 100, len(indices)],
                               dtype=torch.float64)
    model.train(was_training)
    hits1, hits5, seen = world.sum(counts).tolist()
    return {"top1": 100 * hits1 / max(seen, 1), "top5": 100 * hits5 / max(seen, 1), "images": int(seen)}


class _EnsembleScores(nn.Module):
    """A teacher ensemble as a classifier: its mean softmax are the scores (each teacher normalises itself)."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ensemble(images)[0]


def evaluate_saved(data: str, res: int = 224, model: str | None = None, checkpoint: str | None = None,
                   teachers: str | None = None, batch_size: int = 64, device: str = "auto",
                   decoder: str = "auto", workers: int = 2) -> dict:
    """`mealv2 evaluate`: top-1/top-5 on ROOT/val of one saved model, or of a teacher ensemble's mean softmax."""
    if (teachers is None) == (model is None or checkpoint is None):
        raise ValueError("evaluate needs either --model NAME --checkpoint PATH or --teachers SPEC[,SPEC...]")
    torch_device = resolve_device(device)
    index = load_index(Path(data) / "val")
    loader = ReplayLoader(index, res, batch_size, torch_device, decoder, "bilinear", workers)
    if teachers is not None:
        ensemble = TeacherEnsemble(parse_teachers(teachers, res), index.num_classes, torch_device)
        return evaluate(_EnsembleScores(ensemble), nn.Identity(), loader)
    student = create_student(model, index.num_classes, checkpoint).to(torch_device)
    return evaluate(student, Normalize(*normalization(student)).to(torch_device), loader)
