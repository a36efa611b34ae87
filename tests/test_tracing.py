"""OpenTelemetry spans per chat (``aichatonline_sync._client.tracing``), with the real opentelemetry-sdk
and its in-memory exporter, over the emulator. The tracer provider is set once for this module
(OpenTelemetry allows one global provider per process) and shut down after it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

trace = pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed (the otel extra)")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed (the test extra has it)")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

MakeEmulator = Callable[..., Emulator]
CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


@pytest.fixture(scope="module")
def _provider() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.fail("another test set the global tracer provider first")
    yield exporter
    provider.shutdown()


@pytest.fixture
def spans(_provider: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.delenv(CAPTURE, raising=False)
    _provider.clear()
    yield _provider.get_finished_spans
    _provider.clear()


def test_a_chat_is_a_client_span_with_the_genai_attributes(emulator: MakeEmulator, spans: Any) -> None:
    emu = emulator(reply="Hello there, friend!")
    with aco.Session(emu.url) as s:
        stream = s.chat("Hi secret prompt", conversation_id="abcdefghij")
        assert spans() == ()  # open until the reply ends
        text = "".join(stream)
    (span,) = spans()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes)
    port = int(emu.url.rsplit(":", 1)[1])
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "aichatonline",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.conversation.id": "abcdefghij",
        "server.address": "127.0.0.1",
        "server.port": port,
    }
    pytest.importorskip("bpe_openai", reason="bpe-openai is not installed (the tokens extra)")
    expected["gen_ai.usage.input_tokens"] = 3
    expected["gen_ai.usage.output_tokens"] = 5
    assert attributes == expected
    assert [event.name for event in span.events] == ["first_piece"]
    everything = json.dumps(attributes) + json.dumps([dict(e.attributes or {}) for e in span.events])
    assert "secret" not in everything
    assert text not in everything


def test_message_content_only_when_opted_in(
    emulator: MakeEmulator, spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator(reply="Reply text")
    monkeypatch.setenv(CAPTURE, "true")
    with aco.Session(emu.url) as s:
        assert s.complete("Hi secret prompt") == "Reply text"
    (span,) = spans()
    sent = json.loads(span.attributes["gen_ai.input.messages"])
    got = json.loads(span.attributes["gen_ai.output.messages"])
    assert sent == [{"role": "user", "parts": [{"type": "text", "content": "Hi secret prompt"}]}]
    assert got[0]["parts"][0]["content"] == "Reply text"


def test_retries_are_span_events(emulator: MakeEmulator, spans: Any, no_sleep: Any) -> None:
    emu = emulator(reply="ok")
    emu.fail("chat", 503, times=2)
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=3)) as s:
        assert s.complete("Hi") == "ok"
    (span,) = spans()
    retries = [e for e in span.events if e.name == "retry"]
    assert [e.attributes["retry.attempt"] for e in retries] == [1, 2]
    assert [e.attributes["error.type"] for e in retries] == ["APIStatusError"] * 2
    assert [e.attributes["retry.wait_s"] for e in retries] == no_sleep.sleeps
    assert span.status.status_code is StatusCode.UNSET


def test_a_failed_chat_is_an_error_span(emulator: MakeEmulator, spans: Any, no_sleep: Any) -> None:
    emu = emulator()
    emu.fail("chat", 503, times=3)
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=0)) as s, pytest.raises(aco.APIStatusError):
        s.chat("Hi")
    (span,) = spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "APIStatusError"
    assert "gen_ai.usage.input_tokens" not in span.attributes


def test_a_failure_mid_stream_is_an_error_span(emulator: MakeEmulator, spans: Any) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    emu.drop("chat", after=1)
    with aco.Session(emu.url) as s:
        stream = s.chat("Hi")
        with pytest.raises(aco.IncompleteStreamError):
            "".join(stream)
    (span,) = spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "IncompleteStreamError"


def test_the_span_is_a_child_of_the_callers_span(emulator: MakeEmulator, spans: Any) -> None:
    emu = emulator(reply="ok")
    with trace.get_tracer("app").start_as_current_span("request") as parent, aco.Session(emu.url) as s:
        s.complete("Hi")
    chat_span, request_span = spans()
    assert chat_span.parent is not None
    assert chat_span.parent.span_id == parent.get_span_context().span_id
    assert request_span.name == "request"


def test_a_stream_closed_early_ends_its_span(emulator: MakeEmulator, spans: Any) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    with aco.Session(emu.url) as s:
        with s.chat("Hi") as stream:
            next(stream)
        (span,) = spans()
    assert span.status.status_code is StatusCode.UNSET
    assert "gen_ai.usage.output_tokens" not in span.attributes


NOT_IMPORTED = """
import sys
import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator
with Emulator() as emu, aco.Session(emu.url) as s:
    s.complete("Hi")
print(sorted(m for m in sys.modules if m.startswith("opentelemetry") or m.endswith("_tracing")))
"""

NO_PROVIDER = """
import sys
import opentelemetry.trace
import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator
with Emulator() as emu, aco.Session(emu.url, event_hooks={"chat_end": [print]}) as s:
    s.complete("Hi")
"""


def test_nothing_of_opentelemetry_is_imported_by_a_chat() -> None:
    out = subprocess.run([sys.executable, "-c", NOT_IMPORTED], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "[]", out.stderr


def test_without_a_tracer_provider_no_span_is_made() -> None:
    out = subprocess.run([sys.executable, "-c", NO_PROVIDER], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "ChatEvent(name='chat_end'" in out.stdout
    assert "span" not in out.stderr.lower()
