"""Camera frames to model input on the run's device: one upload as uint8, then crop, resize and scale there.

A frame is centre-cropped to the model's aspect ratio (whole pixels, so intrinsics map exactly) and
resized with antialiased bilinear filtering (what PIL's ``BILINEAR`` does when it shrinks). Uploads go
through pinned host buffers with non-blocking copies on a side stream, so the copy of batch k+1 overlaps
the GPU work of batch k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class CropResize:
    """Source pixels (x0, y0, width, height) of the crop and the model size it is resized to."""

    x0: int
    y0: int
    width: int
    height: int
    out_h: int
    out_w: int

    @property
    def pixel_map(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((scale_x, scale_y), (offset_x, offset_y)) from source to model pixels (:func:`rig.map_intrinsics`)."""
        sx, sy = self.out_w / self.width, self.out_h / self.height
        return (sx, sy), (-self.x0 * sx, -self.y0 * sy)


def centre_crop(src_h: int, src_w: int, out_h: int, out_w: int) -> CropResize:
    """The largest centred whole-pixel crop of a ``src_h x src_w`` frame with the aspect of ``out_h x out_w``."""
    if min(src_h, src_w, out_h, out_w) <= 0:
        raise InputError(f"frame and model sizes must be positive, found {src_h}x{src_w} -> {out_h}x{out_w}")
    if src_w * out_h > src_h * out_w:
        h, w = src_h, min(src_w, int(round(src_h * out_w / out_h)))
    else:
        h, w = min(src_h, int(round(src_w * out_h / out_w))), src_w
    return CropResize((src_w - w) // 2, (src_h - h) // 2, w, h, out_h, out_w)


def frames_to_model_input(frames: Any, out_h: int, out_w: int) -> tuple[Any, list[CropResize]]:
    """uint8 RGB frames ``[S, H, W, 3]`` (torch, any device) or a list of differently sized ones ->
    float32 ``[S, 3, out_h, out_w]`` in [0, 1] on the same device, and each frame's crop."""
    import torch
    import torch.nn.functional as F

    items = list(frames) if isinstance(frames, (list, tuple)) else [frames[i] for i in range(frames.shape[0])]
    if not items:
        raise InputError("no frames to preprocess")
    out, crops = [], []
    for f in items:
        if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != torch.uint8:
            raise InputError(f"frames must be uint8 [H, W, 3] RGB, found {f.dtype} {list(f.shape)}")
        c = centre_crop(int(f.shape[0]), int(f.shape[1]), out_h, out_w)
        x = f[c.y0:c.y0 + c.height, c.x0:c.x0 + c.width].permute(2, 0, 1)[None].float()
        if (c.height, c.width) != (out_h, out_w):
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
        crops.append(c)
    return (torch.cat(out) / 255.0).clamp_(0.0, 1.0), crops


class FrameUploader:
    """Host frames -> one device tensor per batch through a ring of pinned buffers (non-blocking on CUDA).

    ``upload`` returns the device tensor and, on CUDA, an event the consumer's stream must wait on
    (:meth:`wait`); a buffer is rewritten only after its previous copy has finished, so memory stays flat.
    """

    def __init__(self, device: Any, ring: int = 3) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ring = ring
        self._buffers: list[Any] = []
        self._events: list[Any] = []
        self._next = 0

    def _buffer(self, shape: tuple[int, ...]) -> tuple[Any, int]:
        import torch

        slot = self._next % self.ring
        self._next += 1
        if slot >= len(self._buffers) or tuple(self._buffers[slot].shape) != shape:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda)
            if slot >= len(self._buffers):
                self._buffers.append(buf)
                self._events.append(None)
            else:
                self._buffers[slot] = buf
        elif self._events[slot] is not None:
            self._events[slot].synchronize()
        return self._buffers[slot], slot

    def upload(self, frames: Sequence[np.ndarray]) -> tuple[Any, Any]:
        """Same-size uint8 ``[H, W, 3]`` frames -> (``[S, H, W, 3]`` uint8 on the device, event or None)."""
        import torch

        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            return [torch.from_numpy(np.ascontiguousarray(f)).to(self.device) for f in frames], None
        buf, slot = self._buffer((len(frames), *frames[0].shape))
        for i, f in enumerate(frames):
            buf[i].numpy()[...] = f
        if not self.cuda:
            return buf.clone(), None
        with torch.cuda.stream(self.stream):
            dev = buf.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[slot] = event
        return dev, event

    def wait(self, tensor: Any, event: Any) -> None:
        """Make the current stream wait for ``event`` and keep ``tensor`` alive for it."""
        import torch

        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            tensors = tensor if isinstance(tensor, list) else [tensor]
            for t in tensors:
                t.record_stream(stream)
