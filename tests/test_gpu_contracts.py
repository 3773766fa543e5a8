"""The GPU path's contracts with CUDA, DALI and torch, checked on the CPU with spies where only a GPU runs them.

CUDA keeps the current device per host thread (a new thread starts on GPU 0), and an event
with no stream is recorded on the current device's current stream: ``CudaSpy`` keeps both
as CUDA would, so a test can see which device a thread works on and which stream an event
ends. What only a GPU shows (that the copy has really landed, the memory on GPU 0) is not
checked here: `make gpu-check` runs the device-taking tests on one.
"""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tqdm import tqdm

import mealv2

from mealv2.pipeline.composites import DeviceMix
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import load_index
from mealv2.pipeline.decoders import dali_installed
from mealv2.pipeline.distributed import setup
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.mix import MixSpec
from mealv2.softlabels import cache, teachers
from mealv2.softlabels.cache import UnitCrops, UnitWriter, label_unit, to_host
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers
from mealv2.softlabels.topk import compress


class SpyStream(str):
    """A CUDA stream as the spy names it ("stream of cuda:1"); ``waited`` lists the events it was made to wait for."""

    def wait_event(self, event) -> None:
        self.waited.append(event)


class CudaSpy:
    """torch.cuda's per-thread current device and stream and the streams its events are recorded on, without a GPU.

    Tensors "on a GPU" stay in host memory: every copy to one (``Tensor.to``) is recorded in ``copies`` as (on a
    thread other than the main one, the thread's current device, its current stream, the target), and each
    ``record_stream`` in ``used_on``. What only a GPU shows (the bytes landing, the memory used) is not seen here.
    """

    def __init__(self, monkeypatch):
        self._thread = threading.local()
        self._streams: dict[str, SpyStream] = {}
        self.recorded_on: list[str] = []
        self.copies: list[tuple] = []
        self.used_on: list[str] = []
        spy = self

        class Event:
            def record(self, stream=None):
                self.stream = stream if stream is not None else spy.current_stream()
                spy.recorded_on.append(self.stream)

            def synchronize(self):
                pass

        def to(tensor, *args, _to=torch.Tensor.to, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
                self.copies.append((threading.current_thread() is not threading.main_thread(), self.current_device(),
                                    self.current_stream(), torch.device(target)))
                return tensor
            return _to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "current_device", self.current_device)
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self._stream(f"copy stream of {device}"))
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: tensor)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: self.used_on.append(stream))

    def _stream(self, name: str) -> SpyStream:
        if name not in self._streams:
            self._streams[name] = SpyStream(name)
            self._streams[name].waited = []
        return self._streams[name]

    def set_device(self, device) -> None:
        """As torch: an int or an indexed device; a bare "cuda" raises ValueError (torch.cuda._utils's rule)."""
        self._thread.index = torch.cuda._utils._get_device_index(device)

    def current_device(self) -> int:
        return getattr(self._thread, "index", 0)

    def current_stream(self, device=None) -> SpyStream:
        """The thread's stream: one made current with ``torch.cuda.stream``, else the device's own."""
        index = self.current_device() if device is None else torch.device(device).index
        made_current = getattr(self._thread, "stream", None)
        if made_current is not None and index == self.current_device():
            return made_current
        return self._stream(f"stream of cuda:{index}")

    @contextlib.contextmanager
    def stream(self, stream):
        """As torch.cuda.stream: ``stream`` is the thread's current one inside."""
        before, self._thread.stream = getattr(self._thread, "stream", None), stream
        try:
            yield
        finally:
            self._thread.stream = before


@pytest.fixture
def cuda(monkeypatch) -> CudaSpy:
    return CudaSpy(monkeypatch)


def test_the_copy_to_the_host_ends_with_an_event_on_the_tensors_device(cuda):
    """With --device cuda:1 and no torchrun the thread's current device is 0: the event goes on cuda:1's stream."""
    (host,), wait = to_host((torch.arange(3),), torch.device("cuda", 1))
    wait()
    assert cuda.recorded_on == ["stream of cuda:1"] and host.tolist() == [0, 1, 2]


def test_a_single_process_job_on_cuda_1_makes_it_the_current_device(cuda, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup("cuda:1").device == torch.device("cuda", 1) and torch.cuda.current_device() == 1


def test_the_loaders_producer_thread_copies_on_its_gpu_and_the_step_waits_for_the_copies(cuda, small_root):
    """A loader built for cuda:1: the thread that decodes and copies makes GPU 1 its own first (a new thread's is
    GPU 0) and copies every batch on the copy stream; each batch ends with an event on that stream, which the
    consumer's stream on cuda:1 waits for, and the tensors are marked as used on it."""
    index = load_index(small_root / "train")
    boxes, flips = CropSpec().draw(0, index.sizes)
    with ReplayLoader(index, 16, 8, "cuda:1", "pil", workers=1) as loader:
        batches = list(loader.epoch(np.arange(len(index)), boxes, flips, progress=False))
    assert [len(indices) for _, indices in batches] == [8, 8, 8, 6]
    gpu = torch.device("cuda", 1)
    assert cuda.copies == [(True, 1, "copy stream of cuda:1", gpu)] * 8  # each batch's images and its indices
    assert cuda.recorded_on == ["copy stream of cuda:1"] * 4
    step = torch.cuda.current_stream(gpu)
    assert step == "stream of cuda:1" and [event.stream for event in step.waited] == cuda.recorded_on
    assert cuda.used_on == [step] * 8


def test_a_bare_cuda_device_is_the_callers_current_gpu_in_every_thread(cuda, small_root, reference_store,
                                                                      monkeypatch):
    """"cuda" without an index is normalised where it enters: the loader's producer thread, the public StoreLoader
    (whose default it is) and the decoders all work on the GPU that was current when they were built."""
    from mealv2.pipeline.loader import Epoch
    from mealv2.pipeline.threaded import ThreadedDecoder

    torch.cuda.set_device(1)
    loader = ReplayLoader(load_index(small_root / "train"), 16, 8, "cuda", "pil", workers=1)
    decoder = loader._backend.decoder
    assert loader.device == torch.device("cuda", 1) and decoder.device == torch.device("cuda", 1)
    assert isinstance(decoder, ThreadedDecoder)
    assert list(Epoch(iter(()), 0, 1, "epoch", False, loader.device)) == []  # the producer's use_device passed
    public = mealv2.StoreLoader(small_root, mealv2.open_store(str(reference_store)), 8, decoder="pil", workers=1)
    assert public.device == public.loader.device == public.targets.device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="specified index"):  # what the producer met before the normalisation
        list(Epoch(iter(()), 0, 1, "epoch", False, torch.device("cuda")))


def test_torchrun_refuses_one_gpu_for_every_rank(monkeypatch):
    """--device cuda:1 under torchrun would put every rank on GPU 1: refused in one line, before any group forms."""
    from mealv2.pipeline.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="every rank on one GPU"):
        resolve_device("cuda:1", local_rank=0, distributed=True)


def test_the_store_writers_thread_works_on_the_jobs_device(cuda):
    """The writer waits on the copies' events on a thread of its own: that thread takes the job's GPU first."""
    devices = []

    class Store:
        def write_unit(self, slot, chunk, labels):
            devices.append(labels.probs[0])

    writer = UnitWriter(Store(), torch.device("cuda", 1))
    writer.submit(0, 0, lambda: SimpleNamespace(probs=[torch.cuda.current_device()]))
    writer.wait()
    assert devices == [1]


needs_dali = pytest.mark.skipif(not dali_installed(), reason="DALI is not installed on this platform")


@needs_dali
def test_an_old_dali_is_one_clear_error(small_root, monkeypatch):
    import nvidia.dali

    from mealv2.pipeline.dali import DALI_FLOOR

    monkeypatch.setattr(nvidia.dali, "__version__", "1.40.0")
    with pytest.raises(RuntimeError, match=f"DALI 1.40.0 is older than {DALI_FLOOR}"):
        ReplayLoader(load_index(small_root / "train"), 16, 8, "cpu", "dali", workers=1)


@needs_dali
def test_a_pipelined_path_that_cannot_run_is_an_error_not_a_fallback(small_root):
    """A failure no file explains (here: a DALI without stream-aware outputs) stops the epoch with DALI's reason,
    instead of a warning and the epoch batch by batch, every epoch."""
    index = load_index(small_root / "train")
    loader = ReplayLoader(index, 16, 8, "cpu", "dali", workers=1)
    real = loader._backend.stream

    class Stream:
        prefetch = real.prefetch

        def epoch(self, order, boxes, flips, stream=None):
            raise TypeError("run() takes 1 positional argument but 2 were given")
            yield

    loader._backend.stream = Stream()
    boxes, flips = CropSpec().draw(0, index.sizes)
    with pytest.raises(RuntimeError, match="failed on batches that decode one at a time: run"):
        list(loader.epoch(np.arange(len(index)), boxes, flips, progress=False))


def test_cutmix_hands_the_teachers_one_batch_shape_and_labels_each_own_row(small_root):
    """Stage one with CutMix drops the partners borrowed from other chunks: the teachers still get batches of the
    loader's size (cuDNN autotunes each new shape), and each own row gets its composite's labels."""
    index = load_index(small_root / "train")
    boxes, flips = CropSpec().draw(0, index.sizes)
    mix = MixSpec(1.0).draw(0, len(index), 16)
    rows = slice(8, 16)  # most partners lie in other chunks

    class Teachers:
        device, num_classes, shapes = torch.device("cpu"), 3, []

        def __call__(self, images, faults=False):
            self.shapes.append(tuple(images.shape))
            probs = images.float().mean((2, 3)).softmax(-1)  # a function of each row's pixels alone
            return (probs, probs.log()) + ((torch.zeros(len(probs), dtype=torch.int32),) if faults else ())

    spy = Teachers()
    crops = UnitCrops(CropSpec(), index.sizes)
    labels = label_unit(spy, ReplayLoader(index, 16, 4, "cpu", "torch", workers=1), 0, 0, rows, crops, mix, 2,
                        tqdm(disable=True))()
    assert set(spy.shapes) == {(4, 3, 16, 16)}
    whole = ReplayLoader(index, 16, len(index), "cpu", "torch", workers=1)
    images, indices = next(iter(whole.epoch(np.arange(len(index)), boxes, flips, progress=False)))
    values, top = compress(spy(DeviceMix(mix).batch(indices).images(images))[0][rows], 2)
    np.testing.assert_array_equal(labels.probs, values.numpy())
    np.testing.assert_array_equal(labels.classes, top.numpy().astype(labels.classes.dtype))
    assert (labels.mix_partner == mix.partner[rows]).all()


def test_the_batch_probe_leaves_room_for_the_replays_buffers(teacher_files, monkeypatch):
    """torch's counters miss DALI's and nvJPEG's buffers: on photos the probe takes a smaller batch than the teachers
    alone would allow. Here the teachers take 12 MiB an image of a 16 GiB GPU (1024 alone fill 0.75 of it)."""
    ensemble = TeacherEnsemble(parse_teachers(teacher_files, 32), 3, "cpu")
    ensemble.device = torch.device("cuda", 0)
    monkeypatch.setattr(teachers, "_torch_peak_bytes", lambda _, batch, res: batch * 12 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=16 << 30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    photos = np.tile([375, 500], (100, 1))
    assert ensemble.batch_size(224) == 1024
    assert ensemble.batch_size(224, photos) == 512


def test_the_steady_stage_one_rate_leaves_the_first_unit_out(monkeypatch):
    """The first unit pays cuDNN's autotuning and DALI's start: the steady rate runs from its end to the last's."""
    clock = iter([10.0, 11.0, 13.0])
    monkeypatch.setattr(cache.time, "perf_counter", lambda: next(clock))

    class Store:
        def write_unit(self, slot, chunk, labels):
            pass

    writer = UnitWriter(Store())
    for chunk in range(3):
        writer.submit(0, chunk, lambda: SimpleNamespace(probs=np.zeros((100, 2))))
    writer.wait()
    assert writer.steady_rate() == 200 / 3.0


@needs_dali
def test_the_replay_pipeline_runs_dalis_dynamic_asynchronous_executor(small_root):
    """pipeline/dali.py is written for DALI's dynamic, asynchronous, pipelined executor (pinned here by DALI's
    own properties, which read the same on the CPU); what it does on a GPU is not checked here."""
    loader = ReplayLoader(load_index(small_root / "train"), 16, 8, "cpu", "dali", workers=1)
    stream = loader._backend.stream
    pipe = stream._build()
    assert (pipe.exec_dynamic, pipe.exec_async, pipe.exec_pipelined) == (True, True, True)
    assert pipe.prefetch_queue_depth == stream.prefetch


@needs_dali
def test_dalis_outputs_are_copied_without_asking_for_one_dense_buffer():
    """DALI's as_tensor() refuses a TensorList whose samples lie apart (its dynamic executor's outputs may): the copy
    out takes the TensorList itself, sample after sample, in order."""
    from nvidia.dali.backend import TensorListCPU

    from mealv2.pipeline.dali import _to_torch

    dense = TensorListCPU([np.full((2, 4, 3), i, np.uint8) for i in range(3)])

    class Scattered:
        def as_tensor(self):
            raise RuntimeError("TensorList is not dense")

        def __len__(self):
            return len(dense)

        def __getitem__(self, i):
            return dense[i]

        def copy_to_external(self, *args, **kwargs):
            return dense.copy_to_external(*args, **kwargs)

    images = _to_torch(Scattered(), torch.device("cpu"))
    assert images.shape == (3, 3, 2, 4) and images.amax((1, 2, 3)).tolist() == [0, 1, 2]
