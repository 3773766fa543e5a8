"""Shared fixtures: generated image folders, and a per-session cache dir so tests never touch ~/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.imagegen import make_image_folder

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device here: the CPU always, the GPU too where there is one (`make gpu-check`)."""
    return request.param


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path_factory.getbasetemp() / "mealv2-cache"))


@pytest.fixture(scope="session")
def mixed_root(tmp_path_factory) -> Path:
    """ROOT with train/ (3 classes × 8, every awkward kind of image) and val/."""
    root = tmp_path_factory.mktemp("mixed")
    make_image_folder(root, "train", classes=3, per_class=8, seed=0)
    make_image_folder(root, "val", classes=3, per_class=4, seed=1)
    return root


TEACHER_ARCHS = ("test_resnet", "test_efficientnet")


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory) -> str:
    """Two timm test teachers for 3 classes saved locally (.pth and .safetensors): a --teachers spec."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    first = timm.create_model(TEACHER_ARCHS[0], num_classes=3)
    torch.save(first.state_dict(), folder / "t1.pth")
    second = timm.create_model(TEACHER_ARCHS[1], num_classes=3)
    save_file(second.state_dict(), str(folder / "t2.safetensors"))
    return f"{TEACHER_ARCHS[0]}={folder / 't1.pth'},{TEACHER_ARCHS[1]}={folder / 't2.safetensors'}"


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    """ROOT/train with 3 classes × 10 mixed images (30 images: 4 chunks of 8 rows)."""
    root = tmp_path_factory.mktemp("small")
    make_image_folder(root, "train", classes=3, per_class=10, seed=2)
    make_image_folder(root, "val", classes=3, per_class=4, seed=3)
    return root


def cache_args(root, store, teachers, *extra) -> list[str]:
    """The cache-teachers command line the tests share (32 px, 2 seeds, k=2, 8-row chunks), on the CPU.

    The tests compare these stores byte for byte (after a kill, in shards, under torchrun), which the CPU
    gives and a GPU does not (bf16 teachers, cuDNN's autotuned kernels, nvJPEG and the hardware decoder), so
    the device is the CPU even where "auto" would take a GPU; an ``extra`` "--device" wins (click keeps the last).
    """
    return ["cache-teachers", "--data", str(root), "--store", str(store), "--res", "32", "--teachers", teachers,
            "--seeds", "2", "--topk", "2", "--batch-size", "4", "--chunk-rows", "8", "--device", "cpu", *extra]


def run_cli(*args, **env):
    """`mealv2 ARGS` in this process (click's CliRunner), arguments turned into strings; ``env``: variables set
    for the call (HF_HUB_OFFLINE="1", say)."""
    from click.testing import CliRunner

    from mealv2.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env or None)


def distill_args(root, store, out, epochs=1, *extra, student="test_resnet", batch_size=8, recipe=()) -> list:
    """The distill command line the tests share: a student from scratch on the CPU (resumed weights equal to the
    bit); ``recipe`` (a file's own learning-rate flags, say) comes before ``extra``, and click keeps the last."""
    return ["distill", "--data", root, "--labels", store, "--student", student, "--init", "scratch", "--out", out,
            "--epochs", epochs, "--batch-size", batch_size, "--device", "cpu", "--no-progress", *recipe, *extra]


def replace_at_equal_size(path: Path, height: int, width: int) -> None:
    """Put another picture of ``height`` × ``width`` in ``path``'s place, padded to its byte size (as an edit might)."""
    from PIL import Image

    size = path.stat().st_size
    Image.new("RGB", (width, height), (200, 30, 90)).save(path, format="PNG")
    assert path.stat().st_size < size
    with open(path, "ab") as handle:  # bytes after the PNG's end: readers ignore them
        handle.write(b"\0" * (size - path.stat().st_size))


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store readers see; the root's attributes without their creation time."""
    import json

    files = {}
    for path in sorted(store.rglob("*")):
        if path.is_file() and not path.name.endswith(".partial"):  # zarr's write-then-rename temporaries: a
            # process killed mid-write leaves one behind, which no reader ever opens
            files[str(path.relative_to(store))] = path.read_bytes()
    root = json.loads(files.pop("zarr.json"))
    root["attributes"]["mealv2"].pop("created")
    files["zarr.json"] = json.dumps(root, sort_keys=True).encode()
    return files


def _cached_store(tmp_path_factory, root: Path, teachers: str, name: str, *extra: str) -> Path:
    """A new store in its own folder, written by one uninterrupted cache-teachers run."""
    from click.testing import CliRunner

    from mealv2.cli import main

    store = tmp_path_factory.mktemp("stores") / name
    result = CliRunner().invoke(main, cache_args(root, store, teachers, *extra), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="session")
def reference_store(tmp_path_factory, small_root, teacher_files) -> Path:
    """A store written by one uninterrupted cache-teachers run."""
    return _cached_store(tmp_path_factory, small_root, teacher_files, "reference.zarr")


@pytest.fixture(scope="session")
def content_store(tmp_path_factory, small_root, teacher_files) -> Path:
    """One seed slot of the reference run, its data identified by every file's bytes (--fingerprint content)."""
    return _cached_store(tmp_path_factory, small_root, teacher_files, "content.zarr", "--seeds", "1",
                         "--fingerprint", "content")


@pytest.fixture(scope="session")
def mild_store(tmp_path_factory, small_root, teacher_files) -> Path:
    """The reference run with milder crops: --scale 0.5 1."""
    return _cached_store(tmp_path_factory, small_root, teacher_files, "mild.zarr", "--scale", "0.5", "1")


@pytest.fixture(scope="session")
def cutmix_store(tmp_path_factory, small_root, teacher_files) -> Path:
    """The reference run with --cutmix 1 --mixup-prob 0.5: 30 images in 8-row chunks, so partners cross chunks."""
    return _cached_store(tmp_path_factory, small_root, teacher_files, "cutmix.zarr", "--cutmix", "1",
                         "--mixup-prob", "0.5")


@pytest.fixture(scope="session")
def pid_namespace() -> list[str]:
    """The command prefix that runs a process in a PID namespace of its own (a container's view: every pid outside it
    names nothing there), on the same hostname; the test is skipped where this machine lets no test make one."""
    import shutil
    import subprocess

    for prefix in (["unshare", "--pid", "--fork"], ["unshare", "--pid", "--fork", "--map-root-user"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("no PID namespace can be made here (unshare --pid needs root, or user namespaces for "
                "--map-root-user); the same-namespace tests still run")


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """One intra-op thread for torch in this process and in every process a test starts (OMP_NUM_THREADS=1, what
    torchrun gives its ranks): on 2 cores shared with DALI's workers and the processes a test starts, torch's default
    of a thread per core spins against them (a distill step took 2.4 s instead of 0.18 s, cache-teachers 38 s
    instead of 6)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)
