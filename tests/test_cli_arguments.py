"""The arguments and options of ``aichatonline``: the words of ``chat`` are one prompt, an unknown
option points to the command's help, and ``--system``, ``--timeout`` (with
``$AICHATONLINE_TIMEOUT``) and ``--max-line-bytes`` do what they say or are usage errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support_cli import (
    NEEDS_SCRIPT,
    prompts_file,
)
from test_cli import (
    one_error_line,
    prompt_sha256,
    records,
    reply_of,
    run,
)

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

pytestmark = NEEDS_SCRIPT


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


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


@pytest.mark.parametrize(("command", "port"), [("serve", 8765), ("gateway", 8000)])
def test_serving_commands_listen_on_loopback_at_their_own_port(
    command: str, port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from aichatonline_sync.cli.commands import build_parser

    parser = build_parser()
    args = parser.parse_args([command])
    assert (args.host, args.port) == ("127.0.0.1", port)
    assert parser.parse_args([command, "--host", "::1", "--port", "0"]).port == 0
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--host HOST the address to listen on (default: 127.0.0.1)" in shown
    assert f"--port PORT the port to listen on; 0 picks a free one (default: {port})" in shown


def test_batch_system_comes_before_every_prompt(emu: Emulator, tmp_path: Path) -> None:
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


def test_timeout_as_a_pair_bounds_connect_and_read(emu: Emulator) -> None:
    emu.stall("chat", after=0)  # headers, then nothing
    result = run("chat", "--base-url", emu.url, "--max-retries", "0", "--timeout", "5,0.3", "Hi")
    assert result.returncode == 1
    assert "timed out waiting for" in one_error_line(result.stderr)
    assert "after 0.3 s" in result.stderr


@pytest.mark.parametrize("value", ["none", "none,none", "5,none", " 10 , 60 "])
def test_timeout_takes_none_and_pairs(emu: Emulator, value: str) -> None:
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


def test_max_line_bytes_bounds_a_reply_line(tmp_path: Path) -> None:
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
