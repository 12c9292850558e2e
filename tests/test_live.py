"""Live loop: synthetic multi-camera videos -> tiny VGGT + tiny Depth Anything -> fused map (CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("cv2", reason="the live sources need OpenCV (requirements-live.txt)")
pytest.importorskip("transformers", reason="Depth Anything needs transformers (requirements-live.txt)")

from helpers import ReplayCapture, load_script, make_videos, replay_factory, replay_frames  # noqa: E402

from vggt_trt.pipelines.live import LiveOptions, LiveSession, VoxelMap, fit_scale_shift, run_live  # noqa: E402
from vggt_trt.views import ViewRange  # noqa: E402
from vggt_trt.recon.frames import frames_to_model_input  # noqa: E402
from vggt_trt.recon.pointcloud import read_ply  # noqa: E402
from vggt_trt.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


CLI = load_script("pcd_inference.py", "pcd_inference_live")
BASE = ["--torch", "--model-name", "tiny", "--depth_model", "tiny"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_videos(tmp_path_factory.mktemp("live") / "vids", cams=3, frames=6, short={1: 3})


def test_fit_scale_shift_is_robust() -> None:
    rng = np.random.default_rng(0)
    disp = rng.uniform(0.2, 2.0, 5000)
    target = 0.7 * disp + 0.05 + rng.normal(0, 0.002, disp.size)
    target[:600] = rng.uniform(0, 5, 600)  # 12 % gross outliers
    fit = fit_scale_shift(disp, target)
    assert fit.scale == pytest.approx(0.7, rel=0.01) and fit.shift == pytest.approx(0.05, abs=0.01)
    assert 0.6 < fit.inliers < 0.88 and fit.n == 5000  # Huber: full weight within 1.345 sigma


def test_voxel_map_merges_and_stays_bounded() -> None:
    vm = VoxelMap(0.1, max_voxels=3)
    pts = np.array([[0.01, 0, 0], [0.03, 0, 0], [0.5, 0, 0]], np.float32)
    assert vm.insert(pts, np.array([[0, 0, 0], [100, 100, 100], [9, 9, 9]], np.uint8), 0) == 2
    xyz, rgb, count = vm.points()
    assert len(vm) == 2 and xyz[0, 0] == pytest.approx(0.02) and rgb[0, 0] == 50 and count.tolist() == [2, 1]
    vm.insert(np.array([[1.5, 0, 0], [2.5, 0, 0]], np.float32), np.zeros((2, 3), np.uint8), 1)
    assert len(vm) == 3 and vm.evicted == 1  # the oldest, least observed voxel went
    assert 0.5 not in np.round(vm.points()[0][:, 0], 2)
    vm.insert(np.array([[1e9, 0, 0]], np.float32), np.zeros((1, 3), np.uint8), 2)
    assert vm.out_of_range == 1


def test_frames_to_model_input_crops_to_aspect_and_maps_pixels() -> None:
    import torch

    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, 32:] = 255  # right half white
    img, crops = frames_to_model_input(torch.from_numpy(frame)[None], 42, 42)
    assert img.shape == (1, 3, 42, 42) and img.max() <= 1
    (ax, ay), (bx, by) = crops[0].pixel_map
    assert ax == pytest.approx(42 / 48) and bx == pytest.approx(-8 * 42 / 48) and by == 0
    assert img[0, 0, :, 30].mean() == pytest.approx(1.0) and img[0, 0, :, 10].mean() == 0


def test_videos_live_run_calibrates_fuses_and_reuses(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run1"
    calib = tmp_path / "calib.json"
    rc = CLI.main(["--source", "videos", "--videos", str(videos), *BASE, "--max_batches", "4", "--min_cams", "2",
                   "--vggt_every", "2", "--per_camera_calib", str(calib), "--out_dir", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["batches"] == 4 and s["batches_per_s"] > 0
    # camera cam01's video has 3 frames: reported by name, the loop went on with the two others
    assert [(e["camera"], e["event"], e["batch"]) for e in s["source"]["events"]] == [("cam01", "ended", 3)]
    assert s["source"]["active"] == ["cam00", "cam02"]
    growth = s["map"]["voxels_per_batch"]
    assert len(growth) == 4 and growth == sorted(growth) and growth[-1] > growth[0] > 0
    for stage in ("read", "preprocess", "vggt", "depth", "fit", "unproject", "fuse"):
        assert s["latency_ms"][stage]["n"] >= 1, stage
    # the refresh at batch 2 ran beside the loop and was applied; one batched Depth Anything forward per batch
    assert [r["batch"] for r in s["vggt"]["runs"]] == [0, 2] and s["depth"]["workers"] == 1
    doc = json.loads(calib.read_text())
    assert doc["input_hw"] == [42, 56] and set(doc["cameras"]) == {"cam00", "cam01", "cam02"}
    fitted = {n: c for n, c in doc["cameras"].items() if c["scale"] is not None}
    assert fitted and all(c["scale"] > 0 and c["updates"] >= 1 for c in fitted.values())
    assert all(len(c["extrinsic"]) == 3 and len(c["intrinsic"]) == 3 for c in doc["cameras"].values())
    final = read_ply(out / "map.ply")
    assert final["xyz"].shape == (growth[-1], 3) and np.isfinite(final["xyz"]).all() and final["rgb"].dtype == np.uint8
    assert len(s["files"]["batches"]) == 4 and read_ply(s["files"]["batches"][0])["xyz"].shape[0] > 0
    assert json.loads((out / "cameras.json").read_text())["cameras"][0]["height"] == 42

    # second run: the stored calibration is reused (no VGGT bootstrap) and the first map seeds this one
    out2 = tmp_path / "run2"
    rc = CLI.main(["--source", "videos", "--videos", str(videos), *BASE, "--max_batches", "2", "--views",
                   "cam00,cam02", "--per_camera_calib", str(calib), "--initial_map", str(out / "map.ply"),
                   "--no_save_batches", "--out_dir", str(out2)])
    assert rc == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["vggt"]["runs"] == [] and "vggt" not in s2["latency_ms"]
    assert s2["map"]["voxels_per_batch"][0] >= growth[-1]  # seeded with the first run's map
    doc2 = json.loads(calib.read_text())
    for name in fitted:
        if name in ("cam00", "cam02"):
            assert doc2["cameras"][name]["scale"] == pytest.approx(fitted[name]["scale"])
            assert doc2["cameras"][name]["extrinsic"] == fitted[name]["extrinsic"]
    assert s2["files"]["batches"] == []


def test_camera_ending_early_stops_cleanly_when_all_needed(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_live(LiveOptions(source="videos", videos=videos, out_dir=out, model_name="tiny",
                                   depth_model="tiny", max_batches=10))
    assert summary["batches"] == 3  # cam01 ended after 3 frames; min_cams defaults to all cameras
    assert "cam01 (ended)" in summary["source"]["stop_reason"]
    assert read_ply(out / "map.ply")["xyz"].shape[0] == summary["map"]["voxels"] > 0


def test_webcams_with_replayed_captures_and_onnx_depth_workers(tmp_path: Path) -> None:
    from vggt_trt.pipelines.depth_anything import DepthSpec, convert_depth_anything
    from vggt_trt.pipelines.sources import parse_webcams

    depth_dir = tmp_path / "depth_anything"
    convert_depth_anything(DepthSpec("tiny", 1, 42, 56), depth_dir, ["fp32"], skip_build=True)
    caps = {"front": ReplayCapture(replay_frames(0), delay=0.005), "back": ReplayCapture(replay_frames(2), delay=0.005)}
    opts = LiveOptions(source="webcams", webcams=["front=0", "back=1"], out_dir=tmp_path / "out", model_name="tiny",
                       depth_engine_dir=depth_dir, depth_backend="onnx", depth_workers=1, max_batches=3)
    summary = run_live(opts, cameras=parse_webcams(opts.webcams), capture_factory=replay_factory(caps))
    assert summary["batches"] == 3 and summary["source"]["events"] == []
    assert summary["depth"]["workers"] == 1 and summary["depth"]["runner"]["backend"] == "onnx"
    assert summary["source"]["kind"] == "webcams" and summary["map"]["voxels"] > 0
    assert all(c.released.is_set() for c in caps.values())


def test_voxel_map_same_result_from_numpy_and_torch_inputs() -> None:
    import torch

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5000, 3)).astype(np.float32)
    cols = rng.integers(0, 255, size=(5000, 3)).astype(np.uint8)
    a, b = VoxelMap(0.25, max_voxels=400), VoxelMap(0.25, max_voxels=400)
    for batch in range(3):
        sl = slice(batch * 1500, batch * 1500 + 2000)
        a.insert(pts[sl], cols[sl], batch)
        b.insert(torch.from_numpy(pts[sl]), torch.from_numpy(cols[sl]), batch)
    assert len(a) == len(b) == 400 and a.evicted == b.evicted > 0
    for x, y in zip(a.points(), b.points()):
        np.testing.assert_array_equal(x, y)
    xyz, _, count = a.points()
    assert count.sum() <= 5000 and np.isfinite(xyz).all()


def test_batched_depth_equals_per_image_depth() -> None:
    import torch

    from vggt_trt.pipelines.depth_anything import DepthPool, depth_runner_factory

    images = torch.rand(5, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    with DepthPool(depth_runner_factory("tiny", random_init=True, device="cpu"), workers=1) as pool:
        batched = pool.infer(images)
        single = torch.cat([pool.infer(images[i:i + 1]) for i in range(len(images))])
        host = pool.infer(images.numpy())
    assert isinstance(batched, torch.Tensor) and batched.shape == (5, 42, 56)
    assert float((batched - single).norm() / single.norm()) <= 1e-5
    np.testing.assert_array_equal(host, batched.numpy())


def test_live_map_equals_the_batches_fused_one_by_one(tmp_path: Path) -> None:
    """The map the loop fuses on its device equals the per-batch clouds it wrote, fused in order the old way."""
    caps = {f"cam{i}": ReplayCapture(replay_frames(i)) for i in range(3)}
    from vggt_trt.pipelines.sources import CameraSpec

    cams = [CameraSpec(n, i, live=False) for i, n in enumerate(caps)]
    opts = LiveOptions(source="webcams", out_dir=tmp_path / "out", model_name="tiny", depth_model="tiny",
                       depth_random_init=True, max_batches=4, voxel_size=0.05, conf_percentile=0.0)
    s = run_live(opts, cameras=cams, capture_factory=replay_factory(caps))
    batches = [read_ply(p) for p in s["files"]["batches"]]
    assert len(batches) == 4 and all(len(b["xyz"]) for b in batches)
    old = VoxelMap(s["map"]["voxel_size"], max_voxels=opts.max_voxels)
    for i, b in enumerate(batches):
        old.insert(b["xyz"], b["rgb"], i)
    final = read_ply(tmp_path / "out" / "map.ply")
    xyz, rgb, _ = old.points()
    assert len(old) == s["map"]["voxels"] == len(final["xyz"])
    np.testing.assert_allclose(final["xyz"], xyz, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(final["rgb"], rgb)


def test_batched_unprojection_equals_the_per_camera_loop() -> None:
    import torch

    from vggt_trt.pipelines.live import CameraCalib, LiveSession
    from vggt_trt.recon import geometry as geo
    from vggt_trt.recon.pointcloud import colors_from_images

    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    session = LiveSession.__new__(LiveSession)
    session.o = LiveOptions(source="webcams", out_dir=Path("unused"), pixel_stride=2)
    session.st = type("S", (), {"calibs": {}})()
    for i, n in enumerate(names[:2]):  # camera "c" has no fit yet: it must be left out
        extr = np.concatenate([np.eye(3), rng.normal(size=(3, 1))], 1)
        intr = np.array([[30.0, 0, 28], [0, 30, 21], [0, 0, 1]])
        session.st.calibs[n] = CameraCalib(scale=0.5 + i, shift=0.1, max_depth=4.0 if i else None,
                                           extrinsic=extr.tolist(), intrinsic=intr.tolist())
    images = torch.rand(3, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    disp = torch.rand(3, 42, 56, generator=torch.Generator().manual_seed(3)) * 2
    xyz, rgb = session._points(names, images, disp)
    ref_xyz, ref_rgb = [], []
    colours = colors_from_images(images)
    for i, n in enumerate(names[:2]):  # the pre-batching loop, one camera at a time
        c = session.st.calibs[n]
        inv = c.scale * disp[i] + c.shift
        depth = torch.where(inv > 1e-6, 1.0 / inv.clamp(min=1e-6), torch.full_like(inv, float("nan")))
        if c.max_depth:
            depth = torch.where(depth > c.max_depth, torch.full_like(depth, float("nan")), depth)
        world = geo.unproject_depth_map_to_point_map(depth[None], torch.tensor(c.extrinsic, dtype=torch.float32)[None],
                                                     torch.tensor(c.intrinsic, dtype=torch.float32)[None])[0]
        world, col = world[::2, ::2].reshape(-1, 3), colours[i, ::2, ::2].reshape(-1, 3)
        ok = torch.isfinite(world).all(dim=1)
        ref_xyz.append(world[ok])
        ref_rgb.append(col[ok])
    assert torch.equal(xyz, torch.cat(ref_xyz)) and torch.equal(rgb, torch.cat(ref_rgb))
    assert len(xyz) < 2 * 21 * 28  # the max-depth cut of camera "b" removed points


def test_a_camera_that_stalls_mid_run_is_dropped_by_name_and_the_loop_goes_on(tmp_path: Path) -> None:
    from vggt_trt.pipelines.sources import CameraSpec

    caps = {"left": ReplayCapture(replay_frames(0)), "mid": ReplayCapture(replay_frames(1), stall_after=2),
            "right": ReplayCapture(replay_frames(2))}
    cams = [CameraSpec(n, i, live=False) for i, n in enumerate(caps)]
    opts = LiveOptions(source="webcams", out_dir=tmp_path / "out", model_name="tiny", depth_model="tiny",
                       depth_random_init=True, max_batches=5, min_cams=2, stall_timeout=1.0, save_batches=False)
    s = run_live(opts, cameras=cams, capture_factory=replay_factory(caps))
    assert s["batches"] == 5
    assert [(e["camera"], e["event"]) for e in s["source"]["events"]] == [("mid", "stalled")]
    assert s["source"]["active"] == ["left", "right"] and s["map"]["voxels"] > 0
    assert s["latency_ms"]["batch"]["n"] == 5 and s["memory_mib"]["end"]["host_rss_mib"] > 0


def test_prefetcher_hands_errors_to_the_consumer_and_stops() -> None:
    from vggt_trt.pipelines.background import Prefetcher

    def items():
        yield 1
        yield 2
        raise OSError("camera unplugged")

    got = []
    with pytest.raises(OSError, match="unplugged"), Prefetcher(items(), lambda x: x * 10, depth=1) as batches:
        for item, prepared in batches:
            got.append((item, prepared))
    assert got == [(1, 10), (2, 20)]


def test_live_loop_publishes_the_growing_map_and_active_cameras_to_the_viewer(tmp_path: Path) -> None:
    pytest.importorskip("viser", reason="the viewer needs viser (requirements-view.txt)")
    from vggt_trt.pipelines.sources import CameraSpec
    from vggt_trt.view.live import LiveViewer

    caps = {f"cam{i}": ReplayCapture(replay_frames(i)) for i in range(3)}
    cams = [CameraSpec(n, i, live=False) for i, n in enumerate(caps)]
    published: list[int] = []
    with LiveViewer(port=0, max_points=10**7, max_rate_hz=None) as viewer:  # every batch (no rate limit)
        publish = viewer.publish_map
        viewer.publish_map = lambda xyz, rgb: (published.append(len(xyz)), publish(xyz, rgb))
        opts = LiveOptions(source="webcams", out_dir=tmp_path / "out", model_name="tiny", depth_model="tiny",
                           depth_random_init=True, max_batches=4, save_batches=False, viewer=viewer)
        s = run_live(opts, cameras=cams, capture_factory=replay_factory(caps))
        assert viewer.wait_idle(10)
        stats = viewer.stats()
    assert published == s["map"]["voxels_per_batch"] and published == sorted(published) and published[-1] > published[0]
    assert stats["served_points"] == published[-1] and stats["served_cameras"] == 3 and stats["error"] is None


def test_live_fit_call_site_recovers_scale_and_shift_from_vggt_depth() -> None:
    """LiveSession._fit fits 1/depth against the disparity: a disparity made from known (scale, shift)
    must give them back exactly (the fit, the EMA start and the depth range are checked by value)."""
    from vggt_trt.pipelines.live import LiveSession

    rng = np.random.default_rng(4)
    depth = rng.uniform(1.0, 5.0, size=(2, 42, 56))
    truth = [(0.5, 0.05), (2.0, -0.1)]
    disp = np.stack([(1.0 / depth[i] - shift) / scale for i, (scale, shift) in enumerate(truth)])
    session = LiveSession.__new__(LiveSession)
    session.o = LiveOptions(source="webcams", out_dir=Path("unused"), conf_percentile=0.0, ema=0.3)
    session.st = type("S", (), {"calibs": {}})()
    ref = {"extr": np.zeros((2, 3, 4)), "intr": np.zeros((2, 3, 3)), "depth": depth,
           "conf": np.ones((2, 42, 56)), "stored": False}
    session._fit(["a", "b"], disp, ref)
    for name, (scale, shift) in zip("ab", truth):
        c = session.st.calibs[name]
        assert c.scale == pytest.approx(scale, rel=1e-9) and c.shift == pytest.approx(shift, abs=1e-9)
        assert c.updates == 1 and c.median_depth == pytest.approx(float(np.median(depth["ab".index(name)])))


def test_a_live_run_owns_its_outputs_and_a_run_that_reads_nothing_changes_nothing(tmp_path: Path) -> None:
    """Outputs of an earlier run (a longer live run's batches, an images run's cloud) move aside before the
    first write; the user's files stay; a run that fails before writing leaves the folder as it was."""
    from vggt_trt.pipelines.sources import CameraSpec

    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    (out / "batches" / "batch_00099.ply").write_text("earlier")
    (out / "points.ply").write_text("earlier")
    (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    cams = [CameraSpec(f"cam{i}", i, live=False) for i in range(2)]
    opts = LiveOptions(source="webcams", out_dir=out, model_name="tiny", depth_model="tiny", depth_random_init=True,
                       max_batches=2, stall_timeout=1.0)
    with pytest.raises(InputError, match="no batch was read"):
        failing = {c.name: ReplayCapture(replay_frames(0), fail_after=0) for c in cams}
        run_live(opts, cameras=cams, capture_factory=replay_factory(failing))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before

    caps = {c.name: ReplayCapture(replay_frames(i)) for i, c in enumerate(cams)}
    s = run_live(opts, cameras=cams, capture_factory=replay_factory(caps))
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["batch_00000.ply", "batch_00001.ply"]
    assert not (out / "points.ply").exists() and (out / "notes.txt").read_text() == "mine"
    moved = s["output_folder"]
    assert moved["moved_aside"] == ["batches", "points.ply"]
    aside = Path(moved["moved_aside_to"])
    assert aside.parent == out and aside.name.startswith(".replaced-live-")
    assert (aside / "batches" / "batch_00099.ply").read_text() == "earlier"
    assert (aside / "points.ply").read_text() == "earlier"


@pytest.mark.parametrize("views, cameras_left, runs", [
    (ViewRange(3, 3, 3), 2, False), (ViewRange(2, 3, 5), 1, False), (ViewRange(2, 3, 5), 2, True), (None, 1, True)])
def test_vggt_refresh_runs_only_for_a_camera_count_the_model_takes(views, cameras_left: int, runs: bool) -> None:
    class Model:
        backend = "torch"

        def input_metadata(self):
            return [SimpleNamespace(name="images", shape=(None if views is None or views.min != views.max else views.min,
                                                          3, 28, 28))]

        def view_range(self):
            return views

        def infer(self, feed):
            raise RuntimeError("ran")

    session = SimpleNamespace(vggt=Model())
    names = [f"cam{i}" for i in range(cameras_left)]
    if runs:
        with pytest.raises(RuntimeError, match="ran"):
            LiveSession._vggt(session, names, None, [], 7)
    else:
        assert LiveSession._vggt(session, names, None, [], 7) is None
