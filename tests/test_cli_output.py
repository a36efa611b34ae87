"""Where ``aichatonline`` writes: an OUTPUT that is no regular file (``/dev/full``,
``/dev/stdout``, a named pipe, a folder, the INPUT itself, a read-only file), and writes that fail
(a full disk, a stderr that takes nothing, a reader that goes away, a file size limit): one error
line, the right exit status, and only whole records in OUTPUT.

Each test runs the installed console script in a subprocess against an emulator over loopback,
synchronised by reading the child's output and gating the emulator's replies (no sleeps)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from _support_cli import (
    LINUX,
    NEEDS_SCRIPT,
    HoldAfterFirstChat,
    prompts_file,
    run_bytes,
    whole_json_lines,
)
from test_cli import (
    POSIX,
    TIMEOUT,
    one_error_line,
    popen,
    read_until,
    records,
    reply_of,
    run,
)

from aichatonline_sync.testing import Emulator

pytestmark = NEEDS_SCRIPT


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_batch_to_dev_full_is_one_error_line(tmp_path: Path) -> None:
    """An OUTPUT that cannot be resumed from is not read: the first write fails with one line."""
    prompts = prompts_file(tmp_path, "Hi", "What is HTTP?")
    result = run("batch", str(prompts), "-o", "/dev/full", "--emulator")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "cannot write to OUTPUT '/dev/full'" in line
    assert "No space left on device" in line
    assert result.stdout == ""


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="needs /dev/stdout")
def test_batch_output_dev_stdout_is_like_dash(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    for _ in range(2):  # never read to resume: every prompt runs each time
        result = run("batch", str(prompts), "-o", "/dev/stdout", "--base-url", emu.url)
        assert result.returncode == 0, result.stderr
        assert {r["id"]: r["text"] for r in records(result.stdout)} == {
            1: reply_of(emu, "one"),
            2: reply_of(emu, "two"),
        }
        assert result.stderr == "2 succeeded, 0 failed, 0 skipped (already done)\n"
    assert len(emu.chat_requests) == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_batch_output_to_a_named_pipe_is_written_not_read(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    fifo = tmp_path / "results.pipe"
    os.mkfifo(fifo)
    for _ in range(2):
        received: list[bytes] = []
        reader = threading.Thread(target=lambda into=received: into.append(fifo.read_bytes()))
        reader.start()
        try:
            result = run("batch", str(prompts), "-o", str(fifo), "--base-url", emu.url)
        finally:
            if reader.is_alive():  # the command never opened the pipe: unblock the reader
                with open(fifo, "wb"):
                    pass
            reader.join(TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert {r["id"] for r in whole_json_lines(received[0])} == {1, 2}
    assert len(emu.chat_requests) == 4


def test_batch_output_that_is_a_folder_is_a_usage_error(tmp_path: Path, emu: Emulator) -> None:
    prompts = prompts_file(tmp_path, "one")
    result = run("batch", str(prompts), "-o", str(tmp_path), "--base-url", emu.url)
    assert result.returncode == 2
    assert "cannot open OUTPUT" in one_error_line(result.stderr)
    assert emu.requests == []


@pytest.mark.parametrize("how", ["same name", "symlink", "hard link", "stdin"])
def test_batch_refuses_output_that_is_the_input(emu: Emulator, tmp_path: Path, how: str) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    before = prompts.read_bytes()
    output = prompts
    if how == "symlink":
        output = tmp_path / "link.jsonl"
        output.symlink_to(prompts)
    elif how == "hard link":
        output = tmp_path / "hard.jsonl"
        os.link(prompts, output)
    with open(prompts, "rb") as stdin:
        source = "-" if how == "stdin" else str(prompts)
        result = run_bytes("batch", source, "-o", str(output), "--base-url", emu.url, stdin=stdin)
    assert result.returncode == 2
    assert "is the INPUT file" in one_error_line(result.stderr.decode())
    assert emu.requests == []
    assert prompts.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_chat_to_a_full_disk_is_one_error_line(emu: Emulator) -> None:
    with open("/dev/full", "wb") as full:
        result = run_bytes("chat", "--base-url", emu.url, "Hi", stdout=full)
    assert result.returncode == 1
    line = one_error_line(result.stderr.decode())
    assert line == "aichatonline: error: cannot write to stdout: No space left on device"


def _close_stderr() -> None:
    os.close(2)  # in the child, before it starts: Python's sys.stderr is then None


@pytest.mark.skipif(not os.path.exists("/dev/full") or not POSIX, reason="needs /dev/full")
@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_a_stderr_that_takes_nothing_changes_no_exit_status(
    emu: Emulator, tmp_path: Path, stderr: str
) -> None:
    """``2>/dev/full`` or ``2>&-``: the summary and the error lines cannot be written, and there is
    nobody to tell; the results are still written and the exit status is still the one of the
    run."""
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    with open("/dev/full", "wb") as full:
        how: dict[str, Any] = (
            {"stderr": full} if stderr == "full" else {"stderr": None, "preexec_fn": _close_stderr}
        )
        done = run_bytes("batch", str(prompts), "-o", str(out), "--base-url", emu.url, **how)
        usage = run_bytes("chat", "--no-such-option", "Hi", **how)
        no_command = run_bytes(**how)
        emu.fail("chat", 500)
        failed = run_bytes("chat", "--base-url", emu.url, "--max-retries", "0", "Hi", **how)
    assert done.returncode == 0
    assert {r["id"]: r["text"] for r in records(out.read_text())} == {
        1: reply_of(emu, "one"),
        2: reply_of(emu, "two"),
    }
    assert usage.returncode == no_command.returncode == 2
    assert failed.returncode == 1
    assert failed.stdout == b""


@pytest.mark.skipif(not POSIX, reason="SIGPIPE semantics")
def test_batch_stdout_closed_early_says_how_far_it_got(emu: Emulator, tmp_path: Path) -> None:
    """``aichatonline batch prompts.txt | head -1``."""
    hold = HoldAfterFirstChat(emu)
    prompts = prompts_file(tmp_path, "one", "two", "three")
    proc = popen("batch", str(prompts), "--base-url", emu.url, "--workers", "1")
    try:
        first = read_until(proc, b"\n")
        assert json.loads(first)["id"] == 1
        assert proc.stdout is not None
        proc.stdout.close()  # like head -1, once it has its line
    finally:
        hold.release()
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not end")
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 141
    assert one_error_line(err) == (
        "aichatonline: error: cannot write to stdout: the reader of the pipe went away; "
        "stopped after 1 record"
    )


def _records_and_bytes(path: Path) -> list[dict[str, Any]]:
    return whole_json_lines(path.read_bytes())


@pytest.mark.skipif(not LINUX, reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_write_cut_short_leaves_only_whole_records(emu: Emulator, tmp_path: Path) -> None:
    """A file size limit (like a disk that fills up) cuts the second record mid-way: the file is
    cut back to the whole first record, and the command says so in one line."""
    import resource

    prompts = prompts_file(tmp_path, "one", "two")
    args = ["batch", str(prompts), "--base-url", emu.url, "--workers", "1"]
    probe = tmp_path / "probe.jsonl"
    assert run_bytes(*args, "-o", str(probe)).returncode == 0
    first_length = len(probe.read_bytes().splitlines(keepends=True)[0])
    limit = first_length + 40  # room for the first record, whatever its elapsed, not the second

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    output = tmp_path / "results.jsonl"
    result = run_bytes(
        *args,
        "-o",
        str(output),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr.decode())
    assert line.startswith(
        f"aichatonline: error: cannot write to OUTPUT '{output}': File too large"
    )
    assert line.endswith("; stopped after 1 record")
    got = _records_and_bytes(output)
    assert [r["id"] for r in got] == [1]
    # And the next run resumes from it.
    again = run_bytes(*args, "-o", str(output))
    assert again.returncode == 0
    assert again.stderr.decode() == "1 succeeded, 0 failed, 1 skipped (already done)\n"
    assert [r["id"] for r in _records_and_bytes(output)] == [1, 2]


def _without_dac_override() -> None:
    """In the child, before exec: drop root's power to write where the mode bits forbid it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def _as_a_user() -> Optional[Callable[[], None]]:
    """What makes the command subject to file modes (``None``: it is already)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    return _without_dac_override if LINUX else None


@pytest.mark.skipif(not POSIX, reason="POSIX file modes")
@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_output_is_refused_before_sending(
    emu: Emulator, tmp_path: Path, what: str
) -> None:
    prompts = prompts_file(tmp_path, "one")
    folder = tmp_path / "ro"
    folder.mkdir()
    output = folder / "results.jsonl"
    if what == "file":
        output.write_text("", encoding="utf-8")
        output.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    else:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    preexec = _as_a_user()
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(output)!r}, 'a')"],
            capture_output=True,
            check=False,
            preexec_fn=preexec,
        )
        if probe.returncode == 0:
            pytest.skip("this user may write to read-only files")
        result = run_bytes(
            "batch", str(prompts), "-o", str(output), "--base-url", emu.url, preexec_fn=preexec
        )
    finally:
        folder.chmod(stat.S_IRWXU)
        if output.exists():
            output.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert result.returncode == 2
    line = one_error_line(result.stderr.decode())
    assert line == (f"aichatonline: error: cannot open OUTPUT {str(output)!r}: Permission denied")
    assert emu.requests == []  # refused before anything was sent
