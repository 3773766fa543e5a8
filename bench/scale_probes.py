"""`python -m bench.scale_probes scan|epoch|mealv2 ...`: what `--scale` runs in a process of its own.

`scan` and `epoch` print one JSON line, with the peak of their work alone (restarted after the imports:
start_peak); `mealv2 ARGS` is the command line itself. Each writes its whole peak (VmHWM) at exit to the file
PEAK_FILE names: the peak the kernel reports to a parent (wait4's ru_maxrss) also counts the parent's own at
the fork, gigabytes for the bench.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from pathlib import Path


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory field of a process's /proc/PID/status (VmRSS, VmHWM: its peak), in MB."""
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(f"{field}:")) / 1024


def start_peak() -> float:
    """Restart this process's peak resident memory (VmHWM) at its present size, so that a peak measured next is the
    work's and not the imports' (Linux: "5" to /proc/self/clear_refs); that size in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def peak_over(start: float) -> float:
    """This process's peak resident memory since ``start_peak``, over the size it had then, in MB."""
    return status_mb("VmHWM") - start


def private_mb(pid: int) -> float:
    """A process's private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup): its own pages, those a
    forked worker copied from its parent included."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        private = [int(line.split()[1]) for line in handle if line.startswith(("Private_Clean:", "Private_Dirty:"))]
    return sum(private) / 1024


def index_bytes(index) -> int:
    """The bytes a DatasetIndex keeps in its arrays (paths packed, labels, sizes, byte sizes, mtimes, stamps)."""
    arrays = [index.paths.data, index.paths.ends, index.labels, index.sizes, index.byte_sizes, index.mtimes,
              getattr(index, "stamps", None)]
    return sum(array.nbytes for array in arrays if array is not None)


def scan(split: str) -> dict:
    """load_index of ``split`` with the cache MEALV2_CACHE holds (empty: a cold start)."""
    from mealv2.pipeline.dataset import load_index

    start = start_peak()
    started = time.perf_counter()
    index = load_index(split)
    return {"seconds": time.perf_counter() - started, "peak_mb": peak_over(start), "index_bytes": index_bytes(index),
            "images": len(index)}


def epoch(root: str, store: str, workers: int, batch_size: int) -> dict:
    """A whole epoch of ReplayDataset through a DataLoader of ``workers`` forked workers: the setup's memory, and
    each worker's private memory after its first batch and after the last one."""
    import torch

    from mealv2 import ReplayDataset, open_store

    start = start_peak()
    started = time.perf_counter()
    dataset = ReplayDataset(root, open_store(store))
    setup_seconds, setup_mb = time.perf_counter() - started, peak_over(start)
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    batches = iter(loader)
    next(batches)
    pids = [worker.pid for worker in batches._workers]
    first = last = [private_mb(pid) for pid in pids]
    for step, _ in enumerate(batches, start=2):
        if step == len(loader):  # the workers end with the epoch: look before the iterator stops them
            last = [private_mb(pid) for pid in pids]
    return {"setup_seconds": setup_seconds, "setup_mb": setup_mb,
            "epoch_seconds": time.perf_counter() - started - setup_seconds, "workers_first_mb": first,
            "workers_last_mb": last, "images": len(dataset)}


PEAK_FILE = "BENCH_PEAK_FILE"  # where a probe writes its peak resident memory (MB) when it exits


def main() -> None:
    if os.environ.get(PEAK_FILE):
        atexit.register(lambda: Path(os.environ[PEAK_FILE]).write_text(str(status_mb("VmHWM"))))
    if sys.argv[1:2] == ["mealv2"]:
        from mealv2.cli import run

        sys.argv = sys.argv[1:]
        run()
        return
    parser = argparse.ArgumentParser(prog="python -m bench.scale_probes")
    probes = parser.add_subparsers(dest="probe", required=True)
    probes.add_parser("scan").add_argument("split")
    replay = probes.add_parser("epoch")
    replay.add_argument("root")
    replay.add_argument("store")
    replay.add_argument("--workers", type=int, default=4)
    replay.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if args.probe == "scan":
        print(json.dumps(scan(args.split)))
    else:
        print(json.dumps(epoch(args.root, args.store, args.workers, args.batch_size)))


if __name__ == "__main__":
    main()
