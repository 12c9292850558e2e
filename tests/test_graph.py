"""Graph passes and ONNX I/O on toy graphs: a tiny ViT-like torch module and a hand-built sequence-op graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from vggt_trt.graph import ort
from vggt_trt.graph import precision_cast as pc
from vggt_trt.graph import sequences as seq
from vggt_trt.graph import simplify as simp
from vggt_trt.graph import io as io
from vggt_trt.errors import AccuracyError, GraphError, InputError

from helpers import IMAGES, export_toy  # noqa: E402

@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy")
    export_toy(d / "toy.onnx", dynamo=True)
    export_toy(d / "toy_ts.onnx", dynamo=False)
    return d


@pytest.fixture(scope="session")
def toy_onnx(toy_dir) -> Path:
    return toy_dir / "toy.onnx"


def make_sequence_model() -> onnx.ModelProto:
    """A graph using SplitToSequence (with and without split), SequenceAt, SequenceLength, ConcatFromSequence
    (with and without new_axis), SequenceConstruct, SequenceEmpty and SequenceInsert."""
    const = lambda name, vals, dims: h.make_node(  # noqa: E731
        "Constant", [], [name], value=h.make_tensor(f"{name}_v", T.INT64, dims, vals))
    nodes = [
        const("split", [2, 1, 3], [3]),
        h.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1, name="s2s"),
        const("pos", [-1], []),
        h.make_node("SequenceAt", ["seq", "pos"], ["last"], name="at_last"),
        h.make_node("SplitToSequence", ["x"], ["seq1"], axis=1, keepdims=0, name="s2s_nosplit"),
        h.make_node("SequenceLength", ["seq1"], ["n"], name="len"),
        h.make_node("ConcatFromSequence", ["seq1"], ["stacked"], axis=1, new_axis=1, name="cfs_new_axis"),
        h.make_node("SequenceConstruct", ["x", "stacked"], ["pair"], name="construct"),
        h.make_node("ConcatFromSequence", ["pair"], ["cat"], axis=1, name="cfs"),
        h.make_node("SequenceEmpty", [], ["empty"], name="empty", dtype=T.FLOAT),
        h.make_node("SequenceInsert", ["empty", "last"], ["one"], name="insert1"),
        h.make_node("SequenceInsert", ["one", "last"], ["two"], name="insert2"),
        h.make_node("ConcatFromSequence", ["two"], ["last_twice"], axis=1, name="cfs_twice"),
        h.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
        h.make_node("ReduceSum", ["cat"], ["s"], keepdims=0),
        h.make_node("Add", ["s", "nf"], ["z"]),
    ]
    graph = h.make_graph(nodes, "seq", [h.make_tensor_value_info("x", T.FLOAT, [2, 6, 4])],
                         [h.make_tensor_value_info("z", T.FLOAT, []),
                          h.make_tensor_value_info("last_twice", T.FLOAT, [2, 6, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ------------------------------------------------------------------------------------------------ onnx_io
def test_io_summary_and_op_histogram(toy_onnx):
    summary = io.io_summary(toy_onnx)
    assert summary["inputs"] == [{"name": "images", "shape": [2, 3, 28, 35], "dtype": "float32"}]
    assert [o["name"] for o in summary["outputs"]] == ["depth", "conf"]
    assert all(o["dtype"] == "float32" and o["shape"] == [2, 20] for o in summary["outputs"])
    hist = io.op_histogram(io.load_onnx(toy_onnx))
    for op in ("Conv", "LayerNormalization", "Softmax", "Exp", "Range", "Sin", "Cos", "Cast"):
        assert hist.get(op, 0) >= 1, op


def test_save_onnx_external_data_is_atomic_and_model_stays_usable(toy_onnx, tmp_path):
    model = io.load_onnx(toy_onnx)
    before = {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    out = io.save_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp folder left
    for t in model.graph.initializer:  # the saver moved bytes out; save_onnx read them back
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), before[t.name])
    np.testing.assert_array_equal(ort.run_onnx(out, {"images": IMAGES})["depth"],
                                  ort.run_onnx(toy_onnx, {"images": IMAGES})["depth"])
    digest = io.onnx_sha256(out)
    data = tmp_path / "m.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF
    data.write_bytes(bytes(blob))
    assert io.onnx_sha256(out) != digest  # the hash covers the external data
    io.save_onnx(model, out, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # stale data file removed
    np.testing.assert_array_equal(ort.run_onnx(out, {"images": IMAGES})["conf"],
                                  ort.run_onnx(toy_onnx, {"images": IMAGES})["conf"])


def test_save_onnx_chooses_external_data_above_threshold(toy_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    io.save_onnx(io.load_onnx(toy_onnx), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()


def test_copy_onnx_streams_external_data(toy_onnx, tmp_path):
    src = io.save_onnx(io.load_onnx(toy_onnx), tmp_path / "a" / "src.onnx", external_data=True)
    dst = io.copy_onnx(src, tmp_path / "b" / "dst.onnx")
    assert [p.name for p in io.external_data_files(dst)] == ["dst.onnx.data"]
    a, b = ort.run_onnx(src, {"images": IMAGES}), ort.run_onnx(dst, {"images": IMAGES})
    np.testing.assert_array_equal(a["conf"], b["conf"])


def test_load_errors(tmp_path, toy_onnx):
    with pytest.raises(InputError, match="not found"):
        io.load_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\xff\xff this is not a protobuf")
    with pytest.raises(GraphError, match="not a valid ONNX"):
        io.load_onnx(garbage)
    moved = io.save_onnx(io.load_onnx(toy_onnx), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(GraphError, match="external data"):
        io.load_onnx(moved)


# ---------------------------------------------------------------------------------------- sequence removal
def test_remove_sequence_ops_gives_identical_results():
    model = make_sequence_model()
    x = np.random.default_rng(1).random((2, 6, 4), dtype=np.float32)
    ref = _ort(model, {"x": x})
    out = seq.remove_sequence_ops(model)
    seq.assert_no_sequence_ops(out)
    onnx.checker.check_model(out)
    assert not set(io.op_histogram(out)) & seq.SEQUENCE_OPS
    for a, b in zip(ref, _ort(out, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_remove_sequence_ops_names_the_node_it_cannot_rewrite():
    model = make_sequence_model()
    at = next(n for n in model.graph.node if n.name == "at_last")
    at.input[1] = "p_in"  # position now comes from a graph input: not a constant
    model.graph.input.append(h.make_tensor_value_info("p_in", T.INT64, []))
    with pytest.raises(GraphError, match="at_last"):
        seq.remove_sequence_ops(model)


def test_assert_no_sequence_ops_lists_nodes():
    with pytest.raises(GraphError, match=r"s2s \(SplitToSequence\)"):
        seq.assert_no_sequence_ops(make_sequence_model())


def test_remove_sequence_ops_leaves_plain_graphs_alone(toy_onnx):
    model = io.load_onnx(toy_onnx)
    assert seq.remove_sequence_ops(model) is model


# ------------------------------------------------------------------------------------ opset, simplify, check
def test_repair_opset_adds_missing_opset_and_fixes_ir(toy_onnx):
    model = io.load_onnx(toy_onnx)
    del model.opset_import[:]
    model.ir_version = 0
    seq.repair_opset(model, 18)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert model.ir_version == 8  # the minimum for opset 18
    onnx.checker.check_model(model)
    model.ir_version = onnx.IR_VERSION  # onnx's default, which ONNX Runtime 1.31 refuses
    assert seq.repair_opset(model, 18).ir_version == 10
    _ort(model, {"images": IMAGES})


def test_simplify_modes_skip_and_fallback(toy_onnx, tmp_path, monkeypatch):
    feeds = {"images": IMAGES}
    ref = ort.run_onnx(toy_onnx, feeds)
    res = simp.simplify(toy_onnx, tmp_path / "a.simp.onnx")
    assert res.status == "simplified" and res.nodes_after < res.nodes_before
    assert res.options == {"skip_fusion_patterns": ["FusionGemm"]}
    big = simp.simplify(toy_onnx, tmp_path / "b.simp.onnx", large_model_bytes=1)
    assert big.options == {"no_shape_infer": True, "skip_optimizations": ["constant_folding"],
                           "skip_fusion_patterns": ["FusionGemm"]}
    assert all(f.parent == tmp_path and f.is_file() for f in io.external_data_files(big.path))  # own copy elsewhere
    for r in (res, big):
        np.testing.assert_allclose(ort.run_onnx(r.path, feeds)["depth"], ref["depth"], rtol=1e-5, atol=1e-6)
    skipped = simp.simplify(toy_onnx, tmp_path / "c.simp.onnx", skip=True)
    assert skipped.status == "skipped" and skipped.path == str(toy_onnx) and not (tmp_path / "c.simp.onnx").exists()

    import onnxslim

    def boom(*args, **kwargs):
        raise MemoryError("simulated out of memory")

    monkeypatch.setattr(onnxslim, "slim", boom)
    failed = simp.simplify(toy_onnx, tmp_path / "d.simp.onnx")
    assert failed.status == "failed" and "MemoryError" in failed.reason
    np.testing.assert_array_equal(ort.run_onnx(failed.path, feeds)["depth"], ref["depth"])
    json.dumps(failed.to_dict())


def test_check_model(toy_onnx, tmp_path):
    simp.check_model(toy_onnx)
    model = io.load_onnx(toy_onnx)
    model.graph.node[-1].input[0] = "no_such_tensor"
    io.save_onnx(model, tmp_path / "broken.onnx")
    with pytest.raises(GraphError, match="no_such_tensor"):
        simp.check_model(tmp_path / "broken.onnx")
    with pytest.raises(InputError):
        simp.check_model(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------------------- precision cast
def _typed(model: onnx.ModelProto) -> tuple[dict[str, int], list[onnx.NodeProto]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types, list(g.node)


@pytest.mark.parametrize("exporter", ["toy.onnx", "toy_ts.onnx"])
def test_cast_fp16_keeps_sensitive_ops_fp32_and_is_accurate(toy_dir, tmp_path, exporter):
    src = toy_dir / exporter
    cast, summary = pc.cast_precision(io.load_onnx(src), "fp16")
    out = io.save_onnx(cast, tmp_path / "fp16.onnx")
    simp.check_model(out)
    types, nodes = _typed(cast)
    low = T.FLOAT16
    for node in nodes:
        floats = [types[i] for i in node.input if i and types.get(i) in (T.FLOAT, low)]
        if node.op_type in ("LayerNormalization", "Softmax", "Exp", "Range", "Sin", "Cos"):
            assert set(floats) <= {T.FLOAT}, (node.name, node.op_type)
        if node.op_type in ("MatMul", "Conv", "Gemm"):
            assert set(floats) == {low}, (node.name, node.op_type)
        if node.op_type not in ("Cast", "Shape", "Resize"):
            assert len(set(floats)) <= 1, f"mixed input types at {node.name} ({node.op_type})"
    assert all(v["dtype"] == "float32" for v in io.io_summary(cast)["inputs"] + io.io_summary(cast)["outputs"])
    assert summary["low_nodes"] > 0 and summary["constants_converted"] > 0
    for reason in ("norm", "softmax", "exp-head", "trig", "constant-subgraph"):
        assert summary["fp32_by_reason"].get(reason, 0) >= 1, reason
    if exporter == "toy.onnx":
        assert summary["fp32_by_reason"].get("range", 0) >= 1
        assert summary["casts_rewritten"] >= 1  # the data-path Cast(to=FLOAT) now casts straight to fp16
    results = ort.compare_onnx_ort(src, out, {"images": IMAGES})
    ort.assert_accuracy(results, max_rel_l2=2e-3)
    assert json.loads(json.dumps(results))["depth"]["shape"] == [2, 20]


def test_cast_bf16_with_reference_runner(toy_onnx, tmp_path):
    cast, summary = pc.cast_precision(io.load_onnx(toy_onnx), "bf16")
    out = io.save_onnx(cast, tmp_path / "bf16.onnx")
    types, nodes = _typed(cast)
    assert any(types.get(n.input[0]) == T.BFLOAT16 for n in nodes if n.op_type == "MatMul")
    assert all(types.get(n.input[0]) == T.FLOAT for n in nodes if n.op_type == "ConvTranspose")
    assert summary["fp32_by_reason"]["no-bf16-kernel"] == 1
    results = ort.compare_onnx_ort(toy_onnx, out, {"images": IMAGES}, backend="reference")
    ort.assert_accuracy(results, max_rel_l2=2e-2)
    assert results["depth"]["rel_l2"] > 1e-5  # it really ran in bf16


def test_cast_keep_nodes_and_fp16_clipping():
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="mm"), h.make_node("Add", ["y", "b"], ["z"], name="add")]
    w = onnx.numpy_helper.from_array(np.full((2, 2), 1e5, np.float32), "w")
    b = onnx.numpy_helper.from_array(np.ones(2, np.float32), "b")
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 2])],
                         [h.make_tensor_value_info("z", T.FLOAT, [1, 2])], [w, b])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=8)
    cast, summary = pc.cast_precision(model, "fp16")
    assert summary["values_clipped"] == 4
    kept, summary = pc.cast_precision(model, "fp16", keep_nodes=["mm"])
    assert summary["fp32_by_reason"] == {"user": 1} and summary["values_clipped"] == 0
    with pytest.raises(InputError, match="int4"):
        pc.cast_precision(model, "int4")


def test_assert_accuracy_lists_every_output_over_tolerance(toy_onnx, tmp_path):
    cast, _ = pc.cast_precision(io.load_onnx(toy_onnx), "fp16")
    out = io.save_onnx(cast, tmp_path / "fp16.onnx")
    results = ort.compare_onnx_ort(toy_onnx, out, {"images": IMAGES})
    with pytest.raises(AccuracyError, match=r"2 of 2 outputs.*depth.*conf"):
        ort.assert_accuracy(results, max_rel_l2=1e-9)
    ort.assert_accuracy(results, max_rel_l2=1e-9, per_output={"depth": 1.0, "conf": 1.0})
    with pytest.raises(InputError, match="takes inputs"):
        ort.run_onnx(toy_onnx, {"wrong_name": IMAGES})
    with pytest.raises(GraphError, match="ONNX Runtime cannot run"):
        ort.run_onnx(toy_onnx, {"images": IMAGES[:, :2]})


def test_simplify_keeps_matmul_and_skips_when_memory_is_short(toy_onnx, tmp_path, monkeypatch):
    res = simp.simplify(toy_onnx, tmp_path / "a.simp.onnx")
    ops = [n.op_type for n in onnx.load(res.path).graph.node]
    assert "Gemm" not in ops and "MatMul" in ops
    monkeypatch.setattr(simp, "available_memory", lambda: 1024)
    short = simp.simplify(toy_onnx, tmp_path / "b.simp.onnx", large_model_bytes=1)
    assert short.status == "skipped" and "available" in short.reason
    assert (tmp_path / "b.simp.onnx").is_file()


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_reference_evaluator_runs_dequantize_linear_of_any_opset(tmp_path, opset):
    """onnx 1.23's reference evaluator has no DequantizeLinear before opset 19: the CPU verifier of bf16
    quant-mode graphs (opset 18) needs ours, with the same per-axis meaning."""
    from onnx import TensorProto, helper, numpy_helper

    from vggt_trt.graph.ort import run_onnx

    q = np.array([[-128, -1, 0, 127], [5, 6, 7, 8]], dtype=np.int8)
    scale, zero = np.array([0.5, 0.25], dtype=np.float32), np.array([0, 4], dtype=np.int8)
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")]
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info("q", TensorProto.INT8, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    path = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    got = run_onnx(path, {"q": q}, backend="reference")["y"]
    expected = (q.astype(np.float32) - zero[:, None]) * scale[:, None]
    np.testing.assert_array_equal(got, expected)


def test_strip_activation_qdq_keeps_weight_quantisers_and_unquantised_values(tmp_path):
    from onnx import numpy_helper

    from vggt_trt.graph.qdq import has_activation_qdq, strip_activation_qdq

    w = numpy_helper.from_array(np.array([[2, -4]], dtype=np.int8), "w_q")
    scales = [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in (("sx", 0.5), ("sw", 0.25))]
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "z")
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "z"], ["x_q"]),
             h.make_node("DequantizeLinear", ["x_q", "sx", "z"], ["x_dq"]),
             h.make_node("DequantizeLinear", ["w_q", "sw", "z"], ["w"]),
             h.make_node("Mul", ["x_dq", "w"], ["y"])]
    graph = h.make_graph(nodes, "qdq", [h.make_tensor_value_info("x", T.FLOAT, [1, 2])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 2])], [w, zero, *scales])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)], ir_version=9)
    assert has_activation_qdq(model)
    assert strip_activation_qdq(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Mul"] and not has_activation_qdq(model)
    onnx.save(model, tmp_path / "stripped.onnx")
    x = np.array([[0.3, 0.7]], dtype=np.float32)  # not on the 0.5 grid: a kept quantiser would round it
    y = ort.run_onnx(tmp_path / "stripped.onnx", {"x": x})["y"]
    np.testing.assert_allclose(y, x * np.array([[0.5, -1.0]], dtype=np.float32), rtol=1e-6)
