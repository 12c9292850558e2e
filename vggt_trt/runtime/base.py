"""The runner interface shared by TensorRT engines, ONNX Runtime sessions and the PyTorch model.

Polygraphy's runner contract: a runner is built cheaply (it only stores its arguments), ``activate()``
loads the engine/session/model, ``infer(feeds)`` runs one forward and records ``last_inference_ms``,
``deactivate()`` frees everything; ``with runner:`` does both. ``input_metadata()`` gives each input's
shape (``None`` for a dynamic axis), its accepted range where one is known (an engine's optimisation
profile, a graph's recorded view range) and numpy dtype, read from the engine, graph or model config;
``view_range()`` is the range of views per forward (what a live loop needs when a camera drops out).

Timing: on a GPU ``last_inference_ms`` comes from CUDA events around the forward on the runner's stream
(host transfers excluded); on CPU from ``time.perf_counter``. :func:`vggt_trt.runtime.benchmark.benchmark`
reports which was used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, VggtTrtError
from ..views import ViewRange

logger = logging.getLogger(__name__)


class RuntimeUnavailableError(VggtTrtError):
    """The runner cannot run on this machine (no GPU, unsupported GPU, engine from another TensorRT)."""


@dataclass(frozen=True)
class TensorMeta:
    """One input or output: shape (``None`` for a dynamic axis) and numpy dtype name; for dynamic inputs with
    a known range the smallest, tuned-for and largest shapes accepted (TensorRT's min/opt/max)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    min_shape: tuple[int, ...] | None = None
    opt_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    @property
    def fixed(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def with_views(self, views: ViewRange | None) -> "TensorMeta":
        """This [S,3,H,W] input with axis 0 ranging over ``views`` (no change when None or not dynamic)."""
        if views is None or self.shape[0] is not None or not all(self.shape[1:]):
            return self
        rest = tuple(int(d) for d in self.shape[1:])
        return TensorMeta(self.name, self.shape, self.dtype, (views.min, *rest), (views.opt, *rest),
                          (views.max, *rest))

    def range_error(self, shape: Sequence[int]) -> str | None:
        """Why ``shape`` (rank and fixed axes already checked) is outside the accepted range; None if inside."""
        if self.min_shape is None or self.max_shape is None:
            return None
        outside = [i for i, (lo, d, hi) in enumerate(zip(self.min_shape, shape, self.max_shape)) if not lo <= d <= hi]
        if not outside:
            return None
        if outside == [0] and len(shape) == 4:
            return (f"has {shape[0]} views (shape {list(shape)}); it takes {self.min_shape[0]} to "
                    f"{self.max_shape[0]} views")
        return f"has shape {list(shape)}; it takes shapes from {list(self.min_shape)} to {list(self.max_shape)}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.min_shape is not None:
            out.update(min_shape=list(self.min_shape), opt_shape=list(self.opt_shape or self.min_shape),
                       max_shape=list(self.max_shape or self.min_shape))
        return out


def dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """A shape with every non-positive or symbolic axis as None (dynamic)."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None for d in shape)


class Runner:
    """Base runner: activation bookkeeping, input checks and timing; backends implement the ``*_impl`` hooks."""

    backend = "base"

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.last_inference_ms: float | None = None
        self.timing_method = "perf_counter"
        self.device = "cpu"

    # -- lifecycle
    def activate(self) -> "Runner":
        if self.is_active:
            logger.debug("%s is already active", self.name)
            return self
        t0 = time.perf_counter()
        self.activate_impl()
        self.is_active = True
        logger.info("activated %s runner %s in %.2f s (%s)", self.backend, self.name, time.perf_counter() - t0,
                    self.device)
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    # -- metadata and inference
    def input_metadata(self) -> list[TensorMeta]:
        self.require_active()
        return self.input_metadata_impl()

    def output_names(self) -> list[str]:
        self.require_active()
        return self.output_names_impl()

    def view_range(self) -> ViewRange | None:
        """Views per forward this runner takes (min, opt, max; all equal for a fixed shape); None when any count
        goes (the PyTorch model, graphs without a recorded range)."""
        meta = self.input_metadata()
        if len(meta) != 1 or len(meta[0].shape) != 4:
            raise InputError(f"{self.name}: expected one [S,3,H,W] image input, found {[m.to_dict() for m in meta]}")
        m = meta[0]
        return ViewRange.of_shape(m.shape, m.min_shape, m.opt_shape, m.max_shape)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward on host arrays; returns host arrays keyed by output name."""
        out = self.infer_device(feeds)
        return {k: v if isinstance(v, np.ndarray) else v.detach().float().cpu().numpy() for k, v in out.items()}

    def infer_device(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Like :meth:`infer` but outputs stay where the backend made them (torch CUDA tensors on a GPU)."""
        self.require_active()
        self._check_feeds(feeds)
        self.last_inference_ms = None
        out = self.infer_impl(feeds)
        if self.last_inference_ms is None:
            logger.warning("%s did not record an inference time", self.name)
        return out

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "name": self.name, "device": self.device, "timing": self.timing_method}

    # -- helpers
    def require_active(self) -> None:
        """Raise InputError unless the runner is active."""
        if not self.is_active:
            raise InputError(f"runner {self.name} is not active: call activate() or use it in a with-block")

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        meta = {m.name: m for m in self.input_metadata_impl()}
        missing = sorted(set(meta) - set(feeds))
        extra = sorted(set(feeds) - set(meta))
        if missing or extra:
            raise InputError(f"{self.name}: inputs {sorted(meta)} expected; missing {missing}, unexpected {extra}")
        for name, m in meta.items():
            value = feeds[name]
            shape = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
            if len(shape) != len(m.shape) or any(d is not None and d != s for d, s in zip(m.shape, shape)):
                raise InputError(f"{self.name}: input {name!r} has shape {list(shape)}, expected {list(m.shape)} "
                                 "(None = any size)")
            outside = m.range_error(shape)
            if outside:
                raise InputError(f"{self.name}: input {name!r} {outside}")

    # -- hooks
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def input_metadata_impl(self) -> list[TensorMeta]:
        raise NotImplementedError

    def output_names_impl(self) -> list[str]:
        raise NotImplementedError

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError


def random_feeds(meta: Sequence[TensorMeta], default_shape: Sequence[int] | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) inputs for the runner's inputs; dynamic axes take ``default_shape``'s values, else the
    optimum shape where a range is known, else [2, 3, 518, 518]'s."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for m in meta:
        fallback = default_shape or m.opt_shape or (2, 3, 518, 518)
        shape = [d if d is not None else int(fallback[i]) for i, d in enumerate(m.shape)]
        feeds[m.name] = rng.random(shape, dtype=np.float32).astype(m.dtype)
    return feeds


def torch_device(device: str) -> str:
    """The torch device for ``device`` ("auto": CUDA when torch sees a GPU); raise when CUDA is asked for but absent."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUnavailableError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    return device
