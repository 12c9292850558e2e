"""trt_inference.py end to end on the tiny preset: I/O listing, inputs, compare, benchmark JSON, engine sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import build_rtx_engine, export_tiny, load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


CLI = load_script("trt_inference.py", "trt_inference_cli")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory)


def test_list_io(tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    assert CLI.main(["--onnx", str(tiny_onnx), "--list-io"]) == 0
    out = capsys.readouterr().out
    assert "images" in out and "[2, 3, 56, 56]" in out and "depth_conf" in out


def test_compare_and_benchmark_json(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "result.json"
    rc = CLI.main(["--onnx", str(tiny_onnx), "--compare", "torch", "--model-name", "tiny", "--benchmark",
                   "--warmup", "1", "--iters", "3", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rel L2" in text and "rotation error" in text and "AbsRel" in text
    doc = json.loads(out_json.read_text())
    cmp = doc["compare"]
    assert set(cmp["outputs"]) == {"pose_enc", "depth", "depth_conf"}
    for entry in cmp["outputs"].values():  # ORT vs PyTorch, both fp32 on CPU
        assert entry["rel_l2"] < 1e-4 and entry["max_abs"] < 1e-3 and entry["nonfinite"] == 0
    assert cmp["pose"]["rotation_error_deg"]["max"] < 0.01
    assert len(cmp["pose"]["translation_error"]["per_camera"]) == 2
    assert cmp["depth"]["abs_rel"] < 1e-4 and cmp["depth"]["delta_1.25"] == 1.0
    bench = doc["benchmark"]
    assert bench["iters"] == 3 and bench["timing_method"] == "perf_counter"
    assert bench["latency_ms"]["median"] > 0 and bench["fps"] > 0 and "p99" in bench["latency_ms"]
    assert doc["io"]["inputs"][0]["shape"] == [2, 3, 56, 56]


def test_torch_backend_on_npy_and_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    npy = tmp_path / "images.npy"
    np.save(npy, np.random.default_rng(1).random((1, 3, 3, 28, 42), dtype=np.float32))
    out = tmp_path / "out.npz"
    assert CLI.main(["--torch", "--model-name", "tiny", "--npy", str(npy), "--save-outputs", str(out)]) == 0
    with np.load(out) as data:
        assert data["depth"].shape == (1, 3, 28, 42, 1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            folder / f"v{i}.png")
    assert CLI.main(["--torch", "--model-name", "tiny", "--images", str(folder)]) == 0
    assert "inference on 3 views" in capsys.readouterr().out


def test_onnx_on_images_uses_fixed_shape(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for i in range(3):
        Image.fromarray(np.full((30, 50, 3), 40 * i, np.uint8)).save(tmp_path / f"v{i}.jpg")
    assert CLI.main(["--onnx", str(tiny_onnx), "--images", str(tmp_path)]) == 0
    assert "inference on 2 views" in capsys.readouterr().out


def test_per_camera_scene_takes_one_frame_per_camera(tiny_onnx: Path, tmp_path: Path) -> None:
    """A folder of camera sub-folders gives frame 0 of each camera, as pcd_inference.py picks them."""
    from vggt_trt.cli import infer
    from vggt_trt.pipelines.pcd import pick_views
    from vggt_trt.recon.rig import discover_scene

    for c, cam in enumerate(("camA", "camB", "camC")):
        (tmp_path / "scene" / cam).mkdir(parents=True)
        for f in range(3):
            Image.fromarray(np.full((30, 50, 3), 20 * c + f, np.uint8)).save(tmp_path / "scene" / cam / f"{f:04d}.png")
    out_json = tmp_path / "result.json"
    assert CLI.main(["--onnx", str(tiny_onnx), "--images", str(tmp_path / "scene"), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["inference"]["views"] == ["camA", "camB"]
    with infer.runner_from_args(infer.build_parser().parse_args(["--onnx", str(tiny_onnx)])) as runner:
        feeds, names = infer.load_feeds(runner, str(tmp_path / "scene"))
        assert names == pick_views(discover_scene(tmp_path / "scene"), 2, runner.view_range())[0]
    images = next(iter(feeds.values()))
    assert np.allclose(images[0], 0.0) and np.allclose(images[1], 20 / 255)  # frame 0 of camA and of camB


def test_user_errors_exit_2(tiny_onnx: Path, tmp_path: Path) -> None:
    assert CLI.main([]) == 2  # no model named
    assert CLI.main(["--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert CLI.main(["--onnx", str(tiny_onnx), "--compare", "nonsense"]) == 2
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 56, 56), np.float32))
    assert CLI.main(["--onnx", str(tiny_onnx), "--npy", str(bad)]) == 2


def test_engines_dir_sweep_reports_unrunnable(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory,
                                              capsys: pytest.CaptureFixture) -> None:
    root = tmp_path_factory.getbasetemp() / "engines"
    build_rtx_engine(tiny_onnx, root / "none" / "tiny_fp32.engine")
    out_json = tmp_path_factory.mktemp("sweep") / "sweep.json"
    assert CLI.main(["--engines-dir", str(root), "--iters", "2", "--warmup", "1", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "quant mode" in text and "tiny_fp32.engine" in text
    rows = json.loads(out_json.read_text())["sweep"]
    assert len(rows) >= 1
    row = next(r for r in rows if r["engine"].endswith("tiny_fp32.engine"))
    assert row["quant_mode"] == "none" and row["precision"] == "fp32"
    from vggt_trt.trt.backend import cuda_device_count

    gpus, why = cuda_device_count()
    if gpus:  # a machine with an NVIDIA GPU runs the engine
        assert row["status"] == "ok" and row["rank"] >= 1 and row["fps"] > 0
    else:  # CI and the development machines: no GPU, so the row says it cannot run, and why
        assert row["status"] == "cannot run" and row["reason"] and "cannot run here" in text, (why, row)


@pytest.mark.parametrize("flag,target,words", [
    ("--json", "file/x.json", "--json folder {root}/file is not a directory"),
    ("--save-outputs", "folder", "--save-outputs {root}/folder is a directory; give a file name"),
    ("--json", "file/deeper/x.json", "(its parent {root}/file is a file)"),
])
def test_unwritable_result_paths_fail_before_the_model_runs(tiny_onnx: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, flag: str, target: str,
                                                            words: str) -> None:
    (tmp_path / "file").write_text("in the way")
    (tmp_path / "folder").mkdir()
    assert CLI.main(["--onnx", str(tiny_onnx), flag, str(tmp_path / target)]) == 2
    captured = capsys.readouterr()
    assert words.format(root=tmp_path) in captured.err, captured.err
    assert "inference on" not in captured.out
