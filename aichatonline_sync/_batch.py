"""Batches: fan prompts out across a thread pool (or any ``concurrent.futures.Executor``)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ._api import shared_session, split_options
from ._errors import BatchError, InvalidRequestError
from ._prompt import build_prompt
from ._session import Session

__all__ = ["BatchResult", "batch", "batch_iter"]

logger = logging.getLogger("aichatonline_sync")


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
    """Spaces calls at least ``1 / rate`` seconds apart, across threads."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def _run_one(
    session: Session,
    index: int,
    prompt: Any,
    chat_options: dict[str, Any],
    limiter: Optional[RateLimiter],
) -> BatchResult:
    started = time.monotonic()
    try:
        if limiter is not None:
            limiter.acquire()
        text = session.complete(prompt, **chat_options)
    except Exception as exc:
        return BatchResult(index, prompt, None, exc, time.monotonic() - started)
    return BatchResult(index, prompt, text, None, time.monotonic() - started)


def _run_remote(
    session_options: dict[str, Any], index: int, prompt: Any, chat_options: dict[str, Any]
) -> BatchResult:
    """The picklable work item for executors in other processes (one shared session per process)."""
    return _run_one(shared_session(**session_options), index, prompt, chat_options, None)


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
    return tqdm(total=total, unit="prompt", desc="aichatonline")


def batch_iter(
    prompts: Iterable[Any],
    *,
    max_workers: int = 8,
    session: Optional[Session] = None,
    progress: bool = False,
    executor: Optional[concurrent.futures.Executor] = None,
    rate_limit: Optional[float] = None,
    **options: Any,
) -> Iterator[BatchResult]:
    """Run every prompt and yield a :class:`BatchResult` for each, as each one finishes.

    >>> for r in batch_iter(["Q1", "Q2"], max_workers=8):    # doctest: +SKIP
    ...     print(r.index, r.text if r.error is None else r.error)

    :param prompts: prompts (each a str or a list of messages).
    :param max_workers: threads of the built-in pool (and connections kept).
    :param session: the :class:`Session` to use; default: the shared one for ``options``.
    :param progress: show a tqdm progress bar (the ``progress`` extra).
    :param executor: any :class:`concurrent.futures.Executor` instead of the built-in thread pool.
        An executor of another kind (processes, Dask) gets picklable settings, not the session.
    :param rate_limit: at most this many chats per second, across all workers.
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
    bar = _progress_bar(len(items)) if progress else None
    limiter = RateLimiter(rate_limit) if rate_limit else None
    remote = executor is not None and not isinstance(
        executor, concurrent.futures.ThreadPoolExecutor
    )
    if remote and limiter is not None:
        raise InvalidRequestError("rate_limit works with thread executors only")
    if remote and session is not None:
        raise InvalidRequestError(
            "a Session cannot be sent to another process: pass its options instead of session="
        )
    client = session
    if not remote and client is None:
        client = shared_session(**session_options)
    if client is not None:
        client.ensure_pool(max_workers)
    own_executor = executor is None
    pool = executor or concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="aichatonline-batch"
    )
    failed = 0
    futures: list[concurrent.futures.Future[BatchResult]] = []
    try:
        for index, prompt in enumerate(items):
            if remote:
                futures.append(
                    pool.submit(_run_remote, session_options, index, prompt, chat_options)
                )
            else:
                assert client is not None
                futures.append(pool.submit(_run_one, client, index, prompt, chat_options, limiter))
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            if result.error is not None:
                failed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
            yield result
    finally:
        for future in futures:
            future.cancel()
        if own_executor:
            pool.shutdown(wait=False, cancel_futures=True)
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
    **options: Any,
) -> list[Any]:
    """Run every prompt concurrently and return the replies in input order.

    >>> texts = batch(["Q1", "Q2", "Q3"], max_workers=8)     # doctest: +SKIP

    :param return_exceptions: put a failed prompt's exception in its place instead of raising.
    :raises BatchError: some prompts failed (every prompt still ran): ``.results`` holds the text or
        ``None`` per prompt, ``.errors`` the exceptions by index.
    :raises InvalidRequestError: a bad prompt or option, before anything is sent.

    The other parameters are those of :func:`batch_iter`.
    """
    items = list(prompts)
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    for result in batch_iter(
        items,
        max_workers=max_workers,
        session=session,
        progress=progress,
        executor=executor,
        rate_limit=rate_limit,
        **options,
    ):
        if result.error is None:
            results[result.index] = result.text
        else:
            errors[result.index] = result.error
            results[result.index] = result.error if return_exceptions else None
    if errors and not return_exceptions:
        first = min(errors)
        raise BatchError(
            f"{len(errors)} of {len(items)} prompts failed (first: prompt {first}: {errors[first]})",
            results=results,
            errors=errors,
        )
    return results
