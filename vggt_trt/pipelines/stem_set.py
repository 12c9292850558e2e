"""Which files of the output folder a conversion owns, and publishing its build reports with the set.

A conversion owns its stem: ``<stem>.onnx``, ``<stem>.NOSEQ.onnx``, ``<stem>.simp.onnx`` (each with its
``.data``), and per precision ``<stem>_<prec>.onnx``/``.engine``/``.json`` and the runner's
``<stem>_<prec>.*.runtime.cache``. Shared caches (``trt_timing.cache``, ``calibration-*``) are not a stem's,
and ``<stem>_<prec>.torchcache`` belongs to ``--backend torch`` builds. Two kinds of run:

- a new source (``--export``, or ``--onnx-in`` from elsewhere) owns the whole stem: files of the stem it does
  not produce (an engine beside new graphs after ``--skip-build``, another precision built from the old
  graph) are moved aside;
- ``--onnx-in`` of a graph of the stem in the output folder itself (as ``run_all_exports.sh`` adds fp32 to
  its export) continues that set: the input stays, the run owns the cleaned graphs and the files of the
  precisions it builds; the other precisions were built from the same input and stay.

Everything is produced in a staging folder and published by :class:`vggt_trt.staging.StagedRun` only when
the whole run succeeded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import write_json_atomic
from ..graph.io import external_data_files
from ..staging import Publication, StagedRun, rewrite_paths, same_file

logger = logging.getLogger(__name__)

SHARED_SUFFIXES = (".torchcache",)  # names with the stem that other kinds of run write
CLEANED_GRAPHS = (".NOSEQ.", ".simp.")


def of_stem(name: str, stem: str) -> bool:
    """``name`` is an artifact of ``stem`` (``vggt-2x3x56x70.onnx``, ``vggt-2x3x56x70_fp16.engine``; not
    ``vggt-2x3x56x70-pcd.onnx``, which is another stem)."""
    return name.startswith((f"{stem}.", f"{stem}_")) and not name.endswith(SHARED_SUFFIXES)


def owner(stem: str, precisions: Iterable[str] | None) -> Callable[[str], bool]:
    """The names a run owns: the whole stem (``precisions`` None), or the cleaned graphs and these precisions."""
    if precisions is None:
        return lambda name: of_stem(name, stem)
    prefixes = tuple(f"{stem}{g}" for g in CLEANED_GRAPHS) + tuple(f"{stem}_{p}." for p in precisions)
    return lambda name: of_stem(name, stem) and name.startswith(prefixes)


def inputs_in_folder(onnx_in: Path | None, out_dir: Path, stem: str) -> list[str]:
    """Names of ``--onnx-in`` (and its external data) when it is a graph of ``stem`` inside ``out_dir``."""
    if onnx_in is None or not same_file(Path(onnx_in).parent, Path(out_dir)) or not of_stem(Path(onnx_in).name, stem):
        return []
    return [Path(onnx_in).name, *(p.name for p in external_data_files(onnx_in))]


def stem_run(out_dir: Path, stem: str, precisions: Iterable[str], onnx_in: Path | None) -> StagedRun:
    """The staged run of one conversion into ``out_dir`` (see the module docstring for what it owns)."""
    keep = inputs_in_folder(onnx_in, out_dir, stem)
    if keep:
        logger.info("--onnx-in %s is this folder's own graph: the run replaces the cleaned graphs and the %s files "
                    "of %s; the other precisions built from it stay", onnx_in, "/".join(precisions), stem)
    return StagedRun(out_dir, stem, owner(stem, tuple(precisions) if keep else None), keep=keep)


def publish_reports(run: StagedRun, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Publish the staged set; the reports (returned and written) name the final paths and what was moved
    aside (``output_folder``)."""
    final: list[dict[str, Any]] = []

    def rewrite(publication: Publication) -> None:
        listing = rewrite_paths(publication.to_dict(), str(run.staging), str(run.out_dir))
        for report in reports:
            report = rewrite_paths(report, str(run.staging), str(run.out_dir))
            report["output_folder"] = listing
            write_json_atomic(run.staging / f"{report['stem']}_{report['precision']}.json", report)
            final.append(report)

    run.publish(rewrite)
    return final
