"""TeacherEnsemble: timm teachers, each normalising the shared uint8 crops its own way; mean softmax (eq. 1)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from .safetensors or a pickle-free torch file (bare, or under 'state_dict'/'model'/'student')."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise TeacherError(f"{path}: not a weights-only torch checkpoint ({str(err).splitlines()[0]})") from None
    for key in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TeacherError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_model(name: str, num_classes: int, checkpoint: str | None = None, pretrained: bool = False) -> nn.Module:
    """A timm model with a num_classes head, from local weights, hub weights or random init.

    Hub weights must already have num_classes outputs (a teacher's head cannot be guessed);
    a checkpoint with another head size is refused.
    """
    if not timm.is_model(name.split(".")[0]):
        raise TeacherError(f"{name}: not a timm model name")
    if checkpoint is None and pretrained:
        model = timm.create_model(name, pretrained=True)
        if model.num_classes != num_classes:
            raise TeacherError(f"{name}: pretrained head has {model.num_classes} classes, the data has "
                               f"{num_classes}: give NAME=PATH with weights fitted to this data")
        return model
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = model.pretrained_cfg.get("classifier", "")
        head = head[0] if isinstance(head, (list, tuple)) else head
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != num_classes:
            raise TeacherError(f"{checkpoint}: head has {weight.shape[0]} classes, the data has {num_classes}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise TeacherError(f"{checkpoint}: does not fit {name} ({str(err).splitlines()[0]})") from None
    return model


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


class Normalize(nn.Module):
    """uint8 NCHW in [0, 255] → float, (x/255 - mean) / std, with a model's own mean and std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale - self.shift


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA, nothing elsewhere: one code path for both devices."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; ``forward`` gives the mean of their softmax and of their logits."""

    def __init__(self, specs: list[TeacherSpec], num_classes: int, device: torch.device | str = "cpu"):
        super().__init__()
        if not specs:
            raise TeacherError("at least one teacher is needed")
        self.device = torch.device(device)
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
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) → (mean softmax (B, C) float32, mean logits (B, C) float32)."""
        images = images.to(self.device, non_blocking=True)
        probs = torch.zeros(images.shape[0], self.num_classes, device=self.device)
        logits = torch.zeros_like(probs)
        with autocast(self.device):
            for norm, model in zip(self.norms, self.models):
                out = model(norm(images).contiguous(memory_format=self.memory_format)).float()
                probs += out.softmax(-1)
                logits += out
        return probs / len(self.models), logits / len(self.models)
