"""An OpenAI-compatible gateway: the service behind OpenAI's API, as a WSGI application.

Code written for OpenAI's API (the official ``openai`` client, and everything built on it) talks to
the service by changing its ``base_url``. Serve the gateway with any WSGI server, for example::

    gunicorn -k gthread --threads 32 'aichatonline_sync.gateway:app'
    aichatonline gateway --port 8000          # on waitress, for one machine

then::

    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="")

Endpoints: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (``prompt``: a string, or an array of one) and ``POST /v1/responses``
(stateless: ``input`` a string or a list of messages, ``instructions``), each with ``stream`` true
(Server-Sent Events, each piece written the moment it arrives) or false; ``GET /health`` (``200
{"status": "ok"}``, no key, no upstream call) and ``GET /metrics`` (Prometheus' text format, no
key; it needs prometheus-client, else a 501). The dated name ``gpt-4o-mini-2024-07-18`` is the
model.

Faithful to OpenAI's clients: ``stop`` ends the reply before the first stop string (also one that
spans pieces); ``max_tokens``/``max_completion_tokens``/``max_output_tokens`` cut the reply at that
many tokens of the model's tokenizer (``finish_reason: "length"``, a Response ``"incomplete"``);
either way the upstream chat is closed at once. Replies carry ``usage`` (counted offline; ``null``
without the tokenizer, which the ``gateway`` extra brings), and a stream asked for
``stream_options: {"include_usage": true}`` ends with a usage chunk. A parameter that would change
the reply and cannot be honoured (``response_format`` other than text, ``logprobs``, ``n`` other
than 1, tools, audio, ``logit_bias``, ``echo``, ``suffix``, ``previous_response_id``, ...), and a
known parameter of the wrong type, is a 400 naming it (``error.param``). Sampling knobs that only
tune the reply (``temperature``, ``top_p``, ``seed``, the penalties, ``user``, ...) are
type-checked, then ignored.

Errors are in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 a bad request
(also a body that is not JSON, wrong types, a body over ``max_body_bytes``), 401 a wrong or missing
key (when the gateway has one), 404 an unknown path or model, 405 a wrong method, 429 the upstream
rate-limits, 502 the upstream failed, 504 it timed out (also after the first piece: a read timeout
or the total deadline). A failure after the first streamed chunk ends the stream with the event
``data: {"error": {...}}`` (of the same ``type`` and ``code``), so that OpenAI's clients raise
instead of returning half a reply as if it were whole. When the client goes away in the middle of a
stream (the server's write fails, and it closes the body), the upstream chat is closed at once; so
it is for a reply that is not streamed, under a server that tells (waitress's
``waitress.client_disconnected``) or puts the client's socket in the environ (gunicorn's
``gunicorn.socket``), checked every 50 ms while the reply comes. HEAD answers
have no body.

CORS is off unless origins are configured (``make_app(cors_origins=...)``,
``$AICHATONLINE_GATEWAY_CORS_ORIGINS``): a preflight ``OPTIONS`` from an allowed origin is answered
204 without the key, and every answer to it carries ``Access-Control-Allow-Origin``.

Logs: the first request attaches the package's logger to gunicorn's error log (at its level) when
gunicorn serves the app, or to stderr (warnings and errors) when nothing else handles its records.
Each failed request is one line, ``ADDRESS "METHOD PATH" STATUS CODE: MESSAGE`` (a warning for 5xx,
info otherwise).

Metrics under several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory
that the workers can write before gunicorn starts (see :mod:`aichatonline_sync.gateway.metrics`).

This package is not imported by ``import aichatonline_sync``, and it uses only the public
:class:`~aichatonline_sync.Session` API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._client.env import BASE_URL_ENV, GATEWAY_KEY_ENV, MAX_RETRIES_ENV, PROXY_ENV, TIMEOUT_ENV
from .application import (
    CORS_ORIGINS_ENV,
    DEFAULT_MAX_BODY_BYTES,
    GatewayApp,
    app_from_env,
    make_app,
    make_server,
    session_options_from_env,
)
from .metrics import MULTIPROC_ENV, metrics_hooks
from .wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "BASE_URL_ENV",
    "CORS_ORIGINS_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "GATEWAY_KEY_ENV",
    "MAX_RETRIES_ENV",
    "MULTIPROC_ENV",
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
    "metrics_hooks",
    "session_options_from_env",
]


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
