"""Memory and disk footprint of the conversion (issue 16): passes that keep weights on disk, shared external
data, streamed precision casts; checked on small graphs whose tensors are all external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from vggt_trt.graph import io
from vggt_trt.graph import ort
from vggt_trt.graph import simplify as simp

from helpers import IMAGES, export_tiny, export_toy


def externalise(src: Path, dst: Path) -> Path:
    """``src`` saved as ``dst`` with every tensor (initializers and Constant values) in ``<dst>.data``."""
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data", size_threshold=0)
    return dst


def tensors_by_name(path: Path) -> dict[str, bytes]:
    """Every initializer and Constant value of the graph at ``path``, as raw bytes (external data loaded)."""
    model = onnx.load(str(path))
    out = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out[f"{node.name}:{a.name}"] = onnx.numpy_helper.to_array(a.t).tobytes()
    return out


def locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {external_data_helper.ExternalDataInfo(t).location for t in io.all_tensors(model)
            if external_data_helper.uses_external_data(t)}


@pytest.fixture(scope="module")
def tiny_pcd_onnx(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def toy_ext(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy-ext")
    return externalise(export_toy(d / "toy_inline.onnx"), d / "toy.onnx")


def test_simplify_of_a_large_graph_keeps_weights_on_disk_and_shares_them(toy_ext, tmp_path):
    """onnxslim on the structure only (gs LazyValues keep the original TensorProto): the simplified graph has no
    data file of its own, references the input's by relative location, and computes the same as the input."""
    work = tmp_path / "w"
    work.mkdir()
    src = externalise(toy_ext, work / "g.onnx")
    res = simp.simplify(src, work / "g.simp.onnx", large_model_bytes=1)
    assert res.status == "simplified", res.reason  # a stray weight load (cwd-relative) would fail onnxslim
    assert res.nodes_after < res.nodes_before
    assert not (work / "g.simp.onnx.data").exists()
    assert locations(work / "g.simp.onnx") == {"g.onnx.data"}
    # every tensor the simplified graph keeps is byte-identical to the input's tensor of that name
    before, after = tensors_by_name(src), tensors_by_name(work / "g.simp.onnx")
    shared = [n for n in after if n in before]
    assert len(shared) >= len(onnx.load(str(src), load_external_data=False).graph.initializer) // 2
    assert all(after[n] == before[n] for n in shared)
    onnx.checker.check_model(str(work / "g.simp.onnx"), full_check=False)
    ref = ort.run_onnx(src, {"images": IMAGES})
    got = ort.run_onnx(work / "g.simp.onnx", {"images": IMAGES})
    np.testing.assert_allclose(got["depth"], ref["depth"], rtol=1e-5, atol=1e-6)


def test_save_sharing_in_another_folder_streams_a_copy(toy_ext, tmp_path):
    model = io.load_onnx(toy_ext, load_external_data=False)
    dst = io.save_sharing(model, toy_ext.parent, tmp_path / "other" / "x.onnx")
    assert locations(dst) == {"x.onnx.data"}
    assert tensors_by_name(dst) == tensors_by_name(toy_ext)


def test_a_stale_data_file_another_graph_references_is_kept(toy_ext, tmp_path):
    """Rewriting ``a.onnx`` without external data must not delete ``a.onnx.data`` while ``b.onnx`` uses it."""
    a = externalise(toy_ext, tmp_path / "a.onnx")
    io.save_sharing(io.load_onnx(a, load_external_data=False), tmp_path, tmp_path / "b.onnx")
    io.save_onnx(io.load_onnx(a), tmp_path / "a.onnx", external_data=False)
    assert (tmp_path / "a.onnx.data").is_file()
    assert tensors_by_name(tmp_path / "b.onnx") == tensors_by_name(tmp_path / "a.onnx")
    (tmp_path / "b.onnx").unlink()
    io.save_onnx(io.load_onnx(a), tmp_path / "a.onnx", external_data=False)
    assert not (tmp_path / "a.onnx.data").exists()  # unreferenced now: dropped as before


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_streamed_cast_writes_the_tensors_of_the_in_memory_cast(toy_ext, tmp_path, precision):
    """The file cast loads no weights up front and converts each on write; its graph equals, node for node and
    tensor for tensor (bytes), what cast_precision makes of the fully loaded graph."""
    from vggt_trt.graph import precision_cast as pc

    old, old_summary = pc.cast_precision(io.load_onnx(toy_ext), precision)
    io.save_onnx(old, tmp_path / "old.onnx", external_data=False)
    summary = pc.cast_precision_file(toy_ext, tmp_path / "new.onnx", precision)
    assert summary == old_summary and summary["constants_converted"] > 0
    assert locations(tmp_path / "new.onnx") == {"new.onnx.data"}
    new = onnx.load(str(tmp_path / "new.onnx"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in new.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in old.graph.node]
    before, after = tensors_by_name(tmp_path / "old.onnx"), tensors_by_name(tmp_path / "new.onnx")
    assert before.keys() == after.keys() and all(after[k] == before[k] for k in before)
    assert [t.data_type for t in new.graph.initializer] == [t.data_type for t in old.graph.initializer]
    onnx.checker.check_model(str(tmp_path / "new.onnx"))


def test_streamed_cast_reports_clipped_values(tmp_path):
    from onnx import helper as h
    from vggt_trt.graph import precision_cast as pc

    w = np.full((4, 4), 1e6, dtype=np.float32)
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                         [onnx.numpy_helper.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    summary = pc.cast_precision_file(tmp_path / "m.onnx", tmp_path / "c.onnx", "fp16")
    assert summary["values_clipped"] == 16 == pc.cast_precision(io.load_onnx(tmp_path / "m.onnx"), "fp16")[1][
        "values_clipped"]


# --------------------------------------------------------- the tiny VGGT graph: today's pipeline against this one
def _old_pipeline(raw: Path, out: Path) -> Path:
    """What main did to a large graph (weights loaded at every step): streamed copy + header repair, onnxslim on
    the loaded graph saved with its own data file, the in-memory cast saved with its own data file."""
    import onnxslim
    from vggt_trt.graph import precision_cast as pc
    from vggt_trt.graph.sequences import repair_opset

    out.mkdir()
    noseq = io.copy_onnx(raw, out / "g.NOSEQ.onnx")
    header = repair_opset(io.load_onnx(noseq, load_external_data=False), 18)
    onnx.save_model(header, str(noseq))
    slim = onnxslim.slim(str(noseq), no_shape_infer=True, skip_optimizations=["constant_folding"],
                         skip_fusion_patterns=["FusionGemm"])
    io.save_onnx(slim, out / "g.simp.onnx", external_data=True, restore=False)
    cast, _ = pc.cast_precision(io.load_onnx(out / "g.simp.onnx"), "fp16")
    return io.save_onnx(cast, out / "g_fp16.onnx", external_data=True, restore=False)


def _network_io(path: Path) -> dict:
    """Inputs and outputs (name, shape, dtype) and the precision summary of the TensorRT-RTX network parsed from
    ``path``: what the engine's I/O is built from."""
    import tensorrt_rtx as trt

    from vggt_trt.trt import backend as tb
    from vggt_trt.trt.build import network_precision_summary

    _, info = tb.import_tensorrt("tensorrt-rtx")
    log = tb.make_logger(trt)
    builder = trt.Builder(log)
    network = tb.create_network(trt, builder, info, True)
    parser = trt.OnnxParser(network, log)
    assert parser.parse_from_file(str(path)), tb.parser_errors(parser)
    tensors = [network.get_input(i) for i in range(network.num_inputs)] + \
        [network.get_output(i) for i in range(network.num_outputs)]
    return {"io": [(t.name, tuple(t.shape), str(t.dtype)) for t in tensors],
            "precision": network_precision_summary(network)}


def test_tiny_vggt_fp16_graph_and_network_io_equal_todays_pipeline(tmp_path, tiny_pcd_onnx):
    """The tiny VGGT graph with every tensor external (so the large-graph paths run): sequence removal and
    simplify on the structure, streamed cast; the fp16 graph equals main's, tensor for tensor, node for node,
    and TensorRT-RTX parses the same network I/O from both."""
    pytest.importorskip("tensorrt_rtx")
    from vggt_trt.pipelines import convert as cv

    work = tmp_path / "new"
    work.mkdir()
    raw = externalise(tiny_pcd_onnx, work / "g.onnx")
    old = _old_pipeline(raw, tmp_path / "old")
    noseq = Path(cv.stage_remove_sequences(raw, work / "g.NOSEQ.onnx", 18)["path"])
    res = simp.simplify(noseq, work / "g.simp.onnx", large_model_bytes=1)
    assert res.status == "simplified", res.reason
    new = work / "g_fp16.onnx"
    cv.stage_cast(Path(res.path), new, "fp16", cv.spec_from_onnx(raw), verify=False)
    assert locations(noseq) == locations(Path(res.path)) == {"g.onnx.data"}  # one copy of the weights
    assert not (work / "g.NOSEQ.onnx.data").exists() and not (work / "g.simp.onnx.data").exists()
    old_model, new_model = onnx.load(str(old)), onnx.load(str(new))
    assert [(n.op_type, list(n.input), list(n.output)) for n in new_model.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in old_model.graph.node]
    before, after = tensors_by_name(old), tensors_by_name(new)
    assert before.keys() == after.keys() and all(after[k] == before[k] for k in before)
    onnx.checker.check_model(str(new))
    assert _network_io(new) == _network_io(old)


def test_drop_intermediates_never_deletes_data_a_kept_graph_uses(toy_ext, tmp_path):
    from vggt_trt.pipelines import convert as cv

    raw = externalise(toy_ext, tmp_path / "s.onnx")
    cv.stage_remove_sequences(raw, tmp_path / "s.NOSEQ.onnx", 18)
    simp.simplify(tmp_path / "s.NOSEQ.onnx", tmp_path / "s.simp.onnx", large_model_bytes=1)
    # fp32: the .simp graph is final, so the raw graph's data it references stays
    removed = cv.drop_intermediates(tmp_path, "s", raw, [{"onnx": {"path": str(tmp_path / "s.simp.onnx")}}])
    assert sorted(p.name for p in removed) == ["s.NOSEQ.onnx", "s.onnx"]
    assert tensors_by_name(tmp_path / "s.simp.onnx")  # still loads: s.onnx.data kept
    # a final graph with its own data: the shared data file goes with the last graph that used it
    from vggt_trt.graph import precision_cast as pc

    pc.cast_precision_file(tmp_path / "s.simp.onnx", tmp_path / "s_fp16.onnx", "fp16")
    removed = cv.drop_intermediates(tmp_path, "s", None, [{"onnx": {"path": str(tmp_path / "s_fp16.onnx")}}])
    assert sorted(p.name for p in removed) == ["s.onnx.data", "s.simp.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_fp16.onnx", "s_fp16.onnx.data"]


# --------------------------------------------------------- free disk before each stage, disk full while writing
def test_a_stage_is_refused_before_work_when_the_disk_is_too_small(toy_ext, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vggt_trt.errors import InputError
    from vggt_trt.pipelines import convert as cv

    raw = externalise(toy_ext, tmp_path / "s.onnx")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12, 1000))
    with pytest.raises(InputError, match=rf"not enough free disk in {tmp_path} for s_fp16.onnx: needs about"):
        cv.stage_cast(raw, tmp_path / "s_fp16.onnx", "fp16", None, False)
    assert not (tmp_path / "s_fp16.onnx").exists()
    # a large graph: the structure-only pass beside its data needs only the header's bytes, elsewhere a copy
    from vggt_trt.pipelines import disk

    monkeypatch.setattr(disk, "EXTERNAL_DATA_THRESHOLD", 1)
    assert disk.pass_writes(raw, tmp_path / "s.NOSEQ.onnx")[1] == raw.stat().st_size + disk.WRITE_SLACK
    assert disk.pass_writes(raw, tmp_path / "elsewhere" / "s.NOSEQ.onnx")[1] == \
        io.graph_bytes(raw) + disk.WRITE_SLACK


def test_disk_full_while_writing_is_one_line_naming_the_artifact(toy_ext, tmp_path, monkeypatch, caplog):
    import errno

    import vggt_to_trt
    from vggt_trt.errors import InputError
    from vggt_trt.graph import precision_cast as pc
    from vggt_trt.pipelines import convert as cv

    raw = externalise(toy_ext, tmp_path / "s.onnx")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(pc, "write_streamed", full)
    with pytest.raises(InputError, match=r"^disk full writing .*s_fp16\.onnx \(needs about \d+\.\d+ GB"):
        cv.stage_cast(raw, tmp_path / "s_fp16.onnx", "fp16", None, False)
    # through the command line (the cast stage's write fails): exit 2 and one line (run_cli), no traceback
    tiny = tmp_path / "tiny"
    assert vggt_to_trt.main(["--export", "--model-name", "tiny", "--num-cams", "2", "--height", "28", "--width", "28",
                             "--pcd-only", "--skip-build", "--output-dir", str(tiny), "--log-dir",
                             str(tmp_path / "logs")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("disk full writing") and "\n" not in errors[0], errors


def test_the_engine_plan_is_streamed_to_its_file_and_a_write_error_surfaces(tmp_path):
    import errno
    import types

    from vggt_trt.trt import build as tbuild

    class Writer:  # the shape of trt.IStreamWriter
        def __init__(self):
            pass

    class Builder:
        def build_serialized_network_to_stream(self, network, config, writer):
            return writer.write(b"plan-" * 30000) > 0 and writer.write(b"end") > 0

    trt = types.SimpleNamespace(IStreamWriter=Writer)
    assert tbuild._build_to_file(trt, Builder(), None, None, tmp_path / "e.engine")
    assert (tmp_path / "e.engine").read_bytes() == b"plan-" * 30000 + b"end"
    with pytest.raises(OSError) as info:  # /dev/full: every write fails with ENOSPC
        tbuild._build_to_file(trt, Builder(), None, None, Path("/dev/full"))
    assert info.value.errno == errno.ENOSPC


def test_simplify_memory_guard_counts_the_structure_of_a_large_graph(toy_ext, tmp_path, monkeypatch):
    """Structure-only simplification needs memory for the .onnx file, not for the weights beside it."""
    src = externalise(toy_ext, tmp_path / "g.onnx")
    (tmp_path / "g.onnx.data").open("ab").truncate(8 << 30)  # a sparse 8 GiB of "weights": never read
    large = simp.simplify_memory_needed(src, large=True)
    assert large == simp.SIMPLIFY_MEMORY_BASE + int(simp.SIMPLIFY_MEMORY_FACTOR * src.stat().st_size)
    assert simp.simplify_memory_needed(src, large=False) > simp.SIMPLIFY_MEMORY_FACTOR * (8 << 30)
    monkeypatch.setattr(simp, "available_memory", lambda: large - 1)
    short = simp.simplify(src, tmp_path / "g.simp.onnx", large_model_bytes=1)
    assert short.status == "skipped" and "available" in short.reason
    assert locations(tmp_path / "g.simp.onnx") == {"g.onnx.data"}  # the unsimplified graph, sharing the data
    monkeypatch.setattr(simp, "available_memory", lambda: large)
    assert simp.simplify(src, tmp_path / "g.simp.onnx", large_model_bytes=1).status != "skipped"


def test_disk_estimates_take_the_stage_arguments_by_keyword_too(toy_ext, tmp_path):
    """A stage called with keywords (as a user may) reaches its estimate with the same keywords."""
    from vggt_trt.pipelines import disk

    for estimate in (disk.pass_writes, disk.cast_writes, disk.quantize_writes):
        assert estimate(toy_ext, tmp_path / "x.onnx", verify=False)[0] == tmp_path / "x.onnx"
    assert disk.simplify_writes(toy_ext, tmp_path / "x.onnx", skip=True) == (tmp_path / "x.onnx", 0)
    assert disk.build_writes(toy_ext, tmp_path / "x.engine", profile=None)[0] == tmp_path / "x.engine"


@pytest.mark.parametrize("keep", [False, True])
def test_depth_anything_conversion_drops_its_intermediate_graphs_unless_kept(tmp_path, keep):
    from vggt_trt.pipelines.depth_anything import DepthSpec, convert_depth_anything

    spec = DepthSpec("tiny", 1, 42, 56)
    # random tiny weights overflow fp16 in the rescaled head: this test is about files, not the cast's accuracy
    reports = convert_depth_anything(spec, tmp_path, ["fp32", "fp16"], skip_build=True, verify=False,
                                     keep_intermediate=keep)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    finals = sorted(Path(r["onnx"]["path"]).name for r in reports)
    assert finals == [f"{spec.stem}.simp.onnx", f"{spec.stem}_fp16.onnx"]  # fp32's final graph is the .simp one
    intermediates = [f"{spec.stem}.NOSEQ.onnx", f"{spec.stem}.onnx"]
    assert names == sorted(finals + [f"{spec.stem}_fp16.json", f"{spec.stem}_fp32.json"]
                           + (intermediates if keep else []))
    for r in reports:
        assert Path(r["onnx"]["path"]).is_file()


def test_depth_anything_spec_gives_the_cast_check_its_inputs():
    from vggt_trt.pipelines.convert import verification_feeds
    from vggt_trt.pipelines.depth_anything import INPUT_NAME, DepthSpec

    feeds = verification_feeds(DepthSpec("tiny", 2, 42, 56))
    assert list(feeds) == [2] and feeds[2][INPUT_NAME].shape == (2, 3, 42, 56)
