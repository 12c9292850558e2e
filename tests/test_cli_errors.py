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
