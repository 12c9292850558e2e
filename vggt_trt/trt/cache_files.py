"""Cache files fed back to TensorRT only when they belong to it: a blob plus a JSON sidecar with its key and hash.

Used for the builder's timing cache (``trt_timing.cache``, keyed by ``<module>-<version>``) and the
TensorRT-RTX runtime cache of JIT-compiled kernels, stored next to its engine as
``<engine stem>.sm<cc>.runtime.cache`` and keyed by the engine's SHA-256, the TensorRT-RTX version, the GPU
and the driver. A blob whose sidecar key differs, or whose bytes do not match the recorded hash
(interrupted write), is never handed to TensorRT; the caller logs why and replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..atomic import write_bytes_atomic, write_json_atomic


def sidecar(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_keyed(path: str | os.PathLike, key: str) -> tuple[bytes | None, str]:
    """The blob at ``path`` if its sidecar says ``key`` wrote it and the hash matches; else None and why."""
    p = Path(path)
    if not p.is_file():
        return None, "no cache file yet"
    try:
        meta = json.loads(sidecar(p).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"sidecar {sidecar(p).name} missing or unreadable ({type(exc).__name__})"
    if meta.get("key") != key:
        return None, f"cache was written for {meta.get('key')}, this is {key}"
    data = p.read_bytes()
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None, "cache bytes do not match the sidecar's hash (interrupted write?)"
    return data, ""


def write_keyed(path: str | os.PathLike, blob: bytes, key: str, meta: Mapping[str, Any] | None = None) -> None:
    """Write the blob, then its sidecar (both atomically): a crash between them leaves a hash mismatch, not a lie."""
    write_bytes_atomic(Path(path), blob)
    write_json_atomic(sidecar(path), {"key": key, **(meta or {}), "sha256": hashlib.sha256(blob).hexdigest(),
                                      "bytes": len(blob)})


def runtime_cache_key(backend: str, version: str, engine_sha256: str, gpu: Mapping[str, Any]) -> str:
    """What a TensorRT-RTX runtime cache depends on: the engine, the TensorRT-RTX version, the GPU and the driver."""
    return (f"{backend}-{version}|engine-{engine_sha256[:16]}|{gpu.get('name')}|sm{gpu.get('compute_capability')}"
            f"|cuda-driver-{gpu.get('driver_cuda_version')}")


def runtime_cache_path(engine_path: str | os.PathLike, compute_capability: str) -> Path:
    """``<dir>/<engine stem>.sm89.runtime.cache`` beside the engine: one file per GPU architecture."""
    p = Path(engine_path)
    return p.with_name(f"{p.stem}.sm{compute_capability.replace('.', '')}.runtime.cache")
