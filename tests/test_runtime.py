"""Runners (torch, ONNX Runtime, TensorRT), make_runner and benchmark, on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vggt_trt.errors import InputError
from vggt_trt.runtime.base import RuntimeUnavailableError, random_feeds
from vggt_trt.runtime.benchmark import benchmark
from vggt_trt.runtime.factory import make_runner
from vggt_trt.runtime.ort_runner import OrtRunner
from vggt_trt.runtime.torch_runner import TorchRunner
from vggt_trt.runtime.trt_runner import TrtRunner, check_engine_can_run

from helpers import build_rtx_engine, export_tiny

SHAPE = (2, 3, 56, 56)
# ORT CPU vs PyTorch CPU, both fp32: measured rel L2 ~5e-7; the bound leaves room for other CPUs' kernels
REL_L2_TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def feeds() -> dict[str, np.ndarray]:
    return {"images": np.random.default_rng(0).random(SHAPE, dtype=np.float32)}


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_ort_and_torch_runners_agree(tiny_onnx: Path, feeds: dict[str, np.ndarray]) -> None:
    with OrtRunner(tiny_onnx) as ort_runner, TorchRunner("tiny") as torch_runner:
        meta = ort_runner.input_metadata()
        assert [m.to_dict() for m in meta] == [{"name": "images", "shape": list(SHAPE), "dtype": "float32"}]
        assert torch_runner.input_metadata()[0].shape == (None, 3, None, None)
        a, b = ort_runner.infer(feeds), torch_runner.infer(feeds)
        assert ort_runner.last_inference_ms > 0 and torch_runner.last_inference_ms > 0
    assert set(a) == set(b) == {"pose_enc", "depth", "depth_conf"}
    for name in a:
        assert a[name].shape == b[name].shape
        assert _rel_l2(a[name], b[name]) < REL_L2_TOL, name


def test_runner_contract_errors(tiny_onnx: Path, feeds: dict[str, np.ndarray]) -> None:
    runner = OrtRunner(tiny_onnx)
    with pytest.raises(InputError, match="not active"):
        runner.infer(feeds)
    with runner:
        with pytest.raises(InputError, match="shape"):
            runner.infer({"images": np.zeros((3, 3, 56, 56), np.float32)})
        with pytest.raises(InputError, match="missing"):
            runner.infer({"pixels": feeds["images"]})
    assert not runner.is_active


def test_make_runner_picks_backend(tiny_onnx: Path, tmp_path: Path) -> None:
    assert isinstance(make_runner(tiny_onnx), OrtRunner)
    assert isinstance(make_runner(tmp_path / "x.engine"), TrtRunner)
    assert isinstance(make_runner("tiny"), TorchRunner)
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(InputError, match="cannot tell the backend"):
        make_runner(tmp_path / "weights.bin")
    with pytest.raises(InputError, match="unknown backend"):
        make_runner(tiny_onnx, backend="tflite")
    with pytest.raises(InputError, match="not found"):
        OrtRunner(tmp_path / "missing.onnx").activate()


def test_benchmark_fields(tiny_onnx: Path, feeds: dict[str, np.ndarray]) -> None:
    with OrtRunner(tiny_onnx) as runner:
        res = benchmark(runner, feeds, warmup=1, iters=4).to_dict()
    json.dumps(res)  # JSON-able
    assert res["timing_method"] == "perf_counter" and res["iters"] == 4 and len(res["samples_ms"]) == 4
    for key in ("median", "p90", "p99", "mean", "min", "max"):
        assert res["latency_ms"][key] > 0
    assert res["latency_ms"]["min"] <= res["latency_ms"]["median"] <= res["latency_ms"]["p99"]
    assert res["fps"] == pytest.approx(1e3 / res["latency_ms"]["median"])
    assert res["views_per_s"] == pytest.approx(2 * res["fps"])
    assert res["peak_device_memory_mb"] is None and "CPU" in res["memory_method"]
    assert res["host_peak_rss_mb"] > 0


def test_random_feeds_fill_dynamic_axes() -> None:
    from vggt_trt.runtime.base import TensorMeta

    f = random_feeds([TensorMeta("images", (None, 3, None, None), "float32")], (3, 3, 28, 42))
    assert f["images"].shape == (3, 3, 28, 42) and f["images"].dtype == np.float32


class _Info:
    def __init__(self, name: str = "tensorrt_rtx", version: str = "1.7.1") -> None:
        self.name, self.version, self.is_rtx = name, version, name == "tensorrt_rtx"


def test_engine_error_paths_without_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggt_trt.runtime import trt_runner as runtime_trt
    from vggt_trt.trt import backend as trt_backend

    engine = tmp_path / "vggt-2x3x56x56-pcd_fp32.engine"
    engine.write_bytes(b"not really an engine")
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: (0, "no CUDA driver"))
    with pytest.raises(RuntimeUnavailableError, match="only on an NVIDIA GPU.*no CUDA driver"):
        check_engine_can_run(engine, _Info())
    # an H100/H200 with TensorRT-RTX: say exactly that Hopper is unsupported
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: (1, ""))
    monkeypatch.setattr(runtime_trt, "cuda_compute_capability", lambda index=0: (9, 0))
    with pytest.raises(RuntimeUnavailableError, match=r"does not support this GPU: compute capability 9\.0 \(Hopper"):
        check_engine_can_run(engine, _Info())
    check_engine_can_run(engine, _Info("tensorrt", "10.13"))  # full TensorRT runs on Hopper
    # an engine whose build report names another TensorRT
    engine.with_suffix(".json").write_text(json.dumps({"stages": {"build": {"backend": "tensorrt",
                                                                            "backend_version": "10.13"}}}))
    with pytest.raises(RuntimeUnavailableError, match="built by tensorrt 10.13"):
        check_engine_can_run(engine, _Info())


def test_trt_runner_on_rtx_engine(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory,
                                  feeds: dict[str, np.ndarray]) -> None:
    """Runs the engine for real where a usable GPU exists; elsewhere checks the error and skips with it."""
    engine = build_rtx_engine(tiny_onnx, tmp_path_factory.getbasetemp() / "engines" / "none" / "tiny_fp32.engine")
    runner = TrtRunner(engine, trt_backend="tensorrt-rtx")
    try:
        runner.activate()
    except RuntimeUnavailableError as exc:
        assert str(exc)
        pytest.skip(f"engine cannot run here: {exc}")
    with runner:
        assert runner.input_metadata()[0].shape == SHAPE
        out = runner.infer(feeds)
        res = benchmark(runner, feeds, warmup=1, iters=3)
    with OrtRunner(tiny_onnx) as ort_runner:
        ref = ort_runner.infer(feeds)
    assert res.timing_method == "cuda-events" and res.peak_device_memory_mb is not None
    for name in ref:  # fp32 engine vs ORT fp32 (TF32 may be used by TensorRT): generous bound
        assert _rel_l2(out[name], ref[name]) < 1e-2, name
