"""`mealv2 demo`: MEAL V2 in miniature on Fashion-MNIST, end to end on the CPU, through the real commands.

Every stage is a `mealv2 ...` command line run in this process (and echoed, so it can be
copied): data, two teachers, their ensemble's accuracy, the label cache, a hard-label
baseline and the distilled student with the same epochs and pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo's size and duration depend on."""

    limit_train: int | None
    limit_val: int | None
    res: int
    teachers: tuple[str, ...]
    student: str
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    student_weight_decay: float  # both students: from scratch, the paper's zero weight decay does not apply
    discriminator: bool
    crop_scale: tuple[float, float]  # RandomResizedCrop area range of the teachers, the cache and the baseline
    seeds: int  # crop seed slots cached: the student sees a new crop of each image for this many epochs

    def lr_steps(self, epochs: int) -> str:
        """×0.1 at two thirds and again near the end, as a step schedule compressed into a short run."""
        return ",".join(str(e) for e in sorted({max(1, 2 * epochs // 3), epochs - 1}) if 0 < e < epochs)


# Calibrated on 2 CPU cores (docs/demo.md): about 13 minutes. The student's lr, weight decay, the
# discriminator left out and the crop scale were chosen there by measurement at this scale (from scratch,
# 32 px, 12 epochs); milder crops (0.25) raised every model but not the gain.
FULL = DemoPlan(limit_train=10_000, limit_val=None, res=32, teachers=("resnet18", "resnet10t"),
                student="mobilenetv3_small_050", teacher_epochs=12, student_epochs=12, batch_size=128,
                teacher_lr=0.1, student_lr=0.03, student_weight_decay=1e-4, discriminator=False,
                crop_scale=(0.08, 1.0), seeds=12)
# The test suite's run: a few hundred images, timm's tiny test models, one epoch each.
QUICK = DemoPlan(limit_train=300, limit_val=200, res=32, teachers=("test_resnet", "test_efficientnet"),
                 student="test_convnext", teacher_epochs=1, student_epochs=1, batch_size=32, teacher_lr=0.05,
                 student_lr=0.05, student_weight_decay=1e-4, discriminator=False, crop_scale=(0.08, 1.0),
                 seeds=1)


class Demo:
    """Runs the plan's commands into OUT and gathers their results into OUT/summary.json."""

    def __init__(self, out: str, seed: int, plan: DemoPlan, run_command: Callable[[list[str]], object],
                 source: str | None = None):
        self.out = Path(out)
        self.run_command = run_command  # `mealv2 ARGS` in this process, returning what the command returns
        self.seed = seed
        self.plan = plan
        self.source = source
        self.seconds: dict[str, float] = {}

    def _command(self, stage: str, *args) -> object:
        """Run `mealv2 ARGS` here, echoed first, timed under ``stage``; returns what the command returns."""
        argv = [str(a) for a in args]
        click.secho(f"\n$ mealv2 {shlex.join(argv)}", bold=True)
        started = time.perf_counter()
        result = self.run_command(argv)
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 1)
        return result

    def _fit(self, stage: str, command: str, model_flag: str, model: str, epochs: int, lr: float,
             *extra) -> list[dict]:
        """`mealv2 train|distill` with the plan's schedule; returns its metrics.jsonl rows."""
        out = self.out / stage
        self._command(stage, command, "--data", self.data, model_flag, model, "--out", out, "--init", "scratch",
                      "--epochs", epochs, "--lr", lr, "--lr-steps", self.plan.lr_steps(epochs),
                      "--batch-size", self.plan.batch_size, "--res", self.plan.res, "--seed", self.seed,
                      "--val-every", max(1, epochs // 4), "--no-progress", *extra)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    @property
    def data(self) -> Path:
        return self.out / "data"

    def run(self) -> dict:
        plan = self.plan
        if self.out.exists() and any(self.out.iterdir()):
            raise click.ClickException(f"{self.out}: exists and is not empty; choose another --out or remove it")
        started = time.perf_counter()
        options = {"--limit-train": plan.limit_train, "--limit-val": plan.limit_val, "--source": self.source}
        self._command("data", "data", "fashion-mnist", "--out", self.data,
                      *[part for flag, value in options.items() if value is not None for part in (flag, value)])
        crop = ("--scale", *plan.crop_scale)  # the distilled student replays the store's crops
        curves = {}
        for name in plan.teachers:
            curves[f"teacher {name}"] = self._fit(f"teacher-{name}", "train", "--model", name, plan.teacher_epochs,
                                                  plan.teacher_lr, *crop)
        spec = ",".join(f"{name}={self.out / f'teacher-{name}' / 'model.safetensors'}" for name in plan.teachers)
        ensemble = self._command("ensemble", "evaluate", "--data", self.data, "--teachers", spec,
                                 "--res", plan.res, "--json")
        store = self.out / "labels.zarr"
        self._command("cache", "cache-teachers", "--data", self.data, "--store", store, "--res", plan.res,
                      "--teachers", spec, "--seeds", plan.seeds, "--batch-size", 256, *crop)
        decay = ("--weight-decay", plan.student_weight_decay)
        curves["baseline (hard labels)"] = self._fit("baseline", "train", "--model", plan.student,
                                                     plan.student_epochs, plan.student_lr, *decay, *crop,
                                                     "--seeds", plan.seeds)
        curves["MEAL V2 (cached soft labels)"] = self._fit(
            "distilled", "distill", "--student", plan.student, plan.student_epochs, plan.student_lr, *decay,
            "--labels", store, "--discriminator" if plan.discriminator else "--no-discriminator")
        summary = {
            "teacher_top1": [curves[f"teacher {name}"][-1]["val_top1"] for name in plan.teachers],
            "ensemble_top1": ensemble["top1"],
            "baseline_top1": curves["baseline (hard labels)"][-1]["val_top1"],
            "distilled_top1": curves["MEAL V2 (cached soft labels)"][-1]["val_top1"],
            "seconds": self.seconds | {"total": round(time.perf_counter() - started, 1)},
            "val_images": ensemble["images"],
            "seed": self.seed,
            "plan": dataclasses.asdict(plan),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        from mealv2.report import plot_report

        plot_report(curves, summary, self.out / "report.png")
        click.echo("\n" + summary_table(summary))
        click.echo(f"\n{self.out / 'summary.json'} and {self.out / 'report.png'} written")
        return summary


def summary_table(summary: dict) -> str:
    """The accuracies and the time per stage as a plain-text table."""
    plan = summary["plan"]
    rows = [(f"teacher {name}", f"{top1:.2f}%") for name, top1 in zip(plan["teachers"], summary["teacher_top1"])]
    rows += [("teacher ensemble (mean softmax)", f"{summary['ensemble_top1']:.2f}%"),
             (f"{plan['student']}, hard labels", f"{summary['baseline_top1']:.2f}%"),
             (f"{plan['student']}, MEAL V2", f"{summary['distilled_top1']:.2f}%"),
             ("MEAL V2 gain", f"{summary['distilled_top1'] - summary['baseline_top1']:+.2f} points")]
    lines = [f"top-1 on {summary['val_images']} test images"] + [f"  {name:<40}{value:>12}" for name, value in rows]
    lines += ["seconds per stage"] + [f"  {stage:<40}{seconds:>12.1f}" for stage, seconds in summary["seconds"].items()]
    return "\n".join(lines)
