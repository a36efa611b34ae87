"""An upstream (or proxy) that echoes what it was sent, and one that drips its reply body: the token
and the proxy password never reach an error, and ``Timeout(total=...)`` bounds every body read.

Over real loopback sockets: the emulator with a known token and raw replies, and a small raw
server here (a "proxy" that echoes, a server that drips a body one byte at a time).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from aichatonline_sync import (
    AiChatOnlineError,
    APIStatusError,
    APITimeoutError,
    ProtocolError,
    Session,
    Timeout,
    UpstreamError,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
TOKEN = "6dbd3acc4ffdf261b24b0541d1602cff"
PASSWORD = "pr0xy-s3cret-pw"
TOKEN_PATH = "/api/v1/user/getUniqueId"
#: A dripping server goes on for this long: far beyond the deadline the tests give.
DRIP_FOR = 30.0
GAP = 0.3
#: The generous bound: the deadline is 1.5 s; without it a call would last DRIP_FOR seconds.
BOUND = 5.0


def everything_shown(error: BaseException) -> list[str]:
    """What a user may print or log of an error: str, repr, the chained traceback, attributes."""
    chained = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    shown = [str(error), repr(error), chained]
    for name in ("body", "headers", "partial", "upstream_message"):
        shown.append(repr(getattr(error, name, None)))
    return shown


def assert_hidden(error: BaseException, secret: str) -> None:
    for text in everything_shown(error):
        assert secret not in text, f"a secret leaked into: {text[:300]!r}"


def reply(status_line: str, headers: list[str], body: bytes) -> bytes:
    head = [status_line, *headers, f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chat_error(emulator: MakeEmulator, raw: bytes) -> AiChatOnlineError:
    """The error of a chat whose token is ``TOKEN`` and whose reply is ``raw``."""
    emu = emulator()
    emu.token_reply({"code": 200, "msg": "success", "data": TOKEN})
    emu.raw_reply("chat", raw)
    with Session(emu.url, max_retries=0, timeout=Timeout(5, 5)) as session, pytest.raises(
        AiChatOnlineError
    ) as info:
        session.complete("hi")
    assert emu.chat_requests[0].header("UniqueId") == TOKEN  # the token was sent, and echoed
    return info.value


# --- the token echoed --------------------------------------------------------------------------


def test_a_token_echoed_in_the_reason_phrase_is_scrubbed(emulator: MakeEmulator) -> None:
    error = chat_error(emulator, reply(f"HTTP/1.1 400 bad UniqueId {TOKEN}", [], b"no"))
    assert type(error) is APIStatusError
    assert error.status_code == 400
    assert "HTTP 400 bad UniqueId *** from " in str(error)
    assert error.body == "no"
    assert_hidden(error, TOKEN)


def test_a_token_echoed_in_the_body_is_scrubbed(emulator: MakeEmulator) -> None:
    body = json.dumps({"code": 400, "msg": f"bad UniqueId {TOKEN}"}).encode()
    error = chat_error(
        emulator, reply("HTTP/1.1 400 Bad Request", ["Content-Type: application/json"], body)
    )
    assert type(error) is APIStatusError
    assert error.body == '{"code": 400, "msg": "bad UniqueId ***"}'
    assert_hidden(error, TOKEN)


def test_a_token_across_the_body_limit_is_scrubbed_whole(emulator: MakeEmulator) -> None:
    body = b"x" * 2040 + TOKEN.encode() + b"y" * 100  # the token straddles the 2048-byte cut
    error = chat_error(emulator, reply("HTTP/1.1 400 Bad Request", [], body))
    assert isinstance(error, APIStatusError)
    assert error.body == "x" * 2040 + "***"  # cut at 2048 characters, then its half masked
    assert_hidden(error, TOKEN[:8])


@pytest.mark.parametrize(
    ("status", "content_type"), [("400 Bad Request", "text/plain"), ("200 OK", "text/html")]
)
def test_a_token_echoed_many_times_is_scrubbed_up_to_the_limit(
    emulator: MakeEmulator, status: str, content_type: str
) -> None:
    # Scrubbed before the cut, each echo shrank to ***, and the half token at the old cut moved
    # inside the 2048 characters kept.
    body = b"".join(b"echo " + TOKEN.encode() + b"\n" for _ in range(30))
    error = chat_error(emulator, reply(f"HTTP/1.1 {status}", [f"Content-Type: {content_type}"], body))
    assert_hidden(error, TOKEN[:8])


def test_a_token_echoed_in_an_over_long_first_line_is_scrubbed(emulator: MakeEmulator) -> None:
    emu = emulator()
    emu.token_reply({"code": 200, "msg": "success", "data": TOKEN})
    line = json.dumps({"echo": TOKEN, "pad": "x" * 5000}).encode() + b"\n"
    emu.raw_reply("chat", reply("HTTP/1.1 200 OK", ["Content-Type: text/event-stream"], line))
    with Session(emu.url, max_retries=0, max_line_bytes=1024) as session, pytest.raises(
        ProtocolError, match="longer than 1024 bytes"
    ) as info:
        session.complete("hi")
    assert_hidden(info.value, TOKEN[:8])


def test_a_token_echoed_in_a_redirect_is_scrubbed(emulator: MakeEmulator) -> None:
    location = f"https://elsewhere.invalid/?id={TOKEN}"
    error = chat_error(emulator, reply("HTTP/1.1 302 Found", [f"Location: {location}"], b""))
    assert type(error) is APIStatusError
    assert error.status_code == 302
    assert "it redirects to https://elsewhere.invalid/?id=***. Redirects are not" in str(error)
    assert error.headers["Location"] == "https://elsewhere.invalid/?id=***"
    assert_hidden(error, TOKEN)


def test_a_token_echoed_in_an_html_page_is_scrubbed(emulator: MakeEmulator) -> None:
    page = f"<html><title>blocked {TOKEN}</title><body>id {TOKEN}</body></html>".encode()
    error = chat_error(emulator, reply("HTTP/1.1 200 OK", ["Content-Type: text/html"], page))
    assert type(error) is ProtocolError
    assert "is an HTML page, not a chat stream" in str(error)
    assert error.body == "<html><title>blocked ***</title><body>id ***</body></html>"
    assert_hidden(error, TOKEN)


def test_a_token_echoed_in_an_error_line_is_scrubbed(emulator: MakeEmulator) -> None:
    emu = emulator()
    with Session(emu.url, timeout=Timeout(connect=5, read=5), max_retries=0) as session:
        token = session.grab_token()
        emu.error_line(400, f"UniqueId {token} is not valid")
        with pytest.raises(UpstreamError) as info:
            session.complete("hi")
    assert token not in str(info.value)
    assert token not in info.value.message


# --- raw servers ---------------------------------------------------------------------------------


class RawServer:
    """An HTTP server on 127.0.0.1 that answers each request with ``handle(conn, request_head)``."""

    def __init__(self, handle: Callable[[socket.socket, bytes, threading.Event], None]) -> None:
        self.handle = handle
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                self.handle(conn, head, self.stopped)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.accepting.join(10)
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def make(handle: Callable[[socket.socket, bytes, threading.Event], None]) -> RawServer:
        made.append(RawServer(handle))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_a_proxy_password_echoed_to_the_token_request_is_scrubbed(
    raw_server: Callable[..., RawServer],
) -> None:
    """The "proxy" answers the token request itself, echoing the password (no token is sent)."""
    seen: list[bytes] = []

    def echo(conn: socket.socket, head: bytes, stopped: threading.Event) -> None:
        seen.append(head)
        conn.sendall(
            reply(
                f"HTTP/1.1 400 bad password {PASSWORD}",
                [f"Location: http://x.invalid/?pw={PASSWORD}", f"X-Echo: {PASSWORD}"],
                f"no user with password {PASSWORD}".encode(),
            )
        )

    proxy = raw_server(echo)
    proxy_url = proxy.url.replace("http://", f"http://alice:{PASSWORD}@")
    with Session("http://127.0.0.1:9", proxy=proxy_url, max_retries=0) as session, pytest.raises(
        APIStatusError
    ) as info:
        session.complete("hi")
    assert len(seen) == 1
    assert TOKEN_PATH.encode() in seen[0]
    assert b"Proxy-Authorization" in seen[0]
    error = info.value
    assert "the token request failed: HTTP 400 bad password *** from " in str(error)
    assert error.body == "no user with password ***"
    assert error.headers["X-Echo"] == "***"
    assert_hidden(error, PASSWORD)


# --- the total deadline bounds every body ---------------------------------------------------------


def drip(conn: socket.socket, head: bytes, stopped: threading.Event) -> None:
    """Send ``head``, then one byte of a body far longer than it, every GAP s for DRIP_FOR s."""
    conn.sendall(head)
    until = time.monotonic() + DRIP_FOR
    while time.monotonic() < until and not stopped.wait(GAP):
        conn.sendall(b"x")


def token_then(chat: Callable[[socket.socket, bytes, threading.Event], None]) -> Any:
    """A handler: token requests answered at once, chat requests by ``chat``."""
    body = json.dumps({"code": 200, "msg": "success", "data": TOKEN}).encode()

    def handle(conn: socket.socket, head: bytes, stopped: threading.Event) -> None:
        if head.split(b" ", 2)[1].startswith(TOKEN_PATH.encode()):
            conn.sendall(reply("HTTP/1.1 200 OK", ["Content-Type: application/json"], body))
            return
        chat(conn, head, stopped)

    return handle


def timed_chat(url: str) -> tuple[float, AiChatOnlineError]:
    started = time.monotonic()
    with Session(url, max_retries=0, timeout=Timeout(2, 2, total=1.5)) as session, pytest.raises(
        AiChatOnlineError
    ) as info:
        session.complete("hi")
    return time.monotonic() - started, info.value


def test_the_total_deadline_bounds_a_dripping_token_body(
    raw_server: Callable[..., RawServer],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    server = raw_server(lambda conn, _head, stopped: drip(conn, head, stopped))
    took, error = timed_chat(server.url)
    assert type(error) is APITimeoutError
    assert "the total deadline passed" in str(error)
    assert took < BOUND


def test_the_total_deadline_bounds_a_dripping_error_body(
    raw_server: Callable[..., RawServer],
) -> None:
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100000\r\n\r\n"
    server = raw_server(token_then(lambda conn, _head, stopped: drip(conn, head, stopped)))
    took, error = timed_chat(server.url)
    assert type(error) is APIStatusError  # the status is known: it is the error
    assert error.status_code == 400
    assert error.body == "x" * len(error.body)  # what arrived before the deadline
    assert took < BOUND


def test_the_total_deadline_bounds_a_dripping_html_page(
    raw_server: Callable[..., RawServer],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100000\r\n\r\n"
    server = raw_server(token_then(lambda conn, _head, stopped: drip(conn, head, stopped)))
    took, error = timed_chat(server.url)
    assert type(error) is ProtocolError
    assert "is an HTML page" in str(error)
    assert took < BOUND
