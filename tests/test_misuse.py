"""Streams and conversations under misuse: a reply closed by a newer question raises instead of
ending as if complete, a stream read from two threads is refused with our error, and a
conversation used from several threads serialises its turns or refuses clearly, never losing a
turn silently. Real threads against the real emulator, synchronised by events (no sleeps)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from aichatonline_sync import (
    AiChatOnlineError,
    Conversation,
    IncompleteStreamError,
    Session,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
WAIT = 10.0

PIECES = ["one ", "two ", "three"]


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def session(emu: Emulator) -> Iterator[Session]:
    with Session(emu.url, max_retries=0) as s:
        yield s


def in_thread(work: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


def wait_until_reading(stream: Any) -> None:
    """Wait until another thread is inside a read of ``stream`` (blocked by a stall), by polling
    that state (the reply's ``reader``)."""
    idle = threading.Event()
    for _ in range(int(WAIT / 0.001)):
        if stream._reply.reader is not None:
            return
        idle.wait(0.001)
    raise AssertionError("the other thread never began its read")


# --- one stream, two threads ----------------------------------------------------------------------


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


def test_next_from_one_thread_after_another_is_fine(session: Session) -> None:
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
    stream.close()  # not ValueError('generator already executing')
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


# --- a reply closed by a newer question -----------------------------------------------------------


def test_a_reply_superseded_mid_loop_raises(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    first = conv.ask("first")
    got: list[str] = []
    second: list[str] = []

    def read_first() -> None:
        for piece in first:
            got.append(piece)
            if len(got) == 1:  # a newer question, in the middle of the loop
                second.append(conv.say("second"))

    with pytest.raises(IncompleteStreamError, match="a newer question was asked") as info:
        read_first()
    assert second == ["".join(PIECES)]
    assert info.value.partial == "".join(got)
    assert conv.messages == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "".join(PIECES)},
    ]


def test_a_reply_cleared_raises_when_read(session: Session) -> None:
    conv = Conversation(session=session)
    pending = conv.ask("hi")
    conv.clear()
    assert pending.closed  # its connection went back at once
    with pytest.raises(IncompleteStreamError, match="cleared"):
        next(pending)
    assert len(conv) == 0


def test_a_reply_cleared_mid_loop_hands_out_nothing_more(session: Session) -> None:
    # The emulator writes the whole reply at once: its pieces arrive (and are parsed) together.
    conv = Conversation(session=session)
    got: list[str] = []

    def read() -> None:
        for piece in conv.ask("hi"):
            got.append(piece)
            conv.clear()

    with pytest.raises(IncompleteStreamError, match="cleared") as info:
        read()
    assert got == ["one "]  # not the rest of the batch already parsed
    assert info.value.partial == "one "
    assert len(conv) == 0


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


# --- a conversation, several threads ----------------------------------------------------------------


def count_questions(prompt: str) -> str:
    return f"answer to question {len(re.findall(r'^User: ', prompt, re.M)) or 1} "


def test_say_from_several_threads_is_serialised(emulator: MakeEmulator) -> None:
    emu = emulator(reply=count_questions)
    threads = 8
    with Session(emu.url, max_retries=0, pool_maxsize=threads) as session:
        conv = Conversation(session=session)
        barrier = threading.Barrier(threads, timeout=WAIT)

        def say(i: int) -> str:
            barrier.wait()
            return conv.say(f"question from {i}")

        workers = [in_thread(lambda i=i: say(i), f"asker-{i}") for i in range(threads)]
        for thread, _ in workers:
            thread.join(WAIT * 3)
        assert all("result" in out for _, out in workers), [out for _, out in workers]
    assert len(conv) == 2 * threads  # no turn lost
    history = conv.messages
    assert [m["role"] for m in history] == ["user", "assistant"] * threads
    # Each question was sent after every turn before it: turn k saw k-1 earlier questions.
    prompts = [r.prompt or "" for r in emu.chat_requests]
    assert [count_questions(p) for p in prompts] == [
        f"answer to question {k} " for k in range(1, threads + 1)
    ]
    assert sorted(m["content"] for m in history if m["role"] == "user") == sorted(
        f"question from {i}" for i in range(threads)
    )


def test_clear_while_a_turn_waits_for_its_first_piece_drops_that_turn(
    emulator: MakeEmulator,
) -> None:
    hold, entered, release = threading.Event(), threading.Event(), threading.Event()

    def before_piece(index: int) -> None:
        if hold.is_set() and index == 0:  # the second question's reply waits before its first piece
            entered.set()
            assert release.wait(WAIT)

    emu = emulator(reply=PIECES, before_piece=before_piece)
    with Session(emu.url, max_retries=0) as session:
        conv = Conversation(session=session)
        assert conv.say("q1") == "".join(PIECES)
        hold.set()
        asker, out = in_thread(lambda: conv.say("q2"), "asker")
        assert entered.wait(WAIT)  # q2 was sent, with q1 and its answer before it
        conv.clear()
        release.set()
        asker.join(WAIT)
    assert not asker.is_alive()
    # The reply in progress is closed and not added: the history is not [q2, its answer], a turn
    # that was sent after a history that clear() forgot.
    assert isinstance(out.get("error"), IncompleteStreamError), out
    assert "cleared" in str(out["error"])
    assert out["error"].partial == ""
    assert conv.messages == []
    assert len(conv) == 0


def test_asking_while_another_threads_reply_is_open_is_refused(
    emu: Emulator, session: Session
) -> None:
    conv = Conversation(session=session)
    asked, release = threading.Event(), threading.Event()
    stream_of_a: list[Any] = []

    def ask_and_hold() -> str:
        stream = conv.ask("from A")
        stream_of_a.append(stream)
        asked.set()
        assert release.wait(WAIT)
        return "".join(stream)

    thread_a, out = in_thread(ask_and_hold, "thread-A")
    assert asked.wait(WAIT)
    for attempt in (lambda: conv.ask("from main"), lambda: conv.say("from main")):
        with pytest.raises(AiChatOnlineError, match="the thread 'thread-A' asked") as info:
            attempt()
        assert "one turn at a time" in str(info.value)
    assert [r.prompt for r in emu.chat_requests] == ["from A"]
    release.set()
    thread_a.join(WAIT)
    assert out["result"] == "".join(PIECES)  # A's reply was not closed by the refused questions
    assert conv.say("from main") == "".join(PIECES)
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["from A", "from main"]


def test_an_open_reply_of_a_thread_that_ended_is_superseded(session: Session) -> None:
    conv = Conversation(session=session)
    holder: list[Optional[Any]] = []
    thread, _ = in_thread(lambda: holder.append(conv.ask("abandoned")), "gone")
    thread.join(WAIT)
    assert conv.say("next") == "".join(PIECES)
    assert len(conv) == 2
    abandoned = holder[0]
    assert abandoned is not None
    with pytest.raises(IncompleteStreamError, match="newer question"):
        list(abandoned)
