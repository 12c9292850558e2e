"""vggt_trt.view: reading output folders, the served scene and its sliders, live latest-wins publishing (CPU)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_trt.errors import InputError, MissingDependencyError
from vggt_trt.recon.pointcloud import write_cameras_json, write_ply
from vggt_trt.view.live import Mailbox
from vggt_trt.view.scene import load_scene, subsample_indices

N_POINTS = 5000


def make_output_folder(root: Path, n: int = N_POINTS, cams: int = 3, alignment: bool = False) -> Path:
    """A folder laid out as pcd_inference.py writes it: points.ply, cameras.json, images/, summary.json."""
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(n, 3)).astype(np.float32) + np.array([0, 0, 4], np.float32)
    write_ply(root / "points.ply", xyz, rng.integers(0, 255, (n, 3), dtype=np.uint8), np.arange(n, dtype=np.float32))
    extr = np.tile(np.eye(4)[:3], (cams, 1, 1))
    extr[:, 0, 3] = np.arange(cams) * -0.5
    intr = np.tile(np.array([[50.0, 0, 28], [0, 50.0, 21], [0, 0, 1]]), (cams, 1, 1))
    names = [f"cam{i:03d}.png" for i in range(cams)]
    write_cameras_json(root / "cameras.json", extr, intr, names, (42, 56))
    (root / "images").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((42, 56, 3), 60 * i, np.uint8)).save(root / "images" / name)
    summary = {"frame": "rig (known poses)" if alignment else "VGGT (first camera = world, scale-normalised)",
               "alignment": {"source": "poses.json", "scale": 2.5, "residual_rms": 1e-5,
                             "residual_per_camera": {n[:-4]: 1e-5 for n in names}} if alignment else None}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_subsample_indices_even_and_deterministic() -> None:
    assert subsample_indices(10, 20).tolist() == list(range(10))
    idx = subsample_indices(1000, 100)
    assert idx.size == 100 and idx[0] == 0 and idx[-1] == 999 and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, subsample_indices(1000, 100))
    with pytest.raises(InputError, match="budget"):
        subsample_indices(10, 0)


def test_load_scene(tmp_path: Path) -> None:
    root = make_output_folder(tmp_path / "out", alignment=True)
    scene = load_scene(root, max_points=1000)
    assert scene.xyz.shape == (1000, 3) and scene.rgb.shape == (1000, 3) and scene.points_in_file == N_POINTS
    assert scene.conf is not None and scene.conf[0] == 0 and scene.conf[-1] == N_POINTS - 1
    assert [c.name for c in scene.cameras] == ["cam000.png", "cam001.png", "cam002.png"]
    assert all(c.image is not None and c.image.is_file() for c in scene.cameras)
    assert scene.cameras[0].fov_y == pytest.approx(2 * np.arctan(21 / 50)) and scene.cameras[0].aspect == 56 / 42
    assert scene.alignment["scale"] == 2.5 and scene.frame == "rig (known poses)"
    assert load_scene(root).xyz.shape == (N_POINTS, 3)


def test_load_scene_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_scene(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="missing points.ply, cameras.json"):
        load_scene(tmp_path / "empty")


def test_missing_viser_names_the_requirements_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from vggt_trt.view.server import require_viser

    monkeypatch.setitem(sys.modules, "viser", None)
    with pytest.raises(MissingDependencyError, match="pip install -r requirements-view.txt"):
        require_viser()


def test_mailbox_keeps_only_the_latest_while_the_consumer_is_stalled() -> None:
    box, taken, release, got = Mailbox(), threading.Event(), threading.Event(), []

    def consumer() -> None:
        while not box.closed:
            items = box.take(timeout=1)
            got.append(items)
            taken.set()
            if len(got) == 1:
                release.wait(10)  # a browser that stops reading
            box.done()

    t = threading.Thread(target=consumer)
    t.start()
    box.put("map", 0)
    assert taken.wait(10) and not box.wait_idle(0.05)  # the consumer took item 0 and is stuck on it
    for i in range(1, 101):
        box.put("map", i)
    box.put("cameras", "c")
    assert box.put_count == 102 and box.dropped == 99  # 100 maps queued behind the stall: only the last kept
    release.set()
    assert box.wait_idle(10)
    box.close()
    t.join(5)
    assert got[0] == {"map": 0} and got[1] == {"map": 100, "cameras": "c"}


viser = pytest.importorskip("viser", reason="viewer tests need viser: pip install -r requirements-view.txt")


def test_scene_view_confidence_slider(tmp_path: Path) -> None:
    from vggt_trt.view.server import SceneView, start_server

    server = start_server("127.0.0.1", 0)
    try:
        view = SceneView(server, load_scene(make_output_folder(tmp_path / "out"), max_points=2000))
        assert view.shown == 2000 and len(view.frusta) == 3
        view.conf_slider.value = 75.0  # on_update runs the redraw
        assert view.shown == pytest.approx(500, abs=2)
        assert view.cloud.points.shape == (view.shown, 3)
        assert f"{view.shown:,} shown of 2,000 loaded (5,000 in file)" in view.points_text.content
    finally:
        server.stop()


def test_live_viewer_served_points_grow() -> None:
    from vggt_trt.view.live import LiveViewer

    with LiveViewer(port=0, max_points=3000) as live:
        served = []
        rng = np.random.default_rng(0)
        for batch in range(1, 6):
            n = 800 * batch
            live.publish_map(rng.normal(size=(n, 3)).astype(np.float32), rng.random((n, 3)).astype(np.float32))
            assert live.wait_idle(10)
            served.append(live.stats()["served_points"])
        assert served == [800, 1600, 2400, 3000, 3000]  # the last two hit the budget
        k = np.array([[50.0, 0, 28], [0, 50, 21], [0, 0, 1]])
        live.set_cameras(np.tile(np.eye(4)[:3], (2, 1, 1)), np.stack([k, k]), ["a", "b"], [True, False])
        assert live.wait_idle(10)
        stats = live.stats()
        assert stats["served_cameras"] == 2 and stats["error"] is None and stats["published"] == 6
        with pytest.raises(InputError, match="both be"):
            live.publish_map(np.zeros((4, 3)), np.zeros((5, 3)))


def test_cli_rejects_bad_folders_and_budgets(tmp_path: Path) -> None:
    from vggt_trt.cli.view import build_parser, main

    args = build_parser().parse_args([str(tmp_path)])
    assert args.host == "127.0.0.1" and args.port == 8080 and args.max_points == 1_000_000
    assert build_parser().parse_args([str(tmp_path), "--max_points", "5"]).max_points == 5  # hidden alias
    import argparse

    from vggt_trt.cli.view import add_viewer_address

    other = argparse.ArgumentParser()
    add_viewer_address(other, "viewer-")  # what pcd_inference.py --viewer will use
    assert vars(other.parse_args(["--viewer-port", "9000"])) == {"viewer_host": "127.0.0.1", "viewer_port": 9000}
    assert main([str(tmp_path / "nowhere"), "--port", "0"]) == 2
    with pytest.raises(SystemExit) as stop:  # a flag out of range: argparse's one line, before any work
        main([str(make_output_folder(tmp_path / "out")), "--max-points", "0"])
    assert stop.value.code == 2


def test_cli_serves_the_folder_on_localhost_until_ctrl_c(tmp_path: Path) -> None:
    import os
    import re
    import signal
    import subprocess
    import urllib.request

    root = make_output_folder(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "vggt_trt.view", str(root), "--port", "0", "--max-points", "100"],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        url, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
            url = url or (m.group(1) if (m := re.search(r"viewer at (http://\S+)", line)) else None)
        assert url and url.startswith("http://127.0.0.1:"), lines
        assert "100 points, 3 cameras" in lines[-1]
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_live_subsample_of_tensors_matches_numpy() -> None:
    import torch

    from vggt_trt.view.live import LiveViewer

    with LiveViewer(port=0, max_points=700) as live:
        pts = torch.arange(3000 * 3, dtype=torch.float32).reshape(3000, 3)
        live.publish_map(pts, torch.zeros(3000, 3, dtype=torch.uint8))
        pts.zero_()  # the caller may reuse its buffers at once
        assert live.wait_idle(10)
        expected = np.arange(3000 * 3, dtype=np.float32).reshape(3000, 3)[subsample_indices(3000, 700)]
        assert live.stats()["served_points"] == 700 and np.array_equal(live.cloud.points, expected)


def test_pcd_inference_viewer_serves_the_result_until_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import urllib.request

    from test_pcd_inference import CLI, make_pku_scene

    scene = make_pku_scene(tmp_path / "scene")
    assert CLI.main(["--source", "videos", "--videos", str(scene), "--viewer", "--out-dir", str(tmp_path / "v")]) == 2
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "pcd_inference.py"), "--images", str(scene), "--torch",
                             "--model-name", "tiny", "--num-cams", "4", "--out-dir", str(tmp_path / "out"),
                             "--viewer", "--viewer-port", "0"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("viewer: "):
                break
        assert lines and lines[-1].startswith("viewer: http://127.0.0.1:"), lines
        assert (tmp_path / "out" / "points.ply").is_file()  # written before anything is served
        with urllib.request.urlopen(lines[-1].split()[1], timeout=10) as page:
            assert page.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _sigint_as_in_a_terminal() -> None:
    """A shell's background job inherits SIGINT ignored; the user's terminal delivers it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_serving_sets_the_stop_event_and_the_handler_is_restored() -> None:
    """A Ctrl-C that lands while the server is still starting must not leave its threads running."""
    import os
    import signal
    import threading

    from vggt_trt.view.server import ctrl_c_sets

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_sets(threading.Event()) as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted.wait(5)
    assert signal.getsignal(signal.SIGINT) is before


def test_live_viewer_takes_offered_maps_at_its_rate_and_flushes_the_newest() -> None:
    from vggt_trt.view.live import LiveViewer

    snapshots = []

    def offer(n: int):
        def snapshot():
            snapshots.append(n)
            return np.full((n, 3), 0.5, np.float32), np.zeros((n, 3), np.uint8)
        return snapshot

    with LiveViewer(port=0, max_points=10**6, max_rate_hz=0.5) as live:
        assert live.offer_map(offer(10)) is True
        assert live.offer_map(offer(20)) is False and live.offer_map(offer(30)) is False
        assert snapshots == [10]  # held-back snapshots are never taken, only the newest on flush
        assert live.wait_idle(10)
        assert snapshots == [10, 30] and live.stats()["served_points"] == 30
        assert live.stats()["deferred_offers"] == 2
        assert live.offer_map(offer(40)) is False  # the flush restarted the interval
    with pytest.raises(InputError, match="max_rate_hz"):
        LiveViewer(port=0, max_rate_hz=0)
