"""The server of ``aichatonline gateway`` (waitress, set up by ``aichatonline_sync.gateway.server``)
and how the command stops: an application that fails before answering is an OpenAI-shaped 500, HEAD
never gets a body, and SIGTERM lets the replies in progress finish (up to ``--graceful-timeout``)
before it exits 0."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import requests

from aichatonline_sync.cli import commands as _cli
from aichatonline_sync.gateway import make_server
from aichatonline_sync.testing import Emulator

WAIT = 20.0
POSIX = os.name == "posix"
MODEL = "gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}

needs_signals = pytest.mark.skipif(not POSIX, reason="needs SIGTERM")


# -- helpers ------------------------------------------------------------------------------------


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A WSGI app: 200 with a sized JSON body on ``/``; a failure before answering on ``/fail``."""
    if environ["PATH_INFO"] == "/fail":
        raise RuntimeError("the app failed")
    body = b'{"ok": true}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "12")])
    return [body]


@pytest.fixture
def server_port() -> Iterator[int]:
    server = make_server(_app, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _head(reader: Any) -> tuple[str, dict[str, str]]:
    """The status line and the header fields of one response."""
    status = reader.readline().decode("latin-1").rstrip("\r\n")
    fields: dict[str, str] = {}
    while True:
        line = reader.readline().decode("latin-1").strip()
        if not line:
            return status, fields
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()


def _openai_error(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    assert list(document) == ["error"]
    error: dict[str, Any] = document["error"]
    assert sorted(error) == ["code", "message", "param", "type"]
    return error


# -- the server's own answers and HEAD ------------------------------------------------------------


def test_an_application_that_fails_before_answering_is_an_openai_shaped_500(
    server_port: int,
) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=WAIT) as sock:
        sock.sendall(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with sock.makefile("rb") as reader:
            status, fields = _head(reader)
            assert status.startswith("HTTP/1.1 500 ")
            assert fields["content-type"] == "application/json"
            error = _openai_error(reader.read(int(fields["content-length"])))
            assert error["type"] == "server_error"
            assert error["message"]
            # The connection lives on: the next request is answered.
            status, _ = _head(reader)
            assert status == "HTTP/1.1 200 OK"
            assert reader.read(12) == b'{"ok": true}'


@pytest.mark.parametrize(
    "request_head",
    [
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /fail HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_head_never_gets_a_body(server_port: int, request_head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=WAIT) as sock:
        # A GET after the HEAD, on the same connection: what follows the HEAD's head is either
        # nothing (the connection closed) or the GET's answer, never a body.
        sock.sendall(request_head + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with sock.makefile("rb") as reader:
            status, _ = _head(reader)
            assert status.startswith("HTTP/1.1 ")
            rest = reader.readline()
            assert rest in (b"", b"HTTP/1.1 200 OK\r\n"), rest


def test_head_and_get_on_one_connection_answer_in_order(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=WAIT) as sock:
        sock.sendall(
            b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        with sock.makefile("rb") as reader:
            for _ in range(2):
                status, fields = _head(reader)
                assert status == "HTTP/1.1 200 OK"
                assert fields["content-length"] == "12"
            status, fields = _head(reader)
            assert status == "HTTP/1.1 200 OK"
            assert reader.read(12) == b'{"ok": true}'


# -- the command: SIGTERM drains ------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _read_line(proc: subprocess.Popen[bytes], what: str) -> str:
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + WAIT
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                pytest.fail(f"timed out waiting for {what}; got {data!r}")
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                pytest.fail(f"the output ended before {what}; got {data!r}")
            data += byte
    return data.decode()


class Command:
    """``aichatonline gateway --base-url EMULATOR --port 0 [ARGS...]`` in a child process."""

    def __init__(self, emu: Emulator, *args: str) -> None:
        argv = ["gateway", "--port", "0", "--base-url", emu.url, *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aichatonline_sync", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(),
        )
        line = _read_line(self.proc, "the gateway to start")
        found = re.match(r"Gateway listening on http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, line
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait(self, timeout: float = WAIT) -> tuple[int, bytes]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the gateway did not exit within {timeout} s")
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        yield session


def _events(response: requests.Response) -> Iterator[tuple[float, str]]:
    """``(arrival time, data)`` of each SSE event of a streamed response."""
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            yield time.monotonic(), line[len(b"data: ") :].decode()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(1) == b""
    except OSError:
        return True


@needs_signals
def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(http: requests.Session) -> None:
    pieces = [f"piece{n} " for n in range(8)]
    with Emulator(reply=pieces, chunk_delay=0.25) as emu:
        command = Command(emu)
        try:
            # A kept-alive idle connection: closed at once, it does not hold the stop back.
            assert http.get(f"{command.url}/models", timeout=WAIT).status_code == 200
            with requests.post(
                f"{command.url}/chat/completions", json=CHAT, stream=True, timeout=WAIT
            ) as response:
                assert response.status_code == 200
                events = _events(response)
                next(events)  # the role
                next(events)  # the first piece: the stream is in flight
                command.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                rest = [data for _, data in events]
            assert _refused(command.port)  # (it stopped listening)
            status, err = command.wait()
        finally:
            command.kill()
    texts = [json.loads(data)["choices"][0]["delta"].get("content") for data in rest[:-2]]
    assert "".join(texts) == "".join(pieces[1:])  # every piece after the signal, too
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "stop"
    assert rest[-1] == "[DONE]"
    assert time.monotonic() - signalled >= 1.0  # (the stream took its time, and was not cut)
    assert status == 0, err
    assert b"Traceback" not in err


@needs_signals
def test_the_graceful_timeout_cuts_a_stream_that_outlasts_it(http: requests.Session) -> None:
    pieces = [f"piece{n} " for n in range(100)]
    with Emulator(reply=pieces, chunk_delay=0.2) as emu:
        command = Command(emu, "--graceful-timeout", "0.5")
        try:
            with requests.post(
                f"{command.url}/chat/completions", json=CHAT, stream=True, timeout=WAIT
            ) as response:
                events = _events(response)
                next(events)
                next(events)
                command.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                status, err = command.wait()
                exited = time.monotonic() - signalled
                with pytest.raises(requests.exceptions.ChunkedEncodingError):
                    for _ in events:
                        pass
        finally:
            command.kill()
    assert exited < 5.0
    assert status == 0, err
    assert b"graceful timeout (0.5 s) ran out: 1 replies in progress were cut" in err


@needs_signals
def test_a_second_signal_cuts_the_drain_short(http: requests.Session) -> None:
    pieces = [f"piece{n} " for n in range(100)]
    with Emulator(reply=pieces, chunk_delay=0.2) as emu:
        command = Command(emu)
        try:
            with requests.post(
                f"{command.url}/chat/completions", json=CHAT, stream=True, timeout=WAIT
            ) as response:
                events = _events(response)
                next(events)
                next(events)
                command.proc.send_signal(signal.SIGTERM)
                next(events)  # still streaming: draining
                command.proc.send_signal(signal.SIGINT)
                status, err = command.wait(timeout=5.0)
        finally:
            command.kill()
    assert status == 0, err


@needs_signals
def test_ctrl_c_stops_at_once(http: requests.Session) -> None:
    pieces = [f"piece{n} " for n in range(100)]
    with Emulator(reply=pieces, chunk_delay=0.2) as emu:
        command = Command(emu)
        try:
            with requests.post(
                f"{command.url}/chat/completions", json=CHAT, stream=True, timeout=WAIT
            ) as response:
                events = _events(response)
                next(events)
                command.proc.send_signal(signal.SIGINT)
                status, err = command.wait(timeout=5.0)
        finally:
            command.kill()
    assert status == 0, err


# -- what waitress does with requests (as docs/gateway.rst says) ---------------------------------


def _echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A WSGI app: ``/env`` answers the request's ``HTTP_*`` keys and ``REMOTE_ADDR`` (sized),
    ``/stream`` two pieces of unknown length."""
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one ", b"two"])
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_") or k == "REMOTE_ADDR"}
    body = json.dumps(seen).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return iter([body])


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = make_server(_echo, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, header fields and body of the one answer to ``request``, read to the
    connection's end (the server closes it: a timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        with sock.makefile("rb") as reader:
            status, fields = _head(reader)
            return status, fields, reader.read()


def test_forwarded_headers_are_removed_before_the_application(echo_port: int) -> None:
    status, _, body = _exchange(
        echo_port,
        b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: example.com\r\nForwarded: for=203.0.113.7\r\n"
        b"X-Real-IP: 203.0.113.7\r\n\r\n",
    )
    assert status == "HTTP/1.1 200 OK"
    seen = json.loads(body)
    assert not [key for key in seen if "FORWARDED" in key], seen
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["HTTP_X_REAL_IP"] == "203.0.113.7"  # other headers pass as they came


def test_an_http_1_0_request_gets_an_http_1_0_status_line_and_a_stream_ended_by_the_close(
    echo_port: int,
) -> None:
    status, fields, body = _exchange(echo_port, b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.0 200 OK"
    assert "transfer-encoding" not in fields
    assert body == b"one two"


def test_a_stream_is_chunked_and_closes_its_connection_while_a_sized_answer_keeps_it(
    echo_port: int,
) -> None:
    status, fields, body = _exchange(echo_port, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, fields["transfer-encoding"]) == ("HTTP/1.1 200 OK", "chunked")
    assert fields["connection"] == "close"
    assert body == b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", echo_port), timeout=WAIT) as sock:
        sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        with sock.makefile("rb") as reader:
            for _ in range(2):  # both answered on the one connection
                status, fields = _head(reader)
                assert status == "HTTP/1.1 200 OK"
                assert "connection" not in fields
                json.loads(reader.read(int(fields["content-length"])))


def test_requests_beyond_the_threads_wait_in_the_queue_and_are_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aichatonline_sync.gateway import server as server_module

    monkeypatch.setitem(server_module._SETTINGS, "threads", 2)
    release = threading.Event()
    queued = threading.Event()
    entered: list[str] = []
    changed = threading.Condition()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with changed:
            entered.append(environ["PATH_INFO"])
            changed.notify_all()
        if environ["PATH_INFO"] != "/third":
            release.wait(WAIT)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    class Queued(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Task queue depth is"):
                queued.set()

    queue_log = logging.getLogger("waitress.queue")
    handler = Queued()
    queue_log.addHandler(handler)
    server = make_server(app, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = int(server.server_address[1])
    answers: dict[str, str] = {}

    def get(path: str) -> None:
        status, _, _ = _exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        answers[path] = status

    clients = [threading.Thread(target=get, args=(path,)) for path in ("/a", "/b")]
    try:
        for client in clients:
            client.start()
        with changed:  # both threads busy
            assert changed.wait_for(lambda: len(entered) == 2, WAIT)
        clients.append(threading.Thread(target=get, args=("/third",)))
        clients[-1].start()
        assert queued.wait(WAIT), "the third request was not queued"
        with changed:
            assert sorted(entered) == ["/a", "/b"]  # it waits: no thread took it, none refused it
        release.set()
        for client in clients:
            client.join(WAIT)
        assert answers == dict.fromkeys(("/a", "/b", "/third"), "HTTP/1.1 200 OK")
    finally:
        release.set()
        queue_log.removeHandler(handler)
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


# -- the command's options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], None),
        (["--cors-origin", "https://a.example"], ["https://a.example"]),
        (
            ["--cors-origin", "https://a.example", "--cors-origin", "http://localhost:3000"],
            ["https://a.example", "http://localhost:3000"],
        ),
    ],
)
def test_cors_origins_reach_make_app_only_when_given(
    monkeypatch: pytest.MonkeyPatch, args: list[str], expected: Optional[list[str]]
) -> None:
    from aichatonline_sync import gateway
    calls: list[dict[str, Any]] = []

    def make_app(session: Any = None, *, api_key: Any = None, cors_origins: Any = ()) -> object:
        calls.append({"api_key": api_key, **({} if cors_origins == () else {"cors": cors_origins})})
        return object()

    def make_server(*_: Any) -> Any:
        raise OSError("not listening in this test")

    monkeypatch.setattr(gateway, "make_app", make_app)
    monkeypatch.setattr(gateway, "make_server", make_server)
    assert _cli.main(["gateway", "--emulator", *args]) == _cli.EXIT_FAILURE
    assert calls == [{"api_key": None, **({} if expected is None else {"cors": expected})}]


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_bad_graceful_timeout_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(["gateway", "--emulator", "--graceful-timeout", value]) == _cli.EXIT_USAGE
    assert "--graceful-timeout" in capsys.readouterr().err


def test_without_waitress_make_server_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "waitress", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "aichatonline_sync.gateway.server", raising=False)
    with pytest.raises(ImportError, match=r'pip install "aichatonline-sync\[gateway\]"'):
        make_server(_app, port=0)


def test_without_waitress_the_command_names_the_extra_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aichatonline_sync import gateway

    monkeypatch.setitem(sys.modules, "waitress", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "aichatonline_sync.gateway.server", raising=False)
    monkeypatch.delattr(gateway, "server", raising=False)
    started: list[str] = []
    monkeypatch.setattr(_cli, "_connect", lambda args: started.append("session"))
    monkeypatch.setattr(gateway, "make_app", lambda *a, **k: started.append("app"))

    assert _cli.main(["gateway", "--emulator", "--port", "0"]) == _cli.EXIT_FAILURE
    captured = capsys.readouterr()
    assert started == []
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("aichatonline: error: ")
    assert 'pip install "aichatonline-sync[gateway]"' in lines[0]
