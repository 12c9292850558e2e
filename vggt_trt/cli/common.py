"""Shared pieces of the command-line front ends: the parser (flag spellings) and error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError, MissingDependencyError, VggtTrtError
from ..logs import setup_logging

EXIT_CODES = {InputError: 2, MissingDependencyError: 3}


def hyphenate_flags(argv: Sequence[str]) -> list[str]:
    """``--num_cams 8`` -> ``--num-cams 8`` (also ``--out_dir=x``); tokens after ``--`` stay as they are."""
    out, rest = [], False
    for token in argv:
        if not rest and token.startswith("--") and len(token) > 2:
            flag, sep, value = token.partition("=")
            token = flag.replace("_", "-") + sep + value
        rest = rest or token == "--"
        out.append(token)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose long flags are declared with hyphens (``--num-cams``) and also accept the
    original toolkit's underscore spellings (``--num_cams``), which ``--help`` does not list."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(hyphenate_flags(sys.argv[1:] if args is None else args), namespace)


def add_compile_arguments(group: argparse._ActionsContainer) -> None:
    """The PyTorch engine's compile flags (trt_inference.py, pcd_inference.py)."""
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="regional torch.compile of the PyTorch model (kernels built on the first call, "
                            "about 33 s for the 1B model on an H200; a --compile-cache artifact makes later "
                            "processes start in seconds)")
    group.add_argument("--compile-cache", type=Path,
                       help="compile-cache artifact (.torchcache): loaded when it exists and matches this run "
                            "(shape, precision, torch, GPU), written after the first call when it does not")
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                       help="capture the PyTorch forward in one CUDA graph per input shape and replay it "
                            "(CUDA only; removes per-kernel launch cost; inputs are copied into a fixed buffer)")
    group.add_argument("--frames-chunk-size", type=int, default=8,
                       help="frames per dense-head pass (default 8, as the official code; bounds memory at many views)")


def env_default(name: str, default: str = "", kind: Callable[[str], Any] = str) -> Any:
    """A flag's default from the environment variable ``name`` (empty or unset: ``default``; None if that is empty)."""
    value = os.environ.get(name, "")
    return kind(value) if value != "" else (kind(default) if default != "" else None)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Where Ray runs the work (run_all_exports.sh, pcd_inference.py --scenes); each flag has Ray's variable."""
    g = parser.add_argument_group("Ray (optional: pip install -r requirements-scale.txt)")
    g.add_argument("--ray-address", default=env_default("RAY_ADDRESS"),
                   help="[RAY_ADDRESS] local (start an instance here), auto (the one on this machine) or host:port; "
                        "unset: no Ray")
    g.add_argument("--ray-num-cpus", type=int, default=env_default("RAY_NUM_CPUS", kind=int),
                   help="[RAY_NUM_CPUS] CPUs a local instance declares (default: all)")
    g.add_argument("--ray-num-gpus", type=int, default=env_default("RAY_NUM_GPUS", kind=int),
                   help="[RAY_NUM_GPUS] GPUs a local instance declares (default: those it finds)")
    g.add_argument("--ray-object-store-mb", type=int, default=env_default("RAY_OBJECT_STORE_MB", kind=int),
                   help="[RAY_OBJECT_STORE_MB] object store of a local instance (only small objects pass; 100 is "
                        "plenty)")


def ray_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_cpus": args.ray_num_cpus, "num_gpus": args.ray_num_gpus, "object_store_mb": args.ray_object_store_mb}


# errno -> what a user reads: "<words> <path>"
FS_ERRORS = {
    errno.ENOSPC: "disk full writing",
    errno.EDQUOT: "disk quota exceeded writing",
    errno.EROFS: "read-only file system:",
    errno.EACCES: "permission denied:",
    errno.EPERM: "operation not permitted:",
    errno.ENOTDIR: "a file is in the way where a directory is needed:",
    errno.EISDIR: "a directory is in the way where a file is needed:",
    errno.EEXIST: "already exists and is in the way:",
    errno.ENOENT: "no such file or directory:",
}
INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def fs_error_message(e: OSError) -> str | None:
    """One plain line for a file-system error (``disk full writing out/x.engine``); None for other OSErrors."""
    words = FS_ERRORS.get(e.errno) if e.errno is not None else None
    if words is None:
        return None
    path = "" if e.filename is None else f" {os.fsdecode(e.filename)}"
    if e.filename2 is not None:
        path += f" -> {os.fsdecode(e.filename2)}"
    return f"{words}{path}" if path else (e.strerror or words.rstrip(":")).lower()


def start_logging(log_dir: Path | None, name: str, verbose: bool) -> None:
    """``setup_logging``; a log directory that cannot be written is an InputError naming it."""
    try:
        log_file = setup_logging(log_dir, name, verbose)
    except OSError as e:
        raise InputError(f"cannot write logs to --log-dir {log_dir}: {fs_error_message(e) or e}") from e
    if log_file:
        logging.getLogger(name).info("log file: %s", log_file)


def run_cli(job: Callable[[], int], log_dir: Path | None, name: str, verbose: bool) -> int:
    """Run ``job`` with logging set up; typed library errors, file-system errors and Ctrl-C become one log line
    and an exit code (2 for a file-system error, 130 for Ctrl-C)."""
    log = logging.getLogger(name)
    try:
        start_logging(log_dir, name, verbose)
        return job()
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C); stopped, only complete artifacts were kept")
        return INTERRUPTED
    except VggtTrtError as e:
        log.error("%s", e)
        for err_type, code in EXIT_CODES.items():
            if isinstance(e, err_type):
                return code
        return 1
    except OSError as e:
        message = fs_error_message(e)
        if message is None:
            raise
        log.error("%s", message)
        return 2
