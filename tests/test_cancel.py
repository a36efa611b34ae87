"""``aco.Cancellation`` (``cancel=``) and ``ChatStream.abort()``: stopping chats from another thread.

Threads are lined up with events, never with sleeps. Where a :class:`threading.Timer` fires the
cancel (so that it most likely lands while the reader is blocked in a read), the test passes
whichever comes first, and asserts that the timer did fire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["one ", "two ", "three ", "four"]
#: Long enough that only a cancel (never a timeout) can end a blocked read within a test.
PATIENT = aco.Timeout(connect=5, read=30)
#: "Promptly": far below the read timeout and the retry waits.
PROMPT_SECONDS = 5.0
#: How long after the last piece the timer fires: the reader is blocked in its read by then.
FIRE_AFTER = 0.2


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def session(emu: Emulator) -> Iterator[aco.Session]:
    with aco.Session(base_url=emu.url, timeout=PATIENT) as s:
        yield s


class RetryWaits(logging.Handler):
    """Sets :attr:`waiting` when the library logs that it is about to wait before a retry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.waiting = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.waiting.set()


@pytest.fixture
def retry_waits(caplog: pytest.LogCaptureFixture) -> Iterator[RetryWaits]:
    caplog.set_level(logging.WARNING, logger="aichatonline_sync")
    handler = RetryWaits()
    logger = logging.getLogger("aichatonline_sync")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def read_until_stopped(
    stream: aco.ChatStream, after: int, stop: Callable[[], None]
) -> tuple[list[str], float, aco.IncompleteStreamError]:
    """Read ``stream``; once ``after`` pieces are in, have a timer call ``stop`` while the next read
    blocks. :returns: the pieces read, the seconds from the timer's start to the error, the error."""
    pieces: list[str] = []
    timer = threading.Timer(FIRE_AFTER, stop)
    started = 0.0
    error: Optional[aco.IncompleteStreamError] = None
    try:
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == after:
                started = time.monotonic()
                timer.start()
    except aco.IncompleteStreamError as exc:
        error = exc
    finally:
        timer.cancel()
        if started:
            timer.join(5)
    elapsed = time.monotonic() - started
    assert started, "the stream ended before the stop was armed"
    assert error is not None, f"the stream was read to its end: {pieces!r}"
    return pieces, elapsed, error


# -- a blocked read -----------------------------------------------------------------------------


def test_cancel_from_another_thread_ends_a_stalled_read(
    emu: Emulator, session: aco.Session
) -> None:
    emu.stall("chat", after=2, seconds=None)  # two pieces, then nothing until the emulator stops
    cancel = aco.Cancellation()
    cancelled = threading.Event()

    def stop() -> None:
        cancel.cancel()
        cancelled.set()

    stream = session.chat("hi", cancel=cancel)
    pieces, elapsed, error = read_until_stopped(stream, after=2, stop=stop)

    assert cancelled.is_set()
    assert cancel.cancelled
    assert elapsed < PROMPT_SECONDS
    assert pieces == PIECES[:2]
    assert error.partial == "one two "
    assert stream.partial == "one two "
    assert stream.closed
    assert len(emu.chat_requests) == 1


def test_one_cancellation_stops_every_chat_that_uses_it(
    emu: Emulator, session: aco.Session
) -> None:
    emu.stall("chat", after=1, seconds=None, times=2)
    cancel = aco.Cancellation()
    first = session.chat("first", cancel=cancel)
    second = session.chat("second", cancel=cancel)
    assert next(first) == next(second) == "one "

    cancel.cancel()

    for stream in (first, second):
        with pytest.raises(aco.IncompleteStreamError) as info:
            next(stream)
        assert info.value.partial == "one "
        assert stream.closed


def test_abort_from_another_thread_ends_a_blocked_read(emu: Emulator, session: aco.Session) -> None:
    emu.stall("chat", after=3, seconds=None)
    aborted = threading.Event()
    stream = session.chat("hi")

    def stop() -> None:
        stream.abort()
        aborted.set()

    pieces, elapsed, error = read_until_stopped(stream, after=3, stop=stop)

    assert aborted.is_set()
    assert elapsed < PROMPT_SECONDS
    assert pieces == PIECES[:3]
    assert error.partial == "one two three "
    assert stream.closed
    stream.abort()  # idempotent, also once closed


def test_cancel_after_the_end_changes_nothing(session: aco.Session) -> None:
    cancel = aco.Cancellation()
    with session.chat("hi", cancel=cancel) as stream:
        assert list(stream) == PIECES
    cancel.cancel()
    assert stream.text == "".join(PIECES)


# -- retry waits --------------------------------------------------------------------------------


def test_cancel_ends_a_retry_wait_at_once_and_sends_nothing_more(
    emu: Emulator, retry_waits: RetryWaits
) -> None:
    emu.fail("chat", status=503, times=5)
    policy = aco.RetryPolicy(max_retries=5, initial_delay=30, max_delay=30)  # real time.sleep
    cancel = aco.Cancellation()
    cancelled_at: list[float] = []

    def cancel_when_waiting() -> None:
        if retry_waits.waiting.wait(10):
            cancelled_at.append(time.monotonic())
            cancel.cancel()

    canceller = threading.Thread(target=cancel_when_waiting, daemon=True)
    with aco.Session(base_url=emu.url, retry=policy, timeout=PATIENT) as s:
        canceller.start()
        started = time.monotonic()
        with pytest.raises(aco.APIConnectionError) as info:
            s.chat("hi", cancel=cancel)
        elapsed = time.monotonic() - started
    canceller.join(5)

    assert elapsed < PROMPT_SECONDS  # not the 30 s wait
    assert cancelled_at, "the retry wait was never logged"
    assert time.monotonic() - cancelled_at[0] < PROMPT_SECONDS
    error = info.value
    assert not isinstance(error, aco.APITimeoutError)
    assert error.retryable is False
    assert "cancel" in str(error)
    assert len(emu.chat_requests) == 1  # the first attempt only: nothing after the cancel
    assert emu.pending_faults("chat") == 4


def test_cancel_ends_a_token_retry_wait(emu: Emulator, retry_waits: RetryWaits) -> None:
    emu.fail("token", status=503, times=5)
    policy = aco.RetryPolicy(max_retries=5, initial_delay=30, max_delay=30)
    cancel = aco.Cancellation()

    def cancel_when_waiting() -> None:
        if retry_waits.waiting.wait(10):
            cancel.cancel()

    canceller = threading.Thread(target=cancel_when_waiting, daemon=True)
    with aco.Session(base_url=emu.url, retry=policy, timeout=PATIENT) as s:
        canceller.start()
        started = time.monotonic()
        with pytest.raises(aco.APIConnectionError) as info:
            s.chat("hi", cancel=cancel)
        elapsed = time.monotonic() - started
    canceller.join(5)

    assert elapsed < PROMPT_SECONDS
    assert info.value.retryable is False
    assert len(emu.token_requests) == 1
    assert emu.chat_requests == []


# -- waiting for the token another thread fetches ------------------------------------------------


class Logged(logging.Handler):
    """Sets :attr:`seen` once the library logs a message that contains ``words``."""

    def __init__(self, words: str) -> None:
        super().__init__(logging.DEBUG)
        self.words = words
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.seen.set()


@pytest.fixture
def waiting_for_token(caplog: pytest.LogCaptureFixture) -> Iterator[Logged]:
    """Set when a chat starts waiting for the token that another thread is fetching."""
    caplog.set_level(logging.DEBUG, logger="aichatonline_sync")
    handler = Logged("another thread is fetching")
    logger = logging.getLogger("aichatonline_sync")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``work`` in a thread; the dict gets its ``"result"`` or ``"error"``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_cancel_wakes_a_chat_waiting_for_another_threads_token(
    emu: Emulator, waiting_for_token: Logged
) -> None:
    emu.stall("token")  # the first token request gets no answer until the emulator stops
    cancel = aco.Cancellation()
    with aco.Session(base_url=emu.url, timeout=PATIENT, max_retries=0) as s:
        leader, _ = in_thread(lambda: s.complete("first"))
        follower, outcome = in_thread(lambda: s.complete("second", cancel=cancel))
        assert waiting_for_token.seen.wait(10), "the second chat never waited for the token"
        started = time.monotonic()
        cancel.cancel()
        follower.join(PROMPT_SECONDS)
        elapsed = time.monotonic() - started
        assert not follower.is_alive(), "the cancelled chat still waits for the other's token"
        emu.stop()  # ends the stalled token request
        leader.join(30)

    assert elapsed < PROMPT_SECONDS
    error = outcome["error"]
    assert isinstance(error, aco.APIConnectionError)
    assert error.retryable is False
    assert "cancel" in str(error)
    # The cancelled chat never asked for a token of its own (the first chat may not have
    # connected yet when the second one began to wait for it).
    assert emu.connections <= 1
    assert emu.chat_requests == []


def test_total_deadline_bounds_the_wait_for_another_threads_token(
    emu: Emulator, waiting_for_token: Logged
) -> None:
    emu.stall("token")
    with aco.Session(base_url=emu.url, timeout=PATIENT, max_retries=0) as s:
        leader, _ = in_thread(lambda: s.complete("first"))
        assert emulator_connected(emu)  # so the first chat is fetching the token
        started = time.monotonic()
        with pytest.raises(aco.APITimeoutError) as info:
            s.complete("second", timeout=aco.Timeout(connect=5, read=30, total=0.5))
        elapsed = time.monotonic() - started
        emu.stop()
        leader.join(30)

    assert waiting_for_token.seen.is_set()
    assert elapsed < PROMPT_SECONDS
    assert "deadline" in str(info.value)
    assert emu.url in str(info.value)


def emulator_connected(emu: Emulator, within: float = 10.0) -> bool:
    """Wait until the emulator has accepted a connection (its count, not a sleep, decides)."""
    ends = time.monotonic() + within
    while time.monotonic() < ends:
        if emu.connections:
            return True
        time.sleep(0.005)
    return False


# -- already cancelled --------------------------------------------------------------------------


def test_chat_with_an_already_cancelled_cancellation_sends_no_chat_request(
    emu: Emulator, session: aco.Session
) -> None:
    cancel = aco.Cancellation()
    cancel.cancel()

    with pytest.raises(aco.APIConnectionError) as info:
        session.chat("hi", cancel=cancel)
    with pytest.raises(aco.APIConnectionError):
        session.complete("hi", cancel=cancel)

    assert info.value.retryable is False
    assert emu.chat_requests == []


def test_chat_with_a_kept_token_and_a_cancelled_cancellation_sends_nothing(
    emu: Emulator, session: aco.Session
) -> None:
    session.grab_token()
    before = len(emu.requests)
    cancel = aco.Cancellation()
    cancel.cancel()

    with pytest.raises(aco.APIConnectionError):
        session.chat("hi", cancel=cancel)

    assert len(emu.requests) == before


def test_chat_with_an_already_cancelled_cancellation_sends_nothing_at_all(
    emu: Emulator, session: aco.Session
) -> None:
    cancel = aco.Cancellation()
    cancel.cancel()

    with pytest.raises(aco.APIConnectionError):
        session.chat("hi", cancel=cancel)

    assert emu.requests == []


# -- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel", [True, "yes", threading.Event(), object()])
def test_cancel_of_the_wrong_type_is_rejected_before_io(
    emu: Emulator, session: aco.Session, cancel: Any
) -> None:
    with pytest.raises(aco.InvalidRequestError, match="cancel"):
        session.chat("hi", cancel=cancel)
    with pytest.raises(aco.InvalidRequestError, match="cancel"):
        aco.complete("hi", base_url=emu.url, cancel=cancel)
    assert emu.requests == []
    assert emu.connections == 0


@pytest.mark.parametrize("max_retries", [2, 3])
def test_max_retries_and_retry_together_are_rejected(max_retries: int) -> None:
    with pytest.raises(aco.InvalidRequestError, match="max_retries"):
        aco.Session(max_retries=max_retries, retry=aco.RetryPolicy(max_retries=5))


def test_retry_policy_alone_or_nothing_gives_the_expected_retries() -> None:
    with aco.Session(retry=aco.RetryPolicy(max_retries=5)) as s:
        assert s.retry.max_retries == 5
    with aco.Session() as s:
        assert s.retry.max_retries == 2
    with aco.Session(max_retries=3) as s:
        assert s.retry.max_retries == 3
