"""`labels verify`: completeness, chunk checksums and presence, the written-units record, checks of the rows that
need no teachers, the dataset fingerprint, and teachers recomputed on stored crops.

In a CutMix store the mixed rows are recomputed on composites made here with PIL, apart
from the code both stages compose with (pipeline.mix), so a fault there shows up too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.distributed import resolve_device
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.loader import ReplayLoader
from mealv2.softlabels.integrity import missing_chunks, slot_problems, structure_problems, verify_chunks
from mealv2.softlabels.schema import StoreError, teacher_identity
from mealv2.softlabels.store import LabelStore, SlotLabels
from mealv2.softlabels.teachers import TeacherEnsemble, TeacherError, TeacherSpec, parse_teachers
from mealv2.softlabels.topk import compress, expand


def _store_teachers(store: LabelStore, given: str | None) -> list[TeacherSpec]:
    """The store's teachers: its pretrained tags, or the given NAME=PATH specs whose sha256 must match."""
    records = store.teachers
    if given:
        return parse_teachers(given, store.res)
    if any("checkpoint_sha256" in r for r in records):
        raise TeacherError(f"{store.url}: its teachers are local checkpoints: give --teachers NAME=PATH,...")
    return [TeacherSpec(r["pretrained"]) for r in records]


def _pil_composite(crops: dict[int, torch.Tensor], row: int, labels: SlotLabels) -> torch.Tensor:
    """Row ``row``'s crop with its stored box pasted in from its partner's crop, by PIL (uint8 CHW)."""
    image = Image.fromarray(crops[row].permute(1, 2, 0).numpy())
    partner = int(labels.mix_partner[row])
    top, left, height, width = (int(v) for v in labels.mix_boxes[row])
    if partner >= 0 and height and width:
        region = Image.fromarray(crops[partner].permute(1, 2, 0).numpy()).crop((left, top, left + width, top + height))
        image.paste(region, (left, top))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _as_labelled(loader: ReplayLoader, rows: np.ndarray, labels: SlotLabels, desc: str):
    """(images, positions) of ``rows`` as the teachers saw them: the stored crops, mixed rows composed by PIL."""
    if labels.mix_partner is None:
        for images, indices in loader.epoch(rows, labels.boxes, labels.flips, desc=desc):
            yield images, indices.cpu().numpy()
        return
    partners = labels.mix_partner[rows]
    crops = {}
    for images, indices in loader.epoch(np.union1d(rows, partners[partners >= 0]), labels.boxes, labels.flips,
                                        desc=desc):
        crops.update(zip(indices.tolist(), images.cpu()))
    for start in range(0, len(rows), loader.batch_size):
        span = rows[start:start + loader.batch_size]
        yield torch.stack([_pil_composite(crops, int(i), labels) for i in span]).to(loader.device), span


def recompute(store: LabelStore, index: DatasetIndex, count: int, teachers: str | None = None, device: str = "auto",
              decoder: str = "auto", workers: int | None = None, batch_size: int = 32) -> dict:
    """Re-run the teachers on ``count`` stored crops (or composites) spread over every slot; max |Δp|, mean KL.

    ``index``: the store's data (LabelStore.matching_index). Every slot is checked, so labels written against
    another slot's crops (a misaligned unit) show up.
    """
    torch_device = resolve_device(device)
    ensemble = TeacherEnsemble(_store_teachers(store, teachers), store.num_classes, torch_device)
    if teacher_identity(ensemble.records) != teacher_identity(store.teachers):
        raise TeacherError(f"{store.url}: the given teachers are not the ones that made the store")
    loader = ReplayLoader(index, store.res, batch_size, torch_device, decoder, store.interpolation, workers)
    slots = len(store.seeds)
    per_slot = [len(part) for part in np.array_split(np.arange(count), slots)]
    max_dp, kls, worst_slot, crops = 0.0, [], None, 0
    for slot, wanted in enumerate(per_slot):
        labels = store.read_slot(slot, checked=False)  # the record's verdict is reported apart
        labelled = np.flatnonzero(labels.labelled())
        rows = labelled[np.unique(np.linspace(0, len(labelled) - 1, min(wanted, len(labelled))).astype(np.int64))]
        for images, at in _as_labelled(loader, rows, labels, f"recompute slot {slot}"):
            probs = ensemble(images)[0].cpu()
            stored_values = torch.from_numpy(labels.probs[at].astype(np.float32))
            stored_classes = torch.from_numpy(labels.classes[at].astype(np.int64))
            dp = float((probs.gather(1, stored_classes) - stored_values).abs().max())
            if dp > max_dp:
                max_dp, worst_slot = dp, slot
            stored = expand(stored_values, stored_classes, store.num_classes, store.residual)
            again = expand(*compress(probs, store.k), store.num_classes, store.residual)
            kls.extend((stored * (stored.clamp_min(1e-12).log() - again.clamp_min(1e-12).log())).sum(-1).tolist())
            crops += len(at)
    return {"crops": crops, "slots": slots, "max_abs_dp": max_dp, "worst_slot": worst_slot,
            "mean_kl": float(np.mean(kls)) if kls else 0.0}


def row_problems(store: LabelStore) -> list[str]:
    """Per unit: rows that differ from the written-units record, unlisted empty rows, and malformed rows.

    A unit holding an undecodable chunk is left to ``verify_chunks``, which names the chunk.
    """
    problems = []
    sizes = store.index.sizes
    for slot, chunk in np.ndindex(len(store.seeds), store.num_chunks):
        rows = store.rows(chunk)
        try:
            unit = SlotLabels(**{name: store.group[name][slot, rows] for name in store.arrays})
        except (ValueError, RuntimeError, OSError):  # a damaged chunk: verify_chunks reports it by name
            continue
        problems += slot_problems(store, slot, unit, chunk)
        problems += [f"slot {slot} chunk {chunk}: {what}" for what in structure_problems(
            unit, sizes[rows], store.num_classes, store.num_images, store.res, rows.start, unit.labelled())]
    return problems


def verify(url: str, data: str | None = None, recompute_count: int = 0, teachers: str | None = None,
           device: str = "auto", decoder: str = "auto", max_dp: float = 0.02, max_kl: float = 1e-3,
           storage_options: dict | None = None, workers: int | None = None) -> dict:
    """Every check `labels verify` makes; ``problems`` lists what failed (empty means healthy)."""
    store = LabelStore.open(url, "r", storage_options)
    report = {"complete": store.is_complete, "problems": []}
    if not report["complete"]:
        report["problems"].append(f"incomplete: {int((~store.done()).sum())} unit(s) not written")
    report["problems"] += verify_chunks(store) + missing_chunks(store) + row_problems(store)
    if data is None:
        return report
    try:
        index = store.matching_index(Path(data) / "train")
    except StoreError as err:
        report["problems"].append(str(err))
        return report
    if recompute_count:
        try:
            report["recompute"] = recompute(store, index, recompute_count, teachers, device, decoder, workers)
        except (ValueError, RuntimeError, OSError) as err:  # a damaged chunk: the report above still stands
            report["problems"].append(f"recompute stopped: {first_line(err)}")
            return report
        if report["recompute"]["max_abs_dp"] > max_dp or report["recompute"]["mean_kl"] > max_kl:
            report["problems"].append(
                f"recomputed labels differ: max |dp| {report['recompute']['max_abs_dp']:.4f} "
                f"(tolerance {max_dp}), mean KL {report['recompute']['mean_kl']:.2e} (tolerance {max_kl})")
    return report
