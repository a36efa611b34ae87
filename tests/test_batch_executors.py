"""``executor=``: a caller's thread pool (the session's pool grows to it), and executors that run
the work in other processes (pickled calls with plain settings, ProcessPoolExecutor, Dask), each
process with one session and one token."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import pickle
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from _support_batch import LONG, WAIT, echo, failing_reply

import aichatonline_sync as aco
from aichatonline_sync import (
    APIStatusError,
    InvalidRequestError,
    Session,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


def test_the_connection_pool_grows_to_a_callers_larger_thread_pool(
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


def test_a_process_pool_executor_runs_the_batch_with_a_token_per_process(
    emulator: MakeEmulator,
) -> None:
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
            dashboard_address="127.0.0.1:0",  # a free port: matrix rows run at once
            host="127.0.0.1",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client.get_executor()


def test_a_dask_cluster_makes_one_session_per_worker_process(
    emulator: MakeEmulator, dask_executor: concurrent.futures.Executor
) -> None:
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
