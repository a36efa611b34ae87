"""A reply cut short never looks complete; empty first pieces keep the retries; clean
"not a chat stream" errors. Every case over loopback sockets, with the emulator's raw replies."""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
PIECES = ["Hel", "lo ", "wor", "ld!"]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
TOKEN = "0123456789abcdef0123456789abcdef"


def line(piece: str) -> bytes:
    return json.dumps({"code": 200, "msg": "success", "data": {"message": piece}}).encode() + b"\n"


def lines(pieces: list[str]) -> bytes:
    return b"".join(line(piece) for piece in pieces)


def compressed(data: bytes, wbits: int, finish: bool) -> bytes:
    """``data`` compressed (gzip: ``wbits=31``, zlib deflate: 15), each line flushed so it decodes
    at once; without ``finish`` the stream has no end (no last block, no gzip trailer)."""
    compressor = zlib.compressobj(wbits=wbits)
    out = b"".join(
        compressor.compress(part) + compressor.flush(zlib.Z_SYNC_FLUSH)
        for part in data.splitlines(keepends=True)
    )
    return out + compressor.flush() if finish else out


def close_delimited(body: bytes, headers: bytes = b"") -> bytes:
    return HEAD + headers + b"Connection: close\r\n\r\n" + body


def chunked(body: bytes, headers: bytes = b"") -> bytes:
    return HEAD + headers + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


ENCODINGS = [("gzip", 31), ("deflate", 15)]


@pytest.mark.parametrize("framing", [close_delimited, chunked], ids=["close", "chunked"])
@pytest.mark.parametrize(("encoding", "wbits"), ENCODINGS, ids=[e for e, _ in ENCODINGS])
def test_compressed_body_without_its_end_is_incomplete(
    emulator: MakeEmulator, framing: Callable[..., bytes], encoding: str, wbits: int
) -> None:
    """The framing ends normally (FIN, or the last chunk) after 2 of 4 lines, but the compressed
    data has no end: IncompleteStreamError with the text handed out, not a reply that looks whole."""
    emu = emulator()
    body = compressed(lines(PIECES[:2]), wbits, finish=False)
    emu.raw_reply("chat", framing(body, b"Content-Encoding: %s\r\n" % encoding.encode()))
    with aco.Session(emu.url, max_retries=0) as session:
        seen: list[str] = []
        with pytest.raises(aco.IncompleteStreamError) as caught:
            seen.extend(session.chat("hi"))
    assert seen == PIECES[:2]
    assert caught.value.partial == "Hello "
    assert f"{encoding} data of the body stopped before its end" in str(caught.value)


@pytest.mark.parametrize("framing", [close_delimited, chunked], ids=["close", "chunked"])
@pytest.mark.parametrize(("encoding", "wbits"), ENCODINGS, ids=[e for e, _ in ENCODINGS])
def test_compressed_body_with_its_end_is_complete(
    emulator: MakeEmulator, framing: Callable[..., bytes], encoding: str, wbits: int
) -> None:
    emu = emulator()
    body = compressed(lines(PIECES), wbits, finish=True)
    emu.raw_reply("chat", framing(body, b"Content-Encoding: %s\r\n" % encoding.encode()))
    with aco.Session(emu.url, max_retries=0) as session:
        assert session.complete("hi") == "Hello world!"


def test_compressed_body_cut_before_the_first_piece_is_retried(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    """Only a gzip header, then FIN: a truncation before the first piece, retried like one."""
    emu = emulator(reply=PIECES)
    compressor = zlib.compressobj(wbits=31)
    header_only = compressor.compress(b"") + compressor.flush(zlib.Z_SYNC_FLUSH)
    emu.raw_reply("chat", close_delimited(header_only, b"Content-Encoding: gzip\r\n"))
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=1)) as session:
        assert session.complete("hi") == "Hello world!"
    assert len(emu.chat_requests) == 2


@pytest.mark.parametrize(
    "cut",
    [
        b'{"code": 200, "data": {"message": "wo',  # in a string
        b'{"code": 200, "data": {"message": "\\u4f',  # in a \u escape (non-ASCII text)
        b'{"code": 200, "n": 1.',  # in numbers
        b'{"code": 200, "n": -',
        b'{"code": 200, "n": 1e',
        b'{"code": 200, "data": {"message": tr',  # in a word
        b'{"code": 200, "data": {',  # between two members
    ],
)
def test_identity_body_closed_in_the_middle_of_a_line_is_incomplete(
    emulator: MakeEmulator, cut: bytes
) -> None:
    emu = emulator()
    emu.raw_reply("chat", close_delimited(lines(PIECES[:2]) + cut))
    with aco.Session(emu.url, max_retries=0) as session, pytest.raises(aco.IncompleteStreamError) as caught:
        session.complete("hi")
    assert caught.value.partial == "Hello "
    assert "middle of a line" in str(caught.value)


@pytest.mark.parametrize("cut", [b'{"code": 200, "data": {"message": tr', b'data: {"data": {"mess'])
def test_a_line_cut_before_the_first_piece_is_a_retried_truncation(
    emulator: MakeEmulator, no_sleep: Any, cut: bytes
) -> None:
    emu = emulator(reply=PIECES)
    emu.raw_reply("chat", close_delimited(cut))
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=1)) as session:
        assert session.complete("hi") == "Hello world!"
    assert len(emu.chat_requests) == 2


@pytest.mark.parametrize(
    ("last", "text"),
    [
        (line("ld!")[:-1], "Hello world!"),
        (b"data: " + line("ld!")[:-1] + b"\r", "Hello world!"),
        (b"[DONE]", "Hello wor"),
        (b'{"code": 200}', "Hello wor"),
        (b"not json {", "Hello wor"),
    ],
)
def test_a_last_line_without_its_newline_that_parses_is_accepted(
    emulator: MakeEmulator, last: bytes, text: str
) -> None:
    """A last line without a newline that is whole (or no JSON object at all) is no truncation."""
    emu = emulator()
    emu.raw_reply("chat", close_delimited(lines(PIECES[:3]) + last))
    with aco.Session(emu.url, max_retries=0) as session:
        assert session.complete("hi") == text


@pytest.mark.parametrize("code", [503, 500])
def test_an_error_line_after_empty_pieces_is_retried(
    emulator: MakeEmulator, no_sleep: Any, code: int
) -> None:
    """``""`` pieces are no text: an error line after them is one before any text."""
    emu = emulator(reply=["", "", *PIECES])
    emu.error_line(code, "busy", after=2)
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=1)) as session:
        assert session.complete("hi") == "Hello world!"
    assert len(emu.chat_requests) == 2
    assert len(no_sleep.sleeps) == 1


def test_a_token_rejected_after_an_empty_piece_gets_a_fresh_one(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    emu = emulator(reply=["", *PIECES])
    emu.error_line(401, "token expired", after=1)
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=0)) as session, session.chat("hi") as stream:
        assert list(stream) == ["", *PIECES]  # the empty piece is still handed out, once
    assert emu.tokens_issued == 2
    assert len(emu.chat_requests) == 2


def test_not_a_chat_stream_says_it_once(emulator: MakeEmulator) -> None:
    emu = emulator()
    emu.raw_reply("chat", close_delimited(b'{"foo": "bar"}\n'))
    with aco.Session(emu.url, max_retries=0) as session, pytest.raises(aco.ProtocolError) as caught:
        session.complete("hi")
    message = str(caught.value)
    assert message.count("the reply from") == 1
    assert "unreadable" not in message
    assert "not a chat stream" in message


@pytest.mark.parametrize("before", [0, 164])  # 164: the quote ends 10 characters into it
def test_not_a_chat_stream_never_shows_the_token(emulator: MakeEmulator, before: int) -> None:
    """The upstream echoes the token (whole, or cut where the quote of the body ends)."""
    emu = emulator()
    emu.token_reply({"code": 200, "msg": "success", "data": TOKEN})
    body = b"x" * before + b'{"error": null, "token": "%s"}\n' % TOKEN.encode()
    emu.raw_reply("chat", close_delimited(body))
    with aco.Session(emu.url, max_retries=0) as session, pytest.raises(aco.ProtocolError) as caught:
        session.complete("hi")
    for shown in (str(caught.value), repr(caught.value), caught.value.body or ""):
        assert TOKEN[:12] not in shown
    assert "***" in str(caught.value)
