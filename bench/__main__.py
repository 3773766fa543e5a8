"""`python -m bench [--quick] [--out DIR]`: the project's speed and size figures, measured in one run.

Every figure is a ratio or a size measured in this run, so a noisy shared machine moves
numerator and denominator together. Prints the figures, writes OUT/<name>.json and
OUT/<name>.png, and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagegen import make_image_folder  # noqa: E402

from bench import measures  # noqa: E402
from pipeline.crops import sample_crops  # noqa: E402
from pipeline.dataset import load_index  # noqa: E402
from softlabels.cache import CacheJob, run_cache  # noqa: E402

RES, CLASSES = 64, 10
# figure → (target, how it compares); figures without a target are informative
TARGETS = {
    "stage2_cached_vs_plain": (0.95, ">="),
    "stage1_efficiency": (0.9, ">="),
    "store_bytes_per_crop": (28.0, "<="),
    "loader_dali_vs_torch": (1.3, ">="),
}


def _stage_one(root: Path, tmp: Path, spec: str, workers: int, teacher_seconds: float) -> dict:
    index = load_index(root / "train")
    decode = measures.dali_rate(index, RES, workers)
    forward = measures.BATCH / teacher_seconds
    summary = run_cache(CacheJob(data=str(root), store=str(tmp / "labels.zarr"), res=RES, teachers=spec, seeds=1,
                                 topk=5, device="cpu", workers=workers, progress=False), log=lambda *_: None)
    bound = 1 / (1 / decode + 1 / forward)  # CPU: decode and forward share the cores
    return {"stage1_images_per_sec": summary["images_per_sec"], "stage1_decode_images_per_sec": decode,
            "stage1_forward_images_per_sec": forward, "stage1_efficiency": summary["images_per_sec"] / bound,
            "store_bytes_per_crop": summary["bytes_per_crop"],
            "loader_dali_vs_torch": decode / measures.torchvision_rate(index, RES, workers)}


def _stage_two(root: Path, tmp: Path, spec: str, epochs: int, repeats: int, teacher_seconds: float) -> dict:
    rates = measures.training_rates(root, tmp / "runs", epochs,
                                    cached={"mode": "distill", "labels": str(tmp / "labels.zarr")},
                                    plain={"mode": "train", "res": RES},
                                    online={"teachers": spec, "res": RES, "seeds": 1})
    student = measures.student_step_seconds(CLASSES, RES, repeats)
    return {"stage2_cached_vs_plain": rates["cached"] / rates["plain"],
            "stage2_cached_vs_online": rates["cached"] / rates["online"],
            "stage2_online_ideal": (teacher_seconds + student) / student}


def _slot_loads(tmp: Path, sizes: list[int]) -> dict:
    return {f"label_slot_load_ms_per_million_{n // 1000}k": 1000 * measures.slot_load_seconds(tmp, n) / (n / 1e6)
            for n in sizes}


def _verdicts(results: dict) -> dict[str, bool]:
    verdicts = {key: (results[key] >= target if op == ">=" else results[key] <= target)
                for key, (target, op) in TARGETS.items()}
    verdicts["stage2_cached_vs_online"] = results["stage2_cached_vs_online"] >= 0.9 * results["stage2_online_ideal"]
    loads = [v for k, v in results.items() if k.startswith("label_slot_load")]
    verdicts["label_slot_load_linear"] = loads[-1] <= 1.2 * loads[0]  # per-million cost must not grow with size
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 5 minutes on 2 cores)")
    parser.add_argument("--out", default="runs/bench", help="folder for <name>.json and <name>.png")
    parser.add_argument("--name", default=None, help="file name stem [default: quick or full]")
    parser.add_argument("--workers", type=int, default=2, help="decoder threads / DataLoader workers")
    args = parser.parse_args()
    per_class, epochs, repeats = (100, 3, 5) if args.quick else (400, 5, 15)
    slot_sizes = [100_000, 1_000_000]
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        make_image_folder(root, "train", classes=CLASSES, per_class=per_class, size=(96, 128), mixed=False)
        spec = measures.save_teachers(tmp, CLASSES)

        clock = time.perf_counter()
        sample_crops(0, np.tile([375, 500], (1_000_000, 1)))
        results["sample_crops_s_per_million"] = time.perf_counter() - clock
        teacher_seconds = measures.forward_seconds(spec, CLASSES, RES, repeats)  # one figure for both stages
        results |= _stage_one(root, tmp, spec, args.workers, teacher_seconds)
        results |= _stage_two(root, tmp, spec, epochs, repeats, teacher_seconds)
        results |= _slot_loads(tmp, slot_sizes)
    verdicts = _verdicts(results)
    for key, value in results.items():
        mark = {True: "  ok", False: "  MISSED"}.get(verdicts.get(key), "")
        print(f"{key:>42}: {value:10.3f}{mark}")
    name = args.name or ("quick" if args.quick else "full")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "targets_met": verdicts, "seconds": time.perf_counter() - started,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "cuda": torch.cuda.is_available()}, "images": CLASSES * per_class, "res": RES}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    from bench.plots import plot_bench

    plot_bench(results, verdicts, out / f"{name}.png")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
