"""Scale-out and sharing: torchrun on two CPU ranks (gloo), --shard jobs with finalize, zip packs, S3 on loopback."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import conftest
from conftest import cache_args, run_cli, store_files

from mealv2.softlabels.store import LabelStore

pytestmark = pytest.mark.slow

STUDENT = "test_convnext"  # LayerNorm only: without SyncBatchNorm (CUDA only) BN statistics would be per rank
distill_args = functools.partial(conftest.distill_args, student=STUDENT, batch_size=10,
                                 recipe=("--lr", "0.05", "--lr-steps", "1"))
COMMANDS = Path(__file__).resolve().parent / "torchrun_commands.py"


def launch(*args, ranks=2, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node RANKS ARGS` on the CPU, with ``env``'s variables too; past ``timeout``
    seconds torchrun and its ranks are ended and the output says so."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               *map(str, args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.terminate()  # torchrun ends its ranks, each in a session of its own, before it exits
            try:
                stdout, stderr = run.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                stdout, stderr = run.communicate()
            stderr += f"\ntorchrun ran past {timeout} s"
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def torchrun(*args, ranks=2, timeout=600):
    """`torchrun ... -m mealv2 ARGS`, which must succeed."""
    result = launch("-m", "mealv2", *args, ranks=ranks, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class Launch:
    """One torchrun launch of several named commands (tests/torchrun_commands.py): their outputs under ``work``,
    each command's result on every rank by its name."""

    def __init__(self, work: Path, ranks: int, commands: dict[str, list], timeout: float, env: dict):
        self.work, self.ranks = work, ranks
        listing = work / "commands.json"
        listing.write_text(json.dumps({name: list(map(str, args)) for name, args in commands.items()}))
        self.run = launch(COMMANDS, listing, ranks=ranks, timeout=timeout, env=env)

    def __getitem__(self, name: str) -> list[SimpleNamespace]:
        """``name``'s exit code and output on each rank, in rank order."""
        paths = [self.work / f"{name}.rank{rank}.json" for rank in range(self.ranks)]
        if not all(path.exists() for path in paths):
            pytest.fail(f"{name}: not every rank finished it; the launch ended with exit code {self.run.returncode}: "
                        f"{self.run.stdout[-3000:]} {self.run.stderr[-3000:]}")
        return [SimpleNamespace(**json.loads(path.read_text())) for path in paths]

    def ran(self, name: str) -> list[SimpleNamespace]:
        """``name``'s results, which must be a success on every rank."""
        results = self[name]
        assert all(r.exit_code == 0 for r in results), "\n".join(r.output[-3000:] for r in results)
        return results


def _break_decoding(path) -> None:
    """Make a JPEG undecodable at the same byte size, its header still read: the scan start names no component."""
    data = bytearray(path.read_bytes())
    data[data.index(b"\xff\xda") + 5] = 0x77
    path.write_bytes(bytes(data))


def broken_images(root: Path) -> list[Path]:
    """The three JPEGs of ROOT/train that the skip-bad run finds undecodable (``two_ranks`` breaks them)."""
    return sorted(root.glob("train/*/img_00[01].jpg"))[:3]


@pytest.fixture(scope="module")
def two_ranks(small_root, reference_store, teacher_files, tmp_path_factory):
    """Every two-rank command of this module in one launch, the ranks started once (each start imports torch, timm
    and DALI: half a minute on 2 shared cores); each test reads its own command's results."""
    work = tmp_path_factory.mktemp("two-ranks")
    data = work / "data"
    shutil.copytree(small_root, data)  # the same files, sizes and times: the store's dataset
    for path in broken_images(data):
        _break_decoding(path)
    skip_bad = distill_args(data, reference_store, work / "skip-bad", 1, "--skip-bad")
    skip_bad[skip_bad.index("--batch-size") + 1] = "2"
    commands = {
        "odd_batch": distill_args(small_root, reference_store, work / "odd", 1, "--batch-size", "9"),
        "sync_bn": distill_args(small_root, reference_store, work / "sync", 1, "--sync-bn"),
        "cache": cache_args(small_root, work / "two-ranks.zarr", teacher_files),
        "distill": distill_args(small_root, reference_store, work / "two-ranks", 2),
        "first_epoch": distill_args(small_root, reference_store, work / "resized", 1),
        "dropout_whole": distill_args(small_root, reference_store, work / "whole", 2, "--drop", "0.5"),
        "dropout_first_epoch": distill_args(small_root, reference_store, work / "split", 1, "--drop", "0.5"),
        "dropout_resumed": distill_args(small_root, reference_store, work / "split", 2, "--drop", "0.5", "--resume"),
        # last: ranks that disagreed on a step would leave one waiting in DDP's all-reduce until the launch's timeout
        "skip_bad": skip_bad,
    }
    cache = {"MEALV2_CACHE": str(tmp_path_factory.getbasetemp() / "mealv2-cache")}  # _isolated_cache's, set later
    return Launch(work, 2, commands, timeout=900, env=cache)


def weights(out):
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    return state["student"] | {f"discriminator.{k}": v for k, v in state["discriminator"].items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_cache_teachers_equals_one_process(two_ranks, reference_store):
    first, _ = two_ranks.ran("cache")
    assert "rank 0 of 2" in first.output and "complete" in first.output
    store = two_ranks.work / "two-ranks.zarr"
    assert LabelStore.open(str(store)).attrs["complete"]
    assert store_files(store) == store_files(reference_store)


@pytest.fixture(scope="module")
def one_rank_run(small_root, reference_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank") / "run"
    result = run_cli(*distill_args(small_root, reference_store, out, 2))
    assert result.exit_code == 0, result.output
    return out


def test_two_rank_distill_equals_one_rank(one_rank_run, two_ranks):
    first, second = two_ranks.ran("distill")
    assert first.output.count("epoch 2/2") == 1 and "epoch 2/2" not in second.output  # rank 0 alone reports
    out = two_ranks.work / "two-ranks"
    assert_same_weights(weights(out), weights(one_rank_run))
    one, two = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                for run in (one_rank_run, out))
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["val_top1"] == pytest.approx(a["val_top1"])  # every validation image scored once


def test_resume_on_another_world_size(one_rank_run, two_ranks, small_root, reference_store):
    two_ranks.ran("first_epoch")
    out = two_ranks.work / "resized"
    result = run_cli(*distill_args(small_root, reference_store, out, 2, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_weights(weights(out), weights(one_rank_run))


def test_three_rank_cutmix_distill_equals_one_rank(small_root, teacher_files, tmp_path):
    store = tmp_path / "cutmix.zarr"
    made = run_cli(*cache_args(small_root, store, teacher_files, "--cutmix", "1"))
    assert made.exit_code == 0, made.output
    one, three = tmp_path / "one", tmp_path / "three"
    result = run_cli(*distill_args(small_root, store, one, 2, "--batch-size", "18"))
    assert result.exit_code == 0, result.output
    # 15 pairs: 5 a rank, no padding; 6 images a rank a step, 3 whole pairs, the same 9 pairs a step as one rank
    torchrun(*distill_args(small_root, store, three, 2, "--batch-size", "18"), ranks=3)
    assert_same_weights(weights(three), weights(one))


def test_batch_must_split_over_ranks(two_ranks):
    for rank in two_ranks["odd_batch"]:
        assert rank.exit_code == 1 and "must split evenly over 2 ranks" in rank.output, rank.output


@pytest.fixture(scope="module")
def first_shard(small_root, teacher_files, tmp_path_factory) -> Path:
    """The reference run's store with only job 0 of --shard 0/2 done: incomplete."""
    store = tmp_path_factory.mktemp("first-shard") / "sharded.zarr"
    result = run_cli(*cache_args(small_root, store, teacher_files, "--shard", "0/2"))
    assert result.exit_code == 0, result.output
    return store


def test_shard_jobs_then_finalize(first_shard, reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "sharded.zarr"
    shutil.copytree(first_shard, store)
    early = run_cli("labels", "finalize", store)
    assert early.exit_code == 1 and "units are not written yet" in early.output
    assert run_cli(*cache_args(small_root, store, teacher_files, "--shard", "1/2")).exit_code == 0
    assert LabelStore.open(str(store)).attrs["complete"]  # the last job to finish completed it
    again = run_cli("labels", "finalize", store)
    assert again.exit_code == 0 and "complete" in again.output
    assert store_files(store) == store_files(reference_store)


def test_pack_to_zip_serves_distill(reference_store, first_shard, small_root, tmp_path):
    packed = tmp_path / "labels.zip"
    result = run_cli("labels", "pack", reference_store, packed)
    assert result.exit_code == 0, result.output
    info = run_cli("labels", "info", f"zip::{packed}", "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["complete"] and json.loads(info.output)["bytes"] == packed.stat().st_size
    zipped = LabelStore.open(f"zip::{packed}").read_slot(1)
    plain = LabelStore.open(str(reference_store)).read_slot(1)
    assert (zipped.probs == plain.probs).all() and (zipped.boxes == plain.boxes).all()
    run = run_cli(*distill_args(small_root, f"zip::{packed}", tmp_path / "from-zip", 1))
    assert run.exit_code == 0, run.output
    refused = run_cli("labels", "pack", first_shard, tmp_path / "partial.zip")
    assert refused.exit_code == 1 and "incomplete" in refused.output
    assert not (tmp_path / "partial.zip").exists()


def mealv2_at_once(commands: dict[str, list], env: dict, timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """`python -m mealv2 ARGS` for every command, all started at once (a test that runs one process at a time leaves
    the second of CI's 2 cores idle); each one's exit code and output by name."""
    runs = {name: subprocess.Popen([sys.executable, "-m", "mealv2", *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for name, args in commands.items()}
    try:
        outputs = {name: run.communicate(timeout=timeout) for name, run in runs.items()}
        return {name: subprocess.CompletedProcess(run.args, run.returncode, *outputs[name]) for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
            run.wait()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, with one bucket; stopped after the module."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="team-key", aws_secret_access_key="s3cr3t-value",
                 region_name="us-east-1").create_bucket(Bucket="labels")
    yield endpoint
    server.stop()


def test_a_store_that_cannot_be_reached_is_one_line_naming_it(small_root, teacher_files, tmp_path):
    """An S3 endpoint that is down: each command says so in one line naming the URL (no 270-line traceback, no
    "Exception ignored" blocks at exit); --debug shows botocore's error behind it."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    url = "s3://labels/unreachable.zarr"
    options = ["--storage-option", f"endpoint_url={down}", "--storage-option", "key=k", "--storage-option", "secret=s"]
    commands = {"labels info": ["labels", "info", url, *options],
                "cache-teachers": [*cache_args(small_root, url, teacher_files), *options],
                "distill": [*distill_args(small_root, url, tmp_path / "run", 1), *options]}
    env = os.environ | {"AWS_MAX_ATTEMPTS": "1"}  # botocore's retries only slow the test down
    runs = mealv2_at_once({**commands, "--debug": ["--debug", *commands["labels info"]]}, env)
    debug = runs.pop("--debug")
    for name, run in runs.items():
        lines = [line for line in (run.stdout + run.stderr).splitlines() if not line.startswith(("cache-teachers:",
                                                                                               "scan "))]
        assert run.returncode == 1 and len(lines) == 1, (name, run.stdout + run.stderr)
        assert lines[0].startswith(f"Error: {url}: cannot reach the store (Could not connect to the endpoint URL"), name
        assert "check the URL, the --storage-option values" in lines[0]
    assert debug.returncode == 1 and "botocore.exceptions.EndpointConnectionError" in debug.stderr


def test_s3_store_written_by_cache_and_read_by_distill(s3_endpoint, small_root, teacher_files, reference_store,
                                                       tmp_path):
    url = "s3://labels/small/teachers-32px.zarr"
    secret = "s3cr3t-value"
    options = ["--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", "key=team-key",
               "--storage-option", f"secret={secret}"]
    written = run_cli(*cache_args(small_root, url, teacher_files), *options)
    assert written.exit_code == 0, written.output
    remote = LabelStore.open(url, "r", {"endpoint_url": s3_endpoint, "key": "team-key", "secret": secret})
    local = LabelStore.open(str(reference_store))
    for slot in range(2):
        assert (remote.read_slot(slot).probs == local.read_slot(slot).probs).all()
    assert secret not in json.dumps(remote.attrs) and secret not in written.output

    out = tmp_path / "from-s3"
    fsspec_env = {"FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "FSSPEC_S3_KEY": "team-key", "FSSPEC_S3_SECRET": secret}
    read = subprocess.run([sys.executable, "-m", "mealv2", *map(str, distill_args(small_root, url, out, 1))],
                          capture_output=True, text=True, timeout=600, env=os.environ | fsspec_env)
    assert read.returncode == 0, read.stderr[-3000:]
    for path in out.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in read.stdout + read.stderr


def test_s3_prefix_holding_objects_is_refused_and_claims_are_exclusive(s3_endpoint, small_root, teacher_files):
    from mealv2.softlabels.site import StoreSite

    options = {"endpoint_url": s3_endpoint, "key": "team-key", "secret": "s3cr3t-value"}
    fs = StoreSite("s3://labels/papers/x.zarr", options).fs
    fs.pipe_file("labels/papers/draft.pdf", b"%PDF")
    flags = [part for key, value in options.items() for part in ("--storage-option", f"{key}={value}")]
    refused = run_cli(*cache_args(small_root, "s3://labels/papers", teacher_files), *flags)
    assert refused.exit_code == 1 and "holds draft.pdf" in refused.output
    assert fs.cat_file("labels/papers/draft.pdf") == b"%PDF" and fs.ls("labels/papers") == ["labels/papers/draft.pdf"]
    first, second = StoreSite("s3://labels/claimed.zarr", options), StoreSite("s3://labels/claimed.zarr", options)
    assert first.claim._exclusive_create(first.claim.path, b"first")  # a conditional put, not a listing
    assert not second.claim._exclusive_create(second.claim.path, b"second")
    assert fs.cat_file(first.claim.path) == b"first"


def test_an_s3_claim_is_taken_over_after_its_lease_only(s3_endpoint):
    """No pid test on object storage: a claim naming a pid that runs nowhere here may be a live job's in another
    container, so it stands until its lease is out."""
    from mealv2.pipeline.claim import LEASE_SECONDS
    from mealv2.softlabels.site import StoreSite

    options = {"endpoint_url": s3_endpoint, "key": "team-key", "secret": "s3cr3t-value"}
    site = StoreSite("s3://labels/leased.zarr", options)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    held = {"host": socket.gethostname(), "pid": gone.pid, "token": "theirs", "since": "then", "time": time.time()}
    site.fs.pipe_file(site.claim.path, json.dumps(held).encode())
    assert not site.claim.take()  # once: taken over, as the pid was not running here
    site.fs.pipe_file(site.claim.path, json.dumps({**held, "time": time.time() - LEASE_SECONDS - 1}).encode())
    assert site.claim.take() and site.claim.holder()["pid"] == os.getpid()
    site.claim.release()
    assert not site.fs.exists(site.claim.path)


def test_each_rank_resumes_its_own_random_state(two_ranks):
    """Dropout on: each rank draws its own masks, and a resume restores every rank's generator, not rank 0's."""
    for name in ("dropout_whole", "dropout_first_epoch", "dropout_resumed"):
        two_ranks.ran(name)
    split = two_ranks.work / "split"
    assert_same_weights(weights(split), weights(two_ranks.work / "whole"))
    states = torch.load(split / "checkpoint-last.pth", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])


def test_ranks_agree_on_each_step_when_skip_bad_leaves_a_whole_batch_out(two_ranks):
    """One image a rank per step: an image that fails at decode time after caching leaves one rank's batch empty.
    The ranks agree to skip that step instead of one rank taking a step fewer while the other waits in DDP's
    all-reduce for the collective timeout (two hours); bounded here far below that."""
    output = "".join(rank.output for rank in two_ranks.ran("skip_bad"))
    rows = [json.loads(line) for line in (two_ranks.work / "skip-bad" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] == rows[0]["loss"]
    assert sum(f"left out {path}" in output for path in broken_images(two_ranks.work / "data")) >= 1
    assert "a step skipped on every rank" in output


def test_sync_bn_on_cpu_ranks_is_refused(two_ranks):
    for rank in two_ranks["sync_bn"]:
        assert rank.exit_code == 1 and "--sync-bn: batch norm statistics are synchronised over GPUs" in rank.output, (
            rank.output)
