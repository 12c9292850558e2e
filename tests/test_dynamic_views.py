"""One graph and engine for any number of cameras: a dynamic view axis from export to runners (tiny preset, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import convert_tiny_dynamic, load_script

from vggt_trt.accuracy import tensor_errors
from vggt_trt.errors import GraphError, InputError
from vggt_trt.graph.export import ExportSpec
from vggt_trt.graph.views import read_view_range, view_axis
from vggt_trt.pipelines.convert import CAST_TOLERANCE, ConvertOptions, spec_from_onnx
from vggt_trt.runtime.ort_runner import OrtRunner
from vggt_trt.views import ViewRange

INFER = load_script("trt_inference.py", "trt_inference_dynviews")
from vggt_trt.cli.infer import format_sweep  # noqa: E402
RANGE = ViewRange(2, 3, 5)
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    return convert_tiny_dynamic(tmp_path_factory)


def _graphs(report: dict) -> dict[str, Path]:
    stages = report["stages"]
    return {"fp32": Path(stages["simplify"]["path"]), "fp16": Path(report["onnx"]["path"]),
            "raw": Path(stages["export"]["path"])}


def _torch_reference(views: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import torch

    from vggt_trt.model.vggt import PCD_OUTPUTS
    from vggt_trt.model.weights import build_model

    images = np.random.default_rng(views).random((views, 3, 28, 28), dtype=np.float32)
    with torch.no_grad():
        out = build_model("tiny").eval()(torch.from_numpy(images), outputs=PCD_OUTPUTS)
    return images, {k: v.numpy() for k, v in out.items()}


def test_stem_metadata_and_axis_after_every_pass(converted):
    assert converted["stem"] == "vggt-2to5x3x28x28-pcd"
    assert converted["spec"]["view_range"] == {"min": 2, "opt": 3, "max": 5}
    for name, path in _graphs(converted).items():
        assert view_axis(path, "images") == "num_views", name
        assert read_view_range(path) == RANGE, name
    assert converted["onnx"]["io"]["inputs"][0]["shape"] == ["num_views", 3, 28, 28]


@pytest.mark.parametrize("views", [2, 3, 5])
def test_one_graph_matches_pytorch_at_every_view_count(converted, views):
    images, ref = _torch_reference(views)
    for precision, tol in (("fp32", 1e-4), ("fp16", CAST_TOLERANCE["fp16"])):
        with OrtRunner(_graphs(converted)[precision], providers=["cpu"]) as runner:
            out = runner.infer({"images": images})
        for name, r in ref.items():
            assert out[name].shape == r.shape == (1, views, *r.shape[2:])
            err = tensor_errors(r, out[name])
            assert err["rel_l2"] <= tol, (precision, views, name, err)


@pytest.mark.parametrize("views", [1, 6])
def test_view_count_outside_the_range_is_refused_by_name(converted, views):
    with OrtRunner(_graphs(converted)["fp16"], providers=["cpu"]) as runner:
        assert runner.view_range() == RANGE
        meta = runner.input_metadata()[0]
        assert meta.min_shape == (2, 3, 28, 28) and meta.opt_shape == (3, 3, 28, 28) and meta.max_shape == (5, 3, 28, 28)
        with pytest.raises(InputError, match=rf"'images' has {views} views .*takes 2 to 5 views"):
            runner.infer({"images": np.zeros((views, 3, 28, 28), np.float32)})


def test_cast_graph_checked_at_both_ends_of_the_range(converted):
    checks = converted["stages"]["precision_graph"]["verification"]["errors_by_views"]
    assert sorted(int(v) for v in checks) == [2, 3, 5]
    assert all(e["rel_l2"] <= CAST_TOLERANCE["fp16"] for per_view in checks.values() for e in per_view.values())


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed: pip install tensorrt-rtx-cu13")
def test_rtx_engine_built_with_the_profile_on_cpu(converted):
    build = converted["stages"]["build"]
    assert build["backend"] == "tensorrt_rtx"
    assert build["profile"] == {"images": {"min": [2, 3, 28, 28], "opt": [3, 3, 28, 28], "max": [5, 3, 28, 28]}}
    assert Path(converted["engine"]["path"]).stat().st_size == converted["engine"]["bytes"] > 0


def test_list_io_shows_the_range(converted, capsys):
    assert INFER.main(["--onnx", str(_graphs(converted)["fp16"]), "--list-io", "--ort-providers", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "min [2, 3, 28, 28] opt [3, 3, 28, 28] max [5, 3, 28, 28]" in out and "views  2..5" in out
    assert INFER.main(["--onnx", str(_graphs(converted)["fp16"]), "--num-cams", "6", "--ort-providers", "cpu"]) == 2
    assert "takes 2 to 5 views" in capsys.readouterr().err


def test_sweep_table_shows_the_range():
    rows = [{"status": "ok", "rank": 1, "fps": 10.0, "latency_ms": 100.0, "views": "2..16", "benchmark_views": 8,
             "quant_mode": "none", "precision": "fp16", "engine": "a.engine"},
            {"status": "cannot run", "views": "8", "quant_mode": "none", "precision": "fp16", "engine": "b.engine",
             "reason": "no GPU"}]
    table = format_sweep(rows)
    assert "views" in table.splitlines()[0] and "2..16@8" in table and " 8 " in table


def test_spec_validation_and_onnx_in(converted, tmp_path):
    with pytest.raises(InputError, match="go together"):
        ExportSpec(num_cams=3, min_cams=2)
    with pytest.raises(InputError, match="2 <= 6 <= 5"):
        ExportSpec(num_cams=6, min_cams=2, max_cams=5)
    assert ExportSpec(num_cams=8, min_cams=2, max_cams=16, pcd_only=True).stem == "vggt-2to16x3x518x518-pcd"
    raw = _graphs(converted)["raw"]
    spec = spec_from_onnx(raw)
    assert spec.view_range == RANGE and spec.dynamic_views and spec.stem == "vggt-2to5x3x28x28-pcd"
    # flags override the recorded range; a graph without one needs them
    bare = onnx.load(str(raw))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(InputError, match="no recorded view range"):
        spec_from_onnx(tmp_path / "bare.onnx")
    opts = ConvertOptions(onnx_in=tmp_path / "bare.onnx", num_cams=4, min_cams=2, max_cams=4)
    assert spec_from_onnx(tmp_path / "bare.onnx", opts).view_range == ViewRange(2, 4, 4)


def test_fixed_graph_refuses_a_range_and_a_pass_that_fixes_the_axis_is_caught(converted, tmp_path):
    from vggt_trt.graph.views import check_view_axis

    fixed = onnx.load(str(_graphs(converted)["raw"]))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    with pytest.raises(GraphError, match="simplification fixed the view axis .*input images has 3 views"):
        check_view_axis(tmp_path / "fixed.onnx", "images", "simplification")
    opts = ConvertOptions(onnx_in=tmp_path / "fixed.onnx", num_cams=3, min_cams=2, max_cams=5)
    with pytest.raises(InputError, match="takes exactly 3 views"):
        spec_from_onnx(tmp_path / "fixed.onnx", opts)


def test_torch_backend_refuses_a_range(tmp_path, capsys):
    convert_cli = load_script("vggt_to_trt.py", "vggt_to_trt_dynviews")
    assert convert_cli.main(["--backend", "torch", "--model-name", "tiny", "--min-cams", "2", "--max-cams", "4",
                             "--output-dir", str(tmp_path), "--log-dir", str(tmp_path / "logs")]) == 2
    assert "--backend torch compiles for one input shape" in capsys.readouterr().err


def test_pcd_images_pipeline_uses_any_camera_subset_in_the_range(converted, tmp_path, capsys):
    import json

    from PIL import Image

    pcd_cli = load_script("pcd_inference.py", "pcd_inference_dynviews")
    scene = tmp_path / "scene"
    rng = np.random.default_rng(0)
    for cam in ("cam1", "cam2", "cam3", "cam4"):
        (scene / cam).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(scene / cam / "000000.png")
    (scene / "cam2" / "000000.png").write_bytes(b"not a png")  # a camera drops out
    graph = str(_graphs(converted)["fp32"])
    out = tmp_path / "out"
    assert pcd_cli.main(["--images", str(scene), "--onnx", graph, "--out_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"]["views"] == ["cam1", "cam3", "cam4"] and summary["input_shape"] == [3, 3, 28, 28]
    assert "using 3 views instead of 4" in capsys.readouterr().err
    assert pcd_cli.main(["--images", str(scene), "--onnx", graph, "--num_cams", "6", "--out_dir", str(out / "x")]) == 2
    assert "takes 2 to 5 views" in capsys.readouterr().err
