"""run_all_exports.sh: the sweep logic with a stand-in converter (serial, JOBS=2, Ray), and real MODEL=tiny sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_all_exports.sh"

FAKE = r'''
import json, os, sys
argv = sys.argv[1:]
mode = argv[argv.index("--quant-mode") + 1]
out = argv[argv.index("--output-dir") + 1]
with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps({"argv": argv, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
codes = dict(kv.split("=") for kv in os.environ.get("FAKE_CODES", "").split(",") if kv)
code = int(codes.get(mode, 0))
if code == 0 and "--export" in argv:
    open(os.path.join(out, "vggt-2x3x28x42-pcd.onnx"), "w").write("graph")
if code == 3:
    print("ERROR vggt_to_trt: bitsandbytes needs a CUDA GPU (torch sees none)")
elif code:
    print("ERROR vggt_to_trt: something broke in " + mode)
sys.exit(code)
'''


def _sweep(tmp_path: Path, env: dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, "BASE_OUTPUT": str(tmp_path / "sweep"), **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def fake(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "fake_converter.py"
    script.write_text(FAKE)
    return {"PYTHON": sys.executable, "CONVERTER": str(script), "FAKE_RECORD": str(tmp_path / "calls.jsonl"),
            "NUM_CAMS": "2", "HEIGHT": "28", "WIDTH": "42", "PCD_ONLY": "1", "MODEL": "tiny",
            "CALIB_DATA": "data/x", "CALIB_BATCHES": "4", "CALIB_SEED": "9", "CALIB_CPU": "1",
            "EXTRA_ARGS": "--skip-build --opt-level 1"}


def _records(fake: dict[str, str]) -> list[dict]:
    return [json.loads(line) for line in Path(fake["FAKE_RECORD"]).read_text().splitlines()]


def _calls(fake: dict[str, str]) -> list[list[str]]:
    return [r["argv"] for r in _records(fake)]


def _rows(stdout: str) -> list[tuple[str, ...]]:
    """Summary rows as (mode, configuration, result): the columns that do not depend on timing or placement."""
    summary = stdout.split("run_all_exports summary")[-1].splitlines()[2:]
    return [tuple(line.split()[:3]) for line in summary if line and not line.startswith(("STOPPED", " "))
            and "configuration(s) failed" not in line]


MIXED = {"QUANT_MODES": "none bitsandbytes-8bit torch-int8-dynamic modelopt-fp8",
         "FAKE_CODES": "bitsandbytes-8bit=3,torch-int8-dynamic=1"}


def test_a_failure_is_reported_and_the_others_go_on(tmp_path: Path, fake: dict[str, str]) -> None:
    res = _sweep(tmp_path, {**fake, **MIXED})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "STOPPED" not in res.stdout
    assert _rows(res.stdout) == [("none", "all-precisions", "ok"), ("none", "fp32", "ok"),
                                 ("bitsandbytes-8bit", "all-precisions", "unavailable"),
                                 ("bitsandbytes-8bit", "fp32", "skipped"),
                                 ("torch-int8-dynamic", "all-precisions", "FAILED(1)"),
                                 ("torch-int8-dynamic", "fp32", "FAILED(1)"),
                                 ("modelopt-fp8", "all-precisions", "ok"), ("modelopt-fp8", "fp32", "ok")]
    assert "2 configuration(s) failed: torch-int8-dynamic / all-precisions (log: " in res.stdout
    fp32 = [c for c in _calls(fake) if c[c.index("--quant-mode") + 1] == "torch-int8-dynamic"][1]
    assert "--export" in fp32 and "--onnx-in" not in fp32  # the failed mode exported nothing to reuse
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["runner"] == "serial" and len(report["results"]) == 8
    assert report["results"][4]["rc"] == 1 and report["results"][4]["log"].endswith(
        "torch-int8-dynamic/logs/all-precisions.log")


def test_fail_fast_stops_at_first_failure_and_reports_unavailable(tmp_path: Path, fake: dict[str, str]) -> None:
    env = {**fake, **MIXED, "FAIL_FAST": "1"}
    res = _sweep(tmp_path, env)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "STOPPED at the first failing configuration: torch-int8-dynamic / all-precisions" in out
    summary = out.split("run_all_exports summary")[1]
    assert "none                 all-precisions  ok" in summary and "none                 fp32            ok" in summary
    assert "unavailable here: ERROR vggt_to_trt: bitsandbytes needs a CUDA GPU" in summary
    assert "FAILED(1)" in summary and "something broke in torch-int8-dynamic" in summary
    assert "modelopt-fp8         -               not run" in summary  # never reached
    calls = _calls(fake)
    modes = [c[c.index("--quant-mode") + 1] for c in calls]
    assert modes == ["none", "none", "bitsandbytes-8bit", "torch-int8-dynamic"]  # bnb fp32 skipped
    first, fp32 = calls[0], calls[1]
    assert "none                 all-precisions  ok" in summary and f"{os.uname().nodename}" in summary
    assert "--export" in first and "--all-precisions" in first
    assert fp32[fp32.index("--onnx-in") + 1].endswith("sweep/none/vggt-2x3x28x42-pcd.onnx")
    assert fp32[fp32.index("--precision") + 1] == "fp32"
    for flag, value in (("--num-cams", "2"), ("--height", "28"), ("--width", "42"), ("--model-name", "tiny"),
                        ("--calib-data", "data/x"), ("--calib-batches", "4"), ("--calib-seed", "9"),
                        ("--opt-level", "1"), ("--output-dir", str(tmp_path / "sweep" / "none"))):
        assert first[first.index(flag) + 1] == value, flag
    assert {"--pcd-only", "--calib-cpu", "--skip-build"} <= set(first)
    for mode in ("none", "bitsandbytes-8bit", "torch-int8-dynamic"):
        assert (tmp_path / "sweep" / mode / "logs" / "all-precisions.log").is_file()
    assert "something broke" in (tmp_path / "sweep/torch-int8-dynamic/logs/all-precisions.log").read_text()


def test_unavailable_only_is_success_unless_strict(tmp_path: Path, fake: dict[str, str]) -> None:
    env = {**fake, "QUANT_MODES": "bitsandbytes-nf4 none", "FAKE_CODES": "bitsandbytes-nf4=3"}
    res = _sweep(tmp_path, env)
    assert res.returncode == 0 and "STOPPED" not in res.stdout
    assert "bitsandbytes-nf4     all-precisions  unavailable" in res.stdout
    res = _sweep(tmp_path, {**env, "STRICT": "1"})
    assert res.returncode == 3 and "STOPPED at the first failing configuration: bitsandbytes-nf4" in res.stdout


def test_real_tiny_sweep(tmp_path: Path) -> None:
    """MODEL=tiny through the real vggt_to_trt.py: `none` builds every precision, then an unknown mode stops the
    FAIL_FAST sweep with a message naming it. (Exit code 3 "unavailable" is covered above: on this CPU machine every real
    mode runs -- bitsandbytes is emulated, ModelOpt is installed.)"""
    pytest.importorskip("tensorrt_rtx", reason="engine builds on CPU need tensorrt-rtx-cu13")
    env = {"PYTHON": sys.executable, "MODEL": "tiny", "NUM_CAMS": "2", "HEIGHT": "28", "WIDTH": "28",
           "PCD_ONLY": "1", "CALIB_BATCHES": "1", "QUANT_MODES": "none no-such-mode",
           "FAIL_FAST": "1", "EXTRA_ARGS": "--opt-level 0 --workspace-gb 1 --no-verify"}
    res = _sweep(tmp_path, env, timeout=400)
    out = res.stdout
    summary = out.split("run_all_exports summary")[-1]
    assert "none                 all-precisions  ok" in summary, out[-4000:] + res.stderr[-2000:]
    assert "none                 fp32            ok" in summary, summary
    base = tmp_path / "sweep" / "none"
    for prec in ("fp32", "fp16", "bf16", "int8"):
        assert (base / f"vggt-2x3x28x28-pcd_{prec}.engine").is_file(), prec
    report = json.loads((base / "vggt-2x3x28x28-pcd_fp16.json").read_text())
    assert report["precision"] == "fp16" and report["quant_mode"] == "none"
    # fp32 continues the mode's set from its own export (--onnx-in): the other precisions stay, nothing moved aside
    fp32 = json.loads((base / "vggt-2x3x28x28-pcd_fp32.json").read_text())
    assert fp32["output_folder"]["moved_aside"] == [] and not list(base.glob(".*")), sorted(base.iterdir())
    assert res.returncode == 2, summary
    assert "STOPPED at the first failing configuration: no-such-mode / all-precisions" in out
    assert "invalid choice: 'no-such-mode'" in (tmp_path / "sweep/no-such-mode/logs/all-precisions.log").read_text()


def test_jobs_2_runs_the_same_configurations_with_one_gpu_each(tmp_path: Path, fake: dict[str, str]) -> None:
    serial = _sweep(tmp_path / "a", {**fake, **MIXED, "FAKE_RECORD": str(tmp_path / "a.jsonl")})
    env = {**fake, **MIXED, "JOBS": "2", "GPUS_PER_JOB": "1", "CUDA_VISIBLE_DEVICES": "3,5",
           "FAKE_RECORD": str(tmp_path / "b.jsonl")}
    parallel = _sweep(tmp_path / "b", env)
    assert parallel.returncode == serial.returncode == 1, parallel.stdout + parallel.stderr
    assert _rows(parallel.stdout) == _rows(serial.stdout)
    assert "local (JOBS=2)" in parallel.stdout
    records = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert sorted(json.dumps(r["argv"]).replace("/b/", "/a/") for r in records) == sorted(
        json.dumps(r["argv"]) for r in (json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()))
    assert {r["gpus"] for r in records} <= {"3", "5"}  # each configuration saw exactly one of the two GPUs
    assert " gpu 3 " in parallel.stdout or " gpu 5 " in parallel.stdout


def test_jobs_are_capped_by_memory() -> None:
    from vggt_trt.pipelines.sweep import SweepOptions, local_jobs

    full = SweepOptions(base_output=Path("x"), jobs=4)
    assert local_jobs(full, memory_bytes=24 << 30) == 1  # (24 - 2) GiB / 16 GiB per full-size configuration
    assert local_jobs(full, memory_bytes=64 << 30) == 3
    assert local_jobs(SweepOptions(base_output=Path("x"), jobs=4, model="tiny"), memory_bytes=24 << 30) == 4
    assert local_jobs(SweepOptions(base_output=Path("x"), jobs=4, mem_per_job_gib=5), memory_bytes=24 << 30) == 4


def test_base_output_must_be_writable(tmp_path: Path, fake: dict[str, str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = _sweep(tmp_path, {**fake, "QUANT_MODES": "none", "BASE_OUTPUT": str(blocker / "sweep")})
    assert res.returncode == 2 and "cannot be created" in res.stderr, res.stderr


def test_missing_ray_names_the_requirements_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from vggt_trt.cluster import require_ray
    from vggt_trt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match="requirements-scale.txt"):
        require_ray()


def test_ray_local_runs_the_same_configurations_on_logical_gpus(tmp_path: Path, fake: dict[str, str]) -> None:
    """RAY_ADDRESS=local: the sweep starts a small Ray (2 CPUs, 2 logical GPUs, 80 MB object store) and stops it."""
    pytest.importorskip("ray", reason="pip install -r requirements-scale.txt")
    serial = _sweep(tmp_path / "a", {**fake, **MIXED, "FAKE_RECORD": str(tmp_path / "a.jsonl")})
    env = {**fake, **MIXED, "RAY_ADDRESS": "local", "RAY_NUM_CPUS": "2", "RAY_NUM_GPUS": "2",
           "RAY_OBJECT_STORE_MB": "80", "GPUS_PER_JOB": "1", "FAKE_RECORD": str(tmp_path / "b.jsonl")}
    res = _sweep(tmp_path / "b", env, timeout=240)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert _rows(res.stdout) == _rows(serial.stdout) and "ray (local)" in res.stdout
    records = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(records) == 7 and {r["gpus"] for r in records} <= {"0", "1"}, records
    assert not list((tmp_path / "b" / "sweep").glob(".vggt-trt-shared-check-*"))  # the marker is removed


def _graph_hashes(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): json.loads(p.read_text())["onnx"]["sha256"]
            for p in sorted(base.glob("*/vggt-*_*.json"))}


def test_real_tiny_sweep_is_the_same_serial_with_jobs_and_on_ray(tmp_path: Path) -> None:
    """Two quant modes of MODEL=tiny (PRECISIONS=fp16: fp16 then fp32; graphs only: --skip-build) serially, with
    JOBS=2 and on a local Ray: every precision graph has the same hash."""
    pytest.importorskip("ray", reason="pip install -r requirements-scale.txt")
    env = {"PYTHON": sys.executable, "MODEL": "tiny", "NUM_CAMS": "2", "HEIGHT": "28", "WIDTH": "28",
           "PCD_ONLY": "1", "QUANT_MODES": "none torch-int8-dynamic", "PRECISIONS": "fp16",
           "EXTRA_ARGS": "--skip-build --no-verify"}
    runs = {"serial": {}, "jobs": {"JOBS": "2"},
            "ray": {"RAY_ADDRESS": "local", "RAY_NUM_CPUS": "2", "RAY_OBJECT_STORE_MB": "80"}}
    hashes = {}
    for name, extra in runs.items():
        res = _sweep(tmp_path / name, {**env, **extra}, timeout=900)
        assert res.returncode == 0, name + res.stdout[-3000:] + res.stderr[-3000:]
        hashes[name] = _graph_hashes(tmp_path / name / "sweep")
    assert sorted(hashes["serial"]) == [f"{m}/vggt-2x3x28x28-pcd_{p}.json" for m in ("none", "torch-int8-dynamic")
                                        for p in ("fp16", "fp32")]
    assert len(set(hashes["serial"].values())) == 4  # four different graphs
    assert hashes["jobs"] == hashes["serial"] and hashes["ray"] == hashes["serial"]


def test_precisions_one_configuration_each(tmp_path: Path, fake: dict[str, str]) -> None:
    res = _sweep(tmp_path, {**fake, "QUANT_MODES": "none", "PRECISIONS": "fp16 int8"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert _rows(res.stdout) == [("none", "fp16", "ok"), ("none", "int8", "ok"), ("none", "fp32", "ok")]
    calls = _calls(fake)
    assert "--export" in calls[0] and calls[0][calls[0].index("--precision") + 1] == "fp16"
    assert all("--onnx-in" in c for c in calls[1:]) and "--all-precisions" not in sum(calls, [])
    bad = _sweep(tmp_path, {**fake, "QUANT_MODES": "none", "PRECISIONS": "fp17"})
    assert bad.returncode == 2 and "unknown ['fp17']" in bad.stderr


def test_gpu_requests() -> None:
    from vggt_trt.pipelines.sweep import SweepOptions, resources_for

    cpu = SweepOptions(base_output=Path("x"), model="tiny")
    assert resources_for(cpu, gpus_available=False) == {"num_cpus": 1.0, "memory": 1 << 30, "num_gpus": 0}
    assert resources_for(cpu, gpus_available=True)["num_gpus"] == 1  # calibration may use CUDA there
    assert resources_for(SweepOptions(base_output=Path("x"), calib_cpu=True), True)["num_gpus"] == 0
    trt = SweepOptions(base_output=Path("x"), extra_args=["--backend", "tensorrt"])
    assert resources_for(trt, gpus_available=False)["num_gpus"] == 1 and resources_for(trt, False)["memory"] == 16 << 30
    assert resources_for(SweepOptions(base_output=Path("x"), gpus_per_job=0, extra_args=["--backend", "tensorrt"]),
                         True)["num_gpus"] == 0


@pytest.mark.parametrize("with_venv", [True, False])
def test_default_python_is_the_project_venv_else_python3(tmp_path: Path, with_venv: bool) -> None:
    """PYTHON unset: the sweep runs under .venv/bin/python beside the script when there is one, else python3."""
    (tmp_path / "run_all_exports.sh").write_text(SCRIPT.read_text())
    fake_bin = tmp_path / ("project/.venv/bin" if with_venv else "bin")
    fake_bin.mkdir(parents=True)
    if with_venv:
        (tmp_path / "project/run_all_exports.sh").write_text(SCRIPT.read_text())
    exe = fake_bin / ("python" if with_venv else "python3")
    exe.write_text(f'#!/bin/sh\necho "{exe.name} from {fake_bin.parent.name} $@"\n')
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}" if not with_venv else env["PATH"]
    script = tmp_path / ("project/run_all_exports.sh" if with_venv else "run_all_exports.sh")
    res = subprocess.run(["bash", str(script), "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("python from .venv" if with_venv else "python3 from "), res.stdout
    assert "-m vggt_trt.cli.sweep --help" in res.stdout
