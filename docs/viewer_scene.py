#!/usr/bin/env python3
"""Make docs/viewer.png: a synthetic room written as a pcd_inference.py output folder, shown by vggt-view.

The room (wood floor, brick and plaster walls, a table, boxes, a ball) is sampled as coloured, shaded
points; six cameras on an arc look into it, and each camera's image is the points rendered through it
(z-buffered splats), so the frusta carry matching thumbnails. Low-confidence stray points surround the
room, as in real reconstructions. Needs requirements-view.txt, playwright and the system Chromium.

    PYTHONPATH=. python docs/viewer_scene.py --out-dir /tmp/room --png docs/viewer.png
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vggt_trt.recon.pointcloud import write_cameras_json, write_ply

H, W, F = 294, 392, 300.0
LIGHT = np.array([0.3, -1.0, -0.4]) / np.linalg.norm([0.3, -1.0, -0.4])  # OpenCV: y points down


def plane(rng, n, origin, u, v, normal, colour_fn):
    a, b = rng.random(n), rng.random(n)
    xyz = origin + a[:, None] * u + b[:, None] * v
    return xyz, colour_fn(a, b, rng), np.tile(normal, (n, 1))


def wood(a, b, rng):
    plank = np.floor(a * 14)
    tone = 0.55 + 0.12 * np.sin(plank * 2.3) + 0.05 * np.sin(b * 60 + plank) + rng.normal(0, 0.02, a.size)
    return np.stack([tone, tone * 0.72, tone * 0.45], -1)


def brick(a, b, rng):
    row = np.floor(b * 16)
    col = (a * 12 + 0.5 * (row % 2)) % 1
    mortar = ((b * 16) % 1 < 0.1) | (col < 0.05)
    base = np.stack([0.62, 0.27, 0.2]) * (0.85 + 0.3 * np.sin(row * 7.1 + np.floor(a * 12) * 3.3))[:, None]
    return np.where(mortar[:, None], 0.78, base) + rng.normal(0, 0.02, (a.size, 3))


def plaster(colour):
    def fn(a, b, rng):
        c = np.tile(colour, (a.size, 1))
        poster = (abs(a - 0.5) < 0.18) & (abs(b - 0.45) < 0.22)
        stripes = np.stack([0.15 + 0.7 * (np.sin(b * 40) > 0), 0.35 + 0.0 * b, 0.55 + 0.3 * np.cos(a * 9)], -1)
        return np.where(poster[:, None], stripes, c) + rng.normal(0, 0.015, (a.size, 3))
    return fn


def solid(colour):
    return lambda a, b, rng: np.tile(colour, (a.size, 1)) + rng.normal(0, 0.02, (a.size, 3))


def box(rng, n, lo, hi, colour_fn):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    parts = []
    for axis in range(3):
        for side in (0, 1):
            o = lo.copy()
            o[axis] = (lo, hi)[side][axis]
            u_ax, v_ax = [i for i in range(3) if i != axis]
            u, v = np.zeros(3), np.zeros(3)
            u[u_ax], v[v_ax] = hi[u_ax] - lo[u_ax], hi[v_ax] - lo[v_ax]
            normal = np.zeros(3)
            normal[axis] = 1 if side else -1
            parts.append(plane(rng, n // 6, o, u, v, normal, colour_fn))
    return [np.concatenate(p) for p in zip(*parts)]


def ball(rng, n, centre, radius, colour):
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    c = np.tile(colour, (n, 1)) * (0.8 + 0.2 * (d[:, 1:2] < 0.2))
    return centre + radius * d, c, d


def room(rng):
    parts = [
        plane(rng, 160_000, np.array([-3, 1.2, -1.0]), np.array([6, 0, 0]), np.array([0, 0, 7]),
              np.array([0, -1, 0]), wood),
        plane(rng, 90_000, np.array([-3, 1.2, 6]), np.array([6, 0, 0]), np.array([0, -2.8, 0]),
              np.array([0, 0, -1]), brick),
        plane(rng, 70_000, np.array([-3, 1.2, -1.0]), np.array([0, 0, 7]), np.array([0, -2.8, 0]), np.array([1, 0, 0]),
              plaster(np.array([0.86, 0.84, 0.74]))),
        plane(rng, 70_000, np.array([3, 1.2, -1.0]), np.array([0, 0, 7]), np.array([0, -2.8, 0]), np.array([-1, 0, 0]),
              plaster(np.array([0.62, 0.74, 0.8]))),
        box(rng, 30_000, [-1.2, 0.25, 2.6], [0.9, 0.33, 4.0], solid(np.array([0.45, 0.3, 0.18]))),  # table top
        *[box(rng, 3_000, [x, 0.33, z], [x + 0.1, 1.2, z + 0.1], solid(np.array([0.35, 0.22, 0.13])))
          for x in (-1.1, 0.7) for z in (2.7, 3.8)],
        box(rng, 24_000, [1.4, 0.5, 4.2], [2.4, 1.2, 5.2], solid(np.array([0.85, 0.25, 0.2]))),
        box(rng, 12_000, [1.6, 0.05, 4.4], [2.2, 0.5, 5.0], solid(np.array([0.95, 0.8, 0.3]))),
        ball(rng, 14_000, np.array([-0.3, -0.05, 3.3]), 0.3, np.array([0.2, 0.45, 0.85])),
        ball(rng, 8_000, np.array([-2.2, 0.9, 1.8]), 0.3, np.array([0.3, 0.7, 0.35])),
    ]
    xyz, rgb, normal = (np.concatenate(p) for p in zip(*parts))
    shade = 0.55 + 0.45 * np.clip(-(normal @ LIGHT), 0, 1)
    rgb = np.clip(rgb * shade[:, None], 0, 1)
    conf = 2 + 8 * rng.random(xyz.shape[0])
    stray = rng.normal(0, 1.2, (6_000, 3)) + np.array([0, 0, 2.5])
    xyz = np.concatenate([xyz + rng.normal(0, 0.004, xyz.shape), stray])
    rgb = np.concatenate([rgb, rng.random((6_000, 3)) * 0.6])
    conf = np.concatenate([conf, 1 + rng.random(6_000)])
    return xyz.astype(np.float32), np.round(rgb * 255).astype(np.uint8), conf.astype(np.float32)


def look_at(centre, target):
    """Cam-from-world [3, 4] for an OpenCV camera at ``centre`` looking at ``target`` (y down)."""
    z = (target - centre) / np.linalg.norm(target - centre)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    r = np.stack([x, np.cross(z, x), z])
    return np.concatenate([r, (-r @ centre)[:, None]], 1)


def render(xyz, rgb, extr, k):
    cam = xyz @ extr[:, :3].T + extr[:, 3]
    front = cam[:, 2] > 0.05
    cam, col = cam[front], rgb[front]
    uv = cam[:, :2] / cam[:, 2:3] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]
    img = np.full((H, W, 3), 40, np.uint8)
    depth = np.full((H, W), np.inf)
    order = np.argsort(-cam[:, 2])  # far to near: nearer points overwrite
    for du in (0, 1):
        for dv in (0, 1):
            u, v = np.floor(uv[order, 0]).astype(int) + du, np.floor(uv[order, 1]).astype(int) + dv
            ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
            img[v[ok], u[ok]] = col[order][ok]
            depth[v[ok], u[ok]] = np.minimum(depth[v[ok], u[ok]], cam[order, 2][ok])
    return img


def write_folder(out: Path) -> None:
    rng = np.random.default_rng(7)
    xyz, rgb, conf = room(rng)
    k = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])
    target = np.array([0.0, 0.3, 3.5])
    names, extrs = [], []
    for i, angle in enumerate(np.linspace(-0.6, 0.6, 6)):
        centre = np.array([3.2 * np.sin(angle), -0.4 - 0.1 * i % 2, 3.5 - 3.6 * np.cos(angle)])
        extrs.append(look_at(centre, target))
        names.append(f"cam{i:03d}.png")
    write_ply(out / "points.ply", xyz, rgb, conf)
    write_cameras_json(out / "cameras.json", np.stack(extrs), np.tile(k, (6, 1, 1)), names, (H, W))
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, e in zip(names, extrs):
        Image.fromarray(render(xyz, rgb, e, k)).save(out / "images" / name)
    (out / "summary.json").write_text(json.dumps({"frame": "synthetic room (metres)", "alignment": None}))


def screenshot(out: Path, png: Path) -> None:
    from playwright.sync_api import sync_playwright

    from vggt_trt.view.server import serve_output_folder

    view = serve_output_folder(out, "127.0.0.1", 0)
    view.server.initial_camera.position = (1.6, -3.0, -3.4)
    view.server.initial_camera.look_at = (0.0, 0.5, 2.6)
    view.server.initial_camera.up = (0.0, -1.0, 0.0)
    view.conf_slider.value = 5.0
    view.size_slider.value = 0.03
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(f"http://127.0.0.1:{view.server.get_port()}/")
            page.wait_for_timeout(8000)
            page.add_style_tag(content=".mantine-Notification-root { display: none; }")  # "software WebGL" notice
            shot, last = page.screenshot(), b""
            for _ in range(60):  # software WebGL: wait until two screenshots in a row agree
                if shot == last:
                    break
                page.wait_for_timeout(1000)
                shot, last = page.screenshot(), shot
            img = Image.open(io.BytesIO(shot)).convert("RGB")
            browser.close()
    finally:
        view.server.stop()
    img.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(png, optimize=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--png", type=Path, default=Path(__file__).with_name("viewer.png"))
    args = ap.parse_args()
    t = time.perf_counter()
    write_folder(args.out_dir)
    screenshot(args.out_dir, args.png)
    print(f"{args.png}: {args.png.stat().st_size // 1024} KiB in {time.perf_counter() - t:.0f} s")
