"""`python -m bench.gpu_check --out DIR`: both stages through the real command line on generated photos, 2 epochs.

Part of `make gpu-check` (on a GPU, --device auto takes it): random-weight teachers saved
locally, `mealv2 cache-teachers`, then `mealv2 distill` for two epochs with validation.
Fails unless both commands succeed and every epoch's loss and accuracy are finite.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from bench import measures
from bench.imagegen import make_image_folder

CLASSES, PER_CLASS, VAL_PER_CLASS = 10, 100, 20


def _mealv2(*args) -> None:
    argv = [sys.executable, "-m", "mealv2", *map(str, args)]
    print("$", " ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for the data, store and run")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    for split, per_class, seed in (("train", PER_CLASS, 0), ("val", VAL_PER_CLASS, 1)):
        if not (data / split).is_dir():
            make_image_folder(data, split, classes=CLASSES, per_class=per_class, seed=seed, size=(375, 500),
                              mixed=False, quality=90)
    teachers = measures.save_teachers(out, CLASSES, ("resnet18", "resnet10t"))
    store, run = out / "labels.zarr", out / "distill"
    if not store.exists():
        _mealv2("cache-teachers", "--data", data, "--store", store, "--res", 224, "--teachers", teachers,
                "--seeds", 2, "--device", args.device)
    _mealv2("distill", "--data", data, "--labels", store, "--student", "mobilenetv3_small_075", "--init", "scratch",
            "--epochs", 2, "--batch-size", 128, "--device", args.device, "--out", run, "--no-progress",
            *(["--resume"] if (run / "checkpoint-last.pth").exists() else []))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite = all(row[key] is not None and math.isfinite(row[key]) for row in rows for key in ("loss", "val_top1"))
    if len(rows) != 2 or not finite:
        raise SystemExit(f"{run / 'metrics.jsonl'}: expected 2 epochs with finite figures, got {rows}")
    print(f"gpu-check: 2 epochs, last {rows[-1]}")


if __name__ == "__main__":
    main()
