"""An OpenAI-compatible gateway: the service behind OpenAI's API, as a WSGI application.

Code written for OpenAI's API (the official ``openai`` client, and everything built on it) talks to
the service by changing its ``base_url``. Serve the gateway with any WSGI server, for example::

    gunicorn -k gthread --threads 32 'aichatonline_sync.gateway:app'
    aichatonline gateway --port 8000          # the standard library's server, for one machine

then::

    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="")

Endpoints: ``GET /v1/models``, ``GET /v1/models/{model}`` and ``POST /v1/chat/completions``, with
``stream`` true (Server-Sent Events of ``chat.completion.chunk`` objects: the role first, one
``delta.content`` per upstream piece, written the moment it arrives, a last chunk with
``finish_reason: "stop"``, then ``data: [DONE]``) or false (one ``chat.completion``). Sampling
parameters the service cannot honour (``temperature``, ``max_tokens``, ``stop``, ...) are accepted
and ignored; ``n`` other than 1, tools and functions, and content other than text are a 400.

Errors are in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 a bad request
(also a body that is not JSON, wrong types, a body over ``max_body_bytes``), 401 a wrong or missing
key (when the gateway has one), 404 an unknown path or model, 405 a wrong method, 429 the upstream
rate-limits, 502 the upstream failed, 504 it timed out (also after the first piece: a read timeout
or the total deadline). A failure after the first streamed chunk ends the stream with the event
``data: {"error": {...}}`` (of the same ``type`` and ``code``), so that OpenAI's clients raise
instead of returning half a reply as if it were whole. When the client goes away in the middle of a stream
(the server's write fails, and it closes the body), the upstream chat is closed at once.

This module is not imported by ``import aichatonline_sync``, and it uses only the public
:class:`~aichatonline_sync.Session` API.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from . import _env, _redact
from ._env import BASE_URL_ENV, GATEWAY_KEY_ENV, MAX_RETRIES_ENV, PROXY_ENV, TIMEOUT_ENV
from ._errors import (
    AiChatOnlineError,
    APITimeoutError,
    IncompleteStreamError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
)
from ._session import MODELS, Session
from ._stream import ChatStream
from ._transport import is_timeout

if TYPE_CHECKING:
    from ._wsgiserver import GatewayServer

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "GATEWAY_KEY_ENV",
    "MAX_RETRIES_ENV",
    "PROXY_ENV",
    "TIMEOUT_ENV",
    "GatewayApp",
    "StartResponse",
    "WSGIApplication",
    "WSGIEnvironment",
    "app",
    "app_from_env",
    "make_app",
    "make_server",
    "session_options_from_env",
]

logger = _redact.logger("aichatonline_sync.gateway")

#: What a WSGI server hands the application (PEP 3333).
WSGIEnvironment = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

#: The largest request body accepted (a 400 above it).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024

#: What ``/v1/models`` says of the model: gpt-4o-mini came out on 2024-07-18.
_MODEL_CREATED = 1721260800
_OWNER = "aichatonline"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}
_ROLES = ("system", "developer", "user", "assistant")
_SSE_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    # nginx (and proxies that follow it) would otherwise buffer the stream.
    ("X-Accel-Buffering", "no"),
]
_DONE = b"data: [DONE]\n\n"


# -- errors -------------------------------------------------------------------------------------


class _Refusal(Exception):
    """An error answer: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = list(headers)

    def error(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> _Refusal:
    return _Refusal(400, message, param=param, code=code)


def _unsupported(param: str, what: str) -> _Refusal:
    return _bad(
        f"{what} are not supported: the service only answers with text",
        param=param,
        code="unsupported_parameter",
    )


def _refusal_for(exc: AiChatOnlineError) -> _Refusal:
    """The answer for an error of the library: the one mapping of our errors to statuses."""
    message = str(exc)
    if isinstance(exc, InvalidRequestError):
        return _bad(message)
    if isinstance(exc, RateLimitError) or (isinstance(exc, UpstreamError) and exc.code == 429):
        headers = []
        retry_after = exc.retry_after if isinstance(exc, RateLimitError) else None
        if retry_after:
            headers = [
                ("Retry-After", str(math.ceil(retry_after))),
                ("retry-after-ms", str(math.ceil(retry_after * 1000))),
            ]
        return _Refusal(
            429, message, type="rate_limit_error", code="rate_limit_exceeded", headers=headers
        )
    if isinstance(exc, APITimeoutError) or (
        isinstance(exc, IncompleteStreamError) and is_timeout(exc)
    ):  # a reply that stalled after its first piece (read timeout, total deadline) too
        return _Refusal(504, message, type="timeout_error", code="upstream_timeout")
    return _Refusal(502, message, type="upstream_error", code="upstream_error")


# -- requests -----------------------------------------------------------------------------------


class _ChatRequest(NamedTuple):
    messages: list[dict[str, str]]
    model: str
    stream: bool


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


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


def _read_json(environ: WSGIEnvironment, limit: int) -> Any:
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
            raise _bad(f"invalid Content-Length {raw_length!r}") from None
        if length > limit:
            raise _bad(too_large, code="request_too_large")
        data = _read_exactly(stream, length) if length else b""
        if len(data) < length:
            raise _bad("the request body ended before its Content-Length")
    elif environ.get("wsgi.input_terminated") and stream is not None:
        data = _read_exactly(stream, limit + 1)
        if len(data) > limit:
            raise _bad(too_large, code="request_too_large")
    else:
        data = b""
    if not data.strip():
        raise _bad(
            "the request has no body: send a JSON object (with a Content-Length), "
            'such as {"model": "gpt-4o-mini", "messages": [...]}'
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None


def _parse_content(content: object, where: str, role: str) -> str:
    """A message's content as text: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise _bad(
            f"{where}.content must be a string or an array of text parts, not {_json_type(content)}",
            param=f"{where}.content",
        )
    texts = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        if not isinstance(part, dict):
            raise _bad(f"{at} must be an object, not {_json_type(part)}", param=at)
        kind = part.get("type")
        if kind != "text":
            raise _bad(
                f"{at} is a {kind!r} part: the service takes text only "
                '(parts like {"type": "text", "text": "..."})',
                param=at,
                code="unsupported_content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{at}.text must be a string, not {_json_type(text)}", param=f"{at}.text")
        texts.append(text)
    return "".join(texts)


def _parse_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise _bad(
            f"'messages' must be an array of messages, not {_json_type(messages)}",
            param="messages",
        )
    if not messages:
        raise _bad("'messages' is empty: give at least one message", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object, not {_json_type(message)}", param=where)
        role = message.get("role")
        if (
            role in ("tool", "function")
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            raise _unsupported(where, "tool and function calls")
        if role not in _ROLES:
            raise _bad(
                f"{where}.role must be one of {', '.join(_ROLES)}, not {role!r}",
                param=f"{where}.role",
            )
        assert isinstance(role, str)
        parsed.append(
            {"role": role, "content": _parse_content(message.get("content"), where, role)}
        )
    return parsed


def _parse_chat_request(body: object) -> _ChatRequest:
    """Check a ``/v1/chat/completions`` body. Unknown fields (sampling parameters) are ignored."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {_json_type(body)}")
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter ('model': 'gpt-4o-mini')", param="model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, not {_json_type(model)}", param="model")
    if model not in MODELS:
        raise _Refusal(
            404,
            f"the model {model!r} does not exist: this gateway serves {', '.join(MODELS)}",
            param="model",
            code="model_not_found",
        )
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, not {_json_type(stream)}", param="stream")
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise _bad(f"'n' must be an integer, not {_json_type(n)}", param="n")
        if n != 1:
            raise _bad(
                f"n={n} is not supported: the service gives one reply per request",
                param="n",
                code="unsupported_value",
            )
    for name in ("tools", "functions"):
        if body.get(name):
            raise _unsupported(name, "tools and functions")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _unsupported(name, "tools and functions")
    return _ChatRequest(_parse_messages(body.get("messages")), model, stream)


# -- answers ------------------------------------------------------------------------------------


def _respond(
    start_response: StartResponse,
    status: int,
    payload: Any,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(
        f"{status} {_REASONS[status]}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": _OWNER}


def _completion(stream: ChatStream, text: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{stream.conversation_id}",
        "object": "chat.completion",
        "created": created,
        "model": stream.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": None,  # the service counts no tokens
    }


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _EventStream:
    """The body of a streamed reply: one SSE event per piece, made when the piece arrives.

    A WSGI server calls :meth:`close` when the body is done, and also when writing to the client
    failed (it went away): that closes the upstream chat at once.
    """

    def __init__(self, stream: ChatStream, created: int, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Optional[Callable[[], None]] = on_close
        self._events = self._generate(stream, created)

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        try:
            self._events.close()  # its ``finally`` closes the stream (if it started)...
            self._stream.close()  # ... and this, if it did not
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()

    @staticmethod
    def _generate(stream: ChatStream, created: int) -> Generator[bytes, None, None]:
        marker = "\x00delta\x00"
        chunk = {
            "id": f"chatcmpl-{stream.conversation_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": stream.model,
            "choices": [{"index": 0, "delta": marker, "logprobs": None, "finish_reason": None}],
        }
        head, tail = _event(chunk).split(json.dumps(marker).encode())
        piece_head, piece_tail = head + b'{"content":', b"}" + tail
        dumps = json.dumps
        try:
            yield head + b'{"role":"assistant","content":""}' + tail
            for piece in stream:
                yield piece_head + dumps(piece).encode() + piece_tail
            chunk["choices"] = [
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            ]
            yield _event(chunk) + _DONE
        except AiChatOnlineError as exc:
            logger.warning("a streamed chat failed after it began: %s", exc)
            yield _event(_refusal_for(exc).error())
        except Exception:
            logger.exception("the gateway failed in the middle of a streamed chat")
            yield _event(
                _Refusal(500, "the gateway failed (see its log)", type="server_error").error()
            )
        finally:
            stream.close()


# -- the application ----------------------------------------------------------------------------

_APPS: weakref.WeakSet[GatewayApp] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked process (a gunicorn worker, with --preload too) must not share the parent's
    # connections: each app makes its own session again, on its first request.
    for gateway in list(_APPS):
        gateway._forget_session()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class GatewayApp:
    """The gateway's WSGI application; make one with :func:`make_app`. Threads may share it.

    :ivar session: the :class:`~aichatonline_sync.Session` it sends through (made on first use
        when none was given).
    """

    def __init__(
        self,
        session: Optional[Session],
        *,
        api_key: Optional[str],
        session_options: Mapping[str, Any],
        max_body_bytes: int,
    ) -> None:
        self._given = session
        self._session_options = dict(session_options)
        self._owned: Optional[Session] = None
        self._api_key = None if api_key is None else api_key.encode("ascii")
        self._max_body = max_body_bytes
        self._lock = threading.Lock()
        self._active = 0  # chats in progress
        self._most = 0  # the most chats at a time so far
        _APPS.add(self)

    def _forget_session(self) -> None:
        self._lock = threading.Lock()
        self._owned = None
        self._active = self._most = 0

    @property
    def session(self) -> Session:
        session = self._given or self._owned
        if session is not None:
            return session
        with self._lock:
            if self._owned is None:
                self._owned = Session(**self._session_options)
                logger.debug("gateway session for process %d: %r", os.getpid(), self._owned)
            return self._owned

    def close(self) -> None:
        """Close the session the app made (not one given to :func:`make_app`). Idempotent."""
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    def __repr__(self) -> str:
        key = ", api_key=***" if self._api_key is not None else ""
        session = self._given or self._owned
        return f"<GatewayApp session={session!r}{key}>"

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD") or "GET").upper()
        path = str(environ.get("PATH_INFO") or "/")
        try:
            handler = self._route(method, path)
            self._authorize(environ)
            return handler(environ, start_response)
        except _Refusal as refusal:
            if refusal.status >= 500:
                logger.warning("%s %s: %d: %s", method, path, refusal.status, refusal.message)
            else:
                logger.debug("%s %s: %d: %s", method, path, refusal.status, refusal.message)
            return _respond(start_response, refusal.status, refusal.error(), refusal.headers)
        except Exception:
            logger.exception("the gateway failed on %s %s", method, path)
            failure = _Refusal(500, "the gateway failed (see its log)", type="server_error")
            return _respond(start_response, 500, failure.error())

    def _route(
        self, method: str, path: str
    ) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
        if len(path) > 1:
            path = path.rstrip("/")
        handler: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
        allowed: tuple[str, ...]
        if path == "/v1/chat/completions":
            allowed, handler = ("POST",), self._chat_completions
        elif path == "/v1/models":
            allowed, handler = ("GET", "HEAD"), self._models
        elif path.startswith("/v1/models/"):
            model = path[len("/v1/models/") :]
            allowed = ("GET", "HEAD")

            def handler(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
                return self._model(model, start_response)

        else:
            raise _Refusal(
                404,
                f"no such endpoint: {method} {path} (this gateway serves GET /v1/models and "
                "POST /v1/chat/completions)",
                code="unknown_url",
            )
        if method not in allowed:
            raise _Refusal(
                405,
                f"{method} is not allowed on {path}: use {' or '.join(allowed)}",
                code="method_not_allowed",
                headers=[("Allow", ", ".join(allowed))],
            )
        return handler

    def _authorize(self, environ: WSGIEnvironment) -> None:
        key = self._api_key
        if key is None:
            return
        header = str(environ.get("HTTP_AUTHORIZATION") or "")
        scheme, _, given = header.strip().partition(" ")
        if not header.strip():
            message = "no API key: send the header 'Authorization: Bearer <key>'"
        elif scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), key
        ):
            return
        else:
            message = "the API key is wrong"
        raise _Refusal(
            401,
            message,
            code="invalid_api_key",
            headers=[("WWW-Authenticate", 'Bearer realm="aichatonline-gateway"')],
        )

    def _models(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return _respond(
            start_response, 200, {"object": "list", "data": [_model_object(m) for m in MODELS]}
        )

    def _model(self, model: str, start_response: StartResponse) -> list[bytes]:
        if model not in MODELS:
            raise _Refusal(
                404,
                f"the model {model!r} does not exist: this gateway serves {', '.join(MODELS)}",
                param="model",
                code="model_not_found",
            )
        return _respond(start_response, 200, _model_object(model))

    def _chat_completions(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        request = _parse_chat_request(_read_json(environ, self._max_body))
        session = self.session
        self._begin(session)
        body: Optional[_EventStream] = None
        try:
            created = int(time.time())
            if request.stream:
                # chat() returns once the first piece has arrived: errors before it get a status.
                stream = session.chat(request.messages, model=request.model, keep_text=False)
                try:
                    start_response("200 OK", list(_SSE_HEADERS))
                except BaseException:
                    stream.close()
                    raise
                body = _EventStream(stream, created, self._end)
                return body
            with session.chat(request.messages, model=request.model, keep_text=False) as stream:
                text = "".join(stream)
            return _respond(start_response, 200, _completion(stream, text, created))
        except AiChatOnlineError as exc:
            raise _refusal_for(exc) from exc
        finally:
            if body is None:
                self._end()

    def _begin(self, session: Session) -> None:
        """Count a chat in; keep a pooled connection for each chat at a time."""
        with self._lock:
            self._active += 1
            grow = self._active > self._most
            if grow:
                self._most = self._active
            active = self._active
        if grow:
            session.ensure_pool(active, grow_to=2 * active)

    def _end(self) -> None:
        with self._lock:
            self._active -= 1


# -- making one ---------------------------------------------------------------------------------


def _check_key(api_key: object) -> Optional[str]:
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise InvalidRequestError(f"api_key must be a str, not {type(api_key).__name__}")
    try:
        return _env.parse_gateway_key(api_key)
    except ValueError as exc:
        raise InvalidRequestError(f"api_key {exc}") from None


def make_app(
    session: Optional[Session] = None,
    *,
    api_key: Optional[str] = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> GatewayApp:
    """The gateway as a WSGI application.

    >>> from aichatonline_sync.gateway import make_app, make_server
    >>> server = make_server(make_app(api_key="s3cret"), port=8000)   # doctest: +SKIP
    >>> server.serve_forever()                                         # doctest: +SKIP

    :param session: the :class:`~aichatonline_sync.Session` to send through, shared by all
        requests. ``None``: the app makes a ``Session()`` at its first request, one in each process
        (so a forking server's workers do not share connections).
    :param api_key: when given, every request must carry ``Authorization: Bearer <api_key>``.
    :param max_body_bytes: the largest request body accepted (default 1 MiB).
    :raises InvalidRequestError: a bad argument.
    """
    if session is not None and not isinstance(session, Session):
        raise InvalidRequestError(f"session must be a Session, not {type(session).__name__}")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes < 1
    ):
        raise InvalidRequestError(f"max_body_bytes must be an int >= 1, not {max_body_bytes!r}")
    return GatewayApp(
        session,
        api_key=_check_key(api_key),
        session_options={},
        max_body_bytes=max_body_bytes,
    )


def session_options_from_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """:class:`~aichatonline_sync.Session` options from the environment, as the ``aichatonline``
    command reads them: ``$AICHATONLINE_BASE_URL``, ``$AICHATONLINE_PROXY``,
    ``$AICHATONLINE_TIMEOUT`` (``SECONDS``, ``CONNECT,READ`` or ``none``),
    ``$AICHATONLINE_MAX_RETRIES`` and ``$AICHATONLINE_CACHE`` (a reply cache file, see
    :class:`~aichatonline_sync.ReplyCache`). Empty ones are unset.

    :raises InvalidRequestError: a bad value, naming its variable.
    """
    options: dict[str, Any] = {}
    base_url = _env.setting_from_env("base_url", environ)
    if base_url is not None:
        options["base_url"] = base_url
    options.update(_env.session_options_from_env(environ))
    return options


def app_from_env(environ: Optional[Mapping[str, str]] = None) -> GatewayApp:
    """The gateway configured from the environment, as :data:`app` is: the session options of
    :func:`session_options_from_env`, and the key ``$AICHATONLINE_GATEWAY_KEY`` (unset or empty:
    no key). The session is made at the first request, one in each process.

    :raises InvalidRequestError: a bad value, naming its variable (or the cache file).
    """
    options = session_options_from_env(environ)
    if "cache" in options:  # a file that is not a reply cache is an error at boot, not per request
        from ._cache import ReplyCache

        ReplyCache(options["cache"]).close()
    return GatewayApp(
        None,
        api_key=_env.gateway_key_from_env(environ),
        session_options=options,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
    )


def make_server(
    application: WSGIApplication, host: str = "127.0.0.1", port: int = 8000
) -> GatewayServer:
    """A threaded HTTP/1.1 server of the standard library for ``application``, bound but not yet
    serving: call its ``serve_forever()`` (and ``shutdown()`` from another thread, then
    ``server_close()``). Its ``url`` is the address it listens on (``port=0`` picks a free port).

    Connections are kept alive; a streamed body is sent with chunked encoding, each piece of the
    application's iterable at once; when a client goes away, the iterable is closed.

    :raises OSError: the address cannot be bound.
    """
    from ._wsgiserver import GatewayServer

    return GatewayServer(application, host, port)


if TYPE_CHECKING:
    #: The gateway configured from the environment (:func:`app_from_env`), made when first used:
    #: ``gunicorn -k gthread --threads 32 'aichatonline_sync.gateway:app'``.
    app: GatewayApp


def __getattr__(name: str) -> Any:
    # ``app`` is made when it is first looked up, not at import: a bad setting is reported then
    # (by gunicorn, as the worker boots), and importing this module reads nothing.
    if name == "app":
        value = app_from_env()
        globals()["app"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
