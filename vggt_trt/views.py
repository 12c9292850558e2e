"""The range of views per forward an artifact (graph, engine, runner) accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import InputError

VIEW_AXIS_NAME = "num_views"


@dataclass(frozen=True)
class ViewRange:
    """Views per forward an artifact accepts: ``min <= opt <= max`` (``opt``: the shape it is tuned for)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 1:
            raise InputError(f"--min-cams must be at least 1, found {self.min}")
        if not self.min <= self.opt <= self.max:
            raise InputError(f"views must satisfy --min-cams <= --num-cams <= --max-cams; found "
                             f"{self.min} <= {self.opt} <= {self.max}")

    def __contains__(self, views: object) -> bool:
        return isinstance(views, int) and self.min <= views <= self.max

    def text(self) -> str:
        return f"{self.min}..{self.max} (opt {self.opt})"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def of_shape(cls, shape: Sequence[int | None], min_shape: Sequence[int] | None = None,
                 opt_shape: Sequence[int] | None = None, max_shape: Sequence[int] | None = None) -> "ViewRange | None":
        """The range of axis 0 of an image input [S,3,H,W]: fixed, from profile shapes, or None (unbounded)."""
        if shape and shape[0] is not None:
            return cls(int(shape[0]), int(shape[0]), int(shape[0]))
        if min_shape is not None and max_shape is not None:
            opt = opt_shape[0] if opt_shape is not None else min_shape[0]
            return cls(int(min_shape[0]), int(opt), int(max_shape[0]))
        return None
