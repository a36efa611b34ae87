"""What the gateway needs of its WSGI server (PEP 3333): the types, a JSON answer, the request body
read within a limit, and a way to see that the client went away."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

from .errors import bad_request

#: What a WSGI server hands the application (PEP 3333).
WSGIEnvironment = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


def _read_exactly(stream: Any, size: int) -> bytes:
    """``size`` bytes of ``wsgi.input`` (fewer only at its end)."""
    parts: list[bytes] = []
    while size > 0:
        data = stream.read(size)
        if not data:
            break
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def read_json(environ: WSGIEnvironment, limit: int) -> Any:
    """The request body, parsed: at most ``limit`` bytes of JSON."""
    stream = environ.get("wsgi.input")
    raw_length = str(environ.get("CONTENT_LENGTH") or "").strip()
    too_large = f"the request body is larger than this gateway's limit of {limit} bytes"
    if raw_length:
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError(raw_length)
        except ValueError:
            raise bad_request(f"invalid Content-Length {raw_length!r}") from None
        if length > limit:
            raise bad_request(too_large, code="request_too_large")
        data = _read_exactly(stream, length) if length else b""
        if len(data) < length:
            raise bad_request("the request body ended before its Content-Length")
    elif environ.get("wsgi.input_terminated") and stream is not None:
        data = _read_exactly(stream, limit + 1)
        if len(data) > limit:
            raise bad_request(too_large, code="request_too_large")
    else:
        data = b""
    if not data.strip():
        raise bad_request(
            "the request has no body: send a JSON object (with a Content-Length), "
            'such as {"model": "gpt-4o-mini", "messages": [...]}'
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def respond_json(
    start_response: StartResponse,
    status: int,
    payload: Any,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """Answer ``status`` with ``payload`` as a JSON body of known length; returns the body."""
    body = json.dumps(payload).encode()
    start_response(
        f"{status} {_REASONS[status]}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


#: Where WSGI servers put the client's socket in the environ (gunicorn).
_SOCKET_KEYS = ("gunicorn.socket",)
#: Where waitress puts a function that tells whether the client went away.
_DISCONNECTED_KEY = "waitress.client_disconnected"


def client_check(environ: WSGIEnvironment) -> Optional[Callable[[], bool]]:
    """A function that tells whether the client went away, when the server gives a way to see it
    (waitress's own, or the client's socket)."""
    check = environ.get(_DISCONNECTED_KEY)
    if callable(check):
        return lambda: bool(check())
    for key in _SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return lambda: _client_gone(sock)
    return None


def _client_gone(sock: socket.socket) -> bool:
    """Whether the client closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError):  # a TLS socket refuses MSG_PEEK
        return False
    except OSError:
        return True
