"""Serve a :class:`~vggt_trt.view.scene.ViewScene` with viser: coloured points, camera frusta, GUI.

Nothing is served beyond the given host (``127.0.0.1`` by default) and viser's share-link button is hidden,
so no tunnel to a public relay is ever offered.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import MissingDependencyError
from .scene import ViewCamera, ViewScene, thumbnail

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ACTIVE_COLOUR = (30, 180, 60)
IDLE_COLOUR = (150, 150, 150)
INSTALL_HINT = "pip install -r requirements-view.txt"


def require_viser() -> Any:
    """The ``viser`` module, or a MissingDependencyError naming the install command."""
    try:
        import viser
    except ImportError as exc:
        raise MissingDependencyError(f"the viewer needs viser: {INSTALL_HINT} ({exc})") from exc
    return viser


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, label: str = "vggt-trt") -> Any:
    """A running ``viser.ViserServer`` (``port=0``: any free port; read it back with ``get_port()``)."""
    viser = require_viser()
    server = viser.ViserServer(host=host, port=port, label=label, verbose=False)
    server.gui.configure_theme(show_share_button=False)
    logger.info("viewer at http://%s:%d", host, server.get_port())
    return server


def scene_extent(xyz: np.ndarray, centres: np.ndarray) -> float:
    """Robust size of what is shown: the 2-98 % box diagonal of points and camera centres (>= 1e-3)."""
    pts = np.concatenate([xyz.reshape(-1, 3), centres.reshape(-1, 3)]).astype(np.float64)
    pts = pts[np.isfinite(pts).all(1)]
    if pts.shape[0] == 0:
        return 1.0
    lo, hi = np.percentile(pts, [2, 98], axis=0)
    return max(float(np.linalg.norm(hi - lo)), 1e-3)


def camera_pose(extrinsic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-from-camera rotation as a wxyz quaternion and the camera centre, from cam-from-world ``[3, 4]``."""
    from viser import transforms as tf

    r = np.asarray(extrinsic, np.float64)[:3, :3]
    t = np.asarray(extrinsic, np.float64)[:3, 3]
    return tf.SO3.from_matrix(r.T).wxyz, -r.T @ t


def add_frusta(server: Any, cameras: Sequence[ViewCamera], scale: float, active: Sequence[bool] | None = None,
               thumbnails: bool = True) -> list[Any]:
    """One frustum per camera under ``/cameras`` (with its image when there is one); returns the handles."""
    handles = []
    for i, cam in enumerate(cameras):
        wxyz, centre = camera_pose(cam.extrinsic)
        on = True if active is None else bool(active[i])
        image = thumbnail(cam.image) if thumbnails and cam.image is not None else None
        handles.append(server.scene.add_camera_frustum(
            f"/cameras/{i:03d}", fov=cam.fov_y, aspect=cam.aspect, scale=scale, thickness=scale * 0.03,
            color=ACTIVE_COLOUR if on else IDLE_COLOUR, image=image, wxyz=wxyz, position=centre))
    return handles


def look_from_first_camera(server: Any, scene_xyz: np.ndarray, cameras: Sequence[ViewCamera], extent: float) -> None:
    """Start the browser's view behind and above the first camera, looking at the points' median."""
    if not cameras:
        return
    r = np.asarray(cameras[0].extrinsic, np.float64)[:3, :3]
    _, centre = camera_pose(cameras[0].extrinsic)
    forward, up = r.T @ np.array([0.0, 0.0, 1.0]), r.T @ np.array([0.0, -1.0, 0.0])
    target = np.median(scene_xyz, axis=0) if scene_xyz.shape[0] else centre + forward * extent * 0.5
    server.scene.set_up_direction(tuple(up))
    server.initial_camera.up = up
    server.initial_camera.position = centre - forward * extent * 0.35 + up * extent * 0.15
    server.initial_camera.look_at = target


def confidence_mask(conf: np.ndarray | None, percentile: float) -> np.ndarray | slice:
    """Points whose confidence is at or above the given percentile (all points when there is no confidence)."""
    if conf is None or percentile <= 0 or conf.size == 0:
        return slice(None)
    return conf >= np.percentile(conf, percentile)


def alignment_text(scene: ViewScene) -> str:
    if not scene.alignment:
        return f"**Frame:** {scene.frame}"
    a = scene.alignment
    return (f"**Frame:** {scene.frame}  \n**Rig alignment:** scale {a['scale']:.4g}, residual RMS "
            f"{a['residual_rms']:.3g} over {len(a.get('residual_per_camera', {}))} cameras  \n"
            f"known poses: `{a.get('source', '?')}`")


class SceneView:
    """A scene drawn on a server, with its GUI: camera count, point count, confidence and size sliders."""

    def __init__(self, server: Any, scene: ViewScene, point_size: float | None = None) -> None:
        self.server, self.scene = server, scene
        centres = np.array([camera_pose(c.extrinsic)[1] for c in scene.cameras]).reshape(-1, 3)
        extent = scene_extent(scene.xyz, centres)
        size = point_size or extent * 2e-3
        self._lock = threading.Lock()
        gui = server.gui
        gui.add_markdown(f"**Cameras:** {len(scene.cameras)}")
        self.points_text = gui.add_markdown("")
        gui.add_markdown(alignment_text(scene))
        self.conf_slider = gui.add_slider("Confidence percentile", min=0.0, max=99.0, step=1.0, initial_value=0.0,
                                          disabled=scene.conf is None)
        self.size_slider = gui.add_slider("Point size", min=size / 10, max=size * 10, step=size / 10,
                                          initial_value=size)
        self.show_cameras = gui.add_checkbox("Show cameras", initial_value=True)
        self.frusta = add_frusta(server, scene.cameras, scale=extent * 0.05)
        server.scene.add_frame("/world", axes_length=extent * 0.05, axes_radius=extent * 0.002)
        look_from_first_camera(server, scene.xyz, scene.cameras, extent)
        self.cloud: Any = None
        self.shown = 0
        self.redraw()
        self.conf_slider.on_update(lambda _: self.redraw())
        self.size_slider.on_update(lambda _: self.redraw())
        self.show_cameras.on_update(lambda _: self._toggle_cameras())

    def _toggle_cameras(self) -> None:
        for frustum in self.frusta:
            frustum.visible = self.show_cameras.value

    def redraw(self) -> None:
        """Re-send the points that pass the confidence slider."""
        with self._lock:
            keep = confidence_mask(self.scene.conf, float(self.conf_slider.value))
            xyz, rgb = self.scene.xyz[keep], self.scene.rgb[keep]
            self.cloud = self.server.scene.add_point_cloud("/points", xyz, rgb, point_size=self.size_slider.value,
                                                           point_shape="rounded", precision="float32")
            self.shown = int(xyz.shape[0])
            self.points_text.content = (f"**Points:** {self.shown:,} shown of {self.scene.xyz.shape[0]:,} loaded "
                                        f"({self.scene.points_in_file:,} in file)")


def serve_output_folder(out_dir: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                        max_points: int | None = None) -> SceneView:
    """Load ``out_dir`` (checked before anything is served) and serve it; returns the view (``.server``)."""
    from .scene import DEFAULT_MAX_POINTS, load_scene

    require_viser()
    scene = load_scene(out_dir, max_points or DEFAULT_MAX_POINTS)
    view = SceneView(start_server(host, port, label=f"vggt-trt: {scene.root.name}"), scene)
    logger.info("serving %s: %d points, %d cameras", scene.root, view.shown, len(scene.cameras))
    return view


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[threading.Event]:
    """Within the block, Ctrl-C (SIGINT) sets ``event`` instead of raising wherever the main thread is."""
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def serve_until_interrupted(out_dir: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                            max_points: int | None = None, on_ready: Callable[[SceneView], None] | None = None,
                            poll_s: float = 0.5) -> None:
    """Serve ``out_dir`` until Ctrl-C, then stop the server. The Ctrl-C handler is in place before the server
    starts, so a Ctrl-C at any moment (even while it starts) ends in a clean stop, never in live server threads."""
    with ctrl_c_sets(threading.Event()) as interrupted:
        view = serve_output_folder(out_dir, host, port, max_points)
        try:
            if on_ready is not None:
                on_ready(view)
            while not interrupted.wait(poll_s):
                pass
            logger.info("stopping the viewer")
        finally:
            view.server.stop()
