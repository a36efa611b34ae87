"""The gateway is faithful to OpenAI's clients: ``stop``, ``max_tokens``, ``usage`` and the
``include_usage`` chunk, dated model names, ``/v1/completions`` and ``/v1/responses``, and a 400
naming the parameter it cannot honour or whose type is wrong. Each with the real ``openai`` client,
streamed and not, over loopback with the emulator as the upstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

import aichatonline_sync as aco
from aichatonline_sync._client.usage import count_tokens, truncate_to_tokens
from aichatonline_sync.testing import Emulator

openai = pytest.importorskip("openai")

from test_gateway import (  # noqa: E402 - after the optional package
    KEY,
    MESSAGES,
    MODEL,
    PROMPT,
    REPLY,
    WAIT,
    EmulatorLog,
    Gateway,
    content_of,
    serving,
)

from aichatonline_sync.gateway import make_app  # noqa: E402

TEXT = "".join(REPLY)  # "Hello, world!"
DATED = "gpt-4o-mini-2024-07-18"


@pytest.fixture
def emulator_log() -> Iterator[EmulatorLog]:
    logger = logging.getLogger("aichatonline_sync.testing")
    handler, level = EmulatorLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def gateway(emulator: Callable[..., Emulator]) -> Iterator[Gateway]:
    emu = emulator(reply=REPLY)
    session = aco.Session(emu.url, max_retries=0, timeout=WAIT)
    with session, serving(make_app(session, api_key=KEY)) as base:
        gateway = Gateway("stdlib", base, emu)
        yield gateway
        gateway.close()


def usage_of(prompt: str, text: str) -> tuple[int, int, int]:
    prompt_tokens, completion_tokens = count_tokens(prompt), count_tokens(text)
    assert prompt_tokens is not None
    assert completion_tokens is not None
    return prompt_tokens, completion_tokens, prompt_tokens + completion_tokens


def chat_stream(gateway: Gateway, **options: Any) -> tuple[str, list[Any]]:
    stream = gateway.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, **options
    )
    with stream:
        chunks = list(stream)
    return "".join(content_of(chunk) or "" for chunk in chunks), chunks


# -- stop and max_tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        (["world"], "Hello, "),
        ("lo, w", "Hel"),  # across three pieces
        (["!", "xyz"], "Hello, world"),
        (["Hel"], ""),
        (["never", "ld!?"], TEXT),  # a held-back tail that is not a stop string is sent at the end
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_stop_ends_the_reply_before_the_stop_string(
    gateway: Gateway, stop: Any, text: str, stream: bool
) -> None:
    if stream:
        got, chunks = chat_stream(gateway, stop=stop)
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = gateway.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, stop=stop
        )
        got, finish = completion.choices[0].message.content, completion.choices[0].finish_reason
    assert got == text
    assert finish == "stop"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cuts_the_reply_with_finish_reason_length(
    gateway: Gateway, name: str, limit: int, stream: bool
) -> None:
    if stream:
        got, chunks = chat_stream(gateway, **{name: limit})
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = gateway.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, **{name: limit}
        )
        got, finish = completion.choices[0].message.content, completion.choices[0].finish_reason
        assert completion.usage.completion_tokens == count_tokens(got)
    # A prefix of the reply within the budget, and never less than cutting the whole reply gives.
    assert TEXT.startswith(got)
    assert len(got) >= len(truncate_to_tokens(TEXT, limit))
    assert (count_tokens(got) or 0) <= limit < (count_tokens(TEXT) or 0)
    assert finish == "length"


def test_a_reply_within_max_tokens_is_whole(gateway: Gateway) -> None:
    completion = gateway.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4
    )
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "options", [{"stop": ["p3 "]}, {"max_tokens": 3}], ids=["stop", "max_tokens"]
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_reply_closes_the_upstream_chat_at_once(
    gateway: Gateway, emulator_log: EmulatorLog, options: dict[str, Any], stream: bool
) -> None:
    long_reply = [f"p{index} " for index in range(5000)]  # ten seconds at 2 ms a piece
    sent: list[int] = []

    def pace(index: int) -> None:
        sent.append(index)
        time.sleep(0.002)

    gateway.emu.set_reply(long_reply)
    gateway.emu.before_piece = pace
    began = time.monotonic()
    if stream:
        text, _ = chat_stream(gateway, **options)
    else:
        completion = gateway.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, **options
        )
        text = completion.choices[0].message.content
    assert time.monotonic() - began < 5
    if "stop" in options:
        assert text == "p0 p1 p2 "
    else:
        assert "".join(long_reply).startswith(text)
        assert 0 < (count_tokens(text) or 0) <= 3
    assert emulator_log.broken.wait(WAIT), "the upstream chat was not closed"
    assert len(sent) < 1000


# -- usage ----------------------------------------------------------------------------------------


def test_a_completion_carries_its_usage(gateway: Gateway) -> None:
    completion = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == usage_of(
        PROMPT, TEXT
    )


def test_include_usage_ends_the_stream_with_a_usage_chunk(gateway: Gateway) -> None:
    text, chunks = chat_stream(gateway, stream_options={"include_usage": True})
    assert text == TEXT
    *_, finish, last = chunks
    assert finish.choices[0].finish_reason == "stop"
    assert last.choices == []
    usage = last.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == usage_of(
        PROMPT, TEXT
    )
    # Without it, no usage chunk.
    _, chunks = chat_stream(gateway)
    assert all(chunk.choices for chunk in chunks)


def test_include_usage_counts_the_text_sent_when_cut(gateway: Gateway) -> None:
    text, chunks = chat_stream(gateway, stop="world", stream_options={"include_usage": True})
    assert text == "Hello, "
    assert chunks[-1].usage.completion_tokens == count_tokens("Hello, ")


# -- model names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_dated_model_name_is_the_model(gateway: Gateway, stream: bool) -> None:
    if stream:
        stream_ = gateway.client().chat.completions.create(
            model=DATED, messages=MESSAGES, stream=True
        )
        with stream_:
            chunks = list(stream_)
        assert {chunk.model for chunk in chunks} == {DATED}
    else:
        completion = gateway.client().chat.completions.create(model=DATED, messages=MESSAGES)
        assert completion.model == DATED
        assert completion.choices[0].message.content == TEXT
    assert gateway.client().models.retrieve(DATED).id == DATED
    with pytest.raises(openai.NotFoundError):
        gateway.client().chat.completions.create(model="gpt-4o-mini-2099-01-01", messages=MESSAGES)


# -- what it cannot honour, and wrong types -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "response_format",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": "all"}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
        ({"user": 7}, "user"),
    ],
)
def test_a_parameter_it_cannot_honour_or_of_the_wrong_type_is_a_400_naming_it(
    gateway: Gateway, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, **options)
    assert caught.value.param == param
    assert param.split(".", maxsplit=1)[0] in caught.value.message
    assert gateway.emu.chat_requests == []


def test_sampling_knobs_are_checked_then_ignored(gateway: Gateway) -> None:
    completion = gateway.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        top_p=0.5,
        seed=7,
        presence_penalty=1,
        frequency_penalty=-1,
        user="u1",
        response_format={"type": "text"},
        logprobs=False,
        n=1,
        store=False,
    )
    assert completion.choices[0].message.content == TEXT
    assert gateway.emu.chat_requests[0].prompt == PROMPT


# -- /v1/completions ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_completions(gateway: Gateway, stream: bool) -> None:
    client = gateway.client()
    if stream:
        chunks = list(
            client.completions.create(
                model=MODEL, prompt="Hi", stream=True, stream_options={"include_usage": True}
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == []
        usage = chunks[-1].usage
    else:
        completion = client.completions.create(model=MODEL, prompt=["Hi"])
        assert completion.object == "text_completion"
        assert completion.id.startswith("cmpl-")
        assert completion.choices[0].text == TEXT
        assert completion.choices[0].finish_reason == "stop"
        usage = completion.usage
    prompt = "Hi"  # one user message is sent as it is
    assert gateway.emu.chat_requests[0].prompt == prompt
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == usage_of(
        prompt, TEXT
    )


@pytest.mark.parametrize("stream", [False, True])
def test_completions_enforce_stop_and_max_tokens(gateway: Gateway, stream: bool) -> None:
    client = gateway.client()
    for options, text, finish in [
        ({"stop": ", "}, "Hello", "stop"),
        ({"max_tokens": 1}, "Hello", "length"),
    ]:
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt="Hi", stream=True, **options))
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            completion = client.completions.create(model=MODEL, prompt="Hi", **options)
            got, reason = completion.choices[0].text, completion.choices[0].finish_reason
        assert (got, reason) == (text, finish)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_completions_refuse_what_they_cannot_honour(
    gateway: Gateway, options: dict[str, Any], param: str
) -> None:
    arguments = {"model": MODEL, "prompt": "Hi", **options}
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().completions.create(**arguments)
    assert caught.value.param == param


# -- /v1/responses --------------------------------------------------------------------------------


def test_responses(gateway: Gateway) -> None:
    response = gateway.client().responses.create(
        model=MODEL, input="Hi", instructions="Be brief.", temperature=0.3
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == TEXT
    assert response.model == MODEL
    assert response.instructions == "Be brief."
    assert gateway.emu.chat_requests[0].prompt == PROMPT
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == usage_of(PROMPT, TEXT)


def test_responses_take_a_list_of_messages(gateway: Gateway) -> None:
    response = gateway.client().responses.create(
        model=DATED,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Yo"}]},
            {"role": "user", "content": "Again"},
        ],
    )
    assert response.output_text == TEXT
    assert response.model == DATED
    assert gateway.emu.chat_requests[0].prompt == (
        "Developer: Be brief.\nUser: Hi\nAssistant: Yo\nUser: Again\nAssistant:"
    )


def test_a_streamed_response_has_the_events_the_sdk_parses(gateway: Gateway) -> None:
    events = list(
        gateway.client().responses.create(
            model=MODEL, input="Hi", instructions="Be brief.", stream=True
        )
    )
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == REPLY
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].response.output_text == TEXT
    assert events[-1].response.usage.output_tokens == count_tokens(TEXT)
    # The SDK's helper, which assembles the events into the final response, agrees.
    with gateway.client().responses.stream(model=MODEL, input="Hi") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_makes_an_incomplete_response(gateway: Gateway, stream: bool) -> None:
    client = gateway.client()
    if stream:
        events = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, stream=True))
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hello,"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search_preview"}]}, "tools"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0]"),
        ({"background": True}, "background"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_output_tokens": "2"}, "max_output_tokens"),
    ],
)
def test_responses_refuse_what_they_cannot_honour(
    gateway: Gateway, options: dict[str, Any], param: str
) -> None:
    arguments: dict[str, Any] = {"model": MODEL, "input": "Hi", **options}
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().responses.create(**arguments)
    assert caught.value.param == param
    assert gateway.emu.chat_requests == []


@pytest.mark.parametrize("endpoint", ["completions", "responses"])
def test_a_failure_after_the_first_chunk_makes_the_client_raise(
    gateway: Gateway, endpoint: str
) -> None:
    gateway.emu.error_line(500, "the model fell over", after=2)
    client = gateway.client()
    if endpoint == "completions":
        stream: Any = client.completions.create(model=MODEL, prompt="Hi", stream=True)
    else:
        stream = client.responses.create(model=MODEL, input="Hi", stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert not isinstance(caught.value, openai.APIStatusError)
    body: Optional[Any] = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "upstream_error"
