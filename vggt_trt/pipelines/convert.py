"""The conversion pipeline behind vggt_to_trt.py: export, sequence removal, simplify, check,
precision graph, engine build, build report. Each stage is a plain function over paths.

The stages after the export are model-agnostic (:func:`clean_graph`, :func:`convert_precisions`): VGGT
(:func:`convert`) and Depth Anything (:mod:`vggt_trt.pipelines.depth_anything`) are two export targets
over them. ``spec`` is any export config with ``stem``, ``input_name``, ``input_shape`` and ``to_dict()``.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..accuracy import format_accuracy_table
from ..atomic import write_json_atomic
from ..errors import AccuracyError, BuildError, GraphError, InputError, MissingDependencyError
from ..graph.export import ExportSpec, export_onnx
from ..graph.io import (EXTERNAL_DATA_THRESHOLD, graph_bytes, io_summary, load_onnx, node_count, onnx_sha256,
                        remove_graphs, save_onnx, save_sharing)
from ..graph.ort import assert_accuracy, compare_onnx_ort
from ..graph.precision_cast import cast_precision_file
from ..graph.qdq import has_activation_qdq, strip_activation_qdq
from ..graph.sequences import assert_no_sequence_ops, remove_sequence_ops, repair_opset
from ..graph.simplify import check_model, simplify
from ..graph.views import check_view_axis, read_view_range, write_view_range
from ..logs import quiet_third_party
from ..model.vggt import VGGT
from ..model.weights import build_model, config_for_model_name
from ..precisions import CAST_PRECISIONS, PRECISIONS, QDQ_PRECISIONS
from ..quant.calib import CalibrationSet, calibration_set
from ..quant.modes import ACTIVATION_QUANT_MODES, apply_quant_mode, finalize_quant_mode_graph
from ..quant.ptq import accuracy_report, qdq_summary, quantize_onnx
from ..quant.trt10_calibrator import make_entropy_calibrator
from ..views import ViewRange
from .disk import (WRITE_SLACK, build_writes, cast_writes, pass_writes, quantize_writes, simplify_writes,
                   writes)
from .stem_set import publish_reports, stem_run
# modules, not names: tests (and users) swap import_tensorrt / build_engine on them
from ..trt import backend as trt_backend
from ..trt import build as trt_build

logger = logging.getLogger(__name__)

REQUIRED_OUTPUTS = ("pose_enc", "depth", "depth_conf")
# Largest graph (bytes of weights) whose cast/quantised copy is also checked numerically on CPU by default.
VERIFY_MAX_BYTES = 512 << 20
# Graphs above this size run their heavy stages (simplify, cast, quantise, build) in a fresh process each.
ISOLATE_BYTES = 1 << 30
CAST_TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2}


@dataclass
class ConvertOptions:
    """Every knob of one conversion run (the CLI flags of vggt_to_trt.py)."""

    output_dir: Path = Path("onnx_exports")
    export: bool = False
    onnx_in: Path | None = None
    num_cams: int | None = None  # None: 8 for --export, the graph's for --onnx-in
    min_cams: int | None = None  # with max_cams: one graph and engine for min..max views (num_cams: the optimum)
    max_cams: int | None = None
    height: int | None = None  # None: 518 for --export, the graph's for --onnx-in
    width: int | None = None
    pcd_only: bool = False
    model_name: str = "facebook/VGGT-1B"
    weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    opset: int = 18
    precisions: tuple[str, ...] = ("fp16",)
    quant_mode: str = "none"
    workspace_gb: float = 32.0
    opt_level: int = 5
    max_aux_streams: int = 4
    no_simplify: bool = False
    backend: str = "auto"
    skip_build: bool = False
    compute_capabilities: tuple[str, ...] = ()
    calib_data: str | None = None
    calib_batches: int = 32
    calib_seed: int = 1337
    calib_cpu: bool = False
    int8_calibrator: bool = False  # TensorRT 10 only: IInt8EntropyCalibrator2 + calibration cache instead of Q/DQ
    verify: bool | None = None  # None: verify when the graph is small enough for CPU
    keep_intermediate: bool = False  # keep the raw, .NOSEQ and .simp graphs that are not a final graph
    timings: dict[str, float] = field(default_factory=dict)
    cache_dir: Path | None = None  # timing and calibration caches (None: output_dir); artifacts are staged elsewhere

    @property
    def caches(self) -> Path:
        return self.output_dir if self.cache_dir is None else self.cache_dir

    def validate(self) -> None:
        if not self.export and self.onnx_in is None:
            raise InputError("nothing to convert: pass --export (export VGGT first) or --onnx-in PATH")
        if self.export and self.onnx_in is not None:
            raise InputError("--export and --onnx-in exclude each other")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise InputError(f"unknown precision {bad}; choose from {', '.join(PRECISIONS)}")
        if self.onnx_in is None:
            self.export_spec()
        if any(p in QDQ_PRECISIONS for p in self.precisions) or self.quant_mode != "none":
            if self.calib_batches < 1:
                raise InputError(f"--calib-batches must be at least 1, found {self.calib_batches}")
        if self.quant_mode in ACTIVATION_QUANT_MODES and all(p in QDQ_PRECISIONS for p in self.precisions):
            raise InputError(f"--quant-mode {self.quant_mode} already quantises the activations (Q/DQ in the graph); "
                             f"--precision {'/'.join(self.precisions)} would quantise it a second time: use fp32, "
                             "fp16 or bf16 (the quantised layers stay as the mode made them)")
        if self.int8_calibrator and "int8" not in self.precisions:
            raise InputError("--int8-calibrator applies to int8 only: add --precision int8 (or --all-precisions)")
        if self.int8_calibrator and self.quant_mode != "none":
            raise InputError(f"--int8-calibrator cannot be combined with --quant-mode {self.quant_mode}: the quant mode "
                             "puts Q/DQ nodes into the graph, and TensorRT ignores a calibrator on an explicitly "
                             "quantised network")
        if self.int8_calibrator and self.skip_build:
            raise InputError("--int8-calibrator calibrates inside the TensorRT 10 build and cannot be combined with "
                             "--skip-build; for a calibrated graph without a build use the Q/DQ path "
                             "(--precision int8 without --int8-calibrator)")
        check_writable(self.output_dir)

    def export_spec(self) -> ExportSpec:
        return ExportSpec(or_default(self.num_cams, DEFAULT_NUM_CAMS), or_default(self.height, DEFAULT_SIZE),
                          or_default(self.width, DEFAULT_SIZE), self.pcd_only, self.opset,
                          min_cams=self.min_cams, max_cams=self.max_cams)


DEFAULT_NUM_CAMS, DEFAULT_SIZE = 8, 518


def or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {directory}: {e}") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"output directory is not writable: {directory}")


def preflight_build(opts: ConvertOptions) -> None:
    """Reject missing TensorRT modules and precision/target combinations before any export work."""
    if opts.skip_build:
        return
    trt, info = trt_backend.import_tensorrt(opts.backend)
    for precision in opts.precisions:
        trt_build.resolve_compute_capabilities(trt, info, precision, list(opts.compute_capabilities) or None)
    if opts.int8_calibrator:
        _require_calibrator_backend(info)


def _require_calibrator_backend(info: Any) -> None:
    """--int8-calibrator needs TensorRT 10 (weakly typed networks with precision flags and INT8 calibrators)."""
    if not info.has_precision_flags or info.strongly_typed_only:
        raise InputError(f"--int8-calibrator needs TensorRT 10 (IInt8EntropyCalibrator2 on a weakly typed network); "
                         f"{info.name} {info.version} builds strongly typed networks only and has no INT8 "
                         "calibrator: use the Q/DQ path instead (--precision int8 without --int8-calibrator), or "
                         "install TensorRT 10 on a GPU machine: pip install \"tensorrt-cu12<11\" (plain "
                         "`pip install tensorrt` now gives TensorRT 11)")


def _int8_calibrator(onnx_path: Path, opts: ConvertOptions) -> Any:
    """The TensorRT 10 entropy calibrator for ``onnx_path`` (fp32 graph), its cache in the output directory."""
    trt, info = trt_backend.import_tensorrt(opts.backend)
    _require_calibrator_backend(info)
    spec = spec_from_onnx(onnx_path, opts)
    return make_entropy_calibrator(trt, calibration(opts, spec), opts.caches, input_name=spec.input_name,
                                   input_shape=spec.input_shape, graph_fingerprint=onnx_sha256(onnx_path))


def spec_from_onnx(path: Path, opts: ConvertOptions | None = None) -> ExportSpec:
    """Read the export shape from an existing graph; raise InputError when it is not a VGGT graph.

    A graph with a dynamic view axis takes its range from its metadata, or from ``--min-cams``/``--max-cams``
    (with ``--num-cams`` as the optimum), which also override the metadata.
    """
    if not path.is_file():
        raise InputError(f"--onnx-in: file not found: {path}")
    try:
        io = io_summary(path)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError & co for a non-ONNX file
        raise InputError(f"--onnx-in: {path} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    inputs, outputs = io["inputs"], {o["name"] for o in io["outputs"]}
    shape = inputs[0]["shape"] if len(inputs) == 1 else None
    missing = [o for o in REQUIRED_OUTPUTS if o not in outputs]
    if shape is None or len(shape) != 4 or shape[1] != 3 or missing or not all(isinstance(d, int) for d in shape[1:]):
        raise InputError(
            f"--onnx-in: {path} is not a VGGT graph: expected one input [N,3,H,W] (N may be dynamic) and outputs "
            f"{list(REQUIRED_OUTPUTS)}; found inputs {[(i['name'], i['shape']) for i in inputs]}, "
            f"outputs {sorted(outputs)}"
        )
    common = dict(pcd_only="world_points" not in outputs, input_name=inputs[0]["name"])
    check_pcd_flag(path, opts, common["pcd_only"])
    flags = opts is not None and opts.min_cams is not None
    if isinstance(shape[0], int):
        if flags:
            raise InputError(f"--onnx-in: {path} takes exactly {shape[0]} views (a fixed view axis); --min-cams/"
                             "--max-cams need a graph exported with them (vggt_to_trt.py --export --min-cams A "
                             "--max-cams B)")
        check_shape_flags(path, opts, shape[0], shape[2], shape[3])
        return ExportSpec(shape[0], shape[2], shape[3], **common)
    check_shape_flags(path, opts, None, shape[2], shape[3])
    views = (ViewRange(opts.min_cams, or_default(opts.num_cams, DEFAULT_NUM_CAMS), opts.max_cams) if flags
             else read_view_range(path))
    if views is None:
        raise InputError(f"--onnx-in: {path} has a dynamic view axis ({shape[0]!r}) but no recorded view range; "
                         "pass --min-cams A --max-cams B (and --num-cams as the optimum)")
    return ExportSpec(views.opt, shape[2], shape[3], min_cams=views.min, max_cams=views.max, **common)


def check_shape_flags(path: Path, opts: ConvertOptions | None, views: int | None, height: int, width: int) -> None:
    """Refuse --num-cams/--height/--width that contradict the shape of the --onnx-in graph (None: not fixed)."""
    if opts is None:
        return
    given = (("--num-cams", opts.num_cams, views), ("--height", opts.height, height), ("--width", opts.width, width))
    wrong = [f"{flag} {mine} but the graph takes {theirs}" for flag, mine, theirs in given
             if mine is not None and theirs is not None and mine != theirs]
    if wrong:
        raise InputError(f"--onnx-in: {path} is {views if views is not None else 'N'}x3x{height}x{width}: "
                         f"{'; '.join(wrong)} (drop the flag, or export a graph of that shape)")


def check_pcd_flag(path: Path, opts: ConvertOptions | None, pcd_only: bool) -> None:
    """Refuse --pcd-only for an --onnx-in graph that has the point head (its outputs decide what it is)."""
    if opts is not None and opts.pcd_only and not pcd_only:
        raise InputError(f"--onnx-in: {path} has the point head (world_points outputs) but --pcd-only was given: drop "
                         "it, or export a pcd-only graph (vggt_to_trt.py --export --pcd-only)")


def keep_view_axis(path: Path, spec: ExportSpec, stage: str) -> None:
    """After a pass over a dynamic-view graph: check the axis is still symbolic and carry the range along."""
    if spec.dynamic_views:
        check_view_axis(path, spec.input_name, stage)
        write_view_range(path, spec.view_range)


def calibration(opts: ConvertOptions, spec: ExportSpec) -> CalibrationSet:
    """The calibration plan for ``--calib-data`` (loaded lazily, so a cached Q/DQ graph skips the images)."""
    return calibration_set(opts.calib_data, spec.num_cams, spec.height, spec.width,
                           num_batches=opts.calib_batches, seed=opts.calib_seed)


def model_weight_bytes(model_name: str) -> int:
    """fp32 weight bytes of the model ``model_name`` resolves to, counted on the meta device (no allocation)."""
    import torch

    with torch.device("meta"):
        model = VGGT(config_for_model_name(model_name))
    return sum(p.numel() * 4 for p in model.parameters())


def calibration_providers(calib_cpu: bool) -> tuple[str, ...]:
    """ONNX Runtime providers for ModelOpt calibration: the CUDA EP when installed, unless --calib-cpu."""
    import onnxruntime as ort

    if calib_cpu:
        logger.info("calibration on the host (--calib-cpu)")
        return ("cpu",)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        logger.info("calibration with the ONNX Runtime CUDA execution provider (--calib-cpu keeps it on the host)")
        return ("cuda:0", "cpu")
    logger.info("calibration on the host: this onnxruntime has no CUDA execution provider (onnxruntime-gpu has)")
    return ("cpu",)


def _export_writes(opts: ConvertOptions, spec: ExportSpec, dst: Path) -> tuple[Path, int]:
    return dst, model_weight_bytes(opts.model_name) + WRITE_SLACK


@writes(_export_writes)
def stage_export(opts: ConvertOptions, spec: ExportSpec, dst: Path) -> dict[str, Any]:
    """Build the model (weights or seeded random), apply the quant mode, export to ``dst``."""
    model = build_model(opts.model_name, weights=opts.weights, random_init=opts.random_init, seed=opts.seed)
    random_weights = bool(opts.random_init or (opts.weights is None and model.cfg.name == "tiny"))
    report: dict[str, Any] = {"model": model.cfg.name, "random_weights": random_weights}
    quant: dict[str, Any] | None = None
    if opts.quant_mode != "none":
        calib = calibration(opts, spec) if opts.quant_mode == "modelopt-fp8" else None
        quant = apply_quant_mode(model, opts.quant_mode, calib)
    report.update(export_onnx(model, dst, spec))
    if quant is not None:
        report["quant_mode"] = finalize_quant_mode_graph(dst, quant)
    return report


@writes(pass_writes)
def stage_remove_sequences(src: Path, dst: Path, opset: int) -> dict[str, Any]:
    """Rewrite sequence ops into tensor ops and repair the opset; writes ``dst`` (.NOSEQ.onnx).

    The pass never changes weights: ``dst`` holds the graph structure only and references the external
    data file of ``src`` (a streamed copy when ``dst`` is in another folder), so a 4.6 GB graph is
    neither loaded nor copied. A small graph with sequence ops is rewritten in memory (shape inference).
    """
    structure = load_onnx(src, load_external_data=False)
    try:
        assert_no_sequence_ops(structure)
    except GraphError as found:
        logger.info("%s has sequence ops (%s); rewriting them", src.name, found)
        large = graph_bytes(src) > EXTERNAL_DATA_THRESHOLD  # then the pass edits the structure only
        model = structure if large else load_onnx(src)
        before = node_count(model)
        model = repair_opset(remove_sequence_ops(model), opset)
        assert_no_sequence_ops(model)
        if large:
            save_sharing(model, src.parent, dst)
        else:
            save_onnx(model, dst, restore=False)
        return {"path": str(dst), "sequence_ops": "rewritten", "nodes_before": before, "nodes_after": node_count(model)}
    header = repair_opset(structure, opset)
    save_sharing(header, src.parent, dst)
    logger.info("%s: no sequence ops; opset/IR header repaired, tensors shared with %s", dst.name, src.name)
    return {"path": str(dst), "sequence_ops": "none found", "nodes_before": node_count(header),
            "nodes_after": node_count(header)}


@writes(simplify_writes)
def stage_simplify(src: Path, dst: Path, skip: bool) -> dict[str, Any]:
    return simplify(src, dst, skip=skip).to_dict()


def stage_check(path: Path) -> dict[str, Any]:
    check_model(path)
    return {"path": str(path), "checker": "passed"}


def verification_feeds(spec: ExportSpec, seed: int = 7) -> dict[int, dict[str, np.ndarray]]:
    """Random inputs per checked view count: the export shape, plus the ends of a dynamic view range."""
    rng = np.random.default_rng(seed)
    r = spec.view_range
    return {n: {spec.input_name: rng.random(spec.shape_at(n), dtype=np.float32)} for n in sorted({r.min, r.opt, r.max})}


def without_activation_qdq(src: Path, dst: Path, tmp: Path) -> tuple[Path, Path, int]:
    """``src`` and ``dst``, or copies of both in ``tmp`` without activation Q/DQ when ``src`` has any
    (:mod:`vggt_trt.graph.qdq`); returns the two paths and the quantisers removed from ``dst``."""
    ref = load_onnx(src)
    if not has_activation_qdq(ref):
        return src, dst, 0
    strip_activation_qdq(ref)
    save_onnx(ref, tmp / "ref.onnx", restore=False)
    del ref
    test = load_onnx(dst)
    stripped = strip_activation_qdq(test)
    save_onnx(test, tmp / "test.onnx", restore=False)
    return tmp / "ref.onnx", tmp / "test.onnx", stripped


@writes(cast_writes)
def stage_cast(src: Path, dst: Path, precision: str, spec: ExportSpec, verify: bool) -> dict[str, Any]:
    """fp16/bf16 strongly typed graph, checked against the fp32 graph with ONNX Runtime (or the reference evaluator)."""
    summary = cast_precision_file(src, dst, precision)  # streams the weights: never two copies in memory
    report: dict[str, Any] = {"path": str(dst), "cast_summary": summary}
    if not verify:
        report["verification"] = "skipped: graph too large for a CPU check (pass --verify to force)"
        logger.info("%s: numeric check skipped (graph too large for CPU; --verify forces it)", dst.name)
        return report
    backend = "reference" if precision == "bf16" else "ort"  # ORT CPU has no bf16 kernels
    with tempfile.TemporaryDirectory(prefix=".cast-check-", dir=dst.parent) as tmp:
        ref, test, stripped = without_activation_qdq(src, dst, Path(tmp))
        checks = {views: compare_onnx_ort(ref, test, feeds, backend=backend)
                  for views, feeds in verification_feeds(spec).items()}
    errors = checks[spec.num_cams]
    report["verification"] = {"against": str(src), "runtime": "onnxruntime-cpu" if backend == "ort" else
                              "onnx.reference", "errors": errors, "tolerance_rel_l2": CAST_TOLERANCE[precision]}
    if stripped:
        report["verification"]["activation_qdq"] = (
            f"removed from both graphs for this check ({stripped} quantisers): it measures the cast; the "
            "quantisation error is measured against fp32 by the quant-mode check")
    if spec.dynamic_views:
        report["verification"]["errors_by_views"] = checks
    for views, found in checks.items():
        try:
            assert_accuracy(found, CAST_TOLERANCE[precision])
        except AccuracyError as exc:
            raise AccuracyError(f"{dst.name} at {views} views: {exc}") from exc
    return report


@writes(quantize_writes)
def stage_quantize(src: Path, dst: Path, precision: str, spec: ExportSpec, opts: ConvertOptions,
                   verify: bool, random_weights: bool) -> dict[str, Any]:
    """Q/DQ graph (ModelOpt ONNX PTQ) calibrated on ``--calib-data``, with its accuracy table."""
    calib = calibration(opts, spec)
    info = quantize_onnx(src, dst, precision, calib, input_name=spec.input_name, cache_dir=opts.caches,
                         calibration_eps=calibration_providers(opts.calib_cpu))
    report: dict[str, Any] = {"path": str(dst), "quantize": info, "qdq": qdq_summary(dst)}
    if verify:
        report["accuracy"] = accuracy_report(src, dst, spec, calib, random_weights=random_weights)
        logger.info("accuracy of %s against fp32:\n%s", dst.name, format_accuracy_table(report["accuracy"]))
    else:
        report["accuracy"] = "skipped: graph too large for a CPU check (pass --verify to force)"
    return report


@writes(build_writes)
def stage_build(onnx_path: Path, engine_path: Path, precision: str, opts: ConvertOptions,
                profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build one engine; ``profile`` (input -> (min, opt, max) shapes) for a graph with a dynamic view axis."""
    calibrator = _int8_calibrator(onnx_path, opts) if opts.int8_calibrator and precision == "int8" else None
    try:
        result = trt_build.build_engine(
            onnx_path, engine_path, precision, backend=opts.backend, workspace_gb=opts.workspace_gb,
            opt_level=opts.opt_level, max_aux_streams=opts.max_aux_streams,
            timing_cache_path=opts.caches / "trt_timing.cache",
            compute_capabilities=list(opts.compute_capabilities) or None, calibrator=calibrator, profile=profile,
        )
    except BuildError:
        if calibrator is not None:
            calibrator.raise_if_failed()  # the calibration failure is the cause worth reporting
        raise
    report = result.to_dict()
    if calibrator is not None:
        calibrator.release()
        if calibrator.failure is not None:  # TensorRT built on partial calibration data: do not keep it
            engine_path.unlink(missing_ok=True)
            calibrator.raise_if_failed()
        report["int8_calibration"] = calibrator.report()
    return report


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("vggt-trt", "torch", "onnx", "onnxruntime", "onnxslim", "nvidia-modelopt", "tensorrt",
                "tensorrt-rtx-cu13", "tensorrt_rtx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child_init(log_file: str | None, level: int) -> None:
    quiet_third_party()
    root = logging.getLogger()
    root.setLevel(level)
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [stage process] %(name)s: %(message)s"))
    root.addHandler(handler)
    if log_file:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(levelname)s [stage process] %(name)s: %(message)s"))
        root.addHandler(console)


def _child_call(fn, args, kwargs):
    result = fn(*args, **kwargs)
    return result, peak_rss_gib()


def _log_file() -> str | None:
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


def timed(timings: dict[str, float], name: str, fn: Callable[..., Any], *args: Any, isolate: bool = False,
          **kwargs: Any) -> Any:
    """Run one stage, recording wall time and peak RSS; ``isolate`` runs it in a fresh process.

    Isolation is for graphs of several GB: each heavy stage then starts from an empty heap and
    gives all of its memory back, instead of stacking on what earlier stages left resident.
    """
    t0 = time.perf_counter()
    if isolate:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1, initializer=_child_init, initargs=(_log_file(), logging.getLogger().level)) as pool:
            result, rss = pool.apply(_child_call, (fn, args, kwargs))
        where = "stage process peak RSS"
    else:
        result, rss = fn(*args, **kwargs), peak_rss_gib()
        where = "process peak RSS so far"
    timings[name] = round(time.perf_counter() - t0, 3)
    timings[f"{name}_peak_rss_gib"] = round(rss, 3)
    logger.info("stage %-18s done in %.1f s (%s %.2f GiB)", name, timings[name], where, rss)
    return result


def convert(opts: ConvertOptions) -> list[dict[str, Any]]:
    """Run the whole pipeline; returns one build report per precision (also written as JSON).

    The artifacts are produced in a staging folder and published together when every stage succeeded
    (:mod:`vggt_trt.pipelines.stem_set`: the run owns its stem in the output folder).
    """
    opts.validate()
    preflight_build(opts)
    spec = opts.export_spec() if opts.export else spec_from_onnx(Path(opts.onnx_in), opts)
    with stem_run(opts.output_dir, spec.stem, opts.precisions, opts.onnx_in) as run:
        staged = replace(opts, output_dir=run.staging, cache_dir=opts.caches)
        return publish_reports(run, convert_staged(staged, spec))


def convert_staged(opts: ConvertOptions, spec: ExportSpec) -> list[dict[str, Any]]:
    """Every stage of :func:`convert`, writing into ``opts.output_dir`` as it goes."""
    out = opts.output_dir
    timings: dict[str, float] = {}
    shared: dict[str, Any] = {}
    if opts.export:
        raw = out / f"{spec.stem}.onnx"
        shared["export"] = timed(timings, "export", stage_export, opts, spec, raw,
                                 isolate=model_weight_bytes(opts.model_name) > ISOLATE_BYTES)
    else:
        raw = Path(opts.onnx_in)
        logger.info("stage export             skipped: using --onnx-in %s (%s)", raw, spec.stem)
        shared["export"] = {"skipped": f"--onnx-in {raw}"}
    final, large = clean_graph(raw, spec, opts, timings, shared)
    reports = convert_precisions(opts, spec, final, timings, shared, large)
    if not opts.keep_intermediate:
        drop_intermediates(out, spec.stem, raw if opts.export else None, reports)
    return reports


def drop_intermediates(out: Path, stem: str, exported: Path | None, reports: list[dict[str, Any]]) -> list[Path]:
    """Delete the intermediate graphs of ``stem`` (the raw export when this run made it, .NOSEQ, .simp) that no
    report names as its final graph, and the data files no graph left in ``out`` references."""
    keep = {Path(r["onnx"]["path"]).resolve() for r in reports}
    candidates = [p for p in (exported, out / f"{stem}.NOSEQ.onnx", out / f"{stem}.simp.onnx")
                  if p is not None and p.resolve() not in keep]
    removed = remove_graphs(candidates)
    if removed:
        logger.info("removed intermediate files (--keep-intermediate keeps them): %s",
                    ", ".join(p.name for p in removed))
    return removed


def clean_graph(raw: Path, spec: Any, opts: ConvertOptions, timings: dict[str, float],
                shared: dict[str, Any]) -> tuple[Path, bool]:
    """Sequence removal, simplify, the quant-mode check (when the export applied one) and the onnx checker.

    Fills ``shared`` with the stage reports; returns the graph the precision stages start from and
    whether it is large enough for the heavy stages to run in their own processes.
    """
    out = opts.output_dir
    noseq, simp = out / f"{spec.stem}.NOSEQ.onnx", out / f"{spec.stem}.simp.onnx"
    shared["remove_sequences"] = timed(timings, "remove_sequences", stage_remove_sequences, raw, noseq, opts.opset)
    keep_view_axis(noseq, spec, "sequence removal")
    large = graph_bytes(noseq) > ISOLATE_BYTES
    shared["simplify"] = timed(timings, "simplify", stage_simplify, noseq, simp, opts.no_simplify, isolate=large)
    final = Path(shared["simplify"]["path"])
    if final != noseq:
        keep_view_axis(final, spec, "simplification")
    if shared["export"].get("quant_mode"):
        shared["quant_mode_check"] = timed(timings, "quant_mode_check", finalize_quant_mode_graph, final,
                                           shared["export"]["quant_mode"], isolate=large)
        keep_view_axis(final, spec, "the quant-mode check")
    shared["check"] = timed(timings, "check", stage_check, final)
    return final, large


def convert_precisions(opts: ConvertOptions, spec: Any, final: Path, timings: dict[str, float],
                       shared: dict[str, Any], large: bool, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One precision graph, engine and build report per ``opts.precisions``; ``extra`` goes into every report."""
    verify = opts.verify if opts.verify is not None else graph_bytes(final) <= VERIFY_MAX_BYTES
    precisions = opts.precisions
    if opts.quant_mode in ACTIVATION_QUANT_MODES:
        precisions = tuple(p for p in precisions if p not in QDQ_PRECISIONS)
        skipped = [p for p in opts.precisions if p in QDQ_PRECISIONS]
        if skipped:
            logger.info("precisions %s skipped: --quant-mode %s already quantises the activations, so an ONNX "
                        "PTQ precision would quantise the graph twice", ", ".join(skipped), opts.quant_mode)
    reports = []
    for precision in tqdm(precisions, desc="precisions", unit="precision", disable=len(precisions) < 2):
        report = _convert_precision(opts, spec, final, precision, verify, dict(timings), shared, large, extra or {})
        reports.append(report)
    return reports


def _convert_precision(opts: ConvertOptions, spec: Any, final: Path, precision: str, verify: bool,
                       timings: dict[str, float], shared: dict[str, Any], large: bool,
                       extra: dict[str, Any]) -> dict[str, Any]:
    out = opts.output_dir
    report: dict[str, Any] = {"stem": spec.stem, **extra, "precision": precision, "quant_mode": opts.quant_mode,
                              "spec": spec.to_dict(), "versions": versions(), "stages": dict(shared)}
    graph = final
    legacy = _legacy_flags_path(opts.backend, precision)
    if precision in CAST_PRECISIONS and not legacy:
        graph = out / f"{spec.stem}_{precision}.onnx"
        report["stages"]["precision_graph"] = timed(timings, f"cast_{precision}", stage_cast, final, graph,
                                                     precision, spec, verify, isolate=large)
    elif precision in QDQ_PRECISIONS and not (precision == "int8" and opts.int8_calibrator):
        graph = out / f"{spec.stem}_{precision}.onnx"
        report["stages"]["precision_graph"] = timed(timings, f"quantize_{precision}", stage_quantize, final, graph,
                                                     precision, spec, opts, verify,
                                                     bool(shared["export"].get("random_weights")), isolate=large)
    else:
        why = "fp32 needs no precision graph" if precision == "fp32" else \
            "--int8-calibrator: TensorRT 10 calibrates the fp32 graph (IInt8EntropyCalibrator2) during the build" \
            if precision == "int8" else \
            "TensorRT 10 legacy path: weakly typed network with precision flags"
        logger.info("stage precision_graph    skipped for %s: %s", precision, why)
        report["stages"]["precision_graph"] = {"skipped": why}
    if graph != final:
        keep_view_axis(graph, spec, f"the {precision} precision pass")
    report["onnx"] = {"path": str(graph), "sha256": onnx_sha256(graph), "io": io_summary(graph)}
    engine = out / f"{spec.stem}_{precision}.engine"
    if opts.skip_build:
        logger.info("stage build              skipped: --skip-build (final ONNX: %s)", graph)
        report["stages"]["build"] = {"skipped": "--skip-build"}
    else:
        report["stages"]["build"] = timed(timings, f"build_{precision}", stage_build, graph, engine, precision, opts,
                                           spec.profile() if spec.dynamic_views else None, isolate=large)
        report["engine"] = {"path": str(engine), "bytes": engine.stat().st_size}
    if precision == "int8":
        calibration_report = report["stages"]["build"].get("int8_calibration", {})
        report["int8_path"] = {"path": "IInt8EntropyCalibrator2", "cache": calibration_report.get("cache")} \
            if opts.int8_calibrator else {"path": "qdq", "graph": str(graph)}
    report["timings_s"] = timings
    report["random_weights"] = shared.get("export", {}).get("random_weights")
    write_json_atomic(out / f"{spec.stem}_{precision}.json", report)
    logger.info("wrote build report %s", out / f"{spec.stem}_{precision}.json")
    return report


def _legacy_flags_path(backend: str, precision: str) -> bool:
    """True when TensorRT 10 (weakly typed + precision flags) will build fp16/bf16 from the fp32 graph."""
    if precision not in CAST_PRECISIONS:
        return False
    try:
        _, info = trt_backend.import_tensorrt(backend)
    except MissingDependencyError:
        return False
    return bool(info.has_precision_flags)
