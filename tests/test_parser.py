"""The pure bytes-to-pieces parser (``aichatonline_sync._wire.parser.LineParser``), on byte fixtures;
and reply lines as text over the emulator: a UTF-8 byte order mark is dropped, and bytes that are
not UTF-8 cost only themselves and one warning per reply, without the bytes."""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aichatonline_sync as aco
from aichatonline_sync import ProtocolError
from aichatonline_sync._wire.parser import ErrorLine, LineParser
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

LOGGER = "aichatonline_sync"


def line(piece: str, *, eol: str = "\n", prefix: str = "") -> bytes:
    """One reply line as the upstream's sister services write it."""
    obj = {"code": 200, "msg": "success", "data": {"message": piece}}
    return (prefix + json.dumps(obj, ensure_ascii=False) + eol).encode("utf-8")


def parse(chunks: list[bytes], parser: Optional[LineParser] = None) -> list[str]:
    parser = parser if parser is not None else LineParser()
    out: list[str] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.close())
    return out


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(body)) for cut in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(body[start:point])
        start = point
    chunks.append(body[start:])
    return chunks


def one_byte_chunks(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


# -- plain fixtures ---------------------------------------------------------------------------


def test_one_piece_per_line_in_order() -> None:
    body = line("Hel") + line("lo") + line(", ") + line("world")
    assert parse([body]) == ["Hel", "lo", ", ", "world"]


def test_feed_returns_pieces_of_completed_lines_only() -> None:
    parser = LineParser()
    assert parser.feed(line("a") + line("b")[:5]) == ["a"]
    assert parser.feed(line("b")[5:]) == ["b"]
    assert parser.close() == []


def test_bare_object_without_code() -> None:
    assert parse([b'{"data": {"message": "x"}}\n']) == ["x"]


@pytest.mark.parametrize("prefix", ["data: ", "data:", "data:  "])
def test_sse_data_prefix_is_optional(prefix: str) -> None:
    body = line("a", prefix=prefix) + line("b") + line("c", prefix=prefix)
    assert parse([body]) == ["a", "b", "c"]


@pytest.mark.parametrize("done", [b"[DONE]\n", b"data: [DONE]\n", b"data:[DONE]\r\n", b"[DONE]"])
def test_done_marker_is_skipped(done: bytes) -> None:
    assert parse([line("a") + done]) == ["a"]


def test_done_in_the_middle_is_skipped_too() -> None:
    assert parse([line("a") + b"data: [DONE]\n" + line("b")]) == ["a", "b"]


def test_blank_lines_and_crlf() -> None:
    body = b"\n\r\n" + line("a", eol="\r\n") + b"\r\n\r\n" + line("b", eol="\r\n") + b"\n  \n"
    assert parse([body]) == ["a", "b"]


def test_crlf_split_between_feeds() -> None:
    body = line("a", eol="\r\n") + line("b", eol="\r\n")
    cut = body.index(b"\r") + 1  # the "\r" ends one chunk, the "\n" starts the next
    assert parse([body[:cut], body[cut:]]) == ["a", "b"]


@pytest.mark.parametrize("prefix", ["", "data: "])
def test_last_line_without_newline_comes_from_close(prefix: str) -> None:
    parser = LineParser()
    assert parser.feed(line("a") + line("tail", eol="", prefix=prefix)) == ["a"]
    assert parser.close() == ["tail"]
    assert parser.close() == []


def test_close_on_nothing_gives_nothing() -> None:
    parser = LineParser()
    assert parser.close() == []
    assert parser.feed(b"") == []


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_stay_inside_the_piece(separator: str) -> None:
    piece = f"one{separator}two{separator}"
    raw = line(piece)  # ensure_ascii=False: the separator is raw UTF-8 inside the JSON string
    assert separator.encode("utf-8") in raw
    assert parse([raw + line("next")]) == [piece, "next"]
    assert parse(one_byte_chunks(raw + line("next"))) == [piece, "next"]


@pytest.mark.parametrize("text", ["é", "中文", "😀", "a😀é中b"])
def test_multibyte_characters_split_anywhere(text: str) -> None:
    body = line(text) + line(text + text, eol="")
    for cut in range(len(body) + 1):
        assert parse([body[:cut], body[cut:]]) == [text, text + text], cut
    assert parse(one_byte_chunks(body)) == [text, text + text]


def test_empty_message_is_a_piece() -> None:
    assert parse([line("") + line("a") + line("", eol="")]) == ["", "a", ""]


@pytest.mark.parametrize(
    "junk",
    [
        b"nonsense here",
        b"<html><body>hi</body></html>",
        b"{not json",
        b'"just a string"',
        b"[1, 2, 3]",
        b"42",
        b"null",
        b'{"data": {"text": "x"}}',
        b'{"data": {"message": 5}}',
        b'{"data": "message"}',
        b'{"code": 200, "msg": "success", "data": null}',
        b'{"code": 200, "msg": "success", "data": {}}',
        b'{"foo": "bar"}',
    ],
)
def test_lines_without_a_message_are_skipped_and_logged(
    junk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    parser = LineParser()
    assert parse([line("a") + junk + b"\n" + line("b")], parser) == ["a", "b"]
    assert parser.error is None
    records = [r for r in caplog.records if r.name == LOGGER]
    assert records, "a skipped line must be logged"
    assert all(r.levelno == logging.DEBUG for r in records)
    # the log says which line was skipped
    assert junk[:8].decode() in caplog.text


def test_success_envelope_without_data_is_not_an_error() -> None:
    parser = LineParser()
    body = b'{"code":200,"msg":"success","data":null}\n' + line("after")
    assert parse([body], parser) == ["after"]
    assert parser.error is None
    assert not parser.stopped


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (b'{"code": 401, "message": "bad", "data": null}', 401, "bad"),
        (b'{"code": 401, "msg": "bad", "data": null}', 401, "bad"),
        (b'{"code": "429", "msg": "slow down", "data": null}', 429, "slow down"),
        (b'data: {"code": 500, "message": "boom", "data": null}', 500, "boom"),
        (b'{"code": 455, "msg": "limit", "data": null}\r', 455, "limit"),
    ],
)
def test_error_line_stops_the_parse(raw: bytes, code: int, message: str) -> None:
    parser = LineParser()
    got = parser.feed(line("a") + line("b") + raw + b"\n" + line("c"))
    assert got == ["a", "b"]
    assert isinstance(parser.error, ErrorLine)
    assert parser.error.code == code
    assert isinstance(parser.error.code, int)
    assert parser.error.message == message
    assert parser.stopped
    assert parser.feed(line("d")) == []
    assert parser.close() == []


@pytest.mark.parametrize(
    "code", [b"true", b"false", b"[200]", b'{"code": 200}', b"1.5", b'"failed"']
)
def test_a_code_that_is_no_ok_code_makes_an_error_line(code: bytes) -> None:
    """Only a number or a word of OK_CODES says success: JSON's true and false are no numbers
    (False == 0 in Python), and a list or an object is an error line, not a crash."""
    parser = LineParser()
    assert parser.feed(line("a") + b'{"code": ' + code + b', "message": "no"}\n') == ["a"]
    assert isinstance(parser.error, ErrorLine)
    assert parser.error.message == "no"
    assert parser.stopped


@pytest.mark.parametrize("code", [b"0", b"200", b"200.0", b'"ok"', b"null"])
def test_an_ok_code_without_a_piece_is_skipped(code: bytes) -> None:
    parser = LineParser()
    assert parser.feed(b'{"code": ' + code + b"}\n" + line("a")) == ["a"]
    assert parser.error is None


def test_error_line_split_across_feeds_and_as_last_line() -> None:
    raw = b'{"code": 401, "message": "bad", "data": null}'
    for cut in range(len(raw) + 1):
        parser = LineParser()
        assert parser.feed(line("a") + raw[:cut]) == ["a"]
        assert parser.feed(raw[cut:]) == []
        assert parser.close() == []
        assert parser.error is not None
        assert (parser.error.code, parser.error.message) == (401, "bad")


def test_error_line_in_a_later_feed_keeps_earlier_pieces() -> None:
    parser = LineParser()
    assert parser.feed(line("a")) == ["a"]
    assert parser.feed(b'{"code": 429, "msg": "x", "data": null}\n' + line("b")) == []
    assert parser.error is not None
    assert parser.error.code == 429


# -- line length -------------------------------------------------------------------------------


def test_junk_line_longer_than_max_line() -> None:
    parser = LineParser(max_line=16)
    with pytest.raises(ProtocolError):
        parser.feed(b"x" * 40 + b"\n")


def test_chunks_without_newline_beyond_the_limit() -> None:
    parser = LineParser(max_line=16)
    assert parser.feed(b"x" * 10) == []
    with pytest.raises(ProtocolError) as info:
        parser.feed(b"x" * 10)
    assert "16" in str(info.value)


def test_one_chunk_without_newline_beyond_the_limit() -> None:
    parser = LineParser(max_line=16)
    with pytest.raises(ProtocolError):
        parser.feed(b"y" * 17)


def test_valid_line_longer_than_max_line_is_rejected() -> None:
    """A too-long line is a ProtocolError whether or not it parses, and however it is fed."""
    raw = line("z" * 100)
    with pytest.raises(ProtocolError):
        LineParser(max_line=64).feed(raw)
    with pytest.raises(ProtocolError):
        parse(one_byte_chunks(raw), LineParser(max_line=64))


def test_error_line_before_a_too_long_tail_wins() -> None:
    """Lines are handled in order: an error line that came first stops the parse before the
    too-long line after it is seen, whether both arrive in one chunk or in two."""
    error = b'{"code": 401, "message": "bad", "data": null}\n'
    tail = b"x" * 100
    for chunks in ([error + tail], [error, tail]):
        parser = LineParser(max_line=64)
        assert parse(chunks, parser) == []
        assert parser.error is not None
        assert parser.error.code == 401


def test_lines_within_the_limit_pass() -> None:
    raw = line("z" * 10)
    assert parse([raw * 3], LineParser(max_line=len(raw) + 1)) == ["z" * 10] * 3


def test_protocol_error_quotes_the_head_of_the_body() -> None:
    parser = LineParser(max_line=64)
    with pytest.raises(ProtocolError) as info:
        parser.feed(b"<html>" + b"a" * 100)
    assert info.value.body.startswith("<html>")
    assert info.value.body == parser.head


def test_head_holds_the_first_bytes() -> None:
    parser = LineParser()
    parser.feed(b"<ht")
    parser.feed(b"ml>")
    assert parser.head == "<html>"
    parser.feed(b"x" * 50_000 + b"\n")
    assert parser.head.startswith("<html>xxx")
    assert len(parser.head) <= 4096  # a bounded quote, not the whole body


@pytest.mark.parametrize("prefix", [b"", b"data: "])
def test_deeply_nested_json_is_no_crash(prefix: bytes) -> None:
    """Only ProtocolError may come out of the parser; deep nesting is just a line that is no message."""
    parser = LineParser()
    try:
        pieces = parse([line("a") + prefix + b"[" * 100_000 + b"\n" + line("b")], parser)
    except ProtocolError:
        return
    assert pieces == ["a", "b"]


# -- properties --------------------------------------------------------------------------------

SPECIAL = ["\n", "\r", "\u2028", "\u2029", "\u0085", '"', "\\", "é", "中", "😀", "\x00", " "]
piece_text = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL)), max_size=12
)


@st.composite
def encoded_reply(draw: st.DrawFn) -> tuple[list[str], bytes]:
    pieces = draw(st.lists(piece_text, max_size=8))
    body = b""
    for piece in pieces:
        body += draw(st.sampled_from([b"", b"", b"\n", b"\r\n", b"\n\r\n"]))
        eol = draw(st.sampled_from(["\n", "\r\n"]))
        prefix = draw(st.sampled_from(["", "data: ", "data:"]))
        body += line(piece, eol=eol, prefix=prefix)
    body += draw(st.sampled_from([b"", b"", b"[DONE]\n", b"data: [DONE]\r\n", b"data: [DONE]"]))
    if draw(st.booleans()) and body.endswith(b"\n") and not body.endswith(b"\n\n"):
        body = body.rstrip(b"\r\n")  # the last line without its newline
    return pieces, body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=encoded_reply(), data=st.data())
def test_every_split_gives_the_same_pieces(
    reply: tuple[list[str], bytes], data: st.DataObject
) -> None:
    pieces, body = reply
    assert parse([body]) == pieces
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20), label="cuts")
    assert parse(split_at(body, cuts)) == pieces


@settings(max_examples=60, deadline=None)
@given(reply=encoded_reply())
def test_one_byte_chunks_give_the_same_pieces(reply: tuple[list[str], bytes]) -> None:
    pieces, body = reply
    assert parse(one_byte_chunks(body)) == pieces


Outcome = Union[tuple[str], tuple[str, list[str], Optional[ErrorLine]]]


def outcome(chunks: list[bytes], max_line: Optional[int] = None) -> Outcome:
    parser = LineParser() if max_line is None else LineParser(max_line=max_line)
    try:
        pieces = parse(chunks, parser)
    except ProtocolError:
        return ("protocol error",)
    return ("ok", pieces, parser.error)


FRAGMENTS = [
    line("a"),
    line("b", eol="\r\n"),
    line("é中😀", prefix="data: "),
    line("\u2028"),
    b'{"code": 401, "message": "bad", "data": null}\n',
    b'{"code": "429", "msg": "x", "data": null}',
    b'{"code":200,"msg":"success","data":null}\n',
    b"data: [DONE]\n",
    b"\n",
    b"\r\n",
    b"data: ",
    b"{",
    b"}",
    b'"',
    "é".encode(),
    "😀".encode()[:2],
]
body_bytes = st.lists(
    st.one_of(st.binary(max_size=24), st.sampled_from(FRAGMENTS)), max_size=12
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(body=body_bytes, data=st.data())
def test_any_bytes_any_split_same_outcome(body: bytes, data: st.DataObject) -> None:
    whole = outcome([body])
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20), label="cuts")
    assert outcome(split_at(body, cuts)) == whole


@settings(max_examples=300, deadline=None)
@given(body=body_bytes, data=st.data())
def test_any_bytes_any_split_same_outcome_with_a_small_max_line(
    body: bytes, data: st.DataObject
) -> None:
    """The line limit too is independent of how the bytes arrive."""
    whole = outcome([body], max_line=48)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20), label="cuts")
    assert outcome(split_at(body, cuts), max_line=48) == whole


# Reply lines as text, end to end.


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
