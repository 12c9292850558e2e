"""Many scene folders -> one point cloud each: ``pcd_inference.py --scenes 'captures/*'``.

Each scene is the images pipeline (:func:`vggt_trt.pipelines.pcd.run_pcd`) into ``<out_root>/<scene name>/``.
Workers keep their model loaded and take the next scene when they are free: one worker here (in this
process), several as local processes (one GPU each when the model runs on CUDA), or Ray actors (one GPU
each where the cluster has GPUs). A failed scene is reported and the others go on; ``<out_root>/scenes.json``
(written atomically, also when scenes failed) lists every scene with its result, time and worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import logging
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_json_atomic
from ..cluster import check_shared_folder, ray_session
from ..errors import InputError
from ..resources import location, visible_gpu_ids
from .pcd import PcdOptions, run_pcd

logger = logging.getLogger(__name__)

SUMMARY_NAME = "scenes.json"


def find_scenes(pattern: str) -> list[Path]:
    """Scene folders matching a glob (``captures/*``), sorted; names must be unique (one output folder each)."""
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
    scenes = [p for p in matches if p.is_dir()]
    if not scenes:
        raise InputError(f"--scenes {pattern!r} matches no folder" + (
            f" ({len(matches)} files, no folders)" if matches else ""))
    names: dict[str, Path] = {}
    for s in scenes:
        if s.name in names:
            raise InputError(f"scenes {names[s.name]} and {s} have the same name; their outputs would share "
                             f"one folder. Match folders with distinct names")
        names[s.name] = s
    return scenes


class SceneWorker:
    """Holds one active runner (made from ``template``) and reconstructs scenes with it."""

    def __init__(self, template: PcdOptions, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.template = template
        self.where = location()
        self.runner = template.make_runner().activate()
        self.where["device"] = self.runner.device

    def run(self, scene: str, out_dir: str) -> dict[str, Any]:
        """One scene; any error becomes a failed result (logged with its traceback) so the worker goes on."""
        t0 = time.time()
        record: dict[str, Any] = {"scene": Path(scene).name, "images": scene, "out_dir": out_dir,
                                  "worker": self.where, "start": t0}
        try:
            summary = run_pcd(replace(self.template, images=Path(scene), out_dir=Path(out_dir)), runner=self.runner)
            record.update(status="ok", points=summary["points"]["written"], views=len(summary["scene"]["views"]),
                          timings_ms=summary["timings_ms"])
        except Exception as exc:  # one scene's failure, whatever it is, must not stop the batch: reported below
            logger.error("scene %s failed: %s", scene, exc)
            logger.debug("%s", traceback.format_exc())
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        record["end"] = time.time()
        record["seconds"] = round(record["end"] - t0, 3)
        return record

    def close(self) -> None:
        self.runner.deactivate()


# ----------------------------------------------------------------------------------- local process workers
_WORKER: dict[str, Any] = {}  # a local worker process's SceneWorker, kept loaded between scenes, or its error


def init_process_worker(template: PcdOptions, gpu_ids: Any, threads: int | None) -> None:
    """Process-pool initializer: take one GPU id (when given), then load the model once."""
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids.get_nowait()
    try:
        _WORKER["worker"] = SceneWorker(template, threads)
    except Exception as exc:  # reported with every scene this worker is given (the pool would only say "broken")
        logger.error("worker could not load the model: %s", exc)
        _WORKER["error"] = f"worker could not load the model: {type(exc).__name__}: {exc}"


def run_in_process_worker(scene: str, out_dir: str) -> dict[str, Any]:
    if "worker" not in _WORKER:
        return {"scene": Path(scene).name, "images": scene, "out_dir": out_dir, "status": "failed",
                "error": _WORKER.get("error", "worker not initialised"), "worker": location()}
    return _WORKER["worker"].run(scene, out_dir)


# --------------------------------------------------------------------------------------------- the batch
def plan_workers(template: PcdOptions, workers: int | None, gpus: Sequence[str]) -> tuple[int, bool]:
    """How many workers, and whether each gets one GPU: one per GPU when the model runs on CUDA."""
    on_gpu = bool(gpus) and template.device != "cpu"
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, found {workers}")
    if on_gpu:
        if workers is not None and workers > len(gpus):
            raise InputError(f"--workers {workers}: only {len(gpus)} GPUs, and each worker takes one")
        return workers or len(gpus), True
    return workers or 1, False


def run_scenes(template: PcdOptions, scenes: Sequence[Path], out_root: Path, *, workers: int | None = None,
               ray_address: str | None = None, ray_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reconstruct every scene into ``out_root/<name>``; the summary is returned and written to scenes.json."""
    if not scenes:
        raise InputError("no scenes given")
    replace(template, images=Path(scenes[0])).validate()
    out_root = Path(out_root).resolve()
    jobs = [(str(Path(s).resolve()), str(out_root / Path(s).name)) for s in scenes]
    t0 = time.time()
    if ray_address:
        records, how = ray_batch(template, jobs, out_root, workers, ray_address, ray_kwargs or {})
    else:
        check_shared_folder(out_root)
        count, on_gpu = plan_workers(template, workers, visible_gpu_ids() if template.device != "cpu" else [])
        if count == 1 and not on_gpu:
            records, how = serial_batch(template, jobs), "serial (this process)"
        else:
            records, how = process_batch(template, jobs, count, on_gpu), f"{count} local processes" + (
                ", one GPU each" if on_gpu else "")
    return write_summary(out_root, records, how, t0)


def serial_batch(template: PcdOptions, jobs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    worker = SceneWorker(template)
    try:
        return [worker.run(scene, out) for scene, out in jobs]
    finally:
        worker.close()


def process_batch(template: PcdOptions, jobs: Sequence[tuple[str, str]], count: int,
                  on_gpu: bool) -> list[dict[str, Any]]:
    """``count`` spawned processes, each keeping its model, taking scenes from the pool's queue."""
    ctx = mp.get_context("spawn")
    gpu_queue = None
    if on_gpu:
        gpu_queue = ctx.Manager().Queue()
        for gpu in visible_gpu_ids()[:count]:
            gpu_queue.put(gpu)
    threads = None if on_gpu else max(1, (os.cpu_count() or 1) // count)
    with cf.ProcessPoolExecutor(max_workers=count, mp_context=ctx, initializer=init_process_worker,
                                initargs=(template, gpu_queue, threads)) as pool:
        futures = [pool.submit(run_in_process_worker, scene, out) for scene, out in jobs]
        return [gather(fut, scene, out) for fut, (scene, out) in zip(futures, jobs)]


def gather(fut: cf.Future, scene: str, out: str) -> dict[str, Any]:
    """A worker's result, or a failed record when the worker process itself died."""
    try:
        return fut.result()
    except cf.process.BrokenProcessPool as exc:
        logger.error("scene %s: its worker died: %s", scene, exc)
        return {"scene": Path(scene).name, "images": scene, "out_dir": out, "status": "failed",
                "error": f"worker died: {type(exc).__name__}: {exc}"}


def ray_batch(template: PcdOptions, jobs: Sequence[tuple[str, str]], out_root: Path, workers: int | None,
              address: str, ray_kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Ray actors, one per GPU of the cluster (or ``workers`` CPU actors), fed from an ActorPool queue."""
    with ray_session(address, **ray_kwargs) as ray:
        check_shared_folder(out_root, sorted({s for s, _ in jobs}), ray)
        from ray.util import ActorPool

        gpus = int(ray.cluster_resources().get("GPU", 0))
        count, on_gpu = plan_workers(template, workers, [str(i) for i in range(gpus)])
        actor = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(SceneWorker)
        actors = [actor.remote(template) for _ in range(count)]
        pool = ActorPool(actors)
        for scene, out in jobs:
            pool.submit(lambda a, job: a.run.remote(*job), (scene, out))
        records = []
        by_scene = {}
        for scene, out in jobs:
            try:
                rec = pool.get_next_unordered()
            except ray.exceptions.RayError as exc:
                logger.error("a Ray worker died: %s", exc)
                rec = {"status": "failed", "error": f"worker died: {type(exc).__name__}: {exc}"[:500]}
            records.append(rec)
            if "scene" in rec:
                by_scene[rec["images"]] = rec
        # a lost actor's record has no scene: give it one of the scenes nobody reported
        missing = [j for j in jobs if j[0] not in by_scene]
        for rec in records:
            if "scene" not in rec and missing:
                scene, out = missing.pop(0)
                rec.update(scene=Path(scene).name, images=scene, out_dir=out)
        for a in actors:
            ray.kill(a)
        return records, f"Ray ({address}): {count} actors" + (", one GPU each" if on_gpu else "")


def write_summary(out_root: Path, records: list[dict[str, Any]], how: str, t0: float) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["scene"])
    ok = [r for r in records if r["status"] == "ok"]
    starts = [r["start"] for r in ok]
    ends = [r["end"] for r in ok]
    busy = (max(ends) - min(starts)) if ok else 0.0
    summary = {"workers": how, "scenes": len(records), "ok": len(ok), "failed": len(records) - len(ok),
               "wall_s": round(time.time() - t0, 3),
               "scenes_per_s": round(len(ok) / busy, 4) if busy > 0 else None,
               "results": records}
    write_json_atomic(out_root / SUMMARY_NAME, summary)
    logger.info("%d of %d scenes reconstructed into %s (%s)", len(ok), len(records), out_root, how)
    return summary
