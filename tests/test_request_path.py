"""The one request path, with a Session's own requests.Session or one given as ``http=``.

These tests hold both to what requests itself does: the same request on the wire, the same cookie
handling, and the same adapter (so adapter-level mocks such as ``responses`` still see it).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import requests
import responses

from aichatonline_sync import APIConnectionError, Session, Timeout
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = Timeout(connect=5, read=5)


def _wire(emu: Emulator, session: Session, *, prompt: str = "Hello") -> list[tuple[str, str]]:
    """The chat request's headers as received, in order, with the token masked."""
    assert session.complete(prompt, conversation_id="conv123") == f"Echo: {prompt}"
    recorded = emu.chat_requests[-1]
    assert recorded.unique_id == session.grab_token()
    return [(k, "<token>" if k == "uniqueid" else v) for k, v in recorded.headers.items()]


def test_fast_path_sends_what_the_full_requests_path_sends(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    emu = emulator(reply=lambda prompt: f"Echo: {prompt}")
    headers = {"X-Extra": "1", "Accept-Language": "fr"}
    with Session(emu.url, timeout=SHORT, headers=headers) as fast:
        fast_wire = _wire(emu, fast, prompt="Grüße, \"quoted\" \\ and 日本")
        fast_body = emu.chat_requests[-1].body
    http = requests.Session()
    with Session(emu.url, timeout=SHORT, headers=headers, http=http) as full:
        full_wire = _wire(emu, full, prompt="Grüße, \"quoted\" \\ and 日本")
        full_body = emu.chat_requests[-1].body
    http.close()
    assert fast_wire == full_wire
    assert fast_body == full_body
    assert json.loads(fast_body) == {
        "conversationId": "conv123",
        "prompt": "Grüße, \"quoted\" \\ and 日本",
    }
    assert dict(fast_wire)["content-length"] == str(len(fast_body))


def _token_reply_with_cookie(token: str, cookie: str) -> bytes:
    body = json.dumps({"code": 200, "msg": "success", "data": token}).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Set-Cookie: {cookie}; Path=/\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _chat_reply_with_cookie(piece: str, cookie: str) -> bytes:
    body = json.dumps({"code": 200, "msg": "success", "data": {"message": piece}}).encode() + b"\n"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        + f"Set-Cookie: {cookie}; Path=/\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.mark.parametrize("own", [True, False], ids=["own-session", "given-http"])
def test_cookies_set_by_the_upstream_are_sent_back(emulator: MakeEmulator, own: bool) -> None:
    emu = emulator(reply="plain")
    emu.raw_reply("token", _token_reply_with_cookie("tok-with-cookie", "sid=abc"), close=False)
    emu.raw_reply("chat", _chat_reply_with_cookie("first", "seen=1"), close=False)
    http = None if own else requests.Session()
    with Session(emu.url, timeout=SHORT, http=http) as session:
        assert session.complete("one") == "first"
        assert session.complete("two") == "plain"
    if http is not None:
        http.close()
    # The raw token is unknown to the emulator, so the second chat is rejected once and retried
    # with a fresh token: every chat after the first carries both cookies.
    first, *later = emu.chat_requests
    assert first.header("cookie") == "sid=abc"
    assert later
    for request in later:
        assert sorted((request.header("cookie") or "").split("; ")) == ["seen=1", "sid=abc"]


def test_responses_mock_still_sees_the_chat() -> None:
    base = "http://127.0.0.1:9"
    line = json.dumps({"code": 200, "msg": "success", "data": {"message": "mocked"}}) + "\n"
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        rsps.get(f"{base}/api/v1/user/getUniqueId", json={"data": "tok"})
        rsps.post(f"{base}/aichatonline/api/chat/gpt", body=line, content_type="text/event-stream")
        with Session(base, timeout=SHORT) as session:
            assert session.complete("Hi") == "mocked"
        chat = rsps.calls[1].request
        assert chat.headers["UniqueId"] == "tok"
        assert json.loads(chat.body)["prompt"] == "Hi"


def test_fast_path_connection_errors_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def refuse(self: Any, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        calls.append(request)
        raise requests.exceptions.ConnectionError("refused by the test")

    with Session("http://127.0.0.1:9", timeout=SHORT, max_retries=0) as session:
        with responses.RequestsMock() as rsps:  # the token first: only the chat POST is under test
            rsps.get("http://127.0.0.1:9/api/v1/user/getUniqueId", json={"data": "tok"})
            assert session.grab_token() == "tok"
        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", refuse)
        with pytest.raises(APIConnectionError) as info:
            session.complete("Hi")
    assert len(calls) == 1
    assert calls[0].method == "POST"
    assert "tok" not in str(info.value)
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)


class RawServer:
    """Records every request exactly as its bytes arrived; answers the token and chat endpoints,
    each reply setting a cookie (keep-alive, Content-Length framing)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    more = conn.recv(65536)
                    if not more:
                        return
                    buf += more
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                self.requests.append(head + b"\r\n\r\n" + body)
                n = len(self.requests)
                if head.startswith(b"GET"):
                    reply = json.dumps({"code": 200, "msg": "success", "data": "tok"}).encode()
                    kind = b"application/json"
                else:
                    piece = {"code": 200, "msg": "success", "data": {"message": "hi"}}
                    reply = json.dumps(piece).encode() + b"\n"
                    kind = b"text/event-stream"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + kind
                    + b"\r\nSet-Cookie: c%d=v%d; Path=/\r\nContent-Length: %d\r\n\r\n" % (n, n, len(reply))
                    + reply
                )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


def _exchange(raw_server: RawServer, http: Any, headers: dict[str, str]) -> list[bytes]:
    start = len(raw_server.requests)
    with Session(raw_server.url, timeout=SHORT, headers=headers, http=http) as session:
        for _ in range(2):
            assert session.complete("Hi", conversation_id="conv123") == "hi"
    return raw_server.requests[start:]


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "application/json; charset=utf-8", "X-Extra": "1"}],
    ids=["default-headers", "own-content-type"],
)
def test_the_exact_bytes_match_the_full_path_with_cookies(
    raw_server: RawServer, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    fast = _exchange(raw_server, None, headers)
    http = requests.Session()
    full = _exchange(raw_server, http, headers)
    http.close()
    assert [r.split(b" ", 1)[0] for r in fast] == [b"GET", b"POST", b"POST"]
    # The token URL has a random canvas; the chats (with their cookies) must be byte for byte
    # the same, the cookies numbered by the order the replies set them.
    assert fast[1].replace(b"c1=v1", b"cX") == full[1].replace(b"c4=v4", b"cX")
    assert fast[2].replace(b"c1=v1; c2=v2", b"cX") == full[2].replace(b"c4=v4; c5=v5", b"cX")
    assert b"\r\nCookie: c1=v1; c2=v2\r\n" in fast[2]
    if headers:
        assert b"\r\ncontent-type: application/json; charset=utf-8\r\n" in fast[1]


def test_mocks_that_patch_session_send_see_the_chat(
    raw_server: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests-mock (and others) patch ``requests.Session.send``: the chat must go through it."""
    seen: list[str] = []
    send = requests.Session.send

    def recording_send(self: requests.Session, request: Any, **kwargs: Any) -> Any:
        seen.append(request.method)
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", recording_send)
    with Session(raw_server.url, timeout=SHORT) as session:
        assert session.complete("Hi") == "hi"
    assert seen == ["GET", "POST"]


def test_the_token_request_keeps_a_given_sessions_params(emulator: MakeEmulator) -> None:
    emu = emulator()
    http = requests.Session()
    http.params = {"k": "v"}
    with Session(emu.url, timeout=SHORT, http=http) as session:
        session.grab_token()
    http.close()
    query = emu.requests[0].query
    assert query["k"] == "v"
    assert query["canvas"].startswith("-")
