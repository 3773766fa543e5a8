"""The multi-GPU path, checked on the CPU: collectives on the backend's device, one scan per job, timm's sync BN.

NCCL takes only tensors on the rank's GPU; the CPU has none, so a spy stands in for the
collective and records the device of every tensor it is handed, with the world's
collective device set to one no caller could use by accident ("meta").
"""

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch

import mealv2.pipeline.distributed as distributed
from mealv2.distill.student import synchronize_batchnorm
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.distributed import World
from mealv2.pipeline.loader import ReplayLoader


class SpyWorld(World):
    """Rank 0 of two whose collectives record their tensors' devices instead of talking to other ranks."""

    def __init__(self):
        super().__init__(rank=0, world_size=2)
        object.__setattr__(self, "seen", [])

    @property
    def collective_device(self) -> torch.device:
        return torch.device("meta")

    def barrier(self) -> None:
        pass


@pytest.fixture
def spy_world(monkeypatch):
    world = SpyWorld()

    def all_reduce(tensor):
        world.seen.append(tensor.device)
        return torch.zeros(tensor.shape, dtype=tensor.dtype)  # a meta tensor holds no values to sum

    monkeypatch.setattr(distributed, "_all_reduce", all_reduce)
    return world


def test_sum_hands_the_collective_the_backend_device_whatever_the_caller_passes(spy_world):
    counts = torch.tensor([3.0, 4.0])  # a CPU tensor, as evaluation and cache-teachers hand over
    total = spy_world.sum(counts)
    assert spy_world.seen == [torch.device("meta")]
    assert total.device == counts.device and total.dtype == counts.dtype


def test_synchronised_batchnorm_keeps_timm_fused_activations():
    """The README's student: torch's conversion drops the activations of its 34 BatchNormAct2d layers."""
    torch.manual_seed(0)
    student = timm.create_model("mobilenetv3_small_075", num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    converted = synchronize_batchnorm(copy.deepcopy(student)).eval()
    assert sum(type(m).__name__ == "SyncBatchNormAct" for m in converted.modules()) == 34
    with torch.no_grad():
        torch.testing.assert_close(converted(images), student(images), rtol=0, atol=0)
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(student)).eval()
        assert (plain(images) - student(images)).abs().max() > 1  # what the old conversion trained


RANK = textwrap.dedent("""
    import json, sys
    from mealv2.pipeline.dataset import DatasetIndex, load_index
    from mealv2.pipeline.distributed import leave, setup
    scans = []
    original = DatasetIndex.scan.__func__
    DatasetIndex.scan = classmethod(lambda cls, *a, **k: scans.append(1) or original(cls, *a, **k))
    world = setup("cpu")
    index = load_index(sys.argv[1], world=world)
    scanned = len(scans)
    states = world.gather_bytes(bytes([world.rank]) * (3 + world.rank))
    try:
        load_index(sys.argv[2], world=world)
        failure = None
    except ValueError as err:
        failure = str(err)
    print(json.dumps({"rank": world.rank, "scans": scanned, "fingerprint": index.fingerprint,
                      "states": [s.hex() for s in states], "failure": failure}))
    leave(world)
""")


def run_ranks(script: str, *args, ranks: int = 2, tmp_path) -> list[dict]:
    """``script ARGS`` in ``ranks`` processes joined as torchrun joins them (gloo on the CPU); each prints one JSON
    line last, returned in rank order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "MEALV2_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=env | {"RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(ranks)})
                 for r in range(ranks)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0] * ranks, outputs
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_rank_zero_scans_and_every_rank_gets_the_index(small_root, tmp_path):
    reports = run_ranks(RANK, small_root / "train", tmp_path / "missing", tmp_path=tmp_path)
    assert [r["scans"] for r in reports] == [1, 0]
    assert len({r["fingerprint"] for r in reports}) == 1
    assert reports[0]["fingerprint"] == DatasetIndex.scan(small_root / "train").fingerprint
    assert all(r["states"] == ["000000", "01010101"] for r in reports)  # each rank's own bytes, in rank order
    assert all("no such split folder" in r["failure"] for r in reports)  # rank 0's error, on every rank
    np.testing.assert_array_equal(np.arange(2), [r["rank"] for r in reports])


TRAINING_RANK = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    import mealv2.pipeline.distributed as distributed
    from torch.nn.parallel import DistributedDataParallel
    from mealv2.distill.config import TrainConfig
    from mealv2.distill.evaluate import evaluate
    from mealv2.distill.trainer import Trainer
    from mealv2.pipeline.dataset import DatasetIndex
    from mealv2.pipeline.distributed import leave
    scans, collectives = [], []
    original_scan, original_all_reduce = DatasetIndex.scan.__func__, distributed._all_reduce
    DatasetIndex.scan = classmethod(lambda cls, *a, **k: scans.append(1) or original_scan(cls, *a, **k))
    distributed._all_reduce = lambda tensor: collectives.append(str(tensor.device)) or original_all_reduce(tensor)
    trainer = Trainer(TrainConfig(mode="train", data=sys.argv[1], out=sys.argv[2], model="test_resnet",
                                  init="scratch", epochs=1, batch_size=8, res=32, device="cpu", decoder="pil",
                                  progress=False), log=lambda *_: None)
    positions, step = [], trainer.step
    trainer.step = lambda images, indices, plan: positions.append(indices.tolist()) or step(images, indices, plan)
    stats = trainer.train_epoch(0)
    scored = evaluate(trainer.student, trainer.normalize, trainer.val_loader, trainer.eval_transform,
                      world=trainer.world, progress=False)
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.student.parameters()))
    print(json.dumps({"ddp": isinstance(trainer.student_parallel, DistributedDataParallel), "scans": len(scans),
                      "positions": positions, "images_per_sec": stats["images_per_sec"], "scored": scored["images"],
                      "collectives": sorted(set(collectives)), "backend": str(trainer.world.collective_device),
                      "weights": weights.hexdigest()}))
    leave(trainer.world)
""")


def test_two_gloo_ranks_train_and_evaluate_through_the_real_path(small_root, tmp_path):
    """torchrun's two CPU ranks: rank 0 alone scans (train and val) and sends the index, the student is DDP-wrapped,
    each rank steps on its own half of the epoch in batches of batch_size / 2, the weights agree after the epoch
    (batch norm statistics stay per rank),
    every validation image is scored once over both ranks, and each collective gets the backend's device."""
    reports = run_ranks(TRAINING_RANK, small_root, tmp_path / "run", tmp_path=tmp_path)
    assert [r["scans"] for r in reports] == [2, 0]
    assert all(r["ddp"] for r in reports)
    steps = [r["positions"] for r in reports]
    assert [[len(batch) for batch in rank] for rank in steps] == [[4, 4, 4, 3]] * 2  # 30 images, 15 a rank
    halves = [{i for batch in rank for i in batch} for rank in steps]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(30))
    assert len({r["weights"] for r in reports}) == 1
    assert [r["scored"] for r in reports] == [12, 12]
    assert all(r["collectives"] == [r["backend"]] == ["cpu"] for r in reports)


READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def host_reads(monkeypatch) -> list:
    """Every call that would wait for a GPU (a tensor read on the host), recorded by name."""
    calls = []
    for name in READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or
                            _o(self, *a, **k))
    return calls


@pytest.mark.parametrize("mode, progress", [("distill", False), ("train", False), ("distill", True)])
def test_a_training_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_steps(
        mode, progress, monkeypatch, small_root, reference_store, tmp_path):
    """No host synchronisation per step: an epoch of 30 steps reads tensors as often as one of 2, also when progress
    is asked for where no bar is drawn (no terminal: the bar's loss figure is never read)."""
    from mealv2.distill.trainer import TrainConfig, Trainer

    counts = []
    for batch in (1, 15):
        config = TrainConfig(mode=mode, data=str(small_root), out=str(tmp_path / f"{mode}{batch}"), model="test_convnext",
                             labels=str(reference_store) if mode == "distill" else None, init="scratch", epochs=1,
                             batch_size=batch, res=32, device="cpu", decoder="pil", progress=progress)  # LayerNorm
        # only, so that batches of one image train
        trainer = Trainer(config)
        trainer.targets.plan(0)
        with monkeypatch.context() as patch:
            calls = host_reads(patch)
            trainer.train_epoch(0)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


def test_labelling_a_unit_reads_the_device_once_whatever_its_batches(monkeypatch, small_root, teacher_files):
    from tqdm import tqdm

    from mealv2.pipeline.crops import CropSpec
    from mealv2.softlabels.cache import UnitCrops, label_unit
    from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers

    index = DatasetIndex.scan(small_root / "train")
    ensemble = TeacherEnsemble(parse_teachers(teacher_files, 32), 3, "cpu")
    counts, results = [], []
    for batch in (4, 15):
        loader = ReplayLoader(index, 32, batch, "cpu", "pil")
        with monkeypatch.context() as patch, tqdm(disable=True) as bar:
            calls = host_reads(patch)
            labels = label_unit(ensemble, loader, 0, 0, slice(0, 30), UnitCrops(CropSpec(), index.sizes), None, 2,
                                bar)()
        counts.append(len(calls))
        results.append(labels.probs)
    assert counts[0] == counts[1], counts
    np.testing.assert_array_equal(results[0], results[1])
