"""The token's single flight (``TokenSlot``): one fetch at a time, its outcome shared, waiters that
leave for their own reasons. Threads are lined up with events and barriers, never with sleeps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync._client.token import TokenSlot
from aichatonline_sync.testing import Emulator

URL = "http://127.0.0.1:9/api/v1/user/getUniqueId"
WAIT = 10.0
PIECES = ["one ", "two"]


class Waiting(logging.Handler):
    """Counts the callers that began to wait for another thread's fetch (logged under the slot's
    lock, just before the wait releases it: once counted, an ending fetch wakes them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if "another thread is fetching" in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def reach(self, count: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, WAIT)


@pytest.fixture
def waiting(caplog: pytest.LogCaptureFixture) -> Iterator[Waiting]:
    caplog.set_level(logging.DEBUG, logger="aichatonline_sync")
    handler = Waiting()
    logger = logging.getLogger("aichatonline_sync")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class Callers:
    """Threads that each :meth:`TokenSlot.join`; the ones made leaders are reported, not ended."""

    def __init__(self, slot: TokenSlot) -> None:
        self.slot = slot
        self.outcomes: dict[int, Any] = {}
        self.leaders: list[int] = []
        self.led = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, count: int, **options: Any) -> None:
        barrier = threading.Barrier(count, timeout=WAIT)
        base = len(self._threads)
        for i in range(base, base + count):
            thread = threading.Thread(target=self._run, args=(i, barrier, options), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, index: int, barrier: threading.Barrier, options: dict[str, Any]) -> None:
        barrier.wait()
        try:
            got: Any = self.slot.join(url=URL, **{"stale": None, "refresh": False,
                                                  "deadline": None, "cancel": None, **options})
        except BaseException as exc:
            got = exc
        with self._lock:
            self.outcomes[index] = got
            if got is None:
                self.leaders.append(index)
                self.led.set()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self._threads), "a caller hung"


def test_one_leader_and_every_waiter_takes_its_token(waiting: Waiting) -> None:
    slot = TokenSlot()
    callers = Callers(slot)
    callers.start(16)
    assert callers.led.wait(WAIT)
    assert waiting.reach(15)
    slot.end(token="T1")
    callers.join()
    assert len(callers.leaders) == 1
    assert sorted(v for v in callers.outcomes.values() if v is not None) == ["T1"] * 15
    assert slot.token == "T1"
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) == "T1"


def test_a_failure_is_shared_by_every_waiter(waiting: Waiting) -> None:
    slot = TokenSlot()
    callers = Callers(slot)
    callers.start(8)
    assert callers.led.wait(WAIT)
    assert waiting.reach(7)
    failure = aco.APIStatusError("the token request failed: HTTP 400", status_code=400, url=URL)
    slot.end(error=failure)
    callers.join()
    assert [v for v in callers.outcomes.values() if v is not None] == [failure] * 7
    assert slot.token is None


def test_a_withdrawn_fetch_makes_exactly_one_new_leader(waiting: Waiting) -> None:
    slot = TokenSlot()
    callers = Callers(slot)
    callers.start(8)
    assert callers.led.wait(WAIT)
    assert waiting.reach(7)
    callers.led.clear()
    slot.end()  # withdrawn: no verdict, so the waiters try again
    assert callers.led.wait(WAIT)
    assert waiting.reach(7 + 6)  # the six others wait again, for the new leader
    assert len(callers.leaders) == 2
    slot.end(token="T2")
    callers.join()
    assert sorted(v for v in callers.outcomes.values() if v is not None) == ["T2"] * 6


def test_a_rejected_token_is_replaced_by_one_fetch(waiting: Waiting) -> None:
    slot = TokenSlot()
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    slot.end(token="T1")
    callers = Callers(slot)
    callers.start(16, stale="T1")
    assert callers.led.wait(WAIT)
    assert waiting.reach(15)
    slot.end(token="T2")
    callers.join()
    assert len(callers.leaders) == 1
    assert sorted(v for v in callers.outcomes.values() if v is not None) == ["T2"] * 15
    # A caller that saw the rejection only now takes the replacement: no second fetch.
    assert slot.join(stale="T1", refresh=False, deadline=None, cancel=None, url=URL) == "T2"


def test_refresh_waits_for_the_fetch_in_flight_else_leads(waiting: Waiting) -> None:
    slot = TokenSlot()
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    slot.end(token="T1")
    assert slot.join(stale=None, refresh=True, deadline=None, cancel=None, url=URL) is None
    callers = Callers(slot)
    callers.start(1, refresh=True)
    assert waiting.reach(1)
    slot.end(token="T2")
    callers.join()
    assert callers.outcomes == {0: "T2"}


def test_a_cancelled_waiter_leaves_at_once_and_the_fetch_goes_on(waiting: Waiting) -> None:
    slot = TokenSlot()
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    cancel = aco.Cancellation()
    cancelled = Callers(slot)
    cancelled.start(1, cancel=cancel)
    patient = Callers(slot)
    patient.start(1)
    assert waiting.reach(2)
    cancel.cancel()
    cancelled.join()
    error = cancelled.outcomes[0]
    assert isinstance(error, aco.APIConnectionError)
    assert error.retryable is False
    assert "cancel" in str(error)
    assert patient.outcomes == {}  # still waiting for the fetch
    slot.end(token="T1")
    patient.join()
    assert patient.outcomes == {0: "T1"}


def test_an_already_cancelled_caller_neither_takes_nor_fetches() -> None:
    slot = TokenSlot()
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    slot.end(token="T1")
    cancel = aco.Cancellation()
    cancel.cancel()
    with pytest.raises(aco.APIConnectionError, match="cancel"):
        slot.join(stale=None, refresh=True, deadline=None, cancel=cancel, url=URL)
    assert slot.join(stale=None, refresh=True, deadline=None, cancel=None, url=URL) is None


def test_a_waiter_past_its_deadline_leaves_with_a_timeout(waiting: Waiting) -> None:
    slot = TokenSlot()
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    with pytest.raises(aco.APITimeoutError, match="deadline") as info:
        slot.join(stale=None, refresh=False, deadline=time.monotonic(), cancel=None, url=URL)
    assert URL in str(info.value)
    assert waiting.count == 1
    slot.end(token="T1")  # the fetch still ends for everyone
    assert slot.token == "T1"


def test_only_the_leader_ends_a_fetch_and_once() -> None:
    slot = TokenSlot()
    with pytest.raises(AssertionError, match="only the leader"):
        slot.end(token="T1")
    assert slot.join(stale=None, refresh=False, deadline=None, cancel=None, url=URL) is None
    with pytest.raises(AssertionError, match="one way"):
        slot.end(token="T1", error=ValueError("x"))
    slot.end(token="T1")
    with pytest.raises(AssertionError, match="only the leader"):
        slot.end(token="T2")
    assert slot.token == "T1"


# -- through a session: the token request held until the test lets it go -------------------------


class HeldTokenHTTP(requests.Session):
    """Holds the first token request until :attr:`release` is set; :attr:`entered` says it came."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self._held = False
        self._lock = threading.Lock()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        with self._lock:
            hold = request.method == "GET" and not self._held
            self._held = self._held or hold
        if hold:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise RuntimeError("the held token request was never released")
        return super().send(request, **kwargs)


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def chats_around_a_held_fetch(
    emu: Emulator, waiting: Waiting, leader_cancel: Optional[aco.Cancellation] = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A first chat leads the token fetch, held; a second waits for it; then the fetch goes on
    (after ``leader_cancel`` is cancelled, if given). :returns: the two chats' outcomes."""
    http = HeldTokenHTTP()
    policy = aco.RetryPolicy(max_retries=0)
    with http, aco.Session(base_url=emu.url, retry=policy, http=http) as s:
        leader, first = in_thread(lambda: s.complete("first", cancel=leader_cancel))
        assert http.entered.wait(WAIT)
        follower, second = in_thread(lambda: s.complete("second"))
        assert waiting.reach(1)
        if leader_cancel is not None:
            leader_cancel.cancel()
        http.release.set()
        leader.join(WAIT)
        follower.join(WAIT)
        assert not leader.is_alive()
        assert not follower.is_alive()
    return first, second


@pytest.fixture
def emu(emulator: Callable[..., Emulator]) -> Emulator:
    return emulator(reply=PIECES)


def test_a_chat_waiting_for_a_failed_fetch_gets_its_error_without_asking_again(
    emu: Emulator, waiting: Waiting
) -> None:
    emu.fail("token", status=400, times=1)
    first, second = chats_around_a_held_fetch(emu, waiting)
    assert isinstance(first["error"], aco.APIStatusError)
    assert second["error"] is first["error"]
    assert len(emu.token_requests) == 1
    assert emu.chat_requests == []


def test_a_chat_waiting_for_a_fetch_withdrawn_by_its_leaders_cancel_fetches_its_own_token(
    emu: Emulator, waiting: Waiting
) -> None:
    emu.fail("token", status=503, times=1)
    first, second = chats_around_a_held_fetch(emu, waiting, leader_cancel=aco.Cancellation())
    assert isinstance(first["error"], aco.AiChatOnlineError)
    assert second.get("error") is None, second.get("error")
    assert second["result"] == "".join(PIECES)
    assert len(emu.token_requests) == 2  # the leader's 503, then the second chat's own
    assert len(emu.chat_requests) == 1
