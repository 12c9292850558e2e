"""What every graph pass shares: onnx-graphsurgeon with a quiet logger, one log line per pass, the model header."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import onnx


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[Any]:
    """Import onnx-graphsurgeon with its own console logger limited to errors for the duration of a pass."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    saved = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield gs
    finally:
        G_LOGGER.severity = saved


def log_pass(log: logging.Logger, name: str, before: int, after: int, t0: float, extra: str = "") -> None:
    """One INFO line per pass on the pass module's own logger: node counts before and after, and the time."""
    log.info("%s: %d -> %d nodes in %.2f s%s", name, before, after, time.perf_counter() - t0, extra)


def keep_model_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Carry the IR version, opsets, producer and metadata of ``src`` over to a re-exported ``dst``."""
    dst.ir_version = src.ir_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
