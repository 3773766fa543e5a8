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

import pytest
import torch
import conftest
from conftest import cache_args, run_cli, store_files

from mealv2.softlabels.store import LabelStore

pytestmark = pytest.mark.slow

STUDENT = "test_convnext"  # LayerNorm only: without SyncBatchNorm (CUDA only) BN statistics would be per rank
distill_args = functools.partial(conftest.distill_args, student=STUDENT, batch_size=10,
                                 recipe=("--lr", "0.05", "--lr-steps", "1"))


def torchrun(*args, ranks=2, timeout=600):
    """`torchrun --standalone --nproc-per-node RANKS -m mealv2 ARGS` on the CPU; past ``timeout`` seconds every rank
    is ended (its own process group) and the test fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "mealv2", *[str(a) for a in args]]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            stdout, stderr = run.communicate()
            pytest.fail(f"torchrun ran past {timeout} s: {stdout[-2000:]} {stderr[-2000:]}")
    result = subprocess.CompletedProcess(command, run.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(out):
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    return state["student"] | {f"discriminator.{k}": v for k, v in state["discriminator"].items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_cache_teachers_equals_one_process(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "two-ranks.zarr"
    result = torchrun(*cache_args(small_root, store, teacher_files))
    assert "rank 0 of 2" in result.stdout and "complete" in result.stdout
    assert LabelStore.open(str(store)).attrs["complete"]
    assert store_files(store) == store_files(reference_store)


@pytest.fixture(scope="module")
def one_rank_run(small_root, reference_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank") / "run"
    result = run_cli(*distill_args(small_root, reference_store, out, 2))
    assert result.exit_code == 0, result.output
    return out


def test_two_rank_distill_equals_one_rank(one_rank_run, small_root, reference_store, tmp_path):
    out = tmp_path / "two-ranks"
    result = torchrun(*distill_args(small_root, reference_store, out, 2))
    assert result.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    assert_same_weights(weights(out), weights(one_rank_run))
    one, two = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                for run in (one_rank_run, out))
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["val_top1"] == pytest.approx(a["val_top1"])  # every validation image scored once


def test_resume_on_another_world_size(one_rank_run, small_root, reference_store, tmp_path):
    out = tmp_path / "resized"
    torchrun(*distill_args(small_root, reference_store, out, 1))
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


def test_batch_must_split_over_ranks(small_root, reference_store, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mealv2",
               *map(str, distill_args(small_root, reference_store, tmp_path / "odd", 1, "--batch-size", "9"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "must split evenly over 2 ranks" in result.stdout + result.stderr


def test_shard_jobs_then_finalize(reference_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "sharded.zarr"
    assert run_cli(*cache_args(small_root, store, teacher_files, "--shard", "0/2")).exit_code == 0
    early = run_cli("labels", "finalize", store)
    assert early.exit_code == 1 and "units are not written yet" in early.output
    assert run_cli(*cache_args(small_root, store, teacher_files, "--shard", "1/2")).exit_code == 0
    assert LabelStore.open(str(store)).attrs["complete"]  # the last job to finish completed it
    again = run_cli("labels", "finalize", store)
    assert again.exit_code == 0 and "complete" in again.output
    assert store_files(store) == store_files(reference_store)


def test_pack_to_zip_serves_distill(reference_store, small_root, teacher_files, tmp_path):
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
    incomplete = tmp_path / "partial.zarr"
    run_cli(*cache_args(small_root, incomplete, teacher_files, "--shard", "0/2"))
    refused = run_cli("labels", "pack", incomplete, tmp_path / "partial.zip")
    assert refused.exit_code == 1 and "incomplete" in refused.output
    assert not (tmp_path / "partial.zip").exists()


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
    for name, args in commands.items():
        run = subprocess.run([sys.executable, "-m", "mealv2", *map(str, args)], capture_output=True, text=True,
                             env=env, timeout=120)
        lines = [line for line in (run.stdout + run.stderr).splitlines() if not line.startswith(("cache-teachers:",
                                                                                               "scan "))]
        assert run.returncode == 1 and len(lines) == 1, (name, run.stdout + run.stderr)
        assert lines[0].startswith(f"Error: {url}: cannot reach the store (Could not connect to the endpoint URL"), name
        assert "check the URL, the --storage-option values" in lines[0]
    debug = subprocess.run([sys.executable, "-m", "mealv2", "--debug", *commands["labels info"]], capture_output=True,
                           text=True, env=env, timeout=120)
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


def test_each_rank_resumes_its_own_random_state(small_root, reference_store, tmp_path):
    """Dropout on: each rank draws its own masks, and a resume restores every rank's generator, not rank 0's."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun(*distill_args(small_root, reference_store, whole, 2, "--drop", "0.5"))
    torchrun(*distill_args(small_root, reference_store, split, 1, "--drop", "0.5"))
    torchrun(*distill_args(small_root, reference_store, split, 2, "--drop", "0.5", "--resume"))
    assert_same_weights(weights(split), weights(whole))
    states = torch.load(split / "checkpoint-last.pth", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])


def _break_decoding(path) -> None:
    """Make a JPEG undecodable at the same byte size, its header still read: the scan start names no component."""
    data = bytearray(path.read_bytes())
    data[data.index(b"\xff\xda") + 5] = 0x77
    path.write_bytes(bytes(data))


def test_ranks_agree_on_each_step_when_skip_bad_leaves_a_whole_batch_out(small_root, reference_store, tmp_path):
    """One image a rank per step: an image that fails at decode time after caching leaves one rank's batch empty.
    The ranks agree to skip that step instead of one rank taking a step fewer while the other waits in DDP's
    all-reduce for the collective timeout (two hours); bounded here far below that."""
    root = tmp_path / "data"
    shutil.copytree(small_root, root)  # the same files, sizes and times: the store's dataset
    broken = sorted(root.glob("train/*/img_00[01].jpg"))[:3]
    for path in broken:
        _break_decoding(path)
    out = tmp_path / "run"
    args = distill_args(root, reference_store, out, 1, "--skip-bad")
    args[args.index("--batch-size") + 1] = "2"
    result = torchrun(*args, timeout=240)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] == rows[0]["loss"]
    assert sum(f"left out {path}" in result.stdout + result.stderr for path in broken) >= 1
    assert "a step skipped on every rank" in result.stdout + result.stderr


def test_sync_bn_on_cpu_ranks_is_refused(small_root, reference_store, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mealv2",
               *map(str, distill_args(small_root, reference_store, tmp_path / "sync", 1, "--sync-bn"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--sync-bn: batch norm statistics are synchronised over GPUs" in (
        result.stdout + result.stderr)
