"""A run's checkpoint: what resuming needs to continue exactly where the run stopped.

Weights, optimiser and schedule; every rank's random state (each rank draws its own
dropout masks); the resolved options; and the identity of the label store the run
reads, so a resume refuses another store and keeps the run's slot mapping fixed.
Loaded with ``torch.load(weights_only=True)``: no pickle.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from mealv2.pipeline.errors import first_line
from mealv2.pipeline.files import atomic_write

CHECKPOINT = "checkpoint-last.pth"
# what a resumed run may change: where and how it runs and reports, not what it trains (every other option, new
# ones too, must be the run's own: config.json then says what ran); --epochs only under a step schedule, whose
# learning rates do not depend on the run's length
RESUME_MAY_CHANGE = {"epochs", "data", "out", "labels", "device", "decoder", "hw_decoder_load", "workers", "compile",
                     "skip_bad", "resume", "progress", "log_interval", "log_tb", "log_wandb", "val_every"}
LENGTH_FREE_SCHEDULES = ("step", "multistep")


def rng_state(device: torch.device) -> bytes:
    """This process's torch random state (and its GPU's) as pickle-free bytes."""
    buffer = io.BytesIO()
    cuda = torch.cuda.get_rng_state(device).numpy() if device.type == "cuda" else np.zeros(0, np.uint8)
    np.savez(buffer, torch=torch.get_rng_state().numpy(), cuda=cuda)
    return buffer.getvalue()


def restore_rng_state(state: bytes, device: torch.device) -> None:
    with np.load(io.BytesIO(state), allow_pickle=False) as arrays:
        torch.set_rng_state(torch.from_numpy(arrays["torch"].copy()))
        if device.type == "cuda" and arrays["cuda"].size:
            torch.cuda.set_rng_state(torch.from_numpy(arrays["cuda"].copy()), device)


def save_checkpoint(path: Path, *, modules: dict, optimizer, scheduler, epoch: int, updates: int,
                    rng_states: list[bytes], options: dict, store: dict) -> None:
    """Write the checkpoint atomically (temp file, then rename).

    ``modules`` maps names to anything with a state_dict (None saves {}); ``updates`` counts optimisation steps
    (the EMA's warm-up); ``rng_states`` holds one entry per rank.
    """
    state = {
        **{name: module.state_dict() if module is not None else {} for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "updates": updates,
        "rng": [torch.from_numpy(np.frombuffer(s, np.uint8).copy()) for s in rng_states],
        "options": json.dumps(options),
        "store": store,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint's state with ``options`` and ``store`` decoded and ``rng`` as bytes per rank."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - a pickle payload, a torn or foreign file: torch raises many kinds
        raise ValueError(f"{path}: not a checkpoint mealv2 can load ({first_line(err, 200)}); nothing "
                         "was loaded: resume from a run folder mealv2 wrote") from None
    if not isinstance(state, dict) or not isinstance(state.get("rng"), list):
        raise ValueError(f"{path}: a checkpoint of an older mealv2 (one random state for all ranks); "
                         "it cannot resume exactly: start the run again")
    state["options"] = json.loads(state["options"])
    state["store"] = state.get("store") or {}
    state["rng"] = [t.cpu().numpy().tobytes() for t in state["rng"]]
    return state


def metrics_until(path: Path, epoch: int, log=print) -> list[str]:
    """The lines of a run's metrics.jsonl up to ``epoch`` (what a resume keeps).

    A torn last line (a run killed while writing it) is dropped with a warning; a bad line elsewhere is an error.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON; repair or remove that line, then resume") from None
            log(f"warning: {path}: ignored its torn last line (a run killed while writing it)")
            continue
        if record["epoch"] <= epoch:
            kept.append(line)
    return kept


def saved_options(out: Path) -> dict:
    """The resolved options of the run in ``out`` that --resume continues (from its checkpoint)."""
    return load_checkpoint(out / CHECKPOINT, torch.device("cpu"))["options"]


def check_same_run(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume with an option that changes what the run trains, naming the first that differs (the
    run's recipe stays one, as its config.json records it)."""
    may_change = RESUME_MAY_CHANGE - (set() if saved.get("sched") in LENGTH_FREE_SCHEDULES else {"epochs"})
    for key in saved.keys() - may_change:
        now = json.loads(json.dumps(current.get(key)))  # tuples as the lists JSON saved
        if saved[key] != now:
            flag = f"--{key.replace('_', '-')}"
            raise ValueError(f"{flag} {_shown(key, now)}: {path} was trained with {flag} {_shown(key, saved[key])}; "
                             f"resume with the run's own {flag}, or start a new run (--out)")


def _shown(key: str, value) -> str:
    """An option's value as its flag takes it (--lr-steps 30,60; --scale 0.08 1.0)."""
    return (",", " ")[key != "lr_steps"].join(map(str, value)) if isinstance(value, list) else str(value)


def check_same_store(path: Path, saved: dict, current: dict, url: str) -> None:
    """Refuse to resume from another label store (re-created, other teachers, other data) than the run's."""
    differing = [key for key, value in saved.items() if key != "url" and current.get(key) != value]
    if differing:
        raise ValueError(f"--labels {url}: is not the store {path} was trained from "
                         f"({', '.join(differing)} differ); pass the run's store")
