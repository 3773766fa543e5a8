"""`python3 -m bench.gpu_check --out DIR --device DEV --tier 1|2 [--tiny]`: the check a borrowed GPU runs.

It runs from a plain copy of the repository with the machine's own python, nothing installed:
it lays the mealv2 package out by symlinks, as pyproject's package-dir installs it, and runs
each step with that view first on the path (python -P, so the checkout's own mealv2/ folder,
which lacks the mapped subpackages, never shadows it).
Tier 1 needs no DALI (the first transfer carries only zarr and numcodecs): the device tests,
a 2-epoch cached distill through the command line with the torchvision decoder, stage one ÷
the teachers' forward-only rate, stage two ÷ the step bound for resnet50. Tier 2 needs DALI:
one "mixed" decode, the DALI-decoding device tests, the replay loader ÷ a torchvision
DataLoader, stage two for mobilenetv3_small_075 through DALI, and two hardware-decoder shares.

Each step runs in a process group of its own under its own limit (the group is ended when
the step ends, so a timed-out step leaves nothing running on the device); its output goes to
DIR/gpu-check.log, its verdict to DIR/gpu-check.json, its figures to DIR/gpu-figures.json the
moment each is measured (photos, stores and runs go to --work, kept for the next tier, so that
DIR holds three small files a device tool can bring back). Exits non-zero unless every step passed. ``--device cpu --tiny``
runs the same steps with tiny models, as the suite does. docs/benchmarks.md says how the
limits were sized and gives the exact sequence of calls for a borrowed machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Seconds per step: the CPU-side costs measured here (docs/benchmarks.md, "GPU check limits") scaled to 16 cores,
# plus the GPU work at rates far below an H200's, plus a margin; a tier's limits add up to under 5 minutes.
TIERS = {
    1: {"tests": 75, "distill": 45, "stage1": 75, "stage2": 75},
    2: {"decode": 30, "tests": 45, "loader": 45, "stage2": 60, "hw_decoder": 40},
}
TESTS = {1: "tests -q -p no:cacheprovider -k cuda",  # the device fixture's [cuda] cases, and the GPU spies
         2: "tests -q -p no:cacheprovider -k 'cuda and dali'"}  # those that decode with DALI, skipped in tier 1
FULL = {"classes": 100, "unique": 2_000, "size": (375, 500), "res": 224, "batch": 256, "steps": 100, "images": 4_000,
        "stage1_images": 2_000, "seeds": 3, "repeats": 10, "rounds": 2, "teachers": ("senet154", "resnet152s"),
        "students": {1: "resnet50", 2: "mobilenetv3_small_075"},
        "distill": {"classes": 10, "per_class": 100, "val_per_class": 20, "batch": 128,
                    "teachers": ("resnet18", "resnet10t"), "student": "mobilenetv3_small_075"}}
TINY = {"classes": 6, "unique": 8, "size": (48, 64), "res": 32, "batch": 8, "steps": 3, "images": 16,
        "stage1_images": 16, "seeds": 2, "repeats": 2, "rounds": 1, "teachers": ("test_resnet",),
        "students": {1: "test_efficientnet", 2: "test_efficientnet"},
        "distill": {"classes": 6, "per_class": 4, "val_per_class": 2, "batch": 8, "teachers": ("test_resnet",),
                    "student": "test_efficientnet"}}


def package_view(root: Path, folder: Path) -> Path:
    """FOLDER/mealv2 laid out as an install lays it out (pyproject's package-dir), by symlinks into ``root``."""
    package_dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = folder / "mealv2"
    package.mkdir(parents=True)
    for entry in (root / "mealv2").iterdir():
        (package / entry.name).symlink_to(entry)
    for name, source in package_dirs.items():
        (package / name.removeprefix("mealv2.")).symlink_to(root / source)
    return folder


def _sizes(args) -> dict:
    return TINY if args.tiny else FULL


def _figures(args):
    import torch

    from bench.gpu import Figures

    return Figures(Path(args.out) / "gpu-figures.json", torch.device(args.device))


def decode_step(args) -> None:
    """Import DALI and decode one batch of photos on the device ("mixed" on a GPU)."""
    import torch

    from bench.imagegen import make_image_folder
    from mealv2.pipeline.crops import CropSpec
    from mealv2.pipeline.dali import DaliDecoder
    from mealv2.pipeline.dataset import load_index
    from mealv2.pipeline.epoch_plan import read_bytes

    sizes = _sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        index = load_index(make_image_folder(Path(tmp), "train", classes=2, per_class=4, size=sizes["size"],
                                             mixed=False, quality=90))
        boxes, flips = CropSpec().draw(0, index.sizes)
        decoder = DaliDecoder(sizes["res"], "bilinear", len(index), args.device)
        images = decoder.decode([read_bytes(index.file(i)) for i in range(len(index))], boxes, flips)
    expected = (len(index), 3, sizes["res"], sizes["res"])
    if tuple(images.shape) != expected or images.device.type != torch.device(args.device).type:
        raise SystemExit(f"decoded {tuple(images.shape)} on {images.device}, expected {expected} on {args.device}")
    print(f"decode: {len(index)} photos on {images.device}, mean grey level {float(images.float().mean()):.1f}")


def _python(*args: str) -> list[str]:
    """This python without the working folder on its path (-P, Python 3.11+), so that ``mealv2`` is the view's."""
    return [sys.executable, "-P", *args]


def _mealv2(*args) -> None:
    argv = _python("-m", "mealv2", *map(str, args))
    print("$", " ".join(argv[3:]), flush=True)
    subprocess.run(argv, check=True)


def distill_step(args) -> None:
    """cache-teachers with random-weight teachers, then a 2-epoch distill with validation, both decoding with
    torchvision (tier 1 has no DALI); every figure finite."""
    from bench import measures
    from bench.gpu import photo_folder

    sizes, setup = _sizes(args), _sizes(args)["distill"]
    out = Path(args.work) / "distill"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    for split, per_class in (("train", setup["per_class"]), ("val", setup["val_per_class"])):
        photo_folder(data, setup["classes"] * per_class, setup["classes"], setup["classes"] * setup["per_class"],
                     sizes["size"], split=split)  # val: other hard links to the same photos
    teachers = measures.save_teachers(out, setup["classes"], setup["teachers"])
    store, run = out / "labels.zarr", out / "run"
    if not store.exists():
        _mealv2("cache-teachers", "--data", data, "--store", store, "--res", sizes["res"], "--teachers", teachers,
                "--seeds", 2, "--device", args.device, "--decoder", "torch")
    _mealv2("distill", "--data", data, "--labels", store, "--student", setup["student"], "--init", "scratch",
            "--epochs", 2, "--batch-size", setup["batch"], "--device", args.device, "--decoder", "torch",
            "--out", run, "--no-progress", *(["--resume"] if (run / "checkpoint-last.pth").exists() else []))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite = all(row[key] is not None and math.isfinite(row[key]) for row in rows for key in ("loss", "val_top1"))
    if len(rows) != 2 or not finite:
        raise SystemExit(f"{run / 'metrics.jsonl'}: expected 2 epochs with finite figures, got {rows}")
    print(f"distill: 2 epochs, last {rows[-1]}")


def _photos(args) -> dict:
    """The photo folders' shape, shared by the figure steps (one pool of unique photos under DIR/photos)."""
    sizes = _sizes(args)
    return {"classes": sizes["classes"], "unique": sizes["unique"], "size": sizes["size"], "res": sizes["res"]}


def _work_dir(args) -> Path:
    folder = Path(args.work) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage1_step(args) -> None:
    """Stage one at steady state ÷ the teachers' forward-only rate (senet154 + resnet152s), decoded by torchvision."""
    from bench.gpu import stage1_figures

    sizes = _sizes(args)
    stage1_figures(_work_dir(args), _device(args), _figures(args), sizes["teachers"], images=sizes["stage1_images"],
                   seeds=sizes["seeds"], repeats=sizes["repeats"], decoder="torch", **_photos(args))


def stage2_step(args) -> None:
    """Stage two ÷ its step bound: resnet50 decoded by torchvision (tier 1), mobilenetv3_small_075 by DALI (tier 2)."""
    from bench.gpu import stage2_figures

    sizes = _sizes(args)
    stage2_figures(_work_dir(args), _device(args), _figures(args), sizes["students"][args.tier],
                   "torch" if args.tier == 1 else "dali", batch=sizes["batch"], steps=sizes["steps"],
                   repeats=sizes["repeats"], **_photos(args))


def loader_step(args) -> None:
    """The DALI replay loader ÷ a torchvision DataLoader with as many worker processes."""
    from bench.gpu import loader_figures

    sizes = _sizes(args)
    loader_figures(_work_dir(args), _device(args), _figures(args), images=sizes["images"], rounds=sizes["rounds"],
                   batch=sizes["batch"], **_photos(args))


def hw_decoder_step(args) -> None:
    """The DALI replay loader at two shares of the JPEGs on the GPU's hardware decoder."""
    from bench.gpu import hw_decoder_figures

    sizes = _sizes(args)
    hw_decoder_figures(_work_dir(args), _device(args), _figures(args), images=sizes["images"],
                       rounds=sizes["rounds"], batch=sizes["batch"], **_photos(args))


def _device(args):
    from mealv2.pipeline.distributed import as_device

    return as_device(args.device)


STEPS = {"decode": decode_step, "distill": distill_step, "stage1": stage1_step, "stage2": stage2_step,
         "loader": loader_step, "hw_decoder": hw_decoder_step}


def _command(step: str, args) -> list[str]:
    if step == "tests":  # pyproject's pythonpath = ["."] emptied: it would put the checkout's mealv2/ first
        return _python("-m", "pytest", "-o", "pythonpath=", *shlex.split(args.tests or TESTS[args.tier]))
    return _python("-m", "bench.gpu_check", "--step", step, "--tier", str(args.tier), "--out", args.out,
                   "--work", args.work, "--device", args.device, *(["--tiny"] if args.tiny else []))


def _end_group(group: int) -> None:
    """End every process of a step's group (its own children too: cache-teachers, distill, DALI's workers)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_step(command: list[str], limit: float, log, env: dict) -> str:
    """Run ``command`` in a new process group under ``limit`` seconds; its verdict. The group is ended after.

    A group, not a session: whatever ends the caller's session (a device tool's command returning) still
    reaches a step that outlives this process.
    """
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=ROOT, process_group=0)
    try:
        code = child.wait(timeout=limit)
        return "passed" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        return f"ran past {limit} s"
    finally:
        _end_group(child.pid)
        child.wait()


def _record(out: Path, args, verdicts: dict) -> None:
    """DIR/gpu-check.json: each tier's verdicts so far, rewritten after every step."""
    path = out / "gpu-check.json"
    record = json.loads(path.read_text()) if path.exists() else {"tiers": {}}
    record["device"] = args.device
    record["tiers"][str(args.tier)] = verdicts
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)


def run_tier(args) -> dict:
    """Each step of the tier in its own process group under its limit, output appended to the log; {step: verdict}."""
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out, args.work = str(out), str(work)
    if args.tier == 2 and importlib.util.find_spec("nvidia.dali") is None:
        raise SystemExit("gpu-check --tier 2: DALI is not importable here; carry and install the DALI parts first "
                         "(docs/benchmarks.md), or run --tier 1")
    verdicts: dict = {}
    with tempfile.TemporaryDirectory(prefix="mealv2-view-") as view, open(out / "gpu-check.log", "a") as log:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(package_view(ROOT, Path(view))), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for step, limit in TIERS[args.tier].items():
            print(f"== tier {args.tier} {step} (at most {limit} s)", file=log, flush=True)
            started = time.perf_counter()
            status = run_step(_command(step, args), limit, log, env)
            verdicts[step] = {"status": status, "seconds": round(time.perf_counter() - started, 1), "limit": limit}
            print(f"== tier {args.tier} {step}: {status} in {verdicts[step]['seconds']} s", file=log, flush=True)
            print(f"tier {args.tier} {step}: {status} in {verdicts[step]['seconds']} s", flush=True)
            _record(out, args, verdicts)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check")
    parser.add_argument("--out", required=True, help="folder for gpu-check.log, gpu-check.json and gpu-figures.json")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mealv2-gpu-check"),
                        help="folder for the photos, stores and runs, kept for the next tier [default: %(default)s]")
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu runs the same steps on the CPU")
    parser.add_argument("--tier", type=int, choices=sorted(TIERS), default=1,
                        help="1: without DALI (the first transfer); 2: with DALI, after its parts have travelled")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (the suite's run on the CPU)")
    parser.add_argument("--tests", default=None, help="pytest's arguments for the tests step [default: the tier's]")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in its own process
    args = parser.parse_args()
    if args.step:
        STEPS[args.step](args)
        return
    verdicts = run_tier(args)
    if any(v["status"] != "passed" for v in verdicts.values()):
        raise SystemExit(f"gpu-check: a step did not pass, see {Path(args.out) / 'gpu-check.log'}")


if __name__ == "__main__":
    main()
