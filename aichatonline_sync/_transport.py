"""The transport: the one place that turns ``requests``/``urllib3``/socket errors into ours, and the
read loop that hands reply bytes out as soon as they arrive, whatever the HTTP framing.

Why a read loop of our own (see STREAMING.md): requests' ``iter_lines()`` holds lines back on
Content-Length and close-delimited bodies and on gzip, ``iter_content(None)`` reads whole bodies, and
``raw.read1`` is slow on one-line chunks and missing from urllib3 1.26. So, on a real connection, we
read the socket's buffered reader with ``read1`` (one system call, whatever has arrived), de-chunk
ourselves (every complete chunk of one read at once), and decode gzip/deflate incrementally.
"""

from __future__ import annotations

import http.client
import logging
import socket
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

import requests
import urllib3

from ._config import redact_url
from ._errors import (
    AiChatOnlineError,
    APIConnectionError,
    APITimeoutError,
    InvalidRequestError,
    ProtocolError,
)

__all__ = ["BodyTruncated", "DeadlineExceeded", "iter_body", "scrub", "translate_exception"]

logger = logging.getLogger("aichatonline_sync")

_READ_SIZE = 65536
_MAX_DECODED = 1 << 20  # the most bytes one decode step may produce
_MAX_CHUNK_LINE = 4096


class BodyTruncated(Exception):
    """The body ended before its framing said it would (internal)."""


class DeadlineExceeded(Exception):
    """The total deadline of a chat passed (internal)."""


def scrub(text: str, secrets: Iterable[Optional[str]]) -> str:
    """Remove every secret (token, proxy password) from ``text``."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while True:
        inner: Optional[BaseException] = None
        if exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException):
            inner = reason
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(exc))
        exc = inner


def translate_exception(
    exc: BaseException,
    *,
    url: str,
    secrets: Iterable[Optional[str]] = (),
    timeout: Optional[float] = None,
    proxy: Optional[str] = None,
) -> AiChatOnlineError:
    """Turn a ``requests``, ``urllib3`` or socket exception into one of ours (the one place that does).

    The caller raises the result ``from exc``. Messages name the URL without credentials and never
    contain a token or proxy password.
    """
    if isinstance(exc, AiChatOnlineError):
        return exc
    shown = redact_url(url)
    cause = scrub(str(_root_cause(exc)), secrets)
    if isinstance(exc, DeadlineExceeded):
        return APITimeoutError(f"the total deadline passed while waiting for {shown}", url=shown)
    if isinstance(exc, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)) or (
        proxy is not None and proxy.startswith("socks") and _via_socks(exc)
    ):
        where = f" {redact_url(proxy)}" if proxy else ""
        return APIConnectionError(
            f"could not reach {shown} through the proxy{where}: {cause}. "
            "Check the proxy URL, its user name and password, and that the proxy is running.",
            url=shown,
        )
    if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
        verify_failed = "CERTIFICATE_VERIFY_FAILED" in cause or "certificate verify failed" in cause
        return APIConnectionError(
            f"TLS failed for {shown}: {cause}. If the server's certificate is signed by your own "
            "CA, pass verify='/path/to/ca-bundle.pem'.",
            url=shown,
            retryable=not verify_failed,  # a certificate does not get better by asking again
        )
    timed_out = isinstance(
        exc,
        (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout),
    )
    if timed_out:
        after = f" after {timeout:g} s" if timeout else ""
        what = (
            "connecting to"
            if isinstance(
                exc, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
            )
            else "waiting for"
        )
        return APITimeoutError(f"timed out {what} {shown}{after}", url=shown)
    if isinstance(exc, (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL)):
        return InvalidRequestError(f"invalid request to {shown}: {cause}")
    if isinstance(exc, BodyTruncated):
        return APIConnectionError(
            f"the connection to {shown} closed before the reply was complete ({cause})", url=shown
        )
    if isinstance(
        exc,
        (
            requests.exceptions.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ),
    ):
        return APIConnectionError(_connection_message(shown, exc, cause), url=shown)
    return APIConnectionError(
        f"request to {shown} failed: {type(exc).__name__}: {cause}", url=shown
    )


def _via_socks(exc: BaseException) -> bool:
    """Did ``exc`` happen while opening a connection through a SOCKS proxy?"""
    seen: set[int] = set()
    item: Optional[BaseException] = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if type(item).__module__.split(".")[0] == "socks":
            return True
        if isinstance(item, (urllib3.exceptions.NewConnectionError, requests.exceptions.ConnectionError)):
            return True  # with a SOCKS proxy, every connection is opened by the proxy
        nxt = _root_cause(item)
        item = nxt if nxt is not item else (item.__cause__ or item.__context__)
    return False


def _connection_message(shown: str, exc: BaseException, cause: str) -> str:
    root = _root_cause(exc)
    chain = [root, *(getattr(root, attr, None) for attr in ("__cause__", "__context__"))]
    if any(isinstance(item, ConnectionRefusedError) for item in chain) or "Connection refused" in cause:
        return (
            f"could not connect to {shown}: connection refused. Is the service (or the emulator) "
            "running, and is the URL right?"
        )
    if any(isinstance(item, socket.gaierror) for item in chain) or "Name or service not known" in cause:
        return f"could not connect to {shown}: the host name does not resolve ({cause})"
    if any(isinstance(item, ConnectionResetError) for item in chain):
        return f"the connection to {shown} was reset by the server before the reply ({cause})"
    return f"connection to {shown} failed: {cause}"


# --- decoding ---------------------------------------------------------------------------------


class _Decoder:
    """Incremental, bounded Content-Encoding decoder (gzip with several members, deflate).

    Each call hands out at most ``_MAX_DECODED`` bytes at a time, so a small, highly compressed
    body (a decompression bomb) never expands in one go: the parser's line limit then stops it.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._gzip = encoding in ("gzip", "x-gzip")
        self._obj: Any = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)
        self._first = not self._gzip

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            if self._first:
                self._first = False
                try:
                    out = self._obj.decompress(data, _MAX_DECODED)
                except zlib.error:  # raw deflate, as some servers send
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                else:
                    if out:
                        yield out
                    data = self._obj.unconsumed_tail
            while data:
                obj = self._obj
                backup = obj.copy()
                try:
                    out = obj.decompress(data, _MAX_DECODED)
                except zlib.error:
                    salvaged = _salvage(backup, data)
                    if salvaged:  # hand out what decoded before the bad bytes, then fail
                        yield salvaged
                    raise
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
        try:
            return bytes(self._obj.flush())
        except zlib.error:
            return b""


def _salvage(obj: Any, data: bytes) -> bytes:
    """What ``obj`` decodes from ``data`` before the first byte that breaks it (error path only)."""
    out = []
    size = 0
    for i in range(len(data)):
        try:
            piece = obj.decompress(data[i : i + 1], _MAX_DECODED - size)
        except zlib.error:
            break
        out.append(piece)
        size += len(piece)
        if size >= _MAX_DECODED:
            break
    return b"".join(out)


def make_decoder(content_encoding: Optional[str]) -> Optional[_Decoder]:
    """The decoder for a ``Content-Encoding`` header, ``None`` for identity.

    :raises ProtocolError: an encoding this client does not decode (it never asks for one).
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Decoder(encoding)
    raise ProtocolError(
        f"the reply uses Content-Encoding: {content_encoding!r}, which this client does not "
        "decode (it only asks for gzip and deflate)"
    )


# --- framing ----------------------------------------------------------------------------------


def _dechunk(read1: Callable[[int], bytes]) -> Iterator[bytes]:
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
        more = read1(_READ_SIZE)
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
            # Fast path: the whole chunks ("SIZE\r\nDATA\r\n", no extension) from here on. Any
            # other case (a part, an extension, the last chunk, bad framing) stops it, and the
            # careful steps below take over at the same place.
            while True:
                nl = find(b"\n", pos)
                if nl < 0:
                    break
                try:
                    size = int(buf[pos:nl], 16)
                except ValueError:
                    break
                if size <= 0:
                    break
                start = nl + 1
                stop = start + size
                if buf[stop : stop + 2] != b"\r\n":
                    break
                append(buf[start:stop])
                pos = stop + 2
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
                    f"malformed chunked encoding: bad chunk size {size_field[:20]!r}"
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


def _read_trailers(read1: Callable[[int], bytes], buf: bytes) -> None:
    """Consume the trailer section after the last chunk, up to and including its empty line."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > 65536:
                raise ProtocolError("malformed chunked encoding: trailers too long")
            more = read1(_READ_SIZE)
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


def iter_body(
    response: requests.Response,
    *,
    deadline: Optional[float] = None,
    read_timeout: Optional[float] = None,
) -> Iterator[bytes]:
    """Yield the decoded bytes of a streamed reply as they arrive, in every framing.

    On a normal end the connection goes back to the pool (or is closed when the server said so).
    ``deadline`` (a :func:`time.monotonic` value) bounds every blocking read.

    :raises BodyTruncated: the body ended early.
    :raises DeadlineExceeded: the total deadline passed.
    :raises ProtocolError: bad chunked framing or content encoding.
    :raises OSError: socket errors and timeouts, as raised by the socket.
    """
    raw = response.raw
    decoder = make_decoder(response.headers.get("Content-Encoding"))
    fp = getattr(raw, "_fp", None)
    reader = getattr(fp, "fp", None) if isinstance(fp, http.client.HTTPResponse) else None
    if fp is None or reader is None or not hasattr(reader, "read1"):
        yield from _iter_generic(raw)
        return
    assert isinstance(fp, http.client.HTTPResponse)
    read1 = reader.read1
    if deadline is not None:
        read1 = _deadline_read1(read1, raw, deadline, read_timeout)
    if fp.chunked:
        source = _dechunk(read1)
    else:
        source = _read_plain(fp, read1)
    if decoder is None:
        yield from source
    else:
        decode = decoder.decode
        for data in source:
            yield from decode(data)
        tail = decoder.flush()
        if tail:
            yield tail
    # The body is complete: hand the connection back for reuse (http.client must see it closed).
    will_close = fp.will_close
    fp.close()
    if will_close:
        response.close()
    else:
        raw.release_conn()


def _read_plain(fp: http.client.HTTPResponse, read1: Callable[[int], bytes]) -> Iterator[bytes]:
    """A Content-Length or close-delimited body, read with one system call at a time."""
    length = fp.length
    if length is None:
        while True:
            data = read1(_READ_SIZE)
            if not data:
                return
            yield data
    while length:
        data = read1(length if length < _READ_SIZE else _READ_SIZE)
        if not data:
            fp.length = length
            raise BodyTruncated(f"{length} bytes of the Content-Length never arrived")
        length -= len(data)
        yield data
    fp.length = 0


def _deadline_read1(
    read1: Callable[[int], bytes], raw: Any, deadline: float, read_timeout: Optional[float]
) -> Callable[[int], bytes]:
    """Wrap ``read1`` so that no read waits past ``deadline`` (shortening the socket timeout)."""
    connection = getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    shortened = False

    def read(n: int) -> bytes:
        nonlocal shortened
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        if sock is not None and (read_timeout is None or remaining < read_timeout):
            sock.settimeout(remaining)
            shortened = True
        try:
            return read1(n)
        except socket.timeout:
            if shortened and deadline - time.monotonic() <= 0.001:
                raise DeadlineExceeded() from None
            raise

    return read


def _iter_generic(raw: Any) -> Iterator[bytes]:
    """Any other transport (a mock, a custom adapter): urllib3's own reads and decoding."""
    if hasattr(raw, "read1"):
        while True:
            data = raw.read1(_READ_SIZE, decode_content=True)
            if not data:
                break
            yield data
    else:
        yield from raw.stream(_READ_SIZE, decode_content=True)
    raw.release_conn()
