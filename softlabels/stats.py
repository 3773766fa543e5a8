"""`labels stats`: a label store's figures per seed slot, to judge it before training on it (docs/labels-stats.md).

Each slot's arrays are read whole, once (LabelStore.read_slot). No dense (N, C) target is
built: the entropy of the dense target comes in closed form from the k stored values and
the store's residual rule, so a 1.28M-image, 1000-class slot costs a few (N, k) arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mealv2.softlabels.schema import RESIDUALS, StoreError
from mealv2.softlabels.store import LabelStore, SlotLabels


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x elementwise, 0 where x is 0."""
    return x * np.log(np.where(x > 0, x, 1.0))


def dense_entropy(values: np.ndarray, num_classes: int, residual: str = "uniform") -> np.ndarray:
    """Entropy in nats, (N,) float64, of the dense targets `topk.expand` builds from top-k values (N, k).

    "uniform": -sum v log v - (C - k) r log r with r = max(1 - sum v, 0) / (C - k) on each other
    class; "renorm" (and k = C): the entropy of v / sum v.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual {residual!r}: expected one of {RESIDUALS}")
    values = values.astype(np.float64)
    k = values.shape[1]
    total = values.sum(axis=1)
    if residual == "renorm" or k == num_classes:
        return -_xlogx(values / np.maximum(total, 1e-12)[:, None]).sum(axis=1)
    rest = np.maximum(1.0 - total, 0.0) / (num_classes - k)
    return -_xlogx(values).sum(axis=1) - (num_classes - k) * _xlogx(rest)


def mixed_rows(labels: SlotLabels) -> np.ndarray:
    """(N,) bool: rows whose image is a CutMix composite (a partner and a pasted box of non-zero area)."""
    if labels.mix_partner is None:
        return np.zeros(len(labels.probs), bool)
    return (labels.mix_partner >= 0) & (labels.mix_boxes[:, 2] > 0) & (labels.mix_boxes[:, 3] > 0)


@dataclass
class SlotStats:
    """One seed slot's figures over its labelled rows; masses, accuracies and agreement are fractions in [0, 1]."""

    slot: int
    seed: int
    rows: int                 # labelled rows (rows left out by --skip-bad hold zeros and are not counted)
    entropy: float            # mean entropy of the dense target (nats), the store's residual rule
    top1_mass: float          # mean stored probability of the teachers' top-1 class
    topk_mass: float          # mean stored sum of the k values (the rest is the residual)
    teacher_top1: float | None  # teachers' top-1 == index/labels over labelled rows that are not composites
    agreement: float | None   # mean over the other slots of the share of rows with the same top-1 class
    mixed: int = 0            # CutMix composites among the labelled rows
    mixed_top1_either: float | None = None  # composites whose top-1 is their own or their partner's label


@dataclass
class StoreStats:
    """A store's figures: one SlotStats per slot written whole, slot-by-slot agreement, per-class top-1."""

    url: str
    num_images: int
    num_classes: int
    topk: int
    residual: str
    num_slots: int            # slots in the store; only the first len(slots) are written whole
    skipped: int              # entries of the store's skipped list
    slots: list[SlotStats]
    agreement: np.ndarray     # (S, S) float64: share of rows labelled in both slots with the same top-1
    class_top1: np.ndarray    # (C,) float64: teachers' top-1 per true class over every slot (nan: no row)
    classes: list[str]

    def to_dict(self) -> dict:
        """The figures as JSON-ready values (nan per class becomes None)."""
        fields = {key: getattr(self, key) for key in ("url", "num_images", "num_classes", "topk", "residual",
                                                      "num_slots", "skipped")}
        return fields | {
            "slots": [asdict(s) for s in self.slots], "agreement": self.agreement.tolist(),
            "class_top1": {name: (None if np.isnan(v) else float(v)) for name, v in zip(self.classes, self.class_top1)}}

    def weakest_classes(self, count: int = 5) -> list[tuple[str, float]]:
        """The ``count`` classes the teachers get right least often: (name, top-1 fraction)."""
        order = [int(c) for c in np.argsort(self.class_top1, kind="stable") if not np.isnan(self.class_top1[c])]
        return [(self.classes[c], float(self.class_top1[c])) for c in order[:count]]

    def table(self) -> list[str]:
        """The terminal table: a header, one line per slot, the weakest classes."""
        mixes = any(s.mixed for s in self.slots)
        left_out = self.num_images - min(s.rows for s in self.slots)
        lines = [f"{self.url}: {self.num_images} images, {self.num_classes} classes, top-{self.topk}, "
                 f"residual {self.residual}; {len(self.slots)} of {self.num_slots} slot(s) written whole",
                 f"rows left out (no labels): {left_out} (skipped list: {self.skipped}); "
                 f"entropy in nats, a uniform target has {np.log(self.num_classes):.3f}"]
        head = f"{'slot':>4} {'seed':>5} {'rows':>9} {'entropy':>8} {'top-1 mass':>10} {'top-k mass':>10} " \
               f"{'teachers top-1':>14} {'agreement':>9}" + (f" {'mixed':>8} {'mixed: own/partner':>18}" if mixes else "")
        lines.append(head)
        for s in self.slots:
            agree = "-" if s.agreement is None else f"{100 * s.agreement:.2f}%"
            top1 = "-" if s.teacher_top1 is None else f"{100 * s.teacher_top1:.2f}%"
            line = f"{s.slot:>4} {s.seed:>5} {s.rows:>9} {s.entropy:>8.4f} {s.top1_mass:>10.4f} {s.topk_mass:>10.4f} " \
                   f"{top1:>14} {agree:>9}"
            if mixes:
                either = "-" if s.mixed_top1_either is None else f"{100 * s.mixed_top1_either:.2f}%"
                line += f" {s.mixed:>8} {either:>18}"
            lines.append(line)
        weakest = ", ".join(f"{name} {100 * value:.1f}%" for name, value in self.weakest_classes())
        lines.append(f"weakest classes (teachers' top-1 over every slot): {weakest}")
        return lines


def _slot_figures(slot: int, seed: int, labels: SlotLabels, truth: np.ndarray, num_classes: int,
                  residual: str) -> tuple[SlotStats, np.ndarray, np.ndarray]:
    """One slot's SlotStats (agreement left empty), its (N,) top-1 classes and its (N,) bool scored rows."""
    labelled = labels.labelled()
    values = labels.probs[labelled]
    top1 = labels.classes[:, 0].astype(np.int64)
    mixed = mixed_rows(labels) & labelled
    scored = labelled & ~mixed
    either = None
    if mixed.any():
        partner_truth = truth[labels.mix_partner[mixed]]
        either = float(np.mean((top1[mixed] == truth[mixed]) | (top1[mixed] == partner_truth)))
    stats = SlotStats(
        slot=slot, seed=seed, rows=int(labelled.sum()),
        entropy=float(dense_entropy(values, num_classes, residual).mean()),
        top1_mass=float(values[:, 0].astype(np.float64).mean()),
        topk_mass=float(values.astype(np.float64).sum(axis=1).mean()),
        teacher_top1=float(np.mean(top1[scored] == truth[scored])) if scored.any() else None,
        agreement=None, mixed=int(mixed.sum()), mixed_top1_either=either)
    return stats, np.where(labelled, top1, -1), scored


def store_stats(url: str, data: str | None = None, storage_options: dict | None = None) -> StoreStats:
    """Every slot's figures, reading each written slot whole once.

    ``data``: a dataset ROOT whose train/ split must be the one the store was made from
    (LabelStore.matching_index); otherwise a StoreError says the labels are for another dataset.
    """
    store = LabelStore.open(url, "r", storage_options)
    if data is not None:
        store.matching_index(Path(data) / "train")
    written = store.complete_slots()
    if not written:
        raise StoreError(f"{url}: no seed slot is written whole yet; finish cache-teachers first")
    truth = store.index.labels.astype(np.int64)
    num_classes = store.num_classes
    slots, top1s, correct, counted = [], [], np.zeros(num_classes), np.zeros(num_classes)
    for slot, seed in enumerate(store.seeds[:written]):
        stats, top1, scored = _slot_figures(slot, seed, store.read_slot(slot), truth, num_classes, store.residual)
        slots.append(stats)
        top1s.append(top1)
        counted += np.bincount(truth[scored], minlength=num_classes)
        correct += np.bincount(truth[scored], weights=(top1[scored] == truth[scored]).astype(np.float64),
                               minlength=num_classes)
    agreement = np.eye(written)
    for a in range(written):
        for b in range(a + 1, written):
            both = (top1s[a] >= 0) & (top1s[b] >= 0)
            agreement[a, b] = agreement[b, a] = np.mean(top1s[a][both] == top1s[b][both]) if both.any() else np.nan
    for s in slots if written > 1 else ():
        s.agreement = float(np.delete(agreement[s.slot], s.slot).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        class_top1 = correct / counted
    return StoreStats(url=url, num_images=store.num_images, num_classes=num_classes, topk=store.k,
                      residual=store.residual, num_slots=len(store.seeds), skipped=len(store.skipped), slots=slots,
                      agreement=agreement, class_top1=class_top1, classes=list(store.attrs["dataset"]["classes"]))


def plot_stats(stats: StoreStats, path: str | Path) -> None:
    """A PNG: entropy per slot, the teachers' masses and top-1 per slot, and the slot-by-slot top-1 agreement."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no screen is needed
    import matplotlib.pyplot as plt

    slots = stats.slots
    ticks = [f"{s.slot}\nseed {s.seed}" for s in slots]
    x = np.arange(len(slots))
    panels = 3 if len(slots) > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    bars = axes[0].bar(x, [s.entropy for s in slots], color="#3a7bd0")
    axes[0].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[0].set(title=f"mean entropy of the dense target ({stats.residual})", ylabel="nats (uniform: "
                f"{np.log(stats.num_classes):.2f})", xticks=x, xticklabels=ticks)
    series = {"top-1 mass": [s.top1_mass for s in slots], f"top-{stats.topk} mass": [s.topk_mass for s in slots],
              "teachers' top-1 vs labels": [s.teacher_top1 for s in slots]}
    if len(slots) > 1:
        series["top-1 agreement with other slots"] = [s.agreement for s in slots]
    for (name, values), marker in zip(series.items(), "osD^"):
        axes[1].plot(x, [np.nan if v is None else v for v in values], marker=marker, label=name)
    axes[1].set(title="per slot (fractions)", ylim=(0, 1.05), xticks=x, xticklabels=ticks)
    axes[1].legend(fontsize=8, loc="lower left")
    if len(slots) > 1:
        image = axes[2].imshow(stats.agreement, vmin=0, vmax=1, cmap="viridis")
        if len(slots) <= 12:
            for (a, b), value in np.ndenumerate(stats.agreement):
                axes[2].text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=8,
                             color="white" if value < 0.6 else "black")
        axes[2].set(title="top-1 agreement between slots", xlabel="slot", ylabel="slot", xticks=x, yticks=x)
        fig.colorbar(image, ax=axes[2], fraction=0.046)
    fig.suptitle(f"{stats.url}: {stats.num_images} images, {stats.num_classes} classes, top-{stats.topk}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
