"""``rate_limit=``: one limiter for all the workers spaces their chats, on a fake clock and as a
lower bound on the real one, with no burst credit after an idle spell; bad rates are refused."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
from _support_batch import echo

import aichatonline_sync as aco
from aichatonline_sync import (
    InvalidRequestError,
)
from aichatonline_sync._client import batch as _batch
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


class FakeTime:
    """A clock that stands still and a sleep that only records: the limiter's arithmetic, with
    no waiting and nothing timing-dependent."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)


def test_rate_limit_spaces_chats_across_workers(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTime()
    made: list[_batch.RateLimiter] = []
    real = _batch.RateLimiter

    def limiter(rate: float, **_: Any) -> _batch.RateLimiter:
        made.append(real(rate, clock=fake.clock, sleep=fake.sleep))
        return made[-1]

    monkeypatch.setattr(_batch, "RateLimiter", limiter)
    emu = emulator(reply=echo)
    prompts = [f"p{i}" for i in range(6)]
    texts = aco.batch(prompts, base_url=emu.url, max_workers=6, rate_limit=4)
    assert texts == [echo(p) for p in prompts]
    assert len(made) == 1  # one limiter for all the workers
    # Six chats at 4 a second: slots 0.25 s apart, the first at once.
    assert sorted(fake.sleeps) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25])


def test_the_rate_limiter_keeps_no_burst_credit_on_a_moving_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = _batch.RateLimiter(2, clock=lambda: now[0], sleep=sleep)
    limiter.acquire()
    limiter.acquire()
    now[0] += 0.2
    limiter.acquire()
    now[0] += 5  # idle for long: no burst credit builds up beyond the next slot
    limiter.acquire()
    limiter.acquire()
    assert slept == pytest.approx([0.5, 0.3, 0.5])


def test_rate_limit_is_a_lower_bound_on_real_time(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    started = time.monotonic()
    texts = aco.batch(["a", "b", "c", "d", "e"], base_url=emu.url, max_workers=5, rate_limit=20)
    assert texts == [echo(p) for p in "abcde"]
    assert time.monotonic() - started >= 4 / 20 * 0.9  # only slower under load, never faster


def test_a_bad_rate_limit_is_refused_before_sending(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    for bad in (0, -1, True, "2", float("nan")):
        with pytest.raises(InvalidRequestError, match="rate_limit"):
            aco.batch(["a"], base_url=emu.url, rate_limit=bad)
    # A rate so small that its wait cannot be slept (OverflowError in each prompt after the first).
    for bad in (1e-10, 1e-300):
        with pytest.raises(InvalidRequestError, match="one request a year at least"):
            aco.batch(["a", "b"], base_url=emu.url, rate_limit=bad)
    assert emu.requests == []
    assert aco.batch(["a", "b"], base_url=emu.url, rate_limit=10**400) == [echo("a"), echo("b")]
