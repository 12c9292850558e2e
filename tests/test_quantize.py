"""Q/DQ quantisation (ModelOpt ONNX PTQ), pre-export quant modes and their graphs, on a toy VGGT-like model.

The toy: normalisation inside, Conv patch embed, a frame and a global transformer block, a camera
Linear and a conv head; input ``images [2, 3, 56, 56]`` in [0, 1]; VGGT output names. Graphs run
in ONNX Runtime at ORT_ENABLE_BASIC (fp8 Q/DQ needs it; higher levels fuse Q/DQ into integer
kernels and change the numbers) and build with TensorRT-RTX on the CPU.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vggt_trt.quant.calib import calibration_set, synthetic_images  # noqa: E402
from vggt_trt.errors import GraphError, InputError, MissingDependencyError  # noqa: E402
from vggt_trt.quant import modes as qm  # noqa: E402
from vggt_trt.quant import ptq as q  # noqa: E402

OUTPUTS = ("pose_enc", "depth", "depth_conf")
S, H, W = 2, 56, 56
# worst rel L2 vs fp32 over outputs and 8 held-out batches, measured on this toy (16 batches from the
# image folder): int8 max 0.0088, fp8 max 0.0096, int4 awq_clip (block 32) 0.0074; tolerances are ~3x.
PTQ_TOL = {"int8": 0.03, "fp8": 0.03, "int4": 0.03}
PTQ_WEIGHT_DTYPE = {"int8": "INT8", "fp8": "FLOAT8E4M3FN", "int4": "INT4"}


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * (c // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Toy(nn.Module):
    def __init__(self, dim: int = 64, patch: int = 8):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.frame, self.glob, self.norm = _Block(dim, 4), _Block(dim, 4), nn.LayerNorm(dim)
        self.cam = nn.Linear(dim, 9)
        self.head1, self.head2 = nn.Conv2d(dim, 32, 3, padding=1), nn.Conv2d(32, 2, 3, padding=1)

    def forward(self, images):
        s, _, h, w = images.shape
        x = self.patch((images - self.mean) / self.std)
        gh, gw = x.shape[-2:]
        t = self.frame(x.flatten(2).transpose(1, 2))
        t = self.norm(self.glob(t.reshape(1, s * gh * gw, -1)).reshape(s, gh * gw, -1))
        pose = self.cam(t.mean(1)) * 0.1 + torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1.0])
        f = F.interpolate(self.head1(t.transpose(1, 2).reshape(s, -1, gh, gw)), size=(h, w), mode="bilinear")
        out = self.head2(F.relu(f))
        return pose[None], torch.exp(out[:, 0:1]).permute(0, 2, 3, 1)[None], (1 + torch.exp(out[:, 1]))[None]


def export(model: nn.Module, path: Path) -> Path:
    """The project's export settings (dynamo, opset 18, optimize) on the toy."""
    program = torch.onnx.export(model.eval(), (torch.rand(S, 3, H, W),), dynamo=True, opset_version=18,
                                input_names=["images"], output_names=list(OUTPUTS), optimize=True, verbose=False)
    program.save(str(path))
    return path


def run_ort(path: Path, batches: np.ndarray) -> list[dict[str, np.ndarray]]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"images": b}))) for b in batches]


def worst_rel(ref: list[dict], test: list[dict]) -> float:
    return max(float(np.linalg.norm(t[k] - r[k]) / np.linalg.norm(r[k])) for r, t in zip(ref, test) for k in OUTPUTS)


def trt_build(path: Path, compute_capability: str | None = None) -> int:
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx (TensorRT-RTX) is not installed")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if compute_capability:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability), 0)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, f"TensorRT-RTX could not build {path.name}"
    return plan.nbytes


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module")
def toy() -> nn.Module:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture(scope="module")
def fp32_onnx(toy, work) -> Path:
    return export(toy, work / "toy.onnx")


@pytest.fixture(scope="module")
def calib_dir(work) -> Path:
    from PIL import Image

    images = (synthetic_images(12, H, W, seed=1) * 255).astype(np.uint8)
    for i, img in enumerate(images):
        d = work / "calib" / f"scene{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:02d}.png")
    return work / "calib"


@pytest.fixture(scope="module")
def eval_batches() -> np.ndarray:
    return synthetic_images(8 * S, H, W, seed=99).reshape(8, S, 3, H, W)  # distinct from calibration


@pytest.fixture(scope="module")
def fp32_ref(fp32_onnx, eval_batches):
    return run_ort(fp32_onnx, eval_batches)


@pytest.fixture(scope="module")
def moq():
    return pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed "
                               "(pip install -r requirements-quant.txt)")


@pytest.fixture(scope="module")
def ptq(moq, fp32_onnx, calib_dir, work):
    calib = calibration_set(calib_dir, S, H, W, num_batches=16, seed=0)
    out = {}
    for precision, kw in (("int8", {}), ("fp8", {}), ("int4", {"block_size": 32})):
        out[precision] = q.quantize_onnx(fp32_onnx, work / f"toy_{precision}.onnx", precision, calib, **kw)
    return out


# --------------------------------------------------------------------------- graph queries


def test_default_exclusions_are_graph_queries(fp32_onnx):
    proto = onnx.load(str(fp32_onnx))
    by_name = {n.name: n for n in proto.graph.node}
    excl = q.default_exclusions(proto)
    assert len(excl["patch_embed"]) == 1 and by_name[excl["patch_embed"][0]].op_type == "Conv"
    weights = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert weights[excl["patch_embed"][0]] == "patch.weight"
    assert [weights[n] for n in excl["output_layers"]] == ["head2.weight"]
    assert excl["op_types"] == ["LayerNormalization"]
    gemm = q.find_output_layers(proto, ("MatMul", "Gemm"))
    assert len(gemm) == 1 and by_name[gemm[0]].input[1] == "cam.weight"
    with pytest.raises(GraphError, match="no input 'pixels'"):
        q.find_input_convs(proto, "pixels")


def test_qdq_summary_of_fp32_graph(fp32_onnx):
    s = q.qdq_summary(fp32_onnx)
    assert s["quantize_linear"] == s["dequantize_linear"] == s["quantized_weight_count"] == 0
    assert s["weight_bytes"] == s["weight_bytes_if_fp32"] > 0


# --------------------------------------------------------------------------- ONNX PTQ


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_ptq_graph_runs_and_is_accurate(ptq, precision, fp32_ref, eval_batches):
    report = ptq[precision]
    s = report["qdq"]
    assert s["dequantize_linear"] > 0 and s["quantized_weight_count"] > 0
    assert set(s["quantized_weights"]) == {PTQ_WEIGHT_DTYPE[precision]}
    assert (s["quantize_linear"] > 0) == (precision != "int4")  # int4 is weight-only
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    json.dumps(report)
    err = worst_rel(fp32_ref, run_ort(Path(report["output"]), eval_batches))
    assert 0 < err < PTQ_TOL[precision], f"{precision}: rel L2 {err:.4f}"


def test_ptq_keeps_norms_and_exp_in_fp32(ptq):
    proto = onnx.shape_inference.infer_shapes(onnx.load(ptq["int8"]["output"]))
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    first_input = {n.op_type: types.get(n.input[0]) for n in proto.graph.node}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert first_input["LayerNormalization"] == f32 and first_input["Exp"] == f32
    assert first_input["MatMul"] == first_input["Softmax"] == f16  # the rest is high_precision_dtype fp16
    assert ptq["int8"]["fp32_op_types"] == ["Exp", "LayerNormalization"]


def test_ptq_keeps_excluded_layers_unquantised(ptq):
    proto = onnx.load(ptq["int8"]["output"])
    producers = {o: n for n in proto.graph.node for o in n.output}
    excluded = set(ptq["int8"]["exclusions"]["patch_embed"] + ptq["int8"]["exclusions"]["output_layers"])
    assert len(excluded) == 2
    for node in proto.graph.node:
        if node.op_type == "Conv":
            quantised = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                            for i in node.input[:2])
            assert quantised == (node.name not in excluded), node.name


@pytest.mark.parametrize("precision,cc", [("int8", None), ("fp8", "SM89"), ("int4", None)])
def test_ptq_graph_builds_with_tensorrt_rtx(ptq, precision, cc):
    assert trt_build(Path(ptq[precision]["output"]), cc) > 0


def test_accuracy_table_on_quantised_outputs(ptq, fp32_ref, eval_batches):
    from vggt_trt.accuracy import accuracy_table, format_accuracy_table

    test = run_ort(Path(ptq["int8"]["output"]), eval_batches[:1])[0]
    table = accuracy_table(fp32_ref[0], test, (H, W), random_weights=True)
    json.dumps(table, allow_nan=False)
    assert 0 < table["depth"]["rel_l2"] < PTQ_TOL["int8"] and table["depth_conf"]["spearman"] > 0.9
    assert table["camera"]["rotation_deg_max"] < 5 and table["world_points_from_depth"]["rel_l2"] < 0.05
    text = format_accuracy_table({"int8": table})
    assert "int8" in text and "random" in text


def test_accuracy_report_on_graphs(ptq, fp32_onnx):
    from types import SimpleNamespace

    spec = SimpleNamespace(input_name="images", input_shape=(S, 3, H, W), height=H, width=W)
    calib = synthetic_images(2 * S, H, W, seed=4).reshape(2, S, 3, H, W)
    table = q.accuracy_report(fp32_onnx, ptq["fp8"]["output"], spec, calib, random_weights=True)
    json.dumps(table, allow_nan=False)
    assert table["evaluation"]["kind"] == "synthetic" and 0 < table["depth"]["rel_l2"] < PTQ_TOL["fp8"]
    assert set(table["outputs"]) == set(OUTPUTS)
    with pytest.raises(InputError, match="distinct from the calibration"):
        q.accuracy_report(fp32_onnx, ptq["fp8"]["output"], spec, calib, eval_batches=calib[1:])


def test_quantize_with_external_data(moq, fp32_onnx, work, eval_batches, fp32_ref):
    src = work / "ext" / "toy_ext.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(fp32_onnx)), str(src), save_as_external_data=True, location="toy_ext.onnx.data",
                    size_threshold=0)
    calib = calibration_set(None, S, H, W, num_batches=4, seed=3)
    report = q.quantize_onnx(src, work / "ext" / "toy_ext_int8.onnx", "int8", calib, use_external_data=True)
    out = Path(report["output"])
    assert any(p.name.startswith(out.name) and p != out for p in out.parent.iterdir())  # data beside it
    assert worst_rel(fp32_ref, run_ort(out, eval_batches[:2])) < PTQ_TOL["int8"]


def test_cache_reuse_and_invalidation(moq, fp32_onnx, work):
    cache = work / "cache"
    data = synthetic_images(4 * S, H, W, seed=5).reshape(4, S, 3, H, W)
    first = q.quantize_onnx(fp32_onnx, work / "c1.onnx", "int8", calibration_set(data, S, H, W, 4), cache_dir=cache)
    again = q.quantize_onnx(fp32_onnx, work / "c2.onnx", "int8", calibration_set(data, S, H, W, 4), cache_dir=cache)
    assert not first["cache_hit"] and again["cache_hit"] and first["cache_key"] == again["cache_key"]
    assert again["qdq"] == first["qdq"]
    entries = sorted(cache.glob("calibration-int8-*.onnx"))
    assert len(entries) == 1 and json.loads(entries[0].with_suffix(".json").read_text())["precision"] == "int8"
    changed = data.copy()
    changed[0, 0, 0, 0, 0] = 1.0 - changed[0, 0, 0, 0, 0]  # one pixel differs: a new fingerprint
    other = q.quantize_onnx(fp32_onnx, work / "c3.onnx", "int8", calibration_set(changed, S, H, W, 4), cache_dir=cache)
    assert not other["cache_hit"] and other["cache_key"] != first["cache_key"]
    method = q.quantize_onnx(fp32_onnx, work / "c4.onnx", "int8", calibration_set(data, S, H, W, 4),
                             method="entropy", cache_dir=cache)
    assert not method["cache_hit"]
    entries[0].with_suffix(".json").write_text("{}")  # a key that does not match is never trusted
    assert not q.quantize_onnx(fp32_onnx, work / "c5.onnx", "int8", calibration_set(data, S, H, W, 4),
                               cache_dir=cache)["cache_hit"]


def test_quantize_bad_inputs(moq, fp32_onnx, work):
    calib = calibration_set(None, S, H, W, num_batches=2)
    with pytest.raises(InputError, match="precision"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int2", calib)
    with pytest.raises(InputError, match="method"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int8", calib, method="awq_clip")
    with pytest.raises(InputError, match=r"\[3, 3, 56, 56\].*\[2, 3, 56, 56\]"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int8", calibration_set(None, 3, H, W, num_batches=1))
    with pytest.raises(InputError, match=r"expected \[B, 2, 3, 56, 56\].*found \[4, 3, 28, 28\]"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int8", np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(InputError, match="needs calibration data"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "fp8", None)
    with pytest.raises(InputError, match="no input 'pixels'"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int8", calib, input_name="pixels")
    with pytest.raises(InputError, match="not in the graph"):
        q.quantize_onnx(fp32_onnx, work / "x.onnx", "int8", calib, exclude_nodes=["nope"])
    with pytest.raises(InputError, match="does not exist"):
        q.quantize_onnx(work / "missing.onnx", work / "x.onnx", "int8", calib)
    assert not (work / "x.onnx").exists()


# --------------------------------------------------------------------------- pre-export quant modes

MODE_DTYPE = {"torch-int8-dynamic": "INT8", "bitsandbytes-8bit": "INT8", "bitsandbytes-nf4": "INT4",
              "bitsandbytes-fp4": "INT4", "modelopt-fp8": "FLOAT8E4M3FN"}
# measured worst rel L2 vs fp32 on the toy: int8 modes 0.0015, nf4 0.021, fp4 0.025, modelopt-fp8 0.008
MODE_TOL = {"torch-int8-dynamic": 0.01, "bitsandbytes-8bit": 0.01, "bitsandbytes-nf4": 0.06,
            "bitsandbytes-fp4": 0.08, "modelopt-fp8": 0.03}


@pytest.mark.parametrize("mode", list(MODE_DTYPE))
def test_quant_mode_reaches_graph(mode, toy, work, eval_batches, fp32_ref):
    if mode == "modelopt-fp8":
        pytest.importorskip("modelopt.torch.quantization", reason="modelopt.torch is not importable")
    model = copy.deepcopy(toy)
    report = qm.apply_quant_mode(model, mode, calibration_set(None, S, H, W, num_batches=4, seed=2))
    assert report["quantized_layers"] == 9 and not report["kept_float"]  # 8 block Linears + camera Linear
    with torch.no_grad():
        eager = [model(torch.from_numpy(b)) for b in eval_batches[:2]]
    path = export(model, work / f"mode_{mode}.onnx")
    report = qm.finalize_quant_mode_graph(path, report)
    graph = report["graph"]
    assert set(graph["quantized_weights"]) == {MODE_DTYPE[mode]} and graph["quantized_weight_count"] == 9
    assert graph["weight_bytes"] < 0.6 * graph["weight_bytes_if_fp32"]
    assert (graph["quantize_linear"] > 0) == (mode == "modelopt-fp8")  # the others are weight-only
    json.dumps(report)
    assert qm.finalize_quant_mode_graph(path, report)["graph"] == graph  # idempotent: a re-check after later passes
    got = run_ort(path, eval_batches)
    assert worst_rel(fp32_ref, got) < MODE_TOL[mode]
    eager = [dict(zip(OUTPUTS, (v.numpy() for v in e))) for e in eager]
    assert worst_rel(eager, got[:2]) < 1e-3  # the graph computes what the quantised torch model computes
    assert trt_build(path, "SM89" if mode == "modelopt-fp8" else None) > 0


def test_quant_mode_none_and_bad_modes(toy):
    model = copy.deepcopy(toy)
    assert qm.apply_quant_mode(model, "none")["quantized_layers"] == 0
    with pytest.raises(InputError, match="--quant-mode must be one of"):
        qm.apply_quant_mode(model, "bitsandbytes-int3")
    with pytest.raises(InputError, match="no nn.Linear"):
        qm.apply_quant_mode(nn.Sequential(nn.Conv2d(3, 3, 1)), "bitsandbytes-8bit")
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:  # without ModelOpt the mode names what to install
        with pytest.raises(MissingDependencyError, match="modelopt.torch"):
            qm.apply_quant_mode(model, "modelopt-fp8", None)
    else:  # requirements-quant.txt installs it (CI, development machines): calibration batches are required
        with pytest.raises(InputError, match="needs calibration"):
            qm.apply_quant_mode(model, "modelopt-fp8", None)


def test_finalize_refuses_float_weights_under_a_quantised_label(fp32_onnx, work):
    claimed = {"mode": "bitsandbytes-8bit", "quantized_layers": 9}
    with pytest.raises(GraphError, match="refusing to label float weights"):
        qm.finalize_quant_mode_graph(fp32_onnx, claimed, work / "lie.onnx")
    assert not (work / "lie.onnx").exists()


def test_nf4_emulation_matches_the_bitsandbytes_grid():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    grid = qm._codebook_roundtrip(w, qm._BNB_CODES["nf4"], 64)
    blocks, gblocks = w.reshape(8, 2, 64), grid.reshape(8, 2, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    np.testing.assert_allclose(np.abs(gblocks).max(-1, keepdims=True), absmax, rtol=1e-6)  # +-1 codes exist
    codes = np.asarray(qm._BNB_CODES["nf4"], dtype=np.float32)
    normed = gblocks / absmax
    assert np.abs(normed[..., None] - codes).min(-1).max() < 1e-6  # every value is a code-book entry
    nearest = codes[np.abs((blocks / absmax)[..., None] - codes).argmin(-1)]
    np.testing.assert_allclose(normed, nearest, atol=1e-6)  # and the nearest one
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: checked against the code book only")
    wt = torch.from_numpy(w)
    for kind in ("nf4", "fp4"):  # bitsandbytes >= 0.46 quantises on the CPU too
        packed, state = bnb.functional.quantize_4bit(wt, blocksize=64, quant_type=kind, compress_statistics=False)
        np.testing.assert_array_equal(bnb.functional.dequantize_4bit(packed, state).numpy(),
                                      qm._codebook_roundtrip(w, qm._BNB_CODES[kind], 64))
    codes, absmax, _ = bnb.functional.int8_vectorwise_quant(wt)
    np.testing.assert_array_equal(codes.numpy(), np.rint(w * (127.0 / np.abs(w).max(1, keepdims=True))))
    np.testing.assert_array_equal(absmax.numpy(), np.abs(w).max(1))


def test_fold_pass_makes_int4_blocks(toy, work):
    model = copy.deepcopy(toy)
    qm.apply_quant_mode(model, "bitsandbytes-nf4")
    proto = onnx.load(str(export(model, work / "fold.onnx")))
    before = sum(n.op_type == "Mul" for n in proto.graph.node)
    stats = qm.fold_weight_dequant_to_dq(proto)
    assert stats["int4_block_dq_folded"] == 9
    assert sum(n.op_type == "Mul" for n in proto.graph.node) == before - 9
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert {a.name: a.i for a in dq[0].attribute} == {"axis": 0, "block_size": 64}
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 21
    onnx.checker.check_model(proto)
    assert os.path.getsize(work / "fold.onnx") > 0


def test_quant_mode_exports_in_a_fresh_process(tmp_path):
    """The pipeline's order: quantise, then export with no eager forward before it (torch.onnx builds
    its op registry at export time; the quantized_decomposed ops must already exist then)."""
    import subprocess
    import sys

    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_quantize import Toy, export
from vggt_trt.quant.modes import apply_quant_mode
from vggt_trt.quant.ptq import qdq_summary
model = Toy().eval()
apply_quant_mode(model, "bitsandbytes-8bit")
path = export(model, __import__("pathlib").Path({str(tmp_path / "fresh.onnx")!r}))
print(qdq_summary(path)["quantized_weight_count"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "9"
