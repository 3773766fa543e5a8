"""A --store typo never costs data: only an empty place takes a new store, and racing shard jobs create it once."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import cache_args, run_cli, store_files

from mealv2.cli import main
from mealv2.softlabels.site import CLAIM
from mealv2.softlabels.store import LabelStore

pytestmark = pytest.mark.slow


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_files_is_refused_and_untouched(small_root, teacher_files, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    result = run_cli(*cache_args(small_root, folder, teacher_files))
    assert result.exit_code == 1
    assert f"{folder}: exists and is not a label store (holds thesis.txt)" in result.output
    assert snapshot(folder) == {"thesis.txt": b"four years of work"}


def test_the_parent_folder_of_a_store_is_refused(reference_store, small_root, teacher_files, tmp_path):
    parent = tmp_path / "team"
    shutil.copytree(reference_store, parent / "labels.zarr")
    before = snapshot(parent)
    result = run_cli(*cache_args(small_root, parent, teacher_files))
    assert result.exit_code == 1 and "holds labels.zarr" in result.output
    assert snapshot(parent) == before


def test_a_file_is_refused(small_root, teacher_files, tmp_path):
    target = tmp_path / "notes.md"
    target.write_text("notes")
    result = run_cli(*cache_args(small_root, target, teacher_files))
    assert result.exit_code == 1 and "is not a label store" in result.output
    assert target.read_text() == "notes"


def test_an_empty_folder_takes_a_store(reference_store, small_root, teacher_files, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    result = run_cli(*cache_args(small_root, folder, teacher_files))
    assert result.exit_code == 0, result.output
    assert store_files(folder) == store_files(reference_store)
    assert not (folder / CLAIM).exists()


def test_pack_never_replaces_a_file(reference_store, tmp_path):
    out = tmp_path / "labels.zip"
    out.write_bytes(b"someone's archive")
    result = run_cli("labels", "pack", reference_store, out)
    assert result.exit_code == 1 and f"{out}: exists already" in result.output
    assert out.read_bytes() == b"someone's archive"
    assert not list(tmp_path.glob("*.tmp"))


# Each racer waits until both are about to create, the second until the first creates, and the creation itself
# is slowed down, so the second job always finds the first one's creation under way: the window a scheduler
# starting two jobs opens.
RACER = textwrap.dedent("""
    import os, sys, time
    from mealv2.softlabels.writer import StoreWriter
    meeting, me, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    original_create, original_arrays = StoreWriter.create_or_extend.__func__, StoreWriter._create_arrays

    def meet_then_create(cls, *a, **k):
        open(os.path.join(meeting, me), "w").close()
        while len(os.listdir(meeting)) < 2 or (me != "job0" and not os.path.exists(os.path.join(meeting,
                                                                                               "created-by-job0"))):
            time.sleep(0.01)
        return original_create(cls, *a, **k)

    def slow_arrays(self, *a, **k):
        open(os.path.join(meeting, f"created-by-{me}"), "w").close()
        time.sleep(1.0)
        return original_arrays(self, *a, **k)

    StoreWriter.create_or_extend = classmethod(meet_then_create)
    StoreWriter._create_arrays = slow_arrays
    from mealv2.cli import main
    main.main(args, prog_name="mealv2")
""")


@pytest.mark.parametrize("namespace", ["same", "another"])
def test_shard_jobs_racing_to_create_make_one_store(namespace, request, reference_store, small_root, teacher_files,
                                                    tmp_path):
    """One job in a PID namespace of its own (another container on the host): the other's pid names nothing there,
    which once made it take the creation over while it ran, and both created the store."""
    prefix = request.getfixturevalue("pid_namespace") if namespace == "another" else []
    store, meeting = tmp_path / "raced.zarr", tmp_path / "meeting"
    meeting.mkdir()
    racers = [subprocess.Popen([*(prefix if i else []), sys.executable, "-c", RACER, str(meeting), f"job{i}",
                                *cache_args(small_root, store, teacher_files, "--shard", f"{i}/2")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
               for i in range(2)]
    outputs = [racer.communicate(timeout=300)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    assert len(list(meeting.glob("created-by-*"))) == 1  # the other job waited for the creation
    assert run_cli("labels", "finalize", store).exit_code == 0
    assert LabelStore.open(str(store)).attrs["complete"]
    assert store_files(store) == store_files(reference_store)
