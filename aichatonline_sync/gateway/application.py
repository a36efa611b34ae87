""":class:`GatewayApp`, the WSGI application (routing, the key, CORS, logging, metrics), and the
ways to make one: :func:`make_app`, :func:`app_from_env`, :func:`make_server`."""

from __future__ import annotations

import hmac
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import ChatStream, Session
from .._client import env as _env
from .._client.config import check_int
from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError, InvalidRequestError
from .._wire.protocol import MODELS
from .errors import Refusal, refusal_for
from .limits import ReplyLimiter
from .metrics import metrics as _metrics
from .metrics import metrics_hooks
from .replies import (
    EVENTS,
    SSE_HEADERS,
    EventStream,
    limited,
    limiter_for,
    model_object,
    whole_reply,
)
from .requests import (
    Job,
    canonical,
    parse_chat_request,
    parse_completion_request,
    parse_response_request,
)
from .wsgi import (
    StartResponse,
    WSGIApplication,
    WSGIEnvironment,
    client_check,
    read_json,
    respond_json,
)

if TYPE_CHECKING:
    from .server import GatewayServer

logger = _redact.logger("aichatonline_sync.gateway")

#: The largest request body accepted (a 400 above it).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: The variable of :func:`app_from_env`'s CORS origins (comma-separated).
CORS_ORIGINS_ENV = "AICHATONLINE_GATEWAY_CORS_ORIGINS"
#: How often a reply that is not streamed checks that its client is still there.
_CLIENT_CHECK_SECONDS = 0.05


class _Forward(logging.Handler):
    """Hands the package's records to another logger (gunicorn's error log)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


_logging_lock = threading.Lock()
_logging_done = False


def _has_handler(log: logging.Logger) -> bool:
    """Whether a record of ``log`` reaches a handler that writes it somewhere."""
    current: Optional[logging.Logger] = log
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def _attach_logging(environ: WSGIEnvironment) -> None:
    """Make the package's warnings and errors reach the server's log, once per process: under
    gunicorn its error log (at its level), elsewhere stderr, when nothing else is set up."""
    global _logging_done
    with _logging_lock:
        if _logging_done:
            return
        _logging_done = True
        package = _redact.logger("aichatonline_sync")
        # gunicorn's error logger, looked up: ``getLogger`` would make one that nothing reads.
        target = logging.root.manager.loggerDict.get("gunicorn.error")
        if str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn"):
            if (
                isinstance(target, logging.Logger)
                and target.handlers
                and not any(isinstance(h, _Forward) for h in package.handlers)
            ):
                package.addHandler(_Forward(target))
                if package.level == logging.NOTSET:
                    package.setLevel(target.getEffectiveLevel())
        elif not _has_handler(package):
            handler = logging.StreamHandler(sys.stderr)
            handler.setLevel(logging.WARNING)
            handler.setFormatter(
                logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
            )
            package.addHandler(handler)


_CORS_HEADERS = ("authorization", "content-type", "openai-organization", "openai-project")
_CORS_METHODS = "GET, POST, HEAD, OPTIONS"
_CORS_EXPOSE = "retry-after, retry-after-ms, x-request-id"


def _cors_allowed_headers(requested: str) -> str:
    """The headers of a preflight's ``Access-Control-Request-Headers`` that are allowed."""
    allowed = []
    for raw in requested.split(","):
        name = raw.strip().lower()
        if name and (name in _CORS_HEADERS or name.startswith("x-stainless-")):
            allowed.append(name)
    return ", ".join(allowed or _CORS_HEADERS)


def _check_origins(origins: object, where: str) -> tuple[str, ...]:
    if isinstance(origins, str):
        origins = [origins]
    if not isinstance(origins, (list, tuple, set, frozenset)):
        raise InvalidRequestError(f"{where} must be a sequence of origins, not {origins!r}")
    checked = []
    for origin in origins:
        if not isinstance(origin, str) or not (
            origin == "*" or re.fullmatch(r"https?://[^/\s,]+", origin)
        ):
            raise InvalidRequestError(
                f"{where}: {origin!r} is not an origin (like 'https://app.example.com', "
                "scheme and host and an optional port, no path; or '*' for any)"
            )
        checked.append(origin.rstrip("/"))
    return tuple(checked)


_APPS: weakref.WeakSet[GatewayApp] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked process (a gunicorn worker, with --preload too) must not share the parent's
    # connections: each app makes its own session again, on its first request.
    for gateway in list(_APPS):
        gateway._forget_session()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_Handler = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]


class GatewayApp:
    """The gateway's WSGI application; make one with :func:`make_app`. Threads may share it.

    :ivar session: the :class:`~aichatonline_sync.Session` it sends through (made on first use
        when none was given).
    :ivar cors_origins: the origins that browsers may call it from (``"*"``: any).
    """

    def __init__(
        self,
        session: Optional[Session],
        *,
        api_key: Optional[str],
        session_options: Mapping[str, Any],
        max_body_bytes: int,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self._given = session
        self._session_options = dict(session_options)
        self._owned: Optional[Session] = None
        self._api_key = None if api_key is None else api_key.encode("ascii")
        self._max_body = max_body_bytes
        self.cors_origins = tuple(cors_origins)
        self._lock = threading.Lock()
        self._active = 0  # chats in progress
        self._most = 0  # the most chats at a time so far
        self._metrics = _metrics()
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
                self._owned = Session(event_hooks=metrics_hooks(), **self._session_options)
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
        cors = f", cors_origins={list(self.cors_origins)!r}" if self.cors_origins else ""
        session = self._given or self._owned
        return f"<GatewayApp session={session!r}{key}{cors}>"

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not _logging_done:
            _attach_logging(environ)
        method = str(environ.get("REQUEST_METHOD") or "GET").upper()
        path = str(environ.get("PATH_INFO") or "/")
        if len(path) > 1:
            path = path.rstrip("/")
        route = _route_label(path)
        started = time.perf_counter()
        metrics = self._metrics
        cors = self._cors_headers(environ)

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # A stream calls this once the upstream's first piece is here, and its first chunk
            # follows at once: its time to first byte is measured here as for any answer.
            metrics.request(route, int(status[:3]))
            metrics.first_byte(route, time.perf_counter() - started)
            return start_response(status, headers + cors if cors else headers, exc_info)

        try:
            if method == "OPTIONS":
                return self._options(path, environ, respond, bool(cors))
            handler = self._route(method, path)
            if route not in ("/health", "/metrics"):
                self._authorize(environ)
            body = handler(environ, respond)
            return [] if method == "HEAD" else body
        except Refusal as refusal:
            self._log_failure(environ, method, path, refusal)
            body = respond_json(respond, refusal.status, refusal.error(), refusal.headers)
            return [] if method == "HEAD" else body
        except Exception:
            logger.exception("the gateway failed on %s %s", method, path)
            failure = Refusal(500, "the gateway failed (see its log)", type="server_error")
            self._log_failure(environ, method, path, failure)
            return respond_json(respond, 500, failure.error())

    @staticmethod
    def _log_failure(environ: WSGIEnvironment, method: str, path: str, refusal: Refusal) -> None:
        """One access-style line per failed request: warning for 5xx, info otherwise."""
        level = logging.WARNING if refusal.status >= 500 else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(
                level,
                '%s "%s %s" %d %s: %s',
                environ.get("REMOTE_ADDR") or "-",
                method,
                path,
                refusal.status,
                refusal.code or refusal.type,
                refusal.message,
            )

    def _cors_headers(self, environ: WSGIEnvironment) -> list[tuple[str, str]]:
        origins = self.cors_origins
        if not origins:
            return []
        origin = environ.get("HTTP_ORIGIN")
        if not origin:
            return []
        if "*" in origins:
            allowed = "*"
        elif origin in origins:
            allowed = origin
        else:
            return []
        return [
            ("Access-Control-Allow-Origin", allowed),
            ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", _CORS_EXPOSE),
        ]

    def _options(
        self, path: str, environ: WSGIEnvironment, respond: StartResponse, cors: bool
    ) -> list[bytes]:
        """A CORS preflight (answered without the key), or a plain ``OPTIONS``."""
        allowed = _ALLOWED.get(path) or (
            ("GET", "HEAD") if path.startswith("/v1/models/") else None
        )
        if allowed is None:
            raise _unknown_path("OPTIONS", path)
        headers = [("Allow", ", ".join((*allowed, "OPTIONS"))), ("Content-Length", "0")]
        if cors and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
            requested = str(environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS") or "")
            headers += [
                ("Access-Control-Allow-Methods", _CORS_METHODS),
                ("Access-Control-Allow-Headers", _cors_allowed_headers(requested)),
                ("Access-Control-Max-Age", "600"),
            ]
        respond("204 No Content", headers)
        return []

    def _route(self, method: str, path: str) -> _Handler:
        handler: _Handler
        allowed = _ALLOWED.get(path)
        if allowed is not None:
            handler = getattr(self, _HANDLERS[path])
        elif path.startswith("/v1/models/"):
            model = path[len("/v1/models/") :]
            allowed = ("GET", "HEAD")

            def handler(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
                return self._model(model, start_response)

        else:
            raise _unknown_path(method, path)
        if method not in allowed:
            raise Refusal(
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
        raise Refusal(
            401,
            message,
            code="invalid_api_key",
            headers=[("WWW-Authenticate", 'Bearer realm="aichatonline-gateway"')],
        )

    def _health(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return respond_json(start_response, 200, {"status": "ok"}, [("Cache-Control", "no-store")])

    def _metrics_page(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        rendered = self._metrics.render()
        if rendered is None:
            raise Refusal(
                501,
                'metrics need prometheus-client: pip install "aichatonline-sync[gateway]"',
                type="server_error",
                code="metrics_unavailable",
            )
        content_type, body = rendered
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    def _models(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return respond_json(
            start_response, 200, {"object": "list", "data": [model_object(m) for m in MODELS]}
        )

    def _model(self, model: str, start_response: StartResponse) -> list[bytes]:
        canonical(model)
        return respond_json(start_response, 200, model_object(model))

    def _chat_completions(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(parse_chat_request, environ, start_response)

    def _completions(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(parse_completion_request, environ, start_response)

    def _responses(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(parse_response_request, environ, start_response)

    def _reply(
        self,
        parse: Callable[[object], Job],
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        job = parse(read_json(environ, self._max_body))
        model = canonical(job.model)
        session = self.session
        self._begin(session)
        body: Optional[EventStream] = None
        try:
            created = int(time.time())
            limiter = limiter_for(job)
            # chat() returns once the first piece has arrived: errors before it get a status.
            stream = session.chat(job.messages, model=model, keep_text=False)
            if job.stream:
                try:
                    events = EVENTS[job.kind](job, stream, limiter, created, self._metrics)
                    start_response("200 OK", list(SSE_HEADERS))
                except BaseException:
                    stream.close()
                    raise
                self._metrics.stream_started()
                body = EventStream(stream, events, self._stream_ended)
                return body
            with stream:
                text = self._read_whole(stream, limiter, environ)
            payload = whole_reply(job, stream, text, limiter.finish_reason or "stop", created)
            return respond_json(start_response, 200, payload)
        except AiChatOnlineError as exc:
            refusal = refusal_for(exc)
            if refusal.type != "invalid_request_error":
                self._metrics.upstream_error(refusal.type)
            raise refusal from exc
        finally:
            if body is None:
                self._end()

    @staticmethod
    def _read_whole(stream: ChatStream, limiter: ReplyLimiter, environ: WSGIEnvironment) -> str:
        """The reply's text; when the client goes away meanwhile, the upstream chat is closed
        at once (a 499 that no one reads, for the log and the metrics)."""
        gone = client_check(environ)
        if gone is None:
            return "".join(limited(stream, limiter))
        parts = []
        checked = time.monotonic()
        for piece in limited(stream, limiter):
            parts.append(piece)
            now = time.monotonic()
            if now - checked >= _CLIENT_CHECK_SECONDS:
                checked = now
                if gone():
                    stream.close()
                    raise Refusal(499, "the client went away before the reply was complete")
        return "".join(parts)

    def _stream_ended(self) -> None:
        self._metrics.stream_ended()
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


def _unknown_path(method: str, path: str) -> Refusal:
    return Refusal(
        404,
        f"no such endpoint: {method} {path} (this gateway serves GET /v1/models, "
        "POST /v1/chat/completions, /v1/completions and /v1/responses, GET /health and "
        "GET /metrics)",
        code="unknown_url",
    )


#: The fixed routes: the methods allowed, and the handler's name.
_ALLOWED: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/responses": ("POST",),
    "/v1/models": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
}
_HANDLERS = {
    "/v1/chat/completions": "_chat_completions",
    "/v1/completions": "_completions",
    "/v1/responses": "_responses",
    "/v1/models": "_models",
    "/health": "_health",
    "/metrics": "_metrics_page",
}


def _route_label(path: str) -> str:
    """The ``path`` label of the metrics: a route, never a raw path (whose values are endless)."""
    if path in _ALLOWED:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


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
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> GatewayApp:
    """The gateway as a WSGI application.

    >>> from aichatonline_sync.gateway import make_app, make_server
    >>> server = make_server(make_app(api_key="s3cret"), port=8000)   # doctest: +SKIP
    >>> server.serve_forever()                                         # doctest: +SKIP

    :param session: the :class:`~aichatonline_sync.Session` to send through, shared by all
        requests; its retries are counted in ``/metrics`` when it was made with
        ``event_hooks=metrics_hooks()``. ``None``: the app makes a ``Session()`` at its first
        request, one in each process (so a forking server's workers do not share connections).
    :param api_key: when given, every request must carry ``Authorization: Bearer <api_key>``.
    :param cors_origins: the origins (``"https://app.example.com"``) whose browser pages may call
        the gateway, or ``["*"]`` for any; empty (the default): no CORS headers at all.
    :param max_body_bytes: the largest request body accepted (default 1 MiB).
    :raises InvalidRequestError: a bad argument.
    """
    if session is not None and not isinstance(session, Session):
        raise InvalidRequestError(f"session must be a Session, not {type(session).__name__}")
    check_int("max_body_bytes", max_body_bytes, low=1)
    return GatewayApp(
        session,
        api_key=_check_key(api_key),
        session_options={},
        max_body_bytes=max_body_bytes,
        cors_origins=_check_origins(cors_origins, "cors_origins"),
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
    :func:`session_options_from_env`, the key ``$AICHATONLINE_GATEWAY_KEY`` (unset or empty:
    no key) and the CORS origins ``$AICHATONLINE_GATEWAY_CORS_ORIGINS`` (comma-separated). The session is made at the first request, one in each process.

    :raises InvalidRequestError: a bad value, naming its variable (or the cache file).
    """
    options = session_options_from_env(environ)
    if "cache" in options:  # a file that is not a reply cache is an error at boot, not per request
        from .. import ReplyCache

        ReplyCache(options["cache"]).close()
    source = os.environ if environ is None else environ
    raw = source.get(CORS_ORIGINS_ENV, "")
    origins = [origin.strip() for origin in raw.split(",") if origin.strip()]
    return GatewayApp(
        None,
        api_key=_env.gateway_key_from_env(environ),
        session_options=options,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
        cors_origins=_check_origins(origins, f"${CORS_ORIGINS_ENV}"),
    )


def make_server(
    application: WSGIApplication, host: str = "127.0.0.1", port: int = 8000
) -> GatewayServer:
    """``application`` on waitress (:class:`~aichatonline_sync.gateway.server.GatewayServer`),
    bound and listening but not yet serving: call its ``serve_forever()`` (and ``shutdown()`` from
    another thread, then ``server_close()``). Its ``url`` is the address it listens on (``port=0``
    picks a free port).

    A reply of known length keeps its connection alive; a streamed body is sent with chunked
    encoding to an HTTP/1.1 client, each piece of the application's iterable at once, and its
    connection is closed after it (waitress's rule; see the manual's "Under aichatonline
    gateway"); when a client goes away, the iterable is closed.

    :raises OSError: the address cannot be bound.
    :raises ImportError: waitress is not installed (``pip install "aichatonline-sync[gateway]"``).
    """
    from .server import GatewayServer

    return GatewayServer(application, host, port)
