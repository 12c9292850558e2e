"""The PyTorch engine: chunked dense heads, device-side seeding, regional torch.compile and its cache artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vggt_trt.model.compiled import (CompileCacheMismatch, compile_regions, load_compile_cache,
                                     read_compile_cache_header)
from vggt_trt.model.vggt import FULL_OUTPUTS
from vggt_trt.model.weights import build_model


def rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float((test.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(7, 3, 42, 56, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("chunk", [2, 3, 4, 6])
def test_chunked_dense_heads_equal_unchunked_exactly(tiny_model, images, chunk):
    with torch.no_grad():
        tiny_model.frames_chunk_size = None
        ref = tiny_model(images, outputs=FULL_OUTPUTS)
        tiny_model.frames_chunk_size = chunk
        out = tiny_model(images, outputs=FULL_OUTPUTS)
    tiny_model.frames_chunk_size = 8
    for name in FULL_OUTPUTS:
        assert torch.equal(ref[name], out[name]), f"{name} differs with frames_chunk_size={chunk}"


def test_meta_built_model_has_the_seeded_weights_of_an_eager_init(tiny_model):
    """build_model skips the default init; the seeded weights must be what init_random_weights writes."""
    from vggt_trt.model.config import get_preset
    from vggt_trt.model.vggt import VGGT
    from vggt_trt.model.weights import init_random_weights

    eager = init_random_weights(VGGT(get_preset("tiny")), seed=0)
    for (name, a), (_, b) in zip(eager.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), name
    for name, buf in eager.named_buffers():
        assert torch.equal(buf, dict(tiny_model.named_buffers())[name]), name


@pytest.fixture(scope="module")
def compiled_run(images, tmp_path_factory):
    """One regional compile of the tiny model on the CPU (inductor) through the runner, which writes the
    compile-cache artifact after its first call; the eager outputs of the same weights for reference."""
    from vggt_trt.runtime.torch_runner import TorchRunner

    path = tmp_path_factory.mktemp("torchcache") / "vggt-7x3x42x56_fp32.torchcache"
    with torch.no_grad():
        ref = build_model("tiny", random_init=True, seed=0)(images)
    runner = TorchRunner("tiny", random_init=True, device="cpu", outputs=list(ref), compile=True, compile_cache=path)
    from torch._dynamo.utils import counters

    counters.clear()
    with runner:
        out = runner.infer_device({"images": images})
        key = runner.expected_compile_key(images.shape)
        info = runner.info()
    breaks = dict(counters["graph_break"])
    return {"ref": ref, "out": out, "key": key, "path": path, "info": info, "graph_breaks": breaks}


def test_compiled_regions_have_no_graph_breaks_and_every_graph_is_cacheable(compiled_run):
    """A break in a compiled head splits it into per-shape pieces, and traced numpy keeps a piece out of the
    AOTAutograd cache: the 1B model then recompiled one head in every process (98 s on an H200)."""
    assert compiled_run["graph_breaks"] == {}
    counts = compiled_run["info"]["cache_counters"]
    assert counts.get("aot_autograd.autograd_cache_bypass", 0) == 0, counts
    assert not any("bypass" in name for name in counts), counts


def test_compile_regions_are_every_block_and_head():
    regions = compile_regions(build_model("tiny", random_init=True, seed=0))  # wraps only; nothing compiles yet
    assert {"depth_head", "camera_head", "point_head", "aggregator.frame_blocks.0", "aggregator.global_blocks.3",
            "aggregator.patch_embed.blocks.1"} <= set(regions)
    assert not any(r.startswith("camera_head.") for r in regions)  # the head's own blocks go with the head


def test_compiled_output_equals_eager(compiled_run):
    assert compiled_run["info"]["compile"] and compiled_run["info"]["cache_bytes"] > 0
    for name, ref in compiled_run["ref"].items():
        assert rel_l2(ref, compiled_run["out"][name]) <= 1e-5, name


def test_a_compile_cache_describes_the_runner_it_was_made_by(compiled_run):
    from vggt_trt.runtime.factory import make_runner

    runner = make_runner(compiled_run["path"])
    assert (runner.model_name, runner.random_init, runner.precision, runner.compile) == ("tiny", True, "fp32", True)
    assert runner.input_shape == (7, 3, 42, 56) and list(runner.outputs) == list(compiled_run["ref"])


def test_compile_cache_header_and_matching_load(compiled_run):
    header = read_compile_cache_header(compiled_run["path"])
    assert header["key"] == compiled_run["key"]
    assert header["info"]["model_name"] == "tiny" and header["info"]["random_init"] is True
    assert load_compile_cache(compiled_run["path"], compiled_run["key"])["key"]["input_shape"] == [7, 3, 42, 56]


@pytest.mark.parametrize("field,value,words", [
    ("input_shape", [8, 3, 42, 56], "input_shape: artifact [7, 3, 42, 56], this run [8, 3, 42, 56]"),
    ("precision", "bf16", "precision: artifact 'fp32', this run 'bf16'"),
    ("torch", "9.9.9", "torch: artifact"),
])
def test_compile_cache_for_another_setup_is_refused_by_name(compiled_run, field, value, words):
    key = {**compiled_run["key"], field: value}
    with pytest.raises(CompileCacheMismatch, match="vggt_to_trt.py --backend torch") as exc:
        load_compile_cache(compiled_run["path"], key)
    assert words in str(exc.value)


def test_torch_backend_refuses_precisions_it_cannot_build(tmp_path):
    from vggt_trt.cli.convert import main

    assert main(["--backend", "torch", "--model-name", "tiny", "--precision", "int8", "--output-dir", str(tmp_path),
                 "--log-dir", str(tmp_path / "logs")]) == 2
    assert not list(tmp_path.glob("*.torchcache"))


def test_a_file_that_is_not_a_compile_cache_is_refused(tmp_path):
    bad = tmp_path / "x.torchcache"
    bad.write_bytes(b"not a cache")
    with pytest.raises(Exception, match="is not a vggt-trt compile cache"):
        read_compile_cache_header(bad)


def test_cuda_graph_needs_a_cuda_device():
    from vggt_trt.errors import InputError
    from vggt_trt.runtime.torch_runner import TorchRunner

    runner = TorchRunner(model_name="tiny", random_init=True, device="cpu", cuda_graph=True)
    with pytest.raises(InputError, match="CUDA graphs .*need a CUDA device; this runner is on cpu"):
        runner.activate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replays_each_new_input(images):
    from vggt_trt.runtime.torch_runner import TorchRunner

    feeds = [{"images": images[:4].numpy()}, {"images": images[3:].numpy()}]
    with TorchRunner(model_name="tiny", random_init=True, device="cuda") as eager:
        expected = [eager.infer(f) for f in feeds]
    with TorchRunner(model_name="tiny", random_init=True, device="cuda", cuda_graph=True) as graphed:
        first = graphed.infer(feeds[0])  # eager call, then capture
        assert graphed.compile_report["cuda_graph_capture_s"] >= 0
        replayed = [graphed.infer(f) for f in feeds]
    for ref, out in zip([expected[0], *expected], [first, *replayed]):
        for name in ref:
            assert rel_l2(torch.from_numpy(ref[name]), torch.from_numpy(out[name])) <= 1e-5, name


def test_bf16_all_runs_the_heads_in_bf16_and_stays_near_fp32(images):
    from vggt_trt.runtime.torch_runner import TorchRunner

    feed = {"images": images[:3].numpy()}
    results = {}
    for precision in ("fp32", "bf16", "bf16-all"):
        with TorchRunner(model_name="tiny", random_init=True, precision=precision, device="cpu") as runner:
            results[precision] = runner.infer(feed)
            heads = {p.dtype for p in runner.model.depth_head.parameters()} | {
                p.dtype for p in runner.model.camera_head.parameters()}
            assert heads == {torch.bfloat16 if precision == "bf16-all" else torch.float32}, precision
    ref = results["fp32"]
    for name in ref:
        out = results["bf16-all"][name]
        assert out.dtype == np.float32 and np.isfinite(out).all(), name
        # the bf16 heads round their own activations: a different result from bf16 with fp32 heads,
        # near fp32 at bf16's resolution
        assert not np.array_equal(out, results["bf16"][name]), name
        assert rel_l2(torch.from_numpy(ref[name]), torch.from_numpy(out)) <= 2e-2, name


def test_torch_backend_accepts_bf16_all():
    from vggt_trt.pipelines.torch_engine import TorchEngineOptions

    spec = TorchEngineOptions(output_dir=Path("unused"), model_name="tiny", precision="bf16-all").validate()
    assert spec.input_shape == (8, 3, 518, 518)
