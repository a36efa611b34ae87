"""Reply bodies, from bytes on the wire to decoded bytes: chunked framing and Content-Encoding.

Pure: the de-chunker reads through a ``read1(n)`` callable it is given, and the decoder works on the
bytes it is fed, so both are tested on byte fixtures split every possible way (tests/test_dechunk.py).
The transport (``_transport/transport.py``) plugs them onto a connection.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

from .errors import ProtocolError

__all__ = [
    "DECODE_STEP",
    "EXPANSION_FLOOR",
    "MAX_EXPANSION",
    "READ_SIZE",
    "BodyTruncated",
    "Decoder",
    "dechunk",
    "make_decoder",
]

#: The most bytes asked of one read.
READ_SIZE = 65536
#: The most bytes one decode step produces: as much as one socket read. The transport checks
#: the total deadline and the chat's :class:`~aichatonline_sync.Cancellation` between steps, and
#: the parser reads one step in a few milliseconds for real replies and in about 0.15 s for
#: lines built to be slow (each different, each a JSON parse that fails), so a deadline holds
#: to well within 0.5 s however far the body expands.
DECODE_STEP = READ_SIZE
#: How far a compressed body may expand: past :data:`EXPANSION_FLOOR` decoded bytes, no more
#: than this many times the compressed bytes decoded so far (a :class:`ProtocolError` beyond).
#: Chat lines of ordinary text compressed as one gzip stream shrink under 10 times, a reply
#: that repeats itself about 100 times; deflate cannot exceed about 1,030 times, which bodies
#: of blank or identical lines (bombs) reach.
MAX_EXPANSION = 200
#: Decoded bytes that any ratio may reach: well above a real reply and above the longest line
#: the parser accepts by default (1 MiB), so only a body built to expand is stopped.
EXPANSION_FLOOR = 8 << 20
_MAX_CHUNK_LINE = 4096


class BodyTruncated(Exception):
    """The body ended before its framing said it would (internal; the transport maps it)."""


class Decoder:
    """Incremental, bounded Content-Encoding decoder (gzip with several members, deflate).

    :meth:`decode` hands out at most :data:`DECODE_STEP` bytes at a time, so a small, highly
    compressed body (a decompression bomb) never expands in one go, and stops it with a
    :class:`ProtocolError` once it expands past :data:`MAX_EXPANSION` (beyond
    :data:`EXPANSION_FLOOR`).
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._gzip = encoding in ("gzip", "x-gzip")
        self._obj: Any = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)
        self._first = not self._gzip
        self._fed = False  # some data was fed
        self._consumed = 0  # compressed bytes decoded so far
        self._decoded = 0  # bytes they decoded to

    def _count(self, before: int, obj: Any, out: bytes) -> None:
        """Count one decompress call (``before``: the bytes it was given) against the limit."""
        self._consumed += before - len(obj.unconsumed_tail) - len(obj.unused_data)
        self._decoded += len(out)
        if self._decoded > EXPANSION_FLOOR and self._decoded > MAX_EXPANSION * self._consumed:
            raise ProtocolError(
                f"the reply's {self.encoding} body expands more than {MAX_EXPANSION} times "
                f"({self._decoded} bytes from {self._consumed}), past the limit for bodies over "
                f"{EXPANSION_FLOOR >> 20} MiB: a decompression bomb, not a chat stream"
            )

    def decode(self, data: bytes) -> Iterator[bytes]:
        """Yield the bytes ``data`` decodes to, at most :data:`DECODE_STEP` at a time.

        :raises ProtocolError: ``data`` does not decode in this encoding, expands past
            :data:`MAX_EXPANSION`, or follows the end of a deflate stream.
        """
        if data:
            self._fed = True
        try:
            if self._first:
                self._first = False
                try:
                    out = self._obj.decompress(data, DECODE_STEP)
                except zlib.error:  # raw deflate, as some servers send
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                else:
                    self._count(len(data), self._obj, out)
                    if out:
                        yield out
                    data = self._obj.unconsumed_tail
            while data:
                obj = self._obj
                backup = obj.copy()
                try:
                    out = obj.decompress(data, DECODE_STEP)
                except zlib.error:
                    salvaged = _salvage(backup, data)
                    if salvaged:  # hand out what decoded before the bad bytes, then fail
                        yield salvaged
                    raise
                self._count(len(data), obj, out)
                data = obj.unconsumed_tail
                if obj.eof and obj.unused_data:
                    if not self._gzip:
                        raise ProtocolError("the deflate body has data after its end")
                    data = obj.unused_data  # the next gzip member
                    self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
                if out:
                    yield out
        except zlib.error as exc:
            raise ProtocolError(
                f"the reply says Content-Encoding: {self.encoding} but its body does not decode "
                f"as such ({exc})"
            ) from exc

    def flush(self) -> bytes:
        """The last decoded bytes, at the end of the body.

        :raises BodyTruncated: the compressed data stopped before its end (a gzip member without
            its trailer, a deflate stream without its last block): the body was cut short, even
            if its framing ended normally.
        """
        try:
            tail = bytes(self._obj.flush())
        except zlib.error:
            tail = b""
        if self._fed and not self._obj.eof:
            raise BodyTruncated(f"the {self.encoding} data of the body stopped before its end")
        return tail


def _salvage(obj: Any, data: bytes) -> bytes:
    """What ``obj`` decodes from ``data`` before the first byte that breaks it (error path only)."""
    out = []
    size = 0
    for i in range(len(data)):
        try:
            piece = obj.decompress(data[i : i + 1], DECODE_STEP - size)
        except zlib.error:
            break
        out.append(piece)
        size += len(piece)
        if size >= DECODE_STEP:
            break
    return b"".join(out)


def make_decoder(content_encoding: Optional[str]) -> Optional[Decoder]:
    """The decoder for a ``Content-Encoding`` header, ``None`` for identity.

    :raises ProtocolError: an encoding this client does not decode (it never asks for one).
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return Decoder(encoding)
    raise ProtocolError(
        f"the reply uses Content-Encoding: {content_encoding!r}, which this client does not "
        "decode (it only asks for gzip and deflate)"
    )


def dechunk(read1: Callable[[int], bytes]) -> Iterator[bytes]:
    """De-chunk a ``Transfer-Encoding: chunked`` body read from a buffered socket reader.

    Yields the data of every chunk completed (or begun) by one read, joined, as soon as it is read.
    Returns after the last chunk and its trailers; raises :class:`BodyTruncated` on a short body
    and :class:`ProtocolError` on bad framing (after handing out the data before it).
    """
    buf = b""
    pos = 0
    state = [0, False]  # bytes of chunk data still due; a CRLF due after a chunk's data
    while True:
        out: list[bytes] = []
        try:
            pos, done = _parse_chunks(buf, pos, state, out)
        except ProtocolError:
            if out:
                yield b"".join(out)
            raise
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
        if done:
            _read_trailers(read1, buf[pos:])
            return
        more = read1(READ_SIZE)
        if not more:
            raise BodyTruncated("chunked body ended without its last chunk")
        buf = buf[pos:] + more if pos < len(buf) else more
        pos = 0


def _parse_chunks(buf: bytes, pos: int, state: list[Any], out: list[bytes]) -> tuple[int, bool]:
    """Parse the chunks in ``buf`` from ``pos`` on, appending their data to ``out``.

    ``state`` is ``[left, need_crlf]``, carried from one read to the next.

    :returns: ``(pos, done)``: where parsing stopped, and whether the last chunk was seen.
    """
    left, need_crlf = state
    end = len(buf)
    find = buf.find
    append = out.append
    try:
        while True:
            if left:
                if pos >= end:
                    return pos, False
                take = left if left <= end - pos else end - pos
                append(buf[pos : pos + take])
                pos += take
                left -= take
                if left:
                    return pos, False
                need_crlf = True
            if need_crlf:
                if buf[pos : pos + 2] == b"\r\n":
                    pos += 2
                elif buf[pos : pos + 1] == b"\n":
                    pos += 1
                elif end - pos < 2:
                    return pos, False
                else:
                    raise ProtocolError("malformed chunked encoding: no CRLF after a chunk")
                need_crlf = False
            pos = _whole_chunks(buf, pos, append)
            nl = find(b"\n", pos)
            if nl < 0:
                if end - pos > _MAX_CHUNK_LINE:
                    raise ProtocolError("malformed chunked encoding: chunk-size line too long")
                return pos, False
            size_field = buf[pos:nl].split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise ProtocolError(
                    "malformed chunked encoding: bad chunk size "
                    f"'{size_field[:20].decode('ascii', 'backslashreplace')}'"
                ) from None
            if size < 0:
                raise ProtocolError("malformed chunked encoding: negative chunk size")
            pos = nl + 1
            if size == 0:
                return pos, True
            left = size
    finally:
        state[0] = left
        state[1] = need_crlf


def _whole_chunks(buf: bytes, pos: int, append: Callable[[bytes], None]) -> int:
    """The fast path: append the data of the whole chunks (``SIZE\\r\\nDATA\\r\\n``, no
    extension) from ``pos`` on, and return where they end. Any other case (a part, an extension,
    the last chunk, bad framing) stops it, and the careful steps take over at the same place."""
    find = buf.find
    while True:
        nl = find(b"\n", pos)
        if nl < 0:
            return pos
        try:
            size = int(buf[pos:nl], 16)
        except ValueError:
            return pos
        if size <= 0:
            return pos
        start = nl + 1
        stop = start + size
        if buf[stop : stop + 2] != b"\r\n":
            return pos
        append(buf[start:stop])
        pos = stop + 2


def _read_trailers(read1: Callable[[int], bytes], buf: bytes) -> None:
    """Consume the trailer section after the last chunk, up to and including its empty line."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > 65536:
                raise ProtocolError("malformed chunked encoding: trailers too long")
            more = read1(READ_SIZE)
            if not more:
                # The server closed right after the last chunk: the body is complete.
                return
            buf = buf[pos:] + more
            pos = 0
            continue
        line = buf[pos:nl].strip()
        pos = nl + 1
        if not line:
            return
