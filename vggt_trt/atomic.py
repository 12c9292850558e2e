"""Atomic artifact writes: write to a temporary name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def ensure_writable_dir(directory: str | os.PathLike, flag: str = "output directory") -> Path:
    """Check that ``directory`` (or, when it does not exist yet, its nearest existing parent) is a directory
    that takes new files, without creating anything; InputError naming ``flag`` otherwise."""
    from .errors import InputError

    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == directory else f" (its parent {existing} is a file)"
        raise InputError(f"{flag} {directory} is not a directory{where}")
    if existing == directory:
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise InputError(f"{flag} {directory} is not writable: {e.strerror or e}") from e
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {directory} cannot be created: {existing} is not writable")
    return directory


def ensure_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check before any work that ``path`` can be written as a file: not a directory, in a folder that takes
    files (or can be created); InputError naming ``flag`` otherwise."""
    from .errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    ensure_writable_dir(path.parent, f"{flag} folder")
    return path
