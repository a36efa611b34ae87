"""Bounded work per byte: a compressed body decodes in bounded steps, with the total deadline and
the chat's Cancellation checked between them, it may not expand past its limit, and lines that
carry no message cost no log call each. Over real sockets, against the emulator."""

from __future__ import annotations

import gzip
import logging
import re
import time
from collections.abc import Iterator
from typing import Callable

import pytest
import requests

from aichatonline_sync import (
    Cancellation,
    IncompleteStreamError,
    ProtocolError,
    Session,
    Timeout,
)
from aichatonline_sync._transport import transport as _transport
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
LOGGER = "aichatonline_sync"
MESSAGE = b'{"data": {"message": "Hi"}}\n'
#: Lines of ``x``: each a line to skip; 2 MiB of them, which gzip shrinks about 1,000 times.
JUNK_LINES = 1 << 20
#: More skipped lines than a few decode steps (64 KiB each, 32,768 lines of ``x``) can hold, and
#: far fewer than the million lines of the body.
TWO_STEPS_OF_LINES = 1 << 18


def gzip_reply(body: bytes) -> bytes:
    compressed = gzip.compress(body, 9)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(compressed), compressed)
    )


def plain_reply(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class _Counts(logging.Handler):
    """Keeps only the package's records about skipped lines (a flood of others costs nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("skipped"):
            self.records.append(record)

    def total_skipped(self) -> int:
        """The count the stream logged when it ended."""
        counts = [
            int(match.group(1))
            for record in self.records
            if (match := re.match(r"skipped (\d+) reply lines", record.getMessage()))
        ]
        assert len(counts) == 1, [r.getMessage() for r in self.records]
        return counts[0]


@pytest.fixture
def skipped_log() -> Iterator[_Counts]:
    logger = logging.getLogger(LOGGER)
    handler = _Counts()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_gzip_bomb_is_a_protocol_error_naming_the_limit(emulator: MakeEmulator) -> None:
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(b"\n" * (100 << 20)))  # 100 MiB from about 100 KiB
    with Session(emu.url, max_retries=0) as session, pytest.raises(ProtocolError, match=r"expands more than 200 times .* 8 MiB"):
        session.complete("hi")


def test_a_bomb_after_the_first_piece_is_an_incomplete_stream_naming_the_limit(
    emulator: MakeEmulator,
) -> None:
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(MESSAGE + b"x\n" * (50 << 20)))
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        with pytest.raises(IncompleteStreamError, match="expands more than 200 times") as info:
            list(stream)
    assert info.value.partial == "Hi"


#: Lines of a 12 MiB reply: past the 8 MiB floor of the expansion limit.
LONG_REPLY_LINES = (12 << 20) // len(b'{"data": {"message": "word "}}\n')


def test_a_long_reply_of_one_line_repeated_is_stopped_past_the_floor(emulator: MakeEmulator) -> None:
    # One line repeated compresses 400 times: past the 8 MiB floor that is a bomb's ratio.
    line = b'{"data": {"message": "word "}}\n'
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(line * LONG_REPLY_LINES))
    with Session(emu.url, max_retries=0) as session, pytest.raises(IncompleteStreamError, match="expands more than 200 times"):
        session.complete("hi")


def test_a_long_compressed_reply_within_the_limit_is_read_whole(emulator: MakeEmulator) -> None:
    # As long a reply whose lines differ (a counter in each) shrinks 14 times: no bomb.
    count = LONG_REPLY_LINES
    emu = emulator()
    body = b"".join(b'{"data": {"message": "%d "}}\n' % i for i in range(count // 2))
    emu.raw_reply("chat", gzip_reply(body))
    with Session(emu.url, max_retries=0) as session:
        text = session.complete("hi")
    assert text == "".join(f"{i} " for i in range(count // 2))


def test_the_total_deadline_stops_a_body_already_in_memory(
    emulator: MakeEmulator, skipped_log: _Counts
) -> None:
    """The whole compressed body arrives with the first piece, so no socket read is left to
    check the deadline: the decode steps must, before parsing more of it."""
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(MESSAGE + b"x\n" * JUNK_LINES))
    total = 0.5
    with Session(emu.url, timeout=Timeout(connect=5, read=5, total=total), max_retries=0) as session:
        started = time.monotonic()
        stream = session.chat("hi")
        assert next(stream) == "Hi"
        # Let the deadline pass: this waits for the condition under test, no other thread.
        time.sleep(max(0.0, started + total - time.monotonic()) + 0.05)
        with pytest.raises(IncompleteStreamError, match="the total deadline passed") as info:
            next(stream)
    assert info.value.partial == "Hi"
    assert skipped_log.total_skipped() < TWO_STEPS_OF_LINES  # not the million lines it held


def test_a_cancellation_stops_a_body_already_in_memory(
    emulator: MakeEmulator, skipped_log: _Counts
) -> None:
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(MESSAGE + b"x\n" * JUNK_LINES))
    cancel = Cancellation()
    with Session(emu.url, timeout=Timeout(connect=5, read=5), max_retries=0) as session:
        stream = session.chat("hi", cancel=cancel)
        assert next(stream) == "Hi"
        cancel.cancel()
        with pytest.raises(IncompleteStreamError, match="aborted") as info:
            next(stream)
    assert info.value.partial == "Hi"
    assert skipped_log.total_skipped() < TWO_STEPS_OF_LINES


def test_the_public_fallback_decodes_in_the_same_bounded_steps(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(response: requests.Response) -> None:
        return None

    monkeypatch.setattr(_transport._Wire, "of", staticmethod(unavailable))
    emu = emulator()
    emu.raw_reply("chat", gzip_reply(b"\n" * (100 << 20)))
    with Session(emu.url, max_retries=0) as session, pytest.raises(ProtocolError, match="expands more than 200 times"):
        session.complete("hi")


def test_skipped_lines_are_logged_once_and_counted(
    emulator: MakeEmulator, skipped_log: _Counts
) -> None:
    junk = b"".join(b"not json %d\n\n{broken %d\n" % (i, i) for i in range(1000))
    emu = emulator()
    emu.raw_reply("chat", plain_reply(MESSAGE + junk + MESSAGE))
    with Session(emu.url, max_retries=0) as session:
        assert session.complete("hi") == "HiHi"
    messages = [record.getMessage() for record in skipped_log.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("skipped a reply line that is not a JSON object")
    assert "not json 0" in messages[0]
    assert skipped_log.total_skipped() == 2000  # blank lines are not counted
