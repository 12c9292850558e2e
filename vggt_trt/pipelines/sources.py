"""Frame sources for the live pipeline: image folders, videos and webcams behind one capture interface.

Every camera is read by its own thread into a bounded queue; :class:`LockstepSource` takes one frame
from every camera per batch (lock-step), so memory stays flat however long the run. A capture is any
object with OpenCV's ``VideoCapture`` shape: ``isOpened()``, ``read() -> (ok, BGR uint8 array)``,
``release()`` (``get(prop)`` optional). :func:`open_capture` makes the real ones (PIL for image folders,
OpenCV for videos and webcams); tests inject their own through ``capture_factory``.

Camera events: a camera whose capture ends (``read`` returns ``ok=False`` on a file), stalls (no frame
within ``stall_timeout`` seconds) or disconnects (``read`` raises, or fails ``max_read_failures`` times
in a row on a live device) is reported by name and dropped; the batch loop goes on with the others while
at least ``min_cams`` remain, otherwise it stops cleanly with a reason. No call waits without a timeout.

Files are read without dropping frames (the reader waits for room in its queue); live devices keep only
the freshest frames (the oldest queued frame is dropped), so a slow consumer sees recent images.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..recon.preprocess import load_image
from ..recon.rig import Scene, candidate_views, discover_scene

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg")
SOURCES = ("images", "videos", "webcams")


class Capture(Protocol):
    """What a reader needs from a capture (OpenCV ``VideoCapture`` has this shape)."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's spelling

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class CameraSpec:
    """One camera: its name and what to open (a video path, a device index or URL, or a list of frame files)."""

    name: str
    target: Any
    live: bool = False


@dataclass
class Frame:
    """One frame of one camera: RGB uint8 ``[H, W, 3]``, the camera's frame index and capture time."""

    camera: str
    index: int
    timestamp: float  # time.time() when the frame was read
    image: np.ndarray
    media_time_s: float | None = None  # position in the video, when the capture reports it


@dataclass
class CameraEvent:
    camera: str
    event: str  # ended | stalled | disconnected | failed_to_open
    batch: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"camera": self.camera, "event": self.event, "batch": self.batch, "reason": self.reason}


@dataclass
class Batch:
    """Frames of the active cameras taken together; ``skew_ms`` is the spread of their capture times."""

    index: int
    frames: dict[str, Frame]
    dropped: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.frames)

    @property
    def timestamp(self) -> float:
        return float(np.mean([f.timestamp for f in self.frames.values()]))

    @property
    def skew_ms(self) -> float:
        ts = [f.timestamp for f in self.frames.values()]
        return (max(ts) - min(ts)) * 1e3 if ts else 0.0


def require_cv2() -> Any:
    """Import OpenCV or raise MissingDependencyError saying how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError("video and webcam sources need OpenCV: pip install opencv-python-headless "
                                     "(or opencv-python); see requirements-live.txt") from exc
    return cv2


class ImageFolderCapture:
    """A camera's frame files as a capture (read by :func:`load_image`; BGR like OpenCV). An unreadable file ends
    the camera."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        self.pos = 0
        self.error: str | None = None

    def isOpened(self) -> bool:  # noqa: N802
        return bool(self.paths)

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.pos >= len(self.paths):
            return False, None
        path = self.paths[self.pos]
        self.pos += 1
        try:
            rgb = np.asarray(load_image(path))
        except InputError as exc:
            self.error = f"unreadable frame: {exc}"
            raise OSError(self.error) from exc
        return True, np.ascontiguousarray(rgb[..., ::-1])

    def release(self) -> None:
        self.pos = len(self.paths)


def open_capture(spec: CameraSpec) -> Capture:
    """The real capture for ``spec``: frame files, a video file, or a webcam index / URL (OpenCV)."""
    if isinstance(spec.target, (list, tuple)):
        return ImageFolderCapture(spec.target)
    cv2 = require_cv2()
    target = spec.target
    return cv2.VideoCapture(int(target) if isinstance(target, int) else os.fspath(target))


# --------------------------------------------------------------------------- camera lists


def parse_webcams(specs: Sequence[str]) -> list[CameraSpec]:
    """``["0", "1"]`` or ``["front=0", "back=/dev/video2", "door=rtsp://..."]`` as camera specs."""
    cams: list[CameraSpec] = []
    for raw in specs:
        name, sep, target = str(raw).partition("=")
        if not sep:
            name, target = "", name
        target = target.strip()
        if not target:
            raise InputError(f"--webcams {raw!r}: empty device; use an index (0), a path or URL, or name=index")
        value: Any = int(target) if target.lstrip("-").isdigit() else target
        cams.append(CameraSpec(name.strip() or f"webcam{target}", value, live=True))
    names = [c.name for c in cams]
    if len(set(names)) != len(names):
        raise InputError(f"--webcams names a camera twice: {names}")
    if not cams:
        raise InputError("--webcams needs at least one device")
    return cams


def discover_videos(root: str | os.PathLike) -> list[CameraSpec]:
    """One video per camera: ``camXX.mp4`` files in ``root`` (name = stem), or one sub-folder per camera
    holding a video (name = folder). Sorted by name."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InputError(f"--videos: not a directory: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    cams = [CameraSpec(p.stem, p) for p in files]
    for sub in sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")):
        vids = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if len(vids) > 1:
            logger.warning("%s holds %d videos; using %s for camera %s", sub, len(vids), vids[0].name, sub.name)
        if vids:
            cams.append(CameraSpec(sub.name, vids[0]))
    names = [c.name for c in cams]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--videos {path}: cameras {dup} appear both as a file and as a folder")
    if not cams:
        raise InputError(f"--videos {path}: no videos ({', '.join(VIDEO_EXTENSIONS)}) found, neither as "
                         "camXX.mp4 files nor in per-camera sub-folders")
    logger.info("videos %s: %d cameras (%s)", path, len(cams), ", ".join(names[:8]))
    return sorted(cams, key=lambda c: c.name)


def image_folder_cameras(root: str | os.PathLike) -> list[CameraSpec]:
    """PKU-style per-camera frame folders as cameras (frames in name order)."""
    scene = discover_scene(root)
    if scene.layout != "pku":
        raise InputError(f"{root}: a live image source needs one sub-folder of frames per camera")
    return [CameraSpec(name, list(frames)) for name, frames in scene.frames.items()]


def select_cameras(cams: Sequence[CameraSpec], num_cams: int | None = None, views: Sequence[str] | None = None,
                   random_views: int | None = None, seed: int = 0) -> list[CameraSpec]:
    """Apply ``--views`` / ``--random_views`` / ``--num_cams`` (the same rules as the images source)."""
    by_name = {c.name: c for c in cams}
    order, explicit = candidate_views(Scene(Path("."), "live", {n: [] for n in by_name}), views, random_views, seed)
    want = num_cams or (len(order) if explicit else min(random_views or len(order), len(order)))
    if want > len(order):
        raise InputError(f"--num_cams {want}: only {len(order)} cameras available ({', '.join(order)})")
    if explicit and num_cams and len(order) != num_cams:
        raise InputError(f"--views names {len(order)} cameras but --num_cams is {num_cams}")
    return [by_name[n] for n in order[:want]]


# --------------------------------------------------------------------------- readers


def _capture_errors() -> tuple[type[BaseException], ...]:
    """What a capture's ``read`` may raise: OS/runtime errors, and ``cv2.error`` when OpenCV is present."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError)
    try:
        import cv2
    except ImportError:
        return errors
    return errors + (cv2.error,)


@dataclass
class _End:
    event: str
    reason: str


class CameraReader(threading.Thread):
    """Reads one capture into a bounded queue; ends with an :class:`_End` marker (never blocks forever)."""

    def __init__(self, spec: CameraSpec, factory: Callable[[CameraSpec], Capture], frame_step: int,
                 queue_size: int, stop: threading.Event, max_read_failures: int = 30) -> None:
        super().__init__(name=f"camera-{spec.name}", daemon=True)
        self.spec, self.factory, self.frame_step = spec, factory, frame_step
        self.queue: queue.Queue[Frame | _End] = queue.Queue(maxsize=queue_size)
        self.stop_event, self.max_read_failures = stop, max_read_failures
        self.frames_read = 0
        self.frames_dropped = 0

    def run(self) -> None:
        try:
            cap = self.factory(self.spec)
        except (OSError, RuntimeError, ValueError, MissingDependencyError) as exc:
            self._finish(_End("failed_to_open", f"cannot open {self.spec.target}: {exc}"))
            return
        try:
            if not cap.isOpened():
                self._finish(_End("failed_to_open", f"cannot open {self.spec.target}"))
                return
            self._finish(self._loop(cap))
        finally:
            cap.release()

    def _loop(self, cap: Capture) -> _End:
        index, failures = -1, 0
        while not self.stop_event.is_set():
            try:
                ok, bgr = cap.read()
            except _capture_errors() as exc:
                return _End("disconnected", f"read failed: {type(exc).__name__}: {exc}")
            if not ok or bgr is None:
                if not self.spec.live:
                    return _End("ended", f"no more frames after {self.frames_read} read")
                failures += 1
                if failures >= self.max_read_failures:
                    return _End("disconnected", f"{failures} reads in a row returned no frame")
                time.sleep(0.01)
                continue
            failures = 0
            index += 1
            if index % self.frame_step:
                continue
            pos = cap.get(0) if hasattr(cap, "get") else None  # CAP_PROP_POS_MSEC
            media = float(pos) / 1e3 if isinstance(pos, (int, float)) and pos >= 0 else None
            rgb = np.ascontiguousarray(np.asarray(bgr)[..., ::-1])
            self.frames_read += 1
            if not self._put(Frame(self.spec.name, index, time.time(), rgb, media)):
                break
        return _End("stopped", "source closed")

    def _put(self, item: Frame | _End) -> bool:
        """Queue ``item``: files wait for room, live devices drop their oldest frame. False once stopped."""
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                if self.spec.live and isinstance(item, Frame):
                    try:
                        self.queue.get_nowait()
                        self.frames_dropped += 1
                    except queue.Empty:
                        pass
        return False

    def _finish(self, end: _End) -> None:
        self._put(end)


class LockstepSource:
    """Batches of frames, one per active camera, from threaded readers; use as a context manager.

    ``max_batches`` bounds the loop; ``min_cams`` is how many cameras must remain (default: all of them,
    i.e. the first camera lost stops the loop); ``stall_timeout`` is how long one batch waits for a camera.
    ``events`` lists every camera that ended, stalled or disconnected; ``stop_reason`` says why iteration
    ended.
    """

    def __init__(self, cameras: Sequence[CameraSpec], frame_step: int = 1, max_batches: int | None = None,
                 min_cams: int | None = None, stall_timeout: float = 5.0, queue_size: int = 2,
                 capture_factory: Callable[[CameraSpec], Capture] | None = None) -> None:
        if not cameras:
            raise InputError("no cameras to read")
        if frame_step < 1:
            raise InputError(f"--frame_step must be >= 1, found {frame_step}")
        if max_batches is not None and max_batches < 1:
            raise InputError(f"--max_batches must be >= 1, found {max_batches}")
        if stall_timeout <= 0 or queue_size < 1:
            raise InputError(f"stall_timeout must be > 0 and queue_size >= 1 (got {stall_timeout}, {queue_size})")
        self.cameras = list(cameras)
        self.min_cams = len(self.cameras) if min_cams is None else min_cams
        if not 1 <= self.min_cams <= len(self.cameras):
            raise InputError(f"--min_cams must be in [1, {len(self.cameras)}], found {min_cams}")
        self.frame_step, self.max_batches, self.stall_timeout = frame_step, max_batches, stall_timeout
        self.queue_size = queue_size
        self.factory = capture_factory or open_capture
        self.events: list[CameraEvent] = []
        self.stop_reason: str | None = None
        self.batches = 0
        self._stop = threading.Event()
        self._readers: dict[str, CameraReader] = {}
        self._all: list[CameraReader] = []

    @property
    def active(self) -> list[str]:
        return list(self._readers)

    def __enter__(self) -> "LockstepSource":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        for cam in self.cameras:
            reader = CameraReader(cam, self.factory, self.frame_step, self.queue_size, self._stop)
            self._readers[cam.name] = reader
            self._all.append(reader)
            reader.start()
        logger.info("reading %d cameras (frame_step %d, queue %d per camera, stall timeout %.1f s, min %d cameras)",
                    len(self.cameras), self.frame_step, self.queue_size, self.stall_timeout, self.min_cams)

    def close(self, join_timeout: float = 2.0) -> None:
        self._stop.set()
        for reader in self._all:
            reader.join(timeout=join_timeout)
            if reader.is_alive():
                logger.warning("camera reader %s did not stop within %.1f s (blocked in its capture)", reader.name,
                               join_timeout)

    def _drop(self, name: str, event: str, reason: str) -> None:
        self._readers.pop(name, None)
        self.events.append(CameraEvent(name, event, self.batches, reason))
        logger.warning("camera %s %s at batch %d: %s", name, event, self.batches, reason)

    def __iter__(self) -> Iterator[Batch]:
        if not self._all:
            self.start()
        while True:
            if self.max_batches is not None and self.batches >= self.max_batches:
                self.stop_reason = f"max_batches ({self.max_batches}) reached"
                break
            frames: dict[str, Frame] = {}
            dropped: list[str] = []
            deadline = time.monotonic() + self.stall_timeout
            for name, reader in list(self._readers.items()):
                try:
                    item = reader.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self._drop(name, "stalled", f"no frame within {self.stall_timeout:.1f} s")
                    dropped.append(name)
                    continue
                if isinstance(item, _End):
                    self._drop(name, item.event, item.reason)
                    dropped.append(name)
                    continue
                frames[name] = item
            if len(frames) < self.min_cams:
                lost = ", ".join(f"{e.camera} ({e.event})" for e in self.events)
                self.stop_reason = (f"only {len(frames)} cameras delivered a frame, {self.min_cams} needed"
                                    + (f"; lost: {lost}" if lost else ""))
                logger.info("source stops: %s", self.stop_reason)
                break
            batch = Batch(self.batches, frames, dropped)
            self.batches += 1
            yield batch
        self.close()

    def report(self) -> dict[str, Any]:
        return {"cameras": [c.name for c in self.cameras], "active": self.active, "batches": self.batches,
                "events": [e.to_dict() for e in self.events], "stop_reason": self.stop_reason,
                "frame_step": self.frame_step, "min_cams": self.min_cams,
                "frames_dropped": {r.spec.name: r.frames_dropped for r in self._all if r.frames_dropped}}


def make_cameras(source: str, *, images: str | os.PathLike | None = None, videos: str | os.PathLike | None = None,
                 webcams: Sequence[str] | None = None) -> list[CameraSpec]:
    """All cameras of a source (before selection)."""
    if source not in SOURCES:
        raise InputError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "images":
        if images is None:
            raise InputError("--source images needs --images")
        return image_folder_cameras(images)
    if source == "videos":
        if videos is None:
            raise InputError("--source videos needs --videos DIR (camXX.mp4 files or per-camera folders)")
        require_cv2()
        return discover_videos(videos)
    if not webcams:
        raise InputError("--source webcams needs --webcams (e.g. 0 1 2, or front=0 back=1)")
    return parse_webcams(webcams)
