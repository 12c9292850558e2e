"""A run's outputs published as one set: produced in a staging folder inside the output folder, moved into place
only when the whole run succeeded.

A run *owns* some names in its output folder (the conversion: the files of its stem; ``pcd_inference.py``: its
output files and folders). When it succeeds, every owned name comes from this run: what it produced replaces
what was there, and owned names it did not produce are moved aside into ``.replaced-<label>-<UTC time>/`` in
the same folder (renames, no copies; delete that folder when you do not need it) and listed in the report.
When it fails (an exception, a failed check, Ctrl-C), the staging folder is deleted and the folder is as the
previous run left it. Names the run does not own (shared caches, other stems) are never touched.

Publication is a handful of renames on one file system: build reports and other ``.json`` files go last, so
a report never names a file that is not in place yet. A run killed outright (SIGKILL, out of memory) cannot
clean up: its staging folder records its host and process id, and the next run into the folder deletes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
REPLACED_PREFIX = ".replaced-"
OWNER_FILE = ".owner"  # "<host> <pid>" of the run a staging folder belongs to; hidden names are never published


@dataclass
class Publication:
    """What :meth:`StagedRun.publish` did: names moved into place, names moved aside and where to."""

    published: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    replaced_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"published": self.published, "moved_aside": self.replaced,
                "moved_aside_to": None if self.replaced_dir is None else str(self.replaced_dir)}


def rewrite_paths(obj: Any, old: str, new: str) -> Any:
    """``obj`` (JSON-like) with every string that starts with the folder ``old`` starting with ``new`` instead."""
    if isinstance(obj, dict):
        return {k: rewrite_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rewrite_paths(v, old, new) for v in obj]
    if isinstance(obj, str) and (obj == old or obj.startswith(old + os.sep)):
        return new + obj[len(old):]
    return obj


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


@contextlib.contextmanager
def interrupts_held(what: str) -> Iterator[None]:
    """Hold Ctrl-C over a short block that must not stop half-way (publishing a set of files), then raise it.
    Only in the main thread over Python's own SIGINT handler; elsewhere the block runs as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        logger.warning("Ctrl-C held until %s was complete", what)
        raise KeyboardInterrupt


def owner_tag() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def abandoned(staging: Path) -> bool:
    """True for a staging folder of a run on this machine whose process is gone (killed: SIGKILL, out of memory).
    A folder of another machine, a live process or without an owner file is not judged abandoned."""
    try:
        host, pid = (staging / OWNER_FILE).read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # no or unreadable owner file, or a process of another user: leave it
        return False
    return False


def remove_abandoned(out_dir: Path) -> list[Path]:
    """Delete the staging folders in ``out_dir`` left by killed runs (they can hold gigabytes of graphs)."""
    removed = [p for p in sorted(out_dir.glob(f"{STAGING_PREFIX}*")) if p.is_dir() and abandoned(p)]
    for folder in removed:
        logger.warning("removing %s: the staging folder of a run that was killed before it finished", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def replaced_dir_name(out_dir: Path, label: str) -> Path:
    """A fresh ``.replaced-<label>-<UTC time>-<id>`` path inside ``out_dir`` (not created)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(out_dir) / f"{REPLACED_PREFIX}{label}-{stamp}-{uuid.uuid4().hex[:4]}"


def move_aside(out_dir: Path, publication: Publication) -> None:
    """Rename ``publication.replaced`` (names in ``out_dir``) into ``publication.replaced_dir``."""
    if not publication.replaced:
        return
    if publication.replaced_dir is None:
        raise ValueError("move_aside: replaced_dir is not set")
    publication.replaced_dir.mkdir()
    for name in publication.replaced:
        os.replace(Path(out_dir) / name, publication.replaced_dir / name)
    logger.warning("moved %d file(s) of an earlier run that this run did not produce into %s: %s",
                   len(publication.replaced), publication.replaced_dir, ", ".join(publication.replaced))


def claim_folder(out_dir: Path, label: str, owns: Callable[[str], bool], keep: Iterable[str] = ()) -> Publication:
    """For runs that write while they run (the live loop): move the owned names of an earlier run aside now,
    so that afterwards every owned name comes from this run. Call it just before the first write."""
    out_dir = Path(out_dir)
    keep = set(keep)
    names = sorted(p.name for p in out_dir.iterdir() if owns(p.name) and p.name not in keep) if out_dir.is_dir() else []
    result = Publication(replaced=names, replaced_dir=replaced_dir_name(out_dir, label) if names else None)
    move_aside(out_dir, result)
    return result


class StagedRun:
    """Context manager: ``staging`` is a fresh folder inside ``out_dir``; it is removed on exit whatever happens.

    ``owns(name)`` says which top-level names of ``out_dir`` belong to the run; ``keep`` are owned names the run
    uses as inputs without producing them (they stay where they are).
    """

    def __init__(self, out_dir: Path, label: str, owns: Callable[[str], bool], keep: Iterable[str] = ()):
        self.out_dir = Path(out_dir)
        self.label = label
        self.owns = owns
        self.keep = set(keep)
        self.staging = self.out_dir / f"{STAGING_PREFIX}{label}-{uuid.uuid4().hex[:8]}"
        self.created = False

    def __enter__(self) -> StagedRun:
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.out_dir)
        self.staging.mkdir()
        (self.staging / OWNER_FILE).write_text(owner_tag())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.staging.exists():
            if exc[0] is not None:
                logger.info("run did not complete: %s left unchanged (its partial outputs are deleted)",
                            self.out_dir)
            shutil.rmtree(self.staging, ignore_errors=True)
        if exc[0] is not None and self.created and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a failed first run leaves no empty folder behind

    def final_path(self, staged: str | os.PathLike) -> Path:
        """Where a path inside the staging folder ends up after publication."""
        return Path(rewrite_paths(str(staged), str(self.staging), str(self.out_dir)))

    def staged(self) -> list[Path]:
        """The entries to publish: everything in the staging folder but hidden names, ``.json`` last."""
        return sorted((p for p in self.staging.iterdir() if not p.name.startswith(".")),
                      key=lambda p: (p.suffix == ".json", p.name))

    def stale_names(self) -> list[str]:
        produced = {p.name for p in self.staged()}
        return sorted(p.name for p in self.out_dir.iterdir()
                      if self.owns(p.name) and p.name not in produced and p.name not in self.keep)

    def publish(self, before_move: Callable[[Publication], None] | None = None) -> Publication:
        """Move the stale owned names aside, then every staged entry into ``out_dir`` (``.json`` last); a Ctrl-C
        meanwhile is raised once the whole set is in place.

        ``before_move`` sees the planned publication first (e.g. to add the moved-aside list to reports that
        are still in the staging folder); it may rewrite staged files, not add new names.
        """
        with interrupts_held(f"the outputs in {self.out_dir} were published"):
            return self._publish(before_move)

    def _publish(self, before_move: Callable[[Publication], None] | None) -> Publication:
        result = Publication(published=[p.name for p in self.staged()], replaced=self.stale_names())
        if result.replaced:
            result.replaced_dir = replaced_dir_name(self.out_dir, self.label)
        if before_move is not None:
            before_move(result)
        move_aside(self.out_dir, result)
        for entry in self.staged():
            self._move_into_place(entry)
        logger.info("published %d new file(s) into %s: %s", len(result.published), self.out_dir,
                    ", ".join(result.published))
        return result

    def _move_into_place(self, entry: Path) -> None:
        """Rename ``entry`` onto its final name; a folder (or a file of the other kind) in the way goes into the
        staging folder under a hidden name first (a folder cannot replace a non-empty one) and is deleted with it."""
        target = self.out_dir / entry.name
        if (target.exists() or target.is_symlink()) and (entry.is_dir() or target.is_dir()):
            os.replace(target, self.staging / f"{REPLACED_PREFIX}{entry.name}")
        os.replace(entry, target)
