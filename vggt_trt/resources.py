"""What this process may use and where it runs: available memory, the GPUs it sees, its host."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

GIB = 1 << 30


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, None where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may hand to workers: CUDA_VISIBLE_DEVICES when set, else every GPU the driver sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    from .trt.backend import cuda_device_count

    return [str(i) for i in range(cuda_device_count()[0])]


def location() -> dict[str, Any]:
    """Where this process runs: host, pid and the GPUs it was given (CUDA_VISIBLE_DEVICES, None when unset)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def describe_location(where: dict[str, Any]) -> str:
    """``host`` or ``host gpu 1`` for a summary table."""
    return where["host"] + (f" gpu {where['gpus']}" if where.get("gpus") not in (None, "") else "")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_disk(folder: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system of ``folder``, or of its nearest existing parent."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_free_disk(target: str | os.PathLike, needed: int) -> None:
    """InputError, before any work, when the folder of ``target`` has less than ``needed`` bytes free."""
    from .errors import InputError

    folder = Path(target).parent
    free = free_disk(folder)
    if free < needed:
        raise InputError(f"not enough free disk in {folder} for {Path(target).name}: needs about "
                         f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is a disk-full OSError (libraries wrap them)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def disk_budget(target: str | os.PathLike, needed: int) -> Iterator[None]:
    """Check that ``needed`` bytes are free beside ``target`` first; a disk-full error inside the block becomes
    one InputError line, ``disk full writing <target> (needs about N GB)``, instead of a traceback."""
    from .errors import InputError

    check_free_disk(target, needed)
    try:
        yield
    except Exception as exc:
        if not _disk_full(exc):
            raise
        raise InputError(f"disk full writing {target} (needs about {needed / 1e9:.2f} GB; "
                         f"{free_disk(Path(target).parent) / 1e9:.2f} GB free now)") from exc
