"""Ray, the optional engine for sweeps and batch reconstructions over several GPUs or machines.

``RAY_ADDRESS`` (Ray's own variable) picks the cluster: ``local`` starts a private instance in this
process (shut down by :func:`ray_session`), ``auto`` joins the one running on this machine, anything else
is a cluster address. Workers run the toolkit from the same path as the driver (its root goes on
``PYTHONPATH``), so on a cluster the toolkit and every output folder must sit on storage all nodes see;
:func:`check_shared_folder` proves that for an output folder before any work starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import InputError, MissingDependencyError
from .resources import location

logger = logging.getLogger(__name__)

REQUIREMENTS = "requirements-scale.txt"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
MARKER_PREFIX = ".vggt-trt-shared-check-"


def require_ray() -> Any:
    """The ``ray`` module, or MissingDependencyError naming the requirements file."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"RAY_ADDRESS is set but Ray is not installed ({exc}); "
                                     f"pip install -r {REQUIREMENTS}, or unset RAY_ADDRESS to run here") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str, *, num_cpus: int | None = None, num_gpus: int | None = None,
                object_store_mb: int | None = None) -> Iterator[Any]:
    """Connect to Ray at ``address`` (``local`` starts an instance with the given resources) and disconnect after.

    An already initialised Ray (a test or notebook that called ``ray.init``) is used as it is and left running.
    """
    ray = require_ray()
    if ray.is_initialized():
        logger.info("using the Ray instance this process already joined")
        yield ray
        return
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False, "include_dashboard": False}
    if address == "local":
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus,
                      object_store_memory=object_store_mb * (1 << 20) if object_store_mb else None)
    elif num_cpus or num_gpus or object_store_mb:
        raise InputError("Ray resources (num_cpus, num_gpus, object store) are declared only when starting a "
                         f"local instance (RAY_ADDRESS=local); {address!r} is a running cluster")
    ray.init(address=address, **kwargs)
    logger.info("Ray at %s: %s", address, {k: v for k, v in ray.cluster_resources().items()
                                           if k in ("CPU", "GPU", "memory")})
    try:
        yield ray
    finally:
        ray.shutdown()


def probe(folder: str, marker: str, paths: Sequence[str]) -> dict[str, Any]:
    """Run on one node: does it see ``marker`` in ``folder``, can it write there, do ``paths`` exist?"""
    base = Path(folder)
    where = location()
    result = {"where": where, "sees_marker": (base / marker).is_file(), "writable": False,
              "missing": [p for p in paths if not Path(p).exists()]}
    test = base / f"{marker}.{where['host']}.{where['pid']}"
    try:
        test.write_text("ok")
        test.unlink()
        result["writable"] = True
    except OSError as exc:
        result["error"] = str(exc)
    return result


def check_shared_folder(folder: str | os.PathLike, needed_paths: Sequence[str] = (), ray: Any = None) -> None:
    """``folder`` is writable here and, under Ray, every alive node sees the same folder and ``needed_paths``.

    A marker file with a random name is written here; one zero-CPU task pinned to each node must find it.
    """
    base = Path(folder).expanduser().resolve()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output folder {base} cannot be created: {exc}") from exc
    if not os.access(base, os.W_OK):
        raise InputError(f"output folder {base} is not writable")
    if ray is None:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = f"{MARKER_PREFIX}{uuid.uuid4().hex[:12]}"
    (base / marker).write_text("vggt-trt: every Ray node must see this file\n")
    try:
        task = ray.remote(num_cpus=0)(probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(base), marker, list(needed_paths)) for n in nodes]
        try:
            results = ray.get(refs, timeout=120)
        except ray.exceptions.RayTaskError as exc:
            raise InputError(f"a Ray worker could not run the toolkit ({exc}); every node needs it at "
                             f"{PACKAGE_ROOT} (shared storage or the same install path)") from exc
    finally:
        (base / marker).unlink(missing_ok=True)
    problems = []
    for r in results:
        host = r["where"]["host"]
        if not r["sees_marker"]:
            problems.append(f"{host} does not see {base} (the marker file written here is not there)")
        elif not r["writable"]:
            problems.append(f"{host} cannot write to {base}: {r.get('error')}")
        if r["missing"]:
            problems.append(f"{host} lacks {', '.join(r['missing'])}")
    if problems:
        raise InputError(f"{base} must be a folder that every Ray node sees and can write (shared storage); "
                         + "; ".join(problems))
    logger.info("%s is shared by all %d Ray nodes", base, len(results))
