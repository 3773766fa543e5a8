"""The DALI replay graph: encoded bytes + stored boxes → ROI decode → antialiased resize → flip → uint8 NCHW.

The same graph serves training crops and evaluation (whose boxes are centre squares, see
crops.center_boxes). On a GPU the decoder runs "mixed" and the rest on the device; on
the CPU everything runs on "cpu" with ``device_id=None``. Only the device differs.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    DALI_AVAILABLE = True
except ImportError:  # not on this platform: reference.PilDecoder serves
    DALI_AVAILABLE = False

_INPUTS = ("encoded", "anchor", "shape", "flip", "index")


def _interp(interpolation: str):
    table = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
    if interpolation not in table:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {sorted(table)}")
    return table[interpolation]


def _replay_graph(res: int, interpolation: str, on_gpu: bool):
    """Graph body; inputs are fed per batch in batch mode, so a last partial batch is delivered whole."""
    encoded, anchor, shape, flip, index = (
        fn.external_source(name=name, batch=True, no_copy=False) for name in _INPUTS)
    images = fn.decoders.image_slice(
        encoded, anchor, shape,
        device="mixed" if on_gpu else "cpu",
        axis_names="HW",  # our boxes are (top, left, height, width): anchors and shapes in H, W order
        normalized_anchor=False, normalized_shape=False,
        output_type=types.RGB, jpeg_fancy_upsampling=True, adjust_orientation=True,
    )
    images = fn.resize(images, size=(res, res), interp_type=_interp(interpolation), antialias=True)
    images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=flip)
    return images, index


class DaliDecoder:
    """Replays a batch of crops with DALI; returns torch uint8 (B, 3, res, res) on ``device`` and the indices."""

    name = "dali"

    def __init__(self, res: int, interpolation: str, batch_size: int, device: torch.device | str = "cpu",
                 threads: int = 2):
        if not DALI_AVAILABLE:
            raise RuntimeError("DALI is not installed on this platform: use --decoder pil")
        self.res = res
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index or 0) if on_gpu else None
        build = pipeline_def(_replay_graph, batch_size=batch_size, num_threads=max(1, threads),
                             device_id=device_id, exec_pipelined=False, exec_async=False,
                             prefetch_queue_depth=1)
        self._pipe = build(res=res, interpolation=interpolation, on_gpu=on_gpu)
        self._pipe.build()
        self._stream = torch.cuda.Stream(self.device) if on_gpu else None

    def decode(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray,
               indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one batch (any size up to batch_size); the crops come back in the order given."""
        boxes = np.ascontiguousarray(boxes, dtype=np.int32)
        feeds = (encoded, boxes[:, :2].copy(), boxes[:, 2:].copy(),
                 np.ascontiguousarray(flips, dtype=np.int32), np.ascontiguousarray(indices, dtype=np.int64))
        for name, value in zip(_INPUTS, feeds):
            self._pipe.feed_input(name, value)
        images, index = self._pipe.run()
        images = images.as_tensor()
        out = torch.empty(images.shape(), dtype=torch.uint8, device=self.device)
        if self._stream is None:
            feed_ndarray(images, out)
        else:  # copy on our own stream, then make the consumer's stream wait for it
            with torch.cuda.stream(self._stream):
                feed_ndarray(images, out, cuda_stream=self._stream)
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return out, torch.from_numpy(index.as_array().reshape(-1).copy())
