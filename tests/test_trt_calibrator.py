"""The TensorRT 10 IInt8EntropyCalibrator2 path: cache keys, cache files, clear errors, CLI wiring.

``FakeTRT10`` stands in for TensorRT 10, the only TensorRT with the calibrator class, which cannot be
installed without NVIDIA's GPU wheels; it provides nothing but the base class and a version. The real
``tensorrt_rtx`` is used where a module without calibrators is needed. The get_batch path runs for real
only where PyTorch has CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import TINY, needs_rtx  # noqa: E402
import vggt_to_trt
from vggt_trt import atomic
from vggt_trt.quant.calib import calibration_set
from vggt_trt.errors import BuildError, InputError, MissingDependencyError
from vggt_trt.quant.trt10_calibrator import (calibration_cache_key, calibration_cache_path, check_batch,
                                     make_entropy_calibrator)

SHAPE = (2, 3, 28, 42)
HAVE_CUDA = torch.cuda.is_available()  # read before any test fakes it


class FakeTRT10:
    """Just enough of ``tensorrt`` 10.x: the calibrator base class and a version."""

    __name__ = "tensorrt"
    __version__ = "10.13.0"

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True


def _set(seed: int = 0, batches: int = 3):
    data = np.random.default_rng(seed).random((5, *SHAPE[1:]), dtype=np.float32)
    return calibration_set(data, SHAPE[0], SHAPE[2], SHAPE[3], num_batches=batches, seed=1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Let the calibrator be constructed on a machine without a GPU (its cache methods never touch CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cache_key_changes_with_data_shape_version_and_graph():
    base = calibration_cache_key(_set(0), SHAPE, "10.13.0", "images", "g1")
    assert base == calibration_cache_key(_set(0), SHAPE, "10.13.0", "images", "g1")  # deterministic
    others = [calibration_cache_key(_set(1), SHAPE, "10.13.0", "images", "g1"),  # other pixels
              calibration_cache_key(_set(0, batches=4), SHAPE, "10.13.0", "images", "g1"),  # other sampling
              calibration_cache_key(_set(0), (2, 3, 28, 56), "10.13.0", "images", "g1"),
              calibration_cache_key(_set(0), SHAPE, "10.14.0", "images", "g1"),
              calibration_cache_key(_set(0), SHAPE, "10.13.0", "images", "g2")]
    assert len({base, *others}) == 6
    path = calibration_cache_path("/out", base)
    assert path == Path("/out") / f"calibration-{base[:16]}.cache"


def test_cache_roundtrip_and_stale_cache_not_reused(tmp_path, fake_cuda, caplog):
    caplog.set_level(logging.INFO, "vggt_trt.quant.trt10_calibrator")
    cal = make_entropy_calibrator(FakeTRT10, _set(0), tmp_path, graph_fingerprint="g1")
    assert cal.base_initialised and isinstance(cal, FakeTRT10.IInt8EntropyCalibrator2)
    assert cal.get_batch_size() == 1
    assert cal.cache_file.parent == tmp_path and cal.cache_file.name.startswith("calibration-")
    assert cal.read_calibration_cache() is None and not cal.cache_hit
    blob = bytes(range(256)) * 3
    cal.write_calibration_cache(memoryview(blob))  # TensorRT hands over a buffer, not bytes
    assert cal.cache_written and cal.cache_file.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == [cal.cache_file.name], "temporary file left behind"

    again = make_entropy_calibrator(FakeTRT10, _set(0), tmp_path, graph_fingerprint="g1")
    assert again.cache_file == cal.cache_file
    assert again.read_calibration_cache() == blob and again.cache_hit
    assert again.report()["cache_hit"] is True and again.report()["batches_fed"] == 0
    assert "cache hit" in caplog.text

    changed = make_entropy_calibrator(FakeTRT10, _set(1), tmp_path, graph_fingerprint="g1")
    assert changed.cache_file != cal.cache_file
    assert changed.read_calibration_cache() is None and not changed.cache_hit

    cal.cache_file.write_bytes(b"")  # an empty cache means "calibrate from data"
    assert make_entropy_calibrator(FakeTRT10, _set(0), tmp_path, graph_fingerprint="g1").read_calibration_cache() is None


def test_cache_write_is_atomic_and_never_raises_into_tensorrt(tmp_path, fake_cuda, monkeypatch):
    cal = make_entropy_calibrator(FakeTRT10, _set(0), tmp_path)
    cal.write_calibration_cache(b"old scales")

    def fail(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    cal.write_calibration_cache(b"new scales")  # C callback: logs and records, does not raise
    assert "disk full" in cal.cache_write_error
    assert cal.cache_file.read_bytes() == b"old scales"
    assert sorted(p.name for p in tmp_path.iterdir()) == [cal.cache_file.name]


def test_module_without_calibrator_names_the_qdq_path(tmp_path):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed: pip install tensorrt-rtx-cu13")
    with pytest.raises(InputError, match=r"tensorrt_rtx .*no IInt8EntropyCalibrator2.*--precision int8 without "
                                         r"--int8-calibrator"):
        make_entropy_calibrator(trt, _set(0), tmp_path)


def test_no_cuda_is_a_clear_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"PyTorch with a usable CUDA GPU.*is_available\(\) is False"):
        make_entropy_calibrator(FakeTRT10, _set(0), tmp_path)
    with pytest.raises(InputError, match="must be a CUDA device"):
        make_entropy_calibrator(FakeTRT10, _set(0), tmp_path, device="cpu")


def test_shape_and_dtype_mismatches_say_expected_and_found(tmp_path, fake_cuda):
    with pytest.raises(InputError, match=r"expected shape \[2, 3, 28, 56\].*found \[2, 3, 28, 42\]"):
        make_entropy_calibrator(FakeTRT10, _set(0), tmp_path, input_shape=(2, 3, 28, 56))
    good = np.zeros(SHAPE, dtype=np.float32)
    assert check_batch(good, SHAPE, "images") is not None
    with pytest.raises(InputError, match=r"expected shape \[2, 3, 28, 42\], found \[1, 3, 28, 42\]"):
        check_batch(good[:1], SHAPE, "images")
    with pytest.raises(InputError, match="expected dtype float32, found float64"):
        check_batch(good.astype(np.float64), SHAPE, "images")


def test_get_batch_failure_is_recorded_not_raised(tmp_path, fake_cuda, caplog):
    cal = make_entropy_calibrator(FakeTRT10, _set(0), tmp_path)
    assert cal.get_batch(["other_input"]) is None  # would be an exception crossing into TensorRT's C++
    assert isinstance(cal.failure, InputError) and "other_input" in caplog.text
    with pytest.raises(BuildError, match=r"INT8 calibration failed after 0 of 3 batches.*other_input"):
        cal.raise_if_failed()


@pytest.mark.skipif(not HAVE_CUDA, reason="PyTorch has no CUDA here: the device copy of get_batch "
                    "needs a GPU (run on the GPU machine)")
def test_get_batch_feeds_every_batch_on_the_gpu(tmp_path):
    calib = _set(0, batches=3)
    cal = make_entropy_calibrator(FakeTRT10, calib, tmp_path)
    expected = calib.load()
    for i in range(3):
        ptrs = cal.get_batch(["images"])
        assert ptrs == [cal._buffer.data_ptr()] and ptrs[0] != 0
        np.testing.assert_array_equal(cal._buffer.cpu().numpy(), expected[i])
    assert cal.get_batch(["images"]) is None
    assert cal.batches_fed == 3 and cal.failure is None
    cal.raise_if_failed()


@needs_rtx
def test_cli_int8_calibrator_on_rtx_is_input_error_naming_qdq(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    code = vggt_to_trt.main(["--export", *TINY, "--precision", "int8", "--int8-calibrator", "--backend",
                             "tensorrt-rtx", "--output-dir", str(out), "--log-dir", str(logs)])
    assert code == 2
    text = "".join(p.read_text() for p in logs.glob("vggt_to_trt-*.log"))
    assert "--int8-calibrator needs TensorRT 10" in text and "without --int8-calibrator" in text
    assert not list(out.glob("*.onnx")), "the backend check must stop the run before the export"


@pytest.mark.parametrize("extra,message", [(["--precision", "fp16"], "applies to int8 only"),
                                           (["--precision", "int8", "--skip-build"], "--skip-build"),
                                           (["--precision", "int8", "--quant-mode", "torch-int8-dynamic"],
                                            "--quant-mode torch-int8-dynamic")])
def test_cli_int8_calibrator_bad_combinations(tmp_path, extra, message):
    logs = tmp_path / "logs"
    code = vggt_to_trt.main(["--export", *TINY, *extra, "--int8-calibrator", "--output-dir", str(tmp_path / "out"),
                             "--log-dir", str(logs)])
    assert code == 2
    assert message in "".join(p.read_text() for p in logs.glob("vggt_to_trt-*.log"))



def _vggt_like_graph(path: Path) -> Path:
    """A minimal graph with the VGGT interface (one static input, the pcd-only outputs)."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(SHAPE))
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in ("pose_enc", "depth", "depth_conf")]
    nodes = [helper.make_node("Identity", ["images"], [o.name]) for o in outs]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [inp], outs)), str(path))
    return path


@pytest.mark.parametrize("fail", [False, True])
def test_stage_build_passes_the_calibrator_and_reports_it(tmp_path, fake_cuda, monkeypatch, fail):
    """convert.stage_build on a stand-in TensorRT 10: calibrator handed to build_engine, recorded in the report,
    and a calibration failure inside get_batch becomes a BuildError with no engine left behind."""
    from vggt_trt.trt import build
    from vggt_trt.pipelines import convert
    from vggt_trt.trt import backend as trt_backend
    from vggt_trt.trt.build import BuildResult

    info = trt_backend.BackendInfo("tensorrt", "10.13.0", 10, strongly_typed_only=False, has_precision_flags=True)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda backend="auto": (FakeTRT10, info))
    seen: dict[str, Any] = {}

    def fake_build_engine(onnx_path, engine_path, precision, *, calibrator=None, **kwargs):
        seen["calibrator"] = calibrator
        assert calibrator.read_calibration_cache() is None
        calibrator.get_batch(["wrong_name"] if fail else ["images"])  # TensorRT would keep calling until None
        calibrator.write_calibration_cache(b"scales")
        Path(engine_path).write_bytes(b"engine")
        return BuildResult(str(engine_path), str(onnx_path), precision, "tensorrt", "10.13.0", "weak")

    monkeypatch.setattr(build, "build_engine", fake_build_engine)
    if not HAVE_CUDA:  # host tensors stand in for the device buffer (the real copy is tested on the GPU)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype))
    graph = _vggt_like_graph(tmp_path / "g.onnx")
    opts = convert.ConvertOptions(output_dir=tmp_path, precisions=("int8",), int8_calibrator=True, calib_batches=2)
    engine = tmp_path / "g_int8.engine"
    if fail:
        with pytest.raises(BuildError, match="wrong_name"):
            convert.stage_build(graph, engine, "int8", opts)
        assert not engine.exists(), "an engine calibrated on partial data must not be kept"
        assert not list(tmp_path.glob("calibration-*.cache")), "a cache from partial data must not be written"
        return
    report = convert.stage_build(graph, engine, "int8", opts)
    calib = report["int8_calibration"]
    assert seen["calibrator"] is not None and calib["path"] == "IInt8EntropyCalibrator2"
    assert calib["batches_fed"] == 1 and calib["batches_planned"] == 2 and calib["cache_written"]
    assert Path(calib["cache"]).read_bytes() == b"scales" and Path(calib["cache"]).parent == tmp_path
    assert calib["input"] == {"name": "images", "shape": list(SHAPE)}
