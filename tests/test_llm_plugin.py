"""The ``llm`` plugin (``aichatonline_sync.integrations.llm``), through the real ``llm`` command line.

Each test runs ``llm`` in a subprocess, against the emulator, with llm's user directory (its
logs database, its settings) in ``tmp_path``. The subprocess gets the same loopback guard as
``conftest.py``: a name that is not loopback does not resolve. The tests skip where ``llm`` is not
installed, or where the package was installed without its entry points (``pip install -e .``).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

llm = pytest.importorskip("llm", reason="llm is not installed (pip install -e '.[llm]')")

if not any(
    ep.group == "llm" and ep.name == "aichatonline" and ep.value == "aichatonline_sync.integrations.llm"
    for ep in metadata.distribution("aichatonline-sync").entry_points
):
    pytest.skip(
        "the 'llm' entry point of aichatonline-sync is not installed (run pip install -e .)",
        allow_module_level=True,
    )

REPLY = "Hi there!"
WAIT = 60.0  # a generous bound for one llm command (most take well under a second)

#: Runs llm's own command line, with the loopback guard of conftest.py.
_RUNNER = """\
import socket, sys
_real = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "::1", "localhost", b"127.0.0.1", b"localhost"):
        raise socket.gaierror(f"tests may only reach loopback, not {host!r}")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _loopback_only
from llm.cli import cli
cli(prog_name="llm")
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of ``llm``: its user directory in ``tmp_path``, none of our settings."""
    variables = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AICHATONLINE_", "LLM_", "OPENAI_"))
    }
    variables["LLM_USER_PATH"] = str(tmp_path / "llm")
    variables["NO_PROXY"] = "127.0.0.1,localhost"
    return variables


def run_llm(
    args: list[str], env: dict[str, str], *, input: Optional[str] = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=WAIT,
        check=False,
    )


@pytest.fixture
def emu(emulator: MakeEmulator, env: dict[str, str]) -> Emulator:
    emu = emulator(reply=REPLY)
    env["AICHATONLINE_BASE_URL"] = emu.url
    return emu


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- discovery ----------------------------------------------------------------------------------


def test_llm_models_lists_the_model(env: dict[str, str]) -> None:
    lines = ok(run_llm(["models"], env)).splitlines()
    assert "AiChatOnline: aichatonline (gpt-4o-mini)" in lines


def test_llm_plugins_names_the_package(env: dict[str, str]) -> None:
    plugins = json.loads(ok(run_llm(["plugins"], env)))
    ours = [plugin for plugin in plugins if plugin["name"] == "aichatonline-sync"]
    assert len(ours) == 1
    assert ours[0]["hooks"] == ["register_models"]


# -- prompts ------------------------------------------------------------------------------------


def test_a_prompt_and_its_log(emu: Emulator, env: dict[str, str]) -> None:
    assert ok(run_llm(["-m", "aichatonline", "Hello"], env)) == REPLY + "\n"
    assert [r.prompt for r in emu.chat_requests] == ["Hello"]
    logs = json.loads(ok(run_llm(["logs", "-n", "1", "--json"], env)))
    assert logs[0]["model"] == "aichatonline"
    assert logs[0]["prompt"] == "Hello"
    assert logs[0]["response"] == REPLY
    assert logs[0]["response_json"]["model"] == "gpt-4o-mini"


def test_system_message(emu: Emulator, env: dict[str, str]) -> None:
    ok(run_llm(["-m", "aichatonline", "-s", "Be brief.", "Hello"], env))
    assert emu.chat_requests[0].prompt == "System: Be brief.\nUser: Hello\nAssistant:"


def test_continue_sends_the_earlier_turns(emu: Emulator, env: dict[str, str]) -> None:
    ok(run_llm(["-m", "aichatonline", "-s", "Be brief.", "Hello"], env))
    assert ok(run_llm(["-c", "And then?"], env)) == REPLY + "\n"
    ok(run_llm(["-c", "Thanks"], env))
    assert [r.prompt for r in emu.chat_requests] == [
        "System: Be brief.\nUser: Hello\nAssistant:",
        f"System: Be brief.\nUser: Hello\nAssistant: {REPLY}\nUser: And then?\nAssistant:",
        f"System: Be brief.\nUser: Hello\nAssistant: {REPLY}\nUser: And then?\n"
        f"Assistant: {REPLY}\nUser: Thanks\nAssistant:",
    ]


def test_llm_chat_sends_the_whole_conversation(emu: Emulator, env: dict[str, str]) -> None:
    out = ok(run_llm(["chat", "-m", "aichatonline"], env, input="Hello\nAnd then?\nexit\n"))
    assert out.count(REPLY) == 2
    assert [r.prompt for r in emu.chat_requests] == [
        "Hello",
        f"User: Hello\nAssistant: {REPLY}\nUser: And then?\nAssistant:",
    ]


def read_until(stream: Any, needle: str, deadline: float) -> str:
    """Read ``stream``'s file descriptor until ``needle`` has arrived (bytes as they come)."""
    seen = b""
    while needle.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} did not arrive; got {seen!r}"
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            data = os.read(stream.fileno(), 4096)
            assert data, f"the output ended before {needle!r}; got {seen!r}"
            seen += data
    return seen.decode()


def test_the_reply_streams(emulator: MakeEmulator, env: dict[str, str]) -> None:
    """Each piece is on llm's stdout while the upstream still holds the next one back."""
    pieces = ["one ", "two ", "three"]
    gates = [threading.Event() for _ in pieces]
    emu = emulator(reply=pieces, before_piece=lambda index: gates[index].wait(WAIT))
    env["AICHATONLINE_BASE_URL"] = emu.url
    gates[0].set()
    process = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, "-m", "aichatonline", "Hello"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + WAIT
        for index, piece in enumerate(pieces):
            read_until(process.stdout, piece, deadline)
            if index + 1 < len(pieces):
                gates[index + 1].set()  # the next piece is sent only now
        assert process.wait(WAIT) == 0
    finally:
        for gate in gates:
            gate.set()
        process.kill()
        process.communicate()


# -- settings -----------------------------------------------------------------------------------


def test_max_retries_setting(emu: Emulator, env: dict[str, str]) -> None:
    emu.fail("chat", 503, times=1)
    env["AICHATONLINE_MAX_RETRIES"] = "1"
    assert ok(run_llm(["-m", "aichatonline", "Hello"], env)) == REPLY + "\n"
    assert len(emu.chat_requests) == 2


def test_timeout_setting(emu: Emulator, env: dict[str, str]) -> None:
    emu.stall("chat", after=1)  # until the emulator stops: only the read timeout ends the wait
    env["AICHATONLINE_TIMEOUT"] = "0.5"
    result = run_llm(["-m", "aichatonline", "Hello"], env)
    assert result.returncode == 1
    assert "read timeout" in result.stderr
    assert "Traceback" not in result.stderr


def test_proxy_setting(emu: Emulator, env: dict[str, str], tmp_path: Path) -> None:
    from _proxy import ProxyServer

    with ProxyServer("http", tmp_path) as proxy:
        env["AICHATONLINE_PROXY"] = proxy.url()
        assert ok(run_llm(["-m", "aichatonline", "Hello"], env)) == REPLY + "\n"
        assert proxy.routed(emu.port) >= 1


# -- errors -------------------------------------------------------------------------------------


def test_an_upstream_failure_is_one_error_line(emu: Emulator, env: dict[str, str]) -> None:
    emu.fail("chat", 500, times=3)
    env["AICHATONLINE_MAX_RETRIES"] = "0"
    result = run_llm(["-m", "aichatonline", "Hello"], env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert "500" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(emu.chat_requests) == 1  # AICHATONLINE_MAX_RETRIES=0: no retry


def test_a_broken_stream_keeps_what_arrived(emulator: MakeEmulator, env: dict[str, str]) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    env["AICHATONLINE_BASE_URL"] = emu.url
    emu.error_line(code=500, message="the model fell over", after=2)
    result = run_llm(["-m", "aichatonline", "Hello"], env)
    assert result.returncode == 1
    assert result.stdout.startswith("one two ")
    assert "the model fell over" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_setting_is_named(emu: Emulator, env: dict[str, str]) -> None:
    env["AICHATONLINE_TIMEOUT"] = "soon"
    result = run_llm(["-m", "aichatonline", "Hello"], env)
    assert result.returncode == 1
    assert "$AICHATONLINE_TIMEOUT: must be a number of seconds, not 'soon'" in result.stderr
    assert emu.requests == []


def test_no_service_at_all(env: dict[str, str]) -> None:
    from _proxy import free_port

    env["AICHATONLINE_BASE_URL"] = f"http://127.0.0.1:{free_port()}"
    env["AICHATONLINE_MAX_RETRIES"] = "0"
    result = run_llm(["-m", "aichatonline", "Hello"], env)
    assert result.returncode == 1
    assert "could not connect" in result.stderr
    assert "Traceback" not in result.stderr


# -- the Python API of llm, in this process --------------------------------------------------------


@pytest.fixture
def model(emu: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    return llm.get_model("aichatonline")


def test_python_api_conversation(model: Any, emu: Emulator) -> None:
    conversation = model.conversation()
    assert conversation.prompt("Hello", system="Be brief.").text() == REPLY
    assert conversation.prompt("And then?").text() == REPLY
    assert [r.prompt for r in emu.chat_requests] == [
        "System: Be brief.\nUser: Hello\nAssistant:",
        f"System: Be brief.\nUser: Hello\nAssistant: {REPLY}\nUser: And then?\nAssistant:",
    ]


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_says_so(emu: Emulator, env: dict[str, str], prompt: str) -> None:
    # "" said "messages is an empty list: give at least one message" (a list the user never gave).
    result = run_llm(["-m", "aichatonline", prompt], env)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: the prompt is empty (or only white space)"
    assert emu.chat_requests == []


def test_python_api_errors_are_model_errors(model: Any, emu: Emulator) -> None:
    import aichatonline_sync as aco

    emu.fail("chat", 404)
    response = model.prompt("Hello")
    with pytest.raises(llm.ModelError) as info:
        response.text()
    assert isinstance(info.value.__cause__, aco.APIStatusError)
    assert str(info.value) == str(info.value.__cause__)


# -- the async model and token usage ---------------------------------------------------------------


def test_async_prompt_streams_and_is_logged(emu: Emulator, env: dict[str, str]) -> None:
    assert ok(run_llm(["--async", "-m", "aichatonline", "Hello"], env)) == REPLY + "\n"
    assert [r.prompt for r in emu.chat_requests] == ["Hello"]
    logs = json.loads(ok(run_llm(["logs", "-n", "1", "--json"], env)))
    assert logs[0]["response"] == REPLY
    assert logs[0]["response_json"]["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_usage_is_shown_with_u_and_logged(emu: Emulator, env: dict[str, str], mode: list[str]) -> None:
    pytest.importorskip("bpe_openai", reason="bpe-openai is not installed (the tokens extra)")
    result = run_llm([*mode, "-u", "-m", "aichatonline", "Hello"], env)
    assert ok(result) == REPLY + "\n"
    assert "Token usage: 1 input, 3 output" in result.stderr  # "Hello"; "Hi", " there", "!"
    logs = json.loads(ok(run_llm(["logs", "-n", "1", "--json"], env)))
    assert (logs[0]["input_tokens"], logs[0]["output_tokens"]) == (1, 3)


def test_async_python_api_does_not_block_the_loop(emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """llm's own async API in this process: the loop keeps ticking while the reply streams."""
    import asyncio

    from aichatonline_sync.integrations.llm import AiChatOnlineAsyncModel

    emu = emulator(reply=["one ", "two ", "three"], chunk_delay=0.1)
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)

    async def main() -> tuple[str, int, list[str]]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        response = AiChatOnlineAsyncModel().prompt("Hello")
        pieces = [piece async for piece in response]
        stop.set()
        await task
        return await response.text(), ticks, pieces

    text, ticks, pieces = asyncio.run(main())
    assert text == "one two three"
    assert pieces == ["one ", "two ", "three"]
    assert ticks >= 10  # 0.2 s of delays: the loop ran all along
