"""Arguments of the wrong shape, and the messages that used to mislead: each is an
``InvalidRequestError`` (the same from ``Session.chat`` as from module-level ``chat()``) raised
before anything is sent, checked against a real emulator that records what reached it."""

from __future__ import annotations

from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import InvalidRequestError, Session
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=["Hi"])


# --- batches of the wrong shape -----------------------------------------------------------------

BAD_PROMPTS = [
    pytest.param("hello", "not a single str: for one prompt, pass \\[prompt\\]", id="str"),
    pytest.param(b"hello", "not a single bytes", id="bytes"),
    pytest.param(None, "not NoneType", id="None"),
    pytest.param({"a": 1}, "not dict", id="dict"),
    pytest.param(42, "not int", id="int"),
    pytest.param(
        [{"role": "user", "content": "Hi"}], "a list of messages is one prompt", id="messages"
    ),
    pytest.param(["ok", 7], "prompt 1", id="int-prompt"),
]


@pytest.mark.parametrize(("prompts", "message"), BAD_PROMPTS)
def test_batches_of_the_wrong_shape_send_nothing(
    emu: Emulator, prompts: Any, message: str
) -> None:
    with Session(emu.url) as session:
        calls: list[Callable[[], Any]] = [
            lambda: aco.batch(prompts, base_url=emu.url),
            lambda: list(aco.batch_iter(prompts, base_url=emu.url)),
            lambda: session.batch(prompts),
            lambda: aco.batch(prompts, session=session),
        ]
        for call in calls:
            with pytest.raises(InvalidRequestError, match=message):
                call()
    assert emu.requests == []


def test_any_iterable_of_prompts_is_fine(emu: Emulator) -> None:
    assert aco.batch(("a", "b"), base_url=emu.url) == ["Hi", "Hi"]
    assert aco.batch((p for p in ["a"]), base_url=emu.url) == ["Hi"]
    assert aco.batch([], base_url=emu.url) == []


# --- unknown keyword options --------------------------------------------------------------------


def test_unknown_options_are_an_invalid_request_everywhere(emu: Emulator) -> None:
    with Session(emu.url) as session:
        calls: dict[str, Callable[[], Any]] = {
            "Session.chat": lambda: session.chat("Hi", temperature=0.2),
            "Session.complete": lambda: session.complete("Hi", temperature=0.2),
            "chat": lambda: aco.chat("Hi", base_url=emu.url, temperature=0.2),
            "complete": lambda: aco.complete("Hi", base_url=emu.url, temperature=0.2),
            "batch": lambda: aco.batch(["Hi"], base_url=emu.url, temperature=0.2),
            "Conversation.ask": lambda: aco.Conversation(session=session).ask(
                "Hi", temperature=0.2
            ),
        }
        for name, call in calls.items():
            with pytest.raises(InvalidRequestError) as info:
                call()
            message = str(info.value)
            assert "temperature" in message, name
            assert "model" in message, name  # the valid options are listed
            assert not isinstance(info.value, TypeError), name
    assert emu.requests == []


def test_session_options_given_to_one_chat_say_where_they_belong(emu: Emulator) -> None:
    with Session(emu.url) as session:
        with pytest.raises(InvalidRequestError, match=r"proxy belong to Session\(\.\.\.\)"):
            session.chat("Hi", proxy="http://127.0.0.1:3128")
        with pytest.raises(InvalidRequestError, match=r"unknown option\(s\) seed; max_retries"):
            session.complete("Hi", seed=1, max_retries=3)
    assert emu.requests == []


# --- one rule for text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (5, r"messages\[0\]\['content'\] must be a str, a list of parts or None, not int"),
        ([{"type": "text", "text": 5}], r"\['content'\]\[0\]\['text'\] must be a str"),
        ([{"text": 5}], r"\['text'\] must be a str"),  # a part without a type is text
        ([{"type": "text"}], "a text part without 'text'"),
        ([{"type": 3, "text": "x"}], r"\['type'\] must be a str"),
        (["Hi"], "must be a dict like"),
    ],
)
def test_content_and_parts_follow_one_rule(emu: Emulator, content: Any, message: str) -> None:
    messages = [{"role": "user", "content": content}]
    with Session(emu.url) as session:
        for call in (lambda: session.chat(messages), lambda: aco.chat(messages, base_url=emu.url)):
            with pytest.raises(InvalidRequestError, match=message):
                call()
    assert emu.requests == []


def test_parts_of_other_types_are_dropped_whatever_they_hold(emu: Emulator) -> None:
    parts = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "x"}, "text": 5},
        {"text": " this"},
    ]
    with Session(emu.url) as session:
        assert session.complete([{"role": "user", "content": parts}]) == "Hi"
    assert emu.chat_requests[0].prompt == "Describe this"


# --- messages that misled -----------------------------------------------------------------------


def test_an_empty_proxy_is_named_as_such() -> None:
    with pytest.raises(InvalidRequestError) as info:
        Session(proxy="")
    assert "empty" in str(info.value)
    assert "not str" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="not int"):
        Session(proxy=3128)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [401, 403])
def test_an_html_block_page_is_not_reported_as_a_rejected_token(
    emulator: MakeEmulator, status: int
) -> None:
    emu = emulator(reply=["Hi"])
    emu.html("chat", status=status)
    with Session(emu.url, max_retries=0) as session, pytest.raises(aco.AuthenticationError) as info:
        session.complete("x")
    message = str(info.value)
    assert "HTML page titled 'Just a moment...'" in message
    assert "rejected the token" not in message
    assert "a fresh token does not help" in message
    assert info.value.status_code == status
    assert len(emu.chat_requests) == 1  # and no fresh token was fetched for it
    assert emu.tokens_issued == 1


def test_a_json_403_still_means_the_token(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["Hi"])
    emu.fail("chat", 403, times=2)
    with Session(emu.url, max_retries=0) as session, pytest.raises(aco.AuthenticationError, match="the upstream rejected the token"):
        session.complete("x")
    assert emu.tokens_issued == 2  # one fresh token, one more try


def test_an_html_outage_page_says_so(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["Hi"])
    emu.html("chat", status=503)
    with Session(emu.url, max_retries=0) as session, pytest.raises(aco.APIStatusError, match=r"HTTP 503 .*\(an HTML page titled"):
        session.complete("x")


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_a_reset_after_text_does_not_say_before_the_reply(
    emulator: MakeEmulator, framing: str
) -> None:
    emu = emulator(reply=["one ", "two ", "three"], framing=framing)
    emu.drop("chat", after=2)
    with Session(emu.url, max_retries=0) as session, pytest.raises(aco.IncompleteStreamError) as info:
        session.complete("x")
    message = str(info.value)
    assert info.value.partial == "one two "
    assert "stopped after 8 characters: the server reset the connection" in message
    assert "before the reply" not in message


def test_a_body_cut_short_after_text_says_so(emulator: MakeEmulator) -> None:
    from aichatonline_sync._wire.protocol import piece_line

    emu = emulator()
    line = piece_line("Hello ")
    emu.raw_reply(
        "chat", b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + line
    )
    with Session(emu.url, max_retries=0) as session, pytest.raises(aco.IncompleteStreamError) as info:
        session.complete("x")
    message = str(info.value)
    assert "the connection closed before the end of the body" in message
    assert "before the reply" not in message
