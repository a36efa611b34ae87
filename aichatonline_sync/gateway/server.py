"""A small threaded HTTP/1.1 WSGI server on :mod:`http.server`, for ``aichatonline gateway``.

Why not :mod:`wsgiref.simple_server`: it speaks HTTP/1.0, one request per connection, and a body of
unknown length (a stream) ends when the connection closes, so that a client cannot tell a reply cut
short from a whole one. This server keeps connections alive, sends such a body with chunked
encoding (each item of the application's iterable in its own chunk, written at once, with
``TCP_NODELAY``), and calls the iterable's ``close()`` when writing to the client fails, so that a
streamed chat upstream ends when its client goes away. Its own errors (a request it cannot parse,
a chunked request body, an application that failed before answering) are JSON in OpenAI's shape,
as the application's are, and a HEAD request never gets a body. :meth:`GatewayServer.drain` stops
it gracefully: no new connection or request, the replies in progress finish (up to a timeout).

Only the public API of :mod:`http.server` and :mod:`socketserver` is used.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import socket
import socketserver
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

from .._version import __version__
from .._wire import redact as _redact

__all__ = ["GatewayServer"]

logger = _redact.logger("aichatonline_sync.gateway")

#: A body the application did not read is read and dropped up to this size (the connection is
#: kept); a larger one closes the connection.
_DISCARD_LIMIT = 16 * 1024 * 1024
_BLOCK = 65536


class _ClientGone(Exception):
    """Writing to the client failed: it closed the connection, or stopped reading."""


class _Body:
    """``wsgi.input``: the request body, never read past its Content-Length."""

    def __init__(self, rfile: io.BufferedIOBase, length: int) -> None:
        self._rfile = rfile
        self.remaining = length

    def read(self, size: Optional[int] = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        wanted = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.read(wanted)
        self.remaining = self.remaining - len(data) if len(data) == wanted else 0
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        wanted = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.readline(wanted)
        self.remaining = self.remaining - len(data) if data else 0
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        total = 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def discard(self) -> bool:
        """Read and drop what is left; ``False`` when too much is left to keep the connection."""
        if self.remaining > _DISCARD_LIMIT:
            return False
        while self.read(_BLOCK):
            pass
        return True


class _Response:
    """``start_response`` and the writes of one response: the head once, then the body."""

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self.status: Optional[str] = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False  #: the head was written
        self.chunked = False
        self.head_only = handler.command == "HEAD"

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            if self.sent:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self.status is not None:
            raise RuntimeError("start_response was called twice without exc_info")
        self.status, self.headers = status, list(headers)
        return self.write

    def _send_head(self) -> None:
        handler = self._handler
        if self.status is None:
            raise RuntimeError("the application wrote a body before calling start_response")
        code, _, reason = self.status.partition(" ")
        status = int(code)
        handler.send_response(status, reason)
        for name, value in self.headers:
            handler.send_header(name, value)
        sized = any(name.lower() == "content-length" for name, _ in self.headers)
        if not sized and not self.head_only and status not in (204, 304):
            if handler.request_version == "HTTP/1.1":
                handler.send_header("Transfer-Encoding", "chunked")
                self.chunked = True
            else:
                handler.close_connection = True  # the body ends when the connection does
        try:
            handler.end_headers()
        except OSError as exc:
            raise _ClientGone(exc) from exc
        self.sent = True

    def write(self, data: bytes) -> None:
        if not self.sent:
            self._send_head()
        if not data or self.head_only:
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            self._handler.wfile.write(data)  # unbuffered: one sendall
        except OSError as exc:
            raise _ClientGone(exc) from exc

    def finish(self) -> None:
        if not self.sent:
            self._send_head()
        if self.chunked:
            try:
                self._handler.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                raise _ClientGone(exc) from exc


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"aichatonline-gateway/{__version__}"
    disable_nagle_algorithm = True  # each chunk goes out at once, not after the previous ACK
    timeout = 75  # seconds: an idle kept-alive connection, or a client that stops reading
    server: GatewayServer

    def do_GET(self) -> None:
        self._run()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def send_error(
        self, code: int, message: Optional[str] = None, explain: Optional[str] = None
    ) -> None:
        """Every error of the server itself (a request it cannot parse, a chunked body, an
        application that failed before its answer) in OpenAI's shape, as the application's own
        errors are; no body for HEAD, also when the request line was too broken to parse. The
        connection is closed after it: where the next request would begin is not known (after
        ``GET /a b HTTP/1.1`` :mod:`http.server` would take the next header line for a request)."""
        self.close_connection = True
        command: Optional[str] = self.command  # (None until the request line is parsed)
        if command is None and self.request_version == "HTTP/0.9":
            # A request line refused before its version was taken (``HTTP/9.0``): answered with a
            # status line and headers all the same (HTTP/0.9 has neither).
            self.request_version = "HTTP/1.0"
        reason = self.responses.get(code, ("Error", ""))[0]
        self.log_error("code %d, message %s", code, message or reason)
        # (``command`` is not set when the request line could not be parsed)
        head = (command or getattr(self, "requestline", "").split(" ", 1)[0]) == "HEAD"
        error = {
            "message": explain or message or reason,
            "type": "server_error" if code >= 500 else "invalid_request_error",
            "param": None,
            "code": "_".join(reason.lower().replace("-", " ").split()),
        }
        body = json.dumps({"error": error}).encode()
        self.send_response(code, message or reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _environ(self, body: _Body, length: Optional[str]) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "iso-8859-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": self.server_version,
            "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            # The gateway polls it to see a client that went away while a reply is made.
            "aichatonline_sync.socket": self.connection,
        }
        if self.headers.get("Content-Type"):
            environ["CONTENT_TYPE"] = self.headers["Content-Type"]
        if length is not None:
            environ["CONTENT_LENGTH"] = length
        for name, value in self.headers.items():
            if "_" in name:
                continue  # X_Forwarded_For would pass for X-Forwarded-For (as wsgiref does)
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _run(self) -> None:
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            size = -1
        if "Transfer-Encoding" in self.headers:  # a chunked request body is not read here
            self.close_connection = True
            self.send_error(
                411,
                "Length Required",
                "a chunked request body is not supported by this server: send a Content-Length",
            )
            return
        if not self.server.reply_begins(self.connection):
            self.close_connection = True  # draining: it was idle when the drain began
            return
        try:
            self._answer(length, size)
        finally:
            if self.server.reply_ends(self.connection):
                self.close_connection = True  # draining: no more requests on it

    def _answer(self, length: Optional[str], size: int) -> None:
        body = _Body(self.rfile, max(size, 0))
        response = _Response(self)
        result: Iterable[bytes] = ()
        try:
            result = self.server.app(self._environ(body, length), response.start_response)
            for data in result:
                response.write(data)
            response.finish()
        except _ClientGone as exc:
            logger.debug("the client %s went away: %s", self.address_string(), exc.__cause__)
            self.close_connection = True
            return
        except Exception:
            logger.exception("the WSGI application failed on %s %s", self.command, self.path)
            self.close_connection = True
            if not response.sent:
                with contextlib.suppress(OSError):
                    self.send_error(500)
            return
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        try:
            kept = size >= 0 and body.discard()
        except OSError:
            kept = False
        if not kept:
            self.close_connection = True


class GatewayServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP/1.1 server of one WSGI application (a thread per connection)."""

    daemon_threads = True  # at exit, requests in progress do not hold the process
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of clients connecting at once (16
    # openai clients starting together) overflows it, and the kernel drops their SYNs, which are
    # sent again only after 1, 2, 4... seconds. 128 is what the emulator and most servers use.
    request_queue_size = 128

    def __init__(
        self, app: Callable[..., Iterable[bytes]], host: str = "127.0.0.1", port: int = 8000
    ) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._busy: set[socket.socket] = set()  #: connections with a reply in progress
        self._draining = False
        self._changed = threading.Condition()  #: guards the three above
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._changed:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._changed:
            self._connections.discard(request)
        super().shutdown_request(request)

    def reply_begins(self, connection: socket.socket) -> bool:
        """A request was read on ``connection``; ``False`` when it is not to be answered (the
        server is draining, and the connection was idle when the drain began)."""
        with self._changed:
            if self._draining and connection not in self._busy:
                return False
            self._busy.add(connection)
            return True

    def reply_ends(self, connection: socket.socket) -> bool:
        """The reply on ``connection`` ended; ``True`` when the connection is to be closed now
        (the server is draining)."""
        with self._changed:
            self._busy.discard(connection)
            self._changed.notify_all()
            return self._draining

    def drain(self, timeout: float) -> int:
        """Stop listening and taking requests, and wait up to ``timeout`` seconds for the replies
        in progress (streams included) to end, as gunicorn's graceful stop does. A kept-alive idle
        connection is closed at once, a busy one after its reply. Call it once ``serve_forever``
        has returned, then :meth:`server_close`. Returns how many replies are still in progress.
        """
        socketserver.TCPServer.server_close(self)  # new connections are refused from now on
        with self._changed:
            self._draining = True
            idle = self._connections - self._busy
        for connection in idle:
            with contextlib.suppress(OSError):  # it ended meanwhile
                connection.shutdown(socket.SHUT_RDWR)
        with self._changed:
            self._changed.wait_for(lambda: not self._busy, timeout)
            return len(self._busy)

    @property
    def replies_in_progress(self) -> int:
        """How many replies are being answered now."""
        with self._changed:
            return len(self._busy)

    def server_close(self) -> None:
        """Stop listening, and end the connections still open: a kept-alive idle one at once (it
        would otherwise wait out its 75 s idle timeout, a thread and a socket each), a reply in
        progress at its next write (its upstream chat is then closed)."""
        super().server_close()
        with self._changed:
            self._draining = True
            still_open = list(self._connections)
        for connection in still_open:
            with contextlib.suppress(OSError):  # it ended meanwhile
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's thread failed outside the application (socketserver would print it).

        A client that resets or drops a kept-alive connection, or times out, is normal: a debug
        record. Anything else is logged with its traceback.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            logger.debug("the connection of %s ended: %r", client_address, exc)
        else:
            logger.exception("the gateway server failed on a connection of %s", client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's full name (a DNS query): not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def url(self) -> str:
        """The base URL it listens on, such as ``http://127.0.0.1:8000``."""
        host, port = self.server_address[:2]
        host = str(host)
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"
