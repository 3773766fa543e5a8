"""DALI replay against the PIL reference; epoch ordering, sharding, partial batches, errors."""

import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from plan_spy import MarkingPlanSource

from mealv2.pipeline.crops import center_boxes, sample_crops
from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.pipeline.decoders import INTERPOLATIONS, resolve_decoder
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.sampler import EpochSampler
from mealv2.pipeline.pil_replay import replay_pil

dali = pytest.importorskip("nvidia.dali", reason="DALI is not installable on this platform")


def run_epoch(loader, order, boxes, flips):
    images, indices = zip(*loader.epoch(order, boxes, flips, progress=False))
    return torch.cat(images), torch.cat(indices)


@pytest.fixture(scope="module")
def index(mixed_root):
    return DatasetIndex.scan(mixed_root / "train")


@pytest.mark.parametrize("decoder", ["dali", "torch"])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_decoders_match_pil_reference(index, decoder, interpolation, device):
    boxes, flips = sample_crops(3, index.sizes)
    assert flips.any() and not flips.all()
    # on the CPU, and for torchvision anywhere (it decodes on the CPU): a mean below one grey level, at most 8 at a
    # few edge pixels of upscaled tiny crops. DALI on a GPU decodes with nvJPEG's IDCT and chroma upsampling, or
    # the hardware decoder's, not libjpeg's as PIL does: a few grey levels more per pixel, so twice the mean and
    # three times the maximum, which a wrong box, flip or orientation still exceeds by far (not yet run on a GPU)
    gpu_decode = device == "cuda" and decoder == "dali"
    mean_bound, max_bound = (2.0, 24) if gpu_decode else (1.0, 8)
    loader = ReplayLoader(index, res=40, batch_size=5, device=device, decoder=decoder, interpolation=interpolation)
    images, indices = run_epoch(loader, np.arange(len(index)), boxes, flips)
    assert images.device.type == device
    images, indices = images.cpu(), indices.cpu()
    assert images.dtype == torch.uint8 and images.shape == (len(index), 3, 40, 40)
    for image, i in zip(images, indices.tolist()):
        with open(index.file(i), "rb") as handle:
            expected = replay_pil(handle.read(), boxes[i], flips[i], 40, interpolation)
        diff = np.abs(image.numpy().astype(int) - expected.astype(int))
        assert diff.mean() < mean_bound, index.paths[i]
        assert diff.max() <= max_bound, index.paths[i]


def test_flip_mirrors_the_crop(index):
    boxes, _ = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=32, batch_size=8, device="cpu", decoder="dali")
    order = np.arange(len(index))
    plain, _ = run_epoch(loader, order, boxes, np.zeros(len(index), bool))
    flipped, _ = run_epoch(loader, order, boxes, np.ones(len(index), bool))
    # the flip is a mirrored resampling region, so rounding may move a pixel by one grey level
    diff = (flipped.int() - plain.flip(-1).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("decoder", ["dali", "torch", "pil"])
def test_every_image_once_and_last_partial_batch_delivered(index, decoder, device):
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=16, batch_size=7, device=device, decoder=decoder)  # 24 = 7+7+7+3
    order = EpochSampler(seed=1).order(len(index), epoch=0)
    batches = list(loader.epoch(order, boxes, flips, progress=False))
    assert [len(b[1]) for b in batches] == [7, 7, 7, 3]
    seen = torch.cat([b[1] for b in batches]).cpu().numpy()
    np.testing.assert_array_equal(seen, order)
    assert sorted(seen.tolist()) == list(range(len(index)))


def test_dali_plan_folder_is_made_by_the_first_epoch_only(index, monkeypatch, tmp_path):
    """A stream that never runs (a killed run's validation stream) has no folder to leave behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=16, batch_size=8, device="cpu", decoder="dali")
    assert not list(tmp_path.glob("mealv2-plans-*"))
    assert sum(len(b[1]) for b in loader.epoch(np.arange(len(index)), boxes, flips, progress=False)) == len(index)
    assert len(list(tmp_path.glob("mealv2-plans-*"))) == 1


def test_dali_epochs_run_pipelined_and_read_ahead(index, monkeypatch, device):
    """DALI's async executor with workers reading ahead; an abandoned epoch does not spoil the next;
    the pixels equal the batch-at-a-time decoder's (on a GPU within the decoders' tolerance: the copy out of
    DALI is complete)."""
    monkeypatch.setattr("mealv2.pipeline.dali.PlanSource", MarkingPlanSource)
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=16, batch_size=4, device=device, decoder="dali", prefetch=3)  # 6 batches
    order = EpochSampler().order(len(index), epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to the batch-by-batch path
        epoch = iter(loader.epoch(order, boxes, flips, progress=False))
        first = next(epoch)
        pipe_folder = Path(loader._backend.stream._plans.name)
        asked = lambda: {p.name for p in pipe_folder.glob("asked-0-*")}  # noqa: E731
        deadline = time.monotonic() + 60
        while len(asked()) < 4 and time.monotonic() < deadline:  # the consumer holds batch 0 only
            time.sleep(0.05)
        assert {"asked-0-1", "asked-0-2", "asked-0-3"} <= asked()
        pipe = loader._backend.stream._pipe
        assert pipe.exec_async and pipe.exec_pipelined and pipe.prefetch_queue_depth >= 2
        rest = list(epoch)
        np.testing.assert_array_equal(torch.cat([first[1]] + [b[1] for b in rest]).cpu().numpy(), order)
        abandoned = iter(loader.epoch(order, boxes, flips, progress=False))
        next(abandoned)
        abandoned.close()
        again = EpochSampler().order(len(index), epoch=1)
        images, indices = run_epoch(loader, again, boxes, flips)
    np.testing.assert_array_equal(indices.cpu().numpy(), again)
    reference = ReplayLoader(index, res=16, batch_size=4, device=device, decoder="dali")
    reference._backend = reference._backend.fallback  # DALI a batch at a time: the pipelined one must match it
    expected, _ = run_epoch(reference, again, boxes, flips)
    if device == "cpu":
        assert torch.equal(images, expected)
    else:  # DALI shares a GPU batch's JPEGs between the hardware decoder and nvJPEG's CUDA one, which differ by a
        # few grey levels: the decoders' tolerance, which a copy read before it ended (another batch's pixels,
        # or none yet) exceeds
        diff = (images.int() - expected.int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8


def test_an_epoch_started_while_another_is_unfinished_gets_its_own_images(index):
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=16, batch_size=4, device="cpu", decoder="dali")
    stream = loader._backend.stream
    first, second = EpochSampler().order(len(index), 0), EpochSampler().order(len(index), 1)
    unfinished = stream.epoch(first, boxes, flips)
    next(unfinished)
    seen = torch.cat([positions for _, positions in stream.epoch(second, boxes, flips)])
    np.testing.assert_array_equal(seen.numpy(), second)
    unfinished.close()  # the old epoch's pipeline goes; the new one stays usable
    seen = torch.cat([positions for _, positions in stream.epoch(first, boxes, flips)])
    np.testing.assert_array_equal(seen.numpy(), first)
    assert list(stream.epoch(first[:0], boxes, flips)) == []


def test_auto_decoder_is_the_fastest_measured_for_device_and_size():
    small, photos = np.tile([[28, 28]], (5, 1)), np.tile([[375, 500]], (5, 1))
    assert resolve_decoder("auto", "cuda", photos) == "dali"
    assert resolve_decoder("auto", "cpu", small) == "dali"
    assert resolve_decoder("auto", "cpu", photos) == "torch"
    assert resolve_decoder("pil", "cuda", photos) == "pil"
    with pytest.raises(ValueError, match="decoder 'nvjpeg'"):
        resolve_decoder("nvjpeg", "cpu", small)


def test_eval_boxes_replay_like_resize_then_center_crop(index):
    boxes = center_boxes(index.sizes, 0.875)
    loader = ReplayLoader(index, res=24, batch_size=6, device="cpu", decoder="dali")
    images, indices = run_epoch(loader, np.arange(len(index)), boxes, np.zeros(len(index), bool))
    i = int(indices[0])
    with open(index.file(i), "rb") as handle:
        expected = replay_pil(handle.read(), boxes[i], False, 24)
    assert np.abs(images[0].numpy().astype(int) - expected).mean() < 1.0


def test_epoch_order_shuffles_by_epoch_and_shards_evenly():
    a, b = EpochSampler().order(10, epoch=0), EpochSampler().order(10, epoch=1)
    assert sorted(a) == list(range(10)) and (a != b).any()
    np.testing.assert_array_equal(a, EpochSampler().order(10, epoch=0))
    shards = [EpochSampler(rank=r, world_size=3).order(10, epoch=0) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(np.concatenate(shards)) == set(range(10))
    np.testing.assert_array_equal(EpochSampler(shuffle=False).order(5, 0), np.arange(5))
    with pytest.raises(ValueError, match="rank 3 outside a world of 3"):
        EpochSampler(rank=3, world_size=3)


@pytest.mark.parametrize("decoder", ["pil", "torch"])
def test_corrupt_file_is_named_or_left_out(tmp_path, decoder):
    from bench.imagegen import make_image_folder
    split = make_image_folder(tmp_path, classes=1, per_class=3, mixed=False)
    index = DatasetIndex.scan(split)
    path = split / index.paths[1]
    path.write_bytes(path.read_bytes()[:200])  # header intact, data truncated
    boxes, flips = sample_crops(0, index.sizes)
    loader = ReplayLoader(index, res=16, batch_size=3, device="cpu", decoder=decoder)
    with pytest.raises(DatasetError, match=r"img_001\.jpg: cannot decode image"):
        run_epoch(loader, np.arange(3), boxes, flips)
    left_out = {}
    skipping = ReplayLoader(index, res=16, batch_size=3, device="cpu", decoder=decoder, on_bad=left_out.setdefault)
    _, positions = run_epoch(skipping, np.arange(3), boxes, flips)
    assert positions.tolist() == [0, 2] and list(left_out) == [1]


def test_torchvision_workers_replay_each_epochs_own_plan(index):
    """The worker processes persist across epochs: an abandoned epoch's plan must not leak into the next."""
    loader = ReplayLoader(index, res=16, batch_size=4, device="cpu", decoder="torch", workers=2)
    first_boxes, first_flips = sample_crops(0, index.sizes)
    boxes, flips = sample_crops(1, index.sizes)
    abandoned = iter(loader.epoch(EpochSampler().order(len(index), 0), first_boxes, first_flips, progress=False))
    next(abandoned)
    abandoned.close()
    order = EpochSampler().order(len(index), 1)
    images, positions = run_epoch(loader, order, boxes, flips)
    np.testing.assert_array_equal(positions.numpy(), order)
    reference, _ = run_epoch(ReplayLoader(index, res=16, batch_size=4, device="cpu", decoder="torch", workers=0),
                             order, boxes, flips)
    assert torch.equal(images, reference)


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match="batch size"):
        ReplayLoader(None, res=16, batch_size=0, device="cpu")


@pytest.mark.parametrize("decoder", ["dali", "torch", "pil"])
def test_an_unknown_resize_filter_is_refused_by_name_before_any_file_is_blamed(index, decoder):
    with pytest.raises(ValueError, match=re.escape(f"interpolation 'nearest': expected one of {INTERPOLATIONS}")):
        ReplayLoader(index, res=16, batch_size=4, device="cpu", decoder=decoder, interpolation="nearest")
