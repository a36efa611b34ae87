"""Defects found in review of the core rebuild, each over real sockets or on byte fixtures."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from typing import Any, Callable

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync._client.registry import MAX_SHARED_SESSIONS
from aichatonline_sync._wire.parser import LineParser
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_a_line_with_a_utf8_bom_is_parsed_as_before() -> None:
    parser = LineParser()
    assert parser.feed(b'\xef\xbb\xbf{"data": {"message": "bom"}}\n') == ["bom"]


def test_a_stream_dropped_unread_is_released_with_a_cancellation(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["a ", "b"])
    cancel = aco.Cancellation()
    with aco.Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("hi", cancel=cancel)
        reply = weakref.ref(stream._reply)
        del stream
        gc.collect()
        assert reply() is None  # released (its connection with it), not kept by the cancel


def test_the_token_request_keeps_a_given_sessions_params(emulator: MakeEmulator) -> None:
    emu = emulator()
    http = requests.Session()
    http.params = {"k": "v"}
    with aco.Session(emu.url, timeout=SHORT, http=http) as session:
        session.grab_token()
    http.close()
    query = emu.requests[0].query
    assert query["k"] == "v"
    assert query["canvas"].startswith("-")


def test_a_token_echoed_in_an_error_line_is_scrubbed(emulator: MakeEmulator) -> None:
    emu = emulator()
    with aco.Session(emu.url, timeout=SHORT, max_retries=0) as session:
        token = session.grab_token()
        emu.error_line(400, f"UniqueId {token} is not valid")
        with pytest.raises(aco.UpstreamError) as info:
            session.complete("hi")
    assert token not in str(info.value)
    assert token not in info.value.message


def test_a_module_level_batch_keeps_its_shared_session_open(emulator: MakeEmulator) -> None:
    """Other option sets used meanwhile must not close the session a running batch uses."""
    started = threading.Event()
    go = threading.Event()

    def reply(prompt: str) -> str:
        if prompt == "first":
            started.set()
            go.wait(10)
        return f"re {prompt}"

    emu = emulator(reply=reply)
    other = emulator()
    out: list[Any] = []
    thread = threading.Thread(
        target=lambda: out.append(
            aco.batch(["first", "a", "b", "c"], base_url=emu.url, max_workers=1, max_retries=0)
        )
    )
    thread.start()
    assert started.wait(10)
    for i in range(MAX_SHARED_SESSIONS + 1):
        aco.complete("x", base_url=other.url, headers={"X-N": str(i)}, max_retries=0)
    go.set()
    thread.join(10)
    assert out == [["re first", "re a", "re b", "re c"]]


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


def test_a_line_with_bytes_that_are_no_utf8_keeps_the_rest_of_its_text(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aichatonline_sync")
    body = b'{"data": {"message": "caf\xe9 "}}\n\xff\xfe\x00\n{"data": {"message": "ok"}}\n'
    emu = emulator()
    emu.raw_reply(
        "chat",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    with aco.Session(emu.url, max_retries=0) as session:
        text = session.complete("hi")

    assert text == "caf\ufffd ok"  # the binary line between is skipped as not JSON
    records = [r for r in caplog.records if "not UTF-8" in r.getMessage()]
    # One warning per reply (the first bad line), the rest at debug level: no flood of warnings.
    assert [r.levelno for r in records if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert "\xff" not in records[0].getMessage()  # the bytes are not logged
