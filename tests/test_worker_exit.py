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


def _marked(mark: str) -> list[int]:
    """Processes (but zombies) whose environment holds ``mark``: a job's own and every one it started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"MEALV2_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return [pid for pid in found if _alive(pid)]


def _workers(mark: str) -> list[int]:
    return [pid for pid in _marked(mark) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.slow
def test_workers_leave_with_a_parent_killed_while_they_start_and_its_plans_go_at_the_next_start(small_root,
                                                                                           teacher_files, tmp_path):
    """SIGKILL at several moments of DALI's start: 0.3-0.5 s after the first worker appeared once left every worker
    running for ever (ppid 1), holding the caller's stdout, with the plan folder in /tmp."""
    import threading
    import uuid

    from conftest import cache_args

    temp = tmp_path / "tmp"  # the jobs' own TMPDIR: plan folders of other tests' jobs are not ours to count
    temp.mkdir()
    def command(store: str) -> list[str]:  # a store of its own: a job killed late may have labelled everything
        return [sys.executable, "-m", "mealv2", *map(str, cache_args(small_root, tmp_path / store, teacher_files,
                                                                      "--decoder", "dali"))]

    for delay in (0.0, 0.25, 0.5, 1.0, 2.0):
        mark = uuid.uuid4().hex
        job = subprocess.Popen(command(f"killed-{delay}.zarr"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=os.environ | {"TMPDIR": str(temp), "MEALV2_TEST_MARK": mark, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 300
            while not _workers(mark):
                assert job.poll() is None and time.monotonic() < deadline, "the job ended before DALI's workers started"
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            job.kill()
            job.wait()
        reader = threading.Thread(target=job.stdout.read, daemon=True)  # EOF once no process holds its stdout
        reader.start()
        reader.join(timeout=15)
        deadline = time.monotonic() + 15
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"killed {delay} s after DALI's workers appeared, processes {left} were left running"
        assert not reader.is_alive(), "the killed job's stdout stayed open"
    finished = subprocess.run(command("finished.zarr"), capture_output=True, text=True, timeout=600, env=os.environ | {"TMPDIR": str(temp)})
    assert finished.returncode == 0, finished.stdout[-3000:]
    assert not list(temp.glob("mealv2-plans-*"))  # the next start removed the killed jobs' plan folders
