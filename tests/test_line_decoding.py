"""Reply lines as text: a UTF-8 byte order mark is dropped, and bytes that are not UTF-8 cost
only themselves (the rest of the line's text is kept) and one warning per reply, without the
bytes."""

from __future__ import annotations

import logging
from typing import Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync._wire.parser import LineParser
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_a_line_with_a_utf8_bom_is_parsed_without_it() -> None:
    parser = LineParser()
    assert parser.feed(b'\xef\xbb\xbf{"data": {"message": "bom"}}\n') == ["bom"]


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
