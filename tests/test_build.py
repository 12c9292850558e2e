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
    """``fake10`` stands in for TensorRT 10 (not installable here without NVIDIA's GPU wheels)."""
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
    """Stand-ins for TensorRT 10's BuilderFlag and config (tensorrt_rtx has no precision flags to test with)."""
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


def test_timing_cache_created_reused_and_keyed_by_version_and_gpu(tmp_path, monkeypatch):
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
        assert meta["key"] == B.timing_cache_key(info) and meta["key"].startswith(f"tensorrt_rtx-{trt.__version__}|")
        assert meta["bytes"] == path.stat().st_size > 0 and (tmp_path / "trt_timing.cache.lock").exists()

        # the key and hash match, so the blob reaches TensorRT; TensorRT-RTX without a GPU hands back an empty
        # cache (logging only a warning), and that is reported as not loaded
        _, status = B.load_timing_cache(builder.create_builder_config(), path, info)
        assert status["loaded"] is False and status["entries"] == 0 and "empty cache" in status["reason"]

        other = tb.BackendInfo("tensorrt", "10.13.3.9", 10, False, True)
        _, status = B.load_timing_cache(builder.create_builder_config(), path, other)
        assert status["loaded"] is False and "written for tensorrt_rtx" in status["reason"]

        with monkeypatch.context() as m:  # the same TensorRT on another GPU model
            m.setattr(tb, "cuda_gpu", lambda index=0: {"name": "NVIDIA A100", "compute_capability": "8.0"})
            _, status = B.load_timing_cache(builder.create_builder_config(), path, info)
            assert status["loaded"] is False and "NVIDIA A100|sm8.0" in status["reason"]

        path.write_bytes(path.read_bytes()[:-1])  # interrupted write
        _, status = B.load_timing_cache(builder.create_builder_config(), path, info)
        assert status["loaded"] is False and "hash" in status["reason"]


def test_precision_inspection_helpers():
    warn = B.precision_warning("fp8", {"output_dtypes": {"fp16": 10, "fp32": 3}})  # a report from before "dtypes"
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


# ------------------------------------------------------------------ issue 18: the real tensorrt_rtx on CPU
def int4_weight_only_graph(path: Path) -> Path:
    """x[2,64] fp16 @ DequantizeLinear(INT4 weights [64,32], block_size 32) -> Relu: ModelOpt's int4 pattern."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = helper.make_tensor("w_q", TensorProto.INT4, [64, 32], rng.integers(-8, 8, 64 * 32).tolist())
    scales = numpy_helper.from_array((rng.random((2, 32)) * 0.01).astype(np.float16), "w_s")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 32])], [weights, scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_current_must_be_alone(graphs, tmp_path):
    _, info = tb.import_tensorrt("tensorrt-rtx")
    for mixed in (["current", "8.9"], ["12.0", "current"]):
        with pytest.raises(InputError, match="'current' must be the only target"):
            B.resolve_compute_capabilities(trt, info, "fp16", mixed)
        with pytest.raises(InputError, match="'current' must be the only target"):
            _build(graphs, tmp_path, "fp16", compute_capabilities=mixed)
    assert not list(tmp_path.iterdir())
    # what the check prevents: the real config refuses CURRENT among several targets (the build then dies
    # with "bad optional access"); set_compute_capabilities checks every return value
    trt_logger = tb.make_logger(trt, "INTERNAL_ERROR")  # the builder's logger: the config reports through it
    config = trt.Builder(trt_logger).create_builder_config()
    config.num_compute_capabilities = 2
    assert config.set_compute_capability(trt.ComputeCapability.CURRENT, 0) is False
    with pytest.raises(InputError, match="only target"):
        tb.set_compute_capabilities(trt, config, [0, 89])

    class OffByOne:  # the real config, but targets are written one index too far: TensorRT really refuses
        def __init__(self, real):
            self.__dict__["real"] = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __setattr__(self, name, value):
            setattr(self.real, name, value)

        def set_compute_capability(self, cc, index):
            return self.real.set_compute_capability(cc, index + 1)

    with pytest.raises(BuildError, match=r"refused compute capability target SM89 at index 0: .*not in a valid range"):
        tb.set_compute_capabilities(trt, OffByOne(config), [89], trt_logger)


def test_config_values_that_do_not_take_are_errors(graphs, tmp_path):
    config = trt.Builder(tb.make_logger(trt)).create_builder_config()
    skipped: dict[str, str] = {}
    assert tb.set_config(config, "builder_optimization_level", 3, skipped) and config.builder_optimization_level == 3
    with pytest.raises(BuildError, match=r"builder_optimization_level = 9 did not take: TensorRT reads back 5"):
        tb.set_config(config, "builder_optimization_level", 9, skipped)  # the real config clamps silently
    assert tb.set_workspace(trt, config, 1 << 30, skipped) and not skipped
    assert not tb.set_config(config, "no_such_setting", 1, skipped) and "does not exist" in skipped["no_such_setting"]


def test_engine_validity_on_a_real_engine(graphs, tmp_path):
    """get_engine_validity on a serialised engine: reasons reported as TensorRT gives them, no version guess."""
    engine = Path(_build(graphs, tmp_path, "fp16").engine_path)
    trt_logger = tb.make_logger(trt, "INTERNAL_ERROR")
    good = tb.engine_validity(trt, engine, trt_logger)
    if NO_GPU:  # TensorRT-RTX cannot read the GPU: INVALID with no reason bit, the cause is in its log
        assert good["validity"] == "INVALID" and good["reasons"] == [] and good["advice"] == []
        assert any("cudaError 35" in line for line in good["log"])
    else:
        assert good["validity"] in ("VALID", "SUBOPTIMAL"), good
    broken = tmp_path / "broken.engine"
    broken.write_bytes(b"ABCD" + engine.read_bytes()[4:])
    bad = tb.engine_validity(trt, broken, trt_logger)
    assert bad["validity"] == "INVALID" and bad["reasons"] == ["MALFORMED_ENGINE"]
    assert "not a complete TensorRT-RTX engine" in bad["advice"][0]
    assert not any("version" in a.lower() for a in bad["advice"])


def test_precision_summary_of_real_fp16_and_int4_builds(graphs, tmp_path):
    fp16 = _build(graphs, tmp_path, "fp16")
    assert fp16.warnings == [] and fp16.network_precision["dtypes"]["fp16"] > 0
    int4_graph = int4_weight_only_graph(tmp_path / "int4.onnx")
    res = B.build_engine(int4_graph, tmp_path / "int4.engine", "int4", backend="tensorrt-rtx", workspace_gb=1,
                         strict=True)
    net = res.network_precision
    assert res.warnings == [], res.warnings
    # weight-only INT4: a constant and a DEQUANTIZE input, never a compute output
    assert net["weight_dtypes"]["int4"] == 1 and net["input_dtypes"]["int4"] == 1 and "int4" not in net["output_dtypes"]
    assert net["matmul_conv_input_dtypes"] == {"fp16": 1}
    assert res.engine_bytes > 0 and (tmp_path / "int4.engine").is_file()


def test_inspector_summary_counts_inputs_and_weights_and_stays_advisory():
    """The inspector's documented JSON for a fused Myelin block whose INT4 weights are not an output type."""
    info = {"Layers": [{"Name": "{ForeignNode[w_q...y]}", "LayerType": "Myelin",
                        "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP16 format"}],
                        "Outputs": [{"Name": "y", "Format/Datatype": "Half"}],
                        "Weights": {"Type": "Int4", "Count": 2048}},
                       {"Name": "q", "Outputs": [{"Format/Datatype": "FP8"}],
                        "Inputs": [{"Format/Datatype": "BFloat16"}]}]}
    summary = B.inspector_precision_summary(info)
    assert summary["weight_dtypes"] == {"int4": 1} and summary["output_dtypes"] == {"fp16": 1, "fp8": 1}
    assert summary["input_dtypes"] == {"fp16": 1, "bf16": 1} and summary["fused_blocks"] == 1
    assert B.precision_warning("int4", summary) is None and B.precision_warning("fp8", summary) is None
    assert B.precision_warning("int8", summary).startswith("INT8 requested but engine contains no INT8")


def test_runtime_cache_file_naming_and_keying(tmp_path):
    from vggt_trt.trt import cache_files

    engine = tmp_path / "vggt-8x3x518x518-pcd_fp16.engine"
    path = cache_files.runtime_cache_path(engine, "8.9")
    assert path == tmp_path / "vggt-8x3x518x518-pcd_fp16.sm89.runtime.cache"
    assert cache_files.runtime_cache_path(engine, "12.0").name == "vggt-8x3x518x518-pcd_fp16.sm120.runtime.cache"
    gpu = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "driver_cuda_version": "13.0"}
    key = cache_files.runtime_cache_key("tensorrt_rtx", trt.__version__, "ab" * 32, gpu)
    others = [cache_files.runtime_cache_key("tensorrt_rtx", "1.8.0", "ab" * 32, gpu),
              cache_files.runtime_cache_key("tensorrt_rtx", trt.__version__, "cd" * 32, gpu),
              cache_files.runtime_cache_key("tensorrt_rtx", trt.__version__, "ab" * 32, {**gpu, "name": "RTX 4080"}),
              cache_files.runtime_cache_key("tensorrt_rtx", trt.__version__, "ab" * 32,
                                            {**gpu, "driver_cuda_version": "13.1"})]
    assert len({key, *others}) == 5
    cache_files.write_keyed(path, b"kernels", key, {"engine": engine.name})
    assert cache_files.read_keyed(path, key) == (b"kernels", "")
    data, reason = cache_files.read_keyed(path, others[1])
    assert data is None and "engine-cdcdcdcdcdcdcdcd" in reason  # rebuilt engine: the old kernels are not fed
    path.write_bytes(b"kernel")
    assert "hash" in cache_files.read_keyed(path, key)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]


def test_cli_rejects_current_with_other_targets_before_exporting(tmp_path):
    import vggt_to_trt
    from helpers import TINY  # noqa: E402

    out, logs = tmp_path / "out", tmp_path / "logs"
    code = vggt_to_trt.main(["--export", *TINY, "--precision", "fp16", "--backend", "tensorrt-rtx",
                             "--compute-capability", "current", "--compute-capability", "8.9",
                             "--output-dir", str(out), "--log-dir", str(logs)])
    assert code == 2
    assert "'current' must be the only target" in "".join(p.read_text() for p in logs.glob("vggt_to_trt-*.log"))
    assert not list(out.glob("*.onnx")), "the target check must stop the run before the export"
