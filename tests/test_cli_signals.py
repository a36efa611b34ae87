"""SIGTERM (and a second signal) to ``aichatonline``: ``batch`` stops like Ctrl-C with a summary
and whole records that a rerun resumes from, a record being written is finished first unless a
second signal comes, and ``chat`` ends its line. Exit status 143."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support_cli import (
    NEEDS_SCRIPT,
    HoldAfterFirstChat,
    prompts_file,
    whole_json_lines,
)
from test_cli import (
    POSIX,
    TIMEOUT,
    finish,
    popen,
    read_until,
    run,
)

from aichatonline_sync.testing import Emulator

pytestmark = NEEDS_SCRIPT


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


@pytest.mark.skipif(not POSIX, reason="needs SIGTERM")
@pytest.mark.parametrize("to_file", [False, True])
def test_batch_sigterm_is_like_ctrl_c(emu: Emulator, tmp_path: Path, to_file: bool) -> None:
    hold = HoldAfterFirstChat(emu)
    prompts = prompts_file(tmp_path, "one", "two", "three")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(prompts), "--base-url", emu.url, "--workers", "1"]
    proc = popen(*args, *(["-o", str(out)] if to_file else []))
    try:
        first = b""
        if to_file:
            # The second chat is held; the first one's record may or may not be written yet.
            assert hold.held.wait(TIMEOUT), "the second chat never started"
        else:
            first = read_until(proc, b"\n")
        proc.send_signal(signal.SIGTERM)  # while the second chat is held mid-run
        rest, stderr = finish(proc)
    finally:
        hold.release()
    assert proc.returncode == 143
    written = whole_json_lines(out.read_bytes() if to_file else first + rest)
    done = len(written)
    assert [r["id"] for r in written] == [1][:done]
    assert done == 1 or to_file
    assert stderr.decode() == (
        f"{done} succeeded, 0 failed, 0 skipped (already done), {3 - done} not finished "
        "(terminated)\n"
    )
    if to_file:  # and the rerun resumes
        again = run(*args, "-o", str(out))
        assert again.stderr == f"{3 - done} succeeded, 0 failed, {done} skipped (already done)\n"


@pytest.mark.skipif(not POSIX, reason="needs SIGTERM")
def test_sigterm_in_the_middle_of_a_record_waits_for_its_end(tmp_path: Path) -> None:
    """The record (far larger than a pipe holds) is being written when SIGTERM comes: the write
    goes on to the end of the record, and then the command stops as terminated."""
    text = "x" * 300_000
    prompts = prompts_file(tmp_path, "one")
    with Emulator(reply=[text]) as emu:
        proc = popen("batch", str(prompts), "--base-url", emu.url)
        assert proc.stdout is not None
        first = os.read(proc.stdout.fileno(), 1)  # the record has begun; the pipe is full
        assert first == b"{"
        proc.send_signal(signal.SIGTERM)
        rest, stderr = finish(proc)
    assert proc.returncode == 143, stderr
    assert stderr.decode() == (
        "1 succeeded, 0 failed, 0 skipped (already done), 0 not finished (terminated)\n"
    )
    [record] = whole_json_lines(first + rest)
    assert record["text"] == text


@pytest.mark.skipif(not POSIX, reason="needs SIGTERM")
def test_a_second_signal_does_not_wait_for_a_stuck_write(tmp_path: Path) -> None:
    """Nobody reads the pipe: the record cannot be finished, and a second signal stops it all."""
    prompts = prompts_file(tmp_path, "one")
    with Emulator(reply=["x" * 300_000]) as emu:
        proc = popen("batch", str(prompts), "--base-url", emu.url)
        assert proc.stdout is not None
        assert os.read(proc.stdout.fileno(), 1) == b"{"  # the pipe is full; nothing more is read
        proc.send_signal(signal.SIGINT)  # waits for the end of the record...
        proc.send_signal(signal.SIGTERM)  # ...which never comes: this one does not wait
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the command did not end")
        finish(proc)
    # The second signal handled stops it: SIGTERM, unless the kernel handed SIGINT to a worker
    # thread, so that the main thread ran SIGTERM's handler first (then SIGINT's raises: 130).
    # That happened twice under heavy load; what is under test is that the command ends.
    assert proc.returncode in (143, 130)


@pytest.mark.skipif(not POSIX, reason="needs SIGTERM")
def test_chat_sigterm_ends_the_line(emu: Emulator) -> None:
    emu.stall("chat", after=1)
    proc = popen("chat", "--base-url", emu.url, "Hello")
    first = emu.pieces_for("Hello")[0].encode()
    assert read_until(proc, first) == first
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 143
    assert out == b"\n"  # the final newline
    assert err == b""
