"""Which decoder replays the crops: the names the command line offers (decoders, resize filters), and the rule
behind "auto".

Free of heavy imports (the command line reads DECODERS); the rule is measured, see
docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util

import numpy as np

DECODERS = ("auto", "dali", "torch", "pil")
INTERPOLATIONS = ("bilinear", "bicubic")  # the replay's resize filters: every decoder maps these names to its own
# On the CPU, torchvision overtakes DALI's batched graph above about 256 × 192 pixels a picture
# (measured on 2 cores at 2 threads: DALI 2.7× faster at 64 × 48, level at 256 × 192, 0.8× at 400 × 300).
CPU_TORCH_ABOVE_PIXELS = 256 * 256


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_decoder(kind: str, device_type: str, sizes: np.ndarray, one_pass: bool = False) -> str:
    """The decoder to use; "auto" takes the one measured fastest for this device type and these (H, W) sizes.

    On a GPU that is DALI (decoding "mixed"); on the CPU, DALI for small pictures and
    torchvision for photos, except for ``one_pass`` (``mealv2 evaluate``): DALI's start, worker
    processes spawned that each import torch, is not repaid by one pass (docs/benchmarks.md).
    Without DALI, torchvision.
    """
    if kind not in DECODERS:
        raise ValueError(f"decoder {kind!r}: expected one of {DECODERS}")
    if kind != "auto":
        return kind
    if not dali_installed():
        return "torch"
    if device_type == "cuda" or len(sizes) == 0:
        return "dali"
    small = np.median(np.prod(sizes, axis=1)) <= CPU_TORCH_ABOVE_PIXELS
    return "dali" if small and not one_pass else "torch"
