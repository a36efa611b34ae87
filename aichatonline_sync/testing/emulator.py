"""An offline emulator of the AiChatOnline service, for tests and for use without a network.

:class:`Emulator` is a real HTTP/1.1 server on the loopback interface, built on the standard
library's :mod:`http.server` (a thread per connection, keep-alive), that speaks the upstream's
protocol:

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
:meth:`Emulator.reset` clears them. The faults are built by the model the mock shares
(:mod:`.faults`); this module plays them on a socket, byte for byte.

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
import itertools
import json
import secrets
import socket
import socketserver
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union
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
    FaultScheduler,
    Raw,
    Reply,
    ReplySource,
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

_MAX_BODY = 64 * 1024 * 1024
_MAX_LINE = 65536
#: The write buffer of a connection: a reply that is not paced goes out in sends of this size.
_BATCH_BYTES = 64 * 1024
_STOP_JOIN_SECONDS = 1.0
_DRAIN_SECONDS = 2.0
_TIOCOUTQ: Optional[int] = getattr(termios, "TIOCOUTQ", None)

# How a connection ends after its last reply.
_KEEP = "keep"  # read the next request
_CLOSE = "close"  # FIN after the data
_ABORT = "abort"  # RST after the data


def default_reply(prompt: str) -> str:
    """The reply text the emulator gives when no ``reply=`` was set.

    :param prompt: the prompt of the chat request.
    :returns: a deterministic text of a couple of sentences that quotes the prompt.
    """
    return (
        f'Hello! This is the AiChatOnline emulator. You said: "{prompt}". '
        "This reply is streamed word by word, one line per piece."
    )


@dataclasses.dataclass(frozen=True, repr=False)
class RecordedRequest:
    """One request the emulator received, as received (its repr masks the token).

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

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)
        )
        return _redact.scrub(f"RecordedRequest({fields})", (self.unique_id,))


class Emulator(FaultScheduler):
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
        self._reply = ReplySource()
        # The lines (and their gzip segments) of a fixed reply, made once per set_reply().
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
        self._valid_tokens: dict[str, None] = {}  # in the order issued: the oldest expire first
        self._issued: collections.deque[str] = collections.deque(maxlen=MAX_TOKENS)

        # Set by stop(): every wait of a handler ends, and no new connection is served.
        self._stop = threading.Event()
        self._started = False
        self._stopped = False
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._handlers: set[_Handler] = set()
        self._numbers = itertools.count(1)
        self._address: tuple[str, int] | None = None

    # ----------------------------------------------------------------- configuration

    def set_reply(self, reply: ReplySpec) -> None:
        """Change what the following chats reply (same values as ``reply=`` of the constructor).

        :param reply: None, a str, a callable taking the prompt and returning a str, or an iterable
            of str pieces.
        :raises InvalidRequestError: (a ``ValueError``) for any other value.
        """
        source = _faults.reply_source(reply, default_reply)
        with self._lock:
            self._reply = source
            self._static_lines = None
            self._static_gzip = None

    def pieces_for(self, prompt: str) -> list[str]:
        """The pieces a chat with this prompt is answered with (when no fault intervenes).

        :param prompt: the prompt.
        :returns: the pieces, in order; ``"".join()`` of them is the whole reply.
        :raises TypeError: if a ``reply`` callable returns something other than a str.
        """
        with self._lock:
            source = self._reply
        return source.pieces_for(prompt)

    def _lines_for(self, prompt: str) -> tuple[int, list[bytes]]:
        """How many pieces the reply to ``prompt`` has, and their lines."""
        with self._lock:
            source = self._reply
            if source.func is None:
                if self._static_lines is None:
                    self._static_lines = [piece_line(p) for p in source.pieces]
                return len(source.pieces), self._static_lines
        lines = [piece_line(p) for p in source.pieces_for(prompt)]
        return len(lines), lines

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
        family, _, _, _, sockaddr = socket.getaddrinfo(
            self._bind_host or None,
            self._bind_port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
        server = _Server(self, sockaddr, family)
        self._server = server
        self._address = (self._bind_host, server.server_address[1])
        self._serve_thread = threading.Thread(
            target=server.serve_forever, name=f"aichatonline-emulator-{self.port}", daemon=True
        )
        self._serve_thread.start()
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
        server = self._server
        assert server is not None
        # serve_forever() sees shutdown() only when its select() returns: a connection makes it
        # return at once (and is refused, as the emulator is stopping).
        closer = threading.Thread(target=server.shutdown, name="aichatonline-emulator-stop")
        closer.daemon = True
        closer.start()
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        while closer.is_alive() and time.monotonic() < deadline:
            self._knock()
            closer.join(0.01)
        server.server_close()
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.hang_up()
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for handler in handlers:
            handler.thread.join(max(0.0, deadline - time.monotonic()))
            if handler.thread.is_alive():
                logger.warning("emulator connection %d did not end in time", handler.number)
        logger.debug("emulator stopped")

    def _knock(self) -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((self.host, self.port), timeout=_STOP_JOIN_SECONDS).close()

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

    # ----------------------------------------------------------------- faults
    # fail, error_line, html, drop and pending_faults come from FaultScheduler, shared with the
    # mock; these are the emulator's own, queued and checked the same way.

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

    # ----------------------------------------------------------------- used by the handlers

    def _accept(self) -> bool:
        """Count a new connection; False once stop() has begun (the connection is then closed)."""
        with self._lock:
            if self._stop.is_set():
                return False
            self._connections += 1
            return True

    def _track(self, handler: _Handler) -> bool:
        """Keep ``handler`` for stop() to hang up, and number it; False once stop() has begun."""
        with self._lock:
            if self._stop.is_set():
                return False
            self._handlers.add(handler)
            handler.number = next(self._numbers)
        handler.thread.name = f"aichatonline-emulator-conn-{handler.number}"
        return True

    def _forget(self, handler: _Handler) -> None:
        with self._lock:
            self._handlers.discard(handler)

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


class _Server(ThreadingHTTPServer):
    """The emulator's :class:`ThreadingHTTPServer`: a daemon thread per connection, which
    :meth:`Emulator.stop` hangs up and joins with a deadline (``server_close()`` joins none)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    # On Windows SO_REUSEADDR would let a second server take a port in use.
    allow_reuse_address = not hasattr(socket, "SO_EXCLUSIVEADDRUSE")

    def __init__(self, emulator: Emulator, address: Any, family: int) -> None:
        self.emulator = emulator
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN, which nothing here reads: for a
        # wildcard address that is a DNS query.
        socketserver.TCPServer.server_bind(self)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.emulator._accept()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("emulator connection from %s failed", client_address, exc_info=True)


class _Gone(ConnectionError):
    """The client went away in the middle of a request."""


class _Handler(BaseHTTPRequestHandler):
    """One connection: :mod:`http.server` reads the requests and keeps the connection alive;
    :meth:`_respond` answers each one, writing a fault's bytes as the fault says.

    Replies go through a write buffer: a reply that is not paced leaves in sends of
    ``_BATCH_BYTES``, and the buffer is flushed before every wait (a stall, a delay,
    ``before_piece``), so the client has everything before the wait while it lasts.
    """

    protocol_version = "HTTP/1.1"
    server_version = "AiChatOnlineEmulator"
    disable_nagle_algorithm = True
    wbufsize = _BATCH_BYTES
    server: _Server

    def setup(self) -> None:
        self.emulator = self.server.emulator
        self.thread = threading.current_thread()
        self.number = 0
        self.ending = _CLOSE
        context = self.emulator._ssl_context
        if context is not None:
            # The handshake runs in handle(), where its failure ends only this connection.
            self.request = context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False
            )
        super().setup()

    def handle(self) -> None:
        if not self.emulator._track(self):
            return
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            super().handle()
        except OSError as exc:
            logger.debug("emulator connection ended: %r", exc)
            if self.ending == _KEEP:
                self.ending = _CLOSE
        except Exception:
            logger.exception("emulator connection failed")
            self.ending = _ABORT

    def finish(self) -> None:
        """Send what is buffered, then end the connection as :attr:`ending` says."""
        sock = self.connection
        try:
            self.wfile.flush()
            if self.ending == _ABORT:
                self._drain()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.ending == _CLOSE:
                if isinstance(sock, ssl.SSLSocket):
                    _close_notify(sock)
                socket.socket.shutdown(sock, socket.SHUT_WR)
        except (OSError, ValueError):
            pass
        for stream in (self.wfile, self.rfile, sock):
            with contextlib.suppress(OSError):
                stream.close()
        self.emulator._forget(self)

    def hang_up(self) -> None:
        """Called by stop(): wake up whatever this connection's thread is blocked in."""
        # socket.socket.shutdown, not SSLSocket.shutdown, which would drop the TLS state under
        # the feet of the serving thread.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)

    def _drain(self) -> None:
        """Wait (briefly) until the peer has received what was sent, so an RST cannot discard it."""
        outq = _TIOCOUTQ
        if fcntl is None or outq is None:  # pragma: no cover - not Linux/BSD
            return
        deadline = time.monotonic() + _DRAIN_SECONDS
        buf = bytearray(struct.calcsize("i"))
        stop = self.emulator._stop
        while time.monotonic() < deadline and not stop.is_set():
            try:
                fcntl.ioctl(self.connection.fileno(), outq, buf)
            except OSError:
                return
            if struct.unpack("i", bytes(buf))[0] <= 0:
                return
            stop.wait(0.001)

    # ------------------------------------------------------------- http.server's hooks

    def handle_expect_100(self) -> bool:
        go_on = super().handle_expect_100()
        self.wfile.flush()  # the client waits for the 100 before it sends the body
        return go_on

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a request http.server could not parse, in the service's JSON, and close."""
        logger.debug("bad request: %d %s", code, message)
        self.ending = _CLOSE
        if self.request_version == "HTTP/0.9":
            # A request line http.server could not read leaves it at HTTP/0.9, whose replies
            # have no status line: the error gets one.
            self.request_version = self.protocol_version
        text = message or phrase(code)
        self._reply(Reply(int(code), error_json(int(code), text)), keep_alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("emulator: " + format, *args)

    def do_GET(self) -> None:
        self.ending = self._respond()
        if self.ending != _KEEP:
            self.close_connection = True

    # Every method is recorded, and answered 404 or 405 off the two endpoints.
    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # ------------------------------------------------------------- requests

    def _read_body(self) -> bytes | None:
        """The request body; None after answering a body that cannot be read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self.send_error(413 if length > 0 else 400, "invalid Content-Length")
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            raise _Gone("EOF in the request body")
        return body

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(_MAX_LINE + 1)
            if not size_line:
                raise _Gone("EOF in a chunked request body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.send_error(400, "invalid chunk size")
                return None
            if size == 0:
                while self.rfile.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > _MAX_BODY:
                self.send_error(413, "request body too large")
                return None
            data = self.rfile.read(size)
            if len(data) < size:
                raise _Gone("EOF in a chunked request body")
            parts.append(data)
            self.rfile.readline(_MAX_LINE + 1)

    def _respond(self) -> str:
        """Record the request and answer it; how the connection goes on."""
        body = self._read_body()
        if body is None:
            return _CLOSE
        method = self.command.upper()
        split = urlsplit(self.path)
        path = split.path or "/"
        if path == TOKEN_PATH and method == "GET":
            endpoint = "token"
        elif path == CHAT_PATH and method == "POST":
            endpoint = "chat"
        else:
            endpoint = "other"
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        headers: dict[str, str] = {}
        for raw_name, raw_value in self.headers.items():
            name, value = raw_name.strip().lower(), raw_value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        self.emulator._record(
            RecordedRequest(method, path, query, headers, body, parsed, endpoint)
        )
        logger.debug("%s %s (%s)", method, self.path, endpoint)
        keep_alive = not self.close_connection

        if endpoint == "other":
            if path in (TOKEN_PATH, CHAT_PATH):
                allowed = "GET" if path == TOKEN_PATH else "POST"
                message = f"method {method} not allowed"
                reply = Reply(405, error_json(405, message), headers=(("Allow", allowed),))
                return self._reply(reply, keep_alive=keep_alive)
            return self._reply(Reply(404, error_json(404, f"no such path: {path}")), keep_alive)

        fault = self.emulator._faults.take(endpoint)
        if fault is not None:
            logger.debug("answering %s with fault %s", endpoint, type(fault).__name__)
        if isinstance(fault, Reply):
            return self._reply(fault, keep_alive)
        if isinstance(fault, Raw):
            self.wfile.write(fault.data)
            return _CLOSE if fault.close or not keep_alive else _KEEP
        if endpoint == "chat":
            return self._chat(headers.get("uniqueid"), parsed, fault, keep_alive)
        if isinstance(fault, Drop):
            return _ABORT
        if isinstance(fault, Stall) and self._hold(fault.seconds):
            return _ABORT
        token = json.dumps(token_reply(self.emulator._issue_token())).encode()
        return self._reply(Reply(200, token), keep_alive)

    # ------------------------------------------------------------- replies

    def _head(self, status: int, headers: Iterable[tuple[str, str]], keep_alive: bool) -> None:
        self.send_response_only(status, phrase(status))
        self.send_header("Server", self.server_version)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "keep-alive" if keep_alive else "close")
        self.end_headers()

    def _reply(self, reply: Reply, keep_alive: bool) -> str:
        """Write a whole reply with a ``Content-Length``."""
        headers = list(reply.headers)
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.insert(0, ("Content-Type", reply.content_type))
        headers.append(("Content-Length", str(len(reply.body))))
        self._head(reply.status, headers, keep_alive)
        self.wfile.write(reply.body)
        return _KEEP if keep_alive else _CLOSE

    def _hold(self, seconds: float | None) -> bool:
        """Send what is buffered, then wait ``seconds`` (None: until stop()); True if stopped."""
        self.wfile.flush()
        return self.emulator._stop.wait(seconds)

    def _chat(self, token: str | None, parsed: Any, fault: Fault | None, keep_alive: bool) -> str:
        emulator = self.emulator
        if fault is None:
            known = not emulator.require_token or emulator._token_valid(token)
            rejection = _faults.chat_rejection(known, parsed)
            if rejection is not None:
                return self._reply(rejection, keep_alive)
        prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
        try:
            n_pieces, lines = emulator._lines_for(prompt if isinstance(prompt, str) else "")
        except Exception as exc:
            logger.exception("the emulator's reply callable failed")
            failure = Reply(500, error_json(500, f"reply callable failed: {exc!r}"))
            return self._reply(failure, keep_alive)
        return self._stream(n_pieces, lines, fault, keep_alive)

    def _stream(
        self, n_pieces: int, lines: list[bytes], fault: Fault | None, keep_alive: bool
    ) -> str:
        """Write a chat reply in the emulator's framing, playing ``fault`` on it."""
        emulator = self.emulator
        after = fault.after if isinstance(fault, (ErrorLine, Drop, Stall)) else 0
        if isinstance(fault, ErrorLine):
            n_pieces = min(after, n_pieces)
            lines = [*lines[:n_pieces], fault.line]
        framing = emulator._framing
        if framing == "chunked" and self.request_version == "HTTP/1.0":
            framing = "close"
        keep_alive = keep_alive and framing != "close"
        segments = emulator._gzip_segments(lines) if emulator._gzip else lines

        headers = [("Content-Type", emulator._content_type), ("Cache-Control", "no-cache")]
        headers.extend(emulator._reply_headers)
        if emulator._gzip:
            headers.append(("Content-Encoding", "gzip"))
        if framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
            framed = [b"%x\r\n%s\r\n" % (len(s), s) for s in segments if s]
            terminator = b"0\r\n\r\n"
        else:
            if framing == "length":
                headers.append(("Content-Length", str(sum(map(len, segments)))))
            framed = segments
            terminator = b""
        self._head(200, headers, keep_alive)

        count = len(framed)
        stall_at = min(after, count) if isinstance(fault, Stall) else None
        stall_seconds = fault.seconds if isinstance(fault, Stall) else None
        send_count = min(after, count) if isinstance(fault, Drop) else count
        delay = emulator._chunk_delay
        before_piece = emulator.before_piece
        write = self.wfile.write
        for index in range(send_count):
            if index == stall_at and self._hold(stall_seconds):
                return _ABORT
            if index > 0 and delay > 0 and self._hold(delay):
                return _ABORT
            if before_piece is not None and index < n_pieces:
                self.wfile.flush()
                before_piece(index)
                if emulator._stop.is_set():
                    return _ABORT
            write(framed[index])
        if isinstance(fault, Drop):
            return _ABORT
        if stall_at == count and self._hold(stall_seconds):
            return _ABORT
        write(terminator)
        return _KEEP if keep_alive else _CLOSE


def _close_notify(sock: ssl.SSLSocket) -> None:
    """Send a TLS close_notify without waiting for the peer's (unwrap() would block for it)."""
    sock.setblocking(False)
    with contextlib.suppress(OSError, ValueError):
        sock.unwrap()
