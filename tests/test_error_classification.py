"""Behaviours of the public API over real loopback sockets, one section per behaviour:

1. a failure after text was handed out is a ``StreamError`` whose ``.partial`` is that text;
2. success-looking reply lines are skipped, never taken for error lines;
3. a 3xx reply is an ``APIStatusError`` naming its Location, never retried nor followed;
4. a 401/403 to the token request does not claim a token was rejected;
5. a CA bundle path that does not exist is an ``InvalidRequestError`` before any request;
6. a prompt that is not encodable as UTF-8 is an ``InvalidRequestError`` before any request.

Where the emulator cannot produce the bytes (a fault after text the client has already handed
out), :class:`RawServer` answers the token request normally and the chat with a script of raw
bytes, waiting on events that the test sets once it has read the good pieces.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any, Callable, Union

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["Once ", "upon ", "a ", "tïme ", "日本 ", "there."]
TEXT = "".join(PIECES)
GOOD = PIECES[:3]  # handed out before a mid-stream fault
WAIT = 10.0  # the longest a server thread waits for the test (never reached when all is well)
QUICK = aco.Timeout(connect=5, read=3)
TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"


def line(piece: str) -> bytes:
    return json.dumps({"code": 200, "msg": "success", "data": {"message": piece}}).encode() + b"\n"


def lines(pieces: list[str]) -> bytes:
    return b"".join(line(piece) for piece in pieces)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def head(*headers: str) -> bytes:
    fields = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", *headers]
    return ("\r\n".join(fields) + "\r\n\r\n").encode("latin-1")


def lengthed(body: bytes) -> bytes:
    return head(f"Content-Length: {len(body)}", "Connection: close") + body


# --- a raw-socket server ------------------------------------------------------------------------

RST = "rst"  # script step: reset the connection (SO_LINGER 0, then close)
HOLD = "hold"  # script step: send nothing more until the server stops (no FIN to confuse things)
Step = Union[bytes, threading.Event, str]  # bytes are sent; an Event is waited for


class RawServer:
    """An HTTP/1.1 server on 127.0.0.1: tokens as the upstream gives them, chats by ``script``.

    Keep-alive: each connection serves requests until the chat script ends it. ``requests`` lists
    ``(method, path)`` of every request received.
    """

    def __init__(self, script: list[Step]) -> None:
        self.script = script
        self.requests: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def count(self, path: str) -> int:
        return sum(1 for _, seen in self.requests if seen == path)

    def stop(self) -> None:
        self._stop.set()
        for step in self.script:
            if isinstance(step, threading.Event):
                step.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accept.join(WAIT)
        for thread in self._threads:
            thread.join(WAIT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            try:
                while self._request(conn, rfile):
                    pass
            except OSError:
                pass

    def _request(self, conn: socket.socket, rfile: Any) -> bool:
        request_line = rfile.readline()
        if not request_line:
            return False
        method, target, _ = request_line.decode("latin-1").split(" ", 2)
        length = 0
        while (header := rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        rfile.read(length)
        path = target.split("?", 1)[0]
        self.requests.append((method, path))
        if path != CHAT_PATH:
            body = json.dumps({"code": 200, "msg": "success", "data": "0123456789abcdef" * 2})
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
            )
            return True
        for step in self.script:
            if isinstance(step, bytes):
                conn.sendall(step)
            elif isinstance(step, threading.Event):
                step.wait(WAIT)
            elif step == RST:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False
            elif step == HOLD:
                self._stop.wait(WAIT)
                return False
        return False


@pytest.fixture
def raw_server() -> Iterator[Callable[[list[Step]], RawServer]]:
    made: list[RawServer] = []

    def make(script: list[Step]) -> RawServer:
        server = RawServer(script)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# --- 1. a failure after text was handed out is a StreamError with .partial ----------------------


def compressed(data: bytes, wbits: int) -> bytes:
    """``data`` compressed and flushed (decodable so far), the stream left unfinished."""
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def failure(stream: Any, got: list[str], go: threading.Event | None = None) -> BaseException:
    """Read ``stream`` into ``got`` (setting ``go`` after the ``GOOD`` pieces) until it fails."""
    try:
        for piece in stream:
            got.append(piece)
            if go is not None and len(got) == len(GOOD):
                go.set()  # only now does the server send the fault
    except Exception as exc:
        return exc
    pytest.fail(f"the stream ended normally after {got!r}")


BAD_BLOCK = b"\xff" * 16  # after a flush, a deflate block header with the invalid type 3
CHUNKED = "Transfer-Encoding: chunked"


def scripts(go: threading.Event) -> dict[str, list[Step]]:
    """The chat replies: ``GOOD`` pieces, then (once ``go`` is set) the fault."""
    good = lines(GOOD)
    return {
        "gzip": [head(CHUNKED, "Content-Encoding: gzip"), chunk(compressed(good, 31)), go, chunk(BAD_BLOCK), HOLD],
        "deflate": [head(CHUNKED, "Content-Encoding: deflate"), chunk(compressed(good, 15)), go, chunk(BAD_BLOCK), HOLD],
        "chunked-framing": [head(CHUNKED), *(chunk(line(p)) for p in GOOD), go, b"zz\r\nnot a chunk\r\n", HOLD],
        "long-line": [head(CHUNKED), chunk(good), go, chunk(line("x" * 1000)), HOLD],
        "reset-chunked": [head(CHUNKED), chunk(good), go, RST],
        "reset-length": [head("Content-Length: 100000"), good, go, RST],
    }


@pytest.mark.parametrize("fault", list(scripts(threading.Event())))
def test_mid_stream_fault_is_stream_error_with_partial(
    raw_server: Callable[[list[Step]], RawServer], no_sleep: Any, fault: str
) -> None:
    go = threading.Event()
    server = raw_server(scripts(go)[fault])
    got: list[str] = []
    with aco.Session(
        server.url, timeout=QUICK, retry=no_sleep.policy(2), max_line_bytes=200
    ) as session:
        error = failure(session.chat("hi"), got, go)
    assert got == GOOD
    shown = f"{type(error).__name__} (partial={getattr(error, 'partial', None)!r}): {error}"
    assert isinstance(error, aco.StreamError), shown
    assert error.partial == "".join(got)
    assert server.count(CHAT_PATH) == 1  # nothing after text is retried
    assert no_sleep.sleeps == []


def test_mid_stream_stall_is_incomplete_stream_with_partial(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", after=len(GOOD))  # until the emulator stops
    got: list[str] = []
    timeout = aco.Timeout(connect=5, read=0.3)
    with aco.Session(emu.url, timeout=timeout, retry=no_sleep.policy(2)) as session:
        error = failure(session.chat("hi"), got)
    assert got == GOOD
    assert isinstance(error, aco.IncompleteStreamError), f"{type(error).__name__}: {error}"
    assert error.partial == "".join(GOOD)
    assert len(emu.chat_requests) == 1
    assert no_sleep.sleeps == []


# --- 2. success lines are never error lines ----------------------------------------------------

SUCCESS_LINES = [
    {"code": 200, "msg": "success"},
    {"code": 0},
    {"code": "0"},
    {"code": "200"},
    {"code": "ok"},
    {"code": "OK"},
    {"status": "success"},
    {"status": "ok"},
    {"status": "OK"},
    {"status": 200},
    {"code": 200, "status": "success"},
    {"success": True, "code": 0},
]
SUCCESS_IDS = [json.dumps(obj, separators=(",", ":")) for obj in SUCCESS_LINES]


@pytest.mark.parametrize("success", SUCCESS_LINES, ids=SUCCESS_IDS)
def test_success_lines_are_skipped(
    emulator: MakeEmulator, no_sleep: Any, success: dict[str, Any]
) -> None:
    emu = emulator()
    ok = json.dumps(success).encode() + b"\n"
    emu.raw_reply("chat", lengthed(ok + line("Hel") + ok + ok + line("lo") + ok))
    with aco.Session(emu.url, timeout=QUICK, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == "Hello"
    assert len(emu.chat_requests) == 1


@pytest.mark.parametrize("success", SUCCESS_LINES, ids=SUCCESS_IDS)
def test_only_success_lines_is_protocol_error(
    emulator: MakeEmulator, no_sleep: Any, success: dict[str, Any]
) -> None:
    emu = emulator()
    ok = json.dumps(success).encode() + b"\n"
    emu.raw_reply("chat", lengthed(ok * 3))
    with (
        aco.Session(emu.url, timeout=QUICK, retry=no_sleep.policy(2)) as session,
        pytest.raises(aco.AiChatOnlineError) as info,
    ):
        session.complete("hi")
    assert type(info.value) is aco.ProtocolError, f"{type(info.value).__name__}: {info.value}"


# --- 3. a 3xx is an APIStatusError naming its Location, not retried, not followed --------------

REDIRECTS = [301, 302, 303, 307, 308]


@pytest.mark.parametrize("endpoint", ["chat", "token"])
@pytest.mark.parametrize("status", REDIRECTS)
def test_redirect_is_status_error(
    emulator: MakeEmulator, no_sleep: Any, endpoint: str, status: int
) -> None:
    emu = emulator(reply=PIECES)
    location = f"{emu.url}/moved/elsewhere"  # a request there would be recorded as "other"
    emu.fail(endpoint, status, headers={"Location": location}, times=3)  # outlasts any retries
    with (
        aco.Session(emu.url, timeout=QUICK, retry=no_sleep.policy(2)) as session,
        pytest.raises(aco.APIStatusError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == status
    assert location in str(info.value)
    seen = [request.endpoint for request in emu.requests]
    assert seen == (["token", "chat"] if endpoint == "chat" else ["token"])
    assert no_sleep.sleeps == []


# --- 4. a 401/403 to the token request names no rejected token ---------------------------------


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("call", ["complete", "grab_token"])
def test_token_auth_status_does_not_blame_a_token(
    emulator: MakeEmulator, no_sleep: Any, status: int, call: str
) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("token", status=status)
    with aco.Session(emu.url, timeout=QUICK, retry=no_sleep.policy(2)) as session:
        def action() -> object:
            return session.grab_token() if call == "grab_token" else session.complete("hi")

        with pytest.raises(aco.APIStatusError) as info:
            action()
    assert info.value.status_code == status
    assert "rejected the token" not in str(info.value)
    assert len(emu.token_requests) == 1
    assert emu.chat_requests == []


def test_chat_401_twice_is_authentication_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 401, times=2)
    with (
        aco.Session(emu.url, timeout=QUICK, retry=no_sleep.policy(2)) as session,
        pytest.raises(aco.AuthenticationError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 401
    assert "401" in str(info.value)
    assert len(emu.token_requests) == 2  # the one fresh token
    assert len(emu.chat_requests) == 2
    assert no_sleep.sleeps == []


# --- 5. a CA bundle that does not exist ---------------------------------------------------------

MISSING_CA = "/nonexistent/ca.pem"


def test_session_with_missing_ca_bundle_is_invalid() -> None:
    with pytest.raises(aco.InvalidRequestError) as info:
        aco.Session(verify=MISSING_CA)
    assert MISSING_CA in str(info.value)


@pytest.mark.parametrize("function", [aco.chat, aco.complete], ids=["chat", "complete"])
def test_module_call_with_missing_ca_bundle_sends_nothing(
    emulator: MakeEmulator, no_sleep: Any, function: Callable[..., Any]
) -> None:
    emu = emulator(reply=PIECES)
    with pytest.raises(aco.InvalidRequestError) as info:
        function("hi", verify=MISSING_CA, base_url=emu.url, retry=no_sleep.policy(0))
    assert MISSING_CA in str(info.value)
    assert emu.requests == []


# --- 6. a prompt that is not encodable as UTF-8 ------------------------------------------------

SURROGATES: dict[str, Any] = {
    "str": "\ud800",
    "user-message": [{"role": "user", "content": "a\udfffb"}],
    "system-message": [
        {"role": "system", "content": "Be \udc80brief."},
        {"role": "user", "content": "Hi"},
    ],
    "text-part": [{"role": "user", "content": [{"type": "text", "text": "x\ud83dy"}]}],
}
CALLERS = ["aco.chat", "aco.complete", "Session.chat", "Session.complete"]


def consume(result: Any) -> None:
    if not isinstance(result, str):
        for _ in result:
            pass


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("prompt", list(SURROGATES.values()), ids=list(SURROGATES))
def test_unencodable_prompt_is_invalid_before_sending(
    emulator: MakeEmulator, no_sleep: Any, caller: str, prompt: Any
) -> None:
    emu = emulator(reply=PIECES)
    options: dict[str, Any] = {"timeout": QUICK, "retry": no_sleep.policy(0)}
    with aco.Session(emu.url, **options) as session:
        callers: dict[str, Callable[..., Any]] = {
            "aco.chat": aco.chat,
            "aco.complete": aco.complete,
            "Session.chat": session.chat,
            "Session.complete": session.complete,
        }
        function = callers[caller]
        extra = {"base_url": emu.url, **options} if caller.startswith("aco.") else {}
        with pytest.raises(aco.InvalidRequestError):
            consume(function(prompt, **extra))
    assert emu.requests == []
