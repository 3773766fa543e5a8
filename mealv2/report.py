"""Figures of runs: `mealv2 report` (the curves of any runs, for comparing runs from one store) and the
demo's report.png (validation curves of every run, training losses, and the accuracy bars)."""

from __future__ import annotations

from pathlib import Path

import json

import matplotlib

matplotlib.use("Agg")  # files only: no screen is needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(curves: dict[str, list[dict]], summary: dict, path: Path) -> None:
    """curves: run name → its metrics.jsonl rows; summary: the demo's summary.json."""
    fig = report_figure(curves, summary)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_figure(curves: dict[str, list[dict]], summary: dict):
    """Validation top-1 of every run; the training losses in two panels, since a cross-entropy to hard labels and
    one to the teachers' soft labels are not on one scale; the accuracy bars."""
    fig, (val_ax, hard_ax, soft_ax, bar_ax) = plt.subplots(1, 4, figsize=(21, 4.8))
    for name, rows in curves.items():
        style = "--" if name.startswith("teacher") else "-"
        points = [(r["epoch"], r["val_top1"]) for r in rows if r["val_top1"] is not None]
        val_ax.plot(*zip(*points), style, marker="o", label=name)
        soft = rows[0].get("kd_loss") is not None
        (soft_ax if soft else hard_ax).plot([r["epoch"] for r in rows], [r["kd_loss" if soft else "loss"]
                                                                         for r in rows], style, marker=".", label=name)
    val_ax.set(title="validation top-1", xlabel="epoch", ylabel="%")
    hard_ax.set(title="training loss: cross-entropy to hard labels", xlabel="epoch")
    soft_ax.set(title="training loss: cross-entropy to the teachers' soft labels", xlabel="epoch")
    for ax in (val_ax, hard_ax, soft_ax):
        ax.legend(fontsize=8)

    plan = summary["plan"]
    names = [*summary["teachers"], "ensemble", "hard labels", "MEAL V2"]
    values = [*summary["teacher_top1"], summary["ensemble_top1"], summary["baseline_top1"], summary["distilled_top1"]]
    colours = ["#999999"] * (len(summary["teachers"]) + 1) + ["#d08c3a", "#3a7bd0"]
    bars = bar_ax.bar(names, values, color=colours)
    low_gain, high_gain = summary["gain_ci95"]  # the gain's paired interval, drawn on the MEAL V2 bar
    bar_ax.errorbar([len(names) - 1], [summary["baseline_top1"] + summary["gain"]],
                    yerr=[[summary["gain"] - low_gain], [high_gain - summary["gain"]]], fmt="none", ecolor="black",
                    capsize=6, label="gain's 95% interval (paired bootstrap)")
    bar_ax.legend(fontsize=8, loc="upper right")
    bottom = max(0.0, min(values) - 10)
    bar_ax.set_ylim(bottom, min(100.0, max(values) + 3))
    for bar, value in zip(bars, values):  # inside each bar's foot, clear of the interval drawn on its top
        bar_ax.text(bar.get_x() + bar.get_width() / 2, bottom + 0.5, f"{value:.2f}", ha="center", va="bottom",
                    color="white", fontsize=9)
    bar_ax.set(title=f"top-1 on {summary['val_images']} test images\nstudent {plan['student']}", ylabel="%")
    bar_ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def plot_runs(runs: list[Path], path: Path) -> None:
    """Validation top-1 (and the EMA's), training loss and lr per epoch of each run folder's metrics.jsonl."""
    fig, (val_ax, loss_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run in runs:
        rows = read_metrics(run)
        epochs = [row["epoch"] for row in rows]
        for key, style in (("val_top1", "-"), ("val_top1_ema", ":")):
            points = [(row["epoch"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                val_ax.plot(*zip(*points), style, marker="o", label=run.name + (" EMA" if "ema" in key else ""))
        loss_ax.plot(epochs, [row["loss"] for row in rows], marker=".", label=run.name)
        lr_ax.plot(epochs, [row["lr"] for row in rows], marker=".", label=run.name)
    val_ax.set(title="validation top-1", xlabel="epoch", ylabel="%")
    loss_ax.set(title="training loss", xlabel="epoch")
    lr_ax.set(title="learning rate (at the epoch's start)", xlabel="epoch", yscale="log")
    for ax in (val_ax, loss_ax, lr_ax):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl rows; a missing or empty file is one clear error naming it."""
    path = run / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        raise ValueError(f"{path}: not found; expected a run folder written by mealv2 distill or train") from None
    except ValueError:
        raise ValueError(f"{path}: a line is not JSON; is this a mealv2 run folder?") from None
    if not rows:
        raise ValueError(f"{path}: holds no epoch yet")
    return rows
