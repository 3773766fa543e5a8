"""Where a run reports, in a terminal or not: its lines (also OUT/log.txt), summary.csv, TensorBoard and W&B.

Progress bars show only on a terminal; a Slurm or nohup log gets a progress line every
``--log-interval`` steps or 30 seconds instead (StepLines). summary.csv is written with
timm's ``update_summary``, so its columns are timm's (epoch, train_*, eval_*, lr).
"""

from __future__ import annotations

from pathlib import Path

from timm.utils import update_summary

from mealv2.pipeline.progress import ProgressLines

SUMMARY = "summary.csv"


class RunLog:
    """Rank 0's reporting: ``log(line)`` prints and appends to OUT/log.txt; ``epoch(metrics)`` feeds the rest.

    Lines logged before ``open`` (while the run checks its folder) are kept and written then.
    """

    def __init__(self, out: Path, echo=print):
        self.out, self.echo = out, echo
        self._pending: list[str] | None = []
        self._tb, self._wandb = None, False

    def open(self, tb_dir: str | None = None, wandb_config: dict | None = None) -> None:
        """Start writing OUT/log.txt (and TensorBoard, W&B when asked): the run owns its folder now."""
        pending, self._pending = self._pending or [], None
        with open(self.out / "log.txt", "a") as handle:
            handle.writelines(line + "\n" for line in pending)
        self._tb = _tensorboard(tb_dir) if tb_dir else None
        self._wandb = _wandb(wandb_config, self.out) if wandb_config is not None else False

    def __call__(self, line: str) -> None:
        self.echo(line)
        if self._pending is not None:
            self._pending.append(line)
            return
        with open(self.out / "log.txt", "a") as handle:
            handle.write(line + "\n")

    def epoch(self, metrics: dict, header: bool) -> None:
        """One epoch's metrics (as metrics.jsonl holds them) into summary.csv, TensorBoard and W&B."""
        train = {key: metrics[key] for key in ("loss", "kd_loss", "disc_loss") if key in metrics}
        evaluated = {key.removeprefix("val_"): metrics[key] for key in metrics
                     if key.startswith("val_top") and isinstance(metrics[key], (int, float, type(None)))}
        update_summary(metrics["epoch"], train, evaluated, self.out / SUMMARY, lr=metrics["lr"],
                       write_header=header, log_wandb=self._wandb)
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, metrics["epoch"])
            self._tb.flush()

    def rewrite_summary(self, rows: list[dict]) -> None:
        """summary.csv again from the metrics a resume keeps (the lines past the checkpoint are gone)."""
        (self.out / SUMMARY).unlink(missing_ok=True)
        wandb, self._wandb, tb, self._tb = self._wandb, False, self._tb, None
        for number, row in enumerate(rows):
            self.epoch(row, header=number == 0)
        self._wandb, self._tb = wandb, tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"--log-tb {folder}: needs the tensorboard package: pip install 'mealv2[tensorboard]'") from None
    return SummaryWriter(folder)


def _wandb(config: dict, out: Path) -> bool:
    try:
        import wandb
    except ImportError:
        raise ValueError("--log-wandb: needs the wandb package: pip install wandb (and wandb login, "
                         "or WANDB_MODE=offline)") from None
    wandb.init(project="mealv2", name=out.name, config=config, dir=str(out))
    return True


class StepLines(ProgressLines):
    """Training's progress lines: step, images, loss, lr, pace."""

    def step(self, epoch: str, steps: int, images: int, total: int, loss, lr: float) -> bool:
        """After a step: ``loss`` is read (a device sync) only when a line is due; whether it was."""
        if not self.due():
            return False
        self.log(f"{epoch} step {steps} | {images}/{total} img | loss {float(loss):.4f} | lr {lr:.4g} | "
                 f"{self.pace(images, total)}")
        return True
