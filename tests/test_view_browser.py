"""The viewer in a real headless browser: points are drawn and the page shows the camera count.

Needs the system Chromium (Debian package ``chromium``; .ci/run installs it) and Playwright's Python package
(requirements-dev.txt). Playwright's own browser builds are never downloaded: the test launches
/usr/bin/chromium, which renders WebGL in software (SwiftShader) on machines without a GPU.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("viser", reason="the viewer needs viser: pip install -r requirements-view.txt")
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="browser test needs playwright (requirements-dev.txt)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 700}
SCENE_BOX = (0, 170, 640, 700)  # left, top, right, bottom: the canvas away from the GUI panel and the WebGL notice


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder of pcd_inference.py --source images with the tiny preset on generated views."""
    from test_pcd_inference import CLI, make_pku_scene

    root = tmp_path_factory.mktemp("viewer")
    scene = make_pku_scene(root / "scene")
    assert CLI.main(["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "4",
                     "--out-dir", str(root / "out")]) == 0
    return root / "out"


def scene_pixels(page: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB").crop(SCENE_BOX), np.int16)


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.abs(a - b).sum(-1) > 30).sum())


def settled_pixels(page: Any, timeout: float = 30.0) -> np.ndarray:
    """The scene area once two screenshots in a row agree (the renderer caught up with the last change)."""
    last = scene_pixels(page)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = scene_pixels(page)
        if changed_pixels(now, last) == 0:
            return now
        last = now
    raise AssertionError("the page kept changing for 30 s")


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def page_number(page: Any, label: str) -> int | None:
    match = re.search(rf"{label}:\s*([\d,]+)", page.inner_text("body"))
    return int(match.group(1).replace(",", "")) if match else None


def test_viewer_draws_points_and_shows_camera_count(page: Any, tiny_output: Path) -> None:
    from vggt_trt.view.server import serve_output_folder

    view = serve_output_folder(tiny_output, "127.0.0.1", 0)
    try:
        page.goto(f"http://127.0.0.1:{view.server.get_port()}/")
        assert wait_for(lambda: page_number(page, "Cameras") is not None), page.inner_text("body")
        assert page_number(page, "Cameras") == 4
        assert page_number(page, "Points") == view.shown > 100
        view.show_cameras.value = False  # what differs below is then the points alone
        with_points = settled_pixels(page)
        view.cloud.visible = False
        assert wait_for(lambda: changed_pixels(scene_pixels(page), with_points) > 0)
        differing = changed_pixels(settled_pixels(page), with_points)
        # the points cover a visible part of the canvas: at least 1 % of it changes when they are hidden
        assert differing > 0.01 * with_points.shape[0] * with_points.shape[1], differing
    finally:
        view.server.stop()


def test_live_viewer_point_count_grows_in_the_page(page: Any) -> None:
    from vggt_trt.view.live import LiveViewer

    rng = np.random.default_rng(0)
    with LiveViewer(port=0, max_points=10_000) as live:
        page.goto(f"http://127.0.0.1:{live.port}/")
        seen = []
        for batch in range(1, 4):
            n = 2000 * batch
            live.publish_map(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 255, (n, 3), dtype=np.uint8))
            assert live.wait_idle(10)
            assert wait_for(lambda: page_number(page, "Points") == n), page.inner_text("body")
            seen.append(page_number(page, "Points"))
        assert seen == [2000, 4000, 6000]
