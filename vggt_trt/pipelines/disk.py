"""Disk footprint of the conversion stages: what each writes, checked against the free space before it runs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from ..graph.io import EXTERNAL_DATA_THRESHOLD, graph_bytes
from ..resources import disk_budget

# Bytes a stage writes besides its tensors (graph structure, report, timing cache), added to each estimate.
WRITE_SLACK = 64 << 20
# Weight bytes of a fp16/bf16 graph over its fp32 source (norms and a few heads stay fp32): 2.75 / 4.6 GB.
CAST_BYTES_RATIO = 0.6


def writes(estimate: Callable[..., tuple[Path, int]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Stage decorator: ``estimate(*args)`` gives the artifact the stage writes and about how many bytes; the
    free disk is checked before the stage starts, and a disk-full error while it writes becomes one line."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def stage(*args: Any, **kwargs: Any) -> Any:
            target, needed = estimate(*args, **kwargs)
            with disk_budget(target, needed):
                return fn(*args, **kwargs)
        return stage
    return wrap


def graph_pass_bytes(src: Path, dst: Path) -> int:
    """A pass that keeps the weights: the structure beside a large graph's data, else a whole copy."""
    whole = graph_bytes(src)
    if whole > EXTERNAL_DATA_THRESHOLD and src.parent.resolve() == dst.parent.resolve():
        return src.stat().st_size + WRITE_SLACK
    return whole + WRITE_SLACK


def pass_writes(src: Path, dst: Path, *args: Any, **kwargs: Any) -> tuple[Path, int]:
    return dst, graph_pass_bytes(src, dst)


def simplify_writes(src: Path, dst: Path, skip: bool) -> tuple[Path, int]:
    return dst, 0 if skip else graph_pass_bytes(src, dst)


def cast_writes(src: Path, dst: Path, *args: Any, **kwargs: Any) -> tuple[Path, int]:
    return dst, int(CAST_BYTES_RATIO * graph_bytes(src)) + WRITE_SLACK


def quantize_writes(src: Path, dst: Path, *args: Any, **kwargs: Any) -> tuple[Path, int]:
    return dst, graph_bytes(src) + WRITE_SLACK


def build_writes(onnx_path: Path, engine_path: Path, *args: Any, **kwargs: Any) -> tuple[Path, int]:
    return engine_path, graph_bytes(onnx_path) + WRITE_SLACK  # an engine holds about the graph's weights
