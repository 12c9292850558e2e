"""Shared pieces of the command-line front ends: the parser (flag spellings) and error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

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
    original toolkit's underscore spellings (``--num_cams``), which ``--help`` does not list.

    A flag error is one line on stderr and exit code 2, like every other bad input (no usage block)."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(hyphenate_flags(sys.argv[1:] if args is None else args), namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------- numeric flags: argparse ``type=`` checks
def number_in(kind: Callable[[str], Any], low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False, what: str = "") -> Callable[[str], Any]:
    """A ``type=`` for argparse: ``kind`` (int or float) within [low, high] (``low_open``/``high_open``: that end
    excluded). A value outside is ``argument --flag: must be ..., not X``: one line, exit 2, before any work."""
    noun = "an integer" if kind is int else "a number"
    bounds = [f"> {low:g}" if low_open else f">= {low:g}"] if low is not None else []
    bounds += [f"< {high:g}" if high_open else f"<= {high:g}"] if high is not None else []
    rule = what or f"{noun}{' ' + ' and '.join(bounds) if bounds else ''}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or value != value:  # NaN is never in range
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value

    parse.__name__ = rule  # argparse names the type in some messages
    return parse


POSITIVE_INT = number_in(int, 1)  # counts: views, iterations, batches, workers
NON_NEGATIVE_INT = number_in(int, 0)  # seeds, indices, warm-up runs, "0 = all / off"
POSITIVE_FLOAT = number_in(float, 0, low_open=True)  # sizes, timeouts, memory
NON_NEGATIVE_FLOAT = number_in(float, 0)  # thresholds
PERCENTILE = number_in(float, 0, 100, high_open=True, what="a percentage in [0, 100) (100 would drop every point)")
FRACTION = number_in(float, 0, 1, low_open=True, what="a fraction in (0, 1]")
PORT = number_in(int, 0, 65535, what="a TCP port in 0..65535 (0: any free port)")
IMAGE_SIDE = number_in(int, 14, what="a side in pixels >= 14 (a multiple of 14)")
OPSET = number_in(int, 18, what="an ONNX opset >= 18 (the dynamo exporter's)")


def choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """A ``type=`` for a comma-separated list of ``choices`` (``fp16,bf16``): a tuple in the order given, without
    repeats; an unknown or empty entry is argparse's one-line error."""

    def parse(text: str) -> tuple[str, ...]:
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice: {', '.join(repr(n) for n in bad)} (choose from "
                                             f"{', '.join(choices)}; several: comma-separated)")
        return tuple(dict.fromkeys(names))

    parse.__name__ = "comma-separated list"
    return parse


def reject_together(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    *pairs: tuple[str, str, str]) -> None:
    """Contradictory flags, one line and exit 2 before any work: ``(flag_a, flag_b, why)`` where both given."""
    for a, b, why in pairs:
        if given(args, a) and given(args, b):
            parser.error(f"{a} and {b} exclude each other: {why}")


def given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` (``--num-cams``) has a value other than None/False/empty on ``args``."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return value is not None and value is not False and value != [] and value != ""


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
    group.add_argument("--frames-chunk-size", type=POSITIVE_INT, default=8,
                       help="frames per dense-head pass (default 8, as the official code; bounds memory at many views)")


def env_default(name: str, default: str = "", kind: Callable[[str], Any] = str) -> Any:
    """A flag's default from the environment variable ``name`` (empty or unset: ``default``; None if that is empty).

    Numeric flags leave ``kind`` as str: argparse then converts the text with the flag's ``type=`` and a value
    out of range is the same one-line error as on the command line."""
    value = os.environ.get(name, "")
    return kind(value) if value != "" else (kind(default) if default != "" else None)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Where Ray runs the work (run_all_exports.sh, pcd_inference.py --scenes); each flag has Ray's variable."""
    g = parser.add_argument_group("Ray (optional: pip install -r requirements-scale.txt)")
    g.add_argument("--ray-address", default=env_default("RAY_ADDRESS"),
                   help="[RAY_ADDRESS] local (start an instance here), auto (the one on this machine) or host:port; "
                        "unset: no Ray")
    g.add_argument("--ray-num-cpus", type=POSITIVE_INT, default=env_default("RAY_NUM_CPUS"),
                   help="[RAY_NUM_CPUS] CPUs a local instance declares (default: all)")
    g.add_argument("--ray-num-gpus", type=NON_NEGATIVE_INT, default=env_default("RAY_NUM_GPUS"),
                   help="[RAY_NUM_GPUS] GPUs a local instance declares (default: those it finds)")
    g.add_argument("--ray-object-store-mb", type=POSITIVE_INT, default=env_default("RAY_OBJECT_STORE_MB"),
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
