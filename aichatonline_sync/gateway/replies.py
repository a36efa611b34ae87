"""Replies in OpenAI's shapes: the body of a reply that is not streamed, and the Server-Sent Events
of one that is, for chat completions, completions and Responses, each within the request's stop
strings and token limit."""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any, Callable, Optional

from .. import ChatStream
from .._client import usage as _usage
from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError
from .._wire.prompt import format_prompt
from .._wire.protocol import MODELS
from .errors import Refusal, refusal_for
from .limits import ReplyLimiter
from .metrics import Metrics
from .requests import Job

logger = _redact.logger("aichatonline_sync.gateway")

#: What ``/v1/models`` says of the model: gpt-4o-mini came out on 2024-07-18.
_MODEL_CREATED = 1721260800
_OWNER = "aichatonline"
SSE_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    # nginx (and proxies that follow it) would otherwise buffer the stream.
    ("X-Accel-Buffering", "no"),
]
_DONE = b"data: [DONE]\n\n"


def _usage_of(job: Job, text: str) -> Optional[dict[str, Any]]:
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


def limiter_for(job: Job) -> ReplyLimiter:
    """The limiter of ``job``'s reply: its stop strings, and its token budget when it has one."""
    if job.max_tokens is None:
        return ReplyLimiter(job.stop)
    model = MODELS[0]

    def count(text: str) -> int:
        counted = _usage.count_tokens(text, model=model)
        assert counted is not None  # without the tokenizer, the request was refused
        return counted

    return ReplyLimiter(
        job.stop,
        job.max_tokens,
        count=count,
        truncate=lambda text, limit: _usage.truncate_to_tokens(text, limit, model=model),
    )


def limited(stream: ChatStream, limiter: ReplyLimiter) -> Iterator[str]:
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


def model_object(model: str) -> dict[str, Any]:
    """OpenAI's ``model`` object of ``model``, as ``/v1/models`` lists it."""
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
    job: Job,
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
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "model": job.model,
        "output": output,
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
        **job.echo,
    }


def whole_reply(job: Job, stream: ChatStream, text: str, finish: str, created: int) -> Any:
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
        refusal = refusal_for(exc)
        metrics.upstream_error(refusal.type)
    else:
        logger.error("the gateway failed in the middle of a streamed reply", exc_info=exc)
        refusal = Refusal(500, "the gateway failed (see its log)", type="server_error")
    return refusal.error()


def _closing_events(job: Job, chunk: dict[str, Any], limiter: ReplyLimiter) -> bytes:
    """The last chunk (its ``finish_reason`` set by the caller), the usage chunk when the
    request asked for it (``choices: []``), and ``[DONE]``."""
    last = _event(chunk)
    if job.include_usage:
        chunk["choices"] = []
        chunk["usage"] = _usage_of(job, limiter.text)
        last += _event(chunk)
    return last + _DONE


def _chat_events(
    job: Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
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
        for piece in limited(stream, limiter):
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
    job: Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
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
        for piece in limited(stream, limiter):
            choice["text"] = piece
            yield _event(chunk)
        choice["text"], choice["finish_reason"] = "", limiter.finish_reason
        yield _closing_events(job, chunk, limiter)
    except Exception as exc:
        yield _event(_error_event(exc, metrics))
    finally:
        stream.close()


def _response_events(
    job: Job, stream: ChatStream, limiter: ReplyLimiter, created: int, metrics: Metrics
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
        for piece in limited(stream, limiter):
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


EVENTS = {"chat": _chat_events, "completion": _completion_events, "response": _response_events}


class EventStream:
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
            # The events' ``finally`` closes the stream, but a generator that never started has
            # not entered it: the stream is closed here too (closing it twice is harmless).
            self._events.close()
            self._stream.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()
