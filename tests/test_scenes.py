"""pcd_inference.py --scenes: many scene folders, one output folder each, serial / local processes / Ray actors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from test_pcd_inference import CLI, make_pku_scene

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["alpha", "bravo", "charlie"]
MODEL = ["--torch", "--model-name", "tiny", "--num-cams", "3", "--colmap-max-points", "0"]
SAME_BYTES = ["points.ply", "cameras.json", "sparse/0/cameras.txt", "sparse/0/images.txt", "sparse/0/points3D.txt",
              "images/cam001.png"]


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small scenes whose cameras differ (the cameras of each scene are a different slice of a rig)."""
    root = tmp_path_factory.mktemp("captures")
    rigs = [["cam001", "cam005", "cam012"], ["cam001", "cam012", "cam020"], ["cam001", "cam020", "cam024"]]
    for name, cams in zip(NAMES, rigs):
        make_pku_scene(root / name, cams, frames=1)
    return root


@pytest.fixture(scope="module")
def single_runs(captures: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name in NAMES:
        assert CLI.main(["--images", str(captures / name), *MODEL, "--out-dir", str(out / name)]) == 0
    return out


def assert_same_outputs(batch: Path, single: Path, exact: bool = True) -> None:
    for name in NAMES:
        for rel in SAME_BYTES if exact else SAME_BYTES[-1:]:
            assert (batch / name / rel).read_bytes() == (single / name / rel).read_bytes(), f"{name}/{rel}"
        with np.load(batch / name / "depth.npz") as a, np.load(single / name / "depth.npz") as b:
            for key in ("depth", "depth_conf", "extrinsic", "intrinsic"):
                if exact:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
                else:  # another process, another thread count: float sums may round differently
                    rel = np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
                    assert rel < 1e-5 and np.abs(a[key] - b[key]).max() < 1e-4, (name, key, rel)
            assert list(a["image_names"]) == list(b["image_names"])
        got, want = (json.loads((d / name / "summary.json").read_text()) for d in (batch, single))
        assert got["scene"]["views"] == want["scene"]["views"]
        if exact:
            assert got["points"] == want["points"]


def test_scenes_give_the_same_outputs_as_single_runs(captures: Path, single_runs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "batch"
    assert CLI.main(["--scenes", str(captures / "*"), *MODEL, "--out-dir", str(out)]) == 0
    assert_same_outputs(out, single_runs)
    summary = json.loads((out / "scenes.json").read_text())
    assert summary["ok"] == 3 and summary["failed"] == 0 and summary["workers"] == "serial (this process)"
    assert [r["scene"] for r in summary["results"]] == NAMES
    assert {r["worker"]["pid"] for r in summary["results"]} == {os.getpid()}  # one model, kept loaded
    assert "3 of 3 scenes" in capsys.readouterr().out


def test_a_failed_scene_is_reported_and_the_rest_go_on(captures: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "captures"
    for name in NAMES[:2]:
        (root / name).mkdir(parents=True)
        for f in (captures / name).rglob("*.jpg"):
            (root / name / f.relative_to(captures / name)).parent.mkdir(parents=True, exist_ok=True)
            (root / name / f.relative_to(captures / name)).write_bytes(f.read_bytes())
    broken = root / "broken" / "cam001"
    broken.mkdir(parents=True)
    (broken / "000000.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert CLI.main(["--scenes", str(root / "*"), *MODEL, "--out-dir", str(out)]) == 1
    summary = json.loads((out / "scenes.json").read_text())
    status = {r["scene"]: r["status"] for r in summary["results"]}
    assert status == {"alpha": "ok", "bravo": "ok", "broken": "failed"}
    failed = next(r for r in summary["results"] if r["scene"] == "broken")
    assert "InputError" in failed["error"] and "readable" in failed["error"]
    assert (out / "bravo" / "points.ply").is_file() and not (out / "broken" / "points.ply").exists()
    assert "broken" in capsys.readouterr().out


def test_scene_glob_errors(tmp_path: Path) -> None:
    from vggt_trt.errors import InputError
    from vggt_trt.pipelines.scenes import find_scenes

    with pytest.raises(InputError, match="matches no folder"):
        find_scenes(str(tmp_path / "nothing*"))
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x").mkdir(parents=True)
    with pytest.raises(InputError, match="same name"):
        find_scenes(str(tmp_path / "*" / "x"))
    with pytest.raises(SystemExit) as stop:  # contradictory flags: argparse's one line, before any work
        CLI.main(["--scenes", str(tmp_path / "*"), "--images", str(tmp_path), "--out-dir", str(tmp_path)])
    assert stop.value.code == 2


def test_two_local_worker_processes(captures: Path, single_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch"
    assert CLI.main(["--scenes", str(captures / "*"), *MODEL, "--workers", "2", "--out-dir", str(out)]) == 0
    assert_same_outputs(out, single_runs, exact=False)
    summary = json.loads((out / "scenes.json").read_text())
    assert summary["workers"] == "2 local processes" and summary["ok"] == 3
    pids = {r["worker"]["pid"] for r in summary["results"]}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # the first worker ready may take every scene


def test_ray_actors_one_logical_gpu_each(captures: Path, single_runs: Path, tmp_path: Path) -> None:
    """Ray declares two logical GPUs on this CPU machine: each actor sees exactly one id in CUDA_VISIBLE_DEVICES
    (its model still runs on the CPU, which is all this machine has)."""
    ray = pytest.importorskip("ray", reason="pip install -r requirements-scale.txt")
    from vggt_trt.pipelines.pcd import PcdOptions
    from vggt_trt.pipelines.scenes import find_scenes, run_scenes

    ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        template = PcdOptions(images=captures / NAMES[0], out_dir=tmp_path, model_name="tiny", num_cams=3,
                              colmap_max_points=0)
        summary = run_scenes(template, find_scenes(str(captures / "*")), tmp_path / "batch", ray_address="local")
    finally:
        ray.shutdown()
    assert summary["ok"] == 3 and summary["workers"] == "Ray (local): 2 actors, one GPU each", summary
    seen = {r["worker"]["pid"]: r["worker"]["gpus"] for r in summary["results"]}
    assert len(seen) == 2 and sorted(seen.values()) == ["0", "1"], seen
    assert_same_outputs(tmp_path / "batch", single_runs, exact=False)
