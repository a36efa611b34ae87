"""A stream under forced interleavings: the lock-free hand-out of a batch's pieces (a deque) against
aborts, closes and other readers, and the chat's last event. A thread is paused at a given line
or opcode of the library (a per-thread trace function waiting on an Event), so each interleaving
happens every run, with no sleeps."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from typing import Any, Callable, Optional

import pytest
from _support_threads import PauseAt, in_thread

from aichatonline_sync import AiChatOnlineError, ChatStream, IncompleteStreamError, Session
from aichatonline_sync._client.stream import Reply
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
WAIT = 10.0


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: list[BaseException] = []

    def hook(self, event: Any) -> None:
        with self.lock:
            self.counts[event.name] += 1
            if event.error is not None:
                self.errors.append(event.error)

    def hooks(self) -> dict[str, list[Callable[[Any], None]]]:
        return {"chat_end": [self.hook], "chat_error": [self.hook]}


def start(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    return in_thread(work, "worker")


# -- a close from the thread that made the stream, after a worker took a piece ------------------


class PauseAtPopleft:
    """Pause the thread that runs :meth:`run` at a ``deque.popleft`` made while ``lock`` was free
    (a piece taken without the lock): just before it (``"c_call"``: the deque is on the stack) or
    just after it returned (``"c_return"``), until :meth:`resume`. ``paused`` is set when that
    happened, ``settled`` also when the work ended without it. (A profile function sees calls of
    C functions on every Python; opcode tracing does not work alike on all of them.)"""

    def __init__(self, lock: Any, event: str = "c_call") -> None:
        self.lock = lock
        self.event = event
        self.paused = threading.Event()
        self.settled = threading.Event()
        self.go = threading.Event()

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if (
            event == self.event
            and getattr(arg, "__name__", "") == "popleft"
            and not self.paused.is_set()
            and not self.lock.locked()
        ):
            self.paused.set()
            self.settled.set()
            assert self.go.wait(WAIT)

    def run(self, work: Callable[[], Any]) -> Any:
        sys.setprofile(self._profile)
        try:
            return work()
        finally:
            sys.setprofile(None)
            self.settled.set()

    def resume(self) -> None:
        self.go.set()


def test_close_by_the_maker_after_a_worker_took_a_piece_does_not_look_complete(
    emulator: MakeEmulator,
) -> None:
    """The thread that made the stream hands it to a worker that calls ``next()``; the maker
    closes it as soon as the worker holds a piece: the worker's next read raises
    IncompleteStreamError (a reply cut off never looks complete) and the chat gets one
    chat_error. The worker is paused right after its piece left the deque, if it took it without
    the lock: a thread's first piece must come under the lock with ``last_reader``, or ``close()``
    would take the maker for the reader and end the stream quietly."""
    emu = emulator(reply=["one ", "two ", "three ", "four"], framing="length")
    events = Events()
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as session:
        stream = session.chat("hi")  # made (and primed) by this thread
        pause = PauseAtPopleft(stream._reply._lock, "c_return")
        go = threading.Event()
        got: list[str] = []

        def worker() -> None:
            got.append(pause.run(lambda: next(stream)))
            assert go.wait(WAIT)
            got.extend(iter(lambda: next(stream), None))  # until StopIteration or an error

        thread, out = start(worker)
        assert pause.settled.wait(WAIT)  # the worker holds its piece (paused, or its next() ended)
        stream.close()  # another thread than the one that took a piece
        pause.resume()
        go.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert got == ["one "]
        assert isinstance(out.get("error"), IncompleteStreamError), (got, out)
        assert out["error"].partial == "one "
        assert events.counts == Counter({"chat_error": 1})


def test_one_abort_during_a_read_gives_the_reader_and_chat_error_one_error(
    emulator: MakeEmulator,
) -> None:
    """An abort with a reason lands in a read that then gets its bytes; the abort's own release
    runs between the read's end and its raise: the reader, chat_error and every later read see
    one error object."""
    emu = emulator(reply=["a "], framing="length")
    events = Events()
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as session:
        stream = session.chat("hi")
        reply = stream._reply
        in_read, go = threading.Event(), threading.Event()

        def next_batch(*, started: bool) -> list[str]:
            in_read.set()
            assert go.wait(WAIT)
            return ["b "]  # the read had its bytes when the abort came

        reply._next_batch = next_batch  # type: ignore[method-assign]
        read_pause = PauseAt(Reply._read, "if error is None:")
        abort_pause = PauseAt(ChatStream.abort, "reply.release_if_idle()")

        def reader() -> Any:
            assert next(stream) == "a "
            return read_pause.run(lambda: next(stream))

        reading, read_out = start(reader)
        assert in_read.wait(WAIT)
        aborting, _ = start(lambda: abort_pause.run(lambda: stream.abort("enough")))
        assert abort_pause.paused.wait(WAIT)  # the reason is set; its release not yet run
        go.set()
        assert read_pause.paused.wait(WAIT)  # the read ended, its error not yet raised
        abort_pause.resume()
        aborting.join(WAIT)
        read_pause.resume()
        reading.join(WAIT)
        error = read_out.get("error")
        assert isinstance(error, IncompleteStreamError)
        assert events.errors == [error]
        assert events.errors[0] is error
        with pytest.raises(IncompleteStreamError) as later:
            next(stream)
        assert later.value is error


# -- an abort with a reason that lands in the read that meets the end ---------------------------


@pytest.mark.parametrize("source", ["network", "cache"])
def test_an_abort_with_a_reason_inside_the_last_read_is_that_reads_error(
    emulator: MakeEmulator, tmp_path: Any, source: str
) -> None:
    """An abort with a reason that lands inside the read that meets the end of the body (after
    ``_next_batch`` checked ``abort_reason``, before ``_finish`` takes the lock) is that read's
    error: the end is not handed out, no chat_end, and every later ``next()`` raises it too."""
    emu = emulator(reply=["one ", "two"])
    cache = tmp_path / "replies.sqlite" if source == "cache" else None
    events = Events()
    with Session(emu.url, max_retries=0, cache=cache, event_hooks=events.hooks()) as session:
        if cache is not None:
            assert "".join(session.chat("hi")) == "one two"
            events.counts.clear()
        stream = session.chat("hi")
        pause = PauseAt(
            Reply._read, "if batch is None:", when=lambda f: f.f_locals["batch"] is None
        )
        got: list[str] = []

        def reader() -> None:
            pause.run(lambda: got.extend(stream))

        thread, out = start(reader)
        assert pause.paused.wait(WAIT)  # the read met the end of the body, not yet finished
        stream.abort("enough")
        pause.resume()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert "".join(got) == "one two"
        with pytest.raises(IncompleteStreamError, match="enough"):
            next(stream)  # "every later attempt to iterate the stream raises that error"
        assert isinstance(out.get("error"), IncompleteStreamError)  # "that read raises it"
        if cache is None:
            assert events.counts == Counter({"chat_error": 1})


# -- the chat_error of an abort between reads is the error the reader gets ----------------------


def test_the_chat_error_of_an_abort_between_reads_is_the_error_the_reader_gets(
    emulator: MakeEmulator,
) -> None:
    """The hook's error *is* the one the next read raises, as for any failure after the first
    piece."""
    emu = emulator(reply=["one ", "two ", "three"])
    events = Events()
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as session:
        stream = session.chat("hi")
        assert next(stream) == "one "
        stream.abort("enough")
        with pytest.raises(IncompleteStreamError) as raised:
            next(stream)
    assert events.errors == [raised.value]
    assert events.errors[0] is raised.value


# -- no IndexError of the deque as the context of any error -------------------------------------


def _no_index_error(exc: Optional[BaseException]) -> None:
    seen = 0
    while exc is not None and seen < 10:
        assert not isinstance(exc, IndexError), repr(exc)
        exc = exc.__context__ or exc.__cause__
        seen += 1


def test_errors_carry_no_index_error_context(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        next(stream)
        stream.abort("enough")
        for _ in range(2):
            with pytest.raises(IncompleteStreamError) as raised:
                next(stream)
            _no_index_error(raised.value)
        with pytest.raises(IncompleteStreamError) as raised:
            iter(stream)
        _no_index_error(raised.value)
    emu.stall("chat", after=1, seconds=None)
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        thread, out = start(lambda: list(stream))
        for _ in range(int(WAIT / 0.001)):
            if stream._reply.reader is not None:
                break
            threading.Event().wait(0.001)
        with pytest.raises(AiChatOnlineError) as raised:
            next(stream)  # busy
        _no_index_error(raised.value)
        stream.abort("stop")
        thread.join(WAIT)
        _no_index_error(out.get("error"))


# -- keep_text=False: the count in the message is what the threads were handed -----------------


@pytest.mark.parametrize("source", ["network", "cache"])
def test_without_keep_text_the_count_is_what_many_threads_took(
    emulator: MakeEmulator, tmp_path: Any, source: str
) -> None:
    pieces = [f"q{i} " for i in range(2000)]
    emu = emulator(reply=pieces, framing="length")
    cache = tmp_path / "replies.sqlite" if source == "cache" else None
    switch = sys.getswitchinterval()
    with Session(emu.url, max_retries=0, cache=cache) as session:
        if cache is not None:
            assert "".join(session.chat("hi")) == "".join(pieces)
        sys.setswitchinterval(1e-6)
        try:
            for _ in range(10):
                stream = session.chat("hi", keep_text=False)
                taken: list[list[str]] = [[] for _ in range(6)]
                failures: list[BaseException] = []
                some = threading.Event()

                def take(mine: list[str]) -> None:
                    while True:
                        try:
                            mine.append(next(stream))  # noqa: B023
                        except StopIteration:
                            return
                        except AiChatOnlineError as exc:
                            if "one thread at a time" in str(exc):
                                continue
                            failures.append(exc)  # noqa: B023
                            return
                        if len(mine) == 10:
                            some.set()  # noqa: B023

                threads = [threading.Thread(target=take, args=(m,)) for m in taken]
                for t in threads:
                    t.start()
                some.wait(WAIT)
                stream.abort("enough")
                for t in threads:
                    t.join(WAIT)
                got = [p for m in taken for p in m]
                assert len(got) == len(set(got))
                order = {p: i for i, p in enumerate(pieces)}.__getitem__
                assert sorted(got, key=order) == pieces[: len(got)]
                chars = sum(map(len, got))
                for failure in failures:
                    assert f"after {chars} characters (not kept)" in str(failure), str(failure)
                    assert failure.partial == ""  # type: ignore[attr-defined]
        finally:
            sys.setswitchinterval(switch)


# -- a reader paused with the deque on its stack, just before popleft ---------------------------


def test_an_abort_while_a_reader_holds_the_deque_hands_out_nothing_more(
    emulator: MakeEmulator,
) -> None:
    emu = emulator(reply=["a "], framing="length")
    events = Events()
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as session:
        stream = session.chat("hi")
        batches = iter([[f"p{i} " for i in range(50)], None])
        # The body's next read, controlled: how a real body splits into reads depends on urllib3.
        stream._reply._next_batch = lambda *, started: next(batches)  # type: ignore[method-assign]
        pause = PauseAtPopleft(stream._reply._lock)

        def reader() -> None:
            assert next(stream) == "a "
            assert next(stream) == "p0 "  # read by this thread: it reads last now
            assert len(stream._reply._pieces) == 49  # the rest of the batch waits in the deque
            pause.run(lambda: next(stream))

        thread, out = start(reader)
        assert pause.paused.wait(WAIT), out
        stream.abort("enough")
        pause.resume()
        thread.join(WAIT)
        error = out.get("error")
        assert isinstance(error, IncompleteStreamError), out
        assert error.partial == "a p0 " == stream.text
        assert events.counts == Counter({"chat_error": 1})


def test_a_reader_holding_an_old_deque_takes_from_the_new_batch_in_order(
    emulator: MakeEmulator,
) -> None:
    """T1 is paused with the current deque (one piece left) on its stack; this thread takes that
    piece and reads the next batch (its first piece); T1 then gets the batch's second piece."""
    emu = emulator(reply=["z "], framing="length")
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        reply = stream._reply
        assert next(stream) == "z "
        # The body's next reads, controlled: how a real body splits into reads depends on urllib3.
        batches = iter([["a ", "x "], ["b ", "c "], None])
        reply._next_batch = lambda *, started: next(batches)  # type: ignore[method-assign]
        pause = PauseAtPopleft(stream._reply._lock)

        def reader() -> str:
            assert next(stream) == "a "  # read by this thread: it reads last now
            return str(pause.run(lambda: next(stream)))

        thread, out = start(reader)
        assert pause.paused.wait(WAIT), out  # T1 holds the deque ["x "]
        assert next(stream) == "x "
        assert next(stream) == "b "  # a new batch: its first piece taken before it is published
        pause.resume()
        thread.join(WAIT)
        assert out == {"result": "c "}
        assert stream.text == "z a x b c "
        with pytest.raises(StopIteration):
            next(stream)
        assert stream.text == "z a x b c "
        assert reply.finished


def test_readers_taking_the_head_while_an_abort_drains_the_tail_keep_a_prefix(
    emulator: MakeEmulator,
) -> None:
    """The abort is paused inside its drain (one piece taken from the tail, the reply's
    lock held); this thread meanwhile takes pieces from the head without the lock."""
    pieces = [f"p{i} " for i in range(20)]
    emu = emulator(reply=["z "], framing="length")
    events = Events()
    with Session(emu.url, max_retries=0, event_hooks=events.hooks()) as session:
        stream = session.chat("hi")
        assert next(stream) == "z "
        # The body's next read, controlled: how a real body splits into reads depends on urllib3.
        batches = iter([pieces, None])
        stream._reply._next_batch = lambda *, started: next(batches)  # type: ignore[method-assign]
        assert next(stream) == "p0 "
        pause = PauseAt(Reply._settle_locked, "rest += 1")
        thread, out = start(lambda: pause.run(lambda: stream.abort("enough")))
        assert pause.paused.wait(WAIT)  # p19 drained; the lock is held
        got = [next(stream) for _ in range(5)]  # lock-free, during the abort
        assert got == pieces[1:6]
        pause.resume()
        thread.join(WAIT)
        assert "error" not in out
        text = "z " + "".join(pieces[:6])
        assert stream.text == text
        with pytest.raises(IncompleteStreamError) as raised:
            next(stream)
        assert raised.value.partial == text
        assert events.counts == Counter({"chat_error": 1})
        assert f"after {len(text)} characters" in str(raised.value)
