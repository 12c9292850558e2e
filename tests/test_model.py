"""Our VGGT against the official reference: fixture outputs, state_dict keys, export-sensitive pieces."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vggt_trt.errors import InputError, WeightsError
from vggt_trt.model.config import config_from_fixture, get_preset
from vggt_trt.model.dino import aa_bicubic_matrix
from vggt_trt.model.layers import RopeTables
from vggt_trt.model.vggt import PCD_OUTPUTS, VGGT
from vggt_trt.model.weights import build_model, load_state_dict_into, read_checkpoint, resolve_checkpoint


def test_fixture_outputs_match_reference(fixtures_dir):
    from vggt_trt.model.check_fixture import check_fixture

    report = check_fixture(fixtures_dir / "vggt-tiny-a.safetensors", tolerance=1e-4)
    assert report["passed"], report["failed"]
    expected = {"outputs.pose_enc", "outputs.depth", "outputs.depth_conf", "outputs.world_points",
                "outputs.world_points_conf", "post.extrinsic", "post.intrinsic", "post.world_points_from_depth"}
    assert expected <= set(report["results"])
    for name, r in report["results"].items():
        assert r["rel_l2"] < 1e-5, (name, r)


def test_check_fixture_cli_fails_on_perturbed_fixture(fixtures_dir, tmp_path):
    """A fixture whose expected output is off must make the checker exit non-zero."""
    from safetensors.numpy import load_file, save_file

    from vggt_trt.cli.check_fixture import main

    tensors = load_file(str(fixtures_dir / "vggt-tiny-a.safetensors"))
    tensors["outputs.depth"] = tensors["outputs.depth"] * 1.01
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.json").write_text((fixtures_dir / "vggt-tiny-a.json").read_text())
    assert main([str(tmp_path / "bad.safetensors")]) == 1
    assert main([str(fixtures_dir / "vggt-tiny-a.safetensors"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["passed"]


def test_fixture_intermediates(fixtures_dir):
    from safetensors.numpy import load_file

    t = load_file(str(fixtures_dir / "vggt-tiny-a.safetensors"))
    cfg = config_from_fixture(json.loads((fixtures_dir / "vggt-tiny-a.json").read_text())["config"])
    model = VGGT(cfg).eval()
    load_state_dict_into(model, {k[11:]: torch.from_numpy(v) for k, v in t.items() if k.startswith("state_dict.")})
    images = torch.from_numpy(t["inputs.images"])
    with torch.no_grad():
        pos = model.aggregator.patch_embed.interpolate_pos_encoding(*images.shape[-2:]).numpy()
        layers = model.aggregator(images[None])
    np.testing.assert_allclose(pos, t["intermediate.dino_pos_embed_interpolated"], rtol=0, atol=1e-6)
    for i in range(cfg.depth):
        np.testing.assert_allclose(layers[i].numpy(), t[f"intermediate.aggregated_tokens.{i}"], rtol=0, atol=1e-4)


def test_vggt_1b_state_dict_keys_and_shapes(fixtures_dir):
    ref = json.loads((fixtures_dir / "vggt-1b-state-dict.json").read_text())
    expected = [(e["key"], tuple(e["shape"])) for e in ref["tensors"] if not e["key"].startswith("track_head.")]
    with torch.device("meta"):
        model = VGGT(get_preset("vggt-1b"))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected
    assert sum(math_prod(s) for _, s in ours) == ref["params"] - ref["groups"]["track_head"]


def math_prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


@pytest.mark.parametrize("in_size,out_size", [(37, 28), (37, 37), (4, 5), (37, 20), (16, 9), (5, 12)])
def test_aa_bicubic_matches_torch(in_size, out_size):
    grid = torch.randn(1, 3, in_size, in_size, dtype=torch.float64)
    ref = F.interpolate(grid, size=(out_size, in_size), mode="bicubic", antialias=True, align_corners=False)
    ours = torch.einsum("oi,bciw->bcow", torch.from_numpy(aa_bicubic_matrix(in_size, out_size)), grid)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def _reference_rope(tokens, positions, freq=100.0):
    """The official RoPE2D written plainly: cartesian positions, embedding lookup, rotate_half."""
    d = tokens.shape[-1] // 2
    inv_freq = 1.0 / (freq ** (torch.arange(0, d, 2).float() / d))
    table = torch.einsum("i,j->ij", torch.arange(int(positions.max()) + 1).float(), inv_freq)
    table = torch.cat((table, table), dim=-1)
    cos, sin = table.cos(), table.sin()

    def one(x, pos):
        c, s = F.embedding(pos, cos)[:, None], F.embedding(pos, sin)[:, None]
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    v, h = tokens.chunk(2, dim=-1)
    return torch.cat((one(v, positions[..., 0]), one(h, positions[..., 1])), dim=-1)


def test_rope_tables_match_reference_layout():
    gh, gw, special, head_dim = 3, 5, 5, 16
    pos = torch.cartesian_prod(torch.arange(gh), torch.arange(gw)) + 1
    pos = torch.cat([torch.zeros(special, 2, dtype=pos.dtype), pos])[None].expand(2, -1, -1)
    x = torch.randn(2, 4, pos.shape[1], head_dim)
    rope = RopeTables.for_grid(gh, gw, special, head_dim, 100.0, "cpu", torch.float32)
    torch.testing.assert_close(rope.apply(x), _reference_rope(x, pos), rtol=1e-5, atol=1e-6)


def test_outputs_shapes_non_square_and_pcd_only(tiny_model):
    images = torch.rand(3, 3, 42, 70)
    with torch.no_grad():
        out = tiny_model(images, outputs=PCD_OUTPUTS)
    assert list(out) == list(PCD_OUTPUTS)
    assert out["pose_enc"].shape == (1, 3, 9)
    assert out["depth"].shape == (1, 3, 42, 70, 1)
    assert out["depth_conf"].shape == (1, 3, 42, 70)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all()


def test_heads_stay_float32_under_bf16_autocast(tiny_model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(torch.rand(2, 3, 56, 56), outputs=PCD_OUTPUTS)
    assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("shape", [(2, 3, 50, 56), (2, 1, 56, 56), (3, 56, 56)])
def test_bad_image_shapes(tiny_model, shape):
    with pytest.raises(InputError):
        tiny_model(torch.rand(*shape))


def test_weights_roundtrip_and_errors(tiny_model, tmp_path, caplog):
    from safetensors.torch import save_file

    caplog.set_level(logging.INFO)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({**state, "track_head.tracker.x": torch.zeros(2)}, tmp_path / "model.pt")
    for source in (tmp_path / "model.safetensors", tmp_path / "model.pt", tmp_path):
        m = build_model("tiny", weights=source)
        torch.testing.assert_close(m.state_dict()["aggregator.camera_token"], state["aggregator.camera_token"])
    assert any("track_head" in r.message for r in caplog.records)

    bad = dict(state)
    bad.pop("depth_head.norm.weight")
    bad["aggregator.register_token"] = torch.zeros(1, 2, 3, 64)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="missing.*depth_head.norm.weight.*wrong shape.*register_token"):
        build_model("tiny", weights=tmp_path / "bad.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        read_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(InputError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty_dir") if (tmp_path / "empty_dir").mkdir() is None else None


def test_hub_id_offline_error_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="--weights"):
        resolve_checkpoint("facebook/VGGT-1B-not-cached")


def test_random_init_is_seeded():
    a = build_model("tiny", random_init=True, seed=3).state_dict()
    b = build_model("tiny", random_init=True, seed=3).state_dict()
    c = build_model("tiny", random_init=True, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["aggregator.frame_blocks.0.attn.qkv.weight"], c["aggregator.frame_blocks.0.attn.qkv.weight"])
