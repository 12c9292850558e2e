"""The one error path of every CLI (``run_cli``): file-system errors and Ctrl-C end in one line and an exit code."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Callable

import pytest

from vggt_trt.cli.common import run_cli

FS_CASES = [
    (errno.ENOSPC, "No space left on device", "disk full writing {path}"),
    (errno.EDQUOT, "Disk quota exceeded", "disk quota exceeded writing {path}"),
    (errno.EROFS, "Read-only file system", "read-only file system: {path}"),
    (errno.EACCES, "Permission denied", "permission denied: {path}"),
    (errno.EPERM, "Operation not permitted", "operation not permitted: {path}"),
    (errno.ENOTDIR, "Not a directory", "a file is in the way where a directory is needed: {path}"),
    (errno.EISDIR, "Is a directory", "a directory is in the way where a file is needed: {path}"),
    (errno.EEXIST, "File exists", "already exists and is in the way: {path}"),
    (errno.ENOENT, "No such file or directory", "no such file or directory: {path}"),
]


def raising(exc: BaseException) -> Callable[[], int]:
    def job() -> int:
        raise exc

    return job


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("code,strerror,expected", FS_CASES, ids=[errno.errorcode[c[0]] for c in FS_CASES])
def test_file_system_error_is_one_line_and_exit_2(tmp_path, capsys, code, strerror, expected):
    path = tmp_path / "out" / "vggt_fp16.engine"
    assert run_cli(raising(OSError(code, strerror, str(path))), None, "cli_test", False) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].endswith(expected.format(path=path))


def test_file_system_error_names_both_paths_of_a_rename(tmp_path, capsys):
    src, dst = tmp_path / ".x.tmp", tmp_path / "x.engine"
    assert run_cli(raising(OSError(errno.EACCES, "Permission denied", str(src), None, str(dst))),
                   None, "cli_test", False) == 2
    assert stderr_lines(capsys)[-1].endswith(f"permission denied: {src} -> {dst}")


def test_disk_full_without_a_path_still_says_so(capsys):
    assert run_cli(raising(OSError(errno.ENOSPC, "No space left on device")), None, "cli_test", False) == 2
    assert stderr_lines(capsys)[-1].endswith("no space left on device")


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(ConnectionResetError):
        run_cli(raising(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")), None, "cli_test", False)


def test_keyboard_interrupt_is_one_line_and_exit_130(capsys):
    assert run_cli(raising(KeyboardInterrupt()), None, "cli_test", False) == 130
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0] and "only complete artifacts" in lines[0]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_log_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, where):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the log directory should be")
    log_dir = blocker if where == "file" else blocker / "logs"
    ran = []
    assert run_cli(lambda: ran.append(1) or 0, log_dir, "cli_test", False) == 2
    lines = stderr_lines(capsys)
    assert not ran and len(lines) == 1, lines
    assert f"cannot write logs to --log-dir {log_dir}" in lines[0] and "Traceback" not in lines[0]


def test_cli_with_a_file_as_log_dir_says_so_in_one_line(tmp_path, capsys):
    import vggt_to_trt

    blocker = tmp_path / "logs"
    blocker.write_text("")
    assert vggt_to_trt.main(["--model-name", "tiny", "--log-dir", str(blocker)]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and f"--log-dir {blocker}" in lines[0], lines


SIGINT_DELAY_S = 1.0


def _have_rtx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.mark.skipif(not _have_rtx(), reason="tensorrt_rtx (pip install tensorrt-rtx-cu13) is not installed")
def test_ctrl_c_during_a_real_build_stops_with_130_and_no_engine(tmp_path):
    """TensorRT's callbacks used to swallow the KeyboardInterrupt: the build finished and the run exited 0."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, str(root / "vggt_to_trt.py"), "--export", "--model-name", "tiny", "--num-cams", "2",
           "--height", "28", "--width", "28", "--pcd-only", "--precision", "fp16", "--backend", "tensorrt-rtx",
           "--no-verify", "--no-simplify", "--opt-level", "0", "--workspace-gb", "1",
           "--output-dir", str(out), "--log-dir", str(tmp_path / "logs")]
    # a shell's background job inherits SIGINT ignored; the user's terminal delivers it
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, proc.kill)  # a hung build ends the test instead of hanging it
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "TensorRT build of" in line:
                time.sleep(SIGINT_DELAY_S)  # past the first phases: into TensorRT's long ones, where it logs
                if list(out.glob("*.engine")):
                    pytest.skip(f"the build finished within {SIGINT_DELAY_S} s, before the Ctrl-C")
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail("the build never started:\n" + "".join(lines[-20:]))
        sent = time.monotonic()
        lines += proc.stdout.readlines()
        code = proc.wait()
        waited = time.monotonic() - sent
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert code == 130, log[-3000:]
    assert waited < 45, f"Ctrl-C took {waited:.1f} s to stop the build"
    assert "interrupted (Ctrl-C)" in log and "Traceback" not in log and "Exception caught" not in log
    assert not list(out.glob("*.engine")) and not list(out.glob(".*.tmp")), sorted(p.name for p in out.iterdir())


def test_build_interrupt_holds_ctrl_c_and_raises_it_after_the_build():
    import os
    import signal

    from vggt_trt.trt.backend import BuildInterrupt

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        interrupt = BuildInterrupt()
        with interrupt.armed():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the Python-level handler runs between bytecodes
                if interrupt.is_requested():
                    break
        assert interrupt.is_requested()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)
    with pytest.raises(KeyboardInterrupt):
        interrupt.raise_if_requested()


def test_progress_monitor_cancels_the_build_once_asked():
    from types import SimpleNamespace

    from vggt_trt.trt.backend import make_progress_monitor

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    asked = []
    monitor = make_progress_monitor(SimpleNamespace(IProgressMonitor=IProgressMonitor), lambda: bool(asked))
    monitor.phase_start("Building engine", None, 3)
    assert monitor.step_complete("Building engine", 0) is True
    asked.append(1)
    assert monitor.step_complete("Building engine", 1) is False and not monitor.bars


# ------------------------------------------------------------------ out-of-range and contradictory flags
def _main(cli: str) -> Callable[[list[str]], int]:
    import importlib

    return importlib.import_module(f"vggt_trt.cli.{cli}").main


# every CLI's output folder flag: the table's runs get a folder with an earlier result in it
OUT_FLAG = {"convert": "--output-dir", "infer": "--json", "pcd": "--out-dir", "sweep": "--base-output",
            "view": None, "depth_anything": "--output-dir"}
ONE_MODEL = ["--torch", "--model-name", "tiny", "--random-init"]
BAD_FLAGS = [
    # vggt_to_trt.py
    ("convert", ["--export", "--num-cams", "-1"], "argument --num-cams: must be an integer >= 1, not -1"),
    ("convert", ["--export", "--min-cams", "0", "--max-cams", "4"], "argument --min-cams: must be an integer >= 1"),
    ("convert", ["--export", "--height", "0"], "argument --height: must be a side in pixels >= 14"),
    ("convert", ["--export", "--width", "abc"], "argument --width: must be a side in pixels >= 14 (a multiple of 14), "
                                                "not 'abc'"),
    ("convert", ["--export", "--seed", "-5"], "argument --seed: must be an integer >= 0, not -5"),
    ("convert", ["--export", "--precision", "fp16,bf16-all"], "--precision bf16-all is a PyTorch mode: it needs --backend torch"),
    ("convert", ["--export", "--opset", "11"], "argument --opset: must be an ONNX opset >= 18"),
    ("convert", ["--export", "--workspace-gb", "0"], "argument --workspace-gb: must be a number > 0, not 0"),
    ("convert", ["--export", "--workspace-gb", "nan"], "argument --workspace-gb: must be a number > 0, not nan"),
    ("convert", ["--export", "--max-aux-streams", "-1"], "argument --max-aux-streams: must be an integer >= 0"),
    ("convert", ["--export", "--calib-batches", "0"], "argument --calib-batches: must be an integer >= 1, not 0"),
    ("convert", ["--export", "--calib-seed", "-1"], "argument --calib-seed: must be an integer >= 0"),
    ("convert", ["--export", "--opt-level", "9"], "argument --opt-level: invalid choice: 9"),
    ("convert", ["--export", "--precision", "fp16,int3"], "argument --precision: invalid choice: 'int3'"),
    ("convert", ["--backend", "torch", "--precision", "bf16,fp16"], "--backend torch compiles one precision per run"),
    ("convert", ["--export", "--all-precisions", "--precision", "int8"],
     "--all-precisions and --precision exclude each other"),
    ("convert", ["--export", "--weights", "w.safetensors", "--random-init"],
     "--weights and --random-init exclude each other"),
    # trt_inference.py
    ("infer", [*ONE_MODEL, "--benchmark", "--iters", "-3"], "argument --iters: must be an integer >= 1, not -3"),
    ("infer", [*ONE_MODEL, "--benchmark", "--iters", "0"], "argument --iters: must be an integer >= 1, not 0"),
    ("infer", [*ONE_MODEL, "--benchmark", "--warmup", "-1"], "argument --warmup: must be an integer >= 0, not -1"),
    ("infer", [*ONE_MODEL, "--num-cams", "0"], "argument --num-cams: must be an integer >= 1"),
    ("infer", [*ONE_MODEL, "--size", "7"], "argument --size: must be a side in pixels >= 14"),
    ("infer", [*ONE_MODEL, "--frames-chunk-size", "0"], "argument --frames-chunk-size: must be an integer >= 1"),
    ("infer", [*ONE_MODEL, "--images", "scene", "--npy", "x.npy"], "--images and --npy exclude each other"),
    ("infer", [*ONE_MODEL, "--list-io", "--benchmark"], "--list-io and --benchmark exclude each other"),
    ("infer", [*ONE_MODEL, "--list-io", "--compare", "onnx"], "--list-io and --compare exclude each other"),
    ("infer", ["--engines-dir", "engines", "--engine", "a.engine"], "--engines-dir and --engine exclude each other"),
    ("infer", ["--engine", "a.engine", "--onnx", "a.onnx"], "--engine and --onnx: give one model to run"),
    # pcd_inference.py
    ("pcd", [*ONE_MODEL, "--images", "s", "--conf-percentile", "100"],
     "argument --conf-percentile: must be a percentage in [0, 100)"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--conf-percentile", "-1"], "argument --conf-percentile: must be a "
                                                                        "percentage in [0, 100)"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--conf-percentile", "150"], "not 150"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--conf-threshold", "-0.5"], "argument --conf-threshold: must be a "
                                                                        "number >= 0, not -0.5"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--voxel-size", "0"], "argument --voxel-size: must be a number > 0"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--colmap-max-points", "-1"], "argument --colmap-max-points: must be an "
                                                                         "integer >= 0"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--frame", "-1"], "argument --frame: must be an integer >= 0"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--num-cams", "0"], "argument --num-cams: must be an integer >= 1"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--random-views", "0"], "argument --random-views: must be an integer >= 1"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--target-size", "-14"], "argument --target-size: must be a side"),
    ("pcd", [*ONE_MODEL, "--scenes", "s/*", "--workers", "0"], "argument --workers: must be an integer >= 1"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--ema", "0"], "argument --ema: must be a fraction "
                                                                                 "in (0, 1]"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--ema", "1.5"], "argument --ema"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--frame-step", "0"], "argument --frame-step"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--max-batches", "0"], "argument --max-batches"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--stall-timeout", "-1"], "argument --stall-timeout"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--vggt-every", "-2"], "argument --vggt-every"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--depth-workers", "0"], "argument --depth-workers"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--max-voxels", "0"], "argument --max-voxels"),
    ("pcd", [*ONE_MODEL, "--source", "videos", "--videos", "v", "--pixel-stride", "0"], "argument --pixel-stride"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--viewer", "--viewer-port", "70000"],
     "argument --viewer-port: must be a TCP port in 0..65535"),
    ("pcd", [*ONE_MODEL, "--scenes", "s/*", "--ray-num-cpus", "0"], "argument --ray-num-cpus: must be an integer >= 1"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--views", "cam1,cam2", "--random-views", "2"],
     "--views and --random-views exclude each other"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--scenes", "s/*"], "--images and --scenes exclude each other"),
    ("pcd", [*ONE_MODEL, "--scenes", "s/*", "--viewer"], "--scenes and --viewer exclude each other"),
    ("pcd", [*ONE_MODEL, "--images", "s", "--onnx", "g.onnx"], "--onnx and --torch: give one model"),
    # run_all_exports.sh
    ("sweep", ["--jobs", "0"], "argument --jobs: must be an integer >= 1, not 0"),
    ("sweep", ["--num-cams", "-8"], "argument --num-cams: must be an integer >= 1, not -8"),
    ("sweep", ["--height", "0"], "argument --height: must be a side in pixels >= 14"),
    ("sweep", ["--cpus-per-job", "0"], "argument --cpus-per-job: must be a number > 0"),
    ("sweep", ["--mem-per-job-gib", "-1"], "argument --mem-per-job-gib: must be a number > 0"),
    ("sweep", ["--calib-batches", "0"], "argument --calib-batches: must be an integer >= 1"),
    # vggt-view
    ("view", ["OUT", "--port", "65536"], "argument --port: must be a TCP port in 0..65535 (0: any free port), not 65536"),
    ("view", ["OUT", "--port", "-1"], "argument --port: must be a TCP port"),
    ("view", ["OUT", "--max-points", "0"], "argument --max-points: must be an integer >= 1, not 0"),
    # Depth Anything converter
    ("depth_anything", ["--height", "7"], "argument --height: must be a side in pixels >= 14"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cli,argv,message", BAD_FLAGS, ids=[f"{c}:{' '.join(a[-2:])}" for c, a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, cli, argv, message):
    monkeypatch.chdir(tmp_path)  # relative inputs of the table resolve here; nothing may appear
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "result.json").write_text('{"from": "an earlier run"}')
    flag = OUT_FLAG[cli]
    argv = [out.as_posix() if a == "OUT" else a for a in argv]
    if flag is not None:
        argv += [flag, str(out / "result.json") if flag == "--json" else str(out)]
    with pytest.raises(SystemExit) as stop:
        _main(cli)(argv)
    assert stop.value.code == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in lines[0] and lines[0].endswith("(see --help)")
    assert _snapshot(out) == {"result.json": b'{"from": "an earlier run"}'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"], "something was written before the check"


@pytest.mark.parametrize("variable,value,message", [
    ("NUM_CAMS", "-1", "argument --num-cams: must be an integer >= 1, not -1"),
    ("JOBS", "abc", "argument --jobs: must be an integer >= 1, not 'abc'"),
    ("CPUS_PER_JOB", "0", "argument --cpus-per-job: must be a number > 0, not 0"),
    ("RAY_NUM_GPUS", "-1", "argument --ray-num-gpus: must be an integer >= 0, not -1"),
])
def test_bad_environment_default_of_the_sweep_is_the_same_one_line_error(tmp_path, capsys, monkeypatch,
                                                                          variable, value, message):
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("BASE_OUTPUT", str(tmp_path / "sweep"))
    with pytest.raises(SystemExit) as stop:
        _main("sweep")([])
    assert stop.value.code == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("cli,argv", [
    ("convert", ["--export", "--num-cams", "2", "--height", "28", "--width", "28", "--workspace-gb", "0.5",
                 "--seed", "0", "--max-aux-streams", "0", "--calib-batches", "1", "--opset", "18"]),
    ("infer", [*ONE_MODEL, "--benchmark", "--warmup", "0", "--iters", "1"]),
    ("pcd", [*ONE_MODEL, "--images", "s", "--conf-percentile", "0", "--conf-threshold", "0", "--frame", "0",
             "--colmap-max-points", "0", "--viewer-port", "0", "--out-dir", "o"]),
    ("view", ["OUT", "--port", "0", "--max-points", "1"]),
    ("sweep", ["--jobs", "1", "--cpus-per-job", "0.5", "--height", "14"]),
])
def test_values_at_the_ends_of_each_range_are_accepted(cli, argv):
    import importlib

    module = importlib.import_module(f"vggt_trt.cli.{cli}")
    args = module.build_parser().parse_args([a for a in argv if a != "OUT"] + (["out"] if "OUT" in argv else []))
    for flag, text in zip(argv, argv[1:]):  # each numeric flag of the row arrives as the number given
        name = flag.lstrip("-").replace("-", "_")
        if flag.startswith("--") and hasattr(args, name) and text.replace(".", "").isdigit():
            assert getattr(args, name) == type(getattr(args, name))(text), flag
