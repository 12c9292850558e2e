"""The dynamic view axis of a graph: its (min, opt, max) range, kept in the ONNX metadata, and the check that a
pass left the axis symbolic.

ONNX records a symbolic axis only by name (``num_views``), not its range; the range the graph was exported
for travels in ``metadata_props`` (key :data:`VIEW_RANGE_KEY`, value ``"min,opt,max"``), so a later stage
(``--onnx-in``, engine build, ONNX Runtime) knows which view counts the graph was checked for.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx

from ..atomic import atomic_path
from ..errors import GraphError
from ..views import ViewRange
from .io import as_model, load_onnx

logger = logging.getLogger(__name__)

VIEW_RANGE_KEY = "vggt_trt.view_range"


def read_view_range(model: str | os.PathLike | onnx.ModelProto) -> ViewRange | None:
    """The view range stored in a graph's metadata; None when it has none."""
    props = {p.key: p.value for p in as_model(model).metadata_props}
    return parse_view_range(props.get(VIEW_RANGE_KEY))


def parse_view_range(value: str | None) -> ViewRange | None:
    """``"min,opt,max"`` (the metadata value) as a ViewRange; None for None."""
    if value is None:
        return None
    try:
        lo, opt, hi = (int(v) for v in value.split(","))
    except ValueError as exc:
        raise GraphError(f"metadata {VIEW_RANGE_KEY}={value!r} is not 'min,opt,max'") from exc
    return ViewRange(lo, opt, hi)


def set_view_range(model: onnx.ModelProto, views: ViewRange) -> onnx.ModelProto:
    """Record ``views`` in ``model``'s metadata (in place; returns the model)."""
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, VIEW_RANGE_KEY: f"{views.min},{views.opt},{views.max}"})
    return model


def write_view_range(path: str | os.PathLike, views: ViewRange) -> None:
    """Record ``views`` in the graph file at ``path``; only the header is rewritten (external data stays)."""
    header = load_onnx(path, load_external_data=False)
    if read_view_range(header) == views:
        return
    set_view_range(header, views)
    with atomic_path(path) as tmp:
        onnx.save_model(header, str(tmp))


def view_axis(model: str | os.PathLike | onnx.ModelProto, input_name: str) -> int | str:
    """Axis 0 of input ``input_name``: its size, or its symbol name when dynamic."""
    graph = as_model(model).graph
    for value in graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            if not dims:
                raise GraphError(f"input {input_name!r} has no shape")
            return dims[0].dim_param or dims[0].dim_value or "?"
    raise GraphError(f"the graph has no input {input_name!r}; inputs: {[v.name for v in graph.input]}")


def check_view_axis(path: str | os.PathLike | onnx.ModelProto, input_name: str, stage: str) -> None:
    """Raise GraphError when ``stage`` left the view axis of ``input_name`` fixed (or any output's fixed)."""
    model = as_model(path)
    axis = view_axis(model, input_name)
    fixed = [] if isinstance(axis, str) else [f"input {input_name} has {axis} views"]
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) > 1 and not dims[1].dim_param and dims[1].dim_value:
            fixed.append(f"output {out.name} has {dims[1].dim_value} views")
    if fixed:
        where = path if not isinstance(path, onnx.ModelProto) else "the graph"
        raise GraphError(f"{stage} fixed the view axis of {where} ({'; '.join(fixed)}); the graph should take any "
                         f"view count of its range. If the exporter specialised it, a model op depends on the "
                         "view count (TORCH_LOGS=+dynamic shows which)")
    logger.debug("%s: view axis still dynamic (%s)", stage, axis)


def describe(model: str | os.PathLike | onnx.ModelProto, input_name: str) -> dict[str, Any]:
    """View axis facts of a graph for reports: symbol or size, and the stored range."""
    header = as_model(model)
    views = read_view_range(header)
    return {"axis": view_axis(header, input_name), "range": views.to_dict() if views else None}
