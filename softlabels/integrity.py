"""What a label store must satisfy to be trained on: every chunk present and decodable, the written-units record,
and checks of the rows that need no teachers.

zarr reads an absent chunk as its fill value, so a chunk lost on a bucket looks like a unit
of zeros. Each writer therefore records, per (seed slot, chunk) unit, its row count and a
digest of every array's rows (the ``written`` array); a reader compares what it reads with
that record, and only the rows of images listed under ``skipped`` may hold no labels.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from mealv2.pipeline.errors import first_line
from mealv2.softlabels.schema import INDEX_ARRAYS, WRITTEN, StoreError

if TYPE_CHECKING:
    from mealv2.softlabels.store import LabelStore, SlotLabels, StoreLayout


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


def slot_problems(store: LabelStore, slot: int, labels: SlotLabels, first_chunk: int = 0) -> list[str]:
    """One line per unit whose rows differ from the record, and for empty rows not listed as skipped.

    ``labels``: the rows of slot ``slot`` from chunk ``first_chunk`` on (a whole slot, or one unit).
    """
    problems, offset = [], store.rows(first_chunk).start
    chunks = range(first_chunk, store.num_chunks if offset + len(labels.probs) >= store.num_images
                   else first_chunk + len(labels.probs) // store.chunk_rows)
    for chunk in chunks if store.record else ():
        rows = store.rows(chunk)
        unit = labels.take(slice(rows.start - offset, rows.stop - offset))
        problems += [f"slot {slot} chunk {chunk} (rows {rows.start}-{rows.stop - 1}): {what}" for what in
                     record_mismatches(store.arrays, store.group[WRITTEN][slot, chunk], rows.stop - rows.start,
                                       [getattr(unit, name) for name in store.arrays])]
    empty = offset + np.flatnonzero(~labels.labelled())
    unsound = offset + np.flatnonzero(unsound_rows(labels.probs))
    unlisted = np.setdiff1d(np.setdiff1d(empty, unsound), store.skipped_rows()) if len(empty) else empty
    paths = store.index.paths
    if len(unlisted):
        problems.append(f"slot {slot}: {len(unlisted)} row(s) hold no labels but their images are not listed "
                        f"as skipped ({', '.join(str(paths[i]) for i in unlisted[:3])})")
    if len(unsound):  # what a teacher whose logits overflowed left, written before stage one refused it
        problems.append(f"slot {slot}: {len(unsound)} row(s) hold probabilities that are not finite or "
                        f"outside 0-1 ({', '.join(str(paths[i]) for i in unsound[:3])})")
    return problems


def missing_chunks(store: StoreLayout, slots: int | None = None) -> list[str]:
    """One line per chunk of the first ``slots`` slots (default all) that storage does not hold; reads no chunk.

    A store made before the written-units record may lack chunks that held only zeros: only its
    probs and boxes, never all zero, are looked for there.
    """
    slots = len(store.seeds) if slots is None else slots
    names = store.arrays + store.record if store.record else ("probs", "boxes")
    missing = []
    for name in names:
        held = store.stored_chunks(name)
        for coords in np.ndindex(*store.group[name].cdata_shape):
            if coords[0] < slots and store.chunk_key(name, coords) not in held:
                missing.append(f"{name} chunk {'.'.join(map(str, coords))} is missing")
    return missing


def check_slots(store: StoreLayout, slots: int) -> None:
    """Refuse, before any training, a run whose first ``slots`` slots lack a chunk (one listing per array)."""
    missing = missing_chunks(store, slots)
    if missing:
        raise StoreError(f"{store.url}: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                         else "") + "; nothing was trained: restore the missing files from a copy of the "
                         "store, or rebuild it with cache-teachers into a new --store")


def verify_chunks(store: StoreLayout) -> list[str]:
    """Decode every chunk of every array (crc32c checked); one line per damaged chunk."""
    problems = []
    for name in store.arrays + ("done",) + store.record + INDEX_ARRAYS:
        array = store.group[name]
        for coords in np.ndindex(*array.cdata_shape):
            region = tuple(slice(c * size, min((c + 1) * size, extent))
                           for c, size, extent in zip(coords, array.chunks, array.shape))
            try:
                array[region]
            except Exception as err:  # noqa: BLE001 - any decode failure is a damaged chunk
                problems.append(f"{name} chunk {'.'.join(map(str, coords))}: {first_line(err)}")
    return problems
