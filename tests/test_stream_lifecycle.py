"""A stream's thread rules and its end: one thread reads it at a time (a second reader is refused
with our error), ``next()`` may come from one thread after another, it may be handed over once its
reader has ended, ``close()`` and ``abort()`` from any thread end it and hand out nothing more, and
a stream dropped unread is released. Real threads against the real emulator, synchronised by
events (no sleeps)."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from _support_threads import in_thread

import aichatonline_sync as aco
from aichatonline_sync import (
    AiChatOnlineError,
    IncompleteStreamError,
    Session,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
WAIT = 10.0

PIECES = ["one ", "two ", "three"]
SHORT = aco.Timeout(connect=5, read=5)


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def session(emu: Emulator) -> Iterator[Session]:
    with Session(emu.url, max_retries=0) as s:
        yield s


def wait_until_reading(stream: Any) -> None:
    """Wait until another thread is inside a read of ``stream`` (blocked by a stall), by polling
    that state (the reply's ``reader``)."""
    idle = threading.Event()
    for _ in range(int(WAIT / 0.001)):
        if stream._reply.reader is not None:
            return
        idle.wait(0.001)
    raise AssertionError("the other thread never began its read")


def test_a_stream_read_by_a_second_thread_is_refused(emu: Emulator, session: Session) -> None:
    emu.stall("chat", after=1, seconds=None)  # the first reader blocks after one piece
    stream = session.chat("hi")
    got_one = threading.Event()

    def read() -> list[str]:
        pieces = []
        for piece in stream:
            pieces.append(piece)
            got_one.set()
        return pieces

    reader, out = in_thread(read, "first-reader")
    assert got_one.wait(WAIT)
    wait_until_reading(stream)
    for attempt in (lambda: list(stream), lambda: next(stream), lambda: iter(stream)):
        with pytest.raises(AiChatOnlineError, match="being read by the thread 'first-reader'"):
            attempt()
    stream.abort()  # from any thread: ends the first reader's blocked read
    reader.join(WAIT)
    assert not reader.is_alive()
    assert isinstance(out["error"], IncompleteStreamError)
    assert out["error"].partial == "one "
    assert list(stream) == []  # closed now: any thread may find it ended


def test_next_may_be_called_from_one_thread_after_another(session: Session) -> None:
    stream = session.chat("hi")
    took, done = threading.Event(), threading.Event()

    def take_one_and_stay() -> str:
        piece = next(stream)
        took.set()
        assert done.wait(WAIT)  # alive while the main thread reads on
        return piece

    worker, out = in_thread(take_one_and_stay, "worker")
    assert took.wait(WAIT)
    assert next(stream) == "two "  # a pool's workers in turn: no ownership for next()
    assert next(stream) == "three"
    done.set()
    worker.join(WAIT)
    assert out["result"] == "one "


def test_close_from_another_thread_while_a_read_runs_aborts_it(
    emu: Emulator, session: Session
) -> None:
    emu.stall("chat", after=1, seconds=None)
    stream = session.chat("hi")
    got_one = threading.Event()

    def read() -> list[str]:
        pieces = []
        for piece in stream:
            pieces.append(piece)
            got_one.set()
        return pieces

    reader, out = in_thread(read, "reader")
    assert got_one.wait(WAIT)
    wait_until_reading(stream)
    stream.close()  # from another thread, while its read is blocked
    reader.join(WAIT)
    assert not reader.is_alive()
    assert isinstance(out["error"], IncompleteStreamError)
    assert stream.closed


def test_close_from_another_thread_between_pieces_cuts_the_reply_off(
    emu: Emulator, session: Session
) -> None:
    emu.stall("chat", after=1, seconds=None)  # one piece, then nothing more arrives
    stream = session.chat("hi")
    got_one, closed = threading.Event(), threading.Event()

    def read() -> list[str]:
        pieces = []
        for piece in stream:
            pieces.append(piece)
            got_one.set()
            assert closed.wait(WAIT)  # between pieces: not inside a read when close() runs
        return pieces

    reader, out = in_thread(read, "reader")
    assert got_one.wait(WAIT)
    stream.close()
    closed.set()
    reader.join(WAIT)
    assert not reader.is_alive()
    # Not a loop that ends normally with half a reply: the reader learns it was cut off.
    assert "result" not in out
    assert isinstance(out["error"], IncompleteStreamError)
    assert "the stream was closed" in str(out["error"])
    assert out["error"].partial == "one "
    assert stream.closed
    assert stream.text == "one "
    with pytest.raises(IncompleteStreamError, match="the stream was closed"):
        next(stream)


def test_close_by_the_reading_thread_still_just_ends_the_stream(session: Session) -> None:
    stream = session.chat("hi")
    assert next(stream) == "one "
    stream.close()
    assert stream.closed
    assert list(stream) == []  # its own thread closed it: nothing to report
    assert stream.text == "one "


def test_a_stream_may_be_handed_over_once_its_reader_has_ended(session: Session) -> None:
    stream = session.chat("hi")
    reader, out = in_thread(lambda: next(stream), "first")
    reader.join(WAIT)
    assert out["result"] == "one "
    assert list(stream) == ["two ", "three"]
    assert stream.text == "".join(PIECES)


@pytest.mark.parametrize("keep_text", [True, False])
def test_abort_from_another_thread_between_pieces_hands_out_nothing_more(
    session: Session, keep_text: bool
) -> None:
    stream = session.chat("hi", keep_text=keep_text)
    got_one, aborted = threading.Event(), threading.Event()
    pieces: list[str] = []

    def read() -> None:
        for piece in stream:
            pieces.append(piece)
            got_one.set()
            assert aborted.wait(WAIT)

    reader, out = in_thread(read, "reader")
    assert got_one.wait(WAIT)
    stream.abort("stopped by the test")
    aborted.set()
    reader.join(WAIT)
    assert pieces == ["one "]  # not the rest of the batch already parsed
    assert isinstance(out["error"], IncompleteStreamError)
    assert "stopped by the test" in str(out["error"])
    assert out["error"].partial == ("one " if keep_text else "")
    assert stream.text == ("one " if keep_text else "")
    with pytest.raises(IncompleteStreamError, match="stopped by the test"):
        next(stream)


def test_next_after_abort_with_a_reason_hands_out_nothing_more(session: Session) -> None:
    stream = session.chat("hi")
    assert next(stream) == "one "
    stream.abort("enough")
    for _ in range(2):
        with pytest.raises(IncompleteStreamError, match="enough") as info:
            next(stream)
        assert info.value.partial == "one "
    assert stream.closed


def test_a_stream_dropped_unread_is_released_with_a_cancellation(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["a ", "b"])
    cancel = aco.Cancellation()
    with aco.Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("hi", cancel=cancel)
        reply = weakref.ref(stream._reply)
        del stream
        gc.collect()
        assert reply() is None  # released (its connection with it), not kept by the cancel
