"""Shared fixtures: generated image folders, and a per-session cache dir so tests never touch ~/.cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from imagegen import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path_factory.getbasetemp() / "mealv2-cache"))


@pytest.fixture(scope="session")
def mixed_root(tmp_path_factory) -> Path:
    """ROOT with train/ (3 classes × 8, every awkward kind of image) and val/."""
    root = tmp_path_factory.mktemp("mixed")
    make_image_folder(root, "train", classes=3, per_class=8, seed=0)
    make_image_folder(root, "val", classes=3, per_class=4, seed=1)
    return root
