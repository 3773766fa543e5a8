"""The options of a cache-teachers job, declared once: the command line reads its defaults from here.

Kept free of heavy imports so that `mealv2 --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.mix import MixSpec
from mealv2.softlabels.schema import CHUNK_ROWS, RESIDUALS


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" → (I, N) with 0 <= I < N."""
    try:
        shard, num_shards = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, for example 0/4") from None
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {text}: expected I/N with 0 <= I < N")
    return shard, num_shards


@dataclass
class CacheJob:
    """Everything cache-teachers needs; defaults follow the paper at 224."""

    data: str
    store: str
    res: int = 224
    teachers: str | None = None
    seeds: int = 1
    topk: int = 5
    residual: str = "uniform"
    interpolation: str = "bilinear"
    batch_size: int | None = None  # None: on a GPU the largest that fits, on the CPU 64 (TeacherEnsemble.batch_size)
    compile: bool = False  # torch.compile the teachers
    device: str = "auto"
    decoder: str = "auto"
    hw_decoder_load: float | None = None  # None: DALI's default share for the hardware JPEG decoder
    workers: int | None = None  # decoder threads; None: this machine's CPUs per process
    shard: tuple[int, int] = (0, 1)
    skip_bad: bool = False
    fingerprint: str = "size"  # "content": the dataset fingerprint also hashes every image's bytes
    chunk_rows: int = CHUNK_ROWS
    crop: CropSpec = CropSpec()
    cutmix: float = 0.0  # CutMix's alpha, as timm's --cutmix (0: no mixing; mealv2.pipeline.mix)
    mixup_prob: float = 1.0  # the probability a pair of crops is mixed and labelled as one composite
    storage_options: dict = field(default_factory=dict)
    progress: bool = True
    log_interval: int = 50  # batches between progress lines where no bar is drawn (also every 30 s); 0: none

    @property
    def mix(self) -> MixSpec:
        return MixSpec(self.cutmix, self.mixup_prob)

    def validate(self) -> None:
        for name in ("res", "seeds", "topk", "batch_size", "chunk_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.mix.enabled and self.batch_size is not None and self.batch_size % 2:
            raise ValueError(f"--batch-size {self.batch_size}: --cutmix labels whole pairs; expected an even size")
        if self.residual not in RESIDUALS:
            raise ValueError(f"--residual {self.residual!r}: expected one of {RESIDUALS}")
