"""`python -m bench --scale N`: memory and time of the real commands at N images and at N/10, and the slope between.

At each size it builds an ImageFolder of hard links to a few small JPEGs (a link costs a directory entry, not an
inode or a file's bytes, so ImageNet's 1.28M images fit any disk) and runs, each in a process of its own
(bench/scale_probes.py): the index scan cold and warm, `mealv2 cache-teachers` on one unit of 4,096 images with
a timm test teacher, ReplayDataset through a 4-worker DataLoader for a whole epoch, `mealv2 distill` to its first
step and `mealv2 labels verify` (both on a complete 2-slot store of random labels, written by the store's writer).
The scan and ReplayDataset's setup report the peak of their work alone; a command's peak is its main process's
(VmHWM, imports included: its cost per image is the slope between the two sizes), its workers' are their own.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.imagegen import save, smooth_image
from bench.scale_probes import PEAK_FILE, status_mb
from mealv2.pipeline.dataset import SETTLED_NS

IMAGENET_21K = 14_197_122  # images (21,841 classes): where the slopes are projected to
LINKS_PER_FILE = 60_000  # ext4 allows 65,000 hard links to one file
UNIT_ROWS = 4_096  # cache-teachers labels one store chunk of this many rows at every size
REPO = Path(__file__).resolve().parent.parent
# figure -> (target, how it compares): judged at every size measured, the first step at the largest only
SCALE_TARGETS = {
    "index_bytes_per_image": (200.0, "<="),
    "scan_peak_over_index_mb": (100.0, "<="),
    "worker_private_growth_mb": (5.0, "<="),
    "distill_first_step_s": (10.0, "<="),
}
LINEAR_SLACK = 1.2  # verify seconds per image at the larger size: at most this times the smaller size's


def hard_linked_folder(root: Path, images: int, classes: int) -> Path:
    """ROOT/train/<class>/<class>_<i>.JPEG, ImageNet's naming: ``images`` hard links to small JPEGs of 8 sizes
    (enough of them for ext4's 65,000 links a file), spread evenly over ``classes``; ROOT/val holds one image a
    class. Returns ROOT."""
    rng = np.random.default_rng(0)
    pictures = []
    for k in range(max(8, -(-(images + classes) // LINKS_PER_FILE))):
        pictures.append(root / "sources" / f"{k}.jpg")
        save(smooth_image(rng, 40 + 6 * (k % 8), 56 + 4 * (k % 8), hue=k), pictures[-1])
    sources = len(pictures)
    for split, count in (("train", images), ("val", classes)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(c, count, classes):
                os.link(pictures[i % sources], folder / f"n{c:08d}_{i}.JPEG")
    return root


@dataclass(frozen=True)
class Finished:
    """A child process's wall time (to its end, or to the line it was stopped at), peak RSS and standard output."""

    seconds: float
    peak_mb: float
    output: str

    def json(self) -> dict:
        """The JSON object on the last line of its output (a probe's report)."""
        return json.loads(self.output.strip().splitlines()[-1])


def run_child(argv: list[str], env: dict, stop_at: str | None = None) -> Finished:
    """Run a bench.scale_probes command to its end, or until a line of its output matches ``stop_at`` (then it is
    terminated); its peak RSS is what it wrote to PEAK_FILE at exit, or its VmHWM when the line came. A failure
    raises RuntimeError with the end of its error output."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, open(Path(folder) / "errors", "w+") as errors:
        peak_file = Path(folder) / "peak"
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=REPO,
                                 env=env | {PEAK_FILE: str(peak_file)})
        lines, peak = [], None
        for line in child.stdout:
            lines.append(line)
            if stop_at and re.search(stop_at, line):
                peak = status_mb("VmHWM", child.pid)
                break
        seconds = time.perf_counter() - started
        if peak is not None:
            child.terminate()
        child.stdout.close()
        child.wait()
        errors.seek(0)
        if peak is None and (stop_at or child.returncode):
            said = f"ended without a line matching {stop_at!r}" if stop_at else f"exit {child.returncode}"
            raise RuntimeError(f"{' '.join(argv[2:6])}: {said}: {errors.read()[-2000:]}")
        return Finished(seconds, peak if peak is not None else float(peak_file.read_text()), "".join(lines))


def _mealv2(*args) -> list[str]:
    return _probe("mealv2", *args)


def _probe(*args) -> list[str]:
    return [sys.executable, "-m", "bench.scale_probes", *map(str, args)]


def figures_at(root: Path, work: Path, images: int, classes: int) -> dict[str, float]:
    """Every figure of one size: ROOT holds the image folder, WORK the cache, teacher and stores."""
    from bench.measures import random_store, save_teachers
    from mealv2.pipeline.dataset import DatasetIndex, default_cache_path

    env = os.environ | {"MEALV2_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    split = root / "train"
    cold, warm = (run_child(_probe("scan", split), env) for _ in range(2))
    teacher = save_teachers(work, classes, ("test_resnet",))
    units = math.ceil(images / UNIT_ROWS)
    cache = run_child(_mealv2("cache-teachers", "--data", root, "--store", work / "shard.zarr", "--teachers", teacher,
                              "--res", 32, "--seeds", 1, "--chunk-rows", UNIT_ROWS, "--shard", f"0/{units}",
                              "--device", "cpu", "--log-interval", 0), env)
    store = work / "labels.zarr"
    random_store(store, DatasetIndex.load(work / "cache" / default_cache_path(split).name), slots=2, res=32)
    epoch = run_child(_probe("epoch", root, store), env)
    distill = run_child(_mealv2("distill", "--labels", store, "--data", root, "--out", work / "run", "--student",
                                "test_resnet", "--init", "scratch", "--epochs", 1, "--batch-size", 64, "--device",
                                "cpu", "--no-progress", "--log-interval", 1), env, stop_at=r"\bstep 1 \|")
    verify = run_child(_mealv2("labels", "verify", store, "--data", root, "--device", "cpu"), env)
    scan, replay = cold.json(), epoch.json()
    growth = np.subtract(replay["workers_last_mb"], replay["workers_first_mb"])
    return {
        "index_bytes_per_image": scan["index_bytes"] / images,
        "scan_cold_s": scan["seconds"], "scan_warm_s": warm.json()["seconds"],
        "scan_cold_peak_mb": scan["peak_mb"], "scan_warm_peak_mb": warm.json()["peak_mb"],
        "scan_peak_over_index_mb": scan["peak_mb"] - scan["index_bytes"] / 2**20,
        "cache_teachers_s": cache.seconds, "cache_teachers_peak_mb": cache.peak_mb,
        "replay_setup_s": replay["setup_seconds"], "replay_setup_peak_mb": replay["setup_mb"],
        "replay_epoch_s": replay["epoch_seconds"], "replay_peak_mb": epoch.peak_mb,
        "worker_private_growth_mb": float(growth.max()), "worker_private_mb": float(max(replay["workers_last_mb"])),
        "distill_first_step_s": distill.seconds, "distill_peak_mb": distill.peak_mb,
        "verify_s": verify.seconds, "verify_peak_mb": verify.peak_mb,
    }


def slopes(small: dict, large: dict, n_small: int, n_large: int) -> dict[str, float]:
    """Per figure in MB: bytes per image; in seconds: seconds per million images; between the two sizes."""
    per = {"_mb": 2**20, "_s": 1e6}
    return {key: (large[key] - small[key]) * scale / (n_large - n_small)
            for key in large for suffix, scale in per.items() if key.endswith(suffix)}


def projected(large: dict, slope: dict, n_large: int, n_target: int = IMAGENET_21K) -> dict[str, float]:
    """Each sloped figure carried along its slope from the larger size to ``n_target`` images."""
    return {key: large[key] + rate * (n_target - n_large) / (2**20 if key.endswith("_mb") else 1e6)
            for key, rate in slope.items()}


def scale_verdicts(small: dict, large: dict, n_small: int, n_large: int) -> dict[str, bool]:
    """Each target met or not: at both sizes, the first step at the larger one; verify time linear in images."""
    def meets(key: str, value: float) -> bool:
        target, op = SCALE_TARGETS[key]
        return value <= target if op == "<=" else value >= target
    verdicts = {key: meets(key, large[key]) and (key == "distill_first_step_s" or meets(key, small[key]))
                for key in SCALE_TARGETS}
    verdicts["verify_linear"] = large["verify_s"] / n_large <= LINEAR_SLACK * small["verify_s"] / n_small
    return verdicts


def _machine() -> dict:
    with open("/proc/meminfo") as handle:
        total = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    return {"cpus": os.cpu_count(), "memory_gib": round(total / 2**20, 1), "load_average": os.getloadavg()}


def print_table(sizes: tuple[int, int], small: dict, large: dict, slope: dict, projection: dict,
                verdicts: dict[str, bool]) -> None:
    width = max(map(len, large)) + 2
    print(f"{'figure':<{width}}{sizes[0]:>12,}{sizes[1]:>12,}{'slope':>14}{'at 14.2M':>12}")
    for key, value in large.items():
        unit = " B/img" if key.endswith("_mb") else " s/M" if key.endswith("_s") else ""
        sloped = f"{slope[key]:>8.1f}{unit:<6}{projection[key]:>12.1f}" if key in slope else ""
        print(f"{key:<{width}}{small[key]:>12.2f}{value:>12.2f}{sloped}")
    for key, met in verdicts.items():
        print(f"target {key}: {'met' if met else 'MISSED'}")


def scale_main(images: int, classes: int, out: Path) -> dict:
    """Both sizes, measured one after the other, then the slope, the projection and the verdicts, saved as JSON."""
    sizes = (max(classes, images // 10), images)
    measured, loads = [], []
    started = time.perf_counter()
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
            tmp = Path(tmp)
            clock = time.perf_counter()
            hard_linked_folder(tmp / "data", n, classes)
            build_seconds = time.perf_counter() - clock
            time.sleep(SETTLED_NS / 1e9 + 0.5)  # a folder changed just before a scan is listed again at the next
            (tmp / "work").mkdir()
            loads.append({"before": os.getloadavg()})
            measured.append(figures_at(tmp / "data", tmp / "work", n, classes) | {"folder_build_s": build_seconds})
            loads[-1]["after"] = os.getloadavg()
    small, large = measured
    slope = slopes(small, large, *sizes)
    projection = projected(large, slope, sizes[1])
    verdicts = scale_verdicts(small, large, *sizes)
    print_table(sizes, small, large, slope, projection, verdicts)
    record = {"sizes": sizes, "classes": classes, "figures": dict(zip(map(str, sizes), measured)), "slopes": slope,
              "projected_imagenet_21k": projection, "targets_met": verdicts, "load_average": loads,
              "machine": _machine(), "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale-{images}.json").write_text(json.dumps(record, indent=2))
    return record
