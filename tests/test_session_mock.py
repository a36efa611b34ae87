"""Session behaviour against strict ``responses`` mocks: request shapes, tokens, retries, errors."""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
import urllib3
from responses import matchers
from responses.registries import OrderedRegistry

import aichatonline_sync as aco
from aichatonline_sync import (
    AiChatOnlineError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ProtocolError,
    RateLimitError,
    Session,
    TokenError,
    UpstreamError,
)

DEFAULT_BASE = "https://aichatonlineorg.erweima.ai"
BASE = "http://127.0.0.1:9"
TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"
TOKEN = "6dbd3acc4ffdf261b24b0541d1602cff"
TOKEN2 = "0123456789abcdef0123456789abcdef"
FIREFOX_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/119.0"
CONVERSATION_RE = re.compile(r"[a-z0-9]{10}")


def token_url_re(base: str = BASE) -> re.Pattern[str]:
    return re.compile(re.escape(f"{base}{TOKEN_PATH}") + r"\?canvas=-[a-z0-9]{10}\Z")


def chat_url(base: str = BASE) -> str:
    return f"{base}{CHAT_PATH}"


def line(piece: str) -> str:
    return json.dumps({"code": 200, "msg": "success", "data": {"message": piece}}) + "\n"


def error_line(code: int, message: str = "upstream error") -> str:
    return json.dumps({"code": code, "message": message, "data": None}) + "\n"


def body_of(*pieces: str) -> str:
    return "".join(line(p) for p in pieces)


def chat_body_matcher(prompt: str) -> Any:
    """Matches a chat body ``{"conversationId": <10 of [a-z0-9]>, "prompt": prompt}`` exactly."""

    def match(request: requests.PreparedRequest) -> tuple[bool, str]:
        try:
            data = json.loads(request.body or b"")
        except ValueError:
            return False, f"body is not JSON: {request.body!r}"
        if not isinstance(data, dict) or set(data) != {"conversationId", "prompt"}:
            return False, f"body keys are wrong: {data!r}"
        if not isinstance(data["conversationId"], str) or not CONVERSATION_RE.fullmatch(
            data["conversationId"]
        ):
            return False, f"bad conversationId {data['conversationId']!r}"
        if data["prompt"] != prompt:
            return False, f"prompt {data['prompt']!r} != {prompt!r}"
        return True, ""

    return match


def add_token(
    rsps: responses.RequestsMock, token: Any = TOKEN, base: str = BASE, **kwargs: Any
) -> responses.BaseResponse:
    if "body" not in kwargs and "json" not in kwargs:
        kwargs["json"] = {"code": 200, "msg": "success", "data": token}
    return rsps.add("GET", token_url_re(base), **kwargs)


def add_chat(
    rsps: responses.RequestsMock,
    body: Any = None,
    *,
    token: str = TOKEN,
    base: str = BASE,
    status: int = 200,
    headers: dict[str, str] | None = None,
    content_type: str = "text/event-stream;charset=UTF-8",
) -> responses.BaseResponse:
    return rsps.add(
        "POST",
        chat_url(base),
        body=body_of("Hello", ", ", "world") if body is None else body,
        status=status,
        headers=headers or {},  # None: responses < 0.25 iterates it with content_type
        content_type=content_type,
        match=[matchers.header_matcher({"UniqueId": token})],
    )


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def ordered() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(
        assert_all_requests_are_fired=True, registry=OrderedRegistry
    ) as mock:
        yield mock


def calls_to(mock: responses.RequestsMock, method: str) -> list[requests.PreparedRequest]:
    return [call.request for call in mock.calls if call.request.method == method]


def chat_tokens(mock: responses.RequestsMock) -> list[str | None]:
    return [request.headers.get("UniqueId") for request in calls_to(mock, "POST")]


def brotli_available() -> bool:
    for name in ("brotli", "brotlicffi"):
        try:
            __import__(name)
        except ImportError:
            continue
        return True
    return False


# --- request shapes -----------------------------------------------------------------------------


def test_request_shapes_match_gpt4free(rsps: responses.RequestsMock) -> None:
    browser = {
        "User-Agent": FIREFOX_UA,
        "Accept-Language": "de,en-US;q=0.7,en;q=0.3",
        "Referer": f"{DEFAULT_BASE}/chatgpt/chat/",
        "Origin": DEFAULT_BASE,
    }
    add_token(rsps, base=DEFAULT_BASE, match=[matchers.header_matcher(browser)])
    rsps.add(
        "POST",
        chat_url(DEFAULT_BASE),
        body=body_of("Hi", " there"),
        content_type="text/event-stream",
        match=[
            matchers.header_matcher(
                {**browser, "UniqueId": TOKEN, "Content-Type": "application/json"}
            ),
            chat_body_matcher("System: Be brief.\nUser: Hi\nAssistant:"),
        ],
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with Session() as session:
        assert session.complete(messages) == "Hi there"

    token_request, chat_request = (call.request for call in rsps.calls)
    assert token_request.method == "GET"
    assert token_url_re(DEFAULT_BASE).match(token_request.url)
    assert chat_request.url == chat_url(DEFAULT_BASE)
    for request in (token_request, chat_request):
        codings = {c.strip().split(";")[0] for c in request.headers["Accept-Encoding"].split(",")}
        assert "gzip" in codings
        if not brotli_available():
            assert "br" not in codings
        assert "UniqueId" not in request.headers or request is chat_request


def test_canvas_is_random_per_token_request(rsps: responses.RequestsMock) -> None:
    add_token(rsps)
    with Session(BASE, reuse_token=False) as session:
        for _ in range(3):
            session.grab_token()
    canvases = [request.url.rsplit("canvas=", 1)[1] for request in calls_to(rsps, "GET")]
    assert len(canvases) == 3
    assert len(set(canvases)) == 3


def test_token_is_reused_across_chats(rsps: responses.RequestsMock) -> None:
    add_token(rsps)
    add_chat(rsps)
    with Session(BASE) as session:
        assert session.complete("one") == "Hello, world"
        assert list(session.chat("two")) == ["Hello", ", ", "world"]
    assert len(calls_to(rsps, "GET")) == 1
    assert chat_tokens(rsps) == [TOKEN, TOKEN]


def test_reuse_token_false_fetches_a_token_per_chat(ordered: responses.RequestsMock) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, token=TOKEN2)
    with Session(BASE, reuse_token=False) as session:
        assert session.complete("one") == "Hello, world"
        assert session.complete("two") == "Hello, world"
    assert len(calls_to(ordered, "GET")) == 2
    assert chat_tokens(ordered) == [TOKEN, TOKEN2]


# --- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429, 500, 502])
def test_retried_status_then_success(
    ordered: responses.RequestsMock, no_sleep: Any, status: int
) -> None:
    add_token(ordered)
    add_chat(ordered, error_line(status), status=status, content_type="application/json")
    add_chat(ordered, error_line(status), status=status, content_type="application/json")
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(calls_to(ordered, "POST")) == 3
    assert len(calls_to(ordered, "GET")) == 1
    assert len(no_sleep.sleeps) == 2
    assert all(0.5 <= s <= 8.0 for s in no_sleep.sleeps)


def test_retries_exhausted_raise_the_last_status(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    for _ in range(3):
        add_chat(ordered, "busy", status=503, content_type="text/plain")
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(APIStatusError) as info:
        session.complete("hi")
    assert info.value.status_code == 503
    assert info.value.body == "busy"
    assert len(calls_to(ordered, "POST")) == 3
    assert len(no_sleep.sleeps) == 2


def test_max_retries_zero_makes_one_attempt(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered)
    add_chat(ordered, "busy", status=503, content_type="text/plain")
    with Session(BASE, retry=no_sleep.policy(0)) as session, pytest.raises(APIStatusError):
        session.complete("hi")
    assert len(calls_to(ordered, "POST")) == 1
    assert no_sleep.sleeps == []


@pytest.mark.parametrize(
    ("headers", "slept"),
    [({"Retry-After": "2"}, 2.0), ({"retry-after-ms": "150"}, 0.15), ({"Retry-After": "0"}, 0.0)],
)
def test_retry_after_is_honoured(
    ordered: responses.RequestsMock, no_sleep: Any, headers: dict[str, str], slept: float
) -> None:
    add_token(ordered)
    add_chat(ordered, error_line(429), status=429, headers=headers, content_type="application/json")
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == "Hello, world"
    assert no_sleep.sleeps == [pytest.approx(slept)]


def test_retry_after_http_date_is_honoured(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    add_token(ordered)
    add_chat(ordered, "", status=503, headers={"Retry-After": when}, content_type="text/plain")
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(no_sleep.sleeps) == 1
    assert 27.0 <= no_sleep.sleeps[0] <= 31.0


def test_retry_after_above_limit_raises_at_once(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(
        ordered,
        error_line(429),
        status=429,
        headers={"Retry-After": "120"},
        content_type="application/json",
    )
    with (
        Session(BASE, retry=no_sleep.policy(3, max_retry_after=60)) as session,
        pytest.raises(RateLimitError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 429
    assert info.value.retry_after == 120.0
    assert len(calls_to(ordered, "POST")) == 1
    assert no_sleep.sleeps == []


def test_rate_limit_error_after_retries_has_retry_after(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    for _ in range(2):
        add_chat(ordered, "", status=429, headers={"Retry-After": "3"}, content_type="text/plain")
    with Session(BASE, retry=no_sleep.policy(1)) as session, pytest.raises(RateLimitError) as info:
        session.complete("hi")
    assert info.value.retry_after == 3.0
    assert no_sleep.sleeps == [3.0]


@pytest.mark.parametrize("status", [400, 404, 405, 422])
def test_client_errors_are_not_retried(
    ordered: responses.RequestsMock, no_sleep: Any, status: int
) -> None:
    add_token(ordered)
    add_chat(ordered, f"nope {status}", status=status, content_type="text/plain")
    with Session(BASE, retry=no_sleep.policy(3)) as session, pytest.raises(APIStatusError) as info:
        session.complete("hi")
    error = info.value
    assert type(error) is APIStatusError
    assert error.status_code == status
    assert error.body == f"nope {status}"
    assert error.url == chat_url()
    assert str(status) in str(error)
    assert len(calls_to(ordered, "POST")) == 1
    assert no_sleep.sleeps == []


def test_status_error_body_is_limited_to_2_kib(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(ordered, "x" * 10000, status=400, content_type="text/plain")
    with Session(BASE, retry=no_sleep.policy(0)) as session, pytest.raises(APIStatusError) as info:
        session.complete("hi")
    assert info.value.body == "x" * 2048


def test_status_error_url_has_no_credentials(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    base = "http://user:s3cretpw@127.0.0.1:9"
    ordered.add(
        "GET",
        re.compile(
            re.escape("http://")
            + r"(user:s3cretpw@)?"
            + re.escape(f"127.0.0.1:9{TOKEN_PATH}")
            + r"\?.*"
        ),
        json={"data": TOKEN},
    )
    ordered.add(
        "POST",
        re.compile(r"http://(user:s3cretpw@)?127\.0\.0\.1:9" + re.escape(CHAT_PATH)),
        body="no",
        status=400,
    )
    with Session(base, retry=no_sleep.policy(0)) as session, pytest.raises(APIStatusError) as info:
        session.complete("hi")
    assert info.value.url is not None
    assert "s3cretpw" not in info.value.url
    assert "s3cretpw" not in str(info.value)
    assert info.value.url.endswith(f"127.0.0.1:9{CHAT_PATH}")


def test_token_status_is_retried_and_not_multiplied(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    for _ in range(3):
        add_token(ordered, body="down", status=500)
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(APIStatusError) as info:
        session.complete("hi")
    assert info.value.status_code == 500
    assert len(calls_to(ordered, "GET")) == 3
    assert calls_to(ordered, "POST") == []
    assert len(no_sleep.sleeps) == 2


def test_token_status_then_success(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered, body="down", status=503)
    add_token(ordered)
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(no_sleep.sleeps) == 1


# --- unauthorised: one fresh token ---------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token_is_refreshed_once_outside_max_retries(
    ordered: responses.RequestsMock, no_sleep: Any, status: int
) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(status, "invalid UniqueId"), status=status, token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, token=TOKEN2)
    with Session(BASE, retry=no_sleep.policy(0)) as session:
        assert session.complete("hi") == "Hello, world"
        assert session.grab_token() == TOKEN2
    assert chat_tokens(ordered) == [TOKEN, TOKEN2]
    assert no_sleep.sleeps == []


def test_refresh_and_status_retry_combine(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(401), status=401, token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, error_line(503), status=503, token=TOKEN2)
    add_chat(ordered, token=TOKEN2)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == "Hello, world"
    assert chat_tokens(ordered) == [TOKEN, TOKEN2, TOKEN2]
    assert len(no_sleep.sleeps) == 1


def test_status_retry_then_refresh(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(502), status=502, token=TOKEN)
    add_chat(ordered, error_line(401), status=401, token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, token=TOKEN2)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == "Hello, world"
    assert chat_tokens(ordered) == [TOKEN, TOKEN, TOKEN2]
    assert len(no_sleep.sleeps) == 1


def test_rejected_twice_raises_authentication_error(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(401), status=401, token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, error_line(401, "still no"), status=401, token=TOKEN2)
    with (
        Session(BASE, retry=no_sleep.policy(2)) as session,
        pytest.raises(AuthenticationError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 401
    assert "still no" in info.value.body
    assert len(calls_to(ordered, "GET")) == 2
    assert len(calls_to(ordered, "POST")) == 2
    assert no_sleep.sleeps == []


def test_error_line_401_before_text_refreshes_the_token(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(401, "token expired"), token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, token=TOKEN2)
    with Session(BASE, retry=no_sleep.policy(0)) as session:
        assert session.complete("hi") == "Hello, world"
    assert chat_tokens(ordered) == [TOKEN, TOKEN2]


def test_error_line_401_twice_raises_upstream_error(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered, TOKEN)
    add_chat(ordered, error_line(401, "token expired"), token=TOKEN)
    add_token(ordered, TOKEN2)
    add_chat(ordered, error_line(401, "token expired again"), token=TOKEN2)
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(UpstreamError) as info:
        session.complete("hi")
    assert info.value.code == 401
    assert info.value.message == "token expired again"
    assert info.value.partial == ""


def test_error_line_503_before_text_is_retried(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(ordered, error_line(503, "overloaded"))
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(calls_to(ordered, "POST")) == 2
    assert len(no_sleep.sleeps) == 1


def test_error_line_503_persisting_raises_upstream_error(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(ordered, error_line(503, "overloaded"))
    add_chat(ordered, error_line(503, "overloaded"))
    with Session(BASE, retry=no_sleep.policy(1)) as session, pytest.raises(UpstreamError) as info:
        session.complete("hi")
    assert (info.value.code, info.value.message, info.value.partial) == (503, "overloaded", "")


def test_error_line_with_unretried_code_before_text_is_not_retried(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(ordered, json.dumps({"code": 455, "msg": "quota", "data": None}) + "\n")
    with Session(BASE, retry=no_sleep.policy(3)) as session, pytest.raises(UpstreamError) as info:
        session.complete("hi")
    assert (info.value.code, info.value.message) == (455, "quota")
    assert no_sleep.sleeps == []


def test_error_line_after_text_iterating(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered)
    add_chat(ordered, body_of("Hel", "lo") + error_line(503, "lost it") + line("never"))
    got = []
    with Session(BASE, retry=no_sleep.policy(3)) as session:
        stream = session.chat("hi")
        with pytest.raises(UpstreamError) as info:
            got.extend(stream)
        assert stream.closed
    assert got == ["Hel", "lo"]
    assert (info.value.code, info.value.message, info.value.partial) == (503, "lost it", "Hello")
    assert len(calls_to(ordered, "POST")) == 1
    assert no_sleep.sleeps == []


def test_error_line_after_text_complete_keeps_partial(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    add_chat(ordered, body_of("Hel", "lo") + error_line(500, "lost it"))
    with Session(BASE, retry=no_sleep.policy(3)) as session, pytest.raises(UpstreamError) as info:
        session.complete("hi")
    assert info.value.code == 500
    assert info.value.partial == "Hello"
    assert len(calls_to(ordered, "POST")) == 1


# --- the token endpoint -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body": "<html>not json</html>", "content_type": "text/html"},
        {"body": "", "content_type": "application/json"},
        {"json": {"data": None}},
        {"json": {"code": 200, "msg": "success"}},
        {"json": {"data": 123}},
        {"json": {"data": ""}},
        {"json": {"data": ["a"]}},
        {"json": ["data"]},
        {"json": {"data": "abc\r\nX-Injected: 1"}},
        {"json": {"data": "a" * 300}},
    ],
    ids=["html", "empty", "null", "missing", "int", "empty-str", "list", "array", "crlf", "long"],
)
def test_unusable_token_reply_raises_token_error(
    rsps: responses.RequestsMock, no_sleep: Any, kwargs: dict[str, Any]
) -> None:
    add_token(rsps, **kwargs)
    with Session(BASE, retry=no_sleep.policy(2)) as session:
        with pytest.raises(TokenError):
            session.complete("hi")
        with pytest.raises(TokenError):
            session.grab_token()
    assert len(calls_to(rsps, "GET")) == 2  # not retried, and not kept
    assert calls_to(rsps, "POST") == []
    assert no_sleep.sleeps == []


# --- replies that are no chat stream -------------------------------------------------------------


def test_html_reply_raises_protocol_error(rsps: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(rsps)
    add_chat(
        rsps,
        "<!DOCTYPE html><html><title>Just a moment...</title></html>",
        content_type="text/html; charset=UTF-8",
    )
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(ProtocolError) as info:
        session.complete("hi")
    assert "Just a moment" in str(info.value)
    assert len(calls_to(rsps, "POST")) == 1


@pytest.mark.parametrize(
    "body",
    [
        "garbage that is not json\nmore garbage\n",
        json.dumps({"code": 200, "msg": "success", "data": {}}) + "\n",
        "[DONE]\n",
    ],
)
def test_reply_without_message_line_raises_protocol_error(
    rsps: responses.RequestsMock, no_sleep: Any, body: str
) -> None:
    add_token(rsps)
    add_chat(rsps, body)
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(ProtocolError) as info:
        session.complete("hi")
    assert body.splitlines()[0][:40] in str(info.value)
    assert len(calls_to(rsps, "POST")) == 1


def test_empty_reply_raises_protocol_error(rsps: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(rsps)
    add_chat(rsps, "")
    with Session(BASE, retry=no_sleep.policy(2)) as session, pytest.raises(ProtocolError):
        session.complete("hi")


def test_tolerant_parsing_of_odd_lines(rsps: responses.RequestsMock) -> None:
    body = (
        "\r\n"
        + "not json\r\n"
        + "data: "
        + line("A").rstrip("\n")
        + "\r\n"
        + json.dumps(
            {"code": 200, "msg": "success", "data": {"message": "\u2028B"}}, ensure_ascii=False
        )
        + "\n[DONE]\n"
    )
    add_token(rsps)
    add_chat(rsps, body.encode())
    with Session(BASE) as session:
        assert list(session.chat("hi")) == ["A", "\u2028B"]


# --- connection errors --------------------------------------------------------------------------


def test_connection_error_is_retried(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered, body=requests.ConnectionError("token refused"))
    add_token(ordered)
    add_chat(ordered, requests.ConnectionError("chat refused"))
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(no_sleep.sleeps) == 2


@pytest.mark.parametrize(("token_failures", "chat_failures"), [(1, 1), (2, 1), (1, 3), (0, 2), (3, 0)])
def test_token_and_chat_failures_share_one_budget(
    ordered: responses.RequestsMock, no_sleep: Any, token_failures: int, chat_failures: int
) -> None:
    for _ in range(token_failures):
        add_token(ordered, body=requests.ConnectionError("token refused"))
    add_token(ordered)
    for _ in range(chat_failures):
        add_chat(ordered, "busy", status=503, content_type="text/plain")
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(token_failures + chat_failures)) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(calls_to(ordered, "GET")) == token_failures + 1
    assert len(calls_to(ordered, "POST")) == chat_failures + 1
    assert len(no_sleep.sleeps) == token_failures + chat_failures


@pytest.mark.parametrize(("token_failures", "chat_failures"), [(1, 1), (2, 1), (1, 3)])
def test_no_retry_past_the_shared_budget(
    ordered: responses.RequestsMock, no_sleep: Any, token_failures: int, chat_failures: int
) -> None:
    """N token failures and M chat failures are N + M attempts: with N + M - 1 retries the last
    failure is raised, and nothing is sent after it."""
    for _ in range(token_failures):
        add_token(ordered, body=requests.ConnectionError("token refused"))
    add_token(ordered)
    for _ in range(chat_failures):
        add_chat(ordered, "busy", status=503, content_type="text/plain")
    budget = token_failures + chat_failures - 1
    with (
        Session(BASE, retry=no_sleep.policy(budget)) as session,
        pytest.raises(APIStatusError) as info,
    ):
        session.complete("hi")
    assert info.value.status_code == 503
    assert len(calls_to(ordered, "GET")) == token_failures + 1
    assert len(calls_to(ordered, "POST")) == chat_failures
    assert len(no_sleep.sleeps) == budget


def test_a_retry_warning_names_the_step_that_failed(
    ordered: responses.RequestsMock, no_sleep: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="aichatonline_sync")
    add_token(ordered, body="down", status=503)
    add_token(ordered)
    add_chat(ordered, "busy", status=503, content_type="text/plain")
    add_chat(ordered)
    with Session(BASE, retry=no_sleep.policy(2)) as session:
        assert session.complete("hi") == "Hello, world"
    warnings = [r.getMessage() for r in caplog.records if r.name == "aichatonline_sync"]
    assert len(warnings) == 2
    assert warnings[0].startswith("token request failed (HTTP status 503); retry 1 of 2")
    assert warnings[1].startswith("chat request failed (HTTP status 503); retry 2 of 2")


def test_persistent_connection_error_raises_api_connection_error(
    ordered: responses.RequestsMock, no_sleep: Any
) -> None:
    add_token(ordered)
    for _ in range(3):
        add_chat(ordered, requests.ConnectionError("chat refused"))
    with (
        Session(BASE, retry=no_sleep.policy(2)) as session,
        pytest.raises(APIConnectionError) as info,
    ):
        session.complete("hi")
    assert type(info.value) is APIConnectionError
    assert isinstance(info.value.__cause__, requests.ConnectionError)
    assert len(no_sleep.sleeps) == 2


def test_timeout_raises_api_timeout_error(ordered: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(ordered)
    add_chat(ordered, requests.ReadTimeout("slow"))
    add_chat(ordered, requests.ConnectTimeout("slow"))
    with Session(BASE, retry=no_sleep.policy(1)) as session, pytest.raises(APITimeoutError) as info:
        session.complete("hi")
    assert isinstance(info.value.__cause__, requests.Timeout)
    assert len(no_sleep.sleeps) == 1


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("boom"),
        requests.exceptions.ChunkedEncodingError("boom"),
        requests.exceptions.ContentDecodingError("boom"),
        requests.exceptions.SSLError("boom"),
        requests.exceptions.ProxyError("boom"),
        requests.exceptions.TooManyRedirects("boom"),
        requests.exceptions.RequestException("boom"),
        urllib3.exceptions.ProtocolError("boom"),
        urllib3.exceptions.ReadTimeoutError(None, "/", "boom"),  # type: ignore[arg-type]
        ConnectionResetError("boom"),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("endpoint", ["token", "chat"])
def test_no_transport_exception_escapes(
    rsps: responses.RequestsMock, no_sleep: Any, exc: BaseException, endpoint: str
) -> None:
    if endpoint == "token":
        add_token(rsps, body=exc)
    else:
        add_token(rsps)
        add_chat(rsps, exc)
    with Session(BASE, retry=no_sleep.policy(1)) as session:
        with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is checked
            session.complete("hi")
        error = info.value
        assert isinstance(error, AiChatOnlineError), type(error)
        assert not isinstance(error, (requests.RequestException, urllib3.exceptions.HTTPError))
        assert error.__cause__ is exc


# --- module-level functions and the session life cycle -------------------------------------------


def test_module_level_calls_share_one_session(rsps: responses.RequestsMock, no_sleep: Any) -> None:
    add_token(rsps)
    add_chat(rsps)
    policy = no_sleep.policy(1)
    assert aco.complete("one", base_url=BASE, retry=policy) == "Hello, world"
    assert aco.complete("two", base_url=BASE, retry=policy, timeout=30) == "Hello, world"
    assert list(aco.chat("three", base_url=BASE, retry=policy)) == ["Hello", ", ", "world"]
    assert len(calls_to(rsps, "GET")) == 1
    assert chat_tokens(rsps) == [TOKEN] * 3


def test_module_level_calls_with_other_settings_use_another_session(
    rsps: responses.RequestsMock,
) -> None:
    add_token(rsps)
    add_chat(rsps)
    assert aco.complete("one", base_url=BASE, max_retries=0) == "Hello, world"
    assert aco.complete("two", base_url=BASE, max_retries=1) == "Hello, world"
    assert len(calls_to(rsps, "GET")) == 2


def test_closed_session_refuses_use(rsps: responses.RequestsMock) -> None:
    session = Session(BASE)
    session.close()
    session.close()
    assert session.closed
    for call in (
        lambda: session.complete("hi"),
        lambda: session.chat("hi"),
        session.grab_token,
    ):
        with pytest.raises(AiChatOnlineError, match="closed"):
            call()
    assert len(rsps.calls) == 0


def test_session_context_manager_closes(rsps: responses.RequestsMock) -> None:
    add_token(rsps)
    with Session(BASE) as session:
        session.grab_token()
    assert session.closed
    with pytest.raises(AiChatOnlineError):
        session.grab_token()
    assert len(calls_to(rsps, "GET")) == 1


def test_given_requests_session_is_used_and_not_closed(rsps: responses.RequestsMock) -> None:
    add_token(rsps)
    add_chat(rsps)
    http = requests.Session()
    http.headers["X-Mine"] = "yes"
    with Session(BASE, http=http) as session:
        assert session.complete("hi") == "Hello, world"
    assert len(rsps.calls) == 2
    assert all(call.request.headers.get("X-Mine") == "yes" for call in rsps.calls)
