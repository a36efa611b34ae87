"""The OpenAI-compatible gateway (``aichatonline_sync.gateway``), over loopback, with the emulator as
the upstream: the real ``openai`` client (stream and not, errors, a client that goes away), ``curl
-N``, raw HTTP for the error shapes, waitress (the server of ``aichatonline gateway``) and a real
gunicorn (``-k gthread``), and the command itself.

What the tests need is checked at collection: without ``openai``, ``gunicorn`` or ``curl`` the tests
that use them are skipped, saying why (``pip install -e ".[test]"`` installs the packages).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync.gateway import (
    GATEWAY_KEY_ENV,
    GatewayApp,
    app_from_env,
    make_app,
    make_server,
    session_options_from_env,
)
from aichatonline_sync.testing import Emulator

HAS_OPENAI = find_spec("openai") is not None
HAS_GUNICORN = find_spec("gunicorn") is not None and sys.platform != "win32"
CURL = shutil.which("curl")
POSIX = os.name == "posix"

needs_openai = pytest.mark.skipif(
    not HAS_OPENAI, reason='the openai package is not installed (pip install -e ".[test]")'
)
needs_gunicorn = pytest.mark.skipif(
    not HAS_GUNICORN,
    reason='gunicorn is not installed, or not on this OS (pip install -e ".[test]")',
)
needs_curl = pytest.mark.skipif(CURL is None, reason="the curl command is not installed")

if HAS_OPENAI:
    import openai

KEY = "gw-test-key-42"
MODEL = "gpt-4o-mini"
REPLY = ["Hel", "lo", ", ", "wor", "ld", "!"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
PROMPT = "System: Be brief.\nUser: Hi\nAssistant:"
WAIT = 20.0  # seconds: the bound of every wait (a failing test never hangs)


# -- helpers ------------------------------------------------------------------------------------


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a child process: no settings or proxies of ours, the package under test."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra or {})
    return env


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients of these tests (openai, requests) talk to loopback directly."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


def read_line(stream: Any, what: str, timeout: float = WAIT) -> str:
    """One line of a child's output pipe, waiting at most ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                pytest.fail(f"timed out waiting for {what}; got {data!r}")
            byte = os.read(stream.fileno(), 1)
            if not byte:
                pytest.fail(f"the output ended before {what}; got {data!r}")
            data += byte
    return data.decode()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the server did not stop")


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` on the gateway's server (``make_server``); yields its base URL."""
    server = make_server(app, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


class Lockstep:
    """A ``before_piece`` hook: the emulator sends piece ``i`` only once the client has received
    piece ``i - 1``. A gateway that held pieces back would leave the emulator waiting in vain."""

    def __init__(self, count: int) -> None:
        self.received = [threading.Event() for _ in range(count)]
        self.waited_in_vain: list[int] = []

    def __call__(self, index: int) -> None:
        if index == 0 or self.waited_in_vain:
            return
        if not self.received[index - 1].wait(WAIT):
            self.waited_in_vain.append(index)

    def got(self, index: int) -> None:
        self.received[index].set()


class EmulatorLog(logging.Handler):
    """The emulator's own account of its connections: one that broke while it served it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.broken = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, OSError) for arg in args):
            self.broken.set()


@pytest.fixture
def emulator_log() -> Iterator[EmulatorLog]:
    logger = logging.getLogger("aichatonline_sync.testing")
    handler, level = EmulatorLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- the gateways under test --------------------------------------------------------------------


@dataclass
class Gateway:
    kind: str  #: "waitress" or "gunicorn"
    base: str  #: the server's base URL (no /v1)
    emu: Emulator  #: the upstream
    clients: list[Any] = field(default_factory=list)  #: the openai clients made, closed after

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def client(self, key: str = KEY) -> Any:
        client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=WAIT)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def post(self, body: Any, *, key: Optional[str] = KEY, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        with requests.Session() as http:
            http.trust_env = False
            return http.post(
                f"{self.url}/chat/completions", data=data, headers=headers, timeout=WAIT, **kwargs
            )


@pytest.fixture
def waitress_gateway(emulator: Callable[..., Emulator]) -> Iterator[Gateway]:
    emu = emulator(reply=REPLY)
    session = aco.Session(emu.url, max_retries=0, timeout=WAIT)
    with session, serving(make_app(session, api_key=KEY)) as base:
        gateway = Gateway("waitress", base, emu)
        yield gateway
        gateway.close()


def start_gunicorn(
    env: dict[str, str], *args: str, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    """A real gunicorn with the gthread worker, serving ``aichatonline_sync.gateway:app``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gthread",
            "--threads",
            "8",
            "--workers",
            str(workers),
            "--bind",
            "127.0.0.1:0",
            "--graceful-timeout",
            "3",
            *args,
            "aichatonline_sync.gateway:app",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(env),
    )
    assert proc.stderr is not None
    base = ""
    booted = 0
    while booted < workers:
        line = read_line(proc.stderr, "gunicorn to start")
        found = re.search(r"Listening at: (http://\S+)", line)
        if found:
            base = found.group(1)
        booted += "Booting worker" in line
    # Keep reading its log, so that a full pipe never blocks it.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    assert base, "gunicorn did not say where it listens"
    return proc, base


@pytest.fixture(scope="module")
def gunicorn_server() -> Iterator[tuple[Emulator, str]]:
    if not HAS_GUNICORN:
        pytest.skip("gunicorn is not installed")
    emu = Emulator(reply=REPLY).start()
    env = {
        "AICHATONLINE_BASE_URL": emu.url,
        "AICHATONLINE_MAX_RETRIES": "0",
        "AICHATONLINE_TIMEOUT": str(WAIT),
        GATEWAY_KEY_ENV: KEY,
    }
    try:
        proc, base = start_gunicorn(env)
        try:
            yield emu, base
        finally:
            stop(proc)
    finally:
        emu.stop()


@pytest.fixture
def gunicorn_gateway(gunicorn_server: tuple[Emulator, str]) -> Iterator[Gateway]:
    emu, base = gunicorn_server
    emu.reset()
    emu.set_reply(REPLY)
    emu.before_piece = None
    gateway = Gateway("gunicorn", base, emu)
    yield gateway
    gateway.close()
    emu.before_piece = None
    emu.reset()


@pytest.fixture(params=["waitress", pytest.param("gunicorn", marks=needs_gunicorn)])
def gateway(request: pytest.FixtureRequest) -> Gateway:
    """The gateway under waitress (``make_server``), and under a real gunicorn."""
    value: Gateway = request.getfixturevalue(f"{request.param}_gateway")
    return value


def content_of(chunk: Any) -> Optional[str]:
    content: Optional[str] = chunk.choices[0].delta.content if chunk.choices else None
    return content


# -- the openai client ---------------------------------------------------------------------------


@needs_openai
def test_models(gateway: Gateway) -> None:
    client = gateway.client()
    assert [model.id for model in client.models.list()] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "aichatonline")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-5")
    assert caught.value.code == "model_not_found"


@needs_openai
def test_a_completion(gateway: Gateway) -> None:
    completion = gateway.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0.2, max_tokens=5, top_p=0.9, stop=["x"]
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(REPLY)
    assert choice.finish_reason == "stop"
    # The messages became gpt4free's prompt; the sampling parameters were ignored.
    [request] = gateway.emu.chat_requests
    assert request.prompt == PROMPT


@needs_openai
def test_a_stream_hands_out_each_piece_as_it_arrives(gateway: Gateway) -> None:
    lockstep = Lockstep(len(REPLY))
    gateway.emu.before_piece = lockstep
    stream = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = []
    pieces: list[str] = []
    with stream:
        for chunk in stream:
            chunks.append(chunk)
            content = content_of(chunk)
            if content:
                lockstep.got(len(pieces))
                pieces.append(content)
    assert lockstep.waited_in_vain == []
    assert pieces == REPLY  # one delta.content per upstream piece, in order
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert [content_of(chunk) for chunk in middle] == REPLY
    assert last.choices[0].finish_reason == "stop"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert gateway.emu.chat_requests[0].prompt == PROMPT


@needs_openai
def test_text_parts_and_the_roles(waitress_gateway: Gateway) -> None:
    messages: list[Any] = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        },
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    completion = waitress_gateway.client().chat.completions.create(
        model=MODEL, messages=messages, n=1, stream=False
    )
    assert completion.choices[0].message.content == "".join(REPLY)
    assert waitress_gateway.emu.chat_requests[0].prompt == (
        "Developer: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Again\nAssistant:"
    )


@needs_openai
@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/a.png"},
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "   "}]}, None),
    ],
    ids=["n", "tools", "tool_choice", "image", "tool-message", "empty-prompt"],
)
def test_what_the_service_cannot_do_is_a_400(
    waitress_gateway: Gateway, options: dict[str, Any], param: Optional[str]
) -> None:
    arguments: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, **options}
    with pytest.raises(openai.BadRequestError) as caught:
        waitress_gateway.client().chat.completions.create(**arguments)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert waitress_gateway.emu.chat_requests == []  # refused before anything was sent


@needs_openai
def test_an_unknown_model_is_a_404(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "gpt-4o-mini" in caught.value.message


@needs_openai
@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_a_wrong_or_missing_key_is_a_401(gateway: Gateway, key: str) -> None:
    if key:
        with pytest.raises(openai.AuthenticationError) as caught:
            gateway.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert caught.value.code == "invalid_api_key"
    response = gateway.post({"model": MODEL, "messages": MESSAGES}, key=key or None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert KEY not in response.text
    assert gateway.emu.chat_requests == []


@needs_openai
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_rate_limit_is_a_429(gateway: Gateway, stream: bool) -> None:
    gateway.emu.fail("chat", 429, headers={"Retry-After": "7"})
    with pytest.raises(openai.RateLimitError) as caught:
        gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["Retry-After"] == "7"
    assert "HTTP 429" in error.message


@needs_openai
@pytest.mark.parametrize(
    "fault",
    [
        lambda emu: emu.fail("chat", 500),
        lambda emu: emu.html("chat"),
        lambda emu: emu.error_line(500, "the model is overloaded"),
        lambda emu: (emu.revoke_tokens(), emu.fail("token", 503)),
    ],
    ids=["http-500", "html-page", "error-line", "token-503"],
)
def test_an_upstream_failure_is_a_502(gateway: Gateway, fault: Callable[[Emulator], None]) -> None:
    fault(gateway.emu)
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"


@needs_openai
def test_an_upstream_timeout_is_a_504(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(reply=REPLY)
    emu.stall("chat", seconds=None)  # the reply never comes
    session = aco.Session(emu.url, max_retries=0, timeout=0.3)
    with session, serving(make_app(session)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with client, pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"


@needs_openai
@pytest.mark.parametrize(
    "timeout",
    [aco.Timeout(WAIT, 0.3), aco.Timeout(WAIT, WAIT, total=1.0)],
    ids=["read-timeout", "total-deadline"],
)
def test_an_upstream_that_stalls_after_the_first_piece_is_a_timeout(
    emulator: Callable[..., Emulator], timeout: aco.Timeout
) -> None:
    emu = emulator(reply=REPLY)
    emu.stall("chat", after=1, seconds=None, times=2)  # one piece, then nothing
    session = aco.Session(emu.url, max_retries=0, timeout=timeout)
    with session, serving(make_app(session)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        with client:
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert caught.value.status_code == 504
            assert caught.value.code == "upstream_timeout"
            # Streamed, the status was already 200: the error event says it is a timeout.
            pieces: list[str] = []
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            with stream, pytest.raises(openai.APIError) as in_band:
                pieces.extend(content_of(chunk) or "" for chunk in stream)
    assert pieces == ["", REPLY[0]]
    assert not isinstance(in_band.value, openai.APIStatusError)
    body = in_band.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"]) == ("timeout_error", "upstream_timeout")


@needs_openai
@pytest.mark.parametrize(
    "fault",
    [
        lambda emu: emu.error_line(500, "the model fell over", after=2),
        lambda emu: emu.drop("chat", after=2),
    ],
    ids=["error-line", "dropped"],
)
def test_a_failure_after_the_first_chunk_makes_the_client_raise(
    gateway: Gateway, fault: Callable[[Emulator], None]
) -> None:
    fault(gateway.emu)
    pieces: list[str] = []
    stream = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with stream, pytest.raises(openai.APIError) as caught:
        pieces.extend(content_of(chunk) or "" for chunk in stream)
    assert "".join(pieces) == "".join(REPLY[:2])  # what came, and no "stop" pretending it is whole
    assert not isinstance(caught.value, openai.APIStatusError)  # in-band: the status was 200
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "upstream_error"
    # Without streaming, the same failure is a status.
    fault(gateway.emu)
    with pytest.raises(openai.InternalServerError):
        gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES)


@needs_openai
def test_a_client_that_goes_away_closes_the_upstream_chat(
    gateway: Gateway, emulator_log: EmulatorLog
) -> None:
    # A long reply at the pace of a model, a piece every 2 ms: ten seconds, if nothing stops it.
    long_reply = [f"p{index} " for index in range(5000)]
    sent: list[int] = []

    def pace(index: int) -> None:
        sent.append(index)
        time.sleep(0.002)  # the upstream's pace, not a synchronisation

    gateway.emu.set_reply(long_reply)
    gateway.emu.before_piece = pace
    stream = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[str] = []
    for chunk in stream:
        content = content_of(chunk)
        if content:
            received.append(content)
        if len(received) == 3:
            break
    stream.close()  # the client goes away in the middle of the reply
    # The emulator's connection breaks (its next writes fail) long before the reply's end.
    assert emulator_log.broken.wait(WAIT), "the upstream chat was not closed"
    assert len(sent) < len(long_reply)
    assert received == long_reply[:3]


# -- curl -N ------------------------------------------------------------------------------------


@needs_curl
def test_curl_gets_each_chunk_as_its_piece_arrives(gateway: Gateway) -> None:
    assert CURL is not None
    lockstep = Lockstep(len(REPLY))
    gateway.emu.before_piece = lockstep
    body = json.dumps({"model": MODEL, "stream": True, "messages": MESSAGES})
    proc = subprocess.Popen(
        [
            CURL,
            "--silent",
            "--no-buffer",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--header",
            "Content-Type: application/json",
            "--data-binary",
            body,
            f"{gateway.url}/chat/completions",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert proc.stdout is not None
    events: list[str] = []
    pieces = 0
    try:
        while not events or events[-1] != "[DONE]":
            line = read_line(proc.stdout, "the next SSE line").rstrip("\n")
            if not line:
                continue  # the blank line that ends each event
            assert line.startswith("data: "), line
            events.append(line[len("data: ") :])
            delta = json.loads(events[-1])["choices"][0]["delta"] if events[-1] != "[DONE]" else {}
            if "content" in delta and "role" not in delta:
                lockstep.got(pieces)  # curl has written this piece: the emulator may send the next
                pieces += 1
    finally:
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert out.strip() == b""  # nothing after [DONE]
    assert lockstep.waited_in_vain == []
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]] == REPLY
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


# -- raw HTTP: the error shapes and the framing --------------------------------------------------


def error_of(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe\x00garbage", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),
        (b"", None, "no body"),
        ([], None, "JSON object"),
        ({"messages": MESSAGES}, "model", "model"),
        ({"model": 4, "messages": MESSAGES}, "model", "string"),
        ({"model": MODEL, "messages": MESSAGES, "stream": "yes"}, "stream", "true or false"),
        ({"model": MODEL, "messages": MESSAGES, "n": "1"}, "n", "integer"),
        ({"model": MODEL, "messages": "Hi"}, "messages", "array"),
        ({"model": MODEL, "messages": []}, "messages", "empty"),
        ({"model": MODEL}, "messages", "array"),
        ({"model": MODEL, "messages": ["Hi"]}, "messages[0]", "object"),
        ({"model": MODEL, "messages": [{"role": 1, "content": "Hi"}]}, "messages[0].role", "role"),
        (
            {"model": MODEL, "messages": [{"role": "bot", "content": "Hi"}]},
            "messages[0].role",
            "bot",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "string",
        ),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content", "string"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            },
            "messages[0].content[0].text",
            "string",
        ),
    ],
)
def test_a_bad_request_is_a_400(
    gateway: Gateway, body: Any, param: Optional[str], words: str
) -> None:
    error = error_of(gateway.post(body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    assert gateway.emu.chat_requests == []


def test_a_body_over_the_limit_is_a_400_and_the_connection_lives_on(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator(reply=REPLY)
    session = aco.Session(emu.url, max_retries=0)
    with session, serving(make_app(session, max_body_bytes=1000)) as base:
        url = f"{base}/v1/chat/completions"
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
        small = {"model": MODEL, "messages": MESSAGES}
        with requests.Session() as http:
            http.trust_env = False
            error = error_of(http.post(url, json=big, timeout=WAIT), 400)
            assert error["code"] == "request_too_large"
            assert "1000 bytes" in error["message"]
            response = http.post(url, json=small, timeout=WAIT)
            assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "".join(REPLY)
    assert len(emu.chat_requests) == 1


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/chat/completions", 405, "POST"),
        ("POST", "/v1/models", 405, "GET, HEAD"),
        ("DELETE", "/v1/models/gpt-4o-mini", 405, "GET, HEAD"),
        ("GET", "/v1/completions", 405, "POST"),
        ("GET", "/v1/responses", 405, "POST"),
        ("POST", "/v1/edits", 404, None),
        ("GET", "/", 404, None),
        ("GET", "/v2/models", 404, None),
        ("GET", "/v1/models/gpt-5", 404, None),
    ],
)
def test_unknown_paths_and_wrong_methods(
    gateway: Gateway, method: str, path: str, status: int, allow: Optional[str]
) -> None:
    with requests.Session() as http:
        http.trust_env = False
        response = http.request(
            method, gateway.base + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT
        )
    error = error_of(response, status)
    assert response.headers.get("Allow") == allow
    assert error["code"] in ("method_not_allowed", "unknown_url", "model_not_found")


def test_the_sse_response_headers_and_framing(gateway: Gateway) -> None:
    response = gateway.post({"model": MODEL, "messages": MESSAGES, "stream": True}, stream=True)
    with response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.headers["Transfer-Encoding"] == "chunked"  # a cut stream is detectable
        text = response.content.decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_head_and_keep_alive_on_the_commands_server(waitress_gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with socket.create_connection(
        ("127.0.0.1", int(waitress_gateway.base.rsplit(":", 1)[1]))
    ) as sock:
        reader = sock.makefile("rb")
        for method in ("HEAD", "GET"):
            sock.sendall(
                f"{method} /v1/models HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {headers['Authorization']}\r\n\r\n".encode()
            )
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            fields = {}
            while True:
                line = reader.readline().strip()
                if not line:
                    break
                name, _, value = line.decode().partition(":")
                fields[name.lower()] = value.strip()
            length = int(fields["content-length"])
            if method == "GET":  # same connection: it was kept alive after the HEAD
                assert json.loads(reader.read(length))["data"][0]["id"] == MODEL


def test_a_chunked_request_body_is_read(gateway: Gateway) -> None:
    body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    port = int(gateway.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        )
        with sock.makefile("rb") as reader:
            answer = reader.read()  # to the end: the request asked for the connection to close
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(rest)["choices"][0]["message"]["content"] == "".join(REPLY)
    assert len(gateway.emu.chat_requests) == 1


def test_closing_the_server_ends_its_kept_alive_connections(emulator: Callable[..., Emulator]) -> None:
    # An idle kept-alive connection must not outlive server_close() (by the 75 s idle timeout):
    # a later server on the same port number would inherit its client socket.
    emu = emulator(reply=REPLY)
    with aco.Session(emu.url, max_retries=0, timeout=WAIT) as session:
        server = make_server(make_app(session, api_key=KEY), port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            sock = socket.create_connection(server.server_address[:2], timeout=WAIT)
            with sock, sock.makefile("rb") as reader:
                sock.sendall(
                    f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
                )
                assert reader.readline().startswith(b"HTTP/1.1 200")
                length = 0
                while True:
                    line = reader.readline().strip()
                    if not line:
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                assert json.loads(reader.read(length))["data"][0]["id"] == MODEL
                server.shutdown()
                server.server_close()
                assert reader.read() == b""  # the server ended it (not the 20 s timeout: it raises)
        finally:
            server.shutdown()  # (again, when an assertion failed before: a no-op otherwise)
            server.server_close()
            thread.join(WAIT)


def test_a_client_that_resets_a_kept_alive_connection_leaves_no_traceback(
    waitress_gateway: Gateway, capfd: pytest.CaptureFixture[str]
) -> None:
    port = int(waitress_gateway.base.rsplit(":", 1)[1])
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"

    def models(sock: socket.socket) -> Any:
        sock.sendall(request.encode())
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        fields = dict(
            line.decode().lower().split(":", 1)
            for line in iter(lambda: reader.readline().strip(), b"")
        )
        return json.loads(reader.read(int(fields["content-length"]))), reader

    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        _, reader = models(sock)
        # The server now waits for the next request on the kept-alive connection: reset it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reader.close()
    # The server goes on serving; the reset was read before this connection's request.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        assert models(sock)[0]["data"][0]["id"] == MODEL
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err
    assert "ConnectionResetError" not in captured.err


def test_an_http_1_0_client_gets_a_body_that_ends_with_the_connection(
    waitress_gateway: Gateway,
) -> None:
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True}).encode()
    port = int(waitress_gateway.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while True:
            block = sock.recv(65536)
            if not block:
                break
            data += block
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert rest.endswith(b"data: [DONE]\n\n")


# -- the WSGI application itself ------------------------------------------------------------------


def test_the_app_passes_wsgiref_validation(emulator: Callable[..., Emulator]) -> None:
    from wsgiref.util import setup_testing_defaults
    from wsgiref.validate import validator

    emu = emulator(reply=REPLY)

    def call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[str, bytes]:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ.update(
            {
                "REQUEST_METHOD": method,
                "PATH_INFO": path,
                "QUERY_STRING": "",
                "CONTENT_TYPE": "application/json",
                "CONTENT_LENGTH": str(len(body)),
                "wsgi.input": io.BytesIO(body),
            }
        )
        statuses: list[str] = []

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            statuses.append(status)
            return lambda data: None

        result = app(environ, start_response)
        try:
            data = b"".join(result)
        finally:
            result.close()
        return statuses[0], data

    with aco.Session(emu.url, max_retries=0) as session:
        app = validator(make_app(session))
        chat = {"model": MODEL, "messages": MESSAGES}
        assert call(app, "GET", "/v1/models")[0] == "200 OK"
        assert call(app, "GET", "/nowhere")[0] == "404 Not Found"
        assert call(app, "POST", "/v1/chat/completions", b"{")[0] == "400 Bad Request"
        status, data = call(app, "POST", "/v1/chat/completions", json.dumps(chat).encode())
        assert status == "200 OK"
        assert json.loads(data)["choices"][0]["message"]["content"] == "".join(REPLY)
        chat["stream"] = True
        status, data = call(app, "POST", "/v1/chat/completions", json.dumps(chat).encode())
        assert status == "200 OK"
        assert data.endswith(b"data: [DONE]\n\n")


def test_closing_the_body_before_reading_it_closes_the_upstream_chat(
    emulator: Callable[..., Emulator], emulator_log: EmulatorLog
) -> None:
    closed = threading.Event()
    emu = emulator(reply=[f"p{index} " for index in range(50)])
    emu.before_piece = lambda index: index != 1 or closed.wait(WAIT)
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True}).encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/chat/completions",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    with aco.Session(emu.url, max_retries=0) as session:
        result: Any = make_app(session)(environ, lambda status, headers, exc_info=None: None)
        result.close()  # the server gave up before the first write
        closed.set()
        # The emulator's next writes fail: the chat's connection was closed, not kept.
        assert emulator_log.broken.wait(WAIT), "the upstream chat was not closed"


# -- configuration --------------------------------------------------------------------------------


def test_settings_from_the_environment(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(reply=REPLY)
    env = {
        "AICHATONLINE_BASE_URL": emu.url,
        "AICHATONLINE_TIMEOUT": "7.5",
        "AICHATONLINE_MAX_RETRIES": "0",
        "AICHATONLINE_PROXY": " ",
        GATEWAY_KEY_ENV: KEY,
    }
    assert session_options_from_env(env) == {
        "base_url": emu.url,
        "timeout": aco.Timeout(7.5, 7.5),
        "max_retries": 0,
    }
    assert session_options_from_env({"AICHATONLINE_TIMEOUT": "3,none"}) == {
        "timeout": aco.Timeout(3, None)
    }
    app = app_from_env(env)
    assert isinstance(app, GatewayApp)
    assert KEY not in repr(app)
    try:
        assert app.session.base_url == emu.url
        assert app.session.timeout == aco.Timeout(7.5, 7.5)
        with serving(app) as base:
            gateway = Gateway("waitress", base, emu)
            assert (
                gateway.post({"model": MODEL, "messages": MESSAGES}, key="nope").status_code == 401
            )
            assert gateway.post({"model": MODEL, "messages": MESSAGES}).status_code == 200
    finally:
        app.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AICHATONLINE_TIMEOUT", "soon"),
        ("AICHATONLINE_TIMEOUT", "0"),
        ("AICHATONLINE_MAX_RETRIES", "-1"),
        ("AICHATONLINE_MAX_RETRIES", "two"),
        ("AICHATONLINE_BASE_URL", "ftp://example.com"),
        ("AICHATONLINE_PROXY", "not a proxy"),
        (GATEWAY_KEY_ENV, "two words"),
    ],
)
def test_a_bad_setting_is_an_error_that_names_it(name: str, value: str) -> None:
    with pytest.raises(aco.InvalidRequestError, match=f"^{re.escape(f'${name}: ')}"):
        app_from_env({name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"session": "s"},
        {"api_key": ""},
        {"api_key": "a b"},
        {"max_body_bytes": 0},
        {"max_body_bytes": True},
        {"max_body_bytes": 2.5},
    ],
)
def test_make_app_checks_its_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(aco.InvalidRequestError, match=f"^{next(iter(kwargs))} must be"):
        make_app(**kwargs)


def test_importing_the_gateway_is_cheap_and_reads_no_setting() -> None:
    code = (
        "import sys, aichatonline_sync\n"
        "assert 'aichatonline_sync.gateway' not in sys.modules\n"
        "import aichatonline_sync.gateway as gateway\n"
        "assert 'app' not in vars(gateway)\n"
        "for name in ('http.server', 'openai', 'gunicorn', 'wsgiref'):\n"
        "    assert name not in sys.modules, name\n"
        "try:\n"
        "    gateway.app\n"
        "except aichatonline_sync.InvalidRequestError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env({"AICHATONLINE_TIMEOUT": "never"}),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The settings are read when ``app`` is first looked up (a bad one is reported then).
    assert (
        result.stdout == "$AICHATONLINE_TIMEOUT: must be a number of seconds, not 'never'\n"
    )


# -- gunicorn: one session per worker process, also with --preload ---------------------------------


@needs_gunicorn
def test_gunicorn_workers_do_not_share_the_session_of_the_master(
    emulator: Callable[..., Emulator], tmp_path: Path
) -> None:
    emu = emulator(reply=REPLY)
    config = tmp_path / "gunicorn_conf.py"
    config.write_text(
        "def when_ready(server):\n"
        "    import aichatonline_sync.gateway as gateway\n"
        "    gateway.app.session.grab_token()  # the master uses the app before it forks\n",
        encoding="utf-8",
    )
    proc, base = start_gunicorn(
        {"AICHATONLINE_BASE_URL": emu.url}, "--preload", "--config", str(config)
    )
    try:
        assert emu.tokens_issued == 1  # the master's
        gateway = Gateway("gunicorn", base, emu)
        for _ in range(3):
            response = gateway.post({"model": MODEL, "messages": MESSAGES}, key=None)
            assert response.status_code == 200, response.text
    finally:
        stop(proc)
    # The worker made its own session: its own token, its own connections.
    assert emu.tokens_issued == 2
    master_token, worker_token = emu.issued_tokens
    assert {request.unique_id for request in emu.chat_requests} == {worker_token}
    assert master_token != worker_token


# -- the command ----------------------------------------------------------------------------------


def start_cli(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aichatonline_sync", "gateway", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    line = read_line(proc.stdout, "the gateway to start")
    found = re.fullmatch(
        r"Gateway listening on (http://127\.0\.0\.1:\d+/v1), answered by (.+) \(Ctrl-C to stop\)\n",
        line,
    )
    assert found, line
    return proc, found.group(1)


@needs_openai
@pytest.mark.skipif(not POSIX, reason="needs SIGINT/SIGTERM")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_command_serves_until_ctrl_c_or_sigterm(sig: signal.Signals) -> None:
    proc, url = start_cli("--emulator", "--api-key", KEY)
    try:
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=WAIT) as client:
            completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert 'You said: "System: Be brief.' in (completion.choices[0].message.content or "")
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            text = "".join(content_of(chunk) or "" for chunk in stream)
            assert text == completion.choices[0].message.content
        refused = openai.OpenAI(base_url=url, api_key="nope", max_retries=0)
        with refused, pytest.raises(openai.AuthenticationError):
            refused.models.list()
    finally:
        out, err = stop(proc, sig)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert out == b""


#: ``aichatonline gateway`` with the stop signal (argv[1]) landing while the server's loop accepts a
#: new connection, where waitress's loop catches the exceptions of a connection's handlers (all but
#: ``KeyboardInterrupt`` and ``SystemExit``). Under load the signal lands there now and then; here
#: it always does.
SIGNAL_WHILE_ACCEPTING = """
import runpy, signal, sys
from waitress.server import TcpWSGIServer

SIG = int(sys.argv[1])
accept = TcpWSGIServer.handle_accept

def handle_accept(self):
    accept(self)
    signal.raise_signal(SIG)

TcpWSGIServer.handle_accept = handle_accept
sys.argv = ["aichatonline", "gateway", "--emulator", "--port", "0"]
runpy.run_module("aichatonline_sync", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(not POSIX, reason="needs SIGINT/SIGTERM")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_command_stops_on_a_signal_that_lands_while_it_accepts(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_WHILE_ACCEPTING, str(int(sig))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        line = read_line(proc.stdout, "the gateway to start")
        found = re.fullmatch(r"Gateway listening on http://127\.0\.0\.1:(\d+)/v1, .*\n", line)
        assert found, line
        with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=WAIT) as conn:
            assert conn.recv(1) == b""  # closed, not served
        out, err = proc.communicate(timeout=WAIT)  # no second signal: the first one must do
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the server did not stop: {err.decode(errors='replace')}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert out == b""


STREAMS = 16  #: more than requests' default pool of 10 connections


@pytest.mark.parametrize("upstream", ["--emulator", "--base-url"])
def test_the_commands_session_keeps_a_connection_for_each_stream(
    upstream: str,
    emulator: Callable[..., Emulator],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aichatonline_sync import testing
    from aichatonline_sync.cli import commands as _cli
    made: list[Emulator] = [] if upstream == "--emulator" else [emulator()]

    class Recorded(testing.Emulator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(testing, "Emulator", Recorded)
    caplog.set_level(logging.WARNING, logger="urllib3")
    together = threading.Barrier(STREAMS)

    def all_at_once(index: int) -> None:
        if index == 1:  # every stream has its first piece: STREAMS upstream chats at a time
            together.wait(WAIT)

    where = [upstream] if upstream == "--emulator" else [upstream, made[0].url]
    args = _cli.build_parser().parse_args(["gateway", *where, "--port", "0"])
    with _cli._connect(args) as session, serving(make_app(session)) as base:
        [emu] = made
        emu.set_reply(REPLY)
        emu.before_piece = all_at_once
        session.grab_token()
        gateway = Gateway("waitress", base, emu)
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        with ThreadPoolExecutor(STREAMS) as pool:
            for _ in range(2):
                replies = list(pool.map(lambda _: gateway.post(body, key=None), range(STREAMS)))
                assert [reply.status_code for reply in replies] == [200] * STREAMS
                assert all(reply.text.endswith("data: [DONE]\n\n") for reply in replies)
        connections = emu.connections
    assert [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()] == []
    # The token's connection, then one for each stream at a time, kept and used again.
    assert connections <= STREAMS


def test_the_command_reads_its_key_from_the_environment(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(reply=REPLY)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aichatonline_sync",
            "gateway",
            "--port",
            "0",
            "--base-url",
            emu.url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env({GATEWAY_KEY_ENV: KEY, "AICHATONLINE_MAX_RETRIES": "0"}),
    )
    try:
        line = read_line(proc.stdout, "the gateway to start")
        assert f"answered by {emu.url} " in line
        gateway = Gateway("waitress", line.split()[3].rstrip(",").removesuffix("/v1"), emu)
        assert gateway.post({"model": MODEL, "messages": MESSAGES}, key=None).status_code == 401
        assert gateway.post({"model": MODEL, "messages": MESSAGES}).status_code == 200
    finally:
        stop(proc)


def test_the_command_reports_a_busy_port_and_a_bad_key(emulator: Callable[..., Emulator]) -> None:
    emu = emulator()
    busy = subprocess.run(
        [
            sys.executable,
            "-m",
            "aichatonline_sync",
            "gateway",
            "--emulator",
            "--port",
            str(emu.port),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert busy.returncode == 1
    assert busy.stderr.startswith("aichatonline: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in busy.stderr


KEY_RULE = "must be a non-empty string of printable ASCII characters without spaces"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--api-key", "s\u00e9cret"], {}, f"argument --api-key: {KEY_RULE}"),
        (["--api-key", "a b"], {GATEWAY_KEY_ENV: KEY}, f"argument --api-key: {KEY_RULE}"),
        ([], {GATEWAY_KEY_ENV: "a b"}, f"${GATEWAY_KEY_ENV}: {KEY_RULE}"),
        ([], {"AICHATONLINE_BASE_URL": "ftp://example.com"}, "$AICHATONLINE_BASE_URL: must be"),
        # Each request names its model: an option that would be ignored is refused.
        (["--model", "gpt-4o-mini"], {}, "unknown option '--model' (see 'aichatonline gateway"),
    ],
    ids=["option-not-ascii", "option-with-a-space", "variable", "base-url-variable", "model"],
)
def test_the_command_names_the_option_or_variable_of_a_bad_setting(
    args: list[str], env: dict[str, str], message: str
) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "aichatonline_sync", "gateway", "--port", "0", *args],
        env=child_env({"PYTHONIOENCODING": "utf-8", **env}),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=WAIT,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"aichatonline: error: {message}"), bad.stderr
    assert bad.stderr.count("\n") == 1
    assert "api_key" not in bad.stderr
    assert "\u00e9" not in bad.stderr  # the key is never shown
    assert "a b" not in bad.stderr
    assert bad.stdout == ""


def test_the_server_takes_a_burst_of_connections_before_it_accepts_them() -> None:
    # The kernel completes the handshakes of up to the listen backlog on its own; socketserver's
    # default of 5 dropped the SYNs of a burst of clients (sent again only 1, 2, 4 s later).
    server = make_server(make_app(), port=0)  # bound and listening, not accepting yet
    host, port = server.server_address[:2]
    clients = [socket.socket() for _ in range(64)]
    try:
        for client in clients:
            client.settimeout(WAIT)  # a bound, not a pause: each connect returns at once
            client.connect((host, port))
    finally:
        for client in clients:
            client.close()
        server.server_close()
