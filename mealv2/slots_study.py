"""`mealv2 demo --slots-study`: how many seed slots a store needs, measured on the demo's setting.

The demo's teachers label one store of the largest S; the demo's distilled student then
trains from its first S slots (epoch e reads slot e mod S) for each S, and once with the
teachers online (fresh crops every epoch, no store), over several run seeds. Writes
OUT/slots.json, OUT/slots.png (accuracy and store bytes against S, online as a line) and
OUT/slots.md (the table, to copy into docs/slots.md).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from mealv2.demo import Demo

SLOTS = (1, 2, 4, 8, 16)


class SlotsStudy(Demo):
    """The demo's data, teachers and student; one store, S slots read at a time; online as the limit."""

    def __init__(self, *args, slots: tuple[int, ...] = SLOTS, run_seeds: tuple[int, ...] = (0, 1, 2), **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = tuple(sorted(slots))
        self.run_seeds = tuple(run_seeds)

    def run(self) -> dict:
        started = time.perf_counter()
        spec = self._teachers({}, self._start())[1]
        store = self._cache(spec, self.slots[-1])
        info = self._command("store", "labels", "info", store, "--json")
        top1: dict[str, list[float]] = {}
        for slots in self.slots:
            top1[str(slots)] = [self._distill(f"slots-{slots}-seed-{seed}", "--labels", store, "--seeds", slots,
                                              seed=seed)[-1]["val_top1"] for seed in self.run_seeds]
        online = [self._distill(f"online-seed-{seed}", "--online", "--teachers", spec, "--res", self.plan.res,
                                *self.crop, seed=seed)[-1]["val_top1"] for seed in self.run_seeds]
        bytes_per_slot = info["bytes"] / self.slots[-1]
        result = {"slots": list(self.slots), "top1": top1, "online_top1": online, "run_seeds": list(self.run_seeds),
                  "bytes_per_slot": bytes_per_slot, "images": info["images"],
                  "student": self.plan.student, "epochs": self.plan.student_epochs,
                  "seconds": self.seconds | {"total": round(time.perf_counter() - started, 1)}}
        (self.out / "slots.json").write_text(json.dumps(result, indent=2))
        (self.out / "slots.md").write_text(slots_table(result))
        plot_slots(result, self.out / "slots.png")
        print(slots_table(result))
        return result


def _mean_sd(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def slots_table(result: dict) -> str:
    """The study as a Markdown table: S, store bytes, mean ± sd top-1 over run seeds, each seed's."""
    seeds = ", ".join(map(str, result["run_seeds"]))
    lines = [f"| slots S | store | top-1 (mean ± sd over run seeds {seeds}) | each seed |", "|---|---|---|---|"]
    for slots in result["slots"]:
        values = result["top1"][str(slots)]
        lines.append(f"| {slots} | {slots * result['bytes_per_slot'] / 1e6:.2f} MB | {_mean_sd(values)} | "
                     + ", ".join(f"{v:.2f}" for v in values) + " |")
    online = result["online_top1"]
    lines.append(f"| online (new crops every epoch) | none | {_mean_sd(online)} | "
                 + ", ".join(f"{v:.2f}" for v in online) + " |")
    return "\n".join(lines) + "\n"


def plot_slots(result: dict, path: Path) -> None:
    """Accuracy against S (log scale) with the online accuracy as a line; store bytes on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = result["slots"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    means = [statistics.mean(result["top1"][str(s)]) for s in slots]
    for s in slots:
        ax.plot([s] * len(result["top1"][str(s)]), result["top1"][str(s)], "o", color="#3a7bd0", alpha=0.4)
    ax.plot(slots, means, "-o", color="#3a7bd0", label="from a store of S slots (mean of run seeds)")
    online = statistics.mean(result["online_top1"])
    ax.axhline(online, color="#d08c3a", linestyle="--", label="teachers online (new crops every epoch)")
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, online - 0.5), max(high, online + 0.5))  # the online line may lie above every store
    ax.set_xscale("log", base=2)
    ax.set(xlabel="seed slots S", ylabel="top-1 %",
           title=f"{result['student']}, {result['epochs']} epochs, {result['images']} images")
    sizes = ax.twinx()
    sizes.plot(slots, [s * result["bytes_per_slot"] / 1e6 for s in slots], ":", color="#777777", label="store MB")
    sizes.set_ylabel("store MB")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
