"""The chunked decoder (``_transport._dechunk``) on bytes, split anywhere.

Its fast path (whole chunks in one read) and its careful path (parts, extensions, LF-only line
ends, the last chunk, trailers) must give the same data and the same errors wherever the reads
split the body. A simple whole-body decoder written here is the reference.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aichatonline_sync._wire.errors import ProtocolError
from aichatonline_sync._wire.framing import BodyTruncated
from aichatonline_sync._wire.framing import dechunk as _dechunk


def reference(body: bytes) -> bytes:
    """Decode a complete, valid chunked body in one go (the test's oracle)."""
    out = []
    pos = 0
    while True:
        nl = body.index(b"\n", pos)
        size = int(body[pos:nl].split(b";", 1)[0].strip(), 16)
        pos = nl + 1
        if size == 0:
            return b"".join(out)
        out.append(body[pos : pos + size])
        pos += size
        pos += 2 if body[pos : pos + 2] == b"\r\n" else 1


def decode(body: bytes, cuts: list[int]) -> tuple[list[bytes], BaseException | None]:
    """De-chunk ``body`` read in the pieces that ``cuts`` make; the data yielded and the error."""
    bounds = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)])]
    it = iter(pieces)
    got: list[bytes] = []
    try:
        for data in _dechunk(lambda n: next(it, b"")):
            assert data  # never an empty block
            got.append(data)
    except (BodyTruncated, ProtocolError) as exc:
        return got, exc
    return got, None


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid chunked body, and where its last chunk ("0" line) begins."""
    parts = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=10)):
        size = format(len(data), draw(st.sampled_from(["x", "X", "04x"])))
        ext = draw(st.sampled_from(["", "", ";name=value", " ; x"]))
        head_end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        data_end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        parts.append(size.encode() + ext.encode() + head_end + data + data_end)
    trailers = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
    chunks = b"".join(parts)
    return chunks + b"0\r\n" + trailers + b"\r\n", len(chunks)


cut_lists = st.lists(st.integers(min_value=0, max_value=600), max_size=12)


@settings(max_examples=400, deadline=None)
@given(chunked_bodies(), cut_lists)
def test_any_split_gives_the_reference_data(made: tuple[bytes, int], cuts: list[int]) -> None:
    body, _ = made
    got, error = decode(body, cuts)
    assert error is None
    assert b"".join(got) == reference(body)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), cut_lists, st.data())
def test_a_truncated_body_hands_out_a_prefix_then_raises(
    made: tuple[bytes, int], cuts: list[int], data: st.DataObject
) -> None:
    body, last = made
    # Cut before the end of the last chunk's line ("0\r\n"): a close after it ends the body.
    end = data.draw(st.integers(min_value=0, max_value=last + 2))
    got, error = decode(body[:end], cuts)
    assert isinstance(error, BodyTruncated)
    assert reference(body).startswith(b"".join(got))


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), cut_lists, st.sampled_from([b"zz", b"-1", b"1x", b"\x00"]))
def test_a_bad_size_is_a_protocol_error_after_the_data_before_it(
    made: tuple[bytes, int], cuts: list[int], bad: bytes
) -> None:
    body, last = made  # a chunk with a bad size line goes in before the last chunk
    broken = body[:last] + bad + b"\r\nabc\r\n" + body[last:]
    got, error = decode(broken, cuts)
    assert isinstance(error, ProtocolError)
    assert b"".join(got) == reference(body)


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
        (b"5\nhello\n0\n\n", b"hello"),
        (b"A\r\n0123456789\r\n0\r\nExpires: never\r\n\r\n", b"0123456789"),
        (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n0\r\n", b"hello"),  # the server closed right after the last chunk
    ],
)
def test_examples(body: bytes, data: bytes) -> None:
    for cut in range(len(body) + 1):
        got, error = decode(body, [cut])
        assert error is None, cut
        assert b"".join(got) == data


def test_no_crlf_after_the_data_is_a_protocol_error() -> None:
    got, error = decode(b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n", [])
    assert isinstance(error, ProtocolError)
    assert b"".join(got) == b"hello"


def test_whole_chunks_of_one_read_come_out_as_one_block() -> None:
    body = b"".join(b"3\r\n%d%d%d\r\n" % (i, i, i) for i in range(10)) + b"0\r\n\r\n"
    got, error = decode(body, [])
    assert error is None
    assert got == [b"".join(b"%d%d%d" % (i, i, i) for i in range(10))]
