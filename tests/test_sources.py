"""Frame sources: lock-step batches from image folders, videos and (replayed) webcams; ended/stalled cameras."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from vggt_trt.errors import InputError, MissingDependencyError
from vggt_trt.pipelines.sources import (CameraSpec, LockstepSource, discover_videos, image_folder_cameras, make_cameras,
                              parse_webcams, select_cameras)

from helpers import H, W, ReplayCapture, make_videos, render, replay_factory, replay_frames, texture

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
    caps = {c: ReplayCapture(replay_frames(i), delay=0.002) for i, c in enumerate(("front", "back"))}
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
    np.testing.assert_array_equal(batches[0].frames["back"].image, replay_frames(1)[0][..., ::-1])


def test_disconnect_continues_with_rest_then_stops_cleanly() -> None:
    caps = {"a": ReplayCapture(replay_frames(0)), "b": ReplayCapture(replay_frames(1), fail_after=3),
            "c": ReplayCapture(replay_frames(2))}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    with LockstepSource(cams, max_batches=8, min_cams=2, capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert len(batches) == 8
    assert [e.camera for e in src.events] == ["b"] and src.events[0].event == "disconnected"
    assert "unplugged" in src.events[0].reason and batches[-1].names == ["a", "c"]
    # with min_cams = all, the first camera lost stops the loop (no hang)
    caps = {"a": ReplayCapture(replay_frames(0)), "b": ReplayCapture(replay_frames(1), fail_after=2)}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    with LockstepSource(cams, max_batches=8, capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert len(batches) == 2 and "only 1 cameras delivered" in src.stop_reason and "b (disconnected)" in src.stop_reason


def test_stalled_camera_is_dropped_by_timeout() -> None:
    caps = {"a": ReplayCapture(replay_frames(0)), "b": ReplayCapture(replay_frames(1), stall_after=2)}
    cams = [CameraSpec(n, i, live=True) for i, n in enumerate(caps)]
    t0 = time.monotonic()
    with LockstepSource(cams, max_batches=4, min_cams=1, stall_timeout=0.3,
                        capture_factory=replay_factory(caps)) as src:
        batches = list(src)
    assert time.monotonic() - t0 < 5
    assert len(batches) == 4 and src.events[0].camera == "b" and src.events[0].event == "stalled"
    assert batches[-1].names == ["a"]


def test_live_queue_is_bounded_and_keeps_fresh_frames() -> None:
    caps = {"a": ReplayCapture(replay_frames(0, 2))}
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
            Image.fromarray(render(c, f, texture())).save(scene / f"cam{c:03d}" / f"{f:06d}.png")
    cams = image_folder_cameras(scene)
    with LockstepSource(cams, max_batches=2) as src:
        batches = list(src)
    assert len(batches) == 2 and batches[1].frames["cam001"].index == 1
    np.testing.assert_array_equal(batches[0].frames["cam000"].image, render(0, 0, texture()))


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
