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
