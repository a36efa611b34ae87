"""One model of the service and its faults, shared by both test doubles: the emulator
(:mod:`.emulator`, a real server on loopback) and the ``responses`` mock (:mod:`.mock`).

Both take their reply with :func:`reply_source`, build their faults with the functions here and
queue them in a :class:`FaultQueue`, and judge a chat request with :func:`chat_rejection`. So the
two accept the same arguments, refuse the same ones with the same error
(:class:`~aichatonline_sync.InvalidRequestError`, a ``ValueError``), and answer the same request
with the same status and body. A fault only a socket can play
(:class:`Stall`, :class:`Raw`) is modelled here too; only the emulator offers it.

Faults:

- :class:`Reply`: a whole HTTP reply (``fail``, ``html``, ``token_reply``, and the service's own
  401 and 400 answers).
- :class:`ErrorLine`: HTTP 200, ``after`` pieces, then an error line.
- :class:`Drop`: ``after`` pieces (none for a token request), then a connection reset.
- :class:`Stall`: ``after`` pieces, then silence for ``seconds`` (None: until the double stops).
- :class:`Raw`: these bytes as the whole response (the emulator only).

:class:`FaultScheduler` holds the methods that queue them, which both doubles inherit.
"""

from __future__ import annotations

import collections
import dataclasses
import http
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union, cast

from .._client.config import check_bool, check_int, is_number
from .._wire.errors import InvalidRequestError
from .._wire.protocol import BLOCK_PAGE, error_json

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "ENDPOINTS",
    "FRAMINGS",
    "Drop",
    "ErrorLine",
    "Fault",
    "FaultQueue",
    "FaultScheduler",
    "Raw",
    "Reply",
    "ReplySource",
    "Stall",
    "chat_rejection",
    "check_content_type",
    "check_endpoint",
    "check_headers",
    "check_seconds",
    "drop",
    "error_line",
    "fail",
    "html",
    "raw",
    "reply_pieces",
    "reply_source",
    "split_pieces",
    "stall",
    "token_reply",
    "unauthorized",
]

#: The endpoints a fault can be queued for.
ENDPOINTS = ("token", "chat")
#: The HTTP framings of a chat reply (the emulator's ``framing=``).
FRAMINGS = ("chunked", "length", "close")
#: Content type of a chat reply.
DEFAULT_CONTENT_TYPE = "text/event-stream;charset=UTF-8"

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_PIECE_RE = re.compile(r"\S+\s*|\s+")


@dataclasses.dataclass(frozen=True)
class Reply:
    """A whole HTTP reply: status, body, its content type, and extra headers (a ``Content-Type``
    among them replaces ``content_type``)."""

    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()

    def header_dict(self) -> dict[str, str]:
        """The reply headers, ``Content-Type`` included."""
        headers = dict(self.headers)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = self.content_type
        return headers


@dataclasses.dataclass(frozen=True)
class ErrorLine:
    """HTTP 200, ``after`` pieces of the reply (fewer if it is shorter), then ``line``."""

    after: int
    line: bytes


@dataclasses.dataclass(frozen=True)
class Drop:
    """``after`` pieces of a chat reply (a token request: no reply at all), then a reset."""

    after: int


@dataclasses.dataclass(frozen=True)
class Stall:
    """``after`` pieces, then nothing for ``seconds`` (None: until the double stops)."""

    after: int
    seconds: Optional[float]


@dataclasses.dataclass(frozen=True)
class Raw:
    """Exactly these bytes as the response, status line too; ``close`` ends the connection."""

    data: bytes
    close: bool


Fault = Union[Reply, ErrorLine, Drop, Stall, Raw]


# --- validators ---------------------------------------------------------------------------------


def check_endpoint(endpoint: object) -> str:
    """``endpoint`` if it is ``"token"`` or ``"chat"``."""
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise InvalidRequestError(f"endpoint must be 'token' or 'chat', not {endpoint!r}")
    return endpoint


def check_status(status: object) -> int:
    """``status`` if a reply with a body can have it: 200 to 599 but 204 and 304, which HTTP
    forbids a body (a client would not read the one sent, and the next reply on the connection
    would start inside it)."""
    value = check_int("status", status, low=200, high=599)
    if value in (204, 304):
        raise InvalidRequestError(f"status {value} cannot carry a body; pick another status")
    return value


def check_seconds(seconds: object, what: str) -> Optional[float]:
    """``seconds`` as a float if it is a finite number >= 0, or None."""
    if seconds is None:
        return None
    if not is_number(seconds):
        raise InvalidRequestError(f"{what} must be a number of seconds, not {seconds!r}")
    try:
        value = float(cast(float, seconds))
    except OverflowError:  # an int too large for a float
        value = math.inf
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise InvalidRequestError(f"{what} must be a finite number >= 0, not {seconds!r}")
    return value


def check_headers(headers: object) -> tuple[tuple[str, str], ...]:
    """``headers`` (a mapping of str to str that HTTP/1.1 can send) as pairs."""
    if headers is None:
        return ()
    if not isinstance(headers, Mapping):
        raise InvalidRequestError(f"headers must map str to str, not {headers!r}")
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequestError(f"header names and values must be str: {name!r}: {value!r}")
        if not name or ":" in name or any(c in name + value for c in "\r\n"):
            raise InvalidRequestError(f"invalid header {name!r}: {value!r}")
        try:
            (name + value).encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"header {name!r} is not latin-1 encodable") from None
        out.append((name, value))
    return tuple(out)


def check_content_type(content_type: object) -> str:
    """``content_type`` if it is a single-line str."""
    if not isinstance(content_type, str) or any(c in content_type for c in "\r\n"):
        raise InvalidRequestError(f"content_type must be a single-line str, not {content_type!r}")
    return content_type


def _check_after(endpoint: str, after: object) -> int:
    value = check_int("after", after)
    if endpoint == "token" and value:
        raise InvalidRequestError("after must be 0 for the token endpoint")
    return value


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"{what} is no text UTF-8 can hold (a lone surrogate?); give bytes to send any bytes"
        ) from None


def _json_bytes(body: object) -> bytes:
    try:
        return json.dumps(body).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"body is not JSON serialisable: {exc}") from None


# --- the reply --------------------------------------------------------------------------------


def split_pieces(text: str) -> list[str]:
    """Split a reply text into the word pieces the doubles stream.

    Each piece is a run of non-space characters with the white space that follows it (a leading run
    of white space is a piece of its own), so ``"".join(split_pieces(text)) == text``.

    :param text: the reply text.
    :returns: the pieces, in order (an empty list for an empty text).
    """
    return _PIECE_RE.findall(text)


def reply_pieces(reply: object) -> list[str]:
    """The pieces of a reply given as a str (split by :func:`split_pieces`) or as an iterable of
    str pieces (read once).

    :raises InvalidRequestError: for anything else, or a piece that is no str.
    """
    if isinstance(reply, str):
        return split_pieces(reply)
    if isinstance(reply, (bytes, bytearray, memoryview, Mapping)) or not isinstance(
        reply, Iterable
    ):
        raise InvalidRequestError(
            f"reply must be a str or an iterable of str pieces, not {type(reply).__name__}"
        )
    pieces = list(reply)
    bad = [piece for piece in pieces if not isinstance(piece, str)]
    if bad:
        raise InvalidRequestError(f"every reply piece must be a str, not {bad[0]!r}")
    return pieces


@dataclasses.dataclass(frozen=True)
class ReplySource:
    """What a double answers chats with: fixed ``pieces``, or ``func`` of the prompt (a str,
    split by :func:`split_pieces`)."""

    pieces: tuple[str, ...] = ()
    func: Optional[Callable[[str], str]] = None

    def pieces_for(self, prompt: str) -> list[str]:
        """The pieces of the reply to ``prompt``; ``"".join()`` of them is the whole reply.

        :raises TypeError: if ``func`` returns something other than a str.
        """
        if self.func is None:
            return list(self.pieces)
        text = self.func(prompt)
        if not isinstance(text, str):
            raise TypeError(f"the reply callable returned {type(text).__name__}, not str")
        return split_pieces(text)


def reply_source(reply: object, default: Union[str, Callable[[str], str]]) -> ReplySource:
    """The one check of a double's ``reply=`` and ``set_reply()``.

    :param reply: None for ``default``; a str (split by :func:`split_pieces`); a callable taking
        the prompt and returning a str; or any other iterable of str pieces (read once, here).
    :param default: the double's own reply when ``reply`` is None.
    :raises InvalidRequestError: for anything else, or a piece that is no str.
    """
    if reply is None:
        reply = default
    if callable(reply) and not isinstance(reply, (str, bytes, bytearray, Mapping)):
        return ReplySource(func=reply)
    return ReplySource(pieces=tuple(reply_pieces(reply)))


# --- the service's own answers ----------------------------------------------------------------


def phrase(status: int) -> str:
    """The reason phrase of ``status`` (``"Unknown"`` for a code HTTP does not name)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def unauthorized() -> Reply:
    """The answer to a chat whose ``UniqueId`` is missing or was not issued by this service."""
    return Reply(401, error_json(401, "invalid UniqueId"))


def chat_rejection(token_known: bool, body: Any) -> Optional[Reply]:
    """How the service refuses a chat request, or None if it accepts it.

    :param token_known: whether the request's ``UniqueId`` is a token the service issued.
    :param body: the request body parsed as JSON (None if it is empty or not JSON).
    :returns: HTTP 401 for an unknown token, else 400 for a body that is not a JSON object with a
        str ``prompt``, else None.
    """
    if not token_known:
        return unauthorized()
    if not isinstance(body, dict):
        return Reply(400, error_json(400, "the body is not a JSON object"))
    if not isinstance(body.get("prompt"), str):
        return Reply(400, error_json(400, "prompt must be a string"))
    return None


# --- faults -------------------------------------------------------------------------------------


def fail(
    status: object,
    *,
    headers: object = None,
    body: object = None,
) -> Reply:
    """An HTTP error reply (see ``Emulator.fail``): a None body is ``{"code": status, "message":
    "<reason phrase>", "data": null}``; a dict or list is sent as JSON; a str or bytes as is
    (``text/plain``)."""
    code = check_status(status)
    pairs = check_headers(headers)
    if body is None:
        return Reply(code, error_json(code, phrase(code)), _JSON, pairs)
    if isinstance(body, (bytes, bytearray)):
        return Reply(code, bytes(body), _TEXT, pairs)
    if isinstance(body, str):
        return Reply(code, _utf8(body, "body"), _TEXT, pairs)
    if isinstance(body, (dict, list)):
        return Reply(code, _json_bytes(body), _JSON, pairs)
    raise InvalidRequestError(f"body must be None, str, bytes, dict or list, not {body!r}")


def html(status: object = 200) -> Reply:
    """A Cloudflare-like block page with ``status``."""
    return Reply(check_status(status), BLOCK_PAGE.encode(), "text/html; charset=UTF-8")


def token_reply(body: object, *, status: object = 200, content_type: object = _JSON) -> Reply:
    """A token reply with exactly this body: str or bytes as is, anything else as JSON."""
    code = check_status(status)
    kind = check_content_type(content_type)
    if isinstance(body, (bytes, bytearray)):
        data = bytes(body)
    elif isinstance(body, str):
        data = _utf8(body, "body")
    else:
        data = _json_bytes(body)
    return Reply(code, data, kind)


def error_line(
    code: object, message: object = "upstream error", *, after: object = 0, key: object = "message"
) -> ErrorLine:
    """``after`` pieces, then ``{"code": code, key: message, "data": null}``."""
    check_int("code", code, low=-(2**31), high=2**31 - 1)
    if not isinstance(message, str) or not isinstance(key, str):
        raise InvalidRequestError("message and key must be str")
    count = check_int("after", after)
    obj = {"code": code, key: message, "data": None}
    try:
        line = json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, as a JavaScript backend sends it
        line = json.dumps(obj).encode()
    return ErrorLine(count, line + b"\n")


def drop(endpoint: object = "chat", *, after: object = 0) -> Drop:
    """A connection reset after ``after`` pieces (0 for the token endpoint)."""
    return Drop(_check_after(check_endpoint(endpoint), after))


def stall(endpoint: object = "chat", *, after: object = 0, seconds: object = None) -> Stall:
    """Silence after ``after`` pieces (0 for the token endpoint) for ``seconds``."""
    count = _check_after(check_endpoint(endpoint), after)
    return Stall(count, check_seconds(seconds, "seconds"))


def raw(data: object, *, close: object = True) -> Raw:
    """These bytes as the whole response."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequestError(f"data must be bytes, not {type(data).__name__}")
    return Raw(bytes(data), check_bool("close", close))


class FaultQueue:
    """Faults per endpoint, each answering the next ``times`` requests to it, in FIFO order.

    Thread-safe: both doubles take faults from many request threads at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[list[Any]]] = {
            name: collections.deque() for name in ENDPOINTS
        }

    def add(self, endpoint: object, fault: Fault, times: object = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests to ``endpoint``."""
        name = check_endpoint(endpoint)
        count = check_int("times", times, low=1)
        with self._lock:
            self._queues[name].append([fault, count])

    def take(self, endpoint: str) -> Optional[Fault]:
        """The fault that answers this request to ``endpoint``, or None."""
        with self._lock:
            queue = self._queues[endpoint]
            if not queue:
                return None
            entry = queue[0]
            entry[1] -= 1
            if entry[1] <= 0:
                queue.popleft()
            fault: Fault = entry[0]
            return fault

    def pending(self, endpoint: object = None) -> int:
        """How many replies are still queued for ``endpoint`` (None: both); ``times=3`` counts 3."""
        names = ENDPOINTS if endpoint is None else (check_endpoint(endpoint),)
        with self._lock:
            return sum(entry[1] for name in names for entry in self._queues[name])

    def clear(self) -> None:
        """Forget every queued fault."""
        with self._lock:
            for queue in self._queues.values():
                queue.clear()


class FaultScheduler:
    """The faults both test doubles play, scheduled the same way: each call queues one fault,
    built and checked here, for the next ``times`` requests to its endpoint, after the faults
    queued before it. A bad argument raises :class:`~aichatonline_sync.InvalidRequestError` (a
    ``ValueError``) and queues nothing.

    :class:`~aichatonline_sync.testing.Emulator` and
    :class:`~aichatonline_sync.testing.pytest_plugin.AiChatOnlineMock` inherit these methods; the
    emulator adds the faults only it offers (``stall``, ``token_reply``, ``raw_reply``).
    """

    #: The faults queued and not yet played, per endpoint.
    _faults: FaultQueue

    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        headers: Optional[Mapping[str, str]] = None,
        body: Union[str, bytes, dict[str, Any], list[Any], None] = None,
        times: int = 1,
    ) -> None:
        """Answer the next request(s) to ``endpoint`` with an HTTP error status.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200 to 599, but not 204 or 304, which carry no body).
        :param headers: extra reply headers, e.g. ``{"Retry-After": "2"}`` or
            ``{"retry-after-ms": "150"}``; a ``Content-Type`` here replaces the default one.
        :param body: None for ``{"code": status, "message": "<reason phrase>", "data": null}``; a
            dict or list is sent as JSON; a str or bytes as is (``text/plain``).
        :param times: how many requests get this reply.
        """
        self._faults.add(endpoint, fail(status, headers=headers, body=body), times)

    def error_line(
        self,
        code: int,
        message: str = "upstream error",
        *,
        after: int = 0,
        key: str = "message",
        times: int = 1,
    ) -> None:
        """Answer the next chat(s) with HTTP 200, ``after`` pieces of the reply, then the error
        line ``{"code": code, key: message, "data": null}``; the body then ends normally.

        :param code: the body-level error code, e.g. 429 or 500.
        :param message: the error message.
        :param after: how many pieces come first (fewer if the reply is shorter).
        :param key: the key of the message (``"message"`` or ``"msg"``).
        :param times: how many chats get this reply.
        """
        self._faults.add("chat", error_line(code, message, after=after, key=key), times)

    def html(self, endpoint: str = "chat", *, status: int = 200, times: int = 1) -> None:
        """Answer the next request(s) to ``endpoint`` with a Cloudflare-like HTML page.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200, or e.g. 403 or 503).
        :param times: how many requests get the page.
        """
        self._faults.add(endpoint, html(status), times)

    def drop(self, endpoint: str = "chat", *, after: int = 0, times: int = 1) -> None:
        """Break the connection of the next request(s) to ``endpoint``.

        A chat gets the 200 headers and ``after`` pieces, then the connection breaks; a token
        request breaks with no reply at all. The emulator resets the real connection (RST): a
        chunked body misses its last chunk, a length-delimited one has fewer bytes than declared.
        The mock, which has no socket, fails the body's next read with ``ConnectionResetError``.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param after: how many pieces a chat gets before the break (must be 0 for the token).
        :param times: how many requests get this treatment.
        """
        self._faults.add(endpoint, drop(endpoint, after=after), times)

    def pending_faults(self, endpoint: Optional[str] = None) -> int:
        """How many fault replies are still queued.

        :param endpoint: ``"token"``, ``"chat"``, or None for both.
        :returns: the number of replies (a fault with ``times=3`` counts 3).
        """
        return self._faults.pending(endpoint)
