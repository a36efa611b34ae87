"""The failure table: every foreign exception kind maps to our class, its sentence and ``timed_out``,
before the first piece and after it; ``timed_out`` on real failures against the emulator; sentences
in plain words that name their URL; the gateway's 504 decided by ``timed_out``.
"""

from __future__ import annotations

import http.client
import io
import json
import pickle
import socket
import ssl
import wsgiref.util
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import requests
import urllib3

import aichatonline_sync as aco
from aichatonline_sync._transport.transport import (
    FAILURES,
    BodyTruncated,
    Cancelled,
    DeadlineExceeded,
    classify,
    translate_exception,
)
from aichatonline_sync.gateway import make_app
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

URL = "http://127.0.0.1:9/api/chat"
PIECES = ["Once ", "upon ", "a time."]


def _proxy_timeout() -> BaseException:
    inner = urllib3.exceptions.ProxyError("Unable to connect to proxy", socket.timeout("timed out"))
    return requests.exceptions.ProxyError(inner)


#: (id, exception, preparing, kind, class before the first piece, timed_out)
ROWS: list[tuple[str, BaseException, bool, str, type[aco.AiChatOnlineError], bool]] = [
    ("cancelled", Cancelled(), False, "aborted", aco.APIConnectionError, False),
    ("deadline", DeadlineExceeded(), False, "deadline", aco.APITimeoutError, True),
    ("proxy-timeout", _proxy_timeout(), False, "proxy-timeout", aco.APITimeoutError, True),
    (
        "proxy",
        requests.exceptions.ProxyError("Cannot connect to proxy"),
        False,
        "proxy",
        aco.APIConnectionError,
        False,
    ),
    (
        "untrusted",
        ssl.SSLCertVerificationError(1, "certificate verify failed"),
        False,
        "untrusted",
        aco.APIConnectionError,
        False,
    ),
    ("tls", ssl.SSLError(1, "wrong version number"), False, "tls", aco.APIConnectionError, False),
    (
        "refused",
        ConnectionRefusedError(111, "Connection refused"),
        False,
        "refused",
        aco.APIConnectionError,
        False,
    ),
    (
        "unresolved",
        socket.gaierror(-2, "Name or service not known"),
        False,
        "unresolved",
        aco.APIConnectionError,
        False,
    ),
    (
        "connect-timeout",
        requests.exceptions.ConnectTimeout("connect timed out"),
        False,
        "connect-timeout",
        aco.APITimeoutError,
        True,
    ),
    (
        "new-connection",
        urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection"),
        False,
        "connection",
        aco.APIConnectionError,
        False,
    ),
    (
        "read-timeout",
        requests.exceptions.ReadTimeout("read timed out"),
        False,
        "timeout",
        aco.APITimeoutError,
        True,
    ),
    ("socket-timeout", socket.timeout("timed out"), False, "timeout", aco.APITimeoutError, True),
    (
        "invalid-preparing",
        requests.exceptions.InvalidHeader("bad header"),
        True,
        "invalid",
        aco.InvalidRequestError,
        False,
    ),
    (
        "invalid-sent",
        requests.exceptions.InvalidHeader("bad header"),
        False,
        "invalid",
        aco.ProtocolError,
        False,
    ),
    ("truncated", BodyTruncated("short"), False, "truncated", aco.APIConnectionError, False),
    (
        "incomplete-read",
        http.client.IncompleteRead(b"ab", 3),
        False,
        "truncated",
        aco.APIConnectionError,
        False,
    ),
    (
        "reset",
        ConnectionResetError(104, "Connection reset by peer"),
        False,
        "reset",
        aco.APIConnectionError,
        False,
    ),
    ("other", ValueError("odd"), False, "connection", aco.APIConnectionError, False),
]


@pytest.mark.parametrize(
    ("exc", "preparing", "kind", "cls", "timed_out"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_each_foreign_exception_maps_to_its_class_and_timed_out_before_the_first_piece(
    exc: BaseException,
    preparing: bool,
    kind: str,
    cls: type[aco.AiChatOnlineError],
    timed_out: bool,
) -> None:
    assert classify(exc, preparing=preparing).kind == kind
    error = translate_exception(exc, url=URL, stage="preparing" if preparing else "sending")
    assert type(error) is cls
    assert error.timed_out is timed_out
    assert URL in str(error) or kind == "aborted"


@pytest.mark.parametrize(
    ("exc", "kind", "timed_out"),
    [(row[1], row[3], row[5]) for row in ROWS if not row[2]],
    ids=[row[0] for row in ROWS if not row[2]],
)
def test_after_the_first_piece_every_failure_is_an_incomplete_stream_keeping_the_text(
    exc: BaseException, kind: str, timed_out: bool
) -> None:
    error = translate_exception(
        exc, url=URL, stage="reply", timeout=0.5, stopped_after="5 characters", partial="Once "
    )
    assert type(error) is aco.IncompleteStreamError
    assert error.partial == "Once "
    assert error.timed_out is timed_out
    assert str(error).startswith(f"the reply from {URL} stopped after 5 characters: ")


def test_every_row_of_the_table_is_reached_by_a_case() -> None:
    assert {row.kind for row in FAILURES} == {row[3] for row in ROWS}


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (DeadlineExceeded(), "the total deadline passed"),
        (socket.timeout("timed out"), "no data for 0.5 s (read timeout)"),
        (ConnectionResetError(104, "Connection reset by peer"), "the server reset the connection"),
        (BodyTruncated("short"), "the connection closed before the end of the body"),
        (ValueError("odd"), "the connection broke (odd)"),
    ],
    ids=["deadline", "read-timeout", "reset", "truncated", "broke"],
)
def test_the_reason_a_reply_stopped_is_said_by_its_row(exc: BaseException, reason: str) -> None:
    error = translate_exception(
        exc, url=URL, stage="reply", timeout=0.5, stopped_after="1 characters"
    )
    assert reason in str(error)


def test_a_stall_without_a_read_timeout_is_still_a_timeout() -> None:
    error = translate_exception(socket.timeout("timed out"), url=URL, stopped_after="1 characters")
    assert "the connection broke" in str(error)
    assert error.timed_out


def test_timed_out_comes_from_types_never_from_message_text() -> None:
    said = ConnectionResetError(104, "timed out")  # a reset whose words mention a timeout
    assert not translate_exception(said, url=URL).timed_out
    assert not translate_exception(said, url=URL, stopped_after="1 characters").timed_out
    assert not aco.APIConnectionError("timed out waiting for it").timed_out


def test_an_abort_wins_over_the_exception_that_it_caused() -> None:
    cut = ConnectionResetError(104, "Connection reset by peer")
    before = translate_exception(cut, url=URL, stage="reply", aborted="the stream was closed")
    assert type(before) is aco.APIConnectionError
    assert str(before) == "the stream was closed before its first piece"
    assert (before.retryable, before.timed_out) == (False, False)
    after = translate_exception(
        cut, url=URL, stage="reply", aborted=True, stopped_after="2 characters"
    )
    assert str(after).endswith(
        "stopped after 2 characters: the chat was aborted (cancelled, or its batch was stopped)"
    )


def test_a_protocol_error_found_in_a_body_makes_its_reply_unreadable() -> None:
    found = aco.ProtocolError("bad chunk size", body="xyz")
    chat = translate_exception(found, url=URL, stage="reply")
    assert type(chat) is aco.ProtocolError
    assert str(chat) == f"the reply from {URL} is unreadable: bad chunk size"
    assert chat.body == "xyz"
    token = translate_exception(found, url=URL, stage="token")
    assert type(token) is aco.TokenError
    assert str(token) == f"the token reply from {URL} is unreadable: bad chunk size"
    assert translate_exception(found, url=URL) is found  # sending: ours already


@pytest.mark.parametrize(
    "error",
    [
        aco.APITimeoutError("slow", url=URL),
        aco.IncompleteStreamError("stalled", partial="ab", timed_out=True),
        aco.IncompleteStreamError("cut", partial="ab"),
        aco.APIConnectionError("down", url=URL),
    ],
    ids=["api-timeout", "stalled", "cut", "connection"],
)
def test_timed_out_survives_pickling(error: aco.AiChatOnlineError) -> None:
    assert pickle.loads(pickle.dumps(error)).timed_out is error.timed_out


# --- real failures against the emulator -------------------------------------------------------


def _failure(session: aco.Session, *, handed: Optional[list[str]] = None) -> aco.AiChatOnlineError:
    """The error of one chat; the pieces handed out before it go into ``handed``."""
    got = [] if handed is None else handed
    with session, pytest.raises(aco.AiChatOnlineError) as caught:
        got.extend(session.chat("Hi"))
    return caught.value


def test_a_read_timeout_before_the_first_piece_timed_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", seconds=None)
    error = _failure(aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=0.3)))
    assert type(error) is aco.APITimeoutError
    assert error.timed_out


def test_a_read_timeout_after_the_first_piece_timed_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", after=1, seconds=None)
    handed: list[str] = []
    session = aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=0.3))
    error = _failure(session, handed=handed)
    assert type(error) is aco.IncompleteStreamError
    assert error.timed_out
    assert error.partial == "".join(handed) == PIECES[0]
    assert "no data for 0.3 s (read timeout)" in str(error)


def test_the_total_deadline_after_the_first_piece_timed_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", after=1, seconds=None)
    session = aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=5, total=0.6))
    error = _failure(session)
    assert type(error) is aco.IncompleteStreamError
    assert error.timed_out
    assert "the total deadline passed" in str(error)


def test_a_dropped_reply_did_not_time_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.drop("chat", after=1)
    error = _failure(aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=5)))
    assert type(error) is aco.IncompleteStreamError
    assert not error.timed_out


def test_a_connect_failure_did_not_time_out() -> None:
    with socket.socket() as probe:  # a port nobody listens on any more
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _failure(aco.Session(f"http://127.0.0.1:{port}", max_retries=0, timeout=2))
    assert type(error) is aco.APIConnectionError
    assert "connection refused" in str(error)
    assert not error.timed_out


def test_a_refused_token_did_not_time_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("token", 403)
    error = _failure(aco.Session(emu.url, max_retries=0, timeout=2))
    assert isinstance(error, aco.APIStatusError)
    assert error.status_code == 403
    assert not error.timed_out


def test_a_stalled_token_timed_out(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("token", seconds=None)
    error = _failure(aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=0.3)))
    assert type(error) is aco.APITimeoutError
    assert error.timed_out


# --- sentences that name their URL ------------------------------------------------------------


def test_bad_chunk_framing_before_the_first_piece_names_the_url_in_plain_words(
    emulator: MakeEmulator,
) -> None:
    emu = emulator()
    emu.raw_reply(
        "chat",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: text/event-stream\r\n\r\nzz\xff\r\nabc\r\n",
    )
    with aco.Session(emu.url, max_retries=0) as session, pytest.raises(aco.ProtocolError) as info:
        session.complete("hi")

    message = str(info.value)
    assert emu.url in message
    assert "bad chunk size 'zz\\xff'" in message
    assert "b'" not in message


def test_a_cancelled_chat_names_its_url(emulator: MakeEmulator) -> None:
    emu = emulator()
    cancel = aco.Cancellation()
    with aco.Session(emu.url) as session:
        session.grab_token()
        cancel.cancel()
        with pytest.raises(aco.APIConnectionError) as info:
            session.complete("hi", cancel=cancel)

    assert f"the chat request to {emu.url}/" in str(info.value)
    assert "was cancelled" in str(info.value)
    assert info.value.url is not None
    assert info.value.url.startswith(emu.url)


# --- the gateway ------------------------------------------------------------------------------


def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    data = json.dumps(body).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
    }
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(line)
        return lambda data: None

    result: Iterator[bytes] = iter(app(environ, start_response))
    try:
        answer = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0], answer


def test_the_gateway_answers_504_for_a_reply_that_stalled_after_its_first_piece(
    emulator: MakeEmulator,
) -> None:
    emu = emulator(reply=PIECES)
    emu.stall("chat", after=1, seconds=None)
    session = aco.Session(emu.url, max_retries=0, timeout=aco.Timeout(connect=2, read=0.3))
    with session:
        status, answer = _post(
            make_app(session),
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert status.startswith("504 ")
    error = json.loads(answer)["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "upstream_timeout")


@pytest.mark.parametrize(("timed_out", "status"), [(True, 504), (False, 502)])
def test_the_gateway_decides_504_by_timed_out_not_by_words(timed_out: bool, status: int) -> None:
    from aichatonline_sync.gateway.errors import refusal_for

    error = aco.IncompleteStreamError("the reply stopped after 5 characters", timed_out=timed_out)
    assert refusal_for(error).status == status
