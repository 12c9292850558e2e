"""Console + file logging for the command-line front ends (the library itself only uses getLogger)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "modelopt", "polygraphy", "websockets")


def quiet_third_party() -> None:
    """Third-party exporters log every pass at INFO; keep their warnings only."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(log_dir: str | Path | None, run_name: str, verbose: bool = False) -> Path | None:
    """Log INFO (DEBUG with ``verbose``) to the console and to ``<log_dir>/<run_name>-<time>.log``."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_vggt_trt", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console._vggt_trt = True  # type: ignore[attr-defined]
    root.addHandler(console)
    quiet_third_party()
    if log_dir is None:
        return None
    path = Path(log_dir) / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._vggt_trt = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    return path
