"""`labels verify`: completeness, chunk checksums, dataset fingerprint, and teachers recomputed on stored crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import load_index
from pipeline.loader import ReplayLoader, resolve_device
from softlabels.store import LabelStore, teacher_identity
from softlabels.teachers import TeacherEnsemble, TeacherError, TeacherSpec, parse_teachers
from softlabels.topk import compress, expand


def _store_teachers(store: LabelStore, given: str | None) -> list[TeacherSpec]:
    """The store's teachers: its pretrained tags, or the given NAME=PATH specs whose sha256 must match."""
    records = store.attrs["teachers"]
    if given:
        return parse_teachers(given, store.attrs["res"])
    if any("checkpoint_sha256" in r for r in records):
        raise TeacherError(f"{store.url}: its teachers are local checkpoints: give --teachers NAME=PATH,...")
    return [TeacherSpec(r["pretrained"]) for r in records]


def recompute(store: LabelStore, data: str, count: int, teachers: str | None = None, device: str = "auto",
              decoder: str = "auto", batch_size: int = 32) -> dict:
    """Re-run the teachers on ``count`` stored crops of slot 0; max |Δp| of the top-k and mean KL."""
    attrs = store.attrs
    index = load_index(Path(data) / "train", skip_bad=bool(attrs.get("skipped")))
    torch_device = resolve_device(device)
    ensemble = TeacherEnsemble(_store_teachers(store, teachers), store.num_classes, torch_device)
    if teacher_identity(ensemble.records) != teacher_identity(attrs["teachers"]):
        raise TeacherError(f"{store.url}: the given teachers are not the ones that made the store")
    labels = store.read_slot(0)
    rows = np.unique(np.linspace(0, store.num_images - 1, min(count, store.num_images)).astype(np.int64))
    loader = ReplayLoader(index, attrs["res"], batch_size, torch_device, decoder, attrs["interpolation"])
    max_dp, kls = 0.0, []
    for images, indices in loader.epoch(rows, labels.boxes, labels.flips, desc="recompute"):
        probs, _ = ensemble(images)
        at = indices.numpy()
        stored_values = torch.from_numpy(labels.probs[at].astype(np.float32))
        stored_classes = torch.from_numpy(labels.classes[at].astype(np.int64))
        fresh = probs.cpu().gather(1, stored_classes)
        max_dp = max(max_dp, float((fresh - stored_values).abs().max()))
        stored = expand(stored_values, stored_classes, store.num_classes, attrs["residual"])
        again = expand(*compress(probs.cpu(), attrs["topk"]), store.num_classes, attrs["residual"])
        kl = (stored * (stored.clamp_min(1e-12).log() - again.clamp_min(1e-12).log())).sum(-1)
        kls.extend(kl.tolist())
    return {"crops": len(rows), "max_abs_dp": max_dp, "mean_kl": float(np.mean(kls)) if kls else 0.0}


def verify(url: str, data: str | None = None, recompute_count: int = 0, teachers: str | None = None,
           device: str = "auto", decoder: str = "auto", max_dp: float = 0.02, max_kl: float = 1e-3,
           storage_options: dict | None = None) -> dict:
    """Every check `labels verify` makes; ``problems`` lists what failed (empty means healthy)."""
    store = LabelStore.open(url, "r", storage_options)
    attrs = store.attrs
    report = {"complete": bool(attrs["complete"]) and bool(store.done().all()), "problems": []}
    if not report["complete"]:
        report["problems"].append(f"incomplete: {int((~store.done()).sum())} unit(s) not written")
    report["problems"] += store.verify_chunks()
    if data is not None:
        index = load_index(Path(data) / "train", skip_bad=bool(attrs.get("skipped")))
        if index.fingerprint != attrs["dataset"]["fingerprint"]:
            report["problems"].append(f"{data}/train does not match the store's dataset fingerprint")
        elif recompute_count:
            report["recompute"] = recompute(store, data, recompute_count, teachers, device, decoder)
            if report["recompute"]["max_abs_dp"] > max_dp or report["recompute"]["mean_kl"] > max_kl:
                report["problems"].append(
                    f"recomputed labels differ: max |dp| {report['recompute']['max_abs_dp']:.4f} "
                    f"(tolerance {max_dp}), mean KL {report['recompute']['mean_kl']:.2e} (tolerance {max_kl})")
    return report
