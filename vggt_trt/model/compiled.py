"""torch.compile for our VGGT: regional compilation and a compile-cache artifact keyed like an engine.

Regional compilation compiles each transformer block and each head on its own. The 24 DINOv2, 24
frame and 24 global blocks are three shapes of one code object, so they share three compiled graphs:
a cold compile of the 1B model takes about 33 s (about 190 s for one whole-model graph), at the same
speed (H200, bf16, 8 x 518 x 518: 98 ms regional, 101 ms whole; docs/BENCHMARKS.md). Every region must
stay one graph without numpy or host constants: a graph break or traced numpy keeps it out of the
compile caches, and every process compiles it again.

The artifact (``<stem>_<precision>.torchcache``) holds ``torch.compiler.save_cache_artifacts()``
behind a JSON header. The header's key says what the compiled kernels were made for (torch, triton
and CUDA versions, device and compute capability, precision, input shape, outputs, architecture,
compile mode). A process loading it gets its kernels from the cache instead of compiling them; a key
that differs from the run's is refused by name. Weights are not in the artifact (compiled regions take
parameters as inputs), so one artifact serves any checkpoint of the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..atomic import write_bytes_atomic
from ..errors import InputError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".torchcache"
MAGIC = b"VGGT-TORCHCACHE-1\n"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


class CompileCacheMismatch(InputError):
    """A compile-cache artifact was made for another shape, precision, software or GPU."""


def compile_regions(model: nn.Module, mode: str = "default") -> list[str]:
    """Compile every aggregator block and each head of ``model`` in place; returns the compiled names."""
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    from .layers import Block

    kwargs = {} if mode == "default" else {"mode": mode}
    heads = {"camera_head", "depth_head", "point_head"}
    compiled = []
    for name, module in model.named_modules():
        in_head = name.split(".")[0] in heads
        if (isinstance(module, Block) and not in_head) or (name in heads and module is not None):
            module.compile(**kwargs)
            compiled.append(name)
    logger.info("torch.compile (%s): %d regions (blocks and heads); kernels are built on the first call",
                mode, len(compiled))
    return compiled


def compile_cache_counters() -> dict[str, int]:
    """This process's hits, misses and bypasses of the AOTAutograd and Inductor caches (how a warm start went)."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": int(n) for group in ("aot_autograd", "inductor") for name, n in counters[group].items()
            if "cache" in name}


def _device_facts(device: Any) -> dict[str, Any]:
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
                "cuda": torch.version.cuda}
    import platform

    return {"device": f"cpu:{platform.machine()}", "capability": None, "cuda": None}


def architecture_hash(model: nn.Module) -> str:
    """Hash of the parameter names, shapes and dtypes (what compiled kernels depend on; not the values)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def compile_key(model: nn.Module, precision: str, input_shape: Sequence[int], outputs: Sequence[str],
                mode: str = "default") -> dict[str, Any]:
    """Everything the compiled kernels of ``model`` depend on."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = next(model.parameters()).device
    return {
        "torch": torch.__version__, "triton": triton_version, **_device_facts(device),
        "precision": precision, "input_shape": [int(d) for d in input_shape], "outputs": list(outputs),
        "architecture": architecture_hash(model), "compile_mode": mode,
        "frames_chunk_size": getattr(model, "frames_chunk_size", None),
    }


def key_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """``field: artifact X, this run Y`` for every key field that differs."""
    return [f"{k}: artifact {found.get(k)!r}, this run {expected.get(k)!r}"
            for k in expected if found.get(k) != expected.get(k)]


def write_compile_cache(path: str | os.PathLike, key: dict[str, Any], info: dict[str, Any] | None = None) -> int:
    """Write this process's compile caches to ``path`` (atomically) under a header with ``key``; returns bytes."""
    import torch

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        raise InputError("torch.compiler produced no cache artifacts: run the compiled model once before saving")
    blob = artifacts[0]
    header = json.dumps({"key": key, "info": info or {}}).encode()
    data = MAGIC + struct.pack("<Q", len(header)) + header + blob
    write_bytes_atomic(path, data)
    logger.info("compile cache %s: %.1f MB", path, len(data) / 1e6)
    return len(data)


def _read(path: Path) -> tuple[dict[str, Any], int]:
    if not path.is_file():
        raise InputError(f"compile cache not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise InputError(f"{path} is not a vggt-trt compile cache (expected a {ARTIFACT_SUFFIX} file)")
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: damaged compile-cache header ({e})") from e
    return header, len(MAGIC) + 8 + n


def read_compile_cache_header(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's ``{"key": ..., "info": ...}`` header, without loading the kernels."""
    return _read(Path(path))[0]


def load_compile_cache(path: str | os.PathLike, expected_key: dict[str, Any]) -> dict[str, Any]:
    """Check ``path`` against ``expected_key`` and hand its kernels to torch.compiler; returns the header."""
    path = Path(path)
    header, offset = _read(path)
    diffs = key_differences(expected_key, header.get("key", {}))
    if diffs:
        raise CompileCacheMismatch(
            f"compile cache {path} was made for another setup ({'; '.join(diffs)}); rebuild it with "
            f"`vggt_to_trt.py --backend torch` on this machine, or run without it")
    import torch

    with open(path, "rb") as f:
        f.seek(offset)
        torch.compiler.load_cache_artifacts(f.read())
    logger.info("compile cache %s loaded (%s, %s)", path, expected_key["device"], expected_key["precision"])
    return header
