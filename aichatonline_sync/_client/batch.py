"""Batches: fan prompts out across a thread pool (or any ``concurrent.futures.Executor``).

The built-in pool shares one :class:`Session` (one token, a connection pool as large as the number
of workers). An executor that runs work elsewhere (processes, a Dask cluster) is sent plain,
picklable settings instead, and each of its processes makes and reuses one shared session.

Stopping early (Ctrl-C, ``break``, closing the iterator): prompts not yet started are cancelled, and
the chats running in this process are cancelled through the batch's :class:`Cancellation` (retry
waits end, streams are aborted), so that the worker threads return at once. What finished before
was already handed out.

This module imports nothing of the session's (``Session.batch`` imports it). The public
``batch_iter()`` in :mod:`.api` finds the session and hands the options over split to
:func:`iter_batch`, the one engine; ``batch()`` and ``Session.batch`` are :func:`collect` over it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import pickle
import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from .._transport.cancel import Cancellation
from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError, BatchError, InvalidRequestError
from .._wire.prompt import build_prompt
from .config import MAX_CONNECTIONS, MAX_SECONDS, check_bool, check_int, is_number

if TYPE_CHECKING:  # this module imports nothing of the session's: Session.batch imports it
    from .session import Session

__all__ = [
    "BatchOptions",
    "BatchResult",
    "RateLimiter",
    "check_prompts",
    "collect",
    "in_flight_limit",
    "iter_batch",
    "listed",
    "run_batch",
]

logger = _redact.logger("aichatonline_sync")

#: How often the consuming thread wakes while it waits for results, so that a pending
#: KeyboardInterrupt (even one from ``_thread.interrupt_main()``, which sends no real signal) is
#: raised promptly.
_POLL_SECONDS = 0.25
#: After stopping early, how long to wait for the aborted chats' worker threads to return.
_GRACE_SECONDS = 0.5
_THREAD_PREFIX = "aichatonline-batch"


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one prompt of a batch.

    :ivar index: the prompt's position in the input.
    :ivar prompt: the prompt as given.
    :ivar text: the reply, or ``None`` when it failed.
    :ivar error: the exception, or ``None`` when it succeeded.
    :ivar elapsed: seconds spent on this prompt.
    """

    index: int
    prompt: Any
    text: Optional[str]
    error: Optional[BaseException]
    elapsed: float

    @property
    def ok(self) -> bool:
        """``True`` when the prompt succeeded."""
        return self.error is None


class RateLimiter:
    """Spaces calls at least ``1 / rate`` seconds apart, across threads.

    :param rate: calls per second.
    :param clock: a monotonic clock (injectable for tests).
    :param sleep: waits the given seconds (injectable; a batch passes an ``Event.wait`` that
        returns early when the batch is stopped).
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.interval = 1 / rate  # true division: a huge int need not fit a float
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def acquire(self) -> None:
        """Wait until this call's slot comes (slots are handed out in call order)."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def _complete(
    session: Session, prompt: Any, chat_options: dict[str, Any], cancel: Optional[Cancellation]
) -> str:
    if cancel is not None:
        cancel.check("the chat request")  # the batch was stopped before this prompt began
    return session.complete(prompt, cancel=cancel, **chat_options)


class _InFlight:
    """Counts the chats of a batch that run at once, and keeps the session's pool at least that
    large: an executor of the caller's may run more threads than ``max_workers``."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1
            count = self._count
        # Growing the pool makes a new one (the connections of the old one are not reused):
        # grow by doubling, so that it happens rarely.
        self._session.ensure_pool(count, grow_to=2 * count)

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._count -= 1


def _run_one(
    session: Session,
    index: int,
    prompt: Any,
    chat_options: dict[str, Any],
    limiter: Optional[RateLimiter],
    cancel: Optional[Cancellation] = None,
    in_flight: Optional[_InFlight] = None,
) -> BatchResult:
    started = time.monotonic()
    try:
        if limiter is not None:
            if cancel is not None:
                cancel.check("the chat request")
            limiter.acquire()
        with in_flight or contextlib.nullcontext():
            text = _complete(session, prompt, chat_options, cancel)
    except Exception as exc:
        return BatchResult(index, prompt, None, exc, time.monotonic() - started)
    return BatchResult(index, prompt, text, None, time.monotonic() - started)


# -- work in other processes ------------------------------------------------------------------

#: What a remote work item returns: ``(text, error, elapsed)``, picklable data.
_Outcome = tuple[Optional[str], Optional[BaseException], float]


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` itself when it pickles (ours do, attributes and all), else a stand-in that does."""
    try:
        pickle.dumps(exc)
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _run_remote(
    shared: Callable[..., Session],
    session_options: dict[str, Any],
    index: int,
    prompt: Any,
    chat_options: dict[str, Any],
) -> _Outcome:
    """The work item sent to executors in other processes: only settings, the prompt and the
    function that finds a process's shared session (by reference) travel."""
    result = _run_one(shared(**session_options), index, prompt, chat_options, None)
    error = None if result.error is None else _picklable(result.error)
    return (result.text, error, result.elapsed)


# -- the batch --------------------------------------------------------------------------------


def _check(max_workers: object, rate_limit: object) -> None:
    check_int("max_workers", max_workers, low=1, high=MAX_CONNECTIONS)
    if rate_limit is not None and (not is_number(rate_limit) or not cast(float, rate_limit) > 0):
        raise InvalidRequestError(
            f"rate_limit must be a positive number of requests per second, not {rate_limit!r}"
        )
    if rate_limit is not None and 1 / cast(float, rate_limit) > MAX_SECONDS:
        raise InvalidRequestError(
            f"rate_limit must allow one request a year at least ({1 / MAX_SECONDS:.3g} per "
            f"second), not {rate_limit!r}"
        )


class _NoTqdm:
    """Whether the warning that tqdm is missing was given (once per process)."""

    warned = False


def _progress_bar(total: Optional[int]) -> Any:
    """A tqdm bar, or ``None`` (with a warning, once per process) when tqdm is not installed: a
    missing progress bar must not cost the results."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _NoTqdm.warned:
            _NoTqdm.warned = True
            _redact.warn(
                "progress=True needs tqdm, which is not installed: the batch runs without a "
                'progress bar. Install it with: pip install "aichatonline-sync[progress]" '
                '(in Jupyter: "aichatonline-sync[notebook]")',
                RuntimeWarning,
            )
        logger.debug("no progress bar: tqdm is not installed")
        return None
    bar = tqdm(total=total, unit="prompt", desc="aichatonline")
    bar.set_postfix(failed=0, refresh=False)
    return bar


def _next_done(done: queue.SimpleQueue[concurrent.futures.Future[Any]]) -> Any:
    # A bounded wait, again and again: a KeyboardInterrupt is raised between two waits at the latest.
    while True:
        try:
            return done.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue


def _result_of(
    future: concurrent.futures.Future[Any], index: int, prompt: Any, remote: bool
) -> BatchResult:
    try:
        outcome = future.result()
    except Exception as exc:  # the executor failed this item (a dead worker, pickling, ...)
        return BatchResult(index, prompt, None, exc, 0.0)
    if not remote:
        assert isinstance(outcome, BatchResult)
        return outcome
    text, error, elapsed = outcome
    return BatchResult(index, prompt, text, error, elapsed)


def _stop(
    futures: Iterable[concurrent.futures.Future[Any]], cancel: Optional[Cancellation]
) -> None:
    """Stop early: cancel what has not started, abort the chats running here, and give their
    threads a moment to return."""
    if cancel is not None:
        cancel.cancel()
    futures = list(futures)
    cancelled = sum(future.cancel() for future in futures)
    logger.debug("batch stopped early: %d prompts cancelled", cancelled)
    if cancel is not None:
        unfinished = [future for future in futures if not future.done()]
        if unfinished:
            concurrent.futures.wait(unfinished, timeout=_GRACE_SECONDS)


def check_prompts(prompts: object) -> None:
    """Check that ``prompts`` is a collection of prompts (not one prompt, not a mapping).

    :raises InvalidRequestError: for a str (one prompt: its characters are no prompts), bytes, a
        mapping, ``None``, or anything that is not iterable.
    """
    if isinstance(prompts, (str, bytes, bytearray, memoryview)):
        raise InvalidRequestError(
            f"prompts must be a list (or any iterable) of prompts, not a single "
            f"{type(prompts).__name__}: for one prompt, pass [prompt]"
        )
    if prompts is None or isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
        raise InvalidRequestError(
            "prompts must be a list (or any iterable) of prompts, each a str or a list of "
            f"messages, not {type(prompts).__name__}"
        )


def _prompt_error(index: int, prompt: Any) -> Optional[InvalidRequestError]:
    """What is wrong with one prompt, or ``None``."""
    try:
        build_prompt(prompt)
    except InvalidRequestError as exc:
        hint = ""
        if isinstance(prompt, Mapping) and "role" in prompt:
            hint = " (a list of messages is one prompt: pass [messages, ...])"
        return InvalidRequestError(f"prompt {index}: {exc}{hint}")
    return None


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs, checked once when made: the options of :func:`aichatonline_sync.batch`
    (``return_exceptions`` and ``on_result`` apply to it alone) and of ``batch_iter``.

    :raises InvalidRequestError: a bad option.
    """

    max_workers: int = 8
    progress: bool = False
    executor: Optional[concurrent.futures.Executor] = None
    rate_limit: Optional[float] = None
    return_exceptions: bool = False
    on_result: Optional[Callable[[BatchResult], object]] = None

    def __post_init__(self) -> None:
        check_bool("progress", self.progress)
        check_bool("return_exceptions", self.return_exceptions)
        if self.on_result is not None and not callable(self.on_result):
            raise InvalidRequestError(f"on_result must be callable, not {self.on_result!r}")
        _check(self.max_workers, self.rate_limit)
        if self.executor is not None and not isinstance(
            self.executor, concurrent.futures.Executor
        ):
            raise InvalidRequestError(
                f"executor must be a concurrent.futures.Executor, not {type(self.executor).__name__}"
            )


@dataclass(frozen=True)
class _Plan:
    """A batch's arguments, checked by :func:`_check_batch`: what its run needs to know."""

    session: Optional[Session]
    session_options: dict[str, Any]
    chat_options: dict[str, Any]  #: a copy, without ``cancel``
    cancel: Optional[Cancellation]  #: the ``cancel`` given in the chat options, if any
    shared: Optional[Callable[..., Session]]
    max_workers: int
    executor: Optional[concurrent.futures.Executor]
    rate_limit: Optional[float]
    remote: bool  #: the executor runs the work in other processes
    checked: bool  #: the prompts are a sequence, every one of them checked already


def _check_batch(
    prompts: Iterable[Any],
    *,
    session: Optional[Session],
    session_options: dict[str, Any],
    chat_options: dict[str, Any],
    shared: Optional[Callable[..., Session]],
    options: BatchOptions,
) -> _Plan:
    """Check everything about a batch that can be checked before any I/O (the arguments of
    :func:`iter_batch`), and take ``cancel`` out of a copy of ``chat_options``.

    :raises InvalidRequestError: a bad prompt (of a sequence) or option.
    """
    check_prompts(prompts)
    max_workers, executor, rate_limit = options.max_workers, options.executor, options.rate_limit
    if session is not None and session.closed:  # every prompt would fail the same way
        raise AiChatOnlineError(
            "batch() on a closed Session: create a new Session (or leave session= out)"
        )
    checked = isinstance(prompts, Sequence)
    if checked:
        for index, prompt in enumerate(prompts):
            error = _prompt_error(index, prompt)
            if error is not None:
                raise error
    if session is not None and session_options:
        raise InvalidRequestError(
            f"give session options ({', '.join(sorted(session_options))}) to the Session, "
            "not to batch() together with session="
        )
    remote = executor is not None and not isinstance(
        executor, concurrent.futures.ThreadPoolExecutor
    )
    if remote and rate_limit is not None:
        raise InvalidRequestError("rate_limit works with thread executors only")
    if remote and session is not None:
        raise InvalidRequestError(
            "a Session cannot be sent to another process: pass its options instead of session="
        )
    if session is None and shared is None:
        raise InvalidRequestError("a batch needs a session")
    chat_options = dict(chat_options)
    cancel = _batch_cancel(chat_options, remote)
    return _Plan(
        session=session,
        session_options=session_options,
        chat_options=chat_options,
        cancel=cancel,
        shared=shared,
        max_workers=max_workers,
        executor=executor,
        rate_limit=rate_limit,
        remote=remote,
        checked=checked,
    )


def iter_batch(
    prompts: Iterable[Any],
    *,
    session: Optional[Session],
    session_options: dict[str, Any],
    chat_options: dict[str, Any],
    options: BatchOptions,
    shared: Optional[Callable[..., Session]] = None,
) -> Generator[BatchResult, None, None]:
    """The engine of :func:`aichatonline_sync.batch_iter` (which documents it): options split
    already; ``shared(**session_options)`` finds a process's shared session when no ``session``
    is given (it travels by reference to executors in other processes).

    Prompts are pulled from ``prompts`` as work frees up: at most :func:`in_flight_limit` of them
    are submitted and not yet handed out, so an endless generator works, with flat memory. A
    sequence (a list, a tuple) is checked whole before anything is sent; a prompt from any other
    iterable is checked when it is pulled, and a bad one becomes its result's error. Once a
    ``cancel`` given in ``chat_options`` is cancelled, every prompt of a sequence not yet done
    fails at once (each is accounted for), and an iterator is pulled no further.
    """
    plan = _check_batch(
        prompts,
        session=session,
        session_options=session_options,
        chat_options=chat_options,
        shared=shared,
        options=options,
    )
    total = len(prompts) if isinstance(prompts, Sized) else None
    bar = _progress_bar(total) if options.progress else None
    try:
        run = _Run(plan, bar)
    except BaseException:  # no session or pool: the bar must not stay open
        if bar is not None:
            bar.close()
        raise
    yield from run.results(prompts)


class _Run:
    """One batch under way: its pool, the prompts submitted and not yet handed out, and how it
    stops and cleans up.

    :param plan: the batch's checked arguments.
    :param bar: its progress bar, or ``None``.
    """

    def __init__(self, plan: _Plan, bar: Any) -> None:
        self._plan = plan
        self._bar = bar
        self._cancel = None if plan.remote else (plan.cancel or Cancellation())
        self._limiter = (
            RateLimiter(plan.rate_limit, sleep=self._cancel.wait)
            if plan.rate_limit is not None and self._cancel is not None
            else None
        )
        client = plan.session
        if not plan.remote and client is None:
            assert plan.shared is not None
            client = plan.shared(**plan.session_options)
        if client is not None:
            client.ensure_pool(plan.max_workers)  # one connection per thread
        self._client = client
        self._in_flight = None if client is None else _InFlight(client)
        self._pool = plan.executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=plan.max_workers, thread_name_prefix=_THREAD_PREFIX
        )
        self._limit = in_flight_limit(plan.max_workers)
        self._done: queue.SimpleQueue[concurrent.futures.Future[Any]] = queue.SimpleQueue()
        self._pending: dict[concurrent.futures.Future[Any], tuple[int, Any]] = {}
        self._refused: collections.deque[BatchResult] = collections.deque()  # of an iterator
        self._failed = 0

    def results(self, prompts: Iterable[Any]) -> Generator[BatchResult, None, None]:
        """Pull, submit and hand out the results as they finish; stop early when left early."""
        finished = False
        try:
            source = enumerate(prompts)  # inside the try: iter() may raise, and _close must run
            more = True
            while True:
                more = more and self._fill(source)
                result = self._next_result()
                if result is None:
                    break
                self._count(result)
                yield result
            finished = True
        finally:
            self._close(finished)

    def _fill(self, source: Iterator[tuple[int, Any]]) -> bool:
        """Pull and submit prompts until :func:`in_flight_limit` of them are out (a bad prompt of
        an iterator becomes a result); ``False`` once the source is done or the batch cancelled."""
        checked = self._plan.checked
        while len(self._pending) + len(self._refused) < self._limit:
            if not checked and self._cancel is not None and self._cancel.cancelled:
                return False  # cancelled: an iterator (maybe endless) is pulled no further
            item = next(source, None)
            if item is None:
                return False
            index, prompt = item
            error = None if checked else _prompt_error(index, prompt)
            if error is not None:
                self._refused.append(BatchResult(index, prompt, None, error, 0.0))
                continue
            try:
                future = self._submit(index, prompt)
            except RuntimeError as exc:  # a shut-down executor: each prompt's own error
                refused = AiChatOnlineError(f"the executor refused the prompt: {exc}")
                refused.__cause__ = exc
                self._refused.append(BatchResult(index, prompt, None, refused, 0.0))
                continue
            self._pending[future] = item
            future.add_done_callback(self._done.put)
        return True

    def _submit(self, index: int, prompt: Any) -> concurrent.futures.Future[Any]:
        plan = self._plan
        if plan.remote:
            assert plan.shared is not None  # _check_batch refuses a Session with other processes
            return self._pool.submit(
                _run_remote, plan.shared, plan.session_options, index, prompt, plan.chat_options
            )
        assert self._client is not None
        return self._pool.submit(
            _run_one,
            self._client,
            index,
            prompt,
            plan.chat_options,
            self._limiter,
            self._cancel,
            self._in_flight,
        )

    def _next_result(self) -> Optional[BatchResult]:
        """The next result to hand out (refused prompts first), or ``None`` when all were."""
        if self._refused:
            return self._refused.popleft()
        if not self._pending:
            return None
        future = _next_done(self._done)
        index, prompt = self._pending.pop(future)
        return _result_of(future, index, prompt, self._plan.remote)

    def _count(self, result: BatchResult) -> None:
        if result.error is not None:
            self._failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self._failed, refresh=False)

    def _close(self, finished: bool) -> None:
        """Shut the batch's own pool down and close the bar; on an early exit (the generator
        closed, Ctrl-C, an exception in the consumer) first :func:`_stop` what is pending."""
        try:
            if not finished:
                _stop(self._pending, self._cancel)
        finally:  # also when a second Ctrl-C cuts the grace wait short
            if self._plan.executor is None:  # the pool is the batch's own
                self._pool.shutdown(wait=finished, cancel_futures=True)
            if self._bar is not None:
                self._bar.close()


def _batch_cancel(chat_options: dict[str, Any], remote: bool) -> Optional[Cancellation]:
    """Take ``cancel`` out of ``chat_options`` (the batch passes its own to each chat); refuse
    the chat options a batch cannot pass on."""
    if "keep_text" in chat_options:
        raise InvalidRequestError("a batch keeps the text of every reply: keep_text is not an option")
    cancel = chat_options.pop("cancel", None)
    if cancel is None:
        return None
    if not isinstance(cancel, Cancellation):
        raise InvalidRequestError(f"cancel must be a Cancellation, not {type(cancel).__name__}")
    if remote:
        raise InvalidRequestError(
            "cancel= works with thread executors only (a Cancellation cannot reach another process)"
        )
    return cancel


def in_flight_limit(max_workers: int) -> int:
    """How many prompts of a batch are pulled and not yet handed out, at most: twice the workers,
    so that a worker that finishes finds the next prompt submitted already."""
    return 2 * max_workers


def listed(prompts: Iterable[Any]) -> list[Any]:
    """Every prompt of ``prompts`` in a list, as :func:`aichatonline_sync.batch` takes them before
    anything is sent (a list is checked whole by the engine).

    :raises InvalidRequestError: ``prompts`` is no collection of prompts (see :func:`check_prompts`).
    """
    check_prompts(prompts)
    return list(prompts)


def collect(
    results: Generator[BatchResult, None, None],
    total: int,
    *,
    return_exceptions: bool = False,
    on_result: Optional[Callable[[BatchResult], object]] = None,
) -> list[Any]:
    """What :func:`aichatonline_sync.batch` returns: the ``total`` results of a
    :func:`aichatonline_sync.batch_iter` run put in input order, each given to ``on_result`` as it
    comes. ``results`` is closed on the way out, so that leaving early (``on_result`` raised,
    Ctrl-C) stops the batch at once.

    :returns: the text of each prompt, or with ``return_exceptions`` its exception where it failed.
    :raises BatchError: some prompts failed, with ``.results`` (text or ``None``) and ``.errors``.
    """
    texts: list[Any] = [None] * total
    errors: dict[int, BaseException] = {}
    with contextlib.closing(results):
        for result in results:
            if result.error is None:
                texts[result.index] = result.text
            else:
                errors[result.index] = result.error
                texts[result.index] = result.error if return_exceptions else None
            if on_result is not None:
                on_result(result)
    if errors and not return_exceptions:
        first = min(errors)
        raise BatchError(
            f"{len(errors)} of {total} prompts failed (first: prompt {first}: {errors[first]})",
            results=texts,
            errors=errors,
        )
    return texts


def run_batch(prompts: Iterable[Any], *, options: BatchOptions, **engine: Any) -> list[Any]:
    """:meth:`Session.batch`: :func:`collect` over :func:`iter_batch`, the engine of
    :func:`aichatonline_sync.batch_iter`, given ``options`` and ``engine`` (its other arguments)."""
    items = listed(prompts)
    return collect(
        iter_batch(items, options=options, **engine),
        len(items),
        return_exceptions=options.return_exceptions,
        on_result=options.on_result,
    )
