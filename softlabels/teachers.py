"""TeacherEnsemble: timm teachers, each normalising the shared uint8 crops its own way; mean softmax (eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from mealv2.pipeline.distributed import as_device
from mealv2.pipeline.models import Normalize, autocast, create_model, file_sha256, normalization

DEFAULT_TEACHERS = {
    224: ("senet154.gluon_in1k", "resnet152s.gluon_in1k"),
    380: ("tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"),
}


class TeacherError(ValueError):
    """A teacher spec or checkpoint that cannot serve: the message names it and what was expected."""


@dataclass(frozen=True)
class TeacherSpec:
    """`NAME` (timm pretrained weights) or `NAME=PATH` (a local checkpoint)."""

    name: str
    checkpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> TeacherSpec:
        name, _, path = text.strip().partition("=")
        if not name:
            raise TeacherError(f"teacher spec {text!r}: expected NAME or NAME=PATH")
        return cls(name, path or None)

    def __str__(self) -> str:
        return f"{self.name}={self.checkpoint}" if self.checkpoint else self.name


def parse_teachers(text: str | None, res: int) -> list[TeacherSpec]:
    """Comma-separated specs; the paper's pair for ``res`` when none are given."""
    if not text:
        if res not in DEFAULT_TEACHERS:
            raise TeacherError(f"no default teachers for --res {res} (known: {sorted(DEFAULT_TEACHERS)}): "
                               "give --teachers")
        return [TeacherSpec(name) for name in DEFAULT_TEACHERS[res]]
    return [TeacherSpec.parse(part) for part in text.split(",") if part.strip()]


CPU_BATCH = 64  # cache-teachers' batch on the CPU; on a GPU the largest that fits (fitting_batch)
LARGEST_BATCH = 1024
GPU_MEMORY_SHARE = 0.8  # of the GPU's memory a probe batch and the replay's buffers may take: the rest is the
# CUDA context's, cuDNN's workspaces' and the allocator's fragmentation
BATCHES_IN_FLIGHT = 4  # DALI's prefetch queue (2) and the loader's (2), see pipeline/loader.py


def replay_bytes(batch: int, sizes: np.ndarray, res: int) -> int:
    """GPU memory the replay holds for batches of ``batch`` beside the teachers, where torch's counters cannot see
    it: for each batch in flight, DALI's and nvJPEG's decoded pictures (sized at the 99th percentile of the
    dataset's (H, W) sizes) and the uint8 crops. An estimate from the graph's buffers, not measured on a GPU."""
    picture = float(np.percentile(np.prod(sizes, axis=1), 99)) if len(sizes) else 0.0
    return int(BATCHES_IN_FLIGHT * batch * 3 * (picture + res * res))


def fitting_batch(peak_share: Callable[[int], float], largest: int = LARGEST_BATCH) -> int:
    """The largest power of two ≤ ``largest`` whose probe fits: ``peak_share(b)`` is the memory share batch b
    peaked at, or raises torch.cuda.OutOfMemoryError. Tried from the top down; 1 if nothing larger fits."""
    batch = 1 << (largest.bit_length() - 1)
    while batch > 1:
        try:
            if peak_share(batch) <= GPU_MEMORY_SHARE:
                return batch
        except torch.cuda.OutOfMemoryError:
            pass
        batch //= 2
    return 1


def _torch_peak_bytes(ensemble: "TeacherEnsemble", batch: int, res: int) -> int:
    """The peak of torch's allocations while the ensemble labels one batch of ``batch`` crops at ``res``."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(ensemble.device)
    ensemble(torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=ensemble.device))
    torch.cuda.synchronize(ensemble.device)
    return torch.cuda.max_memory_allocated(ensemble.device)


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; ``forward`` gives the mean of their softmax and of their logits.

    ``compile`` runs each teacher through torch.compile (the weights stay the modules' own).
    """

    def __init__(self, specs: list[TeacherSpec], num_classes: int, device: torch.device | str = "cpu",
                 compile: bool = False):
        super().__init__()
        if not specs:
            raise TeacherError("at least one teacher is needed")
        self.device = as_device(device)
        self.specs = list(specs)
        self.num_classes = num_classes
        models, norms, self.records = [], [], []
        for spec in specs:
            model = create_model(spec.name, num_classes, spec.checkpoint, pretrained=spec.checkpoint is None)
            mean, std = normalization(model)
            models.append(model)
            norms.append(Normalize(mean, std))
            self.records.append(self._record(spec, model, mean, std))
        self.models = nn.ModuleList(models)
        self.norms = nn.ModuleList(norms)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
        self._forwards = [torch.compile(model) if compile else model for model in self.models]

    def batch_size(self, res: int, sizes: np.ndarray | None = None) -> int:
        """cache-teachers' default batch: on a GPU the largest that fits (probed at ``res``), else CPU_BATCH.

        With the dataset's (H, W) ``sizes``, room is left for the replay's buffers (replay_bytes).
        """
        if self.device.type != "cuda":
            return CPU_BATCH
        total = torch.cuda.get_device_properties(self.device).total_memory

        def peak_share(batch: int) -> float:
            replay = 0 if sizes is None else replay_bytes(batch, sizes, res)
            return (_torch_peak_bytes(self, batch, res) + replay) / total
        batch = fitting_batch(peak_share)
        torch.cuda.empty_cache()
        return batch

    @staticmethod
    def _record(spec: TeacherSpec, model: nn.Module, mean, std) -> dict:
        """What the store records of a teacher: the exact weights' identity and its normalisation."""
        record = {"name": spec.name, "mean": list(mean), "std": list(std)}
        if spec.checkpoint:
            record["checkpoint_sha256"] = file_sha256(spec.checkpoint)
        else:
            cfg = model.pretrained_cfg
            record["pretrained"] = f"{cfg.get('architecture', spec.name)}.{cfg.get('tag', '')}".rstrip(".")
        return record

    @torch.no_grad()  # not inference_mode: online distillation feeds these targets into autograd
    def forward(self, images: torch.Tensor, faults: bool = False) -> tuple[torch.Tensor, ...]:
        """uint8 (B, 3, H, W) → (mean softmax (B, C) float32, mean logits (B, C) float32).

        ``faults`` adds a third, int32 (B,): 0 where every teacher's softmax is finite and non-negative, else
        1 + the position of the first teacher whose softmax is not (logits beyond float32's range make it NaN).
        """
        images = images.to(self.device, non_blocking=True)
        probs = torch.zeros(images.shape[0], self.num_classes, device=self.device)
        logits = torch.zeros_like(probs)
        faulty = torch.zeros(images.shape[0], dtype=torch.int32, device=self.device) if faults else None
        with autocast(self.device):
            for position, (norm, model) in enumerate(zip(self.norms, self._forwards), 1):
                out = model(norm(images).contiguous(memory_format=self.memory_format)).float()
                softmax = out.softmax(-1)
                if faulty is not None:
                    unsound = ~(torch.isfinite(softmax) & (softmax >= 0)).all(-1)
                    faulty.masked_fill_(unsound & (faulty == 0), position)
                probs += softmax
                logits += out
        outputs = probs / len(self.models), logits / len(self.models)
        return outputs if faulty is None else outputs + (faulty,)
