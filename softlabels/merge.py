"""The ensemble of two or more stores' teachers from their top-k rows: the weighted mean of the parents' softmax,
rebuilt by each parent's residual rule, cut to the top-k again (`mealv2 labels merge`).

The mean is exact before the cut: a class a parent did not keep gets that parent's residual value (its missing mass
spread evenly by "uniform", nothing by "renorm"), which is what the parent's own readers train on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from mealv2.pipeline.dataset import DatasetIndex
from mealv2.softlabels.schema import StoreError
from mealv2.softlabels.store import LabelStore, SlotLabels
from mealv2.softlabels.topk import index_dtype
from mealv2.softlabels.writer import StoreWriter

ROWS_AT_ONCE = 4096  # rows merged together: the class matching holds (rows, kept classes, kept classes) booleans


def _kept_and_rest(values: torch.Tensor, num_classes: int, residual: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A parent's probability of each class it kept (B, k), and of every class it did not (B,), by its residual."""
    values = values.float()
    total = values.sum(-1)
    k = values.shape[-1]
    if residual == "renorm" or k == num_classes:
        return values / total.clamp_min(1e-12)[:, None], torch.zeros_like(total)
    return values, (1.0 - total).clamp_min(0.0) / (num_classes - k)


def _merge_block(parents, weights: torch.Tensor, num_classes: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kept = [_kept_and_rest(values, num_classes, residual) for values, _, residual in parents]
    candidates = torch.cat([classes.long() for _, classes, _ in parents], dim=1)  # (B, T): every class some kept
    mean = torch.zeros(candidates.shape, dtype=torch.float32)
    rest = torch.zeros(len(candidates), dtype=torch.float32)
    for weight, (_, classes, _), (inside, outside) in zip(weights, parents, kept):
        match = candidates[:, :, None] == classes.long()[:, None, :]  # (B, T, k_p)
        found = (match * inside[:, None, :]).sum(-1)
        mean += weight * torch.where(match.any(-1), found, outside[:, None])
        rest += weight * outside
    seen_before = torch.tril(candidates[:, :, None] == candidates[:, None, :], diagonal=-1).any(-1)
    mean[seen_before] = -1.0  # one column per class
    # classes no parent kept all hold ``rest``: the lowest-numbered of them fill a row that kept fewer than k classes
    others = torch.arange(min(num_classes, k + candidates.shape[1]))[None, :].expand(len(candidates), -1)
    taken = (others[:, :, None] == candidates[:, None, :]).any(-1)
    columns = torch.cat([candidates, others], dim=1)
    means = torch.cat([mean, torch.where(taken, torch.full_like(others, -1.0, dtype=torch.float32),
                                         rest[:, None].expand(-1, others.shape[1]))], dim=1)
    order = torch.sort(means, dim=1, descending=True, stable=True).indices[:, :k]
    return means.gather(1, order).half(), columns.gather(1, order)


def merge_topk(parents: Sequence[tuple[torch.Tensor, torch.Tensor, str]], weights: Sequence[float], num_classes: int,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` (values float16 (B, k) descending, classes (B, k)) of the weighted mean of the parents' rows.

    ``parents``: per store (values float16 (B, k_p), classes (B, k_p), its residual rule); ``weights``: per store,
    normalised here (a store of two teachers weighs 2 against a store of one, as one mean of three would). A row
    every parent left empty (an image skipped) stays all zero; a row only some left empty is refused.
    """
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k {k}: expected 1 <= k <= {num_classes} classes")
    if len(parents) != len(weights) or len(parents) < 2 or min(weights) <= 0:
        raise ValueError(f"weights {list(weights)}: expected one positive weight for each of two or more stores")
    labelled = torch.stack([values[:, 0] > 0 for values, _, _ in parents])
    if (labelled != labelled[0]).any():
        row = int((labelled != labelled[0]).any(0).nonzero()[0])
        raise ValueError(f"row {row}: labelled in some stores and empty in others; their skipped images differ")
    weights = torch.tensor([float(w) for w in weights]) / sum(float(w) for w in weights)
    rows = len(parents[0][0])
    values = torch.zeros((rows, k), dtype=torch.float16)
    classes = torch.zeros((rows, k), dtype=torch.int64)
    for start in range(0, rows, ROWS_AT_ONCE):
        block = slice(start, start + ROWS_AT_ONCE)
        values[block], classes[block] = _merge_block([(v[block], c[block], r) for v, c, r in parents], weights,
                                                     num_classes, k)
    values[~labelled[0]] = 0
    classes[~labelled[0]] = 0
    return values, classes.to(index_dtype(num_classes))


# what two stores must share for their rows to be labels of the same crops, each with how to read it from the attrs
SAME_CROPS = {
    "dataset": lambda attrs: {key: attrs["dataset"].get(key) for key in ("fingerprint", "fingerprint_mode",
                                                                           "num_images", "classes")},
    "seeds": lambda attrs: attrs["seeds"],
    "res": lambda attrs: attrs["res"],
    "interpolation": lambda attrs: attrs["interpolation"],
    "crop": lambda attrs: attrs["crop"],
    "mix": lambda attrs: attrs.get("mix"),
    "skipped images": lambda attrs: sorted(attrs.get("skipped", [])),
    "residual": lambda attrs: attrs["residual"],
}


def _parent_record(store: LabelStore, weight: float) -> dict:
    """What the merged store records of one parent: where and when it was made, its teachers, its weight."""
    return {"url": store.url, "created": store.attrs["created"], "teachers": store.teachers, "weight": weight}


def check_mergeable(parents: Sequence[LabelStore]) -> None:
    """Refuse, in one line naming the first difference, stores whose rows are not labels of the same crops."""
    first = parents[0]
    for other in parents[1:]:
        for what, read in SAME_CROPS.items():
            if read(first.attrs) != read(other.attrs):
                detail = "" if what in ("dataset", "skipped images") else f" ({read(first.attrs)} vs {read(other.attrs)})"
                raise StoreError(f"{other.url}: its {what} differs from {first.url}'s{detail}; only stores of the same "
                                 f"crops merge: cache the new teacher with `cache-teachers --like {first.url}`")
        if other.chunk_rows != first.chunk_rows:
            raise StoreError(f"{other.url}: {other.chunk_rows} rows a chunk, {first.url} {first.chunk_rows}; cache "
                             f"with `--like {first.url}`, which takes its chunk rows too")
    for store in parents:
        if not store.is_complete:
            raise StoreError(f"{store.url}: store is incomplete; finish its cache-teachers before merging it")


def _index_of(store: LabelStore) -> DatasetIndex:
    """The store's images as a DatasetIndex, for the merged store's index arrays and skipped list."""
    index = store.index
    return DatasetIndex(root=store.url, paths=index.paths, labels=index.labels, sizes=index.sizes,
                        byte_sizes=np.zeros(len(index.labels), np.int64), classes=store.attrs["dataset"]["classes"],
                        skipped=store.skipped)


def _same_crops_in_unit(parents: Sequence[SlotLabels], urls: Sequence[str], slot: int, rows: slice) -> None:
    for name in ("boxes", "flips", "mix_partner", "mix_boxes"):
        first = getattr(parents[0], name)
        for url, other in zip(urls[1:], parents[1:]):
            if not np.array_equal(first, getattr(other, name)):
                raise StoreError(f"{url}: slot {slot} rows {rows.start}-{rows.stop - 1} hold other {name} than "
                                 f"{urls[0]}; these stores were not made on the same crops")


def merge_stores(urls: Sequence[str], out: str, k: int | None = None, weights: Sequence[float] | None = None,
                 storage_options: dict | None = None, progress: bool = True, log=print) -> dict:
    """Write ``out``: per row the top-``k`` (default: the parents' largest k) of the parents' weighted mean.

    ``weights`` default to each parent's number of teachers, which makes the result the mean over all their teachers.
    Unit by unit, like cache-teachers: a killed merge resumes where it stopped; the parents are only read.
    """
    parents = [LabelStore.open(url, "r", storage_options) for url in urls]
    check_mergeable(parents)
    weights = list(weights) if weights is not None else [len(store.teachers) for store in parents]
    if len(weights) != len(parents):
        raise ValueError(f"--weights: {len(weights)} value(s) for {len(parents)} stores")
    first = parents[0]
    k = k or max(store.attrs["topk"] for store in parents)
    classes = first.num_classes
    if not 1 <= k <= classes:
        raise ValueError(f"--topk {k}: expected 1 to the {classes} classes")
    attrs = first.attrs
    spec = {"dataset": attrs["dataset"], "teachers": [t for store in parents for t in store.teachers],
            "res": attrs["res"], "interpolation": attrs["interpolation"], "topk": k, "residual": attrs["residual"],
            "crop": attrs["crop"], **({"mix": attrs["mix"]} if attrs.get("mix") else {}),
            "merged_from": [_parent_record(store, w) for store, w in zip(parents, weights)]}
    writer = StoreWriter.create_or_extend(out, spec, _index_of(first), first.seeds, first.chunk_rows,
                                          storage_options)
    if writer.attrs.get("merged_from") != spec["merged_from"]:
        raise StoreError(f"{out}: holds other labels than the merge of {', '.join(urls)}; merge into a new --out")
    units = writer.pending_units()
    log(f"labels merge: {len(parents)} stores of {', '.join(str(len(s.teachers)) for s in parents)} teacher(s), "
        f"weights {weights}, top-{k}; {len(units)} of {writer.done().size} unit(s) to do")
    held: tuple[int, list[SlotLabels]] | None = None
    for slot, chunk in tqdm(units, desc="labels merge", unit="unit", disable=None if progress else True):
        if held is None or held[0] != slot:
            held = (slot, [store.read_slot(slot) for store in parents])
        rows = writer.rows(chunk)
        unit = [labels.take(rows) for labels in held[1]]
        _same_crops_in_unit(unit, urls, slot, rows)
        values, kept = merge_topk([(torch.from_numpy(u.probs), torch.from_numpy(u.classes.astype(np.int64)),
                                    attrs["residual"]) for u in unit], weights, classes, k)
        writer.write_unit(slot, chunk, dataclasses.replace(unit[0], probs=values.numpy(),
                                                           classes=kept.to(torch.int64).numpy()))
    complete = writer.finalize()
    return {"store": out, "complete": complete, "units_merged": len(units), "topk": k, "weights": weights}


def like_options(url: str, storage_options: dict | None = None) -> dict:
    """The cache-teachers options (CacheJob's names) that make a store of the same crops as the store at ``url``:
    what `cache-teachers --like` takes, so that the new store merges with it."""
    store = LabelStore.open(url, "r", storage_options)
    attrs, mix = store.attrs, store.mix
    return {"res": attrs["res"], "interpolation": attrs["interpolation"], "topk": attrs["topk"],
            "residual": attrs["residual"], "seeds": len(store.seeds), "chunk_rows": store.chunk_rows,
            "fingerprint": attrs["dataset"].get("fingerprint_mode", "size"), "scale": tuple(store.crop.scale),
            "ratio": tuple(store.crop.ratio), "cutmix": mix.alpha if mix.enabled else 0.0,
            "mixup_prob": mix.prob if mix.enabled else 1.0}
