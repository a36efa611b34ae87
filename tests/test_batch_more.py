"""batch() and batch_iter(): stopping early (Ctrl-C, break), rate limits, progress bars, and
executors that run the work in other processes (pickling, ProcessPoolExecutor, Dask)."""

from __future__ import annotations

import _thread
import concurrent.futures
import contextlib
import io
import logging
import multiprocessing
import pickle
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import (
    APIStatusError,
    BatchResult,
    InvalidRequestError,
    RetryPolicy,
    Session,
    Timeout,
)
from aichatonline_sync._client import batch as _batch
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
#: A read timeout far longer than any wait of these tests: a worker that returns in time was woken
#: by the batch, not by its timeout.
LONG = Timeout(connect=5, read=60)
#: Generous bounds for a loaded 2-core machine.
RETURN_WITHIN = 2.0
THREADS_DONE_WITHIN = 5.0
WAIT = 10.0
REPLY = "one two three four five"


def echo(prompt: str) -> str:
    return f"echo of {prompt}: one two three"


def failing_reply(bad: str) -> Callable[[str], str]:
    def reply(prompt: str) -> str:
        if prompt == bad:
            raise RuntimeError("this prompt fails")
        return echo(prompt)

    return reply


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


# -- stopping early ---------------------------------------------------------------------------


def test_keyboard_interrupt_in_batch_iter_loop(stalling: Emulator) -> None:
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


def test_stop_during_rate_limit_wait(emulator: MakeEmulator) -> None:
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


def test_abort_wakes_a_reader_over_tls(emulator: MakeEmulator, tmp_path: Any) -> None:
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


def test_on_result_error_stops_the_batch(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)

    def on_result(result: BatchResult) -> None:
        raise RuntimeError("stop here")

    with (
        Session(emu.url, timeout=LONG, max_retries=0) as session,
        pytest.raises(RuntimeError, match="stop here"),
    ):
        aco.batch([f"p{i}" for i in range(20)], session=session, max_workers=1, on_result=on_result)
    assert len(emu.chat_requests) < 20


def test_on_result_must_be_callable(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    with pytest.raises(InvalidRequestError, match="on_result"):
        aco.batch(["a"], base_url=emu.url, on_result=42)
    assert emu.requests == []


def test_no_worker_threads_left_after_a_batch(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    before = set(batch_threads())
    assert aco.batch(["a", "b", "c"], base_url=emu.url, max_workers=3) == [
        echo("a"),
        echo("b"),
        echo("c"),
    ]
    assert [t for t in batch_threads() if t not in before] == []


# -- one shared session, one pool large enough -------------------------------------------------


def test_caller_thread_pool_larger_than_max_workers(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's pool grows to the caller's executor's threads, not just to max_workers."""
    caplog.set_level(logging.WARNING, logger="urllib3")
    together = threading.Barrier(16, timeout=WAIT)  # the first 16 chats are all open at once
    lock = threading.Lock()
    count = [0]

    def reply(prompt: str) -> str:
        with lock:
            count[0] += 1
            first = count[0] <= 16
        if first:
            together.wait()
        return echo(prompt)

    emu = emulator(reply=reply)
    prompts = [f"p{i}" for i in range(32)]
    with (
        Session(emu.url, timeout=LONG, max_retries=0) as session,
        concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor,
    ):
        assert aco.batch(prompts, session=session, executor=executor) == [echo(p) for p in prompts]
    assert emu.connections == 16
    assert emu.tokens_issued == 1
    assert "Connection pool is full" not in caplog.text


# -- rate limit -------------------------------------------------------------------------------


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


def test_rate_limiter_with_a_moving_clock() -> None:
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


def test_rate_limit_is_validated(emulator: MakeEmulator) -> None:
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


# -- progress ---------------------------------------------------------------------------------


def test_progress_without_tqdm_warns_once_and_runs_the_batch(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aichatonline_sync._client import batch as _batch
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(_batch._NoTqdm, "warned", False)
    emu = emulator(reply=echo)
    with pytest.warns(RuntimeWarning, match=r"pip install \"aichatonline-sync\[progress\]\"") as got:
        assert aco.batch(["a", "b"], base_url=emu.url, progress=True) == [echo("a"), echo("b")]
    assert len(got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        results = list(aco.batch_iter(["c"], base_url=emu.url, progress=True))
    assert [r.text for r in results] == [echo("c")]
    assert len(emu.chat_requests) == 3


def test_progress_bar_counts_done_and_failed(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bars: list[Any] = []
    output = io.StringIO()

    class Recording(tqdm_auto.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = output
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm_auto, "tqdm", Recording)
    emu = emulator(reply=failing_reply("p2"))
    prompts = [f"p{i}" for i in range(4)]
    results = aco.batch(
        prompts, base_url=emu.url, max_retries=0, progress=True, return_exceptions=True
    )
    assert isinstance(results[2], APIStatusError)
    [bar] = bars
    assert bar.total == 4
    assert bar.n == 4
    assert "failed=1" in bar.postfix
    text = output.getvalue()
    assert "4/4" in text
    assert "prompt/s" in text


# -- executors in other processes -------------------------------------------------------------


class PicklingExecutor(concurrent.futures.Executor):
    """Runs each call as a process executor would: the call and its result go through pickle."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        payload = pickle.dumps((fn, args, kwargs))
        self.calls.append(pickle.loads(payload))

        def run() -> Any:
            call, call_args, call_kwargs = pickle.loads(payload)
            return pickle.loads(pickle.dumps(call(*call_args, **call_kwargs)))

        return self._pool.submit(run)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    # A module-level function of the library travels by reference (the same in every process).
    return (
        callable(value)
        and getattr(value, "__module__", "").startswith("aichatonline_sync.")
        and "<locals>" not in getattr(value, "__qualname__", "<locals>")
    )


def test_other_process_executor_gets_plain_settings(emulator: MakeEmulator) -> None:
    emu = emulator(reply=failing_reply("p3"))
    prompts: list[Any] = [f"p{i}" for i in range(5)]
    prompts.append([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    executor = PicklingExecutor()
    try:
        results = aco.batch(
            prompts,
            executor=executor,
            base_url=emu.url,
            timeout=10,
            max_retries=0,
            return_exceptions=True,
        )
    finally:
        executor.shutdown()
    assert len(executor.calls) == len(prompts)
    for fn, args, kwargs in executor.calls:
        assert fn.__module__ == "aichatonline_sync._client.batch"  # by reference, not a closure
        assert _plain(args)
        assert _plain(kwargs)
    assert results[:3] == [echo("p0"), echo("p1"), echo("p2")]
    assert results[4] == echo("p4")
    assert results[5] == echo("System: S\nUser: U\nAssistant:")
    # Our errors take keyword-only arguments; they still come back whole.
    error = results[3]
    assert isinstance(error, APIStatusError)
    assert error.status_code == 500
    assert error.url is not None
    assert error.url.startswith(emu.url)
    assert emu.tokens_issued == 1  # one shared session per process (here: this one)


def test_other_process_executor_refuses_a_session_and_rate_limit(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    executor = PicklingExecutor()
    try:
        with Session(emu.url) as session, pytest.raises(InvalidRequestError, match="process"):
            aco.batch(["a"], session=session, executor=executor)
        with pytest.raises(InvalidRequestError, match="rate_limit"):
            aco.batch(["a"], base_url=emu.url, executor=executor, rate_limit=1)
    finally:
        executor.shutdown()
    assert emu.requests == []


def test_process_pool_executor(emulator: MakeEmulator) -> None:
    emu = emulator(reply=failing_reply("p1"))
    prompts = [f"p{i}" for i in range(8)]
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("spawn")
    ) as executor:
        results = aco.batch(
            prompts,
            executor=executor,
            base_url=emu.url,
            timeout=10,
            max_retries=0,
            return_exceptions=True,
        )
    assert isinstance(results[1], APIStatusError)
    assert results[1].status_code == 500
    assert [r for i, r in enumerate(results) if i != 1] == [
        echo(p) for i, p in enumerate(prompts) if i != 1
    ]
    assert 1 <= emu.tokens_issued <= 2  # at most one token per process


@pytest.fixture
def dask_executor() -> Iterator[concurrent.futures.Executor]:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=2,
            dashboard_address=None,
            host="127.0.0.1",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client.get_executor()


def test_dask_cluster(emulator: MakeEmulator, dask_executor: concurrent.futures.Executor) -> None:
    """Two Dask worker processes: each makes one session (one token), reused by its threads."""
    arrived = threading.Barrier(4, timeout=WAIT)  # 2 processes x 2 threads, all busy at once
    lock = threading.Lock()
    count = [0]

    def reply(prompt: str) -> str:
        with lock:
            count[0] += 1
            first = count[0] <= 4
        if first:
            arrived.wait()
        return echo(prompt)

    emu = emulator(reply=reply)
    prompts = [f"p{i}" for i in range(40)]
    texts = aco.batch(prompts, executor=dask_executor, base_url=emu.url, timeout=20, max_retries=0)
    assert texts == [echo(p) for p in prompts]
    assert len({r.unique_id for r in emu.chat_requests}) == 2
    assert emu.tokens_issued == 2
    assert emu.connections <= 4
