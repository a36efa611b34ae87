"""The two test doubles, the emulator (real sockets) and the ``responses`` mock, are one model of the
service: fed the same arguments, both accept them or both refuse them with the same error; sent the
same request, both answer with the same status, content type and body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync import InvalidRequestError, Session
from aichatonline_sync.testing import Emulator
from aichatonline_sync.testing.pytest_plugin import AiChatOnlineMock

responses = pytest.importorskip("responses")

Double = Union[Emulator, AiChatOnlineMock]

#: Calls that both doubles offer, with arguments at and past every edge.
CALLS: dict[str, Callable[[Any], object]] = {
    "fail 500": lambda d: d.fail("chat", 500),
    "fail token 200": lambda d: d.fail("token", 200),
    "fail 599": lambda d: d.fail("chat", 599),
    "fail 204 (no body allowed)": lambda d: d.fail("chat", 204),
    "fail 304 (no body allowed)": lambda d: d.fail("chat", 304),
    "fail 199": lambda d: d.fail("chat", 199),
    "fail 600": lambda d: d.fail("chat", 600),
    "fail status True": lambda d: d.fail("chat", True),
    "fail status 500.0": lambda d: d.fail("chat", 500.0),
    "fail status '500'": lambda d: d.fail("chat", "500"),
    "fail endpoint unknown": lambda d: d.fail("nowhere", 500),
    "fail endpoint None": lambda d: d.fail(None, 500),
    "fail times 0": lambda d: d.fail("chat", 500, times=0),
    "fail times True": lambda d: d.fail("chat", 500, times=True),
    "fail times 2.0": lambda d: d.fail("chat", 500, times=2.0),
    "fail times 3": lambda d: d.fail("chat", 500, times=3),
    "fail header CRLF": lambda d: d.fail("chat", 500, headers={"X": "a\r\nb"}),
    "fail header value int": lambda d: d.fail("chat", 500, headers={"X": 1}),
    "fail header name empty": lambda d: d.fail("chat", 500, headers={"": "v"}),
    "fail header name colon": lambda d: d.fail("chat", 500, headers={"X:Y": "v"}),
    "fail header not latin-1": lambda d: d.fail("chat", 500, headers={"X": "日本"}),
    "fail header latin-1": lambda d: d.fail("chat", 500, headers={"X": "é"}),
    "fail headers a list": lambda d: d.fail("chat", 500, headers=[("X", "1")]),
    "fail Retry-After": lambda d: d.fail("chat", 429, headers={"Retry-After": "0"}),
    "fail body object": lambda d: d.fail("chat", 500, body=object()),
    "fail body not JSON-able": lambda d: d.fail("chat", 500, body={"a": object()}),
    "fail body bytes": lambda d: d.fail("chat", 500, body=b"\xff"),
    "fail body list": lambda d: d.fail("chat", 500, body=[1]),
    "error_line": lambda d: d.error_line(500),
    "error_line code '500'": lambda d: d.error_line("500"),
    "error_line code True": lambda d: d.error_line(True),
    "error_line message int": lambda d: d.error_line(500, 1),
    "error_line key None": lambda d: d.error_line(500, key=None),
    "error_line after -1": lambda d: d.error_line(500, after=-1),
    "error_line after 2.5": lambda d: d.error_line(500, after=2.5),
    "error_line after huge": lambda d: d.error_line(500, after=10**9),
    "error_line times 0": lambda d: d.error_line(500, times=0),
    "html": lambda d: d.html(),
    "html token 403": lambda d: d.html("token", status=403),
    "html 204": lambda d: d.html("chat", status=204),
    "html endpoint unknown": lambda d: d.html("nowhere"),
    "html times -1": lambda d: d.html(times=-1),
    "drop": lambda d: d.drop(),
    "drop chat after 3": lambda d: d.drop("chat", after=3),
    "drop token after 1": lambda d: d.drop("token", after=1),
    "drop after -1": lambda d: d.drop("chat", after=-1),
    "drop after False": lambda d: d.drop("chat", after=False),
    "drop endpoint unknown": lambda d: d.drop("nowhere"),
    "drop times '1'": lambda d: d.drop(times="1"),
    "set_reply str": lambda d: d.set_reply("text"),
    "set_reply iterator": lambda d: d.set_reply(iter(["a", "b"])),
    "set_reply piece int": lambda d: d.set_reply(["a", 1]),
    "set_reply bytes": lambda d: d.set_reply(b"bytes"),
    "set_reply mapping": lambda d: d.set_reply({"a": "b"}),
    "set_reply int": lambda d: d.set_reply(42),
    "set_reply callable": lambda d: d.set_reply(lambda prompt: prompt.upper()),
    "set_reply None": lambda d: d.set_reply(None),
    "pending_faults endpoint unknown": lambda d: d.pending_faults("nowhere"),
}


def outcome(double: Double, call: Callable[[Any], object]) -> tuple[Optional[type], int]:
    """The error type the call raised (None: accepted), and how many fault replies it queued."""
    try:
        call(double)
    except Exception as exc:
        return type(exc), double.pending_faults()
    return None, double.pending_faults()


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_both_doubles_accept_or_refuse_the_same_arguments(call: Callable[[Any], object]) -> None:
    emulated = outcome(Emulator(), call)
    mocked = outcome(AiChatOnlineMock(responses.RequestsMock()), call)
    assert emulated == mocked
    error, queued = emulated
    if error is not None:
        assert error is InvalidRequestError  # (a ValueError)
        assert queued == 0


@pytest.mark.parametrize("name", ["fail", "error_line", "html", "drop", "pending_faults"])
def test_both_doubles_schedule_faults_with_one_method(name: str) -> None:
    """The fault-scheduling methods are written once, so the two doubles cannot drift apart."""
    assert getattr(Emulator, name) is getattr(AiChatOnlineMock, name)
    assert getattr(Emulator, name).__doc__


TOKEN = "/api/v1/user/getUniqueId?canvas=-abcdefghij"
CHAT = "/aichatonline/api/chat/gpt"
BODY = {"conversationId": "abcdefghij", "prompt": "Hi"}

#: (what to queue, the request: endpoint, JSON body or raw bytes, whether to send the issued token)
EXCHANGES: dict[str, tuple[Callable[[Any], object], str, Any, Optional[bool]]] = {
    "a token it did not issue": (lambda d: None, "chat", BODY, False),
    "no token": (lambda d: None, "chat", BODY, None),
    "a body that is not JSON": (lambda d: None, "chat", b"not json", True),
    "a body that is a list": (lambda d: None, "chat", [BODY], True),
    "no prompt": (lambda d: None, "chat", {"conversationId": "abcdefghij"}, True),
    "a prompt that is no str": (lambda d: None, "chat", {"prompt": 1}, True),
    "the reply": (lambda d: None, "chat", BODY, True),
    "fail 503 Retry-After": (
        lambda d: d.fail("chat", 503, headers={"Retry-After": "0"}), "chat", BODY, True
    ),
    "fail with a JSON body": (lambda d: d.fail("chat", 400, body={"x": 1}), "chat", BODY, True),
    "fail with a text body": (lambda d: d.fail("token", 500, body="down"), "token", None, None),
    "a fault answers whatever the request carries": (
        lambda d: d.fail("chat", 418), "chat", b"not json", False
    ),
    "html 403": (lambda d: d.html("chat", status=403), "chat", BODY, True),
    "html token": (lambda d: d.html("token"), "token", None, None),
    "error line after 1": (lambda d: d.error_line(429, "slow", after=1), "chat", BODY, True),
    "error line msg": (lambda d: d.error_line(401, "gone", key="msg"), "chat", BODY, True),
}


@pytest.fixture
def doubles(emulator: Callable[..., Emulator]) -> Iterator[tuple[Emulator, AiChatOnlineMock]]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        mock = AiChatOnlineMock(rsps)  # (loopback, the emulator, passes through)
        emu = emulator()
        for double in (emu, mock):
            double.set_reply(["Hel", "lo ", "there"])
        yield emu, mock


def exchange(
    base: str, endpoint: str, body: Any, with_token: Optional[bool]
) -> tuple[int, str, bytes, Optional[str]]:
    headers = {}
    if with_token is not None:
        token = requests.get(base + TOKEN, timeout=10).json()["data"]
        headers["UniqueId"] = token if with_token else "0" * 32
    if endpoint == "token":
        reply = requests.get(base + TOKEN, timeout=10)
    elif isinstance(body, bytes):
        reply = requests.post(base + CHAT, data=body, headers=headers, timeout=10)
    else:
        reply = requests.post(base + CHAT, json=body, headers=headers, timeout=10)
    return (
        reply.status_code,
        reply.headers["Content-Type"],
        reply.content,
        reply.headers.get("Retry-After"),
    )


@pytest.mark.parametrize("case", EXCHANGES.values(), ids=EXCHANGES.keys())
def test_both_doubles_answer_a_request_alike(
    doubles: tuple[Emulator, AiChatOnlineMock],
    case: tuple[Callable[[Any], object], str, Any, Optional[bool]],
) -> None:
    queue, endpoint, body, with_token = case
    emu, mock = doubles
    for double in doubles:
        queue(double)
    emulated = exchange(emu.url, endpoint, body, with_token)
    mocked = exchange(mock.base_url, endpoint, body, with_token)
    assert emulated == mocked
    assert emu.pending_faults() == mock.pending_faults() == 0


@pytest.mark.parametrize("kind", ["emulator", "mock"])
def test_a_revoked_token_gets_a_401_and_the_library_one_fresh_token(
    doubles: tuple[Emulator, AiChatOnlineMock], kind: str
) -> None:
    emu, mock = doubles
    double: Double = emu if kind == "emulator" else mock
    base = emu.url if kind == "emulator" else mock.base_url
    with Session(base, max_retries=0) as session:
        assert session.complete("Hi") == "Hello there"
        double.revoke_tokens()
        assert session.complete("Hi") == "Hello there"
    if kind == "emulator":
        assert (emu.tokens_issued, len(emu.chat_requests)) == (2, 3)
    else:
        assert (mock.token_calls, mock.chat_calls) == (2, 3)


def test_a_callable_reply_answers_each_prompt_alike_from_both_doubles(
    aichatonline_mock: Any,
) -> None:
    aichatonline_mock.set_reply(lambda prompt: f"you said {prompt}")
    via_mock = aco.complete("Hi there", base_url=aichatonline_mock.base_url)
    with Emulator(reply=lambda prompt: f"you said {prompt}") as emu:
        via_emulator = aco.complete("Hi there", base_url=emu.url)
    assert via_mock == via_emulator
    assert "Hi there" in via_mock


@pytest.mark.parametrize("kind", ["emulator", "mock"])
def test_a_reply_callable_returning_no_str_is_answered_500_by_both_doubles(
    doubles: tuple[Emulator, AiChatOnlineMock], kind: str
) -> None:
    emu, mock = doubles
    for double in doubles:
        double.set_reply(lambda prompt: ["not", "a", "str"])  # type: ignore[arg-type,return-value]
    base = emu.url if kind == "emulator" else mock.base_url
    status, _, body, _ = exchange(base, "chat", BODY, True)
    assert status == 500
    assert b"reply callable failed" in body
