"""``batch_iter`` pulls its prompts lazily: bounded work in flight, so that an endless generator (or
one of a million prompts) starts yielding at once with flat memory. Counted, not timed: how many
prompts were pulled against how many results were handed out, against the real emulator."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import InvalidRequestError, Session
from aichatonline_sync._client.batch import in_flight_limit
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


def echo(prompt: str) -> str:
    return f"echo {prompt}"


class Counted:
    """An iterable that counts the prompts pulled from it."""

    def __init__(self, prompts: Iterator[Any]) -> None:
        self.pulled = 0
        self._prompts = prompts

    def __iter__(self) -> Iterator[Any]:
        for prompt in self._prompts:
            self.pulled += 1
            yield prompt


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=echo)


@pytest.fixture
def session(emu: Emulator) -> Iterator[Session]:
    with Session(emu.url, max_retries=0) as s:
        yield s


@pytest.mark.parametrize("workers", [1, 4])
def test_an_endless_generator_yields_at_once_with_bounded_work(
    emu: Emulator, session: Session, workers: int
) -> None:
    prompts = Counted(f"q{i}" for i in itertools.count())
    limit = in_flight_limit(workers)
    wanted = 60
    seen: list[int] = []
    with contextlib.closing(aco.batch_iter(prompts, session=session, max_workers=workers)) as it:
        for handed, result in enumerate(it, start=1):
            assert result.error is None
            assert result.text == echo(result.prompt)
            # Never more pulled than handed out plus the bound of work in flight.
            assert prompts.pulled <= handed + limit, (handed, prompts.pulled)
            seen.append(result.index)
            if handed == wanted:
                break
    pulled = prompts.pulled
    assert pulled <= wanted + limit
    assert len(emu.chat_requests) <= pulled
    assert len(set(seen)) == wanted
    if workers == 1:
        assert seen == list(range(wanted))
    # Stopped: nothing more is pulled.
    assert prompts.pulled == pulled


def test_a_million_prompts_start_at_once(session: Session) -> None:
    prompts = Counted(f"q{i}" for i in range(1_000_000))
    with contextlib.closing(aco.batch_iter(prompts, session=session, max_workers=8)) as it:
        first = [next(it) for _ in range(10)]
    assert all(r.ok for r in first)
    assert prompts.pulled <= 10 + in_flight_limit(8)


def test_every_prompt_of_a_generator_gets_its_result(emu: Emulator, session: Session) -> None:
    prompts = Counted(f"q{i}" for i in range(100))
    results = list(aco.batch_iter(prompts, session=session, max_workers=4))
    assert sorted(r.index for r in results) == list(range(100))
    assert all(r.text == echo(f"q{r.index}") for r in results)
    assert prompts.pulled == 100
    assert len(emu.chat_requests) == 100


def test_prompts_are_pulled_in_the_thread_that_iterates(emu: Emulator, session: Session) -> None:
    # A sqlite3 cursor refuses any other thread (ProgrammingError): a source tied to its thread
    # works, as the docstring and README promise.
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE prompts (text TEXT)")
        db.executemany("INSERT INTO prompts VALUES (?)", [(f"q{i}",) for i in range(20)])
        rows = (text for (text,) in db.execute("SELECT text FROM prompts ORDER BY rowid"))
        results = list(aco.batch_iter(rows, session=session, max_workers=4))
    finally:
        db.close()
    assert sorted((r.index, r.text) for r in results) == [(i, echo(f"q{i}")) for i in range(20)]


def test_a_bad_prompt_of_a_generator_is_its_result_error(emu: Emulator, session: Session) -> None:
    def prompts() -> Iterator[Any]:
        yield "a"
        yield 7
        yield "   "
        yield "b"

    results = {r.index: r for r in aco.batch_iter(prompts(), session=session, max_workers=2)}
    assert set(results) == {0, 1, 2, 3}
    assert results[0].text == echo("a")
    assert results[3].text == echo("b")
    for index in (1, 2):
        assert isinstance(results[index].error, InvalidRequestError)
        assert f"prompt {index}" in str(results[index].error)
    assert sorted(r.prompt or "" for r in emu.chat_requests) == ["a", "b"]


def test_a_bad_prompt_of_a_list_is_refused_before_anything_is_sent(
    emu: Emulator, session: Session
) -> None:
    with pytest.raises(InvalidRequestError, match="prompt 2"):
        list(aco.batch_iter(["a", "b", 7], session=session))
    assert emu.requests == []


def test_batch_of_a_generator_keeps_the_input_order(session: Session) -> None:
    texts = aco.batch((f"q{i}" for i in range(30)), session=session, max_workers=4)
    assert texts == [echo(f"q{i}") for i in range(30)]


def test_a_thread_executor_of_ones_own_is_fed_lazily(session: Session) -> None:
    prompts = Counted(f"q{i}" for i in itertools.count())
    with concurrent.futures.ThreadPoolExecutor(3) as pool, contextlib.closing(
        aco.batch_iter(prompts, session=session, max_workers=3, executor=pool)
    ) as it:
        results = list(itertools.islice(it, 20))
    assert len(results) == 20
    assert prompts.pulled <= 20 + in_flight_limit(3)


def test_progress_of_an_unsized_iterable_has_no_total(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    tqdm_auto = pytest.importorskip("tqdm.auto")
    import io

    totals: list[Any] = []

    class Recording(tqdm_auto.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            totals.append(kwargs.get("total"))

    monkeypatch.setattr(tqdm_auto, "tqdm", Recording)
    assert len(list(aco.batch_iter((p for p in ["a", "b"]), session=session, progress=True))) == 2
    assert len(list(aco.batch_iter(["a", "b"], session=session, progress=True))) == 2
    assert totals == [None, 2]


def test_a_cancellation_given_to_a_batch_stops_it_from_another_thread(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator(reply=["a", "b"])
    cancel = aco.Cancellation()
    results = []
    with aco.Session(emu.url) as session:
        for result in aco.batch_iter(
            (f"q{i}" for i in range(1000)), session=session, max_workers=2, cancel=cancel
        ):
            results.append(result)
            if len(results) == 3:
                threading.Thread(target=cancel.cancel).start()  # as a watchdog thread would

    done = [r for r in results if r.error is None]
    stopped = [r for r in results if r.error is not None]
    assert len(done) >= 3
    assert all(isinstance(r.error, aco.APIConnectionError) for r in stopped)
    assert all("cancelled" in str(r.error) for r in stopped)
    assert len(results) < 1000  # what was not yet pulled is never run
    assert len(emu.chat_requests) <= len(done) + 2 * 2


def test_keep_text_and_a_bad_cancel_are_refused_before_any_request(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator()
    with pytest.raises(aco.InvalidRequestError, match="keep_text"):
        aco.batch(["a"], base_url=emu.url, keep_text=False)
    with pytest.raises(aco.InvalidRequestError, match="Cancellation"):
        aco.batch(["a"], base_url=emu.url, cancel="stop")
    assert emu.requests == []
