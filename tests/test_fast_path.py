"""The chat POST of a Session that owns its requests.Session skips ``requests.Session.request``.

These tests hold it to what the full path does: the same request on the wire, the same cookie
handling, and the same adapter (so adapter-level mocks such as ``responses`` still see it).
"""

from __future__ import annotations

import json
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
        assert fast._chat_headers is not None  # the fast path is the one under test
        fast_wire = _wire(emu, fast, prompt="Grüße, \"quoted\" \\ and 日本")
        fast_body = emu.chat_requests[-1].body
    http = requests.Session()
    with Session(emu.url, timeout=SHORT, headers=headers, http=http) as full:
        assert full._chat_headers is None
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
            assert session._chat_headers is not None
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
        session._token = "tok"  # skip the token request: only the chat POST is under test
        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", refuse)
        with pytest.raises(APIConnectionError) as info:
            session.complete("Hi")
    assert len(calls) == 1
    assert calls[0].method == "POST"
    assert "tok" not in str(info.value)
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
