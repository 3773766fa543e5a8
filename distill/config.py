"""The options of a training run, declared once: the command line reads its defaults from here.

Kept free of heavy imports so that `mealv2 --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from mealv2.pipeline.errors import first_line

MODES = ("distill", "online", "train")
AMP_MODES = ("bf16", "fp16", "off")
SCHEDULES = ("step", "multistep", "cosine", "tanh", "poly")  # timm's scheduler factory; step: the paper's
DISC_HEADS = ("relu", "linear")  # the official discriminator's last ReLU, or none (losses.Discriminator)
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
    opt: str = "momentum"  # timm's name for SGD with momentum, not Nesterov (timm's "sgd"): the official code's
    opt_eps: float | None = None
    sched: str = "step"
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    clip_grad: float | None = None
    clip_mode: str = "norm"
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    d_lr: float | None = None
    discriminator: bool = True
    disc_input: str = "logprobs"
    disc_head: str = "relu"
    kd_weight: float = 1.0
    disc_weight: float = 1.0
    init: str = "pretrained"
    drop: float | None = None  # timm's drop_rate and drop_path_rate; None keeps the model's own
    drop_path: float | None = None
    sync_bn: bool = False
    cutmix: float = 0.0  # CutMix's alpha, as timm's (mealv2.pipeline.mix); a CutMix store mixes by itself
    mixup_prob: float = 1.0  # the probability a pair of crops is mixed
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
    log_interval: int = 50  # steps between progress lines when no bar is shown (0: none); 30 s at most
    log_tb: str | None = None
    log_wandb: bool = False

    @property
    def mix(self):
        """The CutMix asked for (mealv2.pipeline.mix.MixSpec); a CutMix store brings its own."""
        from mealv2.pipeline.mix import MixSpec

        return MixSpec(self.cutmix, self.mixup_prob)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {MODES}")
        for option in dataclasses.fields(self):  # a NaN learning rate or loss weight trains to NaN weights
            value = getattr(self, option.name)
            if "float" in option.type and value is not None and not all(map(math.isfinite, _parts(value))):
                raise ValueError(f"{_flag(option.name)} {' '.join(map(str, _parts(value)))}: expected a finite "
                                 "number")
        for name in ("epochs", "batch_size", "val_every", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        self.mix  # --cutmix ALPHA >= 0, --mixup-prob 0 <= P <= 1
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp {self.amp!r}: expected one of {AMP_MODES}")
        if self.mode == "distill" and not self.labels:
            raise ValueError("distill needs --labels STORE (or --online --teachers SPEC,...)")
        if self.mode == "online" and not self.teachers:
            raise ValueError("--online needs --teachers SPEC[,SPEC...]")
        if self.sched not in SCHEDULES:
            raise ValueError(f"--sched {self.sched!r}: expected one of {SCHEDULES}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: expected 0 <= N < --epochs {self.epochs}")
        if not 0 < self.model_ema_decay < 1:
            raise ValueError(f"--model-ema-decay {self.model_ema_decay}: expected 0 < D < 1")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad {self.clip_grad}: expected a positive threshold")
        if self.disc_head not in DISC_HEADS:
            raise ValueError(f"--disc-head {self.disc_head!r}: expected one of {DISC_HEADS}")
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


def _flag(name: str) -> str:
    """The command-line flag of option ``name``."""
    return f"--{name.replace('_', '-')}"


def _parts(value) -> tuple:
    """An option's value as a tuple (--scale's two numbers, or one number alone)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# options only distill has (the teachers' side); a train run's config file leaves them out
DISTILL_ONLY = ("labels", "teachers", "d_lr", "discriminator", "disc_input", "kd_weight", "disc_weight", "disc_head")
RESOLVED_ONLY = ("interpolation",)  # set from the store or the defaults, not by a flag: under "ran"


def run_file(config: TrainConfig, ran: dict) -> dict:
    """OUT/config.json: every option under its flag's name (what --config reads back), then ``ran``:
    what actually ran (decoder, device, world size, versions, store identity, init sha256)."""
    options = config.without_credentials()
    options.pop("resume")
    for key in RESOLVED_ONLY + (DISTILL_ONLY if config.mode == "train" else ()):
        options.pop(key)
    return options | {"ran": ran | {"interpolation": config.interpolation}}


def read_run_file(path: str, command: str, known: set[str]) -> dict:
    """A --config FILE (YAML or JSON, as config.json) as defaults for ``command``'s options ``known``.

    Keys are option names (``batch_size`` or ``batch-size``); ``mode`` picks distill, --online or train;
    ``ran`` (what a run records of itself) is not an option and is skipped. Anything else is one clear error.
    """
    import yaml

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--config {path}: cannot read it ({first_line(err)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    values.pop("ran", None)
    mode = values.pop("mode", None)
    if mode is not None and (mode not in MODES or (mode == "train") != (command == "train")):
        raise ValueError(f"--config {path}: holds a {mode!r} run; mealv2 {command} cannot run it")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown key {unknown[0]!r} (not an option of mealv2 {command})")
    types = {option.name: option.type for option in dataclasses.fields(TrainConfig)} | {"online": "bool"}
    for key, value in values.items():
        if key in types and not any(_fits(kind, value) for kind in types[key].split(" | ")):
            raise ValueError(f"--config {path}: {key}: expected {' or '.join(map(_describe, types[key].split(' | ')))}"
                             f", got {json.dumps(value, default=str)}")
    if command == "distill" and mode is not None:
        values["online"] = mode == "online"
    if isinstance(values.get("lr_steps"), (list, tuple)):
        values["lr_steps"] = ",".join(map(str, values["lr_steps"]))
    return values


def _fits(kind: str, value) -> bool:
    """Whether a config file's ``value`` can stand for an option of type ``kind`` (one part of its annotation).

    Booleans are not numbers (``lr: true`` is no 1.0), nor floats integers (``epochs: 1.9``); a number written as
    a string counts (YAML reads ``1e-3`` as one: its floats need a dot). A list of any length may also be written
    as its flag takes it (``lr_steps: 100,150``) or, of one item, alone (``lr_steps: 100``).
    """
    if kind.startswith("tuple["):
        item, _, more = kind[len("tuple["):-1].partition(", ")
        if more == "...":
            value = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else \
                value if isinstance(value, list) else [value]
        return isinstance(value, list) and (more == "..." or len(value) == kind.count(",") + 1) and \
            all(_fits(item, part) for part in value)
    if kind in ("None", "bool", "dict", "str"):
        return isinstance(value, {"None": type(None), "bool": bool, "dict": dict, "str": str}[kind])
    if isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            return False
    return isinstance(value, int if kind == "int" else (int, float)) and not isinstance(value, bool)


def _describe(kind: str) -> str:
    """How a config file writes a value of type ``kind`` (one part of an option's annotation)."""
    if kind.startswith("tuple["):
        item, _, more = kind[len("tuple["):-1].partition(", ")
        count = "" if more == "..." else f"{kind.count(',') + 1} "
        return f"a list of {count}{_describe(item).split(' ', 1)[1]}s"
    return {"None": "null", "bool": "true or false", "dict": "a mapping", "int": "an integer", "float": "a number",
            "str": "a string"}[kind]


def defaults(mode: str) -> dict:
    """Each option's default for ``mode`` ("distill" and "online" share the paper's; "train" its own)."""
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return values | (TRAIN_DEFAULTS if mode == "train" else {})
