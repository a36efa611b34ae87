"""Session behaviour over real sockets against the emulator's faults: statuses, drops, stalls,
timeouts, error lines, tokens, threads."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pytest
import requests
import urllib3
from _threads import run_threads

import aichatonline_sync as aco
from aichatonline_sync import (
    AiChatOnlineError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    IncompleteStreamError,
    ProtocolError,
    RateLimitError,
    Session,
    Timeout,
    TokenError,
    UpstreamError,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

FRAMINGS = ["chunked", "length", "close"]
COMBOS = [(framing, gz) for framing in FRAMINGS for gz in (False, True)]
COMBO_IDS = [f"{framing}-{'gzip' if gz else 'plain'}" for framing, gz in COMBOS]
PIECES = ["Once ", "upon ", "a ", "tïme ", "日本 ", "there ", "was ", "a ", "stream."]
TEXT = "".join(PIECES)
SHORT = Timeout(connect=5, read=5)
STALL = Timeout(connect=5, read=0.5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def collect(stream: Any, into: list[str]) -> None:
    for piece in stream:
        into.append(piece)


# --- statuses -----------------------------------------------------------------------------------


def test_chat_503_twice_then_success(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 503, times=2)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.chat_requests) == 3
    assert emu.tokens_issued == 1
    assert len(no_sleep.sleeps) == 2


def test_chat_503_persisting_raises(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 503, times=3)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(APIStatusError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 503
    assert '"code": 503' in info.value.body
    assert info.value.url == f"{emu.url}/aichatonline/api/chat/gpt"
    assert len(emu.chat_requests) == 3


def test_token_500_is_retried(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("token", 500)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.token_requests) == 2
    assert emu.tokens_issued == 1
    assert len(no_sleep.sleeps) == 1


@pytest.mark.parametrize(
    ("headers", "slept"), [({"Retry-After": "1"}, 1.0), ({"retry-after-ms": "250"}, 0.25)]
)
def test_retry_after_from_the_emulator(
    emulator: MakeEmulator, no_sleep: Any, headers: dict[str, str], slept: float
) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 429, headers=headers)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == TEXT
    assert no_sleep.sleeps == [pytest.approx(slept)]


def test_retry_after_too_long_raises_rate_limit_error(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 429, headers={"Retry-After": "3600"})
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(RateLimitError) as info,
    ):
        session.complete("hi")
    assert info.value.retry_after == 3600.0
    assert len(emu.chat_requests) == 1
    assert no_sleep.sleeps == []


def test_chat_400_is_not_retried(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 400, body={"code": 400, "message": "bad prompt"})
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(3)) as session,
        pytest.raises(APIStatusError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 400
    assert "bad prompt" in info.value.body
    assert len(emu.chat_requests) == 1
    assert no_sleep.sleeps == []


def test_chat_401_gets_one_fresh_token(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 401)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        assert session.complete("hi") == TEXT
    assert emu.tokens_issued == 2
    assert [r.unique_id for r in emu.chat_requests] == emu.issued_tokens
    assert no_sleep.sleeps == []


def test_chat_403_twice_raises_authentication_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 403, times=2)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(AuthenticationError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 403
    assert emu.tokens_issued == 2
    assert len(emu.chat_requests) == 2


def test_revoked_token_recovers(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        assert session.complete("one") == TEXT
        emu.revoke_tokens()
        assert session.complete("two") == TEXT
        assert session.complete("three") == TEXT
    assert emu.tokens_issued == 2
    assert len(emu.chat_requests) == 4


# --- drops --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("after", [1, 4])
def test_drop_mid_stream_keeps_the_partial(
    emulator: MakeEmulator, no_sleep: Any, framing: str, gz: bool, after: int
) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gz)
    emu.drop("chat", after=after)
    got: list[str] = []
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        stream = session.chat("hi")
        with pytest.raises(IncompleteStreamError) as info:
            collect(stream, got)
        assert stream.closed
        # The session still works afterwards.
        assert session.complete("again") == TEXT
    assert got == PIECES[:after]
    assert info.value.partial == "".join(PIECES[:after])
    assert len(emu.chat_requests) == 2  # not retried once text was handed out
    assert no_sleep.sleeps == []


@pytest.mark.parametrize("framing", FRAMINGS)
def test_drop_mid_stream_complete_keeps_the_partial(
    emulator: MakeEmulator, no_sleep: Any, framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.drop("chat", after=3)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(IncompleteStreamError) as info,
    ):
        session.complete("hi")
    assert info.value.partial == "".join(PIECES[:3])


@pytest.mark.parametrize("framing", FRAMINGS)
def test_drop_before_any_piece_is_retried(
    emulator: MakeEmulator, no_sleep: Any, framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.drop("chat", after=0)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        assert list(session.chat("hi")) == PIECES
    assert len(emu.chat_requests) == 2
    assert len(no_sleep.sleeps) == 1


@pytest.mark.parametrize("framing", FRAMINGS)
def test_drop_before_any_piece_persisting_raises_connection_error(
    emulator: MakeEmulator, no_sleep: Any, framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.drop("chat", after=0, times=3)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(APIConnectionError) as info,
    ):
        session.complete("hi")
    assert not isinstance(info.value, APITimeoutError)
    assert len(emu.chat_requests) == 3
    assert len(no_sleep.sleeps) == 2


def test_token_drop_is_retried(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.drop("token")
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.token_requests) == 2
    assert len(no_sleep.sleeps) == 1


# --- stalls and timeouts ------------------------------------------------------------------------


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_stall_mid_stream_raises_incomplete_with_partial(
    emulator: MakeEmulator, no_sleep: Any, framing: str, gz: bool
) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gz)
    emu.stall("chat", after=2)
    got: list[str] = []
    with Session(emu.url, timeout=STALL, retry=no_sleep.policy(2)) as session:
        stream = session.chat("hi")
        started = time.monotonic()
        with pytest.raises(IncompleteStreamError) as info:
            collect(stream, got)
        elapsed = time.monotonic() - started
    assert got == PIECES[:2]
    assert info.value.partial == "".join(PIECES[:2])
    assert elapsed < 10
    assert len(emu.chat_requests) == 1


@pytest.mark.parametrize("framing", FRAMINGS)
def test_stall_before_any_piece_raises_api_timeout(
    emulator: MakeEmulator, no_sleep: Any, framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.stall("chat", after=0)
    started = time.monotonic()
    with (
        Session(emu.url, timeout=STALL, retry=no_sleep.policy(0)) as session,
        pytest.raises(APITimeoutError) as info,
    ):
        session.complete("hi")
    assert time.monotonic() - started < 10
    assert isinstance(info.value, APIConnectionError)


def test_token_stall_is_retried(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("token")
    with Session(emu.url, timeout=STALL, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.token_requests) == 2
    assert len(no_sleep.sleeps) == 1


def test_token_stall_persisting_raises_api_timeout(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("token", times=2)
    with (
        Session(emu.url, timeout=STALL, retry=no_sleep.policy(1)) as session,
        pytest.raises(APITimeoutError),
    ):
        session.complete("hi")
    assert emu.chat_requests == []


def test_total_deadline_before_any_piece(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", after=0)
    started = time.monotonic()
    with (
        Session(
            emu.url, timeout=Timeout(connect=5, read=5, total=0.5), retry=no_sleep.policy(3)
        ) as session,
        pytest.raises(APITimeoutError),
    ):
        session.complete("hi")
    assert time.monotonic() - started < 4  # well below the 5 s read timeout


@pytest.mark.parametrize("framing", FRAMINGS)
def test_total_deadline_mid_stream(emulator: MakeEmulator, no_sleep: Any, framing: str) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.stall("chat", after=2)
    got: list[str] = []
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(3)) as session:
        started = time.monotonic()
        stream = session.chat("hi", timeout=Timeout(connect=5, read=5, total=0.5))
        with pytest.raises(IncompleteStreamError) as info:
            collect(stream, got)
        elapsed = time.monotonic() - started
    assert got == PIECES[:2]
    assert info.value.partial == "".join(PIECES[:2])
    assert elapsed < 4


def test_total_deadline_stops_retries(emulator: MakeEmulator) -> None:
    """Real backoff sleeps here: the deadline must cut them short."""
    emu = emulator(reply=PIECES)
    emu.fail("chat", 503, headers={"Retry-After": "3"}, times=5)
    started = time.monotonic()
    with (
        Session(emu.url, timeout=Timeout(connect=5, read=5, total=1), max_retries=5) as session,
        pytest.raises(AiChatOnlineError),
    ):
        session.complete("hi")
    assert time.monotonic() - started < 2.5
    assert len(emu.chat_requests) == 1


def test_connection_refused_raises_after_retries(no_sleep: Any) -> None:
    with (
        Session(
            f"http://127.0.0.1:{closed_port()}", timeout=SHORT, retry=no_sleep.policy(2)
        ) as session,
        pytest.raises(APIConnectionError) as info,
    ):
        session.complete("hi")
    assert not isinstance(info.value, APITimeoutError)
    assert isinstance(info.value.__cause__, requests.ConnectionError)
    assert len(no_sleep.sleeps) == 2


# --- error lines --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["message", "msg"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_error_line_after_text(
    emulator: MakeEmulator, no_sleep: Any, framing: str, key: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    emu.error_line(500, "model overloaded", after=3, key=key)
    got: list[str] = []
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        stream = session.chat("hi")
        with pytest.raises(UpstreamError) as info:
            collect(stream, got)
        assert session.complete("again") == TEXT
    assert got == PIECES[:3]
    assert info.value.code == 500
    assert info.value.message == "model overloaded"
    assert info.value.partial == "".join(PIECES[:3])
    assert len(emu.chat_requests) == 2
    assert no_sleep.sleeps == []


def test_error_line_after_text_with_complete(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.error_line(500, "model overloaded", after=3)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(UpstreamError) as info,
    ):
        session.complete("hi")
    assert info.value.partial == "".join(PIECES[:3])


def test_error_line_401_before_text_gets_a_fresh_token(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    emu = emulator(reply=PIECES)
    emu.error_line(401, "invalid UniqueId")
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        assert session.complete("hi") == TEXT
    assert emu.tokens_issued == 2
    assert [r.unique_id for r in emu.chat_requests] == emu.issued_tokens


def test_error_line_401_twice_raises_upstream_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.error_line(401, "invalid UniqueId", times=2)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(UpstreamError) as info,
    ):
        session.complete("hi")
    assert (info.value.code, info.value.message, info.value.partial) == (
        401,
        "invalid UniqueId",
        "",
    )
    assert emu.tokens_issued == 2


def test_error_line_503_before_text_is_retried(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.error_line(503, "busy")
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.chat_requests) == 2
    assert emu.tokens_issued == 1
    assert len(no_sleep.sleeps) == 1


# --- replies that are no chat stream ------------------------------------------------------------


def test_html_page_raises_protocol_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.html("chat")
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(ProtocolError) as info,
    ):
        session.complete("hi")
    assert "Just a moment" in str(info.value)
    assert len(emu.chat_requests) == 1


def test_html_page_with_503_is_a_status_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=PIECES)
    emu.html("chat", status=503, times=2)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == TEXT
    assert len(emu.chat_requests) == 3


def test_content_type_other_than_event_stream_is_accepted(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES, content_type="application/json")
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert session.complete("hi") == TEXT


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("not json", "text/plain"),
        ({"code": 200, "msg": "success", "data": None}, "application/json"),
        ({"code": 200, "msg": "success", "data": 42}, "application/json"),
        ({"code": 200, "msg": "success", "data": "tok en\r\nX-Injected: 1"}, "application/json"),
        ({"code": 200, "msg": "success", "data": "f" * 300}, "application/json"),
    ],
    ids=["text", "null", "int", "crlf", "long"],
)
def test_malformed_token_reply_raises_token_error(
    emulator: MakeEmulator, no_sleep: Any, body: Any, content_type: str
) -> None:
    emu = emulator(reply=PIECES)
    emu.token_reply(body, content_type=content_type)
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(TokenError),
    ):
        session.complete("hi")
    assert emu.chat_requests == []
    assert len(emu.token_requests) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nnot a stream",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\nnot gzip!\n",
        b"garbage, not HTTP at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        + b'{"code": 200, "data": {"message": "x"}}\n',
    ],
    ids=["no-lines", "bad-chunk", "bad-gzip", "no-http", "short-length"],
)
def test_garbage_replies_raise_library_errors_only(
    emulator: MakeEmulator, no_sleep: Any, data: bytes
) -> None:
    emu = emulator(reply=PIECES)
    emu.raw_reply("chat", data)
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        with pytest.raises(AiChatOnlineError) as info:
            list(session.chat("hi"))
        assert not isinstance(info.value, (requests.RequestException, urllib3.exceptions.HTTPError))


# --- sharing: module-level functions and threads ------------------------------------------------


def test_module_level_calls_share_token_and_connection(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    assert aco.complete("one", base_url=emu.url, timeout=SHORT) == TEXT
    assert list(aco.chat("two", base_url=emu.url, timeout=SHORT)) == PIECES
    assert aco.complete("three", base_url=emu.url, timeout=SHORT) == TEXT
    assert emu.tokens_issued == 1
    assert emu.connections == 1


def test_module_level_reads_the_environment(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator(reply=PIECES)
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    assert aco.complete("one", timeout=SHORT) == TEXT
    assert len(emu.chat_requests) == 1


def test_threads_share_one_session(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = emulator(reply=lambda prompt: f"reply to {prompt}: " + "word " * 50)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        results, errors = run_threads(8, lambda i: session.complete(f"prompt {i}"))
    assert errors == []
    assert results == {i: "".join(emu.pieces_for(f"prompt {i}")) for i in range(8)}
    assert emu.tokens_issued == 1
    assert emu.connections <= 8
    assert "Connection pool is full" not in caplog.text


def test_threads_with_a_revoked_token_fetch_one_new_token(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert session.complete("warm up") == TEXT
        emu.revoke_tokens()
        results, errors = run_threads(8, lambda i: session.complete(f"prompt {i}"))
    assert errors == []
    assert results == dict.fromkeys(range(8), TEXT)
    assert emu.tokens_issued <= 2
