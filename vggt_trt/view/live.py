"""Publish the growing live map to the browser without slowing the loop that produces it.

``LiveViewer.publish_map`` and ``set_cameras`` only subsample (on the array's own device), copy, and drop
the result into a :class:`Mailbox`; a background thread converts and sends it. When the thread (or the
browser behind it) is slower than the loop, a newer update replaces the unsent one: latest wins, nothing
queues, and ``stats()['dropped']`` counts what was replaced. The live loop offers its map every batch
(``offer_map``); the map is taken at most ``max_rate_hz`` times a second (a browser shows no more, and
every update costs the loop a subsample on the GPU and the process a serialisation), and the newest map
is always shown once the loop pauses (``flush``, ``wait_idle``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from .scene import ViewCamera, subsample_indices
from .server import DEFAULT_HOST, DEFAULT_PORT, add_frusta, scene_extent, start_server

logger = logging.getLogger(__name__)

DEFAULT_LIVE_MAX_POINTS = 300_000
DEFAULT_LIVE_MAX_RATE_HZ = 10.0


class Mailbox:
    """Latest-wins slots by key: ``put`` never waits; ``take`` returns everything pending and clears it.

    The consumer calls ``done()`` after handling what it took, so ``wait_idle`` knows when all is shown.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, Any] = {}
        self._busy = False
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, key: str, value: Any) -> None:
        with self._cond:
            if key in self._pending:
                self.dropped += 1
            self._pending[key] = value
            self.put_count += 1
            self._cond.notify()

    def take(self, timeout: float | None = None) -> dict[str, Any]:
        """Pending items (empty after ``timeout`` or once closed with nothing pending)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed, timeout)
            items, self._pending = self._pending, {}
            self._busy = bool(items)
            return items

    def done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is pending or being handled; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _take_rows(x: Any, budget: int) -> Any:
    """At most ``budget`` evenly spread rows as a new array/tensor on the input's device (never a view).

    Tensors are indexed on their own device with indices made there, so nothing waits for a GPU.
    """
    n = int(x.shape[0])
    if not hasattr(x, "detach"):
        return np.asarray(x)[subsample_indices(n, budget)]
    if n <= budget:
        return x.detach().clone()
    import torch

    idx = torch.linspace(0, n - 1, budget, device=x.device, dtype=torch.float64).round().long()
    return x.detach().index_select(0, idx)


def _colours_uint8(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return rgb
    return np.round(np.clip(rgb.astype(np.float32), 0, 1) * 255).astype(np.uint8)


class LiveViewer:
    """A viser server fed by a background thread; the publishing calls return at once."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 max_points: int = DEFAULT_LIVE_MAX_POINTS, point_size: float | None = None,
                 max_rate_hz: float | None = DEFAULT_LIVE_MAX_RATE_HZ) -> None:
        if max_points < 1:
            raise InputError(f"max_points must be >= 1, found {max_points}")
        if max_rate_hz is not None and not max_rate_hz > 0:
            raise InputError(f"max_rate_hz must be > 0 (or None for every offer), found {max_rate_hz}")
        self.min_interval_s = 0.0 if max_rate_hz is None else 1.0 / max_rate_hz
        self._last_map_s = float("-inf")
        self._deferred: Callable[[], tuple[Any, Any]] | None = None
        self.deferred_offers = 0
        self.max_points, self.point_size = max_points, point_size
        self.server = start_server(host, port, label="vggt-trt live")
        self.mailbox = Mailbox()
        self.served_updates = 0
        self.served_points = 0
        self.served_cameras = 0
        self._error: BaseException | None = None
        gui = self.server.gui
        self._cams_text = gui.add_markdown("**Cameras:** 0")
        self._points_text = gui.add_markdown("**Points:** 0")
        self._frusta: list[Any] = []
        self.cloud: Any = None  # the served point cloud's viser handle
        self._thread = threading.Thread(target=self._serve, name="vggt-trt-live-viewer", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server.get_port())

    def publish_map(self, points: Any, colors: Any) -> None:
        """Show this map: ``[N, 3]`` points and ``[N, 3]`` colours (uint8, or float in [0, 1]); numpy or torch.

        At most ``max_points`` evenly spread rows are copied (on the tensors' device); the call returns then.
        """
        if points.shape[-1:] != (3,) or colors.shape != points.shape:
            raise InputError(f"publish_map: points and colors must both be [N, 3], found {list(points.shape)} "
                             f"and {list(colors.shape)}")
        self.mailbox.put("map", (_take_rows(points, self.max_points), _take_rows(colors, self.max_points)))

    def offer_map(self, snapshot: Callable[[], tuple[Any, Any]]) -> bool:
        """Publish ``snapshot()`` (points, colours) if an update is due; else keep it for ``flush``. True if published.

        ``snapshot`` runs only when due, so a loop that offers every batch pays for at most ``max_rate_hz``
        snapshots a second.
        """
        now = time.monotonic()
        if now - self._last_map_s < self.min_interval_s:
            self._deferred = snapshot
            self.deferred_offers += 1
            return False
        self._deferred, self._last_map_s = None, now
        self.publish_map(*snapshot())
        return True

    def flush(self) -> None:
        """Publish the newest offered map if the rate limit held it back."""
        if self._deferred is not None:
            snapshot, self._deferred = self._deferred, None
            self._last_map_s = time.monotonic()
            self.publish_map(*snapshot())

    def set_cameras(self, extrinsics: Any, intrinsics: Any, names: Sequence[str], active: Sequence[bool],
                    image_hw: tuple[int, int] | None = None) -> None:
        """Show camera frusta (cam-from-world ``[S, 3, 4]``, pixel ``[S, 3, 3]``); active ones in green.

        ``image_hw``: the image size the intrinsics refer to (default: twice the principal point).
        """
        extr, intr = _to_numpy(extrinsics).astype(np.float64), _to_numpy(intrinsics).astype(np.float64)
        s = len(names)
        if extr.shape != (s, 3, 4) or intr.shape != (s, 3, 3) or len(active) != s:
            raise InputError(f"set_cameras: expected [{s}, 3, 4] extrinsics, [{s}, 3, 3] intrinsics and {s} active "
                             f"flags, found {list(extr.shape)}, {list(intr.shape)}, {len(active)}")
        cams = []
        for name, e, k in zip(names, extr, intr):
            h, w = image_hw if image_hw else (round(2 * k[1, 2]), round(2 * k[0, 2]))
            cams.append(ViewCamera(name=str(name), extrinsic=e, intrinsic=k, height=int(h), width=int(w), image=None))
        self.mailbox.put("cameras", (cams, [bool(a) for a in active]))

    def stats(self) -> dict[str, Any]:
        return {"published": self.mailbox.put_count, "dropped": self.mailbox.dropped,
                "deferred_offers": self.deferred_offers,
                "max_rate_hz": 1 / self.min_interval_s if self.min_interval_s else None,
                "served_updates": self.served_updates, "served_points": self.served_points,
                "served_cameras": self.served_cameras, "error": None if self._error is None else repr(self._error)}

    def _serve(self) -> None:
        extent = 1.0
        try:
            while not self.mailbox.closed:
                items = self.mailbox.take(timeout=0.5)
                if "map" in items:
                    xyz = _to_numpy(items["map"][0]).astype(np.float32)
                    rgb = _colours_uint8(_to_numpy(items["map"][1]))
                    extent = scene_extent(xyz, np.zeros((0, 3)))
                    size = self.point_size or extent * 2e-3
                    self.cloud = self.server.scene.add_point_cloud("/map", xyz, rgb, point_size=size,
                                                                   point_shape="rounded", precision="float32")
                    self.served_points = int(xyz.shape[0])
                    self._points_text.content = f"**Points:** {self.served_points:,}"
                if "cameras" in items:
                    cams, active = items["cameras"]
                    for handle in self._frusta:
                        handle.remove()
                    self._frusta = add_frusta(self.server, cams, scale=extent * 0.05, active=active, thumbnails=False)
                    self.served_cameras = len(cams)
                    self._cams_text.content = f"**Cameras:** {len(cams)} ({sum(active)} active)"
                if items:
                    self.served_updates += 1
                self.mailbox.done()
        except Exception as exc:  # the loop keeps running without a view; the reason is logged once
            self._error = exc
            self.mailbox.done()
            logger.exception("live viewer stopped updating")

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once every published update, and the newest offered map, has been sent to the server."""
        self.flush()
        return self.mailbox.wait_idle(timeout)

    def close(self) -> None:
        self.mailbox.close()
        self._thread.join(timeout=5)
        self.server.stop()

    def __enter__(self) -> "LiveViewer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
