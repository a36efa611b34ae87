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

This module is not imported by ``import aichatonline_sync``, and it uses only the public
:class:`~aichatonline_sync.Session` API.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from .. import ChatStream, Session
from .._client import env as _env
from .._client import usage as _usage
from .._client.env import BASE_URL_ENV, GATEWAY_KEY_ENV, MAX_RETRIES_ENV, PROXY_ENV, TIMEOUT_ENV
from .._wire import redact as _redact
from .._wire.errors import (
    AiChatOnlineError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
)
from .._wire.prompt import format_prompt
from .._wire.protocol import MODELS
from .limits import ReplyLimiter
from .metrics import MULTIPROC_ENV, Metrics, metrics_hooks
from .metrics import metrics as _metrics

if TYPE_CHECKING:
    from .server import GatewayServer

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
#: Dated snapshots of the model, served as the model.
_ALIASES = {"gpt-4o-mini-2024-07-18": "gpt-4o-mini"}
#: The variable of :func:`app_from_env`'s CORS origins (comma-separated).
CORS_ORIGINS_ENV = "AICHATONLINE_GATEWAY_CORS_ORIGINS"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
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
    if exc.timed_out:  # also a reply that stalled after its first piece
        return _Refusal(504, message, type="timeout_error", code="upstream_timeout")
    return _Refusal(502, message, type="upstream_error", code="upstream_error")


# -- requests -----------------------------------------------------------------------------------


class _Job(NamedTuple):
    """A request for a reply, from any of the three endpoints."""

    kind: str  #: "chat", "completion" or "response"
    messages: list[dict[str, str]]
    model: str  #: as the client named it (a dated name is echoed back as it was asked)
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    max_tokens: Optional[int]
    max_tokens_param: str  #: the parameter that set ``max_tokens``
    echo: dict[str, Any]  #: fields a Response object repeats from its request


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


_TEXT_PARTS = ("input_text", "output_text", "text")


def _parse_content(
    content: object, where: str, role: str, parts: Sequence[str] = ("text",)
) -> str:
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
        if kind not in parts:
            raise _bad(
                f"{at} is a {kind!r} part: the service takes text only "
                f'(parts like {{"type": "{parts[0]}", "text": "..."}})',
                param=at,
                code="unsupported_content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{at}.text must be a string, not {_json_type(text)}", param=f"{at}.text")
        texts.append(text)
    return "".join(texts)


def _parse_messages(
    messages: object, param: str = "messages", parts: Sequence[str] = ("text",)
) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise _bad(
            f"'{param}' must be an array of messages, not {_json_type(messages)}",
            param=param,
        )
    if not messages:
        raise _bad(f"'{param}' is empty: give at least one message", param=param)
    parsed = []
    for index, message in enumerate(messages):
        where = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object, not {_json_type(message)}", param=where)
        role = message.get("role")
        if (
            role in ("tool", "function")
            or message.get("type", "message") != "message"
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
            {"role": role, "content": _parse_content(message.get("content"), where, role, parts)}
        )
    return parsed


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter ('model': 'gpt-4o-mini')", param="model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, not {_json_type(model)}", param="model")
    _canonical(model)
    return model


def _canonical(model: str) -> str:
    """The service's name of ``model`` (a dated snapshot's name is the model's)."""
    name = _ALIASES.get(model, model)
    if name not in MODELS:
        raise _Refusal(
            404,
            f"the model {model!r} does not exist: this gateway serves {', '.join(MODELS)}",
            param="model",
            code="model_not_found",
        )
    return name


def _typed(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` when it is null or one of ``kinds`` (never a bool for a number)."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise _bad(f"'{name}' must be {what}, not {_json_type(value)}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = _typed(body, name, (int, float), "a number")
    if value is not None and not low <= value <= high:
        raise _bad(f"'{name}' must be between {low:g} and {high:g}, not {value}", param=name)


def _integer(body: Mapping[str, Any], name: str, low: Optional[int] = None) -> Optional[int]:
    value: Optional[int] = _typed(body, name, (int,), "an integer")
    if value is not None and low is not None and value < low:
        raise _bad(f"'{name}' must be at least {low}, not {value}", param=name)
    return value


def _cannot(name: str, why: str, code: str = "unsupported_parameter") -> _Refusal:
    return _bad(f"'{name}' is not supported: {why}", param=name, code=code)


#: Parameters that only tune how a reply is sampled: checked, then ignored (the service samples as
#: it does). name: (kinds, what, (low, high) or None)
_IGNORED: dict[str, tuple[tuple[type, ...], str, Optional[tuple[float, float]]]] = {
    "temperature": ((int, float), "a number", (0, 2)),
    "top_p": ((int, float), "a number", (0, 1)),
    "presence_penalty": ((int, float), "a number", (-2, 2)),
    "frequency_penalty": ((int, float), "a number", (-2, 2)),
    "seed": ((int,), "an integer", None),
    "user": ((str,), "a string", None),
    "metadata": ((dict,), "an object", None),
    "store": ((bool,), "true or false", None),
    "service_tier": ((str,), "a string", None),
    "parallel_tool_calls": ((bool,), "true or false", None),
    "prediction": ((dict,), "an object", None),
    "reasoning_effort": ((str,), "a string", None),
    "reasoning": ((dict,), "an object", None),
    "truncation": ((str,), "a string", None),
    "safety_identifier": ((str,), "a string", None),
    "prompt_cache_key": ((str,), "a string", None),
    "verbosity": ((str,), "a string", None),
}


def _check_ignored(body: Mapping[str, Any], names: Iterable[str]) -> None:
    for name in names:
        kinds, what, bounds = _IGNORED[name]
        if bounds is None:
            _typed(body, name, kinds, what)
        else:
            _number(body, name, *bounds)


_CHAT_IGNORED = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "user", "metadata",
    "store", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort",
    "safety_identifier", "prompt_cache_key", "verbosity",
)  # fmt: skip
_COMPLETION_IGNORED = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "user",
)  # fmt: skip
_RESPONSE_IGNORED = (
    "temperature", "top_p", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
    "reasoning", "truncation", "safety_identifier", "prompt_cache_key",
)  # fmt: skip


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, not {_json_type(stream)}", param="stream")
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _bad(
            f"'stream_options.include_usage' must be true or false, not {_json_type(include)}",
            param="stream_options.include_usage",
        )
    if options and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", param="stream_options")
    return stream, bool(include)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad(
            f"'stop' must be a string or an array of strings, not {_json_type(stop)}",
            param="stop",
        )
    if len(stop) > 4:
        raise _bad(f"'stop' takes at most 4 strings, not {len(stop)}", param="stop")
    return tuple(stop)


def _limit(body: Mapping[str, Any], *names: str) -> tuple[Optional[int], str]:
    """The token budget of the first of ``names`` given, and its name."""
    for name in names:
        value = _integer(body, name, 1)
        if value is not None:
            if not _tokens():
                raise _cannot(
                    name,
                    "the tokenizer that enforces it is not installed "
                    '(pip install "aichatonline-sync[gateway]")',
                )
            return value, name
    return None, names[0]


def _n(body: Mapping[str, Any], name: str = "n") -> None:
    n = _integer(body, name)
    if n is not None and n != 1:
        raise _bad(
            f"{name}={n} is not supported: the service gives one reply per request",
            param=name,
            code="unsupported_value",
        )


def _no_tools(body: Mapping[str, Any], names: Iterable[str] = ("tools", "functions")) -> None:
    for name in names:
        if body.get(name):
            raise _unsupported(name, "tools and functions")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _unsupported(name, "tools and functions")


def _must_be_off(body: Mapping[str, Any], names: Iterable[str], why: str) -> None:
    """Parameters that change the reply in a way the service cannot: a 400 unless unset, null,
    false or empty."""
    for name in names:
        if body.get(name) not in (None, False, [], {}, ""):
            raise _cannot(name, why)


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {_json_type(body)}")
    return body


def _parse_chat_request(body: object) -> _Job:
    """Check a ``/v1/chat/completions`` body. Unknown fields are ignored."""
    body = _object(body)
    model = _model(body)
    stream, include_usage = _stream_flags(body)
    _n(body)
    _no_tools(body)
    _check_ignored(body, _CHAT_IGNORED)
    _must_be_off(body, ("logprobs", "top_logprobs"), "the service reports no log probabilities")
    _must_be_off(body, ("audio", "web_search_options"), "the service only answers with text")
    _must_be_off(body, ("logit_bias",), "the service cannot bias its sampling")
    modalities = _typed(body, "modalities", (list,), "an array")
    if modalities not in (None, ["text"]):
        raise _cannot("modalities", "the service only answers with text")
    response_format = _typed(body, "response_format", (dict,), "an object")
    if response_format is not None and response_format.get("type") != "text":
        raise _cannot(
            "response_format",
            f"the service cannot promise a {response_format.get('type')!r} reply; "
            'only {"type": "text"}',
        )
    stop = _stop(body)
    max_tokens, param = _limit(body, "max_completion_tokens", "max_tokens")
    messages = _parse_messages(body.get("messages"))
    return _Job("chat", messages, model, stream, include_usage, stop, max_tokens, param, {})


def _parse_completion_request(body: object) -> _Job:
    """Check a ``/v1/completions`` body: its ``prompt`` is the user's message."""
    body = _object(body)
    model = _model(body)
    stream, include_usage = _stream_flags(body)
    _n(body)
    _n(body, "best_of")
    _check_ignored(body, _COMPLETION_IGNORED)
    _must_be_off(body, ("logprobs",), "the service reports no log probabilities")
    _must_be_off(body, ("echo",), "the service's reply does not repeat the prompt")
    _must_be_off(body, ("suffix",), "the service does not insert text")
    _must_be_off(body, ("logit_bias",), "the service cannot bias its sampling")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad(
            f"'prompt' must be a string (or an array of one string), not {_json_type(prompt)}"
            + (f" of {len(prompt)}" if isinstance(prompt, list) else ""),
            param="prompt",
        )
    stop = _stop(body)
    max_tokens, param = _limit(body, "max_tokens")
    messages = [{"role": "user", "content": prompt}]
    return _Job("completion", messages, model, stream, include_usage, stop, max_tokens, param, {})


def _parse_response_request(body: object) -> _Job:
    """Check a ``/v1/responses`` body: stateless, text in and text out."""
    body = _object(body)
    model = _model(body)
    stream, _ = _stream_flags({"stream": body.get("stream")})
    _check_ignored(body, _RESPONSE_IGNORED)
    _no_tools(body, ("tools",))
    _must_be_off(
        body,
        ("previous_response_id", "conversation", "background", "prompt"),
        "this gateway is stateless: send the whole conversation in 'input'",
    )
    _must_be_off(body, ("include", "top_logprobs"), "the service reports nothing but text")
    text = _typed(body, "text", (dict,), "an object") or {}
    text_format = text.get("format")
    if text_format is not None and (
        not isinstance(text_format, dict) or text_format.get("type") != "text"
    ):
        raise _bad(
            "'text.format' is not supported: the service only promises plain text "
            '({"type": "text"})',
            param="text.format",
            code="unsupported_parameter",
        )
    instructions = _typed(body, "instructions", (str,), "a string")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        messages += _parse_messages(given, "input", _TEXT_PARTS)
    max_tokens, param = _limit(body, "max_output_tokens")
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "metadata": body.get("metadata") or {},
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "user": body.get("user"),
    }
    return _Job("response", messages, model, stream, False, (), max_tokens, param, echo)


# -- the tokenizer ------------------------------------------------------------------------------


def _tokens() -> bool:
    """Whether the tokenizer is installed (the ``gateway`` extra brings it)."""
    return _usage.tokens_available()


def _usage_of(job: _Job, text: str) -> Optional[dict[str, Any]]:
    """OpenAI's ``usage`` of a reply, or ``None`` without the tokenizer."""
    prompt = _usage.count_tokens(format_prompt(job.messages), model=MODELS[0])
    completion = _usage.count_tokens(text, model=MODELS[0])
    if prompt is None or completion is None:
        return None
    if job.kind == "response":
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _limiter(job: _Job) -> ReplyLimiter:
    if job.max_tokens is None:
        return ReplyLimiter(job.stop)
    model = MODELS[0]

    def count(text: str) -> int:
        counted = _usage.count_tokens(text, model=model)
        assert counted is not None  # (the tokenizer's presence was checked with the request)
        return counted

    return ReplyLimiter(
        job.stop,
        job.max_tokens,
        count=count,
        truncate=lambda text, limit: _usage.truncate_to_tokens(text, limit, model=model),
    )


def _limited(stream: ChatStream, limiter: ReplyLimiter) -> Iterator[str]:
    """The reply's text, piece by piece, within the limits; the upstream chat is closed the
    moment the reply is cut."""
    if not limiter.active:
        for piece in stream:
            yield limiter.feed(piece)
        limiter.end()
        return
    for piece in stream:
        text = limiter.feed(piece)
        if text:
            yield text
        if limiter.done:
            stream.close()
            return
    text = limiter.end()
    if text:
        yield text


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


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if status != "in_progress" else [],
    }


def _response_object(
    job: _Job,
    response_id: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    usage: Optional[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": (
            {"reason": "max_output_tokens"} if status == "incomplete" else None
        ),
        "model": job.model,
        "output": output,
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
        **job.echo,
    }


def _whole_reply(job: _Job, stream: ChatStream, text: str, finish: str, created: int) -> Any:
    """The body of a reply that is not streamed."""
    usage = _usage_of(job, text)
    if job.kind == "response":
        response_id = f"resp_{stream.conversation_id}"
        item = _message_item(f"msg_{stream.conversation_id}", text, "completed")
        status = "incomplete" if finish == "length" else "completed"
        return _response_object(job, response_id, created, status, [item], usage)
    if job.kind == "completion":
        choice: dict[str, Any] = {"text": text, "index": 0, "logprobs": None}
        prefix, kind = "cmpl", "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
        }
        prefix, kind = "chatcmpl", "chat.completion"
    choice["finish_reason"] = finish
    return {
        "id": f"{prefix}-{stream.conversation_id}",
        "object": kind,
        "created": created,
        "model": job.model,
        "choices": [choice],
        "usage": usage,
    }


def _error_event(exc: Exception, metrics: Metrics) -> Any:
    """The in-band error of a stream that failed after its first chunk."""
    if isinstance(exc, AiChatOnlineError):
        logger.warning("a streamed reply failed after it began: %s", exc)
        refusal = _refusal_for(exc)
        metrics.upstream_error(refusal.type)
    else:
        logger.error("the gateway failed in the middle of a streamed reply", exc_info=exc)
        refusal = _Refusal(500, "the gateway failed (see its log)", type="server_error")
    return refusal.error()


def _closing_events(job: _Job, chunk: dict[str, Any], limiter: ReplyLimiter) -> bytes:
    """The last chunk (its ``finish_reason`` set by the caller), the usage chunk when the
    request asked for it (``choices: []``), and ``[DONE]``."""
    last = _event(chunk)
    if job.include_usage:
        chunk["choices"] = []
        chunk["usage"] = _usage_of(job, limiter.text)
        last += _event(chunk)
    return last + _DONE


def _chat_events(
    job: _Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
) -> Generator[bytes, None, None]:
    """``chat.completion.chunk`` events, then ``[DONE]``."""
    marker = "\x00delta\x00"
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{stream.conversation_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "choices": [{"index": 0, "delta": marker, "logprobs": None, "finish_reason": None}],
    }
    head, tail = _event(chunk).split(json.dumps(marker).encode())
    piece_head, piece_tail = head + b'{"content":', b"}" + tail
    dumps = json.dumps
    try:
        yield head + b'{"role":"assistant","content":""}' + tail
        for piece in _limited(stream, limiter):
            yield piece_head + dumps(piece).encode() + piece_tail
        chunk["choices"] = [
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": limiter.finish_reason}
        ]
        yield _closing_events(job, chunk, limiter)
    except Exception as exc:
        yield _event(_error_event(exc, metrics))
    finally:
        stream.close()


def _completion_events(
    job: _Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
) -> Generator[bytes, None, None]:
    """``text_completion`` events, then ``[DONE]``."""
    chunk: dict[str, Any] = {
        "id": f"cmpl-{stream.conversation_id}",
        "object": "text_completion",
        "created": created,
        "model": job.model,
    }
    choice: dict[str, Any] = {"text": "", "index": 0, "logprobs": None, "finish_reason": None}
    chunk["choices"] = [choice]
    try:
        for piece in _limited(stream, limiter):
            choice["text"] = piece
            yield _event(chunk)
        choice["text"], choice["finish_reason"] = "", limiter.finish_reason
        yield _closing_events(job, chunk, limiter)
    except Exception as exc:
        yield _event(_error_event(exc, metrics))
    finally:
        stream.close()


def _response_events(
    job: _Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
) -> Generator[bytes, None, None]:
    """The Responses API's events, ``response.created`` to ``response.completed`` (or
    ``response.incomplete``), each with its ``event:`` line."""
    response_id = f"resp_{stream.conversation_id}"
    item_id = f"msg_{stream.conversation_id}"
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        data = json.dumps(payload, separators=(",", ":")).encode()
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        begun = _response_object(job, response_id, created, "in_progress", [], None)
        yield (
            event("response.created", response=begun)
            + event("response.in_progress", response=begun)
            + event(
                "response.output_item.added",
                output_index=0,
                item=_message_item(item_id, "", "in_progress"),
            )
            + event(
                "response.content_part.added",
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                **where,
            )
        )
        for piece in _limited(stream, limiter):
            yield event("response.output_text.delta", delta=piece, logprobs=[], **where)
        text = limiter.text
        item = _message_item(item_id, text, "completed")
        status = "incomplete" if limiter.finish_reason == "length" else "completed"
        done = _response_object(job, response_id, created, status, [item], _usage_of(job, text))
        yield (
            event("response.output_text.done", text=text, logprobs=[], **where)
            + event("response.content_part.done", part=item["content"][0], **where)
            + event("response.output_item.done", output_index=0, item=item)
            + event(f"response.{status}", response=done)
        )
    except Exception as exc:
        error = _error_event(exc, metrics)
        # The ``error`` member makes the openai client raise, as it does for a chat stream.
        yield event("error", **error["error"], error=error["error"])
    finally:
        stream.close()


_EVENTS = {"chat": _chat_events, "completion": _completion_events, "response": _response_events}


class _EventStream:
    """The body of a streamed reply: one SSE event per piece, made when the piece arrives.

    A WSGI server calls :meth:`close` when the body is done, and also when writing to the client
    failed (it went away): that closes the upstream chat at once.
    """

    def __init__(
        self,
        stream: ChatStream,
        events: Generator[bytes, None, None],
        on_close: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._on_close: Optional[Callable[[], None]] = on_close
        self._events = events

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


# -- the client's socket ------------------------------------------------------------------------

#: Where WSGI servers put the client's socket in the environ (gunicorn).
_SOCKET_KEYS = ("gunicorn.socket",)
#: Where waitress puts a function that tells whether the client went away.
_DISCONNECTED_KEY = "waitress.client_disconnected"
#: How often a reply that is not streamed checks that its client is still there.
_CLIENT_CHECK_SECONDS = 0.05


def _client_check(environ: WSGIEnvironment) -> Optional[Callable[[], bool]]:
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
    except (BlockingIOError, InterruptedError, ValueError):  # ValueError: TLS sockets
        return False
    except OSError:
        return True


# -- logging ------------------------------------------------------------------------------------


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
        # The logger gunicorn made for its error log (looked up, never made here).
        target = logging.root.manager.loggerDict.get("gunicorn.error")
        if str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn"):
            if isinstance(target, logging.Logger) and target.handlers and not any(isinstance(h, _Forward) for h in package.handlers):
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


# -- CORS ---------------------------------------------------------------------------------------

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


# -- the application ----------------------------------------------------------------------------

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
            # (A stream starts once the upstream's first piece is here: its first chunk follows.)
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
        except _Refusal as refusal:
            self._log_failure(environ, method, path, refusal)
            body = _respond(respond, refusal.status, refusal.error(), refusal.headers)
            return [] if method == "HEAD" else body
        except Exception:
            logger.exception("the gateway failed on %s %s", method, path)
            failure = _Refusal(500, "the gateway failed (see its log)", type="server_error")
            self._log_failure(environ, method, path, failure)
            return _respond(respond, 500, failure.error())

    @staticmethod
    def _log_failure(environ: WSGIEnvironment, method: str, path: str, refusal: _Refusal) -> None:
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

    def _health(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return _respond(start_response, 200, {"status": "ok"}, [("Cache-Control", "no-store")])

    def _metrics_page(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        rendered = self._metrics.render()
        if rendered is None:
            raise _Refusal(
                501,
                "metrics need prometheus-client: pip install \"aichatonline-sync[gateway]\"",
                type="server_error",
                code="metrics_unavailable",
            )
        content_type, body = rendered
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    def _models(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return _respond(
            start_response, 200, {"object": "list", "data": [_model_object(m) for m in MODELS]}
        )

    def _model(self, model: str, start_response: StartResponse) -> list[bytes]:
        _canonical(model)
        return _respond(start_response, 200, _model_object(model))

    def _chat_completions(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(_parse_chat_request, environ, start_response)

    def _completions(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(_parse_completion_request, environ, start_response)

    def _responses(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._reply(_parse_response_request, environ, start_response)

    def _reply(
        self,
        parse: Callable[[object], _Job],
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        job = parse(_read_json(environ, self._max_body))
        model = _canonical(job.model)
        session = self.session
        self._begin(session)
        body: Optional[_EventStream] = None
        try:
            created = int(time.time())
            limiter = _limiter(job)
            # chat() returns once the first piece has arrived: errors before it get a status.
            stream = session.chat(job.messages, model=model, keep_text=False)
            if job.stream:
                try:
                    events = _EVENTS[job.kind](job, stream, limiter, created, self._metrics)
                    start_response("200 OK", list(_SSE_HEADERS))
                except BaseException:
                    stream.close()
                    raise
                self._metrics.stream_started()
                body = _EventStream(stream, events, self._stream_ended)
                return body
            with stream:
                text = self._read_whole(stream, limiter, environ)
            payload = _whole_reply(job, stream, text, limiter.finish_reason or "stop", created)
            return _respond(start_response, 200, payload)
        except AiChatOnlineError as exc:
            refusal = _refusal_for(exc)
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
        gone = _client_check(environ)
        if gone is None:
            return "".join(_limited(stream, limiter))
        parts = []
        checked = time.monotonic()
        for piece in _limited(stream, limiter):
            parts.append(piece)
            now = time.monotonic()
            if now - checked >= _CLIENT_CHECK_SECONDS:
                checked = now
                if gone():
                    stream.close()
                    raise _Refusal(499, "the client went away before the reply was complete")
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


def _unknown_path(method: str, path: str) -> _Refusal:
    return _Refusal(
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

    Connections are kept alive; a streamed body is sent with chunked encoding, each piece of the
    application's iterable at once; when a client goes away, the iterable is closed.

    :raises OSError: the address cannot be bound.
    :raises ImportError: waitress is not installed (``pip install "aichatonline-sync[gateway]"``).
    """
    from .server import GatewayServer

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
