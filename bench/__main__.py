"""`python -m bench [--quick] [--out DIR]`: stage one and stage two ratios on generated images.

Prints its figures and, as the last line, one JSON object. Every figure is a ratio or a
size measured in this one run, so a noisy shared machine moves numerator and denominator
together.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagegen import make_image_folder  # noqa: E402

from distill.trainer import TrainConfig, Trainer  # noqa: E402
from pipeline.crops import sample_crops  # noqa: E402
from softlabels.cache import CacheJob, run_cache  # noqa: E402
from softlabels.teachers import TeacherEnsemble, parse_teachers  # noqa: E402

TEACHERS = ("resnet10t", "resnet18")
STUDENT = "mobilenetv3_small_050"


def _teachers(folder: Path, classes: int) -> str:
    specs = []
    for name in TEACHERS:
        path = folder / f"{name}.safetensors"
        save_file(timm.create_model(name, num_classes=classes).state_dict(), str(path))
        specs.append(f"{name}={path}")
    return ",".join(specs)


def _forward_rate(spec: str, classes: int, res: int, batch: int, images: int) -> float:
    """Bare ensemble forward on pre-decoded uint8 tensors: images/s."""
    ensemble = TeacherEnsemble(parse_teachers(spec, res), classes, "cpu")
    x = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8)
    ensemble(x)
    started = time.perf_counter()
    for _ in range(max(1, images // batch)):
        ensemble(x)
    return max(1, images // batch) * batch / (time.perf_counter() - started)


def _stage2_rates(root: Path, out: Path, epochs: int, **modes: dict) -> dict[str, float]:
    """Median images/s per training mode, epochs interleaved across modes so load drifts hit all alike.

    The first epoch of each mode warms caches and is left out of the median.
    """
    trainers = {}
    for mode, options in modes.items():
        config = TrainConfig(mode=options.pop("mode", mode), data=str(root), out=str(out / mode), model=STUDENT,
                             init="scratch", epochs=epochs, batch_size=64, progress=False, **options)
        trainers[mode] = Trainer(config, log=lambda *_: None)
    rates: dict[str, list[float]] = {mode: [] for mode in trainers}
    for epoch in range(epochs):
        for mode, trainer in trainers.items():
            rates[mode].append(trainer.train_epoch(epoch)["images_per_sec"])
    return {mode: float(np.median(values[1:])) for mode, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute on 2 cores)")
    parser.add_argument("--out", default=None, help="folder for <name>.json results")
    args = parser.parse_args()
    per_class = 100 if args.quick else 400
    res, classes = 64, 10
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        make_image_folder(root, "train", classes=classes, per_class=per_class, size=(96, 128), mixed=False)
        spec = _teachers(tmp, classes)
        n = classes * per_class

        started = time.perf_counter()
        sample_crops(0, np.tile([375, 500], (1_000_000, 1)))
        results["sample_crops_s_per_million"] = time.perf_counter() - started

        forward = _forward_rate(spec, classes, res, 64, n)
        summary = run_cache(CacheJob(data=str(root), store=str(tmp / "labels.zarr"), res=res, teachers=spec,
                                     seeds=1, topk=5, device="cpu", progress=False), log=lambda *_: None)
        results["stage1_images_per_sec"] = summary["images_per_sec"]
        results["stage1_vs_bare_forward"] = summary["images_per_sec"] / forward
        results["store_bytes_per_crop"] = summary["bytes_per_crop"]

        rates = _stage2_rates(root, tmp / "runs", 3 if args.quick else 5,
                              cached={"mode": "distill", "labels": str(tmp / "labels.zarr")},
                              plain={"mode": "train", "res": res},
                              online={"teachers": spec, "res": res, "seeds": 1})
        results["stage2_cached_vs_plain"] = rates["cached"] / rates["plain"]
        results["stage2_cached_vs_online"] = rates["cached"] / rates["online"]
    for key, value in results.items():
        print(f"{key:>28}: {value:.3f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
