"""The edges of the ``aichatonline`` command (issue 13): OUTPUT that is no regular file, writes that
fail, input that is not UTF-8, resume that must not be fooled, SIGTERM, and the options users asked
for.

Every test runs the installed console script in a subprocess against an emulator over loopback
(started here, so that it can be slowed or gated). No test sleeps to synchronise: the tests read
the child's output, and gate the emulator's replies with events.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import trustme
from test_cli import (
    POSIX,
    SCRIPT,
    TIMEOUT,
    _env,
    finish,
    one_error_line,
    popen,
    prompt_sha256,
    read_until,
    records,
    reply_of,
    run,
)

import aichatonline_sync as aco
from aichatonline_sync.cli.io import MAX_INPUT_BYTES, read_done
from aichatonline_sync.testing import Emulator, default_reply

pytestmark = pytest.mark.skipif(
    SCRIPT is None, reason="the aichatonline console script is not installed (pip install -e .)"
)

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


def run_bytes(
    *args: Any,
    input: Optional[bytes] = None,
    env: Optional[dict[str, str]] = None,
    stdin: Any = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    preexec_fn: Optional[Callable[[], None]] = None,
) -> subprocess.CompletedProcess[bytes]:
    """Like ``run``, with bytes in and out (and arguments that may be bytes)."""
    assert SCRIPT is not None
    return subprocess.run(
        [SCRIPT, *args],
        input=input,
        stdin=stdin if input is None else None,
        stdout=stdout,
        stderr=stderr,
        env=_env(env),
        timeout=TIMEOUT,
        check=False,
        preexec_fn=preexec_fn,
    )


def prompts_file(tmp_path: Path, *lines: str, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def whole_json_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line of ``data`` parsed; fails on a half-written record."""
    assert data == b"" or data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class HoldAfterFirstChat:
    """Gates the emulator: the first chat is answered whole, every later one is held before its
    first piece until :meth:`release` (the stream is open, so the chat can be aborted)."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.gate = threading.Event()
        self.held = threading.Event()
        emu.before_piece = self

    def __call__(self, index: int) -> None:
        if len(self.emu.chat_requests) > 1:
            self.held.set()
            self.gate.wait(TIMEOUT)

    def release(self) -> None:
        self.gate.set()


# -- OUTPUT that is not a regular file -----------------------------------------------------------


TOO_LARGE = f"is larger than {MAX_INPUT_BYTES >> 20} MiB"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_input_is_a_usage_error_at_its_bound(emu: Emulator) -> None:
    """INPUT is read whole, to check every line first: one that never ends was read until memory
    ran out. Now it stops at the bound (stdin and ``chat``'s prompt: tests/test_cli_io.py)."""
    result = run("batch", "/dev/zero", "--base-url", emu.url)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"aichatonline: error: INPUT '/dev/zero' {TOO_LARGE}: it is read whole, so that every "
        "line is checked before anything is sent; split it (for an endless source of prompts, "
        "use batch_iter() in Python). Nothing was sent"
    )
    assert emu.chat_requests == []


def test_a_regular_input_over_the_bound_is_refused_before_it_is_read(
    emu: Emulator, tmp_path: Path
) -> None:
    big = tmp_path / "big.txt"
    with open(big, "wb") as file:
        file.truncate(MAX_INPUT_BYTES + 1)  # sparse: nothing to write, nothing read
    result = run("batch", str(big), "--base-url", emu.url)
    assert result.returncode == 2
    assert f"INPUT {str(big)!r} {TOO_LARGE}" in one_error_line(result.stderr)
    assert emu.chat_requests == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_batch_to_dev_full_is_one_error_line(tmp_path: Path) -> None:
    """It read /dev/full to resume from it, endlessly; now it is not read, and the first write
    fails with one line."""
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


def test_batch_output_is_a_folder(tmp_path: Path, emu: Emulator) -> None:
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


def test_resume_reads_no_line_beyond_the_bound(tmp_path: Path) -> None:
    """A record line longer than the bound is skipped, not held in memory; its id runs again."""
    digest = prompt_sha256("one")
    long_record = json.dumps({"id": 1, "text": "x" * 5000, "prompt_sha256": digest})
    short_record = json.dumps({"id": 2, "text": "y", "prompt_sha256": prompt_sha256("two")})
    output = tmp_path / "results.jsonl"
    output.write_text(f"{long_record}\n{short_record}\n", encoding="utf-8")
    wanted = {1: digest, 2: prompt_sha256("two"), "2": prompt_sha256("two")}
    assert read_done(str(output), wanted, limit=1000) == {2}  # (the id 2, not "2")
    assert read_done(str(output), wanted, limit=10_000) == {1, 2}
    assert read_done(str(tmp_path / "missing.jsonl"), wanted) == set()


# -- writes that fail ----------------------------------------------------------------------------


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
    nobody to tell; the results are still written and the exit status is still the one of the run
    (before, the failed write of the summary was a traceback nobody saw, and exit status 1)."""
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
def test_batch_read_only_output(emu: Emulator, tmp_path: Path, what: str) -> None:
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


# -- input that is not UTF-8 ---------------------------------------------------------------------


@pytest.mark.parametrize("io_encoding", ["utf-8", "utf-8:strict", "latin-1"])
def test_chat_stdin_not_utf8_is_a_usage_error(emu: Emulator, io_encoding: str) -> None:
    result = run_bytes(
        "chat",
        "--base-url",
        emu.url,
        input=b"first line\nHi \xff there\n",
        env={"PYTHONIOENCODING": io_encoding},
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr.decode())
    assert line.startswith("aichatonline: error: stdin, line 2: not valid UTF-8 (byte 0xff")
    assert emu.requests == []  # not even a token


@pytest.mark.parametrize("io_encoding", ["utf-8", "utf-8:strict"])
def test_batch_stdin_not_utf8_is_a_usage_error(emu: Emulator, io_encoding: str) -> None:
    result = run_bytes(
        "batch",
        "-",
        "--base-url",
        emu.url,
        input=b"one\ntwo\n\xc3(\n",
        env={"PYTHONIOENCODING": io_encoding},
    )
    assert result.returncode == 2
    assert "stdin, line 3: not valid UTF-8" in one_error_line(result.stderr.decode())
    assert emu.requests == []
    assert result.stdout == b""


def test_batch_input_file_not_utf8_names_the_file_and_line(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"one\nzwei\n" + "drei über\n".encode("latin-1"))
    out = tmp_path / "results.jsonl"
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"INPUT {str(prompts)!r}, line 3: not valid UTF-8 (byte 0xfc" in line
    assert emu.requests == []
    assert not out.exists()


@pytest.mark.skipif(not POSIX, reason="arguments as bytes")
def test_chat_argument_not_utf8_is_a_usage_error(emu: Emulator) -> None:
    result = run_bytes("chat", "--base-url", emu.url, b"caf\xe9")
    assert result.returncode == 2
    assert "PROMPT is not valid UTF-8" in one_error_line(result.stderr.decode())
    assert emu.requests == []


def test_a_bom_is_dropped_wherever_a_file_is_read(emu: Emulator, tmp_path: Path) -> None:
    bom = "\ufeff"
    chat = run_bytes("chat", "--base-url", emu.url, input=f"{bom}Hello\n".encode())
    assert chat.returncode == 0, chat.stderr
    assert emu.chat_requests[-1].json["prompt"] == "Hello"

    plain = prompts_file(tmp_path, f"{bom}one", "two")
    result = run("batch", str(plain), "--base-url", emu.url)
    assert result.returncode == 0, result.stderr
    assert {r["id"]: r["text"] for r in records(result.stdout)}[1] == reply_of(emu, "one")

    # A BOM before the first JSON line: still JSON lines (not a prompt that starts with a BOM).
    jsonl = tmp_path / "prompts.txt"
    jsonl.write_text(bom + json.dumps({"id": "q", "prompt": "one"}) + "\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    result = run("batch", str(jsonl), "-o", str(out), "--base-url", emu.url)
    assert result.returncode == 0, result.stderr
    # An OUTPUT with a BOM (saved by an editor) still resumes from its first record.
    out.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    again = run("batch", str(jsonl), "-o", str(out), "--base-url", emu.url)
    assert again.stderr == "0 succeeded, 0 failed, 1 skipped (already done)\n"


# -- resume that cannot be fooled ----------------------------------------------------------------


def test_a_changed_prompt_runs_again(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(prompts), "-o", str(out), "--base-url", emu.url]
    assert run(*args).returncode == 0

    prompts_file(tmp_path, "one", "TWO")  # line 2 edited: the same id, another prompt
    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert second.stderr == "1 succeeded, 0 failed, 1 skipped (already done)\n"
    assert emu.chat_requests[-1].json["prompt"] == "TWO"
    got = records(out.read_text(encoding="utf-8"))
    assert [(r["id"], r["prompt_sha256"]) for r in got[-1:]] == [(2, prompt_sha256("TWO"))]
    # The old answer stays, as history; the newest record of an id is the one that counts.
    assert [r["text"] for r in got if r["id"] == 2] == [reply_of(emu, "two"), reply_of(emu, "TWO")]

    third = run(*args)
    assert third.stderr == "0 succeeded, 0 failed, 2 skipped (already done)\n"
    assert len(emu.chat_requests) == 3


def test_a_changed_system_message_runs_everything_again(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(prompts), "-o", str(out), "--base-url", emu.url]
    assert run(*args).returncode == 0
    assert run(*args, "--system", "Be brief.").stderr == (
        "2 succeeded, 0 failed, 0 skipped (already done)\n"
    )
    expected = aco.format_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    )
    assert expected in {r.json["prompt"] for r in emu.chat_requests}
    assert run(*args, "--system", "Be brief.").stderr == (
        "0 succeeded, 0 failed, 2 skipped (already done)\n"
    )


def test_the_newest_record_of_an_id_wins(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    history = [
        {"id": 1, "text": "old answer", "prompt_sha256": prompt_sha256("one")},
        {"id": 1, "error": {"type": "RateLimitError", "message": "429"}},  # newer: failed
        {"id": 2, "error": {"type": "RateLimitError", "message": "429"}},
        {"id": 2, "text": "answer", "prompt_sha256": prompt_sha256("two")},  # newer: done
        {"id": 3, "text": "no hash: from before records had one"},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.stderr == "1 succeeded, 0 failed, 1 skipped (already done)\n"
    assert [r.json["prompt"] for r in emu.chat_requests] == ["one"]


def test_a_plain_line_that_starts_with_a_brace_is_a_prompt(emu: Emulator, tmp_path: Path) -> None:
    lines = ["Hi", "{not json, just a prompt", '{"prompt": "sent as written: a plain file"}']
    prompts = prompts_file(tmp_path, *lines)
    result = run("batch", str(prompts), "--base-url", emu.url)
    assert result.returncode == 0, result.stderr
    assert sorted(r.json["prompt"] for r in emu.chat_requests) == sorted(lines)
    assert {r["id"] for r in records(result.stdout)} == {1, 2, 3}


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("prompts.txt", json.dumps({"prompt": "one"})),  # the first line is a JSON object
        ("prompts.jsonl", '{"prompt": "one"'),  # the name says so, even with a broken first line
    ],
)
def test_a_json_lines_file_accounts_for_every_line(
    emu: Emulator, tmp_path: Path, name: str, first: str
) -> None:
    prompts = prompts_file(
        tmp_path, first, "a plain line", json.dumps({"prompt": "three"}), name=name
    )
    out = tmp_path / "results.jsonl"
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.returncode == 1
    got = records(out.read_text(encoding="utf-8"))
    assert sorted(r["line"] for r in got) == [1, 2, 3]  # every input line has its record
    bad = [r for r in got if "error" in r]
    assert {r["error"]["type"] for r in bad} == {"InvalidInputLine"}
    assert any("so every line must be one" in r["error"]["message"] for r in bad)
    assert "a plain line" not in {r.json["prompt"] for r in emu.chat_requests}


# -- SIGTERM -------------------------------------------------------------------------------------


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


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prompt"),
    [
        (["Hello", "world"], "Hello world"),
        (["Hello", "--system", "S", "world"], "System: S\nUser: Hello world\nAssistant:"),
        (["--", "-5", "degrees"], "-5 degrees"),
        (["a", "-", "b"], "a - b"),
    ],
)
def test_chat_words_are_one_prompt(emu: Emulator, args: list[str], prompt: str) -> None:
    result = run("chat", "--base-url", emu.url, *args)
    assert result.returncode == 0, result.stderr
    assert emu.chat_requests[-1].json["prompt"] == prompt
    assert result.stdout == reply_of(emu, prompt) + "\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["chat", "--frobnicate", "Hi"],
            "unknown option '--frobnicate' (see 'aichatonline chat --help'; to send a prompt "
            "that starts with '-', put '--' before it)",
        ),
        (["chat", "Hi", "-x"], "unknown option '-x' (see 'aichatonline chat --help'"),
        (
            ["batch", "p.txt", "--frobnicate"],
            "unknown option '--frobnicate' (see 'aichatonline batch --help')",
        ),
        (
            ["batch", "p.txt", "q.txt"],
            "unexpected argument 'q.txt' (see 'aichatonline batch --help')",
        ),
        (
            ["serve", "--frobnicate"],
            "unknown option '--frobnicate' (see 'aichatonline serve --help')",
        ),
    ],
)
def test_unknown_options_point_to_the_command_help(args: list[str], expected: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"aichatonline: error: {expected}")


# -- options -------------------------------------------------------------------------------------


def test_batch_system(emu: Emulator, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "two"}]
    prompts = prompts_file(
        tmp_path, json.dumps({"prompt": "one"}), json.dumps({"messages": messages})
    )
    result = run("batch", str(prompts), "--base-url", emu.url, "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    system = {"role": "system", "content": "Be brief."}
    expected = {
        1: aco.format_prompt([system, {"role": "user", "content": "one"}]),
        2: aco.format_prompt([system, *messages]),
    }
    assert sorted(r.json["prompt"] for r in emu.chat_requests) == sorted(expected.values())
    got = {r["id"]: r for r in records(result.stdout)}
    for item_id, prompt in expected.items():
        assert got[item_id]["text"] == reply_of(emu, prompt)
        assert got[item_id]["prompt_sha256"] == prompt_sha256(prompt)


def test_timeout_connect_read(emu: Emulator) -> None:
    emu.stall("chat", after=0)  # headers, then nothing
    result = run("chat", "--base-url", emu.url, "--max-retries", "0", "--timeout", "5,0.3", "Hi")
    assert result.returncode == 1
    assert "timed out waiting for" in one_error_line(result.stderr)
    assert "after 0.3 s" in result.stderr


@pytest.mark.parametrize("value", ["none", "none,none", "5,none", " 10 , 60 "])
def test_timeout_none_and_pairs(emu: Emulator, value: str) -> None:
    result = run("chat", "--base-url", emu.url, "--timeout", value, "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply_of(emu, "Hi") + "\n"
    env = run("chat", "--base-url", emu.url, "Hi", env={"AICHATONLINE_TIMEOUT": value})
    assert env.returncode == 0, env.stderr


@pytest.mark.parametrize("value", ["1,2,3", "a,b", "0,5", "5,", "never"])
def test_bad_timeouts_are_usage_errors(emu: Emulator, value: str) -> None:
    result = run("chat", "--base-url", emu.url, "--timeout", value, "Hi")
    assert result.returncode == 2
    assert "--timeout" in one_error_line(result.stderr)
    env = run("chat", "--base-url", emu.url, "Hi", env={"AICHATONLINE_TIMEOUT": value})
    assert env.returncode == 2
    assert "$AICHATONLINE_TIMEOUT" in one_error_line(env.stderr)
    assert emu.requests == []


def test_max_line_bytes(tmp_path: Path) -> None:
    long_piece = "x" * 3000
    with Emulator(reply=[long_piece]) as emu:
        small = run("chat", "--base-url", emu.url, "--max-line-bytes", "1000", "Hi")
        assert small.returncode == 1
        one_error_line(small.stderr)
        assert small.stdout == ""
        big = run("chat", "--base-url", emu.url, "--max-line-bytes", "100000", "Hi")
        assert big.returncode == 0, big.stderr
        assert big.stdout == long_piece + "\n"
        prompts = prompts_file(tmp_path, "one")
        batch = run("batch", str(prompts), "--base-url", emu.url, "--max-line-bytes", "1000")
        assert batch.returncode == 1
        assert records(batch.stdout)[0]["error"]["type"] in ("ProtocolError", "StreamError")
    for bad in ("0", "-5", "x"):
        result = run("chat", "--emulator", "--max-line-bytes", bad, "Hi")
        assert result.returncode == 2
        assert "--max-line-bytes" in one_error_line(result.stderr)


# -- --verify ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_emu(ca: trustme.CA) -> Iterator[Emulator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Emulator(ssl_context=context) as emulator:
        yield emulator


def test_untrusted_certificate_says_what_to_do_on_the_command_line(https_emu: Emulator) -> None:
    result = run("chat", "--base-url", https_emu.url, "--max-retries", "0", "Hi")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "certificate verify failed" in line
    assert "--verify /path/to/ca.pem" in line
    assert "REQUESTS_CA_BUNDLE" in line
    assert "verify='" not in line  # a Python keyword the command line does not have
    assert https_emu.requests == []


def test_verify_a_ca_bundle(https_emu: Emulator, ca: trustme.CA, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    result = run("chat", "--base-url", https_emu.url, "--verify", str(bundle), "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hi") + "\n"
    assert result.stderr == ""
    prompts = prompts_file(tmp_path, "one")
    batch = run("batch", str(prompts), "--base-url", https_emu.url, "--verify", str(bundle))
    assert batch.returncode == 0, batch.stderr


def test_verify_false(https_emu: Emulator) -> None:
    result = run("chat", "--base-url", https_emu.url, "--verify", "false", "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hi") + "\n"
    # One warning of ours, not urllib3's at every request.
    assert result.stderr == (
        "aichatonline: WARNING: TLS certificates are not verified (--verify false)\n"
    )


def test_verify_a_missing_bundle_is_a_usage_error(https_emu: Emulator, tmp_path: Path) -> None:
    result = run("chat", "--base-url", https_emu.url, "--verify", str(tmp_path / "nope.pem"), "Hi")
    assert result.returncode == 2
    assert "--verify" in one_error_line(result.stderr)
    assert https_emu.requests == []
