"""Shared pieces of the command-line front ends: error-to-exit-code mapping and flag spellings."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from ..errors import InputError, MissingDependencyError, VggtTrtError
from ..logs import setup_logging

EXIT_CODES = {InputError: 2, MissingDependencyError: 3}


def add_bool_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept both spellings of every long flag: --num-cams and --num_cams (help shows the declared one)."""
    for action in list(parser._actions):
        for flag in list(action.option_strings):
            if not flag.startswith("--"):
                continue
            body = flag[2:]
            for alias in ("--" + body.replace("-", "_"), "--" + body.replace("_", "-")):
                if alias not in parser._option_string_actions:
                    parser._option_string_actions[alias] = action


def run_cli(job: Callable[[], int], log_dir: Path | None, name: str, verbose: bool) -> int:
    """Run ``job`` with logging set up; typed library errors become one log line and an exit code."""
    log_file = setup_logging(log_dir, name, verbose)
    log = logging.getLogger(name)
    if log_file:
        log.info("log file: %s", log_file)
    try:
        return job()
    except VggtTrtError as e:
        log.error("%s", e)
        for err_type, code in EXIT_CODES.items():
            if isinstance(e, err_type):
                return code
        return 1
