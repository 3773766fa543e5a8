"""`mealv2 data fashion-mnist`: IDX files → ImageFolder of JPEGs, deterministic subsets, clear errors."""

import gzip

import numpy as np
import pytest
from click.testing import CliRunner

from mealv2.cli import main
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.fashion_mnist import CLASSES, FILES


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_idx_source(folder, train: int, val: int):
    """The four Fashion-MNIST IDX files with random pixels and labels cycling through the classes."""
    rng = np.random.default_rng(0)
    for split, (images, labels) in FILES.items():
        n = train if split == "train" else val
        write_idx(folder / f"{images}.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(folder / f"{labels}.gz", np.arange(n) % 10)
    return folder


@pytest.fixture
def idx_source(tmp_path):
    return write_idx_source(tmp_path, 40, 20)


def test_writes_image_folders_with_subsets(idx_source, tmp_path):
    out = tmp_path / "fm"
    result = CliRunner().invoke(main, ["data", "fashion-mnist", "--out", str(out), "--source", str(idx_source),
                                       "--limit-train", "25", "--limit-val", "10"])
    assert result.exit_code == 0, result.output
    train = DatasetIndex.scan(out / "train")
    assert train.classes == list(CLASSES) and len(train) == 25
    assert (train.sizes == 28).all()
    labels_by_file = {p: int(p.split("/")[1][:5]) % 10 for p in train.paths}
    assert all(train.labels[i] == labels_by_file[p] for i, p in enumerate(train.paths))
    assert len(DatasetIndex.scan(out / "val")) == 10


def test_missing_source_is_named(tmp_path):
    result = CliRunner().invoke(main, ["data", "fashion-mnist", "--out", str(tmp_path / "x"),
                                       "--source", str(tmp_path)])
    assert result.exit_code == 1 and "expected the four Fashion-MNIST IDX files" in result.output
