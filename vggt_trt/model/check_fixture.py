"""Check our VGGT against a reference fixture (safetensors + JSON in the vggt-tiny-a format).

Command line: ``python -m vggt_trt.cli.check_fixture PATH.safetensors [--tolerance 1e-4] [--json OUT]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


def load_fixture(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise InputError(f"fixture file not found: {path}")
    if not meta_path.is_file():
        raise InputError(f"fixture metadata not found: expected {meta_path} beside {path.name}")
    meta = json.loads(meta_path.read_text())
    if "config" not in meta:
        raise InputError(f"{meta_path} has no 'config' block; is it a VGGT fixture?")
    return meta, load_file(str(path))


def check_fixture(path: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Run the fixture's input through our model built from its config; per-output error stats."""
    import torch

    from ..accuracy import tensor_errors
    from ..recon.geometry import pose_encoding_to_extri_intri, unproject_depth_map_to_point_map
    from .config import config_from_fixture
    from .vggt import FULL_OUTPUTS, VGGT
    from .weights import load_state_dict_into

    meta, tensors = load_fixture(path)
    cfg = config_from_fixture(meta["config"])
    state = {k[len("state_dict."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("state_dict.")}
    model = VGGT(cfg).eval()
    load_state_dict_into(model, state, source=str(path))
    images = torch.from_numpy(tensors["inputs.images"])
    names = [n for n in FULL_OUTPUTS if f"outputs.{n}" in tensors]
    want_list = any(k.startswith("outputs.pose_enc_list.") for k in tensors)
    with torch.no_grad():
        ours = model(images, outputs=names + (["pose_enc_list"] if want_list else []))
    results: dict[str, Any] = {}
    for name in names:
        results[f"outputs.{name}"] = tensor_errors(tensors[f"outputs.{name}"], ours[name].numpy())
    if want_list:
        for i in range(ours["pose_enc_list"].shape[0]):
            key = f"outputs.pose_enc_list.{i}"
            if key in tensors:
                results[key] = tensor_errors(tensors[key], ours["pose_enc_list"][i].numpy())
    H, W = images.shape[-2:]
    if "pose_enc" in ours:
        extrinsic, intrinsic = pose_encoding_to_extri_intri(ours["pose_enc"].numpy(), (H, W))
        for key, value in (("post.extrinsic", extrinsic), ("post.intrinsic", intrinsic)):
            if key in tensors:
                results[key] = tensor_errors(tensors[key], value)
        if "depth" in ours and "post.world_points_from_depth" in tensors:
            points = unproject_depth_map_to_point_map(ours["depth"][0].numpy(), extrinsic[0], intrinsic[0])
            results["post.world_points_from_depth"] = tensor_errors(tensors["post.world_points_from_depth"], points)
    failed = [k for k, v in results.items() if not v["rel_l2"] <= tolerance]
    return {"fixture": str(path), "config": cfg.name, "tolerance": tolerance, "results": results,
            "failed": failed, "passed": not failed}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"fixture {report['fixture']} (tolerance: relative L2 <= {report['tolerance']:g})",
             f"{'output':36s} {'shape':>18s} {'rel_l2':>11s} {'max_abs':>11s}  status"]
    for name, r in report["results"].items():
        status = "FAIL" if name in report["failed"] else "ok"
        lines.append(f"{name:36s} {str(r['shape']):>18s} {r['rel_l2']:11.3e} {r['max_abs']:11.3e}  {status}")
    lines.append("PASSED" if report["passed"] else f"FAILED: {', '.join(report['failed'])}")
    return "\n".join(lines)
