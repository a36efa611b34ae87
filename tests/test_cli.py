"""The ``aichatonline`` command, run as the installed console script in a subprocess.

Every test talks to the bundled emulator (``--emulator``, or an :class:`Emulator` started here and
passed as ``--base-url``, so that faults can be injected). No test sleeps to synchronise: the tests
read the child's output and wait on the child with a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator, default_reply

TIMEOUT = 30.0
POSIX = os.name == "posix"


def _find_script() -> Optional[str]:
    candidate = Path(sys.executable).with_name("aichatonline")
    if candidate.exists():
        return str(candidate)
    return shutil.which("aichatonline")


SCRIPT = _find_script()

pytestmark = pytest.mark.skipif(
    SCRIPT is None, reason="the aichatonline console script is not installed (pip install -e .)"
)


def _env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and key.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


def run(
    *args: str,
    input: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None
    return subprocess.run(
        [SCRIPT, *args],
        input=input,
        stdin=stdin if input is None else None,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(env),
        timeout=TIMEOUT,
        check=False,
    )


def popen(*args: str) -> subprocess.Popen[bytes]:
    assert SCRIPT is not None
    return subprocess.Popen(
        [SCRIPT, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read the child's stdout until ``needle`` appears (fails after ``timeout`` seconds)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                proc.kill()
                pytest.fail(f"timed out waiting for {needle!r}; got {data!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"stdout ended before {needle!r}; got {data!r}")
            data += chunk
    return data


def finish(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the command did not end")
    return out, err


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("aichatonline: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def reply_of(emu: Emulator, prompt: str) -> str:
    return "".join(emu.pieces_for(prompt))


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


# -- general -------------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"aichatonline {aco.__version__}\n"


@pytest.mark.parametrize("command", [(), ("chat",), ("batch",), ("serve",)])
def test_help_shows_an_example(command: Sequence[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    name = command[0] if command else "chat"
    assert f"aichatonline {name} " in result.stdout.split("examples:", 1)[1]


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "aichatonline: error: give a command" in result.stderr


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aichatonline_sync", "chat", "--emulator", "Hi"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hi") + "\n"


# -- chat ----------------------------------------------------------------------------------------


def test_chat_prompt_argument(emu: Emulator) -> None:
    result = run("chat", "--base-url", emu.url, "Hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply_of(emu, "Hello there") + "\n"
    assert result.stderr == ""
    assert emu.chat_requests[-1].json["prompt"] == "Hello there"


def test_chat_with_the_in_process_emulator() -> None:
    result = run("chat", "--emulator", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hello") + "\n"


def test_chat_emulator_ignores_the_proxy_environment() -> None:
    dead_proxy = "http://127.0.0.1:9"
    env = {"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy, "NO_PROXY": "", "no_proxy": ""}
    result = run("chat", "--emulator", "--max-retries", "0", "Hello", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hello") + "\n"


def test_chat_base_url_from_the_environment(emu: Emulator) -> None:
    result = run("chat", "Hi", env={"AICHATONLINE_BASE_URL": emu.url})
    assert result.returncode == 0, result.stderr
    assert len(emu.chat_requests) == 1


def test_chat_prompt_from_stdin(emu: Emulator) -> None:
    result = run("chat", "--base-url", emu.url, input="What is HTTP?\n")
    assert result.returncode == 0, result.stderr
    assert emu.chat_requests[-1].json["prompt"] == "What is HTTP?"
    assert result.stdout == reply_of(emu, "What is HTTP?") + "\n"


def test_chat_dash_reads_stdin(emu: Emulator) -> None:
    result = run("chat", "--base-url", emu.url, "-", input="line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert emu.chat_requests[-1].json["prompt"] == "line one\nline two"


def test_chat_system(emu: Emulator) -> None:
    result = run("chat", "--base-url", emu.url, "--system", "Be brief.", "Hi")
    assert result.returncode == 0, result.stderr
    expected = aco.format_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert emu.chat_requests[-1].json["prompt"] == expected
    assert result.stdout == reply_of(emu, expected) + "\n"


def test_chat_no_extra_newline_when_the_reply_ends_with_one() -> None:
    with Emulator(reply=["Hello", " world\n"]) as emu:
        result = run("chat", "--base-url", emu.url, "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n"


def test_chat_streams_each_piece_as_it_arrives() -> None:
    gate = threading.Event()

    def before_piece(index: int) -> None:
        if index == 1:
            gate.wait(TIMEOUT)

    with Emulator(reply=["first ", "second"], before_piece=before_piece) as emu:
        proc = popen("chat", "--base-url", emu.url, "Hi")
        try:
            assert read_until(proc, b"first ") == b"first "  # while the second is held back
        finally:
            gate.set()
        out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out == b"second\n"


def test_chat_failure_is_one_line_and_exit_1(emu: Emulator) -> None:
    emu.fail("chat", 503, times=5)
    result = run("chat", "--base-url", emu.url, "--max-retries", "0", "Hi")
    assert result.returncode == 1
    assert "503" in one_error_line(result.stderr)
    assert result.stdout == ""


def test_chat_retries_from_the_environment(emu: Emulator) -> None:
    emu.fail("chat", 503, times=1)
    result = run("chat", "--base-url", emu.url, "Hi", env={"AICHATONLINE_MAX_RETRIES": "0"})
    assert result.returncode == 1
    one_error_line(result.stderr)
    assert len(emu.chat_requests) == 1


def test_chat_stream_error_after_partial_text(emu: Emulator) -> None:
    emu.drop("chat", after=2)
    result = run("chat", "--base-url", emu.url, "Hello")
    assert result.returncode == 1
    assert result.stdout == "".join(emu.pieces_for("Hello")[:2]) + "\n"
    one_error_line(result.stderr)


def test_chat_upstream_error_line(emu: Emulator) -> None:
    emu.error_line(500, "the model is overloaded", after=1)
    result = run("chat", "--base-url", emu.url, "Hello")
    assert result.returncode == 1
    assert result.stdout == emu.pieces_for("Hello")[0] + "\n"
    assert "the model is overloaded" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--timeout", "abc"], {}),
        (["--timeout", "0"], {}),
        (["--timeout", "-1"], {}),
        (["--max-retries", "-1"], {}),
        (["--max-retries", "x"], {}),
        (["--base-url", "ftp://example.com"], {}),
        (["--proxy", "nonsense"], {}),
        (["--model", "gpt-99"], {}),
        ([], {"AICHATONLINE_TIMEOUT": "soon"}),
        ([], {"AICHATONLINE_MAX_RETRIES": "many"}),
        ([], {"AICHATONLINE_PROXY": "ftp://proxy"}),
        ([], {"AICHATONLINE_BASE_URL": "not a url"}),
    ],
)
def test_chat_bad_options_are_usage_errors(args: list[str], env: dict[str, str]) -> None:
    result = run("chat", *args, "Hi", env=env)
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr)
    assert result.stdout == ""


def test_chat_emulator_and_base_url_exclude_each_other() -> None:
    result = run("chat", "--emulator", "--base-url", "http://127.0.0.1:1", "Hi")
    assert result.returncode == 2
    one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "stdin_text"),
    [(["   "], None), ([], ""), (["-"], "\n"), (["--system", "S", ""], None)],
)
def test_chat_empty_prompt_is_a_usage_error(
    emu: Emulator, args: list[str], stdin_text: Optional[str]
) -> None:
    result = run("chat", "--base-url", emu.url, *args, input=stdin_text, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "empty" in one_error_line(result.stderr)
    assert emu.chat_requests == []


@pytest.mark.skipif(not POSIX, reason="needs a pseudo-terminal")
def test_chat_no_prompt_and_a_terminal_is_a_usage_error(emu: Emulator) -> None:
    import pty

    main_fd, tty_fd = pty.openpty()
    try:
        result = run("chat", "--base-url", emu.url, stdin=tty_fd)
    finally:
        os.close(tty_fd)
        os.close(main_fd)
    assert result.returncode == 2
    assert "no prompt" in one_error_line(result.stderr)


@pytest.mark.skipif(not POSIX, reason="needs SIGINT")
def test_chat_ctrl_c_during_a_stalled_stream(emu: Emulator) -> None:
    emu.stall("chat", after=1)
    proc = popen("chat", "--base-url", emu.url, "Hello")
    first = emu.pieces_for("Hello")[0].encode()
    assert read_until(proc, first) == first
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert err == b""
    assert out in (b"", b"\n")


@pytest.mark.skipif(not POSIX, reason="SIGPIPE semantics")
def test_chat_broken_pipe_exits_quietly() -> None:
    gate = threading.Event()

    def before_piece(index: int) -> None:
        if index == 1:
            gate.wait(TIMEOUT)

    with Emulator(reply=["first ", "second ", "third"], before_piece=before_piece) as emu:
        proc = popen("chat", "--base-url", emu.url, "Hi")
        try:
            read_until(proc, b"first ")
            assert proc.stdout is not None
            proc.stdout.close()  # like `| head -c 6`
        finally:
            gate.set()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the command did not end")
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 141
    assert err == b""


# -- batch ---------------------------------------------------------------------------------------


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompt_sha256(prompt: str, model: str = "gpt-4o-mini") -> str:
    """What the README says a record's ``prompt_sha256`` is."""
    canonical = json.dumps({"model": model, "prompt": prompt}, sort_keys=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def test_batch_plain_lines(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First question\n\nSecond question\n   \nThird question\n", encoding="utf-8")
    result = run("batch", str(prompts), "--base-url", emu.url, "--workers", "3")
    assert result.returncode == 0, result.stderr
    got = {r["id"]: r for r in records(result.stdout)}
    expected = {1: "First question", 3: "Second question", 5: "Third question"}
    assert set(got) == set(expected)
    for item_id, prompt in expected.items():
        assert got[item_id]["text"] == reply_of(emu, prompt)
        assert isinstance(got[item_id]["elapsed"], float)
        assert "error" not in got[item_id]
    assert result.stderr.strip() == "3 succeeded, 0 failed, 0 skipped (already done)"
    assert sorted(r.json["prompt"] for r in emu.chat_requests) == sorted(expected.values())


def test_batch_json_lines(emu: Emulator, tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    lines = [
        json.dumps({"id": "q1", "prompt": "What is HTTP?"}),
        json.dumps({"messages": messages}),
        "",
        json.dumps({"id": 7, "prompt": "Seven"}),
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    got = {r["id"]: r["text"] for r in records(out.read_text(encoding="utf-8"))}
    assert got == {
        "q1": reply_of(emu, "What is HTTP?"),
        2: reply_of(emu, aco.format_prompt(messages)),
        7: reply_of(emu, "Seven"),
    }


def test_batch_stdin_and_in_process_emulator() -> None:
    result = run("batch", "-", "--emulator", input="a\nb\n")
    assert result.returncode == 0, result.stderr
    assert {r["id"]: r["text"] for r in records(result.stdout)} == {
        1: default_reply("a"),
        2: default_reply("b"),
    }


def test_batch_failure_then_resume(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    emu.fail("chat", 429, times=1)
    args = ["batch", str(prompts), "-o", str(out), "--base-url", emu.url, "--max-retries", "0"]

    first = run(*args, "--workers", "1")  # one worker: the first prompt gets the 429
    assert first.returncode == 1
    assert first.stderr.strip() == "2 succeeded, 1 failed, 0 skipped (already done)"
    assert "Traceback" not in first.stderr
    got = records(out.read_text(encoding="utf-8"))
    assert len(got) == 3
    failed = [r for r in got if "error" in r]
    assert len(failed) == 1
    assert failed[0]["id"] == 1
    assert failed[0]["error"]["type"] == "RateLimitError"
    assert "429" in failed[0]["error"]["message"]
    assert len(emu.chat_requests) == 3

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip() == "1 succeeded, 0 failed, 2 skipped (already done)"
    assert len(emu.chat_requests) == 4
    assert emu.chat_requests[-1].json["prompt"] == "one"
    got = records(out.read_text(encoding="utf-8"))
    assert len(got) == 4
    assert got[-1] == {
        "id": 1,
        "text": reply_of(emu, "one"),
        "elapsed": got[-1]["elapsed"],
        "line": 1,
        "prompt_sha256": prompt_sha256("one"),
    }

    third = run(*args)
    assert third.returncode == 0
    assert third.stderr.strip() == "0 succeeded, 0 failed, 3 skipped (already done)"
    assert len(emu.chat_requests) == 4


def test_batch_resume_after_a_cut_short_last_line(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    done = json.dumps({"id": 1, "text": "done", "prompt_sha256": prompt_sha256("one")})
    out.write_text(done + '\n{"id": 2, "te', encoding="utf-8")
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "1 succeeded, 0 failed, 1 skipped (already done)"
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[1] == '{"id": 2, "te'
    assert json.loads(lines[2])["id"] == 2


def test_batch_malformed_lines(emu: Emulator, tmp_path: Path) -> None:
    lines = [
        '{"prompt": "good"',  # 1: bad JSON
        '{"foo": 1}',  # 2: neither prompt nor messages
        json.dumps({"id": "a", "prompt": "fine"}),  # 3
        json.dumps({"id": "a", "prompt": "again"}),  # 4: duplicate id
        json.dumps({"messages": "not a list"}),  # 5
        json.dumps({"prompt": "   "}),  # 6: empty prompt
        json.dumps({"prompt": "plain"}),  # 7
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run("batch", str(prompts), "--base-url", emu.url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    stderr = result.stderr.strip().splitlines()
    for number in (1, 2, 4, 5, 6):
        assert any(f"line {number}:" in line for line in stderr), result.stderr
    assert not any(f"line {number}:" in line for line in stderr for number in (3, 7))
    assert "duplicate id" in result.stderr
    assert stderr[-1] == "2 succeeded, 5 failed, 0 skipped (already done)"
    got = records(result.stdout)
    assert {r["id"] for r in got if "text" in r} == {"a", 7}
    # Every input line is accounted for in the output: the malformed ones as error records.
    bad = {r["line"]: r for r in got if "error" in r}
    assert sorted(bad) == [1, 2, 4, 5, 6]
    assert {r["error"]["type"] for r in bad.values()} == {"InvalidInputLine"}
    assert bad[1]["id"] is None  # no id to be had from it
    assert bad[4]["id"] is None  # its id belongs to line 3
    assert bad[2]["id"] == 2


def test_batch_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    result = run("batch", str(tmp_path / "nope.txt"), "--emulator")
    assert result.returncode == 2
    assert "nope.txt" in one_error_line(result.stderr)


@pytest.mark.parametrize("args", [["--workers", "0"], ["--rate-limit", "0"], ["--timeout", "x"]])
def test_batch_bad_options(tmp_path: Path, args: list[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n", encoding="utf-8")
    result = run("batch", str(prompts), "--emulator", *args)
    assert result.returncode == 2
    one_error_line(result.stderr)


def test_batch_rate_limit_and_model(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    result = run(
        "batch",
        str(prompts),
        "--base-url",
        emu.url,
        "--rate-limit",
        "1000",
        "--model",
        "gpt-4o-mini",
    )
    assert result.returncode == 0, result.stderr
    assert len(records(result.stdout)) == 2


# -- serve ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not POSIX, reason="needs SIGINT/SIGTERM")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve(sig: signal.Signals) -> None:
    proc = popen("serve", "--port", "0", "--framing", "length", "--gzip")
    try:
        line = read_until(proc, b"\n").decode()
        assert line.startswith("Emulator listening on http://127.0.0.1:")
        assert line.endswith(" (Ctrl-C to stop)\n")
        url = line.split()[3]
        response = requests.get(f"{url}/api/v1/user/getUniqueId?canvas=-abcdefghij", timeout=10)
        assert response.status_code == 200
        with aco.Session(url, max_retries=0) as session:
            assert session.complete("Hi") == default_reply("Hi")
    finally:
        proc.send_signal(sig)
        out, err = finish(proc)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert out == b""


def test_serve_port_in_use(emu: Emulator) -> None:
    result = run("serve", "--port", str(emu.port))
    assert result.returncode == 1
    assert "cannot listen" in one_error_line(result.stderr)


@pytest.mark.skipif(not POSIX, reason="needs SIGINT")
def test_batch_ctrl_c_does_not_wait_for_stalled_chats(emu: Emulator, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    streaming = threading.Event()
    emu.before_piece = lambda index: streaming.set()
    emu.stall("chat", after=1, times=3)
    proc = popen("batch", str(prompts), "-o", str(out), "--base-url", emu.url, "--workers", "3")
    try:
        assert streaming.wait(TIMEOUT), "no chat reached the emulator"
    finally:
        proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert err.decode().strip() == (
        "0 succeeded, 0 failed, 0 skipped (already done), 3 not finished (interrupted)"
    )
    assert out.read_text(encoding="utf-8") == ""
