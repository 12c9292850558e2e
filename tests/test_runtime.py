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


GPUS = {"H200": {"name": "NVIDIA H200", "compute_capability": "9.0", "driver_cuda_version": "13.0"},
        "4090": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "driver_cuda_version": "13.0"},
        "3090": {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6", "driver_cuda_version": "13.0"}}


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Stand-in for the CUDA driver (GPU-only behaviour: device count, name and compute capability per index)."""
    from vggt_trt.trt import backend as trt_backend

    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: (len(names), ""))
    monkeypatch.setattr(trt_backend, "cuda_gpu", lambda index=0: {"index": index, **GPUS[names[index]]}
                        if index < len(names) else None)


def test_engine_checks_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed: pip install tensorrt-rtx-cu13")
    from vggt_trt.trt import backend as trt_backend

    trt, rtx = trt_backend.import_tensorrt("tensorrt-rtx")  # the real module: its targets come from its enum
    trt10 = trt_backend.BackendInfo("tensorrt", "10.13.3.9", 10, False, True)
    engine = tmp_path / "vggt-2x3x56x56-pcd_fp16.engine"
    engine.write_bytes(b"not really an engine")
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: (0, "no CUDA driver"))
    with pytest.raises(RuntimeUnavailableError, match="only on an NVIDIA GPU.*no CUDA driver"):
        check_engine_can_run(engine, rtx, trt)
    _fake_gpus(monkeypatch, "H200", "4090")
    with pytest.raises(RuntimeUnavailableError,
                       match=r"GPU 0 \(NVIDIA H200\): TensorRT-RTX .* compute capability 9\.0 \(Hopper.*7\.5, 8\.0"):
        check_engine_can_run(engine, rtx, trt)
    assert check_engine_can_run(engine, rtx, trt, device_index=1)["name"] == "NVIDIA GeForce RTX 4090"
    assert check_engine_can_run(engine, trt10)["compute_capability"] == "9.0"  # full TensorRT runs on Hopper
    with pytest.raises(RuntimeUnavailableError, match=r"device 2: this machine has 2 GPU\(s\), indices 0\.\.1"):
        check_engine_can_run(engine, rtx, trt, device_index=2)
    # the build report's targets exclude this GPU: say which and how to rebuild, before deserialising
    report = engine.with_suffix(".json")
    report.write_text(json.dumps({"stages": {"build": {"backend": "tensorrt_rtx", "backend_version": trt.__version__,
                                                       "compute_capabilities": ["SM89", "SM120"]}}}))
    _fake_gpus(monkeypatch, "3090")
    with pytest.raises(RuntimeUnavailableError, match=r"built for SM89, SM120 .*RTX 3090\) is compute capability "
                                                      r"8\.6: rebuild it with --compute-capability 8\.6"):
        check_engine_can_run(engine, rtx, trt)
    report.write_text(json.dumps({"backend": "tensorrt_rtx", "backend_version": trt.__version__,
                                  "compute_capabilities": ["CURRENT"], "target_gpu": GPUS["4090"]}))
    with pytest.raises(RuntimeUnavailableError, match=r"build machine's GPU \(compute capability 8\.9\)"):
        check_engine_can_run(engine, rtx, trt)
    report.write_text(json.dumps({"stages": {"build": {"backend": "tensorrt", "backend_version": "10.13"}}}))
    with pytest.raises(RuntimeUnavailableError, match="built by tensorrt 10.13"):
        check_engine_can_run(engine, rtx, trt)


def test_auto_backend_reads_the_build_report_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed: pip install tensorrt-rtx-cu13")
    from vggt_trt.trt import backend as trt_backend

    engine = tmp_path / "e_fp16.engine"
    engine.with_suffix(".json").write_text(json.dumps({"backend": "tensorrt_rtx", "backend_version": "1.7"}))
    real, imported = trt_backend._import, []
    monkeypatch.setattr(trt_backend, "_import", lambda name: imported.append(name) or real(name))
    _, info = TrtRunner(engine)._import()
    assert imported == ["tensorrt_rtx"] and info.is_rtx


def test_load_failure_names_validity_reasons_not_a_version_guess(tiny_onnx: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real engine with a damaged header: TensorRT-RTX's validity check and deserialiser, on CPU."""
    from vggt_trt.trt import backend as trt_backend
    from vggt_trt.runtime.trt_runner import build_report, load_failure_message

    engine = build_rtx_engine(tiny_onnx, tmp_path_factory.getbasetemp() / "engines" / "none" / "tiny_fp32.engine")
    trt, info = trt_backend.import_tensorrt("tensorrt-rtx")
    broken = tmp_path_factory.mktemp("broken") / engine.name
    broken.write_bytes(b"XXXX" + engine.read_bytes()[4:])
    trt_logger = trt_backend.make_logger(trt, "INTERNAL_ERROR")
    validity = trt_backend.engine_validity(trt, broken, trt_logger)
    _runtime, loaded = trt_backend.deserialize_engine(trt, broken.read_bytes(), trt_logger)
    assert loaded is None and any("serializ" in e.lower() or "cuda" in e.lower() for e in trt_logger.errors)
    msg = load_failure_message(broken, info, validity, trt_logger.errors, build_report(broken), GPUS["4090"])
    assert "MALFORMED_ENGINE: the file is not a complete TensorRT-RTX engine" in msg
    assert "another TensorRT" not in msg and "VERSION_MISMATCH" not in msg  # TensorRT's own log may say "version"
    assert "no build report beside the engine" in msg


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


def test_cuda_index_from_device_strings() -> None:
    from vggt_trt.runtime.trt_runner import cuda_index

    assert [cuda_index(d) for d in ("auto", "cuda", "cuda:1", "cuda:3")] == [0, 0, 1, 3]
    for bad in ("cpu", "cuda:x", "mps"):
        with pytest.raises(InputError, match="TensorRT engines run on a CUDA device"):
            cuda_index(bad)
