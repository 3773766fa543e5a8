"""timm models as both stages use them: created by name with local or hub weights, normalised, autocast.

Teachers, students and evaluation share these; nothing here knows which role a model plays.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from torch import nn

from mealv2.pipeline.errors import first_line

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # mealv2.distill.config.AMP_MODES


class ModelError(ValueError):
    """A model name or weights file that cannot serve: the message names it and what was expected."""


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
        raise ModelError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as err:  # a download cut short, or another kind of file under that name
            raise ModelError(f"{path}: not a readable .safetensors file ({first_line(err)}); download or "
                             "copy it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise ModelError(f"{path}: not a weights-only torch checkpoint ({first_line(err)})") from None
    for key in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know (its architecture, before any ".tag"), before weights are looked for."""
    if not timm.is_model(name.split(".")[0]):
        raise ModelError(f"{name}: not a timm model name")


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, from one request without retries (huggingface_hub's own client,
    proxies and HF_HUB_ETAG_TIMEOUT), or None: it answered, or HF_HUB_OFFLINE is set (only its cache is read).

    huggingface_hub retries an unreachable hub with back-off, about 23 s a file, and timm asks for two files.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - the HTTP client's errors differ between huggingface_hub versions
        return f"{constants.ENDPOINT}: {first_line(err, 120)}"
    return None


def hub_model(name: str, local: str, **timm_kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``; ModelError at once, in one line naming HF_HUB_OFFLINE=1 and
    ``local`` (how to give a weights file instead), when weights on the Hub cannot be reached."""
    check_model_name(name)
    config = timm.models.get_pretrained_cfg(name)
    if config is not None and config.hf_hub_id and (reason := hub_unreachable()):
        raise ModelError(f"{name}: the Hugging Face Hub cannot be reached ({reason}); set HF_HUB_OFFLINE=1 to "
                         f"use the weights in its cache (HF_HOME), or {local}")
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as err:  # noqa: BLE001 - hub and network failures alike
        raise ModelError(f"{name}: cannot load its pretrained weights ({first_line(err, 200)}); {local}") from None


def create_model(name: str, num_classes: int, checkpoint: str | None = None, pretrained: bool = False,
                 **timm_kwargs) -> nn.Module:
    """A timm model with a num_classes head, from local weights, hub weights or random init.

    Hub weights must already have num_classes outputs (a teacher's head cannot be guessed);
    a checkpoint with another head size is refused. ``timm_kwargs`` go to ``timm.create_model``.
    """
    check_model_name(name)
    if checkpoint is None and pretrained:
        model = hub_model(name, "give local weights", **timm_kwargs)
        if model.num_classes != num_classes:
            raise ModelError(f"{name}: pretrained head has {model.num_classes} classes, the data has "
                             f"{num_classes}: give NAME=PATH with weights fitted to this data")
        return model
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = model.pretrained_cfg.get("classifier", "")
        head = head[0] if isinstance(head, (list, tuple)) else head
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != num_classes:
            raise ModelError(f"{checkpoint}: head has {weight.shape[0]} classes, the data has {num_classes}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelError(f"{checkpoint}: does not fit {name} ({first_line(err)})") from None
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


def autocast(device: torch.device, amp: str = "bf16"):
    """Mixed precision on CUDA in ``amp`` ("bf16", "fp16" or "off"); nothing on the CPU: one code path for both."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}: expected one of {sorted(AMP_DTYPES)}")
    return torch.autocast("cuda", dtype=AMP_DTYPES[amp] or torch.bfloat16,
                          enabled=amp != "off" and device.type == "cuda")
