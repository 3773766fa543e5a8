"""The options of a training run, declared once: the command line reads its defaults from here.

Kept free of heavy imports so that `mealv2 --help` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("distill", "online", "train")
AMP_MODES = ("bf16", "fp16", "off")
# `mealv2 train` (hard labels) departs from the paper's distill defaults the way supervised recipes do
TRAIN_DEFAULTS = {"epochs": 90, "lr": 0.1, "lr_steps": (30, 60), "batch_size": 256, "weight_decay": 1e-4}


@dataclass
class TrainConfig:
    """Options of one run (resolved, written to OUT/config.json); defaults are the paper's distill setting."""

    mode: str
    data: str
    out: str
    model: str
    labels: str | None = None
    teachers: str | None = None
    epochs: int = 180
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (100,)
    batch_size: int = 512
    res: int | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    d_lr: float | None = None
    discriminator: bool = True
    disc_input: str = "logprobs"
    kd_weight: float = 1.0
    disc_weight: float = 1.0
    init: str = "pretrained"
    drop: float | None = None  # timm's drop_rate and drop_path_rate; None keeps the model's own
    drop_path: float | None = None
    sync_bn: bool = False
    cutmix: float = 0.0  # probability a pair of crops is mixed (mealv2.pipeline.mix); a CutMix store mixes by itself
    seeds: int | None = None  # distill: seed slots read (epoch e reads slot e mod seeds); else crop seeds cycled
    scale: tuple[float, float] | None = None  # RandomResizedCrop ranges: None is the store's, or CropSpec's default
    ratio: tuple[float, float] | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None  # evaluation: None takes the model's timm data config
    eval_interpolation: str | None = None
    device: str = "auto"
    decoder: str = "auto"
    hw_decoder_load: float | None = None  # None: DALI's default share for the hardware JPEG decoder
    workers: int | None = None  # decoder threads; None: this machine's CPUs per process
    seed: int = 0
    resume: bool = False
    amp: str = "bf16"
    compile: bool = False  # torch.compile the training step's student (and, online, the teachers)
    val_every: int = 1
    skip_bad: bool = False
    storage_options: dict = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {MODES}")
        for name in ("epochs", "batch_size", "val_every", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if not 0 <= self.cutmix <= 1:
            raise ValueError(f"--cutmix {self.cutmix}: expected a probability, 0 <= P <= 1")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp {self.amp!r}: expected one of {AMP_MODES}")
        if self.mode == "distill" and not self.labels:
            raise ValueError("distill needs --labels STORE (or --online --teachers SPEC,...)")
        if self.mode == "online" and not self.teachers:
            raise ValueError("--online needs --teachers SPEC[,SPEC...]")
        if self.disc_input not in ("logprobs", "logits"):
            raise ValueError(f"--disc-input {self.disc_input!r}: expected logprobs or logits")
        if self.disc_input == "logits" and self.mode != "online":
            raise ValueError("--disc-input logits needs --online: a label store holds probabilities, not logits")

    def without_credentials(self) -> dict:
        """The options as JSON, without storage options (they may carry credentials)."""
        options = dataclasses.asdict(self)
        options.pop("storage_options")
        options["lr_steps"] = list(self.lr_steps)
        return options


def defaults(mode: str) -> dict:
    """Each option's default for ``mode`` ("distill" and "online" share the paper's; "train" its own)."""
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return values | (TRAIN_DEFAULTS if mode == "train" else {})
