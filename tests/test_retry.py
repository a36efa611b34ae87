"""Retries (``aichatonline_sync._client.retry``): the predicate, the wait, and the loop, with an injected sleep."""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any, Optional

import pytest

from aichatonline_sync import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    IncompleteStreamError,
    InvalidRequestError,
    ProtocolError,
    RateLimitError,
    RetryPolicy,
    TokenError,
    UpstreamError,
)
from aichatonline_sync._client.retry import backoff, retry_reason, run_with_retries
from aichatonline_sync._wire.protocol import parse_retry_after

LOGGER = "aichatonline_sync"
NOW = 1_700_000_000.0


def status_error(status: int, retry_after: Optional[float] = None) -> APIStatusError:
    cls: type[APIStatusError] = APIStatusError
    if status in (401, 403):
        cls = AuthenticationError
    elif status == 429:
        cls = RateLimitError
    return cls(
        f"HTTP {status}",
        status_code=status,
        url="http://127.0.0.1:9/x",
        retry_after=retry_after,
    )


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


class Recorder:
    """A fake ``sleep`` that only records what it was asked to wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class Flaky:
    """A callable that raises the given errors in turn, then returns ``value``."""

    def __init__(self, errors: list[BaseException], value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


# -- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0"}, 0.0),
        ({"RETRY-AFTER": " 7 "}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "150"}, 0.15),
        ({"Retry-After-Ms": "2500"}, 2.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the ms header is preferred
        ({"retry-after-ms": "junk", "Retry-After": "9"}, 9.0),  # ... when it is usable
        ({"retry-after-ms": "-5", "Retry-After": "3"}, 3.0),
        ({}, None),
        ({"Content-Type": "text/plain"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "-0.5"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"retry-after-ms": "garbage"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: Optional[float]) -> None:
    got = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parse_retry_after_http_date_in_the_future() -> None:
    assert parse_retry_after({"Retry-After": http_date(NOW + 30)}, now=NOW) == pytest.approx(30)


def test_parse_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after({"Retry-After": http_date(NOW - 3600)}, now=NOW) == 0.0


def test_parse_retry_after_http_date_against_the_clock() -> None:
    got = parse_retry_after({"Retry-After": http_date(time.time() + 120)})
    assert got is not None
    assert 100 < got <= 121


def test_parse_retry_after_with_requests_headers() -> None:
    from requests.structures import CaseInsensitiveDict

    headers = CaseInsensitiveDict({"Retry-After": "4"})
    assert parse_retry_after(headers) == 4.0


# -- retry_reason -----------------------------------------------------------------------------

POLICY = RetryPolicy()


@pytest.mark.parametrize(
    "exc",
    [
        APIConnectionError("refused", url="http://127.0.0.1:9/x"),
        APITimeoutError("read timed out", url="http://127.0.0.1:9/x"),
    ],
)
def test_connection_errors_are_retried(exc: BaseException) -> None:
    reason = retry_reason(exc, POLICY)
    assert isinstance(reason, str)
    assert reason


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
def test_retried_statuses(status: int) -> None:
    reason = retry_reason(status_error(status), POLICY)
    assert reason is not None
    assert str(status) in reason


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 422, 501, 505])
def test_statuses_not_retried(status: int) -> None:
    assert retry_reason(status_error(status), POLICY) is None


@pytest.mark.parametrize("code", [408, 429, 500, 503])
def test_error_line_before_any_text_is_retried_like_its_status(code: int) -> None:
    exc = UpstreamError("error line", code=code, upstream_message="busy", partial="")
    reason = retry_reason(exc, POLICY)
    assert reason is not None
    assert str(code) in reason


@pytest.mark.parametrize("code", [429, 500, 503])
def test_error_line_after_text_is_not_retried(code: int) -> None:
    exc = UpstreamError("error line", code=code, upstream_message="busy", partial="Hello")
    assert retry_reason(exc, POLICY) is None


@pytest.mark.parametrize("code", [400, 401, 403, 422, 455, 501, None, "busy"])
def test_error_line_with_other_codes_is_not_retried(code: Any) -> None:
    exc = UpstreamError("error line", code=code, upstream_message="x", partial="")
    assert retry_reason(exc, POLICY) is None


@pytest.mark.parametrize(
    "exc",
    [
        IncompleteStreamError("dropped", partial="Hel"),
        ProtocolError("html page"),
        TokenError("no token"),
        InvalidRequestError("bad"),
        ValueError("x"),
        KeyError("x"),
    ],
)
def test_other_errors_are_not_retried(exc: BaseException) -> None:
    assert retry_reason(exc, POLICY) is None


def test_retry_after_above_the_limit_is_not_retried() -> None:
    policy = RetryPolicy(max_retry_after=10)
    assert retry_reason(status_error(429, retry_after=11), policy) is None
    assert retry_reason(status_error(503, retry_after=10.5), policy) is None
    assert retry_reason(status_error(429, retry_after=10), policy) is not None
    assert retry_reason(status_error(429, retry_after=0), policy) is not None


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "maximum"), [(0.5, 8.0), (1.0, 1.0), (0.1, 0.35), (0.0, 2.0), (2.0, 100.0)]
)
def test_backoff_bounds(initial: float, maximum: float) -> None:
    policy = RetryPolicy(initial_delay=initial, max_delay=maximum)
    for attempt in range(1, 9):
        ceiling = min(maximum, initial * 2 ** (attempt - 1))
        for _ in range(200):
            delay = backoff(policy, attempt)
            assert initial <= delay <= max(initial, ceiling), (attempt, delay)


def test_backoff_has_jitter() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=8.0)
    draws = {backoff(policy, 4) for _ in range(100)}
    assert len(draws) > 10
    assert max(draws) > 2.0  # it does grow with the attempt number
    assert {backoff(policy, 1) for _ in range(20)} == {0.5}


def test_retry_after_replaces_the_backoff() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=8.0)
    assert backoff(policy, 1, status_error(429, retry_after=3.0)) == 3.0
    assert backoff(policy, 5, status_error(503, retry_after=0.0)) == 0.0
    assert backoff(policy, 5, status_error(503, retry_after=30.0)) == 30.0


# -- run_with_retries -------------------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 2, 5])
def test_gives_up_after_max_retries_and_raises_the_last_error_as_is(max_retries: int) -> None:
    sleep = Recorder()
    errors: list[BaseException] = [
        APIConnectionError(f"refused #{i}") for i in range(max_retries + 1)
    ]
    last = errors[-1]
    func = Flaky([*errors, APIConnectionError("never reached")])
    with pytest.raises(APIConnectionError) as info:
        run_with_retries(func, RetryPolicy(max_retries=max_retries, sleep=sleep), what="test")
    assert info.value is last
    assert func.calls == max_retries + 1
    assert len(sleep.calls) == max_retries


def test_success_on_the_second_attempt_returns_the_value() -> None:
    sleep = Recorder()
    func = Flaky([status_error(503)], value={"text": "hi"})
    policy = RetryPolicy(max_retries=3, initial_delay=0.25, max_delay=4.0, sleep=sleep)
    assert run_with_retries(func, policy, what="test") == {"text": "hi"}
    assert func.calls == 2
    assert len(sleep.calls) == 1
    assert sleep.calls == [0.25]  # the first wait is initial_delay


def test_success_at_once_does_not_sleep() -> None:
    sleep = Recorder()
    assert run_with_retries(lambda: 42, RetryPolicy(sleep=sleep), what="test") == 42
    assert sleep.calls == []


@pytest.mark.parametrize(
    "exc",
    [
        status_error(400),
        status_error(401),
        status_error(404),
        UpstreamError("x", code=503, partial="Hel"),
        ProtocolError("html"),
        KeyError("bug"),
    ],
)
def test_error_not_retried_is_raised_after_one_attempt(exc: BaseException) -> None:
    sleep = Recorder()
    func = Flaky([exc])
    with pytest.raises(type(exc)) as info:
        run_with_retries(func, RetryPolicy(max_retries=5, sleep=sleep), what="test")
    assert info.value is exc
    assert func.calls == 1
    assert sleep.calls == []


def test_retry_after_above_the_limit_raises_at_once() -> None:
    sleep = Recorder()
    exc = status_error(429, retry_after=120)
    func = Flaky([exc])
    with pytest.raises(RateLimitError) as info:
        run_with_retries(func, RetryPolicy(max_retries=5, sleep=sleep), what="test")
    assert info.value is exc
    assert func.calls == 1
    assert sleep.calls == []


def test_sleeps_are_the_retry_after_values() -> None:
    sleep = Recorder()
    func = Flaky(
        [
            status_error(429, retry_after=1.5),
            status_error(503, retry_after=2.0),
            UpstreamError("x", code=429, partial=""),
        ]
    )
    policy = RetryPolicy(max_retries=5, initial_delay=0.125, max_delay=0.125, sleep=sleep)
    assert run_with_retries(func, policy, what="test") == "ok"
    assert sleep.calls == [1.5, 2.0, 0.125]


def test_sleeps_follow_the_backoff_bounds() -> None:
    sleep = Recorder()
    func = Flaky([APIConnectionError("x") for _ in range(6)])
    policy = RetryPolicy(max_retries=6, initial_delay=0.5, max_delay=4.0, sleep=sleep)
    run_with_retries(func, policy, what="test")
    assert len(sleep.calls) == 6
    for attempt, delay in enumerate(sleep.calls, start=1):
        assert 0.5 <= delay <= min(4.0, 0.5 * 2 ** (attempt - 1))


def test_each_retry_logs_a_warning_with_the_reason_and_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    func = Flaky([status_error(503, retry_after=1.5), status_error(429, retry_after=2.25)])
    policy = RetryPolicy(max_retries=3, sleep=Recorder())
    assert run_with_retries(func, policy, what="chat request") == "ok"
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    first, second = (r.getMessage() for r in warnings)
    assert "chat request" in first
    assert "503" in first
    assert "1.5" in first
    assert "429" in second
    assert "2.25" in second


def test_no_warning_without_a_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(APIStatusError):
        run_with_retries(Flaky([status_error(400)]), RetryPolicy(sleep=Recorder()), what="x")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_deadline_stops_retrying_when_the_next_wait_would_pass_it() -> None:
    sleep = Recorder()
    exc = status_error(503, retry_after=5.0)
    func = Flaky([exc, status_error(503)])
    policy = RetryPolicy(max_retries=5, sleep=sleep)
    with pytest.raises(APIStatusError) as info:
        run_with_retries(func, policy, what="test", deadline=time.monotonic() + 1.0)
    assert info.value is exc
    assert func.calls == 1
    assert sleep.calls == []


def test_deadline_stops_the_backoff_too() -> None:
    sleep = Recorder()
    func = Flaky([APIConnectionError("x"), APIConnectionError("y")])
    policy = RetryPolicy(max_retries=5, initial_delay=3.0, max_delay=3.0, sleep=sleep)
    with pytest.raises(APIConnectionError, match="x"):
        run_with_retries(func, policy, what="test", deadline=time.monotonic() + 1.0)
    assert func.calls == 1
    assert sleep.calls == []


def test_deadline_far_away_allows_retries() -> None:
    sleep = Recorder()
    func = Flaky([status_error(503, retry_after=0.5), status_error(502, retry_after=0.5)])
    policy = RetryPolicy(max_retries=5, sleep=sleep)
    assert run_with_retries(func, policy, what="test", deadline=time.monotonic() + 600) == "ok"
    assert sleep.calls == [0.5, 0.5]


def test_policy_sleep_is_not_called_for_the_real_clock() -> None:
    """The injected sleep is the only way the loop waits: the run is instant."""
    sleep = Recorder()
    func = Flaky([status_error(503, retry_after=30.0)])
    started = time.monotonic()
    assert run_with_retries(func, RetryPolicy(sleep=sleep), what="test") == "ok"
    assert time.monotonic() - started < 5
    assert sleep.calls == [30.0]


def test_every_call_goes_through_one_tenacity_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    import tenacity

    made: list[Any] = []
    real = tenacity.Retrying

    def recording(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tenacity, "Retrying", recording)
    assert run_with_retries(lambda: "ok", RetryPolicy(sleep=Recorder()), what="test") == "ok"
    assert len(made) == 1  # the first attempt is inside it too
    with pytest.raises(APIStatusError):
        run_with_retries(Flaky([status_error(400)]), RetryPolicy(sleep=Recorder()), what="x")
    assert len(made) == 2


def test_the_first_failure_is_tenacitys_attempt_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    first = APIConnectionError("refused")
    func = Flaky([first, first])
    with pytest.raises(APIConnectionError) as info:
        run_with_retries(func, RetryPolicy(max_retries=1, sleep=Recorder()), what="x")
    assert info.value is first
    assert func.calls == 2  # the first attempt is not run twice
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert "retry 1 of 1" in messages[0]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_retry_after_above_the_limit_is_logged_whatever_max_retries(
    max_retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    exc = status_error(429, retry_after=120)
    with pytest.raises(RateLimitError):
        run_with_retries(Flaky([exc]), RetryPolicy(max_retries=max_retries, sleep=Recorder()), what="x")
    assert any("above max_retry_after" in r.getMessage() for r in caplog.records)
