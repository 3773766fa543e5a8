"""Top-1 / top-5 on a validation split through the same replay pipeline (centre boxes, no flip)."""

from __future__ import annotations

import numpy as np
import torch
from timm.utils import accuracy
from torch import nn

from pipeline.crops import center_boxes
from pipeline.dataset import DatasetIndex
from pipeline.loader import ReplayLoader, epoch_order
from softlabels.teachers import autocast

EVAL_CROP_PCT = 0.875


@torch.inference_mode()
def evaluate(model: nn.Module, normalize: nn.Module, loader: ReplayLoader, amp: bool = True,
             crop_pct: float = EVAL_CROP_PCT, rank: int = 0, world_size: int = 1) -> dict:
    """{"top1", "top5"} in percent over this rank's share of ``loader.index`` (every image once on one rank)."""
    index: DatasetIndex = loader.index
    boxes = center_boxes(index.sizes, crop_pct)
    flips = np.zeros(len(index), bool)
    labels = torch.from_numpy(index.labels.astype(np.int64))
    order = epoch_order(len(index), 0, 0, shuffle=False, rank=rank, world_size=world_size)
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    seen = 0
    for images, indices in loader.epoch(order, boxes, flips, desc="eval"):
        with autocast(loader.device, amp):
            logits = model(normalize(images))
        top1, top5 = accuracy(logits.float(), labels[indices].to(logits.device), topk=(1, min(5, logits.shape[1])))
        correct += torch.tensor([top1.item(), top5.item()], dtype=torch.float64) * len(indices) / 100
        seen += len(indices)
    model.train(was_training)
    top1, top5 = (100 * correct / max(seen, 1)).tolist()
    return {"top1": top1, "top5": top5, "images": seen}
