"""A run owns its outputs (vggt_trt/staging.py): a finished conversion leaves only files of its stem that it
produced (or used as input), a finished pcd_inference.py run only its own outputs; a failed or interrupted run
leaves the previous set unchanged (tiny preset, 28x28 graphs, no engine builds)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import vggt_to_trt
from vggt_trt.pipelines import convert as convert_pipeline
from vggt_trt.staging import StagedRun

from helpers import load_script

TINY28 = ["--model-name", "tiny", "--random-init", "--num-cams", "2", "--height", "28", "--width", "28"]
STEM = "vggt-2x3x28x28"
# names that share the folder but are not the stem's: never touched by a conversion
BYSTANDERS = {"trt_timing.cache": b"timing", "calibration-int8-0123456789abcdef.onnx": b"calib",
              f"{STEM}-pcd.onnx": b"other stem", f"{STEM}_bf16.torchcache": b"torch engine", "notes.txt": b"mine"}
# files of the stem left by an imagined earlier run that this run does not produce
STALE = {f"{STEM}_fp16.engine": b"engine of the old graphs", f"{STEM}_int8.onnx": b"old int8 graph",
         f"{STEM}_int8.json": b"{}"}


def run(args: list[str], logs: Path) -> int:
    return vggt_to_trt.main(args + ["--log-dir", str(logs)])


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> content hash of every file under ``folder`` (logs excluded)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """An fp16 --skip-build export (intermediate graphs kept) into a folder holding stale files of the stem and
    bystanders."""
    out = tmp_path_factory.mktemp("owned")
    for name, data in {**BYSTANDERS, **STALE}.items():
        (out / name).write_bytes(data)
    assert run(["--export", *TINY28, "--precision", "fp16", "--skip-build", "--keep-intermediate",
                "--output-dir", str(out)], out / "logs") == 0
    return out


def test_finished_run_moves_aside_files_of_its_stem_it_did_not_produce(converted):
    produced = {f"{STEM}.onnx", f"{STEM}.NOSEQ.onnx", f"{STEM}.simp.onnx", f"{STEM}_fp16.onnx", f"{STEM}_fp16.json"}
    files = {p.name for p in converted.iterdir() if p.is_file()}
    assert files == produced | set(BYSTANDERS)
    for name, data in BYSTANDERS.items():
        assert (converted / name).read_bytes() == data
    aside = [p for p in converted.iterdir() if p.name.startswith(f".replaced-{STEM}-")]
    assert len(aside) == 1 and hidden(converted) == [aside[0].name], hidden(converted)
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == STALE
    report = json.loads((converted / f"{STEM}_fp16.json").read_text())
    assert report["output_folder"]["moved_aside"] == sorted(STALE)
    assert report["output_folder"]["moved_aside_to"] == str(aside[0])
    assert sorted(report["output_folder"]["published"]) == sorted(produced)
    assert report["onnx"]["path"] == str(converted / f"{STEM}_fp16.onnx"), "report names the final path"
    assert ".staging-" not in json.dumps(report)


def test_onnx_in_of_the_folders_own_graph_adds_precisions_and_keeps_the_others(converted, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(".replaced-*", "logs"))
    before = snapshot(out)
    assert run(["--onnx-in", str(out / f"{STEM}.onnx"), "--precision", "bf16,fp32", "--no-verify", "--skip-build",
                "--keep-intermediate", "--output-dir", str(out)], tmp_path / "logs") == 0
    after = snapshot(out)
    assert set(after) == set(before) | {f"{STEM}_bf16.onnx", f"{STEM}_bf16.json", f"{STEM}_fp32.json"}
    for name in (f"{STEM}.onnx", f"{STEM}_fp16.onnx", f"{STEM}_fp16.json", *BYSTANDERS):
        assert after[name] == before[name], name
    assert hidden(out) == []
    reports = [json.loads((out / f"{STEM}_{p}.json").read_text()) for p in ("bf16", "fp32")]
    assert all(r["output_folder"]["moved_aside"] == [] for r in reports)
    assert reports[0]["output_folder"] == reports[1]["output_folder"], "one publication for both precisions"


def test_onnx_in_from_elsewhere_owns_the_whole_stem(converted, tmp_path):
    out = tmp_path / "fresh"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(".replaced-*", "logs"))
    source = tmp_path / "source" / "graph.onnx"
    source.parent.mkdir()
    shutil.copy(converted / f"{STEM}.onnx", source)
    assert run(["--onnx-in", str(source), "--precision", "fp32", "--skip-build", "--output-dir", str(out)],
               tmp_path / "logs") == 0
    report = json.loads((out / f"{STEM}_fp32.json").read_text())
    # the .simp graph is this run's fp32 graph; its .NOSEQ is an intermediate it drops (no --keep-intermediate)
    moved = [f"{STEM}.NOSEQ.onnx", f"{STEM}.onnx", f"{STEM}_fp16.json", f"{STEM}_fp16.onnx"]
    assert report["output_folder"]["moved_aside"] == moved
    assert not any((out / name).exists() for name in moved)
    assert all((Path(report["output_folder"]["moved_aside_to"]) / name).is_file() for name in moved)


@pytest.mark.parametrize("failure,code", [("accuracy", 1), ("ctrl-c", 130), ("graph error", 1)])
def test_failed_rerun_leaves_the_previous_set_unchanged(converted, tmp_path, monkeypatch, failure, code):
    out = tmp_path / "kept"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(".replaced-*", "logs"))
    before = snapshot(out)
    if failure == "accuracy":  # the cast graph fails its check: it must not appear under its final name
        monkeypatch.setitem(convert_pipeline.CAST_TOLERANCE, "fp16", 0.0)
        args = ["--export", *TINY28, "--seed", "1", "--precision", "fp16", "--skip-build"]
    else:
        def stop(*_args, **_kwargs):
            raise KeyboardInterrupt if failure == "ctrl-c" else convert_pipeline.GraphError("checker failed")
        monkeypatch.setattr(convert_pipeline, "stage_check", stop)
        args = ["--onnx-in", str(converted / f"{STEM}.onnx"), "--precision", "fp32", "--skip-build"]
    assert run([*args, "--output-dir", str(out)], tmp_path / "logs") == code
    assert snapshot(out) == before
    assert hidden(out) == [], "staging folder left behind"


def test_staged_run_replaces_folders_and_keeps_inputs(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "gone.png").write_bytes(b"old view")
    (out / "summary.json").write_text("{}")
    (out / "input.txt").write_text("kept")
    owned = {"images", "summary.json", "input.txt", "points.ply"}
    with StagedRun(out, "pcd", owns=owned.__contains__, keep=["input.txt"]) as staged:
        (staged.staging / "images").mkdir()
        (staged.staging / "images" / "new.png").write_bytes(b"new view")
        (staged.staging / "points.ply").write_bytes(b"ply")
        publication = staged.publish()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["new.png"]
    assert (out / "input.txt").read_text() == "kept" and (out / "points.ply").read_bytes() == b"ply"
    assert publication.replaced == ["summary.json"]
    assert (publication.replaced_dir / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["images", "input.txt", "points.ply", publication.replaced_dir.name])


# ------------------------------------------------------------------------------------------ pcd_inference.py
PCD = load_script("pcd_inference.py", "pcd_inference_output_sets")


def scene_folder(root: Path, cams: int = 3) -> Path:
    """``cam00<i>/000000.png`` per camera: random textures, enough for the tiny model."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in range(cams):
        (root / f"cam{c:03d}").mkdir(parents=True)
        Image.fromarray((rng.random((42, 56, 3)) * 255).astype("uint8")).save(root / f"cam{c:03d}" / "000000.png")
    return root


def pcd(scene: Path, out: Path, views: str) -> int:
    return PCD.main(["--source", "images", "--images", str(scene), "--views", views, "--torch", "--model-name", "tiny",
                     "--out_dir", str(out)])


@pytest.fixture(scope="module")
def pcd_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-view reconstruction written over an older folder with a view and live outputs this run does not make."""
    root = tmp_path_factory.mktemp("pcd")
    scene, out = scene_folder(root / "scene"), root / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "cam999.png").write_bytes(b"a view of another model")
    (out / "map.ply").write_bytes(b"live map of another run")
    (out / "per_camera_calib.json").write_text("{}")  # an input of the next live run: stays
    (out / "notes.txt").write_text("mine")
    assert pcd(scene, out, "cam000,cam001,cam002") == 0
    return scene, out


def test_pcd_run_owns_its_outputs(pcd_folder):
    _, out = pcd_folder
    names = [f"cam{c:03d}.png" for c in range(3)]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    assert (out / "notes.txt").read_text() == "mine" and (out / "per_camera_calib.json").read_text() == "{}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_folder"]["moved_aside"] == ["map.ply"]
    assert (Path(summary["output_folder"]["moved_aside_to"]) / "map.ply").read_bytes() == b"live map of another run"
    assert summary["files"]["ply"] == str(out / "points.ply") and (out / "points.ply").is_file()
    assert [p for p in hidden(out) if not p.startswith(".replaced-pcd-")] == []


def test_pcd_rerun_with_fewer_views_keeps_no_old_view(pcd_folder, tmp_path):
    scene, kept = pcd_folder
    out = tmp_path / "out"
    shutil.copytree(kept, out, ignore=shutil.ignore_patterns(".replaced-*"))
    assert pcd(scene, out, "cam000,cam002") == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cam000.png", "cam002.png"]
    images_txt = (out / "sparse" / "0" / "images.txt").read_text()
    assert "cam001.png" not in images_txt and "cam002.png" in images_txt
    assert hidden(out) == []


@pytest.mark.parametrize("failure,code", [("disk full", 2), ("ctrl-c", 130)])
def test_failed_pcd_run_leaves_the_previous_outputs_unchanged(pcd_folder, tmp_path, monkeypatch, failure, code):
    from vggt_trt.recon import pointcloud

    scene, kept = pcd_folder
    out = tmp_path / "out"
    shutil.copytree(kept, out, ignore=shutil.ignore_patterns(".replaced-*"))
    before = snapshot(out)

    def fail(*_args, **_kwargs):  # after points.ply and cameras.json are written
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "sparse" / "0" / "points3D.txt"))

    monkeypatch.setattr(pointcloud, "write_colmap_text", fail)
    assert pcd(scene, out, "cam000,cam001") == code
    assert snapshot(out) == before
    assert hidden(out) == []


def test_filters_that_keep_no_point_fail_and_leave_the_outputs(pcd_folder, tmp_path, capsys):
    scene, kept = pcd_folder
    out = tmp_path / "out"
    shutil.copytree(kept, out, ignore=shutil.ignore_patterns(".replaced-*"))
    before = snapshot(out)
    code = PCD.main(["--source", "images", "--images", str(scene), "--views", "cam000,cam001", "--torch",
                     "--model-name", "tiny", "--out_dir", str(out), "--conf-threshold", "1e30"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "no point is left after the filters" in errors[0], errors
    assert snapshot(out) == before and hidden(out) == []


def test_engines_dir_skips_moved_aside_and_staged_engines(tmp_path):
    from vggt_trt.cli.infer import engine_files

    for name in ("none/a_fp16.engine", "none/.replaced-a-1/a_fp16.engine", "none/.staging-a-1/a_fp32.engine",
                 "none/.a_fp16.engine.1234.tmp.engine", "int8/b_int8.engine"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert engine_files(tmp_path) == [tmp_path / "int8/b_int8.engine", tmp_path / "none/a_fp16.engine"]


def test_staging_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    import os
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])  # a process id that is no longer running
    dead.wait()
    out = tmp_path / "out"
    folders = {"killed": f"{socket.gethostname()} {dead.pid}", "running": f"{socket.gethostname()} {os.getpid()}",
               "other-host": f"elsewhere.example {dead.pid}", "no-owner": None}
    for name, owner in folders.items():
        (out / f".staging-x-{name}").mkdir(parents=True)
        (out / f".staging-x-{name}" / "x.onnx").write_bytes(b"partial")
        if owner is not None:
            (out / f".staging-x-{name}" / ".owner").write_text(owner)
    with StagedRun(out, "x", owns=lambda name: name.startswith("x.")) as staged:
        (staged.staging / "x.onnx").write_bytes(b"complete")
        assert staged.publish().published == ["x.onnx"], "the owner file is not published"
    assert sorted(hidden(out)) == [".staging-x-no-owner", ".staging-x-other-host", ".staging-x-running"]
    assert (out / "x.onnx").read_bytes() == b"complete"


def test_several_precisions_are_published_together_or_not_at_all(converted, tmp_path, monkeypatch):
    """fp16 and bf16 in one run (the API; the CLI's --all-precisions): bf16 fails, so fp16 is not published."""
    from vggt_trt.errors import AccuracyError
    from vggt_trt.pipelines.convert import ConvertOptions, convert

    out = tmp_path / "both"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(".replaced-*", "logs"))
    before = snapshot(out)
    cast = convert_pipeline.stage_cast

    def cast_or_fail(src, dst, precision, *args, **kwargs):
        if precision == "bf16":
            raise AccuracyError(f"{dst.name}: rel L2 over the bound")
        return cast(src, dst, precision, *args, **kwargs)

    monkeypatch.setattr(convert_pipeline, "stage_cast", cast_or_fail)
    source = tmp_path / "graph.onnx"
    shutil.copy(converted / f"{STEM}.onnx", source)
    opts = ConvertOptions(output_dir=out, onnx_in=source, precisions=("fp16", "bf16"), skip_build=True,
                          verify=False)
    with pytest.raises(AccuracyError):
        convert(opts)
    assert snapshot(out) == before and hidden(out) == []
    monkeypatch.setattr(convert_pipeline, "stage_cast", cast)
    reports = convert(opts)
    assert [r["precision"] for r in reports] == ["fp16", "bf16"]
    assert {f"{STEM}_fp16.onnx", f"{STEM}_bf16.onnx", f"{STEM}_bf16.json"} <= set(snapshot(out))
    assert all(r["output_folder"] == reports[0]["output_folder"] for r in reports)


def test_ctrl_c_while_publishing_is_held_until_the_set_is_in_place(tmp_path):
    import os
    import signal

    # Python's own handler, as under a terminal (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "old.png").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with StagedRun(out, "pcd", owns={"images", "points.ply", "summary.json"}.__contains__) as staged:
            (staged.staging / "images").mkdir()
            (staged.staging / "images" / "new.png").write_bytes(b"new")
            (staged.staging / "points.ply").write_bytes(b"ply")
            (staged.staging / "summary.json").write_text("{}")
            try:
                staged.publish(lambda publication: os.kill(os.getpid(), signal.SIGINT))
            finally:
                signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in out.iterdir()) == ["images", "points.ply", "summary.json"]
    assert [p.name for p in (out / "images").iterdir()] == ["new.png"]


def test_pcd_only_that_contradicts_the_onnx_in_graph_is_refused_before_any_work(converted, tmp_path, caplog):
    out = tmp_path / "kept"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(".replaced-*", "logs"))
    before = snapshot(out)
    assert run(["--onnx-in", str(out / f"{STEM}.onnx"), "--pcd-only", "--precision", "fp32", "--skip-build",
                "--output-dir", str(out)], tmp_path / "logs") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "has the point head" in errors[0] and "--pcd-only" in errors[0], errors
    assert snapshot(out) == before and hidden(out) == []
