"""What a job ran on, as stores and runs record it: decoder, device, and the versions that move pixels or numbers.

Both stages record it (a store's ``provenance``, a run's config.json), so it lives below both.
"""

from __future__ import annotations

import importlib.metadata

import torch


def provenance(decoder: str, device: torch.device) -> dict:
    """How a job made its labels: what a teammate recomputing a row on other hardware needs to know."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    dali = next((v for v in map(version, ("nvidia-dali-cuda120", "nvidia-dali-cuda130")) if v), None)
    return {"decoder": decoder, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "autocast": "bfloat16" if device.type == "cuda" else "off",  # the teachers' autocast (models.autocast)
            "torch": torch.__version__, "timm": version("timm"), "dali": dali,
            "zarr": version("zarr")}
