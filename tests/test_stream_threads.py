"""A stream under threads: one reader while many threads close, abort or read it at once.

Every race here is driven by barriers and events (no sleeps), and each check is on the end state:
the reply's connection is closed exactly once, the chat's last event fires at most once (and
exactly once when a read failed or reached the end), the reader's text is what it was handed.
These hold by the stream's lock, not by the GIL, so they are what a free-threaded build must keep.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from aichatonline_sync import AiChatOnlineError, ChatStream, IncompleteStreamError, Session
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
WAIT = 10.0
THREADS = 8
ROUNDS = 15
MANY = [f"p{i} " for i in range(300)]


class Events:
    """The hooks of the chat's last events, counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def hook(self, event: Any) -> None:
        with self.lock:
            self.counts[event.name] += 1

    def hooks(self) -> dict[str, list[Callable[[Any], None]]]:
        return {"chat_end": [self.hook], "chat_error": [self.hook]}


def count_closes(stream: ChatStream) -> list[int]:
    """Count the calls of the reply's ``response.close`` (into the returned one-item list)."""
    response = stream._reply._response
    original = response.close
    closes = [0]
    lock = threading.Lock()

    def close() -> None:
        with lock:
            closes[0] += 1
        original()

    response.close = close  # type: ignore[method-assign]
    return closes


def wait_until_reading(stream: ChatStream) -> None:
    idle = threading.Event()
    for _ in range(int(WAIT / 0.001)):
        if stream._reply.reader is not None:
            return
        idle.wait(0.001)
    raise AssertionError("the reader never began its read")


def run_all(workers: list[Callable[[], Any]]) -> list[dict[str, Any]]:
    """Run each worker in its own thread, all released at once by one barrier."""
    barrier = threading.Barrier(len(workers))
    outs: list[dict[str, Any]] = [{} for _ in workers]

    def run(work: Callable[[], Any], out: dict[str, Any]) -> None:
        barrier.wait(WAIT)
        try:
            out["result"] = work()
        except BaseException as exc:
            out["error"] = exc

    threads = [threading.Thread(target=run, args=(w, o), daemon=True) for w, o in zip(workers, outs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    return outs


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=MANY)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def session(emu: Emulator, events: Events) -> Iterator[Session]:
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as s:
        yield s


@pytest.mark.parametrize("how", ["close", "abort", "abort_reason", "mixed"])
def test_many_threads_stopping_a_blocked_read_end_it_once(
    emu: Emulator, session: Session, events: Events, how: str
) -> None:
    emu.stall("chat", after=1, seconds=None)
    stream = session.chat("hi")
    closes = count_closes(stream)
    got: list[str] = []
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            for piece in stream:
                got.append(piece)
        except BaseException as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until_reading(stream)

    def stop(i: int) -> Callable[[], None]:
        kind = how if how != "mixed" else ("close", "abort", "abort_reason")[i % 3]
        if kind == "close":
            return stream.close
        if kind == "abort":
            return stream.abort
        return lambda: stream.abort(f"stopped by {i}")

    run_all([stop(i) for i in range(THREADS)])
    reader.join(WAIT)
    assert not reader.is_alive()
    error = outcome["error"]
    assert isinstance(error, IncompleteStreamError)
    assert error.partial == "".join(got) == MANY[0] == stream.text
    assert stream.closed
    assert closes == [1]
    assert events.counts == Counter({"chat_error": 1})
    # A reason sticks only if it came before the read released the reply; in "mixed" a plain
    # abort may win the race, and then the stream just ends for later reads.
    reasoned = stream._reply.abort_reason is not None
    if how != "mixed":
        assert reasoned == (how != "abort")
    with pytest.raises(IncompleteStreamError if reasoned else StopIteration):
        next(stream)
    assert closes == [1]


def close_race(session: Session, events: Events, how: str) -> None:
    """One reader and THREADS stoppers, released at once by a barrier; checks the end state."""
    events.counts.clear()
    stream = session.chat("hi")
    closes = count_closes(stream)
    got: list[str] = []

    def read() -> None:
        for piece in stream:
            got.append(piece)

    def stop(i: int) -> Callable[[], None]:
        if how == "close":
            return stream.close
        return lambda: stream.abort(f"stopped by {i}")

    reader_out, *_ = run_all([read] + [stop(i) for i in range(THREADS)])
    assert stream.closed
    text = "".join(got)
    assert stream.text == text
    assert MANY[: len(got)] == got
    error = reader_out.get("error")
    if error is None and len(got) == len(MANY):
        assert stream._reply.finished
        assert closes == [0]  # read to its end: the connection went back to the pool
        assert events.counts == Counter({"chat_end": 1})
    else:
        assert closes == [1]
        assert events.counts["chat_end"] == 0
        assert isinstance(error, IncompleteStreamError)
        assert error.partial == text
    assert sum(events.counts.values()) <= 1


@pytest.mark.parametrize("how", ["close", "abort_reason"])
def test_closing_from_many_threads_while_one_reads_ends_in_one_clean_state(
    session: Session, events: Events, how: str
) -> None:
    for _ in range(ROUNDS):
        close_race(session, events, how)


def next_race(session: Session, events: Events) -> None:
    """THREADS threads calling ``next()`` at once until the end; checks what each was handed."""
    events.counts.clear()
    stream = session.chat("hi")
    closes = count_closes(stream)
    lock = threading.Lock()
    handed: list[str] = []
    refused: list[BaseException] = []

    def read() -> None:
        while True:
            try:
                piece = next(stream)
            except StopIteration:
                return
            except AiChatOnlineError as exc:
                with lock:
                    refused.append(exc)
                continue
            with lock:
                handed.append(piece)

    outs = run_all([read] * THREADS)
    assert all("error" not in out for out in outs)
    assert all("read by one thread at a time" in str(exc) for exc in refused)
    assert Counter(handed) == Counter(MANY)  # every piece handed out exactly once
    assert stream.text == "".join(MANY)
    assert closes == [0]
    assert events.counts == Counter({"chat_end": 1})


def test_many_threads_calling_next_at_once_each_get_distinct_pieces(
    session: Session, events: Events
) -> None:
    for _ in range(ROUNDS):
        next_race(session, events)


def test_a_second_loop_while_the_first_reads_is_refused_with_our_error(
    emu: Emulator, session: Session
) -> None:
    emu.stall("chat", after=1, seconds=None)
    stream = session.chat("hi")
    first_out: dict[str, Any] = {}

    def first_read() -> None:
        try:
            list(stream)
        except IncompleteStreamError as exc:
            first_out["error"] = exc

    first = threading.Thread(target=first_read, name="first-reader", daemon=True)
    first.start()
    wait_until_reading(stream)
    outs = run_all([lambda: next(stream)] * THREADS)
    for out in outs:
        assert isinstance(out["error"], AiChatOnlineError)
        assert "'first-reader'" in str(out["error"])
    stream.abort("done")
    first.join(WAIT)
    assert not first.is_alive()
    assert first_out["error"].partial == MANY[0]


def test_text_read_from_other_threads_is_always_a_prefix_of_what_was_handed_out(
    session: Session,
) -> None:
    stream = session.chat("hi")
    whole = "".join(MANY)
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        for _piece in stream:
            pass
        done.set()

    def watch() -> None:
        while not done.is_set():
            seen.append(stream.text)

    run_all([read, watch, watch])
    assert stream.text == whole
    assert all(whole.startswith(text) for text in seen)


@pytest.mark.parametrize("source", ["network", "cache"])
def test_an_abort_in_the_middle_of_a_batch_taken_by_many_threads_keeps_each_piece_once(
    emulator: MakeEmulator, tmp_path: Path, source: str
) -> None:
    """A body read gives a batch of a thousand pieces (a cache hit: one batch of them all);
    THREADS threads take them while one aborts: every piece goes to one thread at most, the taken
    ones are a prefix of the reply, and the text and each later error's ``partial`` are exactly
    that prefix."""
    pieces = [f"q{i} " for i in range(3000)]
    emu = emulator(reply=pieces, framing="length")
    cache = tmp_path / "replies.sqlite" if source == "cache" else None
    with Session(emu.url, max_retries=0, cache=cache) as session:
        if cache is not None:
            assert "".join(session.chat("hi")) == "".join(pieces)
        # Threads switch often, so that the abort lands inside a batch rather than between two.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for _ in range(ROUNDS):
                abort_while_many_take(session, pieces, cached=cache is not None)
        finally:
            sys.setswitchinterval(switch)


def abort_while_many_take(session: Session, pieces: list[str], *, cached: bool) -> None:
    stream = session.chat("hi")
    assert stream.cached == cached
    taken: list[list[str]] = [[] for _ in range(THREADS)]
    failures: list[AiChatOnlineError] = []
    lock = threading.Lock()
    some_taken = threading.Event()

    def take(mine: list[str]) -> None:
        while True:
            try:
                mine.append(next(stream))
            except StopIteration:
                return
            except AiChatOnlineError as exc:
                if "read by one thread at a time" in str(exc):
                    continue
                with lock:
                    failures.append(exc)
                return
            if len(mine) == 20:
                some_taken.set()

    def stop() -> None:
        some_taken.wait(WAIT)
        stream.abort("enough")

    run_all([lambda mine=mine: take(mine) for mine in taken] + [stop])
    order = {piece: i for i, piece in enumerate(pieces)}.__getitem__
    got = [piece for mine in taken for piece in mine]
    assert len(got) == len(set(got))  # no piece handed out twice
    assert all(mine == sorted(mine, key=order) for mine in taken)
    prefix = pieces[: len(got)]
    assert sorted(got, key=order) == prefix
    assert stream.text == "".join(prefix)
    if len(got) < len(pieces):
        assert failures
        for failure in failures:
            assert isinstance(failure, IncompleteStreamError)
            assert failure.partial == "".join(prefix)
