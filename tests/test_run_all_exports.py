"""run_all_exports.sh: the sweep logic with a stand-in converter, and a real MODEL=tiny sweep."""

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
    f.write(json.dumps(argv) + "\n")
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


def _calls(fake: dict[str, str]) -> list[list[str]]:
    return [json.loads(line) for line in Path(fake["FAKE_RECORD"]).read_text().splitlines()]


def test_sweep_stops_at_first_failure_and_reports_unavailable(tmp_path: Path, fake: dict[str, str]) -> None:
    env = {**fake, "QUANT_MODES": "none bitsandbytes-8bit torch-int8-dynamic modelopt-fp8",
           "FAKE_CODES": "bitsandbytes-8bit=3,torch-int8-dynamic=1"}
    res = _sweep(tmp_path, env)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "STOPPED at the first failing configuration: torch-int8-dynamic / all-precisions" in out
    summary = out.split("run_all_exports summary")[1]
    assert "none                 all-precisions  ok" in summary and "none                 fp32            ok" in summary
    assert "unavailable here: ERROR vggt_to_trt: bitsandbytes needs a CUDA GPU" in summary
    assert "FAILED(1)" in summary and "something broke in torch-int8-dynamic" in summary
    assert "modelopt-fp8" not in summary  # never reached
    calls = _calls(fake)
    modes = [c[c.index("--quant-mode") + 1] for c in calls]
    assert modes == ["none", "none", "bitsandbytes-8bit", "torch-int8-dynamic"]  # bnb fp32 skipped
    first, fp32 = calls[0], calls[1]
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
    sweep with a message naming it. (Exit code 3 "unavailable" is covered above: on this CPU machine every real
    mode runs -- bitsandbytes is emulated, ModelOpt is installed.)"""
    pytest.importorskip("tensorrt_rtx", reason="engine builds on CPU need tensorrt-rtx-cu13")
    env = {"PYTHON": sys.executable, "MODEL": "tiny", "NUM_CAMS": "2", "HEIGHT": "28", "WIDTH": "28",
           "PCD_ONLY": "1", "CALIB_BATCHES": "1", "QUANT_MODES": "none no-such-mode",
           "EXTRA_ARGS": "--opt-level 0 --workspace-gb 1 --no-verify"}
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
    assert res.returncode == 2, summary
    assert "STOPPED at the first failing configuration: no-such-mode / all-precisions" in out
    assert "invalid choice: 'no-such-mode'" in (tmp_path / "sweep/no-such-mode/logs/all-precisions.log").read_text()
