"""What ``aichatonline`` reads: INPUT and stdin are bounded in size and must be UTF-8 (the error
names the source and the line, and nothing is sent), a byte order mark is dropped wherever a file
is read, and a file is plain lines or JSON lines with a record for every line.

Each test runs the installed console script in a subprocess against an emulator over loopback;
the bounded reads themselves are tested in-process in tests/test_cli_io.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support_cli import (
    NEEDS_SCRIPT,
    prompts_file,
    run_bytes,
)
from test_cli import (
    POSIX,
    one_error_line,
    records,
    reply_of,
    run,
)

from aichatonline_sync.cli.io import MAX_INPUT_BYTES
from aichatonline_sync.testing import Emulator

pytestmark = NEEDS_SCRIPT


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


TOO_LARGE = f"is larger than {MAX_INPUT_BYTES >> 20} MiB"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_input_is_a_usage_error_at_its_bound(emu: Emulator) -> None:
    """INPUT is read whole, to check every line first: one that never ends stops at the bound
    (stdin and ``chat``'s prompt: tests/test_cli_io.py)."""
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
