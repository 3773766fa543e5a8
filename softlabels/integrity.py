"""What a label store's rows must satisfy to be trained on: the written-units record, and checks that need no teachers.

zarr reads an absent chunk as its fill value, so a chunk lost on a bucket looks like a unit
of zeros. Each writer therefore records, per (seed slot, chunk) unit, its row count and a
digest of every array's rows (the ``written`` array); a reader compares what it reads with
that record, and only the rows of images listed under ``skipped`` may hold no labels.
"""

from __future__ import annotations

import hashlib

import numpy as np

WRITTEN = "written"  # (S, chunks, 1 + arrays) uint64: rows, then one digest per per-slot array


def digest(values: np.ndarray) -> int:
    """An 8-byte blake2b of an array's bytes, as the unsigned integer the record holds."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=8).digest(), "little")


def unit_record(rows: int, values: list[np.ndarray]) -> np.ndarray:
    """The ``written`` cells of one unit: its row count, then the digest of each array's rows."""
    return np.asarray([rows] + [digest(v) for v in values], dtype=np.uint64)


def record_mismatches(names: tuple[str, ...], record: np.ndarray, rows: int, values: list[np.ndarray]) -> list[str]:
    """What in one unit's rows differs from its record (nothing: []): no record, another row count, or digests."""
    if not record.any():
        return ["no written-units record (the unit's writer never finished it)"]
    if int(record[0]) != rows:
        return [f"record holds {int(record[0])} rows, the unit has {rows}"]
    return [f"{name} differs from what its writer wrote (a missing or replaced chunk)"
            for name, wanted, value in zip(names, record[1:], values) if digest(value) != int(wanted)]


def unsound_rows(probs: np.ndarray) -> np.ndarray:
    """Rows (bool) holding a probability that is not finite or lies outside 0-1: no teacher's softmax does that."""
    values = probs.astype(np.float32)
    return ~(np.isfinite(values) & (values >= 0) & (values <= 1)).all(axis=1)


def structure_problems(labels, sizes: np.ndarray, num_classes: int, num_images: int, res: int, start: int,
                       labelled: np.ndarray) -> list[str]:
    """Checks one unit's rows need no teachers for (``labels``: a SlotLabels of those rows, ``sizes`` their
    upright sizes, ``start`` the first row's position; ``labelled``: bool rows).

    Classes unique per row and below the class count, probs descending with a sum of at most 1
    (plus float16 rounding), boxes inside the image's upright size, mix partners and boxes valid.
    """
    probs = labels.probs.astype(np.float32)[labelled]
    classes = labels.classes.astype(np.int64)[labelled]
    ordered = np.sort(classes, axis=1)
    checks = [
        ("classes repeat within a row", (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)),
        (f"classes outside 0-{num_classes - 1}", (classes >= num_classes).any(axis=1) | (classes < 0).any(axis=1)),
        ("probs not descending", (np.diff(probs, axis=1) > 0).any(axis=1)),
        ("probs sum above 1", probs.sum(axis=1) > 1 + probs.shape[1] * 2.0 ** -10),
    ]
    top, left, height, width = labels.boxes[labelled].T.astype(np.int64)
    size = sizes[labelled].astype(np.int64)
    checks.append(("boxes outside the image", (top < 0) | (left < 0) | (height < 1) | (width < 1) |
                   (top + height > size[:, 0]) | (left + width > size[:, 1])))
    if labels.mix_partner is not None:
        partner = labels.mix_partner[labelled].astype(np.int64)
        mtop, mleft, mheight, mwidth = labels.mix_boxes[labelled].T.astype(np.int64)
        mixed = partner >= 0
        checks.append(("mix partners invalid", (partner < -1) | (partner >= num_images) |
                       (partner == start + np.flatnonzero(labelled))))
        checks.append(("mix boxes outside the crop", mixed & ((mtop < 0) | (mleft < 0) | (mtop + mheight > res) |
                                                             (mleft + mwidth > res))))
    at = start + np.flatnonzero(labelled)  # the rows' positions in the store
    return [f"{what}: {int(flags.sum())} row(s), first {int(at[flags][0])}" for what, flags in checks if flags.any()]
