"""The quant-mode x precision sweep behind ``run_all_exports.sh``: serially, as local processes, or as Ray tasks.

Each quant mode is one chain of configurations written to ``<base_output>/<mode>/``: ``all-precisions``
(``--export --all-precisions``), then ``fp32`` (``--onnx-in`` the mode's exported graph when it exists);
with ``precisions`` given, one configuration per precision instead of all-precisions (the first exports).
The chain keeps its order; chains are independent and run concurrently with ``jobs > 1`` (threads that
each start the converter as a process) or under Ray (one task per chain with the resources it needs).
A chain's builds share its folder's timing cache, so no two builds of the sweep write one cache at once.

Outcomes per configuration: ``ok`` (exit 0), ``unavailable`` (exit 3, MissingDependencyError: the mode's
fp32 configuration is skipped; a failure under ``strict``), ``FAILED(rc)`` (any other exit), ``skipped``
and ``not run`` (``fail_fast`` after a failure). A failure does not stop the other configurations unless
``fail_fast`` (or ``strict``) is set.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import queue
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import write_json_atomic
from ..cluster import check_shared_folder, ray_session
from ..errors import InputError
from ..precisions import PRECISIONS
from ..resources import GIB, available_memory, describe_location, location, visible_gpu_ids

logger = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3  # vggt_trt.cli.common.EXIT_CODES[MissingDependencyError]
QUANT_MODES_DEFAULT = ("none", "torch-int8-dynamic", "bitsandbytes-8bit", "bitsandbytes-nf4", "bitsandbytes-fp4",
                       "modelopt-fp8")
# Peak RSS of one full-size configuration: the largest measured stage is the TensorRT-RTX fp32 build
# (14.2-15.2 GiB, shared/notes/full-size-export-on-cpu.md; onnxslim 13.5-13.7 GiB, docs/BENCHMARKS.md) + margin.
FULL_SIZE_JOB_GIB = 16.0
TINY_JOB_GIB = 1.0
HOST_RESERVE_GIB = 2.0  # left to the system and the driver when sizing local jobs
TINY_MODELS = ("tiny",)


@dataclass
class SweepOptions:
    """One sweep: the converter, the geometry and calibration flags, and how configurations are run."""

    base_output: Path
    python: str = sys.executable
    converter: Path = Path("vggt_to_trt.py")
    num_cams: int = 8
    height: int = 518
    width: int = 518
    model: str = "facebook/VGGT-1B"
    calib_data: str = ""
    calib_batches: int = 32
    calib_seed: int = 1337
    calib_cpu: bool = False
    pcd_only: bool = False
    extra_args: list[str] = field(default_factory=list)
    quant_modes: list[str] = field(default_factory=lambda: list(QUANT_MODES_DEFAULT))
    precisions: list[str] = field(default_factory=list)  # empty: one --all-precisions configuration per mode
    strict: bool = False
    fail_fast: bool = False
    jobs: int = 1
    ray_address: str | None = None
    mem_per_job_gib: float | None = None  # None: FULL_SIZE_JOB_GIB, or TINY_JOB_GIB for the tiny preset
    cpus_per_job: float = 1.0
    gpus_per_job: int | None = None  # None: 1 when the configuration uses a GPU (see needs_gpu), else 0
    ray_kwargs: dict[str, Any] = field(default_factory=dict)  # cluster.ray_session resources (RAY_ADDRESS=local)
    echo: bool = True  # serial runs copy the converter's output to the console (as the shell script did)

    def validate(self) -> None:
        if not self.quant_modes:
            raise InputError("QUANT_MODES is empty: name at least one quant mode")
        if self.jobs < 1:
            raise InputError(f"JOBS must be >= 1, found {self.jobs}")
        if self.gpus_per_job not in (None, 0, 1):
            raise InputError(f"GPUS_PER_JOB must be 0 or 1, found {self.gpus_per_job}")
        if self.mem_per_job_gib is not None and self.mem_per_job_gib <= 0:
            raise InputError(f"MEM_PER_JOB_GIB must be > 0, found {self.mem_per_job_gib}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise InputError(f"PRECISIONS: unknown {unknown}; use {', '.join(PRECISIONS)}")
        if not Path(self.converter).is_file():
            raise InputError(f"converter not found: {self.converter}")

    @property
    def stem(self) -> str:
        return f"vggt-{self.num_cams}x3x{self.height}x{self.width}" + ("-pcd" if self.pcd_only else "")

    def common_args(self) -> list[str]:
        args = ["--num-cams", str(self.num_cams), "--height", str(self.height), "--width", str(self.width),
                "--model-name", self.model, "--calib-batches", str(self.calib_batches),
                "--calib-seed", str(self.calib_seed)]
        if self.calib_data:
            args += ["--calib-data", self.calib_data]
        if self.calib_cpu:
            args.append("--calib-cpu")
        if self.pcd_only:
            args.append("--pcd-only")
        return args


@dataclass
class ConfigResult:
    """One configuration's outcome, for the summary table and ``sweep.json``."""

    mode: str
    config: str
    result: str  # ok | unavailable | FAILED | skipped | not run
    rc: int | None = None
    seconds: float = 0.0
    where: str = ""
    detail: str = ""
    log: str = ""

    @property
    def failed(self) -> bool:
        return self.result == "FAILED"

    def row(self) -> str:
        result = f"FAILED({self.rc})" if self.failed else self.result
        took = f"{self.seconds:5.0f}s" if self.result not in ("skipped", "not run") else ""
        return f"{self.mode:<20} {self.config:<15} {result:<12} {took:>6}  {self.where:<18} {self.detail}"


# ----------------------------------------------------------------------------------------------- resources
def needs_gpu(opts: SweepOptions, gpus_available: bool) -> bool:
    """A configuration uses a GPU when it builds with full TensorRT or compiles the PyTorch engine on CUDA, and,
    where GPUs exist, when it calibrates without --calib-cpu (ModelOpt uses CUDA when onnxruntime-gpu has it)."""
    extra = opts.extra_args
    backend = extra[extra.index("--backend") + 1] if "--backend" in extra[:-1] else "auto"
    device = extra[extra.index("--device") + 1] if "--device" in extra[:-1] else "auto"
    if backend == "tensorrt" or (backend == "torch" and device != "cpu"):
        return True
    return gpus_available and not opts.calib_cpu


def job_memory_gib(opts: SweepOptions) -> float:
    """Memory one configuration may peak at (the sizing rule in docs/BENCHMARKS.md)."""
    if opts.mem_per_job_gib is not None:
        return opts.mem_per_job_gib
    return TINY_JOB_GIB if opts.model in TINY_MODELS else FULL_SIZE_JOB_GIB


def resources_for(opts: SweepOptions, gpus_available: bool) -> dict[str, float]:
    """What one chain asks for: CPUs, memory in bytes, and 0 or 1 GPU."""
    gpus = opts.gpus_per_job if opts.gpus_per_job is not None else int(needs_gpu(opts, gpus_available))
    return {"num_cpus": opts.cpus_per_job, "memory": int(job_memory_gib(opts) * GIB), "num_gpus": gpus}


def local_jobs(opts: SweepOptions, memory_bytes: int | None = None) -> int:
    """JOBS, capped so that that many configurations at their peak fit in available memory."""
    memory_bytes = available_memory() if memory_bytes is None else memory_bytes
    if memory_bytes is None:
        logger.warning("available memory unknown (no /proc/meminfo): running JOBS=%d without a memory cap",
                       opts.jobs)
        return opts.jobs
    per_job = job_memory_gib(opts)
    fit = max(1, math.floor((memory_bytes / GIB - HOST_RESERVE_GIB) / per_job))
    if fit < opts.jobs:
        logger.warning("JOBS=%d lowered to %d: %.1f GiB available, %.1f GiB reserved, %.1f GiB per configuration "
                       "(MEM_PER_JOB_GIB overrides)", opts.jobs, fit, memory_bytes / GIB, HOST_RESERVE_GIB, per_job)
    return min(opts.jobs, fit)


# ------------------------------------------------------------------------------------------- one chain
def last_error(log: Path) -> str:
    """The last ERROR line of a log (what the converter said), else its last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no output"
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln]
    return (errors or lines or ["no output"])[-1].strip()


def run_config(opts: SweepOptions, mode: str, config: str, args: Sequence[str],
               env: dict[str, str] | None = None) -> ConfigResult:
    """Run the converter for one configuration (``env``: extra variables for it), output to
    ``<mode>/logs/<config>.log`` and, with ``opts.echo``, the console. Interrupted, it stops the converter."""
    out = opts.base_output / mode
    log = out / "logs" / f"{config}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [opts.python, str(opts.converter), *args, "--output-dir", str(out), "--log-dir", str(out / "logs"),
           "--quant-mode", mode, *opts.common_args(), *opts.extra_args]
    where = describe_location({**location(), **({"gpus": env["CUDA_VISIBLE_DEVICES"]}
                                                 if env and "CUDA_VISIBLE_DEVICES" in env else {})})
    logger.info("[%s / %s] on %s: %s (log: %s)", mode, config, where, " ".join(cmd), log)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, **(env or {})})
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                f.write(line)
                if opts.echo:
                    sys.stdout.write(line)
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    took = time.perf_counter() - t0
    if rc == 0:
        result, detail = "ok", str(out)
    elif rc == EXIT_UNAVAILABLE:
        result, detail = "unavailable", f"unavailable here: {last_error(log)}"
    else:
        result, detail = "FAILED", last_error(log)
    return ConfigResult(mode, config, result, rc, round(took, 1), where, detail, str(log))


def run_chain(opts: SweepOptions, mode: str, env: dict[str, str] | None = None) -> list[ConfigResult]:
    """One quant mode: all-precisions (or, with ``opts.precisions``, each of them: the first exports), then fp32
    from the exported graph. After an unavailable first configuration the rest is skipped."""
    first_name, first_args = ("all-precisions", ["--all-precisions"]) if not opts.precisions else \
        (opts.precisions[0], ["--precision", opts.precisions[0]])
    rest = [p for p in opts.precisions[1:] if p != "fp32"] + (["fp32"] if first_name != "fp32" else [])
    # the later configurations start from the first one's raw graph, and each keeps the cleaned graphs it
    # rewrites, so that none of them moves the others' files aside (vggt_trt/pipelines/stem_set.py)
    keep = ["--keep-intermediate"] if rest else []
    results = [run_config(opts, mode, first_name, ["--export", *first_args, *keep], env)]
    if results[0].result == "unavailable" and not opts.strict:
        return results + [ConfigResult(mode, p, "skipped", detail="(mode unavailable here)") for p in rest]
    onnx = opts.base_output / mode / f"{opts.stem}.onnx"
    for precision in rest:
        if opts.fail_fast and chain_failed(results, opts.strict):
            break
        source = ["--onnx-in", str(onnx)] if onnx.is_file() else ["--export"]
        results.append(run_config(opts, mode, precision, [*source, "--precision", precision, *keep], env))
    return results


def chain_failed(results: Sequence[ConfigResult], strict: bool) -> bool:
    return any(r.failed or (strict and r.result == "unavailable") for r in results)


# --------------------------------------------------------------------------------------------- runners
def run_serial(opts: SweepOptions) -> dict[str, list[ConfigResult]]:
    """Today's behaviour: one chain after another in this process's order."""
    done: dict[str, list[ConfigResult]] = {}
    for mode in opts.quant_modes:
        done[mode] = run_chain(opts, mode)
        if opts.fail_fast and chain_failed(done[mode], opts.strict):
            break
    return done


def collect(futures: dict[Any, str], wait_next: Callable[[list[Any]], Any],
            result_of: Callable[[Any], list[ConfigResult]], cancel: Callable[[Any], None],
            opts: SweepOptions) -> dict[str, list[ConfigResult]]:
    """Gather chain results as they finish; with fail_fast, cancel the other chains after a failure."""
    done: dict[str, list[ConfigResult]] = {}
    pending = list(futures)
    stopping = False
    while pending:
        fut = wait_next(pending)
        pending.remove(fut)
        mode = futures[fut]
        done[mode] = result_of(fut)
        for r in done[mode]:
            logger.info("[%s / %s] %s in %.0f s on %s", r.mode, r.config, r.result, r.seconds, r.where)
        if opts.fail_fast and not stopping and chain_failed(done[mode], opts.strict):
            stopping = True
            logger.warning("fail-fast: %s failed, cancelling the other quant modes", mode)
            for other in pending:
                cancel(other)
    return done


def run_local(opts: SweepOptions) -> dict[str, list[ConfigResult]]:
    """Chains as local processes: at most ``local_jobs`` at once; a GPU chain takes one free GPU of this machine."""
    jobs = local_jobs(opts)
    ids = visible_gpu_ids()
    use_gpu = bool(resources_for(opts, bool(ids))["num_gpus"])
    if use_gpu and not ids:
        raise InputError("the configurations need a GPU (GPUS_PER_JOB=1, --backend tensorrt or torch on CUDA) and "
                         "this machine has none")
    free_gpus: queue.Queue[str] = queue.Queue()
    for gpu in ids:
        free_gpus.put(gpu)
    opts = replace(opts, echo=False)

    def chain(mode: str) -> list[ConfigResult]:
        if not use_gpu:
            return run_chain(opts, mode)
        gpu = free_gpus.get()
        try:
            return run_chain(opts, mode, {"CUDA_VISIBLE_DEVICES": gpu})
        finally:
            free_gpus.put(gpu)

    logger.info("running %d quant modes, %d at a time; logs in %s/<mode>/logs", len(opts.quant_modes), jobs,
                opts.base_output)
    with cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep") as pool:
        futures = {pool.submit(chain, m): m for m in opts.quant_modes}
        return collect(futures, lambda pending: next(iter(cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0])),
                       lambda f: [] if f.cancelled() else f.result(), lambda f: f.cancel(), opts)


def run_ray(opts: SweepOptions) -> dict[str, list[ConfigResult]]:
    """One Ray task per chain, asking for the CPUs, memory and GPU it needs; where it ran is in each result."""
    with ray_session(opts.ray_address or "auto", **opts.ray_kwargs) as ray:
        needed = [str(opts.converter)] + ([opts.python] if os.path.isabs(opts.python) else [])
        check_shared_folder(opts.base_output, needed, ray)
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = resources_for(opts, gpus > 0)
        if resources["num_gpus"] and not gpus:
            raise InputError("the configurations need a GPU (GPUS_PER_JOB=1, --backend tensorrt or torch on CUDA) "
                             "and the Ray cluster declares none")
        task = ray.remote(run_chain).options(**resources)
        opts = replace(opts, echo=False)
        futures = {task.remote(opts, m): m for m in opts.quant_modes}

        def result_of(ref: Any) -> list[ConfigResult]:
            try:
                return ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                return []
            except ray.exceptions.RayError as exc:  # the task or its worker died: report it like a failed build
                mode = futures[ref]
                return [ConfigResult(mode, "all-precisions", "FAILED", 1, detail=f"Ray task failed: {exc}"[:300])]

        return collect(futures, lambda pending: ray.wait(pending, num_returns=1)[0][0], result_of,
                       lambda ref: ray.cancel(ref), opts)


def run_sweep(opts: SweepOptions) -> tuple[list[ConfigResult], int]:
    """Run the sweep the options ask for; every configuration's result in sweep order, and the exit status."""
    opts.validate()
    opts = replace(opts, base_output=Path(opts.base_output).resolve(), converter=Path(opts.converter).resolve())
    t0 = time.perf_counter()
    if opts.ray_address:
        done = run_ray(opts)
    else:
        check_shared_folder(opts.base_output)
        done = run_local(opts) if opts.jobs > 1 else run_serial(opts)
    results = []
    for mode in opts.quant_modes:
        results += done.get(mode) or [ConfigResult(mode, "-", "not run", detail="(fail-fast: stopped after a failure)")]
    write_json_atomic(opts.base_output / "sweep.json", {
        "wall_s": round(time.perf_counter() - t0, 1), "runner": runner_name(opts),
        "results": [asdict(r) for r in results]})
    return results, exit_status(results, opts.strict)


def runner_name(opts: SweepOptions) -> str:
    if opts.ray_address:
        return f"ray ({opts.ray_address})"
    return f"local (JOBS={opts.jobs})" if opts.jobs > 1 else "serial"


def exit_status(results: Sequence[ConfigResult], strict: bool) -> int:
    """0 when nothing failed (unavailable modes included unless strict), else the first failure's exit code."""
    for r in results:
        if r.failed or (strict and r.result == "unavailable"):
            return r.rc or 1
    return 0


def summary_table(results: Sequence[ConfigResult], opts: SweepOptions) -> str:
    """The table run_all_exports.sh prints at the end (one row per configuration, plus where it ran)."""
    lines = [f"=== run_all_exports summary (BASE_OUTPUT={opts.base_output}, MODEL={opts.model}, "
             f"{opts.num_cams}x3x{opts.height}x{opts.width}, {runner_name(opts)})",
             f"{'quant mode':<20} {'configuration':<15} {'result':<12} {'time':>6}  {'where':<18} detail"]
    lines += [r.row() for r in results]
    failed = [r for r in results if r.failed or (opts.strict and r.result == "unavailable")]
    if failed and opts.fail_fast:
        first = failed[0]
        lines.append(f"STOPPED at the first failing configuration: {first.mode} / {first.config} "
                     f"(log: {first.log}, exit code {first.rc})")
    elif failed:
        lines.append(f"{len(failed)} configuration(s) failed: " + "; ".join(
            f"{r.mode} / {r.config} (log: {r.log})" for r in failed))
    return "\n".join(lines)
