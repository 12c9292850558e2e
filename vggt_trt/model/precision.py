"""PyTorch precision modes for our VGGT: fp32, autocast, low-precision trunk weights with fp32 heads, or all bf16."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from ..errors import InputError
from ..precisions import TORCH_PRECISIONS


def apply_precision(model: nn.Module, precision: str) -> Callable[[], ContextManager]:
    """Cast ``model`` in place for ``precision``; returns a factory of the context to run it in.

    ``bf16``/``fp16``: aggregator weights in the low type, camera/depth/point heads stay fp32
    (the model casts tokens to fp32 before the heads). ``bf16-all``: the heads in bf16 too (6 % faster
    compiled on an H200, about a third more error; docs/BENCHMARKS.md). ``*-autocast``: fp32 weights under
    torch.autocast (the official inference recipe). ``tf32``: fp32 with TF32 matmuls allowed.
    """
    if precision not in TORCH_PRECISIONS:
        raise InputError(f"unknown PyTorch precision {precision!r}; choose from {', '.join(TORCH_PRECISIONS)}")
    device_type = next(model.parameters()).device.type
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision in ("bf16", "fp16"):
        model.aggregator.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        for head in ("camera_head", "depth_head", "point_head"):
            if getattr(model, head, None) is not None:
                getattr(model, head).float()
        return contextlib.nullcontext
    if precision == "bf16-all":
        model.to(torch.bfloat16)
        return contextlib.nullcontext
    model.float()
    if precision.endswith("-autocast"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)
    return contextlib.nullcontext
