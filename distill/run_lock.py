"""One run per output folder: a run holds a claim on ``--out`` (mealv2.pipeline.claim) while it trains.

Two runs sharing a folder would interleave their metrics and replace each other's weights;
the second is refused with one line instead. A killed run's claim is taken over (the kernel
let go of its lock, whichever container it ran in), so a rerun or ``--resume`` needs no
cleaning up.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fsspec

from mealv2.pipeline.claim import Claim

RUN_CLAIM = ".mealv2-running"  # inside the run's folder while a run trains there


class RunFolderBusy(RuntimeError):
    """Another live run holds the folder: the message names it and its holder."""


def holding_run_folder(fit):
    """Decorate ``Trainer.fit``: rank 0 holds the claim on ``trainer.out`` for the whole call."""
    @functools.wraps(fit)
    def locked(trainer, *args, **kwargs):
        if not trainer.world.is_main:
            return fit(trainer, *args, **kwargs)
        claim = Claim(fsspec.filesystem("file"), str(Path(trainer.out).resolve() / RUN_CLAIM))
        if not claim.take():
            raise RunFolderBusy(f"{trainer.out}: another run is training in this folder ({claim.owner()}); "
                                "nothing was changed: wait for it to end, or choose another --out")
        try:
            return fit(trainer, *args, **kwargs)
        finally:
            claim.release()
    return locked
