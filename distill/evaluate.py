"""Top-1 / top-5 on a validation split through the same replay pipeline, with each model's own eval transform.

timm models differ in how they are meant to be evaluated (``resnet50.tv_in1k``: crop 0.875,
bilinear; ``resnet50.a1_in1k``: 0.95, bicubic; some squash instead of cropping), so the
crop fraction, interpolation and crop mode come from the model's timm data config unless
overridden; the paper's "resize to res/0.875 bilinear, centre crop" is
``crop_pct=0.875, interpolation="bilinear"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from timm.utils import accuracy
from torch import nn

from mealv2.pipeline.crops import CROP_MODES, center_boxes
from mealv2.pipeline.dataset import DatasetIndex, load_index
from mealv2.pipeline.decoders import INTERPOLATIONS, resolve_decoder
from mealv2.pipeline.distributed import World, resolve_device
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.models import Normalize, autocast, create_model, normalization
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers


@dataclass(frozen=True)
class EvalTransform:
    """How validation images become the model's input: centre box, then resize to res."""

    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop-pct {self.crop_pct}: expected a fraction in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: the replay resizes with "
                             f"{INTERPOLATIONS}; pass --eval-interpolation")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.crop_mode!r}: the replay evaluates {CROP_MODES}")

    @classmethod
    def of(cls, models: list[nn.Module], crop_pct: float | None = None,
           interpolation: str | None = None) -> EvalTransform:
        """The models' own timm eval settings (the paper's where models disagree), each override taking over."""
        configs = {(c["crop_pct"], c["interpolation"], c.get("crop_mode", "center"))
                   for c in (timm.data.resolve_data_config({}, model=model) for model in models)}
        own = cls(*configs.pop()) if len(configs) == 1 else cls()
        return cls(crop_pct if crop_pct is not None else own.crop_pct,
                   interpolation if interpolation is not None else own.interpolation, own.crop_mode)

    def record(self) -> dict:
        """What metrics and results say was used."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation, "crop_mode": self.crop_mode}


@torch.inference_mode()
def evaluate(model: nn.Module, normalize: nn.Module, loader: ReplayLoader, transform: EvalTransform,
             amp: str = "bf16", world: World = World(), progress: bool = True, predictions: bool = False) -> dict:
    """{"top1", "top5", "images", eval transform} over ``loader.index``, each image scored once (ranks share).

    ``predictions`` adds "predictions": each image's top-1 class (int64, in index order), for
    paired comparisons of two models on the same images.
    """
    if loader.interpolation != transform.interpolation:
        raise ValueError(f"loader resizes {loader.interpolation}, the eval transform asks {transform.interpolation}")
    index: DatasetIndex = loader.index
    boxes = center_boxes(index.sizes, transform.crop_pct, transform.crop_mode)
    flips = np.zeros(len(index), bool)
    labels = torch.from_numpy(index.labels.astype(np.int64)).to(loader.device)
    order = np.arange(len(index))[world.rank::world.world_size]  # no padding: nothing is counted twice
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=loader.device)  # top-1 hits, top-5 hits, images
    classes = torch.zeros(len(index), dtype=torch.int64, device=loader.device)  # top-1 class + 1; 0: another rank's
    for images, indices in loader.epoch(order, boxes, flips, desc="eval", progress=progress):
        with autocast(loader.device, amp):
            logits = model(normalize(images))
        if predictions:
            classes[indices] = logits.argmax(1) + 1
        top1, top5 = accuracy(logits.float(), labels[indices], topk=(1, min(5, logits.shape[1])))
        counts += torch.stack([top1 * len(indices) / 100, top5 * len(indices) / 100,
                               torch.tensor(float(len(indices)), device=counts.device)]).to(counts.dtype)
    model.train(was_training)
    hits1, hits5, seen = world.sum(counts).tolist()  # the one host sync of an evaluation
    result = {"top1": 100 * hits1 / max(seen, 1), "top5": 100 * hits5 / max(seen, 1), "images": int(seen),
              **transform.record()}
    if predictions:
        result["predictions"] = (world.sum(classes) - 1).cpu().numpy()
    return result


class _EnsembleScores(nn.Module):
    """A teacher ensemble as a classifier: its mean softmax are the scores (each teacher normalises itself)."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ensemble(images)[0]


def evaluate_saved(data: str, res: int | None = None, model: str | None = None, checkpoint: str | None = None,
                   pretrained: bool = False, teachers: str | None = None, batch_size: int = 64,
                   device: str = "auto", decoder: str = "auto", workers: int | None = None,
                   crop_pct: float | None = None, eval_interpolation: str | None = None,
                   predictions: bool = False) -> dict:
    """`mealv2 evaluate`: top-1/top-5 on ROOT/val of one model (saved weights or timm's hub weights), or of a
    teacher ensemble's mean softmax. ``res`` None: the run's training resolution when the checkpoint sits in a
    run folder, else the model's timm data config (the teachers: 224)."""
    one_model = model is not None and (checkpoint is not None) + pretrained == 1 and teachers is None
    if not one_model and (teachers is None or model is not None or checkpoint is not None or pretrained):
        raise ValueError("evaluate needs --model NAME with --checkpoint PATH or --pretrained, "
                         "or --teachers SPEC[,SPEC...]")
    torch_device = resolve_device(device)
    index = load_index(Path(data) / "val")
    if teachers is not None:
        res = res or 224
        ensemble = TeacherEnsemble(parse_teachers(teachers, res), index.num_classes, torch_device)
        scored, normalize = _EnsembleScores(ensemble), nn.Identity()
        transform = EvalTransform.of(list(ensemble.models), crop_pct, eval_interpolation)
    else:
        scored = create_model(model, index.num_classes, checkpoint=checkpoint, pretrained=pretrained)
        scored = scored.to(torch_device)
        res = res or _trained_res(checkpoint) or timm.data.resolve_data_config({}, model=scored)["input_size"][-1]
        normalize = Normalize(*normalization(scored)).to(torch_device)
        transform = EvalTransform.of([scored], crop_pct, eval_interpolation)
    decoder = resolve_decoder(decoder, torch_device.type, index.sizes, one_pass=True)
    loader = ReplayLoader(index, res, batch_size, torch_device, decoder, transform.interpolation, workers)
    return evaluate(scored, normalize, loader, transform, predictions=predictions) | {"res": res, "decoder": decoder}


def _trained_res(checkpoint: str | None) -> int | None:
    """The training resolution of the run whose folder holds ``checkpoint`` (its config.json), if any."""
    if checkpoint is None:
        return None
    try:
        return int(json.loads((Path(checkpoint).parent / "config.json").read_text())["res"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
