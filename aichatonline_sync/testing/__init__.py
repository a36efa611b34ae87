"""An offline emulator of the AiChatOnline service, for tests and for use without a network.

:class:`Emulator` is a real HTTP/1.1 server (standard library only) on the loopback interface that
speaks the upstream's protocol:

1. ``GET /api/v1/user/getUniqueId?canvas=-xxxxxxxxxx`` answers
   ``{"code": 200, "msg": "success", "data": "<32 lowercase hex chars>"}``; the emulator remembers
   the tokens it handed out.
2. ``POST /aichatonline/api/chat/gpt`` with the header ``UniqueId: <token>`` and the JSON body
   ``{"conversationId": "...", "prompt": "..."}`` streams one line per reply piece,
   ``{"code": 200, "msg": "success", "data": {"message": "<piece>"}}``, with the chosen HTTP framing
   (``"chunked"``, ``"length"`` or ``"close"``), optionally gzip-compressed, each line written as
   soon as it is due.

A missing or unknown ``UniqueId`` is answered with HTTP 401 (unless ``require_token=False``); a body
that is not JSON or has no string ``prompt`` with HTTP 400; an unknown path with 404; a wrong method
with 405.

Faults (:meth:`Emulator.fail`, :meth:`~Emulator.error_line`, :meth:`~Emulator.drop`,
:meth:`~Emulator.stall`, :meth:`~Emulator.html`, :meth:`~Emulator.token_reply`,
:meth:`~Emulator.raw_reply`) are queued per endpoint (``"token"`` or ``"chat"``) and answer the
next requests to that endpoint in FIFO order, each ``times`` times. A queued fault answers the next
request to its endpoint whatever that request carries: the token and body checks are skipped for it.
:meth:`Emulator.reset` clears them.

Requests are recorded (:attr:`Emulator.requests`, a list of :class:`RecordedRequest` whose
header names are lower-cased): the last ``max_records`` of them (default
:data:`DEFAULT_MAX_RECORDS`), or none with ``record=False``, so that an emulator that runs for days
(``aichatonline serve``) keeps a flat memory. The counters (:attr:`~Emulator.request_count`,
:attr:`~Emulator.connections`, :attr:`~Emulator.tokens_issued`) count everything.

Example::

    from aichatonline_sync.testing import Emulator

    with Emulator(reply=["Hel", "lo"]) as emu:
        ...  # talk to emu.url
        assert emu.tokens_issued == 1
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import secrets
import selectors
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO, Callable, Union
from urllib.parse import parse_qsl, urlsplit

from .._client.config import check_bool, check_int
from .._wire import redact as _redact
from .._wire.errors import InvalidRequestError
from .._wire.protocol import CHAT_PATH, TOKEN_PATH, error_json, piece_line, token_reply
from . import faults as _faults
from .faults import (
    DEFAULT_CONTENT_TYPE,
    FRAMINGS,
    Drop,
    ErrorLine,
    Fault,
    FaultQueue,
    Raw,
    Reply,
    Stall,
    check_content_type,
    check_headers,
    check_seconds,
    phrase,
    split_pieces,
)

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
    termios = None  # type: ignore[assignment]

__all__ = [
    "CHAT_PATH",
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_MAX_RECORDS",
    "MAX_TOKENS",
    "TOKEN_PATH",
    "Emulator",
    "RecordedRequest",
    "ReplySpec",
    "default_reply",
    "split_pieces",
]

logger = _redact.logger("aichatonline_sync.testing")

#: How many requests an emulator keeps in :attr:`Emulator.requests` unless ``max_records=`` says
#: otherwise (the oldest are dropped first).
DEFAULT_MAX_RECORDS = 1_000

#: How many of the tokens handed out stay valid (and listed in :attr:`Emulator.issued_tokens`):
#: the oldest expire first, as a real service's would; a client then fetches a fresh one.
MAX_TOKENS = 10_000

#: What ``reply=`` accepts.
ReplySpec = Union[None, str, Callable[[str], str], Iterable[str]]

_MAX_LINE = 65536
_MAX_HEADERS = 200
_MAX_BODY = 64 * 1024 * 1024
_BATCH_BYTES = 64 * 1024
_STOP_JOIN_SECONDS = 1.0
_DRAIN_SECONDS = 2.0
_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)



def default_reply(prompt: str) -> str:
    """The reply text the emulator gives when no ``reply=`` was set.

    :param prompt: the prompt of the chat request.
    :returns: a deterministic text of a couple of sentences that quotes the prompt.
    """
    return (
        f'Hello! This is the AiChatOnline emulator. You said: "{prompt}". '
        "This reply is streamed word by word, one line per piece."
    )


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received, as received.

    :ivar method: the request method, e.g. ``"GET"``.
    :ivar path: the path without the query string.
    :ivar query: the query parameters (the last value wins for a repeated name).
    :ivar headers: the request headers, names lower-cased (repeated headers joined with ``", "``).
    :ivar body: the raw request body.
    :ivar json: the body parsed as JSON, or None if it is empty or not JSON.
    :ivar endpoint: ``"token"`` (a GET of the token path), ``"chat"`` (a POST to the chat path) or
        ``"other"``.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    endpoint: str

    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header, looked up case-insensitively.

        :param name: the header name, in any case.
        :param default: what to return when the header was not sent.
        :returns: the header value, or ``default``.
        """
        return self.headers.get(name.lower(), default)

    @property
    def prompt(self) -> str | None:
        """The ``prompt`` of a chat request body, or None."""
        if isinstance(self.json, dict):
            value = self.json.get("prompt")
            if isinstance(value, str):
                return value
        return None

    @property
    def unique_id(self) -> str | None:
        """The ``UniqueId`` header (the token), or None."""
        return self.headers.get("uniqueid")


@dataclasses.dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Gone(Exception):
    """The client went away (or the emulator is stopping) in the middle of a request."""


# What to do with a connection after a reply.
_KEEP = "keep"
_CLOSE = "close"  # graceful: FIN after the data
_ABORT = "abort"  # RST


class Emulator:
    """A local HTTP server that speaks the AiChatOnline protocol.

    :param reply: None for :func:`default_reply` of the prompt; a str (streamed as
        :func:`split_pieces` of it); a callable taking the prompt and returning a str (split the
        same way); or any other iterable of str, each item being exactly one piece (an iterator is
        read once, here, and its pieces reused for every chat).
    :param chunk_delay: seconds to wait before every piece but the first.
    :param framing: ``"chunked"`` (one HTTP chunk per line), ``"length"`` (Content-Length) or
        ``"close"`` (the body ends when the connection closes).
    :param gzip: compress chat replies (``Content-Encoding: gzip``), flushed after every line so
        that each line can be decoded as soon as it arrives.
    :param host: the address to listen on.
    :param port: the port to listen on (0 picks a free one).
    :param content_type: the ``Content-Type`` of chat replies.
    :param require_token: answer chats with a missing or unknown ``UniqueId`` with HTTP 401.
    :param before_piece: called in the server thread with the index (from 0) of each reply piece
        just before it is written (not for an error line); it may block. Also the public attribute
        ``before_piece``.
    :param ssl_context: a server-side :class:`ssl.SSLContext` to speak HTTPS.
    :param reply_headers: extra headers of chat replies, e.g. ``{"X-Accel-Buffering": "no"}`` to
        see what a proxy in front does with it.
    :param record: keep :class:`RecordedRequest` records (``False``: none; the counters still count).
    :param max_records: keep the last this many records (``None``: every one, for short tests only).
    :raises ValueError: for an invalid argument.
    """

    def __init__(
        self,
        *,
        reply: ReplySpec = None,
        chunk_delay: float = 0.0,
        framing: str = "chunked",
        gzip: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        content_type: str = DEFAULT_CONTENT_TYPE,
        require_token: bool = True,
        before_piece: Callable[[int], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reply_headers: Mapping[str, str] | None = None,
        record: bool = True,
        max_records: int | None = DEFAULT_MAX_RECORDS,
    ) -> None:
        check_bool("record", record)
        if max_records is not None:
            check_int("max_records", max_records, low=1)
        if framing not in FRAMINGS:
            raise InvalidRequestError(
                f"framing must be one of {', '.join(map(repr, FRAMINGS))}, not {framing!r}"
            )
        delay = check_seconds(chunk_delay, "chunk_delay")
        if not isinstance(host, str):
            raise InvalidRequestError(f"host must be a str, not {host!r}")
        check_int("port", port, low=0, high=65535)
        check_content_type(content_type)
        if before_piece is not None and not callable(before_piece):
            raise InvalidRequestError(
                f"before_piece must be callable or None, not {before_piece!r}"
            )
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise InvalidRequestError(
                f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}"
            )

        self._lock = threading.Lock()
        self._reply_kind = "default"
        self._reply_func: Callable[[str], str] | None = None
        self._static_pieces: tuple[str, ...] = ()
        self._static_lines: list[bytes] | None = None
        self._static_gzip: list[bytes] | None = None
        self.set_reply(reply)

        self._chunk_delay = delay or 0.0
        self._framing = framing
        self._gzip = check_bool("gzip", gzip)
        self._bind_host = host
        self._bind_port = port
        self._content_type = content_type
        self._reply_headers = check_headers(reply_headers)
        #: Whether chats need a valid ``UniqueId`` (may be changed at any time).
        self.require_token = check_bool("require_token", require_token)
        #: Called with each piece index before the piece is written (may be changed at any time).
        self.before_piece: Callable[[int], None] | None = before_piece
        self._ssl_context = ssl_context

        self._recording = record
        self._requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=max_records if record else 0
        )
        self._request_count = 0
        self._faults = FaultQueue()
        self._connections = 0
        self._tokens_issued = 0
        self._valid_tokens: dict[str, None] = {}  # (in the order issued: the oldest expire first)
        self._issued: collections.deque[str] = collections.deque(maxlen=MAX_TOKENS)

        self._stop = threading.Event()
        self._started = False
        self._stopped = False
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._address: tuple[str, int] | None = None

    # ----------------------------------------------------------------- configuration

    def set_reply(self, reply: ReplySpec) -> None:
        """Change what the following chats reply (same values as ``reply=`` of the constructor).

        :param reply: None, a str, a callable taking the prompt and returning a str, or an iterable
            of str pieces.
        :raises InvalidRequestError: (a ``ValueError``) for any other value.
        """
        func: Callable[[str], str] | None = None
        pieces: tuple[str, ...] = ()
        if reply is None:
            kind = "default"
        elif callable(reply) and not isinstance(reply, (str, bytes, bytearray, Mapping)):
            kind = "callable"
            func = reply
        else:
            kind = "static"
            pieces = tuple(_faults.reply_pieces(reply))
        with self._lock:
            self._reply_kind = kind
            self._reply_func = func
            self._static_pieces = pieces
            self._static_lines = None
            self._static_gzip = None

    def pieces_for(self, prompt: str) -> list[str]:
        """The pieces a chat with this prompt is answered with (when no fault intervenes).

        :param prompt: the prompt.
        :returns: the pieces, in order; ``"".join()`` of them is the whole reply.
        :raises TypeError: if a ``reply`` callable returns something other than a str.
        """
        with self._lock:
            kind, func, pieces = self._reply_kind, self._reply_func, self._static_pieces
        if kind == "static":
            return list(pieces)
        if kind == "callable":
            assert func is not None
            text = func(prompt)
            if not isinstance(text, str):
                raise TypeError(f"the reply callable returned {type(text).__name__}, not str")
            return split_pieces(text)
        return split_pieces(default_reply(prompt))

    def _lines_for(self, prompt: str) -> tuple[list[str], list[bytes]]:
        with self._lock:
            if self._reply_kind == "static":
                if self._static_lines is None:
                    self._static_lines = [piece_line(p) for p in self._static_pieces]
                return list(self._static_pieces), self._static_lines
        pieces = self.pieces_for(prompt)
        return pieces, [piece_line(p) for p in pieces]

    def _gzip_segments(self, lines: list[bytes]) -> list[bytes]:
        """Compress each line into its own decodable gzip segment (cached for a fixed reply)."""
        with self._lock:
            if lines is self._static_lines and self._static_gzip is not None:
                return self._static_gzip
        compressor = zlib.compressobj(wbits=31)
        segments = [
            compressor.compress(line) + compressor.flush(zlib.Z_SYNC_FLUSH) for line in lines
        ]
        tail = compressor.flush()
        if segments:
            segments[-1] += tail
        else:
            segments = [tail]
        with self._lock:
            if lines is self._static_lines:
                self._static_gzip = segments
        return segments

    @property
    def framing(self) -> str:
        """The HTTP framing of chat replies."""
        return self._framing

    @property
    def gzip(self) -> bool:
        """Whether chat replies are gzip-compressed."""
        return self._gzip

    @property
    def chunk_delay(self) -> float:
        """Seconds waited before every piece but the first."""
        return self._chunk_delay

    @property
    def content_type(self) -> str:
        """The ``Content-Type`` of chat replies."""
        return self._content_type

    # ----------------------------------------------------------------- life cycle

    def start(self) -> Emulator:
        """Start listening and serving, in daemon threads.

        :returns: the emulator itself.
        :raises RuntimeError: if it was started before.
        :raises OSError: if the address cannot be bound.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("this Emulator was already started; create a new one")
            self._started = True
        infos = socket.getaddrinfo(
            self._bind_host or None,
            self._bind_port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        family, socktype, proto, _, sockaddr = infos[0]
        listener = socket.socket(family, socktype, proto)
        try:
            if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._address = (self._bind_host, listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"aichatonline-emulator-{self.port}", daemon=True
        )
        self._accept_thread.start()
        logger.debug("emulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving: close the listener and every open connection, and join the threads.

        Handlers waiting in a stall or a chunk delay end at once; a ``before_piece`` callback that
        keeps blocking is given up on after about a second (its connection is shut down anyway).
        Calling it again, or before :meth:`start`, does nothing.
        """
        with self._lock:
            if not self._started or self._stopped:
                return
            self._stopped = True
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(_STOP_JOIN_SECONDS)
        for closer in (self._listener, self._wake_r, self._wake_w):
            if closer is not None:
                closer.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
            if conn.thread.is_alive():
                logger.warning("emulator connection %d did not end in time", conn.number)
        logger.debug("emulator stopped")

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._address is not None else "not started"
        return f"<Emulator {where} framing={self._framing!r} gzip={self._gzip}>"

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    @property
    def host(self) -> str:
        """The host name or address of :attr:`url`."""
        host = self._require_address()[0]
        return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._require_address()[1]

    def _require_address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError(
                "the emulator is not started; call start() or use it in a with block"
            )
        return self._address

    # ----------------------------------------------------------------- records

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in order (a copy): the last ``max_records`` of them, or
        none with ``record=False``."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received so far (also those no longer, or never, recorded)."""
        with self._lock:
            return self._request_count

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The requests whose endpoint is ``"chat"``."""
        return [r for r in self.requests if r.endpoint == "chat"]

    @property
    def token_requests(self) -> list[RecordedRequest]:
        """The requests whose endpoint is ``"token"``."""
        return [r for r in self.requests if r.endpoint == "token"]

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted so far."""
        with self._lock:
            return self._connections

    @property
    def tokens_issued(self) -> int:
        """How many tokens were handed out so far."""
        with self._lock:
            return self._tokens_issued

    @property
    def issued_tokens(self) -> list[str]:
        """The tokens handed out so far, in order (also those revoked; the last
        :data:`MAX_TOKENS`)."""
        with self._lock:
            return list(self._issued)

    def revoke_tokens(self) -> None:
        """Invalidate every token issued so far: the next chat carrying one gets HTTP 401."""
        with self._lock:
            self._valid_tokens.clear()

    def reset(self) -> None:
        """Clear the records, the queued faults and the counters.

        Tokens issued before stay valid (use :meth:`revoke_tokens` for that).
        """
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._connections = 0
            self._tokens_issued = 0
            self._request_count = 0
            self._issued.clear()

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many fault replies are still queued.

        :param endpoint: ``"token"``, ``"chat"``, or None for both.
        :returns: the number of replies (a fault with ``times=3`` counts 3).
        """
        return self._faults.pending(endpoint)

    # ----------------------------------------------------------------- faults
    # Every fault is built and checked by the model shared with the mock (:mod:`._faults`); a
    # bad argument raises InvalidRequestError (a ValueError) and queues nothing.

    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | bytes | dict[str, Any] | list[Any] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next request(s) to ``endpoint`` with an HTTP error status.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200 to 599, but not 204 or 304, which carry no body).
        :param headers: extra response headers, e.g. ``{"Retry-After": "2"}`` or
            ``{"retry-after-ms": "150"}``; a ``Content-Type`` here replaces the default one.
        :param body: None for ``{"code": status, "message": "<reason phrase>", "data": null}``; a
            dict or list is sent as JSON; a str or bytes as is (``text/plain``).
        :param times: how many requests get this reply.
        """
        self._faults.add(endpoint, _faults.fail(status, headers=headers, body=body), times)

    def error_line(
        self,
        code: int,
        message: str = "upstream error",
        *,
        after: int = 0,
        key: str = "message",
        times: int = 1,
    ) -> None:
        """Answer the next chat(s) with HTTP 200, ``after`` normal pieces, then an error line.

        The error line is ``{"code": code, key: message, "data": null}``; the body then ends
        normally.

        :param code: the body-level error code, e.g. 429 or 500.
        :param message: the error message.
        :param after: how many normal pieces come first (fewer if the reply is shorter).
        :param key: the key of the message (``"message"`` or ``"msg"``).
        :param times: how many chats get this reply.
        """
        fault = _faults.error_line(code, message, after=after, key=key)
        self._faults.add("chat", fault, times)

    def drop(self, endpoint: str = "chat", *, after: int = 0, times: int = 1) -> None:
        """Break the connection of the next request(s) to ``endpoint``.

        A chat gets the 200 headers and ``after`` pieces, then the connection is reset (RST): a
        chunked body misses its last chunk, a length-delimited one has fewer bytes than declared. A
        token request is closed without any reply.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param after: how many pieces a chat gets before the break (must be 0 for the token).
        :param times: how many requests get this treatment.
        """
        self._faults.add(endpoint, _faults.drop(endpoint, after=after), times)

    def stall(
        self,
        endpoint: str = "chat",
        *,
        after: int = 0,
        seconds: float | None = None,
        times: int = 1,
    ) -> None:
        """Stall the next request(s) to ``endpoint``.

        A chat gets the 200 headers and ``after`` pieces, a token request nothing; then nothing is
        sent for ``seconds`` (None: until :meth:`stop`), after which the reply goes on normally. A
        stall ended by :meth:`stop` resets the connection.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param after: how many pieces a chat gets before the stall (must be 0 for the token).
        :param seconds: how long the stall lasts, or None for "until stop()".
        :param times: how many requests stall.
        """
        fault = _faults.stall(endpoint, after=after, seconds=seconds)
        self._faults.add(endpoint, fault, times)

    def html(self, endpoint: str = "chat", *, status: int = 200, times: int = 1) -> None:
        """Answer the next request(s) to ``endpoint`` with a Cloudflare-like HTML page.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200, or e.g. 403 or 503).
        :param times: how many requests get the page.
        """
        self._faults.add(endpoint, _faults.html(status), times)

    def token_reply(
        self,
        body: Any,
        *,
        status: int = 200,
        content_type: str = "application/json",
        times: int = 1,
    ) -> None:
        """Answer the next token request(s) with exactly this body.

        :param body: a str or bytes sent as is; anything else (dict, list, None, number) as JSON.
        :param status: the HTTP status.
        :param content_type: the ``Content-Type`` header.
        :param times: how many token requests get this reply.
        """
        fault = _faults.token_reply(body, status=status, content_type=content_type)
        self._faults.add("token", fault, times)

    def raw_reply(self, endpoint: str, data: bytes, *, close: bool = True, times: int = 1) -> None:
        """Answer the next request(s) to ``endpoint`` with exactly these bytes (status line too).

        :param endpoint: ``"token"`` or ``"chat"``.
        :param data: the whole response, e.g. ``b"HTTP/1.1 200 OK\\r\\n\\r\\ngarbage"``.
        :param close: close the connection (FIN) after the bytes; False keeps reading requests.
        :param times: how many requests get these bytes.
        """
        self._faults.add(endpoint, _faults.raw(data, close=close), times)

    # ----------------------------------------------------------------- internals

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._request_count += 1
            if self._recording:
                self._requests.append(request)

    def _issue_token(self) -> str:
        token = secrets.token_hex(16)
        with self._lock:
            self._tokens_issued += 1
            self._issued.append(token)
            self._valid_tokens[token] = None
            if len(self._valid_tokens) > MAX_TOKENS:
                del self._valid_tokens[next(iter(self._valid_tokens))]
        return token

    def _token_valid(self, token: str | None) -> bool:
        if token is None:
            return False
        with self._lock:
            return token.strip() in self._valid_tokens

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None
        assert wake is not None
        number = 0
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is wake or self._stop.is_set():
                        return
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        if self._stop.is_set():
                            return
                        logger.debug("accept failed", exc_info=True)
                        continue
                    number += 1
                    self._spawn(sock, number)

    def _spawn(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(None)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            logger.debug("could not set TCP_NODELAY", exc_info=True)
        conn = _Connection(self, sock, number)
        with self._lock:
            if self._stop.is_set():
                sock.close()
                return
            self._connections += 1
            self._conns.add(conn)
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


class _Connection:
    """One accepted TCP connection and the thread that serves it."""

    def __init__(self, emu: Emulator, sock: socket.socket, number: int) -> None:
        self.emu = emu
        self.sock = sock
        self.number = number
        self.rfile: BinaryIO | None = None
        self._sock_lock = threading.Lock()
        self._shut = False
        self.thread = threading.Thread(
            target=self.run, name=f"aichatonline-emulator-conn-{number}", daemon=True
        )

    # ------------------------------------------------------------- socket helpers

    def shutdown(self) -> None:
        """Called by stop(): wake up whatever this connection's thread is blocked in."""
        with self._sock_lock:
            self._shut = True
            # socket.socket.shutdown, not SSLSocket.shutdown, which would drop the TLS state
            # under the feet of the serving thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _close(self, how: str) -> None:
        sock = self.sock
        try:
            if how == _ABORT:
                self._drain()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == _CLOSE:
                if isinstance(sock, ssl.SSLSocket):
                    self._close_notify(sock)
                socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            pass
        if self.rfile is not None:
            with contextlib.suppress(OSError):
                self.rfile.close()
        with contextlib.suppress(OSError):
            sock.close()

    def _close_notify(self, sock: ssl.SSLSocket) -> None:
        # Send a TLS close_notify without waiting for the peer's (unwrap() would block for it).
        try:
            sock.setblocking(False)
            sock.unwrap()
        except (OSError, ValueError):
            pass

    def _drain(self) -> None:
        """Wait (briefly) until the peer has received what was sent, so an RST cannot discard it."""
        outq = _TIOCOUTQ
        if fcntl is None or outq is None:  # pragma: no cover - not Linux/BSD
            return
        deadline = time.monotonic() + _DRAIN_SECONDS
        buf = bytearray(struct.calcsize("i"))
        while time.monotonic() < deadline and not self.emu._stop.is_set():
            try:
                fcntl.ioctl(self.sock.fileno(), outq, buf)
            except OSError:
                return
            if struct.unpack("i", bytes(buf))[0] <= 0:
                return
            self.emu._stop.wait(0.001)

    # ------------------------------------------------------------- main loop

    def run(self) -> None:
        how = _CLOSE
        try:
            context = self.emu._ssl_context
            if context is not None:
                with self._sock_lock:
                    if self._shut:
                        return
                    self.sock = context.wrap_socket(
                        self.sock, server_side=True, do_handshake_on_connect=False
                    )
                assert isinstance(self.sock, ssl.SSLSocket)
                self.sock.do_handshake()
            self.rfile = self.sock.makefile("rb")
            while not self.emu._stop.is_set():
                try:
                    request = self._read_request()
                except _BadRequest as exc:
                    logger.debug("bad request: %s", exc.message)
                    self._send_simple(
                        exc.status, error_json(exc.status, exc.message), keep_alive=False
                    )
                    break
                if request is None:
                    break
                how = self._dispatch(request)
                if how != _KEEP:
                    break
        except (_Gone, OSError) as exc:
            logger.debug("connection %d ended: %r", self.number, exc)
        except Exception:
            logger.exception("emulator connection %d failed", self.number)
            how = _ABORT
        finally:
            self._close(how)
            self.emu._forget(self)

    def _read_request(self) -> _Request | None:
        rfile = self.rfile
        assert rfile is not None
        line = rfile.readline(_MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):
            line = rfile.readline(_MAX_LINE + 1)
        if not line:
            return None
        if len(line) > _MAX_LINE:
            raise _BadRequest(414, "request line too long")
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"unsupported HTTP version {version}")
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            raw = rfile.readline(_MAX_LINE + 1)
            if not raw:
                raise _Gone("EOF in the request headers")
            if len(raw) > _MAX_LINE:
                raise _BadRequest(431, "header line too long")
            if raw in (b"\r\n", b"\n"):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            name = name.strip().lower()
            if not sep or not name:
                raise _BadRequest(400, "malformed header line")
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        else:
            raise _BadRequest(431, "too many headers")

        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens

        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length_header = headers.get("content-length")
        expects_body = chunked or (length_header not in (None, "0"))
        if expects_body and headers.get("expect", "").lower() == "100-continue":
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            body = self._read_chunked(rfile)
        elif length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                raise _BadRequest(400, "invalid Content-Length") from None
            if length < 0 or length > _MAX_BODY:
                raise _BadRequest(413 if length > 0 else 400, "invalid Content-Length")
            body = rfile.read(length)
            if len(body) < length:
                raise _Gone("EOF in the request body")
        else:
            body = b""
        return _Request(method.upper(), target, version, headers, body, keep_alive)

    def _read_chunked(self, rfile: BinaryIO) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = rfile.readline(_MAX_LINE + 1)
            if not size_line:
                raise _Gone("EOF in a chunked request body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "invalid chunk size") from None
            if size == 0:
                while True:  # trailers
                    trailer = rfile.readline(_MAX_LINE + 1)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            total += size
            if total > _MAX_BODY:
                raise _BadRequest(413, "request body too large")
            data = rfile.read(size)
            if len(data) < size:
                raise _Gone("EOF in a chunked request body")
            parts.append(data)
            rfile.readline(_MAX_LINE + 1)

    # ------------------------------------------------------------- replies

    def _send_simple(
        self,
        status: int,
        body: bytes,
        *,
        keep_alive: bool,
        content_type: str = "application/json",
        headers: Sequence[tuple[str, str]] = (),
    ) -> str:
        lines = [f"HTTP/1.1 {status} {phrase(status)}", "Server: AiChatOnlineEmulator"]
        if not any(name.lower() == "content-type" for name, _ in headers):
            lines.append(f"Content-Type: {content_type}")
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.append(f"Content-Length: {len(body)}")
        lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._send(head + body)
        return _KEEP if keep_alive else _CLOSE

    def _send_reply(self, reply: Reply, *, keep_alive: bool) -> str:
        return self._send_simple(
            reply.status,
            reply.body,
            keep_alive=keep_alive,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    def _dispatch(self, req: _Request) -> str:
        split = urlsplit(req.target)
        path = split.path or "/"
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        if path == TOKEN_PATH and req.method == "GET":
            endpoint = "token"
        elif path == CHAT_PATH and req.method == "POST":
            endpoint = "chat"
        else:
            endpoint = "other"
        parsed: Any = None
        if req.body:
            try:
                parsed = json.loads(req.body)
            except ValueError:
                parsed = None
        self.emu._record(
            RecordedRequest(req.method, path, query, dict(req.headers), req.body, parsed, endpoint)
        )
        logger.debug("%s %s (%s)", req.method, req.target, endpoint)

        if endpoint == "other":
            if path in (TOKEN_PATH, CHAT_PATH):
                allowed = "GET" if path == TOKEN_PATH else "POST"
                return self._send_simple(
                    405,
                    error_json(405, f"method {req.method} not allowed"),
                    keep_alive=req.keep_alive,
                    headers=[("Allow", allowed)],
                )
            return self._send_simple(
                404, error_json(404, f"no such path: {path}"), keep_alive=req.keep_alive
            )

        fault = self.emu._faults.take(endpoint)
        if fault is not None:
            logger.debug("answering %s with fault %s", endpoint, type(fault).__name__)
        if isinstance(fault, Reply):
            return self._send_reply(fault, keep_alive=req.keep_alive)
        if isinstance(fault, Raw):
            self._send(fault.data)
            return _CLOSE if fault.close or not req.keep_alive else _KEEP
        if endpoint == "token":
            if isinstance(fault, Drop):
                raise _Gone("dropped the token request (fault)")
            if isinstance(fault, Stall) and self._wait(fault.seconds):
                return _ABORT
            body = json.dumps(token_reply(self.emu._issue_token()))
            return self._send_simple(200, body.encode(), keep_alive=req.keep_alive)
        return self._chat(req, parsed, fault)

    def _wait(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: forever); True if the emulator was stopped meanwhile."""
        return self.emu._stop.wait(seconds)

    def _chat(self, req: _Request, parsed: Any, fault: Fault | None) -> str:
        prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
        if fault is None:
            known = not self.emu.require_token or self.emu._token_valid(
                req.headers.get("uniqueid")
            )
            rejection = _faults.chat_rejection(known, parsed)
            if rejection is not None:
                return self._send_reply(rejection, keep_alive=req.keep_alive)
        try:
            pieces, lines = self.emu._lines_for(prompt if isinstance(prompt, str) else "")
        except Exception as exc:
            logger.exception("the emulator's reply callable failed")
            return self._send_simple(
                500, error_json(500, f"reply callable failed: {exc!r}"), keep_alive=req.keep_alive
            )
        return self._stream(req, len(pieces), lines, fault)

    def _stream(
        self, req: _Request, n_pieces: int, lines: list[bytes], fault: Fault | None
    ) -> str:
        emu = self.emu
        after = fault.after if isinstance(fault, (ErrorLine, Drop, Stall)) else 0
        stall_seconds = fault.seconds if isinstance(fault, Stall) else None
        if isinstance(fault, ErrorLine):
            n_pieces = min(after, n_pieces)
            lines = [*lines[:n_pieces], fault.line]

        framing = emu._framing
        if framing == "chunked" and req.version == "HTTP/1.0":
            framing = "close"

        segments = emu._gzip_segments(lines) if emu._gzip else lines

        keep_alive = req.keep_alive and framing != "close"
        head = [
            "HTTP/1.1 200 OK",
            "Server: AiChatOnlineEmulator",
            f"Content-Type: {emu._content_type}",
            "Cache-Control: no-cache",
        ]
        head.extend(f"{name}: {value}" for name, value in emu._reply_headers)
        if emu._gzip:
            head.append("Content-Encoding: gzip")
        if framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        elif framing == "length":
            head.append(f"Content-Length: {sum(len(s) for s in segments)}")
        head.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

        if framing == "chunked":
            framed = [b"%x\r\n" % len(s) + s + b"\r\n" for s in segments if s]
            terminator = b"0\r\n\r\n"
        else:
            framed = segments
            terminator = b""

        count = len(framed)
        drop_at = min(after, count) if isinstance(fault, Drop) else None
        stall_at = min(after, count) if isinstance(fault, Stall) else None
        send_count = drop_at if drop_at is not None else count
        before_piece = emu.before_piece
        delay = emu._chunk_delay

        if delay == 0 and before_piece is None and stall_at is None:
            buffer = [head_bytes]
            size = len(head_bytes)
            for index in range(send_count):
                chunk = framed[index]
                buffer.append(chunk)
                size += len(chunk)
                if size >= _BATCH_BYTES:
                    self._send(b"".join(buffer))
                    buffer, size = [], 0
            if drop_at is None:
                buffer.append(terminator)
            self._send(b"".join(buffer))
        else:
            self._send(head_bytes)
            for index in range(send_count):
                if index == stall_at and self._wait(stall_seconds):
                    return _ABORT
                if index > 0 and delay > 0 and self._wait(delay):
                    return _ABORT
                if before_piece is not None and index < n_pieces:
                    before_piece(index)
                    if emu._stop.is_set():
                        return _ABORT
                chunk = framed[index]
                if index == count - 1 and drop_at is None and stall_at != count:
                    chunk += terminator
                self._send(chunk)
            if drop_at is None and (stall_at == count):
                if self._wait(stall_seconds):
                    return _ABORT
                if terminator:
                    self._send(terminator)
            elif drop_at is None and count == 0 and terminator:
                self._send(terminator)

        if drop_at is not None:
            return _ABORT
        if framing == "close":
            return _CLOSE
        return _KEEP if keep_alive else _CLOSE
