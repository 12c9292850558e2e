"""Frame sources: lock-step batches from image folders, videos and (replayed) webcams; ended/stalled cameras."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vggt_trt.errors import InputError, MissingDependencyError
from vggt_trt.pipelines.sources import (CameraSpec, LockstepSource, discover_videos, image_folder_cameras, make_cameras,
                              parse_webcams, select_cameras)

FOCAL, W, H = 50.0, 64, 48


def _texture(seed: int = 3, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tex = np.kron(rng.integers(0, 255, (16, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    tex[..., 0] = (tex[..., 0].astype(int) + 40 * np.sin(xx / 7.0)).clip(0, 255).astype(np.uint8)
    return tex


def camera_pose(cam: int, frame: int) -> np.ndarray:
    """Cam-from-world [3, 4]: cameras on a line, yawed towards the centre, drifting slowly over time."""
    yaw = (cam - 1) * -0.08
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    centre = np.array([0.5 * (cam - 1) + 0.02 * frame, 0.0, 0.0])
    return np.concatenate([rot, (-rot @ centre)[:, None]], 1)


def render(cam: int, frame: int, tex: np.ndarray) -> np.ndarray:
    """RGB view of a textured plane Z = 4 (spanning [-3, 3]^2) through a pinhole camera."""
    import cv2

    k = np.array([[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1]])
    e = camera_pose(cam, frame)
    tex_to_plane = np.array([[6 / tex.shape[1], 0, -3], [0, 6 / tex.shape[0], -3], [0, 0, 1]])
    hom = k @ np.stack([e[:, 0], e[:, 1], 4 * e[:, 2] + e[:, 3]], 1) @ tex_to_plane
    return cv2.warpPerspective(tex, hom, (W, H), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90))


def make_videos(root: Path, cams: int = 3, frames: int = 6, short: dict[int, int] | None = None,
                layout: str = "files") -> Path:
    """``cam00.mp4 ...`` (or ``cam00/video.mp4`` with layout="folders"); ``short`` = {camera: frame count}."""
    import cv2

    tex = _texture()
    root.mkdir(parents=True, exist_ok=True)
    for c in range(cams):
        path = root / f"cam{c:02d}.mp4" if layout == "files" else root / f"cam{c:02d}" / "video.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
        assert writer.isOpened(), "OpenCV cannot write mp4v here"
        for f in range((short or {}).get(c, frames)):
            writer.write(np.ascontiguousarray(render(c, f, tex)[..., ::-1]))
        writer.release()
    return root


class ReplayCapture:
    """A webcam stand-in: replays frames (BGR) with an optional delay; can disconnect or stall."""

    def __init__(self, frames: list[np.ndarray], delay: float = 0.0, fail_after: int | None = None,
                 stall_after: int | None = None) -> None:
        self.frames, self.delay, self.fail_after, self.stall_after = frames, delay, fail_after, stall_after
        self.pos, self.released = 0, threading.Event()

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError("USB device unplugged")
        if self.stall_after is not None and self.pos >= self.stall_after:
            self.released.wait(10)  # a hung driver: returns only when released
            return False, None
        time.sleep(self.delay)
        frame = self.frames[self.pos % len(self.frames)]
        self.pos += 1
        return True, frame

    def release(self) -> None:
        self.released.set()


def replay_factory(captures: dict[str, ReplayCapture]):
    return lambda spec: captures[spec.name]


def _frames(cam: int, n: int = 4) -> list[np.ndarray]:
    tex = _texture()
    return [np.ascontiguousarray(render(cam, f, tex)[..., ::-1]) for f in range(n)]


def test_parse_webcams_and_selection() -> None:
    cams = parse_webcams(["front=0", "back=1", "2", "door=rtsp://x/stream"])
    assert [c.name for c in cams] == ["front", "back", "webcam2", "door"]
    assert cams[0].target == 0 and cams[3].target == "rtsp://x/stream" and all(c.live for c in cams)
    with pytest.raises(InputError, match="twice"):
        parse_webcams(["a=0", "a=1"])
    assert [c.name for c in select_cameras(cams, num_cams=2)] == ["front", "back"]
    assert [c.name for c in select_cameras(cams, views=["door", "back"])] == ["door", "back"]
    picked = select_cameras(cams, random_views=2, seed=1)
    assert len(picked) == 2 and picked == select_cameras(cams, random_views=2, seed=1)
    with pytest.raises(InputError, match="not found"):
        select_cameras(cams, views=["nope"])
    with pytest.raises(InputError, match="only 4 cameras"):
        select_cameras(cams, num_cams=5)


def test_webcams_lockstep_with_replayed_captures() -> None:
    caps = {c: ReplayCapture(_frames(i), delay=0.002) for i, c in enumerate(("front", "back"))}
    cams = parse_webcams(["front=0", "back=1"])
    with LockstepSource(cams, max_batches=5, capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert len(batches) == 5 and src.stop_reason == "max_batches (5) reached"
    for b in batches:
        assert b.names == ["front", "back"]
        assert b.frames["front"].image.shape == (H, W, 3) and b.frames["front"].image.dtype == np.uint8
        assert b.skew_ms < 1000
    assert all(c.released.is_set() for c in caps.values())
    # RGB out (captures give BGR)
    np.testing.assert_array_equal(batches[0].frames["back"].image, _frames(1)[0][..., ::-1])


def test_disconnect_continues_with_rest_then_stops_cleanly() -> None:
    caps = {"a": ReplayCapture(_frames(0)), "b": ReplayCapture(_frames(1), fail_after=3),
            "c": ReplayCapture(_frames(2))}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    with LockstepSource(cams, max_batches=8, min_cams=2, capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert len(batches) == 8
    assert [e.camera for e in src.events] == ["b"] and src.events[0].event == "disconnected"
    assert "unplugged" in src.events[0].reason and batches[-1].names == ["a", "c"]
    # with min_cams = all, the first camera lost stops the loop (no hang)
    caps = {"a": ReplayCapture(_frames(0)), "b": ReplayCapture(_frames(1), fail_after=2)}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    with LockstepSource(cams, max_batches=8, capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert len(batches) == 2 and "only 1 cameras delivered" in src.stop_reason and "b (disconnected)" in src.stop_reason


def test_stalled_camera_is_dropped_by_timeout() -> None:
    caps = {"a": ReplayCapture(_frames(0)), "b": ReplayCapture(_frames(1), stall_after=2)}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    t0 = time.monotonic()
    with LockstepSource(cams, max_batches=4, min_cams=1, stall_timeout=0.3,
                        capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert time.monotonic() - t0 < 5
    assert len(batches) == 4 and src.events[0].camera == "b" and src.events[0].event == "stalled"
    assert batches[-1].names == ["a"]


def test_live_queue_is_bounded_and_keeps_fresh_frames() -> None:
    caps = {"a": ReplayCapture(_frames(0, 2))}
    cams = [CameraSpec("a", 0, live=True)]
    with LockstepSource(cams, max_batches=2, queue_size=2, capture_factory=replay_factory(caps)) as src:
        it = iter(src)
        next(it)
        time.sleep(0.2)  # the reader runs ahead; the queue stays at 2 frames
        assert src._readers["a"].queue.qsize() <= 2
        second = next(it)
    assert second.frames["a"].index > 1 and src.report()["frames_dropped"]["a"] > 0


def test_videos_lockstep_frame_step_and_early_end(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    root = make_videos(tmp_path / "vids", cams=3, frames=7, short={1: 3})
    cams = discover_videos(root)
    assert [c.name for c in cams] == ["cam00", "cam01", "cam02"] and not cams[0].live
    with LockstepSource(cams, frame_step=2, min_cams=2) as src:
        batches = list(src)
    # frames 0, 2, 4, 6 of the long videos; cam01 (3 frames: 0, 2) ends at batch 2
    assert [b.frames["cam00"].index for b in batches] == [0, 2, 4, 6]
    assert [b.names for b in batches][1:3] == [["cam00", "cam01", "cam02"], ["cam00", "cam02"]]
    assert src.events[0].camera == "cam01" and src.events[0].event == "ended" and src.events[0].batch == 2
    assert src.stop_reason.startswith("only 0 cameras")
    assert batches[1].frames["cam00"].media_time_s == pytest.approx(0.2, abs=0.05)


def test_video_folders_and_image_folders(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    from PIL import Image

    root = make_videos(tmp_path / "vids", cams=2, frames=2, layout="folders")
    assert [c.name for c in make_cameras("videos", videos=root)] == ["cam00", "cam01"]
    with pytest.raises(InputError, match="no videos"):
        discover_videos(tmp_path)
    scene = tmp_path / "scene"
    for c in range(2):
        (scene / f"cam{c:03d}").mkdir(parents=True)
        for f in range(3):
            Image.fromarray(render(c, f, _texture())).save(scene / f"cam{c:03d}" / f"{f:06d}.png")
    cams = image_folder_cameras(scene)
    with LockstepSource(cams, max_batches=2) as src:
        batches = list(src)
    assert len(batches) == 2 and batches[1].frames["cam001"].index == 1
    np.testing.assert_array_equal(batches[0].frames["cam000"].image, render(0, 0, _texture()))


def test_missing_opencv_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(MissingDependencyError, match="opencv-python-headless"):
        make_cameras("videos", videos=tmp_path)
    with pytest.raises(InputError, match="needs --webcams"):
        make_cameras("webcams")
