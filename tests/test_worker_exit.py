"""DALI's worker processes leave with a parent killed by a signal, and take its epoch plans with them.

Measured: without the watchdog the workers stayed, and the plan folders piled up in /tmp."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali", reason="DALI is not installable on this platform")

PARENT = textwrap.dedent("""
    import sys, time, numpy as np
    from mealv2.pipeline.crops import sample_crops
    from mealv2.pipeline.dataset import DatasetIndex
    from mealv2.pipeline.loader import ReplayLoader
    index = DatasetIndex.scan(sys.argv[1])
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, 16, 4, "cpu", "dali")
    for _ in loader.epoch(np.arange(len(index)), boxes, flips, progress=False):
        pass
    print(loader._backend.stream._plans.name, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie (not yet reaped) has left too


def test_workers_leave_with_a_killed_parent(mixed_root):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(mixed_root / "train")], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        plans = Path(parent.stdout.readline().strip())
        assert plans.is_dir()
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) >= 2
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers))
    assert not plans.exists()  # the killed parent's epoch plans are removed by its workers
