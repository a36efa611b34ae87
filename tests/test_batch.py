"""batch() and batch_iter() against the emulator."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import (
    APIStatusError,
    BatchError,
    BatchResult,
    InvalidRequestError,
    Session,
    Timeout,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = Timeout(connect=5, read=5)


def echo(prompt: str) -> str:
    return f"echo of {prompt}: one two three"


class HoldFirst:
    """A reply callable that answers prompt ``"p0"`` only once :attr:`release` is set (or, with
    ``auto``, once every other prompt was answered), so that it finishes last."""

    def __init__(self, others: int, *, auto: bool) -> None:
        self.others = others
        self.auto = auto
        self.answered = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.timed_out = False

    def __call__(self, prompt: str) -> str:
        if prompt == "p0":
            if not self.release.wait(10):
                self.timed_out = True
        else:
            with self.lock:
                self.answered += 1
                if self.auto and self.answered >= self.others:
                    self.release.set()
        return echo(prompt)


def test_batch_iter_yields_as_each_finishes(emulator: MakeEmulator) -> None:
    prompts = [f"p{i}" for i in range(6)]
    hold = HoldFirst(len(prompts) - 1, auto=False)
    emu = emulator(reply=hold)
    order = []
    try:
        with Session(emu.url, timeout=SHORT, max_retries=0) as session:
            for result in aco.batch_iter(prompts, session=session, max_workers=6):
                order.append(result.index)
                assert result.text == echo(prompts[result.index])
                if len(order) == len(prompts) - 1:
                    hold.release.set()  # the others were handed out while p0 was still running
    finally:
        hold.release.set()
    assert not hold.timed_out
    assert sorted(order[:-1]) == [1, 2, 3, 4, 5]
    assert order[-1] == 0


def test_batch_returns_results_in_input_order(emulator: MakeEmulator) -> None:
    prompts = [f"p{i}" for i in range(6)]
    hold = HoldFirst(len(prompts) - 1, auto=True)
    emu = emulator(reply=hold)
    try:
        with Session(emu.url, timeout=SHORT, max_retries=0) as session:
            texts = aco.batch(prompts, session=session, max_workers=6)
    finally:
        hold.release.set()
    assert not hold.timed_out  # p0 was answered after all the others
    assert texts == [echo(p) for p in prompts]
    assert emu.tokens_issued == 1


def test_batch_iter_yields_every_index_once(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    prompts: list[Any] = [f"q{i}" for i in range(10)]
    prompts.append([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        results = list(aco.batch_iter(prompts, session=session, max_workers=3))
    assert sorted(r.index for r in results) == list(range(len(prompts)))
    for result in results:
        assert isinstance(result, BatchResult)
        assert result.prompt is prompts[result.index]
        assert result.error is None
        assert result.ok
        assert isinstance(result.elapsed, float)
        assert result.elapsed >= 0
    by_index = {r.index: r.text for r in results}
    assert by_index[3] == echo("q3")
    assert by_index[10] == echo("System: S\nUser: U\nAssistant:")


def failing_reply(bad: str) -> Callable[[str], str]:
    def reply(prompt: str) -> str:
        if prompt == bad:
            raise RuntimeError("this prompt fails")
        return echo(prompt)

    return reply


def test_failed_prompt_raises_batch_error_after_running_all(
    emulator: MakeEmulator, no_sleep: Any
) -> None:
    emu = emulator(reply=failing_reply("p2"))
    prompts = [f"p{i}" for i in range(5)]
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session,
        pytest.raises(BatchError) as info,
    ):
        aco.batch(prompts, session=session, max_workers=2)
    error = info.value
    assert error.results == [echo("p0"), echo("p1"), None, echo("p3"), echo("p4")]
    assert list(error.errors) == [2]
    assert isinstance(error.errors[2], APIStatusError)
    assert error.errors[2].status_code == 500
    assert sorted(r.prompt for r in emu.chat_requests) == prompts


def test_failed_prompt_with_fail_fault(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=echo)
    emu.fail("chat", 400)
    prompts = [f"p{i}" for i in range(4)]
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(2)) as session,
        pytest.raises(BatchError) as info,
    ):
        aco.batch(prompts, session=session, max_workers=1)
    assert list(info.value.errors) == [0]  # one worker: the first prompt meets the fault
    assert info.value.errors[0].status_code == 400  # type: ignore[attr-defined]
    assert info.value.results == [None] + [echo(p) for p in prompts[1:]]
    assert len(emu.chat_requests) == 4


def test_return_exceptions_puts_the_error_in_place(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=failing_reply("p1"))
    prompts = ["p0", "p1", "p2"]
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        results = aco.batch(prompts, session=session, return_exceptions=True)
    assert results[0] == echo("p0")
    assert results[2] == echo("p2")
    assert isinstance(results[1], APIStatusError)


def test_batch_iter_reports_errors(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply=failing_reply("p1"))
    with Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session:
        results = {r.index: r for r in aco.batch_iter(["p0", "p1"], session=session)}
    assert results[1].text is None
    assert isinstance(results[1].error, APIStatusError)
    assert not results[1].ok
    assert results[0].text == echo("p0")


@pytest.mark.parametrize(("workers", "count"), [(4, 20), (16, 40)])
def test_pool_matches_workers(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture, workers: int, count: int
) -> None:
    caplog.set_level(logging.WARNING, logger="urllib3")
    emu = emulator(reply=echo)
    prompts = [f"p{i}" for i in range(count)]
    texts = aco.batch(prompts, max_workers=workers, base_url=emu.url, timeout=SHORT)
    assert texts == [echo(p) for p in prompts]
    assert emu.connections <= workers
    assert emu.tokens_issued == 1
    assert "Connection pool is full" not in caplog.text


def test_session_pool_grows_for_many_workers(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="urllib3")
    emu = emulator(reply=echo)
    prompts = [f"p{i}" for i in range(48)]
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert session.batch(prompts, max_workers=16) == [echo(p) for p in prompts]
        assert session.batch(prompts, max_workers=16) == [echo(p) for p in prompts]
    assert emu.tokens_issued == 1
    assert emu.connections <= 16
    assert "Connection pool is full" not in caplog.text


@pytest.mark.parametrize(
    "bad",
    ["", "   ", [], [{"role": "user", "content": "  "}], 42, None],
    ids=["empty", "blank", "no-messages", "blank-message", "int", "none"],
)
def test_bad_prompt_fails_before_any_request(emulator: MakeEmulator, bad: Any) -> None:
    emu = emulator(reply=echo)
    with pytest.raises(InvalidRequestError):
        aco.batch(["fine", bad, "fine too"], base_url=emu.url)
    with pytest.raises(InvalidRequestError):
        list(aco.batch_iter(["fine", bad], base_url=emu.url))
    assert emu.requests == []


def test_bad_option_fails_before_any_request(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    with pytest.raises(InvalidRequestError):
        aco.batch(["fine"], base_url=emu.url, no_such_option=1)
    with pytest.raises(InvalidRequestError):
        aco.batch(["fine"], base_url=emu.url, max_workers=0)
    assert emu.requests == []


def test_custom_executor(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    prompts = [f"p{i}" for i in range(7)]
    with (
        Session(emu.url, timeout=SHORT, max_retries=0) as session,
        concurrent.futures.ThreadPoolExecutor(max_workers=3) as executor,
    ):
        assert aco.batch(prompts, session=session, executor=executor) == [echo(p) for p in prompts]
        # The executor is the caller's: it is still usable afterwards.
        assert executor.submit(lambda: 42).result(timeout=10) == 42
    assert emu.tokens_issued == 1


def test_session_batch_with_chat_options(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        texts = session.batch(["a", "b"], model="gpt-4o-mini", timeout=10)
    assert texts == [echo("a"), echo("b")]


def test_empty_batch(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    assert aco.batch([], base_url=emu.url) == []
    assert list(aco.batch_iter([], base_url=emu.url)) == []
    assert emu.requests == []


def test_batch_collects_what_batch_iter_yields_into_input_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """batch() runs no engine of its own: it takes the prompts, hands them and its options to the
    public batch_iter(), and puts the results it yields in input order."""
    calls: list[tuple[list[Any], dict[str, Any]]] = []
    closed = threading.Event()
    failure = RuntimeError("this prompt fails")

    def fake_batch_iter(prompts: list[Any], **options: Any) -> Any:
        calls.append((prompts, options))
        try:
            yield BatchResult(2, prompts[2], "c", None, 0.0)
            yield BatchResult(0, prompts[0], None, failure, 0.0)
            yield BatchResult(1, prompts[1], "b", None, 0.0)
        finally:
            closed.set()

    from aichatonline_sync._client import api

    monkeypatch.setattr(api, "batch_iter", fake_batch_iter)
    seen: list[int] = []
    texts = aco.batch(
        (p for p in ["p0", "p1", "p2"]), max_workers=3, model="m", return_exceptions=True,
        on_result=lambda r: seen.append(r.index),
    )
    assert texts == [failure, "b", "c"]
    assert seen == [2, 0, 1]
    assert closed.is_set()
    [(prompts, options)] = calls
    assert prompts == ["p0", "p1", "p2"]
    assert options["max_workers"] == 3
    assert options["model"] == "m"
    assert "return_exceptions" not in options
    assert "on_result" not in options
    with pytest.raises(BatchError) as info:
        aco.batch(["p0", "p1", "p2"])
    assert info.value.results == [None, "b", "c"]
    assert info.value.errors == {0: failure}
    assert str(info.value).startswith("1 of 3 prompts failed (first: prompt 0: this prompt fails)")
