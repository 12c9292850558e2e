"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import importlib.util
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(filename: str, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ ONNX toy (graph passes, build)
IMAGES = np.random.default_rng(0).random((2, 3, 28, 35), dtype=np.float32)


def make_toy_module():
    """Conv patch embed, ConvTranspose, arange/sin/cos position embedding, LayerNorm, softmax attention, GELU MLP,
    exp heads."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Toy(nn.Module):
        def __init__(self, dim: int = 32, heads: int = 2, patch: int = 7):
            super().__init__()
            self.heads = heads
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.up = nn.ConvTranspose2d(dim, dim, 2, 2)  # DPT-style upsampling
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            self.head = nn.Linear(dim, 2)

        @staticmethod
        def pos(n: int, dim: int) -> torch.Tensor:
            t = torch.arange(n).float()  # int64 Range + exporter Cast(to=FLOAT)
            omega = 1.0 / (100.0 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2)))  # float Range
            out = t[:, None] * omega[None, :]
            return torch.cat([out.sin(), out.cos()], dim=-1)

        def forward(self, images: torch.Tensor):
            x = self.embed(images)
            x = x + self.up(x)[..., ::2, ::2]
            s, d, hh, ww = x.shape
            x = x.flatten(2).transpose(1, 2) + self.pos(hh * ww, d)
            q, k, v = self.qkv(self.norm1(x)).reshape(s, hh * ww, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5).softmax(-1)
            y = (a @ v).transpose(1, 2).reshape(s, hh * ww, d)
            x = x + self.proj(y) * (y > -1e4).float()  # data-path Cast(bool -> FLOAT) feeding a Mul
            x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
            o = self.head(x)
            return torch.exp(o[..., 0]), 1 + torch.exp(o[..., 1])

    torch.manual_seed(0)
    return Toy().eval()


def export_toy(path: Path, dynamo: bool = True) -> Path:
    """Export the toy without constant folding, so Range, Cast(to=FLOAT), Sin and Cos stay in the graph."""
    import torch

    kwargs = {"optimize": False} if dynamo else {"do_constant_folding": False}
    with warnings.catch_warnings():  # the TorchScript exporter is used on purpose; its deprecation notes are noise
        warnings.simplefilter("ignore")
        torch.onnx.export(make_toy_module(), (torch.from_numpy(IMAGES),), str(path), dynamo=dynamo, opset_version=18,
                          input_names=["images"], output_names=["depth", "conf"], verbose=False, **kwargs)
    return path


# ------------------------------------------------------------------ tiny VGGT graph and engine
TINY = ["--model-name", "tiny", "--num-cams", "2", "--height", "56", "--width", "70"]


def _have_rtx() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return False
    return True


needs_rtx = pytest.mark.skipif(not _have_rtx(), reason="tensorrt_rtx (pip install tensorrt-rtx-cu13) is not installed")


def export_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export the tiny pcd graph once per session (reused by every test module that asks)."""
    path = tmp_path_factory.getbasetemp() / "tiny-onnx" / "vggt-2x3x56x56-pcd.onnx"
    if not path.is_file():
        from vggt_trt.graph.export import ExportSpec, export_onnx
        from vggt_trt.model.weights import build_model

        export_onnx(build_model("tiny"), path, ExportSpec(num_cams=2, height=56, width=56, pcd_only=True))
    return path


def convert_tiny_dynamic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Once per session: the tiny pcd-only model converted with a dynamic view axis (2..5 views, optimum 3,
    28x28) to an fp16 graph, and built by TensorRT-RTX when installed. Returns the build report."""
    import json

    out = tmp_path_factory.getbasetemp() / "tiny-dynamic"
    report = out / "vggt-2to5x3x28x28-pcd_fp16.json"
    if not report.is_file():
        import importlib.util

        from vggt_trt.pipelines.convert import ConvertOptions, convert

        convert(ConvertOptions(output_dir=out, export=True, model_name="tiny", num_cams=3, min_cams=2, max_cams=5,
                               height=28, width=28, pcd_only=True, precisions=("fp16",), backend="tensorrt-rtx",
                               opt_level=0, workspace_gb=1, keep_intermediate=True,  # the tests read every pass
                               skip_build=importlib.util.find_spec("tensorrt_rtx") is None))
    return json.loads(report.read_text())


def build_rtx_engine(onnx_path: Path, engine_path: Path) -> Path:
    """An fp32 engine built ahead of time by TensorRT-RTX on CPU; skips when tensorrt_rtx is missing."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed: no engine can be built here")
    if not engine_path.is_file():
        from vggt_trt.trt.build import build_engine

        build_engine(onnx_path, engine_path, "fp32", backend="tensorrt-rtx", workspace_gb=1, opt_level=0)
    return engine_path


# ------------------------------------------------------------------ synthetic rigs: videos and webcams
FOCAL, W, H = 50.0, 64, 48


def texture(seed: int = 3, size: int = 256) -> np.ndarray:
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

    tex = texture()
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


def replay_frames(cam: int, n: int = 4) -> list[np.ndarray]:
    tex = texture()
    return [np.ascontiguousarray(render(cam, f, tex)[..., ::-1]) for f in range(n)]
