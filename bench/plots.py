"""The bench's figure: each ratio against its target, and the slot-load cost per million images by store size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_bench(results: dict, verdicts: dict, targets: dict, path: Path) -> None:
    """Bars for the ratios (red where a target is missed, a black tick at each target) and slot-load costs."""
    ratios = {key: value for key, value in results.items()
              if key.startswith(("stage1_efficiency", "stage2_cached_vs", "stage2_online_ideal", "loader_"))}
    loads = {key.rsplit("_", 1)[-1]: value for key, value in results.items() if key.startswith("label_slot_load")}
    fig, (ratio_ax, load_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    colours = ["#3a7bd0" if verdicts.get(key, True) else "#d0453a" for key in ratios]
    bars = ratio_ax.barh(list(ratios), list(ratios.values()), color=colours)
    ratio_ax.bar_label(bars, fmt="%.2f")
    for row, key in enumerate(ratios):
        if key in targets:
            ratio_ax.plot(targets[key], row, marker="|", markersize=22, markeredgewidth=2, color="black")
    ratio_ax.axvline(1.0, color="#999999", linewidth=0.8)
    ratio_ax.set(title="ratios measured in one run (|: target, red: missed)", xlabel="ratio")
    load_ax.bar(list(loads), list(loads.values()), color="#3a7bd0")
    load_ax.set(title="read one seed slot", xlabel="images in the store", ylabel="ms per million images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
