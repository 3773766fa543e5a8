"""`mealv2 demo`: MEAL V2 in miniature on Fashion-MNIST, end to end on the CPU, through the real commands.

Every stage is a `mealv2 ...` command line run in this process (and echoed, so it can be
copied): data, the teachers (the pinned pretrained ones, or trained here), their accuracy
and their ensemble's, the label cache, a hard-label baseline and the distilled student
with the same images, crops and epochs.
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

from mealv2.pretrained import SHIPPED, PinnedTeacher, export_float16, teachers_spec, verified_spec, write_manifest


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo's size and duration depend on."""

    limit_train: int | None  # the teachers' training images (the first N of Fashion-MNIST's 60,000)
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
    student_images: int | None = None  # the students' training images, the first N of the teachers'; None: all
    pretrained: bool = False  # the teachers ship pinned in mealv2/teachers (trained with this plan's settings)

    def lr_steps(self, epochs: int) -> str:
        """×0.1 at two thirds and again near the end, as a step schedule compressed into a short run."""
        return ",".join(str(e) for e in sorted({max(1, 2 * epochs // 3), epochs - 1}) if 0 < e < epochs)


# The paper in miniature (docs/demo.md says why and what it measured): teachers that know far more than the
# students have seen (all 60,000 images; pinned in mealv2/teachers, trained with these settings) and students
# on 2,000 of them, both from scratch, for 96 epochs. The student is the paper's MobileNetV3-Small 0.75; its lr,
# weight decay, the discriminator left out and the crop scale were chosen by measurement at this scale; 48 slots:
# one per two epochs.
FULL = DemoPlan(limit_train=None, limit_val=None, res=32, teachers=("resnet10t", "regnetx_004"),
                student="mobilenetv3_small_075", teacher_epochs=8, student_epochs=96, batch_size=128,
                teacher_lr=0.1, student_lr=0.03, student_weight_decay=1e-4, discriminator=False,
                crop_scale=(0.08, 1.0), seeds=48, student_images=2_000, pretrained=True)
# The test suite's run: a few hundred images, timm's tiny test models, one epoch each.
QUICK = DemoPlan(limit_train=300, limit_val=200, res=32, teachers=("test_resnet", "test_efficientnet"),
                 student="test_convnext", teacher_epochs=1, student_epochs=1, batch_size=32, teacher_lr=0.05,
                 student_lr=0.05, student_weight_decay=1e-4, discriminator=False, crop_scale=(0.08, 1.0),
                 seeds=1, student_images=150)


class Demo:
    """Runs the plan's commands into OUT and gathers their results into OUT/summary.json."""

    def __init__(self, out: str, seed: int, plan: DemoPlan, run_command: Callable[[list[str]], object],
                 source: str | None = None, teachers_from: str | None = None, train_teachers: bool = False):
        if teachers_from is not None and train_teachers:
            raise click.UsageError("--teachers-from and --train-teachers exclude each other")
        self.out = Path(out)
        self.run_command = run_command  # `mealv2 ARGS` in this process, returning what the command returns
        self.seed = seed
        self.plan = plan
        self.source = source
        self.teachers_from = Path(teachers_from) if teachers_from is not None else None
        self.trains_teachers = train_teachers or (teachers_from is None and not plan.pretrained)
        self.seconds: dict[str, float] = {}

    def _command(self, stage: str, *args) -> object:
        """Run `mealv2 ARGS` here, echoed first, timed under ``stage``; returns what the command returns."""
        argv = [str(a) for a in args]
        click.secho(f"\n$ mealv2 {shlex.join(argv)}", bold=True)
        started = time.perf_counter()
        result = self.run_command(argv)
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 1)
        return result

    def _fit_args(self, stage: str, command: str, model_flag: str, model: str, epochs: int, lr: float,
                  *extra, seed: int | None = None, data: Path | None = None) -> list:
        """`mealv2 train|distill` arguments: the plan's schedule on ``data`` (the students'), into OUT/STAGE."""
        return [command, "--data", data or self.student_data, model_flag, model, "--out", self.out / stage,
                "--init", "scratch", "--epochs", epochs, "--lr", lr, "--lr-steps", self.plan.lr_steps(epochs),
                "--batch-size", self.plan.batch_size, "--res", self.plan.res,
                "--seed", self.seed if seed is None else seed,
                "--val-every", max(1, epochs // 4), "--no-progress", *extra]

    def _trained(self, stage: str, args: list) -> list[dict]:
        """Run the `train|distill` ``args`` into OUT/STAGE; returns the run's metrics rows."""
        self._command(stage, *args)
        return [json.loads(line) for line in (self.out / stage / "metrics.jsonl").read_text().splitlines()]

    def _fit(self, stage: str, *args, **kwargs) -> list[dict]:
        return self._trained(stage, self._fit_args(stage, *args, **kwargs))

    def teacher_args(self, name: str) -> list:
        """How the demo trains teacher ``name``: all of the plan's teacher images, the teachers' schedule."""
        plan = self.plan
        return self._fit_args(f"teacher-{name}", "train", "--model", name, plan.teacher_epochs, plan.teacher_lr,
                              *self.crop, data=self.data)

    def _distill(self, stage: str, *extra, seed: int | None = None) -> list[dict]:
        """The plan's MEAL V2 student (from a store, or online with the teachers' spec in ``extra``)."""
        plan = self.plan
        return self._fit(stage, "distill", "--student", plan.student, plan.student_epochs, plan.student_lr,
                         "--weight-decay", plan.student_weight_decay,
                         "--discriminator" if plan.discriminator else "--no-discriminator", *extra, seed=seed)

    def _paired(self, baseline: str, other: str) -> dict:
        """The two students' final weights scored image by image on the test split: the gain and its statistics."""
        import numpy as np

        from mealv2.paired import paired_gain
        from mealv2.pipeline.dataset import load_index

        labels = load_index(self.student_data / "val").labels
        correct = {}
        for stage in (baseline, other):
            path = self.out / stage / "predictions.npy"
            self._command("paired", "evaluate", "--data", self.student_data, "--model", self.plan.student,
                          "--checkpoint", self.out / stage / "model.safetensors", "--res", self.plan.res,
                          "--predictions", path, "--json")
            correct[stage] = np.load(path) == labels
        return paired_gain(correct[baseline], correct[other], seed=self.seed)

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def student_data(self) -> Path:
        """The students' training images: the first ``student_images`` of the teachers', or the same folder."""
        return self.data if self.plan.student_images is None else self.out / "data-students"

    @property
    def teachers_folder(self) -> Path:
        """Where the pinned teachers are read: OUT/teachers when trained here, else the given or shipped folder."""
        return self.out / "teachers" if self.trains_teachers else self.teachers_from or SHIPPED

    @property
    def crop(self) -> tuple:
        """The teachers', the cache's and the baseline's crop range (the distilled student replays the store's)."""
        return ("--scale", *self.plan.crop_scale)

    def _start(self) -> tuple[list[PinnedTeacher], str] | None:
        """Refuse a used OUT or damaged pinned teachers, then write the data: the students' images, and the
        teachers' if they are trained here. Returns the pinned teachers and their spec (None: trained here)."""
        plan = self.plan
        if self.out.exists() and any(self.out.iterdir()):
            raise click.ClickException(f"{self.out}: exists and is not empty; choose another --out or remove it")
        try:
            pinned = None if self.trains_teachers else verified_spec(self.teachers_folder)
        except (OSError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        splits = {self.data: plan.limit_train} if self.trains_teachers else {}
        splits.setdefault(self.student_data, plan.limit_train if plan.student_images is None else plan.student_images)
        for folder, images in splits.items():
            options = {"--limit-train": images, "--limit-val": plan.limit_val, "--source": self.source}
            self._command("data", "data", "fashion-mnist", "--out", folder,
                          *[part for flag, value in options.items() if value is not None for part in (flag, value)])
        return pinned

    def _score(self, model: str, weights: Path) -> float:
        """One teacher's top-1 on the test images."""
        return self._command("teachers", "evaluate", "--data", self.student_data, "--model", model,
                             "--checkpoint", weights, "--res", self.plan.res, "--json")["top1"]

    def _teachers(self, curves: dict, pinned: tuple[list[PinnedTeacher], str] | None) -> tuple[list[PinnedTeacher], str]:
        """The teachers with their --teachers spec, each one's top-1 scored here.

        ``pinned``: the checked folder's teachers; None: the plan's teachers are trained first (their curves go
        into ``curves``) and pinned in OUT/teachers, in the form of the shipped folder.
        """
        if pinned is not None:
            teachers, spec = pinned
            return [dataclasses.replace(t, top1=self._score(t.model, self.teachers_folder / t.file))
                    for t in teachers], spec
        folder = self.teachers_folder
        folder.mkdir()
        pinned = []
        for name in self.plan.teachers:
            stage, argv = f"teacher-{name}", [str(a) for a in self.teacher_args(name)]
            curves[f"teacher {name}"] = self._trained(stage, argv)
            weights = folder / f"{name}.safetensors"
            sha256 = export_float16(self.out / stage / "model.safetensors", weights)
            pinned.append(PinnedTeacher(name, weights.name, sha256, self._score(name, weights), tuple(argv)))
        write_manifest(folder, pinned)
        return pinned, teachers_spec(folder, pinned)

    def _cache(self, spec: str, slots: int) -> Path:
        store = self.out / "labels.zarr"
        self._command("cache", "cache-teachers", "--data", self.student_data, "--store", store,
                      "--res", self.plan.res, "--teachers", spec, "--seeds", slots, "--batch-size", 256, *self.crop)
        return store

    def run(self) -> dict:
        plan = self.plan
        started = time.perf_counter()
        pinned = self._start()
        curves = {}
        teachers, spec = self._teachers(curves, pinned)
        ensemble = self._command("ensemble", "evaluate", "--data", self.student_data, "--teachers", spec,
                                 "--res", plan.res, "--json")
        store = self._cache(spec, plan.seeds)
        curves["baseline (hard labels)"] = self._fit("baseline", "train", "--model", plan.student,
                                                     plan.student_epochs, plan.student_lr,
                                                     "--weight-decay", plan.student_weight_decay, *self.crop,
                                                     "--seeds", plan.seeds)
        curves["MEAL V2 (cached soft labels)"] = self._distill("distilled", "--labels", store)
        paired = self._paired("baseline", "distilled")
        summary = {
            "teachers": [t.model for t in teachers],
            "teachers_from": str(self.teachers_folder),
            "teacher_top1": [t.top1 for t in teachers],
            "ensemble_top1": ensemble["top1"],
            "baseline_top1": curves["baseline (hard labels)"][-1]["val_top1"],
            "distilled_top1": curves["MEAL V2 (cached soft labels)"][-1]["val_top1"],
            **paired,
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
    rows = [(f"teacher {name}", f"{top1:.2f}%") for name, top1 in zip(summary["teachers"], summary["teacher_top1"])]
    rows += [("teacher ensemble (mean softmax)", f"{summary['ensemble_top1']:.2f}%"),
             (f"{plan['student']}, hard labels", f"{summary['baseline_top1']:.2f}%"),
             (f"{plan['student']}, MEAL V2", f"{summary['distilled_top1']:.2f}%"),
             ("MEAL V2 gain (paired 95% interval)",
              f"{summary['gain']:+.2f} [{summary['gain_ci95'][0]:+.2f}, {summary['gain_ci95'][1]:+.2f}]"),
             ("McNemar p (paired)", f"{summary['mcnemar_p']:.2g}")]
    lines = [f"top-1 on {summary['val_images']} test images"] + [f"  {name:<40}{value:>12}" for name, value in rows]
    lines += ["seconds per stage"] + [f"  {stage:<40}{seconds:>12.1f}" for stage, seconds in summary["seconds"].items()]
    return "\n".join(lines)
