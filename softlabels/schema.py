"""What a label store is (docs/store-format.md): its format, arrays, codecs and identity, the arrays a new store
gets, and the errors of a store that cannot serve.

Free of zarr and torch: the command line declares its options from CHUNK_ROWS and RESIDUALS and starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mealv2.pipeline.dataset import DatasetIndex

FORMAT = 1
CHUNK_ROWS = 65536  # images per store chunk: one (seed slot, chunk) unit is one writer's work
RESIDUALS = ("uniform", "renorm")  # how a top-k row's missing mass is rebuilt (mealv2.softlabels.topk.expand)
LABEL_ARRAYS = ("probs", "classes", "boxes", "flips")
MIX_ARRAYS = ("mix_partner", "mix_boxes")  # CutMix stores only
INDEX_ARRAYS = ("index/paths", "index/sizes", "index/labels")
WRITTEN = "written"  # (S, chunks, 1 + arrays) uint64: rows, then one digest per per-slot array (integrity.py)
# attributes that fix what the labels mean: a store is only extended by a job that agrees on all
IDENTITY_KEYS = ("res", "interpolation", "topk", "residual", "crop", "mix")


class StoreError(ValueError):
    """A store that cannot serve the request: the message names it and what differs."""


class StoreUnreachable(StoreError):
    """A store that could not be reached at all: an endpoint down, no credentials, no such bucket."""


def compressors() -> list[dict]:
    """blosc-zstd, then a crc32c checksum so `labels verify` finds damaged chunks (zarr's JSON form of the codecs)."""
    return [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}},
            {"name": "crc32c"}]


def class_dtype(num_classes: int) -> str:
    """The class-index dtype the store uses: uint16 when it fits, int32 beyond."""
    return "uint16" if num_classes <= 65536 else "int32"


def teacher_identity(records: list[dict]) -> list[tuple]:
    """(name, sha256 or pretrained tag) per teacher: what makes two ensembles the same."""
    return [(t["name"], t.get("checkpoint_sha256") or t.get("pretrained")) for t in records]


def fingerprint_mode(dataset: dict) -> str:
    """The --fingerprint mode of a store's ``dataset`` attribute (stores made before content mode name none: size)."""
    return dataset.get("fingerprint_mode", "size")


def differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable list of what makes two label specs disagree."""
    diffs = []
    modes = [fingerprint_mode(spec["dataset"]) for spec in (stored, wanted)]
    if modes[0] != modes[1]:
        diffs.append(f"--fingerprint {modes[0]} vs {modes[1]}")
    elif stored["dataset"]["fingerprint"] != wanted["dataset"]["fingerprint"]:
        diffs.append(f"dataset fingerprint {stored['dataset']['fingerprint'][:12]}… vs "
                     f"{wanted['dataset']['fingerprint'][:12]}…")
    for key in IDENTITY_KEYS:
        if stored.get(key) != wanted.get(key):
            diffs.append(f"{key} {stored.get(key)} vs {wanted.get(key)}")
    if teacher_identity(stored["teachers"]) != teacher_identity(wanted["teachers"]):
        diffs.append(f"teachers {teacher_identity(stored['teachers'])} vs {teacher_identity(wanted['teachers'])}")
    return diffs


def label_spec(index: DatasetIndex, teachers: list[dict], res: int, interpolation: str, topk: int, residual: str,
               crop: dict, mix: dict | None = None, fingerprint: str = "size") -> dict:
    """The attributes (less seeds, dates and completeness) that define a store's labels.

    ``mix`` (MixSpec.attrs) only for a CutMix store: a store without it mixes nothing, as before mixing existed.
    ``fingerprint`` "content" also hashes every image's bytes (DatasetIndex.fingerprint_of), and is recorded.
    """
    dataset = {"fingerprint": index.fingerprint_of(fingerprint), "num_images": len(index),
               "num_classes": index.num_classes, "classes": list(index.classes)}
    spec = {
        "dataset": dataset | ({"fingerprint_mode": fingerprint} if fingerprint != "size" else {}),
        "teachers": teachers, "res": res, "interpolation": interpolation, "topk": topk,
        "residual": residual, "crop": crop,
    }
    return spec | ({"mix": mix} if mix else {})


def slot_arrays(spec: dict, index: DatasetIndex, num_seeds: int, chunk_rows: int) -> list[tuple[str, tuple, tuple, str]]:
    """(name, shape, chunks, dtype) of each array with a seed axis that a new store of ``spec`` gets.

    The labels, the ``done`` cells, the mixes of a CutMix store, and the written-units record.
    """
    n, k = len(index), spec["topk"]
    rows = min(chunk_rows, max(n, 1))
    units = -(-n // rows)
    mixes = bool(spec.get("mix"))
    arrays = [
        ("probs", (num_seeds, n, k), (1, rows, k), "float16"),
        ("classes", (num_seeds, n, k), (1, rows, k), class_dtype(index.num_classes)),
        ("boxes", (num_seeds, n, 4), (1, rows, 4), "int32"),
        ("flips", (num_seeds, n), (1, rows), "bool"),
        ("done", (num_seeds, units), (1, 1), "bool"),
    ]
    if mixes:
        arrays += [("mix_partner", (num_seeds, n), (1, rows), "int32"),
                   ("mix_boxes", (num_seeds, n, 4), (1, rows, 4), "int32")]
    columns = 1 + len(LABEL_ARRAYS) + (len(MIX_ARRAYS) if mixes else 0)
    return arrays + [(WRITTEN, (num_seeds, units, columns), (1, 1, columns), "uint64")]


def index_arrays(index: DatasetIndex) -> list[tuple[str, np.ndarray]]:
    """(name, values) of the numeric index arrays: the images' upright sizes and labels in row order (``index/paths``
    is text, written by the writer a chunk at a time)."""
    return [("index/sizes", index.sizes.astype(np.int32)), ("index/labels", index.labels.astype(np.int32))]
