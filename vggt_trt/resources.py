"""What this process may use and where it runs: available memory, the GPUs it sees, its host."""

from __future__ import annotations

import os
import socket
from typing import Any

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
