"""TensorRT build layer: real TensorRT-RTX builds of toy graphs on CPU, bad input, timing cache, backend choice."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest

from vggt_trt.trt import build as B
from vggt_trt.graph import precision_cast as pc
from vggt_trt.graph import io as io
from vggt_trt.trt import backend as tb
from vggt_trt.errors import BuildError, InputError, MissingDependencyError

from helpers import export_toy  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed: pip install tensorrt-rtx-cu13")
NO_GPU = tb.cuda_device_count()[0] == 0


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("build")
    fp32 = export_toy(d / "toy.onnx")
    out = {"fp32": fp32}
    for prec in ("fp16", "bf16"):
        cast, _ = pc.cast_precision(io.load_onnx(fp32), prec)
        out[prec] = io.save_onnx(cast, d / f"toy_{prec}.onnx")
    return out


def _build(graphs, tmp_path, precision, graph=None, **kw):
    return B.build_engine(graphs[graph or precision], tmp_path / f"toy_{precision}.engine", precision,
                          backend="tensorrt-rtx", workspace_gb=1, **kw)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_build_engine_on_cpu(graphs, tmp_path, precision):
    res = _build(graphs, tmp_path, precision)
    engine = Path(res.engine_path)
    assert engine.is_file() and engine.stat().st_size == res.engine_bytes > 100_000
    assert res.backend == "tensorrt_rtx" and res.typing == "strong" and res.flags == []
    # 7 MatMul, 1 Conv, 1 ConvTranspose (kept fp32 for bf16: TensorRT-RTX has no bf16 deconvolution)
    expected = {"bf16": 8, "fp32": 1} if precision == "bf16" else {precision: 9}
    assert res.network_precision["matmul_conv_input_dtypes"] == expected
    assert res.warnings == [] and res.build_seconds > 0 and res.parse_seconds > 0
    assert res.compute_capabilities is None  # default portable targets
    if NO_GPU:
        assert res.engine_precision is None and "engine not inspected" in res.engine_precision_note
    report = json.loads(json.dumps(res.to_dict()))
    assert report["precision"] == precision and report["settings"]["opt_level"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [engine.name]  # no temp files left


def test_fp32_graph_built_as_fp16_warns_and_strict_refuses(graphs, tmp_path):
    res = _build(graphs, tmp_path, "fp16", graph="fp32")
    assert res.warnings and res.warnings[0].startswith(
        "FP16 requested but the parsed network contains no FP16 tensors; TensorRT likely fell back to FP32.")
    strict_engine = tmp_path / "strict.engine"
    with pytest.raises(BuildError, match="FP16 requested"):
        B.build_engine(graphs["fp32"], strict_engine, "fp16", backend="tensorrt-rtx", strict=True)
    assert not strict_engine.exists()


def test_fp8_defaults_to_sm89_and_sm120(graphs, tmp_path):
    res = _build(graphs, tmp_path, "fp8", graph="fp16")
    assert res.compute_capabilities == ["SM89", "SM120"]
    assert any("FP8 requested" in w for w in res.warnings)  # the fp16 graph has no Q/DQ


def test_explicit_compute_capability(graphs, tmp_path):
    res = _build(graphs, tmp_path, "fp16", compute_capabilities=["8.6"])
    assert res.compute_capabilities == ["SM86"]


@pytest.mark.parametrize("precision,target", [("fp8", "8.6"), ("fp8", "sm80"), ("bf16", "7.5"), ("fp16", "9.0")])
def test_impossible_targets_rejected_before_building(graphs, tmp_path, precision, target):
    with pytest.raises(InputError):
        _build(graphs, tmp_path, precision, graph="fp16", compute_capabilities=[target])
    assert not list(tmp_path.iterdir())


def test_bad_inputs(graphs, tmp_path):
    with pytest.raises(InputError, match="not found"):
        B.build_engine(tmp_path / "missing.onnx", tmp_path / "e.engine", "fp16", backend="tensorrt-rtx")
    with pytest.raises(InputError, match="unknown precision"):
        B.build_engine(graphs["fp32"], tmp_path / "e.engine", "fp12", backend="tensorrt-rtx")
    with pytest.raises(InputError, match="unknown TensorRT backend"):
        B.build_engine(graphs["fp32"], tmp_path / "e.engine", "fp32", backend="onnxruntime")
    with pytest.raises(InputError, match="calibrator"):
        B.build_engine(graphs["fp32"], tmp_path / "e.engine", "int8", backend="tensorrt-rtx", calibrator=object())
    with pytest.raises(InputError, match="optimisation level"):
        B.build_engine(graphs["fp32"], tmp_path / "e.engine", "fp32", backend="tensorrt-rtx", opt_level=9)
    if NO_GPU:
        with pytest.raises(InputError, match="needs a GPU"):
            B.build_engine(graphs["fp32"], tmp_path / "e.engine", "fp32", backend="tensorrt-rtx",
                           compute_capabilities=["current"])
    assert not list(tmp_path.iterdir())


def test_backend_not_installed_says_how_to_install(monkeypatch):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tensorrt-rtx-cu13"):
            tb.import_tensorrt("tensorrt")

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(tb, "_import", missing)
    with pytest.raises(MissingDependencyError, match=r"pip install tensorrt-rtx-cu13.*`tensorrt`"):
        tb.import_tensorrt("auto")


def test_auto_prefers_tensorrt_then_falls_back(monkeypatch):
    real = tb._import
    flags = types.SimpleNamespace(FP16=1, BF16=2, INT8=3, FP8=4)
    fake10 = types.SimpleNamespace(__version__="10.13.3.9", BuilderFlag=flags)

    monkeypatch.setattr(tb, "_import", lambda name: fake10 if name == "tensorrt" else real(name))
    mod, info = tb.import_tensorrt("auto")
    assert mod is fake10 and info.major == 10 and info.has_precision_flags and not info.strongly_typed_only

    def no_trt(name):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        return real(name)

    monkeypatch.setattr(tb, "_import", no_trt)
    mod, info = tb.import_tensorrt("auto")
    assert info.name == "tensorrt_rtx" and info.strongly_typed_only and not info.has_precision_flags
    assert "libnvinfer" in info.import_errors["tensorrt"]


def test_legacy_precision_flags_on_tensorrt10_api():
    flags = types.SimpleNamespace(FP16="F16", BF16="B16", INT8="I8", FP8="F8")
    fake = types.SimpleNamespace(BuilderFlag=flags)
    info = tb.BackendInfo("tensorrt", "10.13.3.9", 10, False, True)
    config = types.SimpleNamespace(set=[], set_flag=lambda f: config.set.append(f))
    assert tb.set_precision_flags(fake, config, info, "int8") == ["INT8", "FP16"] and config.set == ["I8", "F16"]
    info11 = tb.BackendInfo("tensorrt", "11.2.1", 11, True, False)
    with pytest.raises(InputError, match="no BuilderFlag.FP16"):
        tb.set_precision_flags(types.SimpleNamespace(BuilderFlag=types.SimpleNamespace()), config, info11, "fp16")


def test_failed_build_leaves_existing_engine_untouched(graphs, tmp_path):
    engine = tmp_path / "toy.engine"
    engine.write_bytes(b"OLD ENGINE")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not an onnx graph at all")
    with pytest.raises(BuildError, match="could not parse"):
        B.build_engine(garbage, engine, "fp32", backend="tensorrt-rtx")
    # a build-stage failure: TensorRT-RTX has no FP32 GEMM on Turing (SM75)
    with pytest.raises(BuildError, match="could not build"):
        B.build_engine(graphs["fp32"], engine, "fp32", backend="tensorrt-rtx", compute_capabilities=["7.5"])
    assert engine.read_bytes() == b"OLD ENGINE"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx", "toy.engine"]


def test_rtx_build_skips_timing_cache_and_says_why(graphs, tmp_path):
    cache = tmp_path / "trt_timing.cache"
    res = _build(graphs, tmp_path, "fp16", timing_cache_path=cache)
    assert res.timing_cache["saved"] is False and "no-ops" in res.timing_cache["reason"]
    assert not cache.exists()


def test_timing_cache_created_reused_and_keyed_by_version(tmp_path):
    _, info = tb.import_tensorrt("tensorrt-rtx")
    builder = trt.Builder(tb.make_logger(trt))
    path = tmp_path / "trt_timing.cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # RTX marks timing caches deprecated (no-ops)
        config = builder.create_builder_config()
        _, status = B.load_timing_cache(config, path, info)
        assert status["loaded"] is False and status["reason"] == "no cache file yet"
        B.save_timing_cache(config, path, info, status)
        meta = json.loads((tmp_path / "trt_timing.cache.json").read_text())
        assert meta["key"] == f"tensorrt_rtx-{trt.__version__}" and meta["bytes"] == path.stat().st_size > 0

        _, status = B.load_timing_cache(builder.create_builder_config(), path, info)
        assert status["loaded"] is True and status["loaded_bytes"] == meta["bytes"]

        other = tb.BackendInfo("tensorrt", "10.13.3.9", 10, False, True)
        _, status = B.load_timing_cache(builder.create_builder_config(), path, other)
        assert status["loaded"] is False and "written by tensorrt_rtx" in status["reason"]

        path.write_bytes(path.read_bytes()[:-1])  # interrupted write
        _, status = B.load_timing_cache(builder.create_builder_config(), path, info)
        assert status["loaded"] is False and "hash" in status["reason"]


def test_precision_inspection_helpers():
    warn = B.precision_warning("fp8", {"output_dtypes": {"fp16": 10, "fp32": 3}})
    assert warn == "FP8 requested but engine contains no FP8 tensors; TensorRT likely fell back to FP16/FP32."
    assert B.precision_warning("int8", {"output_dtypes": {"int8": 1}}) is None
    assert B.precision_warning("fp16", None) is None
    assert B._inspector_dtype("Row major linear FP16 format (kLINEAR)") == "fp16"
    assert B._inspector_dtype("Half") == "fp16" and B._inspector_dtype("BF16") == "bf16"
    assert B._inspector_dtype("Float") == "fp32" and B._inspector_dtype("Int8") == "int8"
    assert [B.parse_compute_capability(v) for v in ("8.9", "sm120", "SM_86", 75, (8, 0), "current")] == [
        89, 120, 86, 75, 80, 0]
    with pytest.raises(InputError):
        B.parse_compute_capability("ampere")


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")
def test_engine_precision_summary_without_gpu_returns_none(graphs, tmp_path):
    res = _build(graphs, tmp_path, "fp16")
    assert B.engine_precision_summary(res.engine_path, backend="tensorrt-rtx") is None
