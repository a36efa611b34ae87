"""Stopping a batch early (Ctrl-C, ``break``, ``close()``): control comes back at once, the
finished results are kept, the workers' blocked reads, retry waits and rate-limit waits end, and
nothing more is sent. No worker thread outlives its batch."""

from __future__ import annotations

import _thread
import contextlib
import logging
import ssl
import threading
import time
from typing import Any, Callable

import pytest
from _support_batch import LONG, WAIT, echo

import aichatonline_sync as aco
from aichatonline_sync import (
    BatchResult,
    RetryPolicy,
    Session,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

#: Generous bounds for a loaded 2-core machine.
RETURN_WITHIN = 2.0
THREADS_DONE_WITHIN = 5.0
REPLY = "one two three four five"


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("aichatonline-batch")]


def assert_threads_finish(threads: list[threading.Thread]) -> None:
    deadline = time.monotonic() + THREADS_DONE_WITHIN
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"worker threads still blocked: {alive}"


@pytest.fixture
def stalling(emulator: MakeEmulator) -> Emulator:
    """An emulator whose first 3 chats send one piece and then stall until it is stopped."""
    emu = emulator(reply=REPLY)
    emu.stall("chat", after=1, times=3)
    return emu


def test_ctrl_c_in_a_batch_iter_loop_returns_at_once_with_the_finished_results(
    stalling: Emulator,
) -> None:
    """Ctrl-C in the consuming loop: control comes back at once, the blocked workers return, and
    every result that finished before was handed out."""
    prompts = [f"p{i}" for i in range(8)]
    before = set(batch_threads())
    got: list[BatchResult] = []
    with Session(stalling.url, timeout=LONG, max_retries=0) as session:
        interrupted_at = 0.0
        with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the loop is the thing under test
            for result in aco.batch_iter(prompts, session=session, max_workers=4):
                got.append(result)
                if len(got) == 5:  # the 3 stalled chats cannot finish: the rest did
                    threads = [t for t in batch_threads() if t not in before]
                    interrupted_at = time.monotonic()
                    raise KeyboardInterrupt
        returned = time.monotonic() - interrupted_at
    assert returned < RETURN_WITHIN
    assert len(threads) == 4
    assert_threads_finish(threads)
    assert all(r.ok for r in got)
    assert sorted(r.text for r in got) == [" ".join(REPLY.split())] * 5
    assert len(stalling.chat_requests) == 8


def test_keyboard_interrupt_aborts_chats_waiting_for_their_first_piece(
    emulator: MakeEmulator,
) -> None:
    """Chats stalled before any piece (headers sent, no text yet) are aborted too: their sockets
    are shut down while the session still waits for the first piece, inside Session.chat()."""
    emu = emulator(reply=REPLY)
    emu.stall("chat", after=0, times=3)
    prompts = [f"p{i}" for i in range(8)]
    before = set(batch_threads())
    got: list[BatchResult] = []
    with Session(emu.url, timeout=LONG, max_retries=0) as session:
        interrupted_at = 0.0
        with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the loop is the thing under test
            for result in aco.batch_iter(prompts, session=session, max_workers=4):
                got.append(result)
                if len(got) == 5:
                    threads = [t for t in batch_threads() if t not in before]
                    interrupted_at = time.monotonic()
                    raise KeyboardInterrupt
        returned = time.monotonic() - interrupted_at
    assert returned < RETURN_WITHIN
    assert_threads_finish(threads)
    assert all(r.ok for r in got)


def test_chats_aborted_before_their_first_piece_are_not_retried(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping a batch shuts down the sockets of chats still waiting for their first piece. That
    failure is the batch's doing, not the network's: no retry, no retry warning."""
    caplog.set_level(logging.WARNING, logger="aichatonline_sync")
    emu = emulator(reply=REPLY)
    emu.stall("chat", after=0, times=3)
    prompts = [f"p{i}" for i in range(8)]
    before = set(batch_threads())
    sleeps: list[float] = []
    policy = RetryPolicy(max_retries=3, sleep=sleeps.append)
    got: list[BatchResult] = []
    with Session(emu.url, timeout=LONG, retry=policy) as session:
        with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the loop is the thing under test
            for result in aco.batch_iter(prompts, session=session, max_workers=4):
                got.append(result)
                if len(got) == 5:
                    threads = [t for t in batch_threads() if t not in before]
                    raise KeyboardInterrupt
        assert_threads_finish(threads)
    assert len(emu.chat_requests) == 8  # 5 finished, 3 aborted, none sent again
    assert sleeps == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_stopping_ends_retry_waits_and_sends_nothing_more(emulator: MakeEmulator) -> None:
    """Chats waiting out a Retry-After when the batch stops: their threads end at once, and no
    retry reaches the server afterwards."""
    emu = emulator(reply=REPLY)
    emu.fail("chat", 503, headers={"Retry-After": "30"}, times=2)
    prompts = [f"p{i}" for i in range(4)]
    before = set(batch_threads())
    got: list[BatchResult] = []
    with Session(emu.url, timeout=LONG) as session:  # the real clock: a 30 s wait
        results = aco.batch_iter(prompts, session=session, max_workers=4)
        for result in results:
            got.append(result)
            if len(got) == 2:  # the two that were not rejected
                break
        threads = [t for t in batch_threads() if t not in before]
        stopped_at = time.monotonic()
        results.close()  # type: ignore[attr-defined]
        assert_threads_finish(threads)
        assert time.monotonic() - stopped_at < RETURN_WITHIN
    assert all(r.ok for r in got)
    assert len(emu.chat_requests) == 4  # the two rejected chats were not sent again


def test_keyboard_interrupt_in_batch_keeps_finished_results(stalling: Emulator) -> None:
    """A real interrupt of the main thread while batch() waits: KeyboardInterrupt is raised within
    a second or two, and on_result has seen every result that finished before."""
    assert threading.current_thread() is threading.main_thread()
    prompts = [f"p{i}" for i in range(8)]
    before = set(batch_threads())
    seen: list[BatchResult] = []
    five = threading.Event()
    interrupted_at: list[float] = []

    def on_result(result: BatchResult) -> None:
        seen.append(result)
        if len(seen) == 5:
            five.set()

    def interrupter() -> None:
        if five.wait(WAIT):
            interrupted_at.append(time.monotonic())
            _thread.interrupt_main()

    helper = threading.Thread(target=interrupter, daemon=True)
    helper.start()
    try:
        with (
            Session(stalling.url, timeout=LONG, max_retries=0) as session,
            pytest.raises(KeyboardInterrupt),
        ):
            aco.batch(prompts, session=session, max_workers=4, on_result=on_result)
        returned = time.monotonic()
    finally:
        five.set()
        helper.join(WAIT)
    assert interrupted_at, "the batch never delivered 5 results"
    assert returned - interrupted_at[0] < RETURN_WITHIN
    assert_threads_finish([t for t in batch_threads() if t not in before])
    assert len(seen) == 5
    assert all(r.ok for r in seen)


def test_break_aborts_running_chats_and_cancels_pending(emulator: MakeEmulator) -> None:
    emu = emulator(reply=REPLY)
    emu.stall("chat", after=1, times=2)
    prompts = [f"p{i}" for i in range(30)]
    before = set(batch_threads())
    with Session(emu.url, timeout=LONG, max_retries=0) as session:
        results = aco.batch_iter(prompts, session=session, max_workers=3)
        with contextlib.closing(results):
            first = next(results)
            threads = [t for t in batch_threads() if t not in before]
        assert first.ok
    assert_threads_finish(threads)
    # The third worker ran at most a few more prompts before the rest were cancelled.
    assert len(emu.chat_requests) < len(prompts)


def test_stopping_wakes_workers_waiting_for_a_rate_limit_slot(emulator: MakeEmulator) -> None:
    """Workers waiting for their rate-limit slot wake up when the batch stops, and send nothing."""
    emu = emulator(reply=echo)
    before = set(batch_threads())
    with Session(emu.url, timeout=LONG, max_retries=0) as session:
        results = aco.batch_iter(
            ["a", "b", "c"],
            session=session,
            max_workers=3,
            rate_limit=0.2,  # 5 s apart
        )
        with contextlib.closing(results):
            assert next(results).text == echo("a")
            threads = [t for t in batch_threads() if t not in before]
            stopping = time.monotonic()
        assert time.monotonic() - stopping < RETURN_WITHIN
    assert_threads_finish(threads)
    assert [r.prompt for r in emu.chat_requests] == ["a"]


def test_stopping_wakes_a_worker_reading_over_tls(emulator: MakeEmulator, tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    emu = emulator(reply=REPLY, ssl_context=server_context)
    emu.stall("chat", after=1, times=2)
    before = set(batch_threads())
    with Session(emu.url, timeout=LONG, max_retries=0, verify=str(bundle)) as session:
        results = aco.batch_iter(["a", "b", "c"], session=session, max_workers=3)
        with contextlib.closing(results):
            assert next(results).ok
            threads = [t for t in batch_threads() if t not in before]
    assert_threads_finish(threads)


def test_no_worker_threads_left_after_a_batch(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    before = set(batch_threads())
    assert aco.batch(["a", "b", "c"], base_url=emu.url, max_workers=3) == [
        echo("a"),
        echo("b"),
        echo("c"),
    ]
    assert [t for t in batch_threads() if t not in before] == []
