"""The server of ``aichatonline gateway``: the WSGI application on waitress, set up for streaming.

`waitress <https://docs.pylonsproject.org/projects/waitress/>`_ reads and writes every socket in
one loop (``wasyncore``) and runs the application in a pool of threads. Its settings here, and why:

- ``threads``: a streamed reply holds its thread until its last piece, so the pool is as many
  streams as are served at a time (:data:`THREADS`, as many as the command's upstream pool keeps
  connections); a request beyond them waits in waitress's queue.
- ``connection_limit``: idle kept-alive connections count too (:data:`CONNECTION_LIMIT`).
- ``send_bytes`` is left at waitress's default of 1 (the setting is deprecated): each write of the
  application is sent from its own thread at once, so every SSE event goes out when it is made;
  waitress sets ``TCP_NODELAY``. ``outbuf_high_watermark`` stays at 16 MiB: beyond it, a thread
  writing to a client that reads slowly waits.
- ``channel_request_lookahead``: the loop keeps reading a connection whose request is being
  answered, so that a client that goes away is seen while a reply that is not streamed is made
  (``environ["waitress.client_disconnected"]``, which the gateway polls).
- ``asyncore_use_poll``: ``select()`` cannot watch a descriptor numbered above 1023.
- ``channel_timeout``: an idle kept-alive connection is closed after 75 s; a reply in progress is
  never cut by it.
- ``log_socket_errors`` off: a client that resets its connection is normal, not a traceback.

:class:`GatewayServer` keeps the interface of :class:`socketserver.BaseServer` that the command
uses (``serve_forever``, ``shutdown``, ``server_close``, ``server_address``) and adds a graceful
stop (:meth:`~GatewayServer.drain`). It uses waitress's public API: ``create_server`` with a map
and a socket of its own, the dispatchers' ``accepting``/``del_channel``/``handle_close``, the
server's ``active_channels`` and ``task_dispatcher``, and each channel's ``requests`` and
``total_outbufs_len`` (read under its ``requests_lock`` and ``outbuf_lock``) and ``will_close``,
as waitress's own idle-channel maintenance does.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

from .._version import __version__
from .._wire import redact as _redact

try:
    from waitress import wasyncore  # type: ignore[import-untyped]
    from waitress.server import create_server  # type: ignore[import-untyped]
except ImportError as exc:
    raise ImportError(
        "the gateway's server is waitress, which is not installed: "
        'pip install "aichatonline-sync[gateway]"'
    ) from exc

__all__ = ["CONNECTION_LIMIT", "THREADS", "GatewayServer"]

logger = _redact.logger("aichatonline_sync.gateway")

#: Replies (streams included) answered at a time.
THREADS = 256
#: Connections open at a time, idle kept-alive ones included.
CONNECTION_LIMIT = 1024
#: How long one turn of the socket loop waits when nothing happens; ``shutdown`` wakes it sooner.
_LOOP_SECONDS = 1.0
#: How long ``server_close`` waits for the application threads to see their connections closed.
_THREADS_GRACE = 1.0

_SETTINGS: dict[str, Any] = {
    "threads": THREADS,
    "connection_limit": CONNECTION_LIMIT,
    "channel_request_lookahead": 1,
    "asyncore_use_poll": True,
    "channel_timeout": 75,
    "log_socket_errors": False,
    "ident": f"aichatonline-gateway/{__version__}",
}


def _error(message: str, code: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


_SHUTTING_DOWN = _error(
    "the gateway is shutting down: send the request again", "service_unavailable"
)
_FAILED = _error("the gateway failed on this request (its log says why)", "internal_server_error")


class _Replies:
    """The application as the server calls it: counts the replies in progress (from the call to
    the body's ``close``), answers HEAD without a body, a failure of the application before its
    answer with a 500 in OpenAI's shape, and, while the server drains, a new request with a 503
    (the drain then closes its connection)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._count = 0
        self.draining = False
        self.changed = threading.Condition()  #: guards ``_count`` and ``draining``

    @property
    def count(self) -> int:
        """The replies in progress."""
        with self.changed:
            return self._count

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with self.changed:
            refused = self.draining
            if not refused:
                self._count += 1
        if refused:
            return _answer(start_response, "503 Service Unavailable", _SHUTTING_DOWN, environ)
        try:
            result = self._app(environ, start_response)
        except Exception:
            self._ended()
            logger.exception(
                "the WSGI application failed on %s %s",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
            )
            return _answer(
                start_response, "500 Internal Server Error", _FAILED, environ, sys.exc_info()
            )
        except BaseException:
            self._ended()
            raise
        body = _Body(result, self._ended)
        if environ.get("REQUEST_METHOD") == "HEAD":
            body.close()
            return []
        return body

    def _ended(self) -> None:
        with self.changed:
            self._count -= 1
            self.changed.notify_all()


def _answer(
    start_response: Callable[..., Any],
    status: str,
    body: bytes,
    environ: dict[str, Any],
    exc_info: Any = None,
) -> list[bytes]:
    """A JSON answer of the server itself."""
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(status, headers, exc_info)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


class _Body:
    """The application's body, with a ``close`` that also counts the reply out (once)."""

    def __init__(self, result: Iterable[bytes], ended: Callable[[], None]) -> None:
        self._result = result
        self._ended: Optional[Callable[[], None]] = ended
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            with self._lock:
                ended, self._ended = self._ended, None
            if ended is not None:
                ended()


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)``: bound here, so that an address in use is an
    ``OSError`` before any of waitress's threads start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class GatewayServer:
    """A WSGI application on waitress, bound and listening, served by :meth:`serve_forever`."""

    def __init__(
        self, app: Callable[..., Iterable[bytes]], host: str = "127.0.0.1", port: int = 8000
    ) -> None:
        sock = _listening_socket(host, port)
        self.server_address: tuple[Any, ...] = sock.getsockname()
        self._replies = _Replies(app)
        self._map: dict[int, Any] = {}
        try:
            self._server = create_server(self._replies, map=self._map, sockets=[sock], **_SETTINGS)
        except BaseException:
            sock.close()
            raise
        self._listening = True
        self._closed = False
        self._lock = threading.Lock()  #: guards ``_stop``
        self._stop = False
        self._idle = threading.Event()  #: set while ``serve_forever`` is not running
        self._idle.set()

    def _turn(self, timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=self._map, use_poll=True, count=1)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` is called from another thread (or an exception, such as
        ``KeyboardInterrupt`` from a signal handler, ends it)."""
        with self._lock:
            self._stop = False
            self._idle.clear()
        try:
            while True:
                with self._lock:
                    if self._stop:
                        return
                self._turn(_LOOP_SECONDS)
        finally:
            self._idle.set()

    def shutdown(self) -> None:
        """Make :meth:`serve_forever` return, and wait until it has (at once when it is not
        running). Call it from another thread."""
        with self._lock:
            self._stop = True
        if not self._closed:
            self._server.pull_trigger()  # the loop's wait ends now
        self._idle.wait()

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self._server.accepting = False
            self._server.del_channel()
            self._server.socket.close()

    def _end_idle_connections(self) -> None:
        """Close each connection that has no request and nothing left to send. Runs in the loop's
        thread, the only one that adds a request to a channel: a channel found without one has
        no thread of the application writing to it, until this thread reads from it again."""
        for channel in list(self._server.active_channels.values()):
            with channel.requests_lock:
                busy = bool(channel.requests)
            if busy:
                continue
            with channel.outbuf_lock:
                unsent = channel.total_outbufs_len
            if not unsent:
                channel.will_close = True

    def drain(self, timeout: float) -> int:
        """Stop listening and taking requests, and serve the replies in progress (streams
        included) up to ``timeout`` seconds, as gunicorn's graceful stop does: an idle kept-alive
        connection is closed at once, a busy one after its reply. Call it once ``serve_forever``
        has returned, in the thread that ran it, then :meth:`server_close`. Returns how many
        replies are still in progress."""
        self._stop_listening()
        with self._replies.changed:
            self._replies.draining = True
        deadline = time.monotonic() + timeout
        while True:
            self._end_idle_connections()
            left = deadline - time.monotonic()
            if not self._server.active_channels or left <= 0:
                return self._replies.count
            self._turn(min(left, 0.05))

    @property
    def replies_in_progress(self) -> int:
        """How many replies are being answered now."""
        return self._replies.count

    def server_close(self) -> None:
        """Stop listening, and end the connections still open: a kept-alive idle one at once, a
        reply in progress at its next write (its upstream chat is then closed). Call it once
        ``serve_forever`` has returned."""
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        with self._replies.changed:
            self._replies.draining = True
        for channel in list(self._server.active_channels.values()):
            channel.handle_close()
        self._server.close()  # with it, the trigger that wakes the loop
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=_THREADS_GRACE)

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
