"""The DALI replay graph: encoded bytes + stored boxes → ROI decode → antialiased resize and flip → uint8.

The same graph serves training crops and evaluation (whose boxes are centre squares, see
crops.center_boxes). On a GPU the decoder runs "mixed" and the rest on the device; on
the CPU everything runs on "cpu" with ``device_id=None``. Only the device differs.

The flip happens inside the resize (a mirrored region of interest) and the graph ends in
HWC, handed to torch as an NCHW view in channels_last order: no separate flip or
transpose pass (measured on the CPU: 15% faster at 64 px, 2% at 224 px).
"""

from __future__ import annotations

import collections
import ctypes
import os
import weakref

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types

    DALI_AVAILABLE = True
except ImportError:  # not on this platform: pil_replay.PilDecoder serves
    DALI_AVAILABLE = False

from mealv2.pipeline.decoders import INTERPOLATIONS
from mealv2.pipeline.distributed import as_device
from mealv2.pipeline.epoch_plan import PlanFolder, PlanSource, plan_path, replay_inputs, write_plan

_INPUTS = ("encoded", "anchor", "shape", "roi_start", "roi_end")
_PIPELINES: weakref.WeakSet = weakref.WeakSet()  # every pipeline this process has built and not yet dropped
_INHERITED: list = []  # in a forked child: the parent's pipelines, held so that none is ever destroyed here


def _hold_inherited_pipelines() -> None:
    """In a forked child (a DataLoader worker), keep every pipeline the parent had: their threads did not survive
    the fork, so a destructor run here (the garbage collector meeting a dropped loader) hangs or aborts."""
    _INHERITED.extend(_PIPELINES)


os.register_at_fork(after_in_child=_hold_inherited_pipelines)


def _built(pipe):
    """``pipe`` built and known to the fork guard above."""
    pipe.build()
    _PIPELINES.add(pipe)
    return pipe


def _interp(interpolation: str):
    """DALI's name for one of the replay's resize filters."""
    return dict(zip(INTERPOLATIONS, (types.INTERP_LINEAR, types.INTERP_CUBIC), strict=True))[interpolation]


def _replay(encoded, anchor, shape, roi_start, roi_end, res: int, interpolation: str, on_gpu: bool,
            hw_decoder_load: float | None):
    """The replay itself: ROI decode of the box, then an antialiased resize of the (possibly mirrored) region."""
    images = fn.decoders.image_slice(
        encoded, anchor, shape,
        device="mixed" if on_gpu else "cpu",
        axis_names="HW",  # our boxes are (top, left, height, width): anchors and shapes in H, W order
        normalized_anchor=False, normalized_shape=False,
        output_type=types.RGB, jpeg_fancy_upsampling=True, adjust_orientation=True,
        **({"hw_decoder_load": hw_decoder_load} if on_gpu and hw_decoder_load is not None else {}),
    )
    return fn.resize(images, size=(res, res), interp_type=_interp(interpolation), antialias=True,
                     roi_start=roi_start, roi_end=roi_end, roi_relative=True)


def _fed_graph(res: int, interpolation: str, on_gpu: bool, hw_decoder_load: float | None):
    """Inputs pushed per batch with ``feed_input`` (batch mode: a last partial batch is delivered whole)."""
    inputs = (fn.external_source(name=name, batch=True, no_copy=False) for name in _INPUTS)
    return _replay(*inputs, res, interpolation, on_gpu, hw_decoder_load)


def _planned_graph(source: PlanSource, prefetch: int, res: int, interpolation: str, on_gpu: bool,
                   hw_decoder_load: float | None):
    """Inputs pulled from ``source`` by DALI's Python workers, ``prefetch`` batches ahead; positions pass through."""
    *inputs, positions = fn.external_source(source=source, num_outputs=len(_INPUTS) + 1, batch=True,
                                            batch_info=True, parallel=True, prefetch_queue_depth=prefetch)
    return _replay(*inputs, res, interpolation, on_gpu, hw_decoder_load), positions


def _to_torch(images, device: torch.device, stream=None) -> torch.Tensor:
    """DALI's HWC batch as torch uint8 NCHW (a channels_last view) on ``device``; a GPU copy is queued on ``stream``.

    The TensorList is copied whole, sample after sample: DALI's outputs need not be one dense
    buffer (``as_tensor`` refuses those), and feed_ndarray checks shapes a TensorList does not have.
    """
    out = torch.empty((len(images), *images[0].shape()), dtype=torch.uint8, device=device)
    target = ctypes.c_void_p(out.data_ptr())
    if stream is None:
        images.copy_to_external(target)
    else:
        images.copy_to_external(target, stream.cuda_stream, non_blocking=True)
    return out.permute(0, 3, 1, 2)


def _placement(device: torch.device) -> tuple[bool, int | None]:
    on_gpu = device.type == "cuda"
    return on_gpu, (device.index if on_gpu else None)


# The oldest DALI whose contract DaliStream relies on: the dynamic executor (stable since 1.44) returning
# outputs ordered on the stream given to ``pipe.run(cuda_stream)``; 1.51.2 is also the oldest release built
# for CUDA 13 (nvidia-dali-cuda130). Only 2.4.0 has been run here (on the CPU).
DALI_FLOOR = "1.51.2"


def _require_dali():
    """Refuse a missing or too old DALI in one line, instead of a pipelined path that cannot run."""
    if not DALI_AVAILABLE:
        raise RuntimeError("DALI is not installed on this platform: use --decoder torch or pil")
    import nvidia.dali
    from packaging.version import Version

    if Version(nvidia.dali.__version__) < Version(DALI_FLOOR):
        raise RuntimeError(f"DALI {nvidia.dali.__version__} is older than {DALI_FLOOR}, the oldest whose pipelined "
                           "executor mealv2 can run: upgrade nvidia-dali-cuda120 (or -cuda130), or use --decoder torch")


class DaliDecoder:
    """Replays one batch of crops at a time with DALI; returns torch uint8 (B, 3, res, res) on ``device``.

    Synchronous (the legacy executor, one batch in flight): it serves single batches, such
    as finding which file of a failed batch DALI cannot decode. Epochs run on ``DaliStream``.
    """

    name = "dali"

    def __init__(self, res: int, interpolation: str, batch_size: int, device: torch.device | str = "cpu",
                 threads: int = 2, hw_decoder_load: float | None = None):
        _require_dali()
        self.res = res
        self.device = as_device(device)
        on_gpu, device_id = _placement(self.device)
        build = pipeline_def(_fed_graph, batch_size=batch_size, num_threads=max(1, threads),
                             device_id=device_id, exec_pipelined=False, exec_async=False,
                             prefetch_queue_depth=1)
        self._build = lambda: _built(build(res=res, interpolation=interpolation, on_gpu=on_gpu,
                                           hw_decoder_load=hw_decoder_load))
        self._pipe = self._build()

    def close(self) -> None:
        """Shut the pipeline down now (its threads), not whenever the garbage collector meets it."""
        self._pipe = None

    def decode(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """Run one batch (any size up to batch_size); the crops come back in the order given.

        On a GPU the copy out of DALI is queued on the current stream (the loader's copy
        stream), into memory allocated on that stream. The copy given a stream is asynchronous, and this executor reuses its output buffer at the next ``run()``, so
        the stream is synchronised before returning: only this copy waits, not the training step.
        """
        try:
            for name, value in zip(_INPUTS, (encoded, *replay_inputs(boxes, flips))):
                self._pipe.feed_input(name, value)
            (images,) = self._pipe.run()  # complete on return: this executor synchronises outputs with the host
        except Exception:
            self._pipe = self._build()  # a DALI pipeline that raised fails every later batch too: start anew
            raise
        if self.device.type != "cuda":
            return _to_torch(images, self.device)
        stream = torch.cuda.current_stream(self.device)
        images = _to_torch(images, self.device, stream)
        stream.synchronize()
        return images


class DaliStream:
    """Whole epochs through DALI's asynchronous pipelined (dynamic) executor, ``prefetch`` batches in flight.

    Python worker processes (spawned: CUDA may already be initialised here) read the files
    of the batches ahead from the epoch's plan, while DALI decodes, resizes and flips the
    batches before them, so the training step waits on neither. ``epoch`` yields
    (images, positions) in the plan's order, the last batch short when the order is.
    An epoch left unfinished leaves DALI mid-epoch: the next one starts a fresh pipeline.
    """

    def __init__(self, index, res: int, interpolation: str, batch_size: int, device: torch.device | str = "cpu",
                 threads: int = 2, hw_decoder_load: float | None = None, prefetch: int = 2):
        _require_dali()
        self.device = as_device(device)
        self.prefetch = max(2, prefetch)
        # The plan folder is made with the first pipeline, whose workers remove it if this process is killed (or the
        # next stream does): a stream that never runs (a killed run's validation stream) leaves no folder behind.
        self._plans: PlanFolder | None = None
        self._source: PlanSource | None = None
        on_gpu, device_id = _placement(self.device)
        build = pipeline_def(_planned_graph, batch_size=batch_size, num_threads=max(1, threads),
                             device_id=device_id, exec_pipelined=True, exec_async=True, exec_dynamic=True,
                             prefetch_queue_depth=self.prefetch, py_num_workers=self.prefetch,
                             py_start_method="spawn")

        def build_pipeline():
            if self._plans is None:
                self._plans = PlanFolder()
                self._source = PlanSource(index, self._plans.name, batch_size)
            return build(source=self._source, prefetch=self.prefetch, res=res, interpolation=interpolation,
                         on_gpu=on_gpu, hw_decoder_load=hw_decoder_load)

        self._build = build_pipeline
        self._pipe = None
        self._epoch = 0  # DALI's epoch counter: the plan the workers read next
        self._running = False  # an epoch of self._pipe is under way (or was abandoned unfinished)
        self._in_copy: collections.deque = collections.deque()  # (DALI outputs, copy-done event) on a GPU

    def epoch(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, stream=None):
        """Yield (images, positions) for ``order``; on a GPU the image copies are queued on ``stream``."""
        if len(order) == 0:
            return
        if self._pipe is None or self._running:  # a pipeline mid-epoch cannot start another
            self._pipe, self._epoch = None, 0  # the old one shut down before the new one starts its workers
            self._pipe = _built(self._build())
        pipe, epoch = self._pipe, self._epoch
        self._running = True
        write_plan(self._plans.name, epoch, order, boxes, flips)
        try:
            while True:
                try:
                    images, positions = pipe.run(stream)  # None: outputs synchronised with the host
                except StopIteration:
                    break
                yield self._hand_over(images, stream), torch.from_numpy(np.array(positions.as_tensor()))
        except BaseException:
            if self._pipe is pipe:  # a pipeline that raised, or was left mid-epoch, cannot go on
                self._pipe, self._running = None, False
            raise
        pipe.reset()
        plan_path(self._plans.name, epoch).unlink(missing_ok=True)
        if self._pipe is pipe:
            self._epoch, self._running = epoch + 1, False

    def close(self) -> None:
        """Shut the pipeline and its worker processes down now, and remove the plan folder."""
        for _, copied in self._in_copy:  # DALI's buffers outlive the copies out of them
            copied.synchronize()
        self._in_copy.clear()
        self._pipe, self._running, self._source = None, False, None
        if self._plans is not None:
            self._plans.cleanup()
            self._plans = None

    def _hand_over(self, images, stream) -> torch.Tensor:
        """Copy out of DALI; on a GPU, DALI's buffer is kept referenced until the copy's event has passed."""
        if stream is None:
            return _to_torch(images, self.device)
        out = _to_torch(images, self.device, stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        while self._in_copy and self._in_copy[0][1].query():
            self._in_copy.popleft()
        self._in_copy.append((images, copied))
        return out
