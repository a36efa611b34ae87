"""Batches: fan prompts out across a thread pool (or any ``concurrent.futures.Executor``).

The built-in pool shares one :class:`Session` (one token, a connection pool as large as the number
of workers). An executor that runs work elsewhere (processes, a Dask cluster) is sent plain,
picklable settings instead, and each of its processes makes and reuses one shared session.

Stopping early (Ctrl-C, ``break``, closing the iterator): prompts not yet started are cancelled, and
the chats running in this process are aborted by shutting down their sockets, so that the worker
threads blocked in a read return at once. What finished before was already handed out.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pickle
import queue
import socket
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ._api import shared_session, split_options
from ._errors import BatchError, InvalidRequestError
from ._prompt import build_prompt
from ._session import Session
from ._stream import ChatStream

__all__ = ["BatchResult", "RateLimiter", "batch", "batch_iter"]

logger = logging.getLogger("aichatonline_sync")

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
        self.interval = 1.0 / rate
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


class _Stopped(concurrent.futures.CancelledError):
    """The batch was stopped before this prompt finished (no one sees this result)."""


class _Running:
    """The chats of one batch that run in this process, so that stopping the batch can abort them.

    A stream being read in a worker thread cannot be closed from another thread: its generator is
    executing, and closing its response waits for the reader's buffer lock instead of waking the
    read. Shutting the socket down does wake it: the worker then fails, closes the stream itself
    and returns.
    """

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._streams: set[ChatStream] = set()

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less when the batch is stopped meanwhile (then ``True``)."""
        return self.stopped.wait(seconds)

    def add(self, stream: ChatStream) -> bool:
        """Track ``stream``; ``False`` (not tracked) when the batch was stopped already."""
        with self._lock:
            if self.stopped.is_set():
                return False
            self._streams.add(stream)
            return True

    def discard(self, stream: ChatStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def stop(self) -> int:
        """Stop the batch: no new chats, and abort the open ones. Returns how many were open."""
        with self._lock:
            self.stopped.set()
            streams = list(self._streams)
            self._streams.clear()
        for stream in streams:
            _abort(stream)
        return len(streams)


def _socket_of(stream: ChatStream) -> Optional[socket.socket]:
    """The socket a chat reply is read from, or ``None`` (already released to the pool)."""
    raw = getattr(stream._response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)  # urllib3 1.26 and 2.x
    if isinstance(sock, socket.socket):
        return sock
    buffered = getattr(getattr(raw, "_fp", None), "fp", None)  # http.client's reader
    sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _abort(stream: ChatStream) -> None:
    """Make a read of ``stream`` blocked in another thread fail at once."""
    if stream.closed:
        return
    stream._reply._aborted = True  # what fails now is no reason to retry
    sock = _socket_of(stream)
    if sock is None:
        logger.debug("no socket to shut down for %r", stream)
        return
    try:
        # The plain TCP shutdown, also for TLS: it wakes the reader; SSLSocket.shutdown would
        # unwrap the TLS object under the reader's feet.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        logger.debug("could not shut down the socket of %r", stream, exc_info=True)


def _complete(
    session: Session, prompt: Any, chat_options: dict[str, Any], running: Optional[_Running]
) -> str:
    if running is None:
        return session.complete(prompt, **chat_options)
    options = dict(chat_options)
    options["keep_text"] = True
    opened: list[ChatStream] = []  # every attempt's stream, from before its first piece on

    def track(stream: ChatStream) -> None:
        opened.append(stream)
        if not running.add(stream):
            raise _Stopped("the batch was stopped")

    policy_sleep = session.retry.sleep

    def wait_to_retry(seconds: float) -> None:
        # A retry wait (up to a Retry-After's max_retry_after) ends when the batch is stopped,
        # and no request is sent after it. A sleep the policy injects (a test's) is kept.
        if policy_sleep is time.sleep:
            if running.wait(seconds):
                raise _Stopped("the batch was stopped")
            return
        policy_sleep(seconds)
        if running.stopped.is_set():
            raise _Stopped("the batch was stopped")

    try:
        with session.chat(prompt, _on_open=track, _sleep=wait_to_retry, **options) as stream:
            for _ in stream:
                pass
            return stream.text
    finally:
        for stream in opened:
            running.discard(stream)


def _run_one(
    session: Session,
    index: int,
    prompt: Any,
    chat_options: dict[str, Any],
    limiter: Optional[RateLimiter],
    running: Optional[_Running] = None,
) -> BatchResult:
    started = time.monotonic()
    try:
        if running is not None and running.stopped.is_set():
            raise _Stopped("the batch was stopped")
        if limiter is not None:
            limiter.acquire()
            if running is not None and running.stopped.is_set():
                raise _Stopped("the batch was stopped")
        text = _complete(session, prompt, chat_options, running)
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
    session_options: dict[str, Any], index: int, prompt: Any, chat_options: dict[str, Any]
) -> _Outcome:
    """The work item sent to executors in other processes: only settings and the prompt travel,
    and each process reuses one shared session for these settings."""
    result = _run_one(shared_session(**session_options), index, prompt, chat_options, None)
    error = None if result.error is None else _picklable(result.error)
    return (result.text, error, result.elapsed)


# -- the batch --------------------------------------------------------------------------------


def _check(max_workers: object, rate_limit: object) -> None:
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidRequestError(f"max_workers must be a whole number >= 1, not {max_workers!r}")
    if rate_limit is not None and (
        isinstance(rate_limit, bool)
        or not isinstance(rate_limit, (int, float))
        or not rate_limit > 0
    ):
        raise InvalidRequestError(
            f"rate_limit must be a positive number of requests per second, not {rate_limit!r}"
        )


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise InvalidRequestError(
            'progress=True needs tqdm: pip install "aichatonline-sync[progress]"'
        ) from None
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


def _stop(futures: Iterable[concurrent.futures.Future[Any]], running: Optional[_Running]) -> None:
    """Stop early: cancel what has not started, abort the chats running here, and give their
    threads a moment to return."""
    aborted = running.stop() if running is not None else 0
    futures = list(futures)
    cancelled = sum(future.cancel() for future in futures)
    logger.debug(
        "batch stopped early: %d prompts cancelled, %d running chats aborted", cancelled, aborted
    )
    if running is not None:
        unfinished = [future for future in futures if not future.done()]
        if unfinished:
            concurrent.futures.wait(unfinished, timeout=_GRACE_SECONDS)


def batch_iter(
    prompts: Iterable[Any],
    *,
    max_workers: int = 8,
    session: Optional[Session] = None,
    progress: bool = False,
    executor: Optional[concurrent.futures.Executor] = None,
    rate_limit: Optional[float] = None,
    **options: Any,
) -> Generator[BatchResult, None, None]:
    """Run every prompt and yield a :class:`BatchResult` for each, as each one finishes.

    >>> for r in batch_iter(["Q1", "Q2"], max_workers=8):    # doctest: +SKIP
    ...     print(r.index, r.text if r.error is None else r.error)

    Stopping early (Ctrl-C while iterating, leaving the loop, or ``.close()``) cancels the prompts
    not yet started and aborts the chats running in this process (their sockets are shut down),
    then returns within about a second; what finished was handed out already. A generator that is
    still referred to stops only when closed, so keep it in ``contextlib.closing``:

    >>> with contextlib.closing(batch_iter(prompts)) as results:    # doctest: +SKIP
    ...     for r in results:
    ...         save(r)

    A chat in a retry wait stops waiting at once and sends nothing more; a chat waiting for its
    first piece of text is aborted like the others. A chat still waiting for its token or for the
    reply's headers cannot be aborted: its worker thread ends when that wait ends or at the chat's
    timeout (nothing more is handed out).

    :param prompts: prompts (each a str or a list of messages).
    :param max_workers: threads of the built-in pool (and connections kept).
    :param session: the :class:`Session` to use; default: the shared one for ``options``.
    :param progress: show a tqdm progress bar (the ``progress`` extra): done, failed and the rate.
    :param executor: any :class:`concurrent.futures.Executor` instead of the built-in thread pool
        (it is not shut down). A :class:`~concurrent.futures.ThreadPoolExecutor` shares the
        session; an executor of another kind (processes, Dask's ``Client.get_executor()``) gets
        picklable settings instead, and each of its processes reuses one session.
    :param rate_limit: at most this many chats per second, across all workers (thread executors).
    :param options: :class:`Session` options (without ``session``) and :meth:`Session.chat` options.
    :raises InvalidRequestError: a bad prompt or option, before anything is sent.
    """
    items = list(prompts)
    _check(max_workers, rate_limit)
    for index, prompt in enumerate(items):
        try:
            build_prompt(prompt)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"prompt {index}: {exc}") from None
    session_options, chat_options = split_options(options)
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
    bar = _progress_bar(len(items)) if progress else None
    running = None if remote else _Running()
    limiter = (
        RateLimiter(rate_limit, sleep=running.wait)
        if rate_limit is not None and running is not None
        else None
    )
    client = session
    if not remote and client is None:
        client = shared_session(**session_options)
    if client is not None:
        # A caller's thread pool may have more threads than max_workers: one connection each.
        threads = getattr(executor, "_max_workers", 0)
        client.ensure_pool(max(max_workers, threads if isinstance(threads, int) else 0))
    own_executor = executor is None
    pool = executor or concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix=_THREAD_PREFIX
    )
    done: queue.SimpleQueue[concurrent.futures.Future[Any]] = queue.SimpleQueue()
    index_of: dict[concurrent.futures.Future[Any], int] = {}
    failed = 0
    finished = False
    try:
        for index, prompt in enumerate(items):
            future: concurrent.futures.Future[Any]
            if remote:
                future = pool.submit(_run_remote, session_options, index, prompt, chat_options)
            else:
                assert client is not None
                future = pool.submit(
                    _run_one, client, index, prompt, chat_options, limiter, running
                )
            index_of[future] = index
            future.add_done_callback(done.put)
        for _ in range(len(items)):
            future = _next_done(done)
            index = index_of[future]
            result = _result_of(future, index, items[index], remote)
            if result.error is not None:
                failed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
            yield result
        finished = True
    finally:
        try:
            if not finished:
                _stop(index_of, running)
        finally:  # also when a second Ctrl-C cuts the grace wait short
            if own_executor:
                pool.shutdown(wait=finished, cancel_futures=True)
            if bar is not None:
                bar.close()


def batch(
    prompts: Iterable[Any],
    *,
    max_workers: int = 8,
    session: Optional[Session] = None,
    progress: bool = False,
    return_exceptions: bool = False,
    executor: Optional[concurrent.futures.Executor] = None,
    rate_limit: Optional[float] = None,
    on_result: Optional[Callable[[BatchResult], object]] = None,
    **options: Any,
) -> list[Any]:
    """Run every prompt concurrently and return the replies in input order.

    >>> texts = batch(["Q1", "Q2", "Q3"], max_workers=8)     # doctest: +SKIP

    Ctrl-C (a :class:`KeyboardInterrupt` in the calling thread) stops the batch as
    :func:`batch_iter` does and is raised again; to keep what finished before it, collect results
    with ``on_result`` (or iterate :func:`batch_iter`).

    :param return_exceptions: put a failed prompt's exception in its place instead of raising.
    :param on_result: called in the calling thread with each :class:`BatchResult` as it finishes
        (an exception it raises stops the batch and is raised).
    :raises BatchError: some prompts failed (every prompt still ran): ``.results`` holds the text or
        ``None`` per prompt, ``.errors`` the exceptions by index.
    :raises InvalidRequestError: a bad prompt or option, before anything is sent.

    The other parameters are those of :func:`batch_iter`.
    """
    if on_result is not None and not callable(on_result):
        raise InvalidRequestError(f"on_result must be callable, not {on_result!r}")
    items = list(prompts)
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    results_iter = batch_iter(
        items,
        max_workers=max_workers,
        session=session,
        progress=progress,
        executor=executor,
        rate_limit=rate_limit,
        **options,
    )
    try:
        for result in results_iter:
            if result.error is None:
                results[result.index] = result.text
            else:
                errors[result.index] = result.error
                results[result.index] = result.error if return_exceptions else None
            if on_result is not None:
                on_result(result)
    finally:
        results_iter.close()  # at once, also when on_result raised
    if errors and not return_exceptions:
        first = min(errors)
        raise BatchError(
            f"{len(errors)} of {len(items)} prompts failed (first: prompt {first}: {errors[first]})",
            results=results,
            errors=errors,
        )
    return results
