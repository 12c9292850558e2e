"""The PyTorch engine: chunked dense heads, device-side seeding, regional torch.compile and its cache artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggt_trt.model.compiled import (CompileCacheMismatch, compile_key, compile_regions, load_compile_cache,
                                     read_compile_cache_header, write_compile_cache)
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
    """One regional compile of the tiny model on the CPU (inductor), its outputs, and its cache artifact."""
    model = build_model("tiny", random_init=True, seed=0)
    with torch.no_grad():
        ref = model(images)
        regions = compile_regions(model)
        out = model(images)
    key = compile_key(model, "fp32", images.shape, list(ref))
    path = tmp_path_factory.mktemp("torchcache") / "vggt-7x3x42x56_fp32.torchcache"
    write_compile_cache(path, key, {"regions": regions})
    return {"ref": ref, "out": out, "key": key, "path": path, "regions": regions}


def test_compiled_output_equals_eager(compiled_run):
    assert {"depth_head", "camera_head", "point_head", "aggregator.frame_blocks.0"} <= set(compiled_run["regions"])
    for name, ref in compiled_run["ref"].items():
        assert rel_l2(ref, compiled_run["out"][name]) <= 1e-5, name


def test_compile_cache_header_and_matching_load(compiled_run):
    header = read_compile_cache_header(compiled_run["path"])
    assert header["key"] == compiled_run["key"]
    assert header["info"]["regions"] == compiled_run["regions"]
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


def test_a_file_that_is_not_a_compile_cache_is_refused(tmp_path):
    bad = tmp_path / "x.torchcache"
    bad.write_bytes(b"not a cache")
    with pytest.raises(Exception, match="is not a vggt-trt compile cache"):
        read_compile_cache_header(bad)
