"""Depth Anything V2 (``transformers``): presets, preprocessing, ONNX/TensorRT conversion and a worker pool.

Output convention: the relative Depth Anything V2 models predict *relative inverse depth* (disparity,
affine-invariant: ``disp = a / depth + b`` for unknown ``a > 0, b``; larger means nearer), one map
``[B, H, W]`` at the input resolution. :mod:`vggt_trt.pipelines.live` fits ``a, b`` per camera against VGGT.

Models: a hub id (``depth-anything/Depth-Anything-V2-Small-hf``; loaded from the local Hugging Face cache
only, unless ``allow_download``), a local snapshot directory, or a preset with seeded random weights:
``tiny`` (CPU tests) and ``vits`` (the sizes of V2-Small, for timing without weights).

Conversion reuses the VGGT stages of :mod:`vggt_trt.pipelines.convert` (sequence removal, simplify, check,
fp16/bf16 cast with a numeric check, engine build) on a :class:`DepthSpec`; artifacts go to
``onnx_exports/depth_anything/`` as ``<stem>.onnx``, ``<stem>_<prec>.onnx``, ``<stem>_<prec>.engine``
and the build report ``<stem>_<prec>.json``. Int8/fp8/int4 Q/DQ graphs are not offered for Depth
Anything: their calibration data path is VGGT's (multi-view batches in [0, 1]).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, MissingDependencyError, WeightsError
from ..graph.export import weight_bytes
from ..graph.io import EXTERNAL_DATA_THRESHOLD, staged_save
from ..precisions import CAST_PRECISIONS
from ..recon.geometry import is_torch
from ..runtime.base import Runner, TensorMeta, torch_device
from ..runtime.ort_runner import OrtRunner
from ..runtime.trt_runner import TrtRunner
from ..views import ViewRange
from .convert import ConvertOptions, check_writable, clean_graph, convert_precisions, drop_intermediates, timed
from .stem_set import publish_reports, stem_run

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
INPUT_NAME, OUTPUT_NAME = "pixel_values", "predicted_depth"
DEPTH_PRECISIONS = ("fp32",) + CAST_PRECISIONS

# backbone (DINOv2) and DPT-neck sizes; "vits" matches Depth-Anything-V2-Small-hf
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"backbone": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "mlp_ratio": 2,
                          "image_size": 56, "out_indices": [1, 2, 3, 4]},
             "reassemble_hidden_size": 32, "neck_hidden_sizes": [8, 16, 32, 32], "fusion_hidden_size": 16,
             "head_hidden_size": 8},
    "vits": {"backbone": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
                          "image_size": 518, "out_indices": [3, 6, 9, 12]},
             "reassemble_hidden_size": 384, "neck_hidden_sizes": [48, 96, 192, 384], "fusion_hidden_size": 64,
             "head_hidden_size": 32},
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("Depth Anything needs transformers: pip install -r requirements-live.txt") from exc
    return transformers


def preset_config(name: str) -> Any:
    """A ``DepthAnythingConfig`` (relative depth) for a preset name."""
    tf = _transformers()
    if name not in PRESETS:
        raise InputError(f"unknown Depth Anything preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    bb = dict(p["backbone"])
    n = bb.pop("out_indices")
    backbone = tf.Dinov2Config(**bb, patch_size=14, out_indices=n, reshape_hidden_states=False)
    return tf.DepthAnythingConfig(backbone_config=backbone, patch_size=14, depth_estimation_type="relative",
                                  **{k: v for k, v in p.items() if k != "backbone"})


def build_depth_model(name: str = DEFAULT_MODEL, random_init: bool = False, seed: int = 0,
                      allow_download: bool = False) -> Any:
    """``DepthAnythingForDepthEstimation`` in eval mode: a preset (seeded random), or hub id / local snapshot."""
    tf = _transformers()
    import torch

    if name in PRESETS or random_init:
        config = preset_config(name if name in PRESETS else "vits")
        torch.manual_seed(seed)
        model = tf.DepthAnythingForDepthEstimation(config)
        _normalise_random_head(model, config.backbone_config.image_size)
        logger.info("Depth Anything %s: seeded random weights (seed %d); outputs are not meaningful depth", name, seed)
        return model.eval()
    try:
        model = tf.DepthAnythingForDepthEstimation.from_pretrained(name, local_files_only=not allow_download)
    except OSError as exc:
        raise WeightsError(f"cannot load Depth Anything {name!r}"
                           + ("" if allow_download else " from the local Hugging Face cache (no download asked)")
                           + f": {exc}; use a local snapshot dir, --depth_allow_download, or a preset "
                             f"({', '.join(PRESETS)})") from exc
    if model.config.depth_estimation_type != "relative":
        logger.warning("%s predicts metric depth (not disparity); the live fit assumes relative inverse depth", name)
    return model.eval()


def _normalise_random_head(model: Any, size: int) -> None:
    """Random init gives a near-constant ~0 map; rescale the last conv so the output is ~1 +- 0.3 (positive,
    varied), which a scale/shift fit can use."""
    import torch

    seen: list[torch.Tensor] = []
    conv = model.head.conv3
    hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            conv.bias.zero_()
            model(pixel_values=torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
            std = float(seen[0].std())
            conv.weight.mul_(0.3 / max(std, 1e-12))
            conv.bias.fill_(1.0)
    finally:
        hook.remove()


def normalize(images01: Any) -> Any:
    """``[S, 3, H, W]`` RGB in [0, 1] -> ImageNet-normalised float32 (what the model's processor does).

    Numpy arrays stay on the host; torch tensors are normalised on their own device.
    """
    if x_is_torch := is_torch(images01):
        x = images01.float()
    else:
        x = np.asarray(images01, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"Depth Anything input must be [S, 3, H, W], found {list(x.shape)}")
    if x.shape[2] % 14 or x.shape[3] % 14:
        raise InputError(f"Depth Anything input height/width must be multiples of 14, found {list(x.shape[2:])}")
    if x_is_torch:
        import torch

        mean = torch.as_tensor(IMAGENET_MEAN, device=x.device)
        std = torch.as_tensor(IMAGENET_STD, device=x.device)
        return (x - mean) / std
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def input_size(height: int, width: int, target: int = 518) -> tuple[int, int]:
    """Size keeping the aspect ratio with the shorter side near ``target``, both sides multiples of 14."""
    if min(height, width) <= 0:
        raise InputError(f"image size must be positive, found {height}x{width}")
    s = target / min(height, width)
    return max(14, int(round(height * s / 14)) * 14), max(14, int(round(width * s / 14)) * 14)


class DepthTorchRunner(Runner):
    """Depth Anything in PyTorch behind the shared runner interface (``pixel_values`` -> ``predicted_depth``).

    Any batch size; feeds may be host arrays or tensors on the runner's device, and outputs stay on the
    device. ``fp16``/``bf16`` cast the weights (faster than autocast at these sizes); ``compile`` runs the
    model through ``torch.compile`` (about 20 s once, then about half the time per batch on an H200).
    """

    backend = "torch"

    def __init__(self, model_name: str = DEFAULT_MODEL, device: str = "auto", precision: str = "fp32",
                 random_init: bool = False, seed: int = 0, allow_download: bool = False, model: Any = None,
                 compile: bool = False) -> None:
        super().__init__(f"torch:depth-anything:{model_name}:{precision}{'+compile' if compile else ''}")
        if precision not in DEPTH_PRECISIONS:
            raise InputError(f"Depth Anything torch precision must be fp32, fp16 or bf16, found {precision!r}")
        self.model_name, self.requested_device, self.precision = model_name, device, precision
        self.random_init, self.seed, self.allow_download, self._given = random_init, seed, allow_download, model
        self.compile = compile
        self.model: Any = None
        self._forward: Any = None

    def activate_impl(self) -> None:
        import torch

        self.device = torch_device(self.requested_device)
        model = self._given if self._given is not None else build_depth_model(
            self.model_name, self.random_init, self.seed, self.allow_download)
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.model = model.to(self.device, self._dtype).eval()
        self._forward = torch.compile(self.model) if self.compile else self.model
        self.timing_method = "cuda-events" if self.device.startswith("cuda") else "perf_counter"

    def deactivate_impl(self) -> None:
        self.model = self._forward = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta(INPUT_NAME, (None, 3, None, None), "float32")]

    def output_names_impl(self) -> list[str]:
        return [OUTPUT_NAME]

    def infer_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        x = feeds[INPUT_NAME]
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        x = x.to(self.device, self._dtype, non_blocking=True)
        cuda = self.device.startswith("cuda")
        t0 = time.perf_counter()
        with torch.inference_mode():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self._forward(pixel_values=x).predicted_depth.float()
                end.record()
                end.synchronize()
                self.last_inference_ms = start.elapsed_time(end)
            else:
                out = self._forward(pixel_values=x).predicted_depth.float()
                self.last_inference_ms = (time.perf_counter() - t0) * 1e3
        return {OUTPUT_NAME: out}


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class DepthSpec:
    """One Depth Anything export: fixed ``[batch, 3, height, width]`` input (same fields the VGGT stages use)."""

    model: str = "vits"
    batch: int = 1
    height: int = 518
    width: int = 518
    opset: int = 18
    input_name: str = INPUT_NAME

    def __post_init__(self) -> None:
        if self.batch < 1 or self.height % 14 or self.width % 14 or min(self.height, self.width) < 14:
            raise InputError(f"Depth Anything export needs batch >= 1 and height/width multiples of 14, found "
                             f"{self.batch}x{self.height}x{self.width}")

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.shape_at(self.batch)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME,)

    # the fixed batch axis seen as the conversion stages see VGGT's view axis (graph.export.ExportSpec)
    dynamic_views = False

    @property
    def num_cams(self) -> int:
        return self.batch

    @property
    def view_range(self) -> ViewRange:
        return ViewRange(self.batch, self.batch, self.batch)

    def shape_at(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.height, self.width)

    @property
    def stem(self) -> str:
        tag = self.model.rstrip("/").split("/")[-1].lower()
        return f"depth_anything-{tag}-{self.batch}x3x{self.height}x{self.width}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stem": self.stem, "outputs": list(self.output_names)}


def export_depth_onnx(model: Any, out_path: str | os.PathLike, spec: DepthSpec) -> dict[str, Any]:
    """Export with the dynamo exporter into a temporary folder, then rename into place (data files first)."""
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).predicted_depth

    out = Path(out_path)
    sample = torch.rand(spec.input_shape, generator=torch.Generator().manual_seed(0))
    external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    t0 = time.perf_counter()
    with staged_save(out) as tmp_dir, torch.no_grad():
        program = torch.onnx.export(_Wrapper(model.eval()).eval(), (sample,), dynamo=True, opset_version=spec.opset,
                                    input_names=[spec.input_name], output_names=list(spec.output_names),
                                    external_data=external, optimize=True, verbose=False)
        program.save(str(tmp_dir / out.name), external_data=external)
    seconds = time.perf_counter() - t0
    logger.info("exported %s in %.1f s", out.name, seconds)
    return {"path": str(out), "exporter": "dynamo", "seconds": round(seconds, 3), "spec": spec.to_dict()}


def convert_depth_anything(spec: DepthSpec, out_dir: str | os.PathLike = "onnx_exports/depth_anything",
                           precisions: Sequence[str] = ("fp16",), *, random_init: bool = False, seed: int = 0,
                           allow_download: bool = False, backend: str = "auto", skip_build: bool = False,
                           no_simplify: bool = False, verify: bool = True, workspace_gb: float = 8.0,
                           compute_capabilities: Sequence[str] = (), keep_intermediate: bool = False
                           ) -> list[dict[str, Any]]:
    """Export Depth Anything, then run the VGGT conversion stages on it; one report per precision.

    The raw, ``.NOSEQ`` and ``.simp`` graphs are removed unless ``keep_intermediate`` or a report names one
    as its final graph (fp32).
    """
    bad = [p for p in precisions if p not in DEPTH_PRECISIONS]
    if bad:
        raise InputError(f"Depth Anything precisions: {', '.join(DEPTH_PRECISIONS)}; not {bad} (Q/DQ precisions "
                         "need VGGT-style calibration batches)")
    out = Path(out_dir)
    check_writable(out)
    model = build_depth_model(spec.model, random_init, seed, allow_download)
    with stem_run(out, spec.stem, precisions, None) as run:  # the run owns its stem (pipelines/stem_set.py)
        opts = ConvertOptions(output_dir=run.staging, cache_dir=out, opset=spec.opset, precisions=tuple(precisions),
                              backend=backend, workspace_gb=workspace_gb,
                              compute_capabilities=tuple(compute_capabilities), no_simplify=no_simplify,
                              skip_build=skip_build, verify=verify)
        timings: dict[str, float] = {}
        raw = run.staging / f"{spec.stem}.onnx"
        shared: dict[str, Any] = {"export": timed(timings, "export", export_depth_onnx, model, raw, spec)}
        shared["export"]["random_weights"] = bool(random_init or spec.model in PRESETS)
        del model
        final, large = clean_graph(raw, spec, opts, timings, shared)
        reports = convert_precisions(opts, spec, final, timings, shared, large, extra={"model": "depth-anything"})
        if not keep_intermediate:
            drop_intermediates(run.staging, spec.stem, raw, reports)
        return publish_reports(run, reports)


# --------------------------------------------------------------------------- runners and the worker pool


def find_depth_model(directory: str | os.PathLike, height: int, width: int, backend: str = "auto") -> Path:
    """The engine (or, for ``backend="onnx"``, the ONNX graph) in ``directory`` whose input is 1x3xHxW."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"--depth_engine_dir: not a directory: {d}")
    suffixes = {"engine": (".engine", ".plan"), "onnx": (".onnx",), "auto": (".engine", ".plan", ".onnx")}[backend]
    tag = f"-1x3x{height}x{width}"
    for suffix in suffixes:
        found = sorted(p for p in d.glob(f"*{suffix}") if tag in p.name and ".NOSEQ" not in p.name)
        if found:
            pick = min(found, key=lambda p: (".simp" in p.name, "_fp32" in p.name, p.name))
            logger.info("Depth Anything model for %dx%d: %s (of %d candidates)", height, width, pick, len(found))
            return pick
    have = sorted(p.name for p in d.iterdir() if p.suffix in (".engine", ".plan", ".onnx"))
    raise InputError(f"--depth_engine_dir {d}: no Depth Anything model with input 1x3x{height}x{width} "
                     f"({'/'.join(suffixes)}); found {have or 'nothing'}. Build one with "
                     f"python -m vggt_trt.cli.depth_anything --height {height} --width {width}")


class DepthPool:
    """Depth Anything for a whole batch of cameras: ``workers`` runners, each taking a share of the batch.

    One worker (the default for PyTorch) runs the batch in one forward, which is what a GPU wants. More
    workers help where several engine execution contexts (or GPUs) can run at once: each runs its share
    in its own thread. A runner with a fixed batch size (a TensorRT engine or ONNX graph exported for B
    images) gets its share in slices of B, the last one padded.
    """

    def __init__(self, runner_factory: Callable[[], Runner], workers: int = 1, timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise InputError(f"--depth-workers must be >= 1, found {workers}")
        self.factory, self.workers, self.timeout_s = runner_factory, workers, timeout_s
        self._runners: list[Runner] = []
        self._executor: cf.ThreadPoolExecutor | None = None
        self.last_ms: list[float] = []

    def __enter__(self) -> "DepthPool":
        try:
            for _ in range(self.workers):
                self._runners.append(self.factory().activate())
        except BaseException:
            self.__exit__()
            raise
        if self.workers > 1:
            self._executor = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="depth")
        logger.info("Depth Anything: %d worker(s), whole batches (%s)", self.workers, self._runners[0].name)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for runner in self._runners:
            runner.deactivate()
        self._runners.clear()

    def info(self) -> dict[str, Any]:
        return {"workers": self.workers, "runner": self._runners[0].info() if self._runners else None}

    @staticmethod
    def _run(runner: Runner, x: Any) -> tuple[Any, float]:
        """Disparity for one share ``x`` (normalised), in slices of the runner's fixed batch size if it has one."""
        meta = runner.input_metadata()[0]
        if runner.backend != "torch" and is_torch(x):
            x = x.cpu().numpy()
        step = meta.shape[0] or len(x)
        outs, total_ms = [], 0.0
        for start in range(0, len(x), step):
            part = x[start:start + step]
            n = len(part)
            if n < step:
                part = _concat([part] + [part[-1:]] * (step - n))
            out = next(iter(runner.infer_device({meta.name: part}).values()))
            total_ms += float(runner.last_inference_ms or 0.0)
            outs.append(out.reshape(step, *out.shape[-2:])[:n])
        return _concat(outs), total_ms

    def infer(self, images01: Any) -> Any:
        """Disparity ``[S, H, W]`` for RGB ``[S, 3, H, W]`` in [0, 1] (normalised here).

        A torch tensor in gives a float32 tensor on its device out; a numpy array gives numpy.
        """
        if not self._runners:
            raise InputError("DepthPool is not started: use it in a with-block")
        x = normalize(images01)
        as_torch = is_torch(x)
        shares = [s for s in (x.tensor_split(self.workers) if as_torch else np.array_split(x, self.workers)) if len(s)]
        if self._executor is None or len(shares) == 1:
            results = [self._run(self._runners[0], shares[0])] if len(shares) == 1 else \
                [self._run(r, s) for r, s in zip(self._runners, shares)]
        else:
            futures = [self._executor.submit(self._run, r, s) for r, s in zip(self._runners, shares)]
            try:
                results = [f.result(timeout=self.timeout_s) for f in futures]
            except cf.TimeoutError as exc:
                raise RuntimeError(f"Depth Anything worker gave no result within {self.timeout_s:.0f} s") from exc
        self.last_ms = [ms for _, ms in results]
        if as_torch:
            import torch

            return _concat([torch.as_tensor(d).to(x.device, torch.float32) for d, _ in results])
        return np.concatenate([np.asarray(d.float().cpu().numpy() if is_torch(d) else d, np.float32)
                               for d, _ in results])


def _concat(parts: Sequence[Any]) -> Any:
    """Concatenate numpy arrays or torch tensors along the first axis (one part is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    if is_torch(parts[0]):
        import torch

        return torch.cat(list(parts))
    return np.concatenate(parts)


def depth_runner_factory(model_name: str = DEFAULT_MODEL, depth_dir: str | os.PathLike | None = None,
                         height: int = 518, width: int = 518, backend: str = "auto", device: str = "auto",
                         precision: str = "fp32", random_init: bool = False, seed: int = 0,
                         allow_download: bool = False, compile: bool = False) -> Callable[[], Runner]:
    """A factory for the pool: engine/ONNX from ``depth_dir`` when given, else PyTorch (one shared model)."""
    if depth_dir is not None and backend != "torch":
        path = find_depth_model(depth_dir, height, width, backend)
        if path.suffix == ".onnx":
            return lambda: OrtRunner(path)
        return lambda: TrtRunner(path)
    model = build_depth_model(model_name, random_init, seed, allow_download)
    return lambda: DepthTorchRunner(model_name, device=device, precision=precision, model=model, compile=compile)
