"""OpenTelemetry spans for chats, after the GenAI semantic conventions.

Loaded by :mod:`._hooks` only once the application has imported ``opentelemetry.trace`` (which it
must, to set a tracer provider); ``import aichatonline_sync`` never imports opentelemetry. While
the global provider is the API's default (a proxy, or the no-op provider), no span is made.

One span per chat, named ``"chat {model}"``, kind CLIENT, started when the chat is sent (its
parent: the span current in the caller) and ended when the reply was read to its end, failed, or
was closed: ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.conversation.id``, ``server.address``, ``server.port``; at the end
``gen_ai.usage.input_tokens`` and ``gen_ai.usage.output_tokens`` when the ``tokens`` extra counts
them. Each retry is a ``retry`` event, the first piece a ``first_piece`` event. A failed chat has
status ERROR and ``error.type`` (the exception's class name), and no message: an error's message
may quote the reply. Prompt and reply text (``gen_ai.input.messages``,
``gen_ai.output.messages``) only with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._version import __version__

if TYPE_CHECKING:
    from .usage import Usage

__all__ = ["CAPTURE_CONTENT", "end", "retry", "start_span"]

#: The GenAI conventions' opt-in for message content in telemetry.
CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

_DEFAULT_PROVIDERS = tuple(
    cls
    for cls in (getattr(trace, "ProxyTracerProvider", None), getattr(trace, "NoOpTracerProvider", None))
    if isinstance(cls, type)
)
_tracers: dict[int, tuple[Any, Any]] = {}  # id(provider) -> (provider, tracer)
_servers: dict[str, tuple[str, int]] = {}


def _tracer() -> Any:
    provider = trace.get_tracer_provider()
    if isinstance(provider, _DEFAULT_PROVIDERS):
        return None
    cached = _tracers.get(id(provider))
    if cached is None or cached[0] is not provider:
        cached = (provider, provider.get_tracer("aichatonline_sync", __version__))
        _tracers[id(provider)] = cached
    return cached[1]


def _server(url: str) -> tuple[str, int]:
    server = _servers.get(url)
    if server is None:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        server = _servers[url] = (parts.hostname or "", port)
    return server


def _capture() -> bool:
    return os.environ.get(CAPTURE_CONTENT, "").strip().lower() == "true"


def start_span(*, model: str, url: str, prompt: str, conversation_id: str = "") -> Any:
    """The span of a chat to ``url``, or ``None`` when no tracer provider is set."""
    tracer = _tracer()
    if tracer is None:
        return None
    address, port = _server(url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "aichatonline",
        "gen_ai.request.model": model,
        "server.address": address,
        "server.port": port,
    }
    if conversation_id:
        attributes["gen_ai.conversation.id"] = conversation_id
    if _capture():
        attributes["gen_ai.input.messages"] = json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": prompt}]}], ensure_ascii=False
        )
    return tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes)


def retry(span: Any, attempt: int, wait: float, error: BaseException) -> None:
    span.add_event(
        "retry",
        {"retry.attempt": attempt, "retry.wait_s": float(wait), "error.type": type(error).__name__},
    )


def end(
    span: Any,
    *,
    model: Optional[str] = None,
    usage: Optional[Usage] = None,
    text: Optional[str] = None,
    error: Optional[BaseException] = None,
) -> None:
    """End ``span``: after a reply read to its end (``model``, ``usage``, ``text``), a failure
    (``error``), or a stream closed early (nothing)."""
    try:
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR))
        elif model is not None:
            span.set_attribute("gen_ai.response.model", model)
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if text is not None and _capture():
                span.set_attribute("gen_ai.output.messages", json.dumps(
                    [{"role": "assistant", "parts": [{"type": "text", "content": text}],
                      "finish_reason": "stop"}],
                    ensure_ascii=False,
                ))
    finally:
        span.end()
