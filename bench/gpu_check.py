"""`python -m bench.gpu_check --out DIR`: the one command a borrowed GPU machine runs (docs/benchmarks.md).

It installs nothing. Four steps, each in a process of its own under its own time limit, so
that one hung step cannot eat the others' time: an import and one "mixed" decode; the tests
that take a device, on ``--device``; a 2-epoch cached distill of generated photos through
the command line; the bench's three GPU ratios at steady state (bench/gpu.py). Every
step's output goes to DIR/gpu-check.log, the verdicts to DIR/gpu-check.json, the figures
to DIR/gpu-quick.json. Exits non-zero unless every step passed. The limits add up to
6 minutes; they are budgets for one H100/H200 with 16 cores, not yet measured on one.
``--device cpu --tiny`` runs the same steps with tiny models, as the suite does.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_SECONDS = {"decode": 45, "tests": 105, "distill": 75, "bench": 135}
DEVICE_TESTS = "tests -q -p no:cacheprovider -k cuda"  # the device fixture's [cuda] cases, and the GPU spies
PHOTOS = {"classes": 10, "per_class": 100, "val_per_class": 20, "size": (375, 500), "res": 224, "batch": 128,
          "teachers": ("resnet18", "resnet10t"), "student": "mobilenetv3_small_075"}
TINY = PHOTOS | {"classes": 6, "per_class": 4, "val_per_class": 2, "size": (48, 64), "res": 32, "batch": 8,
                 "teachers": ("test_resnet",), "student": "test_efficientnet"}
TINY_BENCH = {"teachers": ("test_resnet",), "students": ("test_efficientnet",), "classes": 5, "images": 25,
              "student_batch": 8, "workers": 2}


def decode_step(args) -> None:
    """Import DALI and decode one batch of photos on the device ("mixed" on a GPU)."""
    import torch

    from bench.imagegen import make_image_folder
    from mealv2.pipeline.crops import CropSpec
    from mealv2.pipeline.dali import DaliDecoder
    from mealv2.pipeline.dataset import load_index
    from mealv2.pipeline.epoch_plan import read_bytes

    with tempfile.TemporaryDirectory() as tmp:
        index = load_index(make_image_folder(Path(tmp), "train", classes=2, per_class=4, size=(375, 500),
                                             mixed=False, quality=90))
        boxes, flips = CropSpec().draw(0, index.sizes)
        decoder = DaliDecoder(224, "bilinear", len(index), args.device)
        images = decoder.decode([read_bytes(index.file(i)) for i in range(len(index))], boxes, flips)
    if images.shape != (len(index), 3, 224, 224) or images.device.type != torch.device(args.device).type:
        raise SystemExit(f"decoded {tuple(images.shape)} on {images.device}")
    print(f"decode: {len(index)} photos on {images.device}, mean grey level {float(images.float().mean()):.1f}")


def _mealv2(*args) -> None:
    argv = [sys.executable, "-m", "mealv2", *map(str, args)]
    print("$", " ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True)


def distill_step(args) -> None:
    """cache-teachers with random-weight teachers, then a 2-epoch distill with validation; every figure finite."""
    from bench import measures
    from bench.imagegen import make_image_folder

    setup = TINY if args.tiny else PHOTOS
    out = Path(args.out) / "distill"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    for split, per_class, seed in (("train", setup["per_class"], 0), ("val", setup["val_per_class"], 1)):
        if not (data / split).is_dir():
            make_image_folder(data, split, classes=setup["classes"], per_class=per_class, seed=seed,
                              size=setup["size"], mixed=False, quality=90)
    teachers = measures.save_teachers(out, setup["classes"], setup["teachers"])
    store, run = out / "labels.zarr", out / "run"
    if not store.exists():
        _mealv2("cache-teachers", "--data", data, "--store", store, "--res", setup["res"], "--teachers", teachers,
                "--seeds", 2, "--device", args.device)
    _mealv2("distill", "--data", data, "--labels", store, "--student", setup["student"], "--init", "scratch",
            "--epochs", 2, "--batch-size", setup["batch"], "--device", args.device, "--out", run, "--no-progress",
            *(["--resume"] if (run / "checkpoint-last.pth").exists() else []))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite = all(row[key] is not None and math.isfinite(row[key]) for row in rows for key in ("loss", "val_top1"))
    if len(rows) != 2 or not finite:
        raise SystemExit(f"{run / 'metrics.jsonl'}: expected 2 epochs with finite figures, got {rows}")
    print(f"distill: 2 epochs, last {rows[-1]}")


def bench_step(args) -> None:
    """The GPU bench's figures (bench/gpu.py) at steady state, written to OUT/gpu-quick.json."""
    import torch

    from bench.__main__ import _print_figures
    from bench.gpu import gpu_figures, gpu_verdicts, write_record

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = gpu_figures(Path(tmp), args.device, quick=True, **(TINY_BENCH if args.tiny else {}))
    _print_figures(results, gpu_verdicts(results))
    write_record(Path(args.out), "gpu-quick", results, torch.device(args.device), time.perf_counter() - started)


STEPS = {"decode": decode_step, "distill": distill_step, "bench": bench_step}


def _command(step: str, args) -> list[str]:
    if step == "tests":
        return [sys.executable, "-m", "pytest", *shlex.split(args.tests)]
    return [sys.executable, "-m", "bench.gpu_check", "--step", step, "--out", args.out, "--device", args.device,
            *(["--tiny"] if args.tiny else [])]


def run_steps(args) -> dict:
    """Each step in a child process under its limit, output appended to the log; {step: verdict}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = {}
    with open(out / "gpu-check.log", "a") as log:
        for step, limit in STEP_SECONDS.items():
            print(f"== {step} (at most {limit} s)", file=log, flush=True)
            started = time.perf_counter()
            try:
                code = subprocess.run(_command(step, args), stdout=log, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
                status = "passed" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = f"ran past {limit} s"
            verdicts[step] = {"status": status, "seconds": round(time.perf_counter() - started, 1), "limit": limit}
            print(f"== {step}: {status} in {verdicts[step]['seconds']} s", file=log, flush=True)
            print(f"{step}: {status} in {verdicts[step]['seconds']} s", flush=True)
    (out / "gpu-check.json").write_text(json.dumps({"device": args.device, "steps": verdicts}, indent=2))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    parser.add_argument("--out", required=True, help="folder for gpu-check.log, gpu-check.json and gpu-quick.json")
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu runs the same steps on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (the suite's run on the CPU)")
    parser.add_argument("--tests", default=DEVICE_TESTS, help="pytest's arguments for the tests step")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in its own process
    args = parser.parse_args()
    if args.step:
        STEPS[args.step](args)
        return
    verdicts = run_steps(args)
    if any(v["status"] != "passed" for v in verdicts.values()):
        raise SystemExit(f"gpu-check: a step did not pass, see {Path(args.out) / 'gpu-check.log'}")


if __name__ == "__main__":
    main()
