"""The module-level functions: find or make a shared :class:`Session`, and delegate to it."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional

from .registry import (
    CHAT_OPTIONS,
    SESSION_OPTIONS,
    close_shared_sessions,
    resolve_session,
    shared_session,
    split_options,
)
from .session import Session
from .stream import ChatStream

if TYPE_CHECKING:  # concurrent.futures is slow to import, and only batches need it
    import concurrent.futures

    from .batch import BatchResult

__all__ = [
    "CHAT_OPTIONS",
    "SESSION_OPTIONS",
    "batch",
    "batch_iter",
    "chat",
    "close_shared_sessions",
    "complete",
    "shared_session",
    "split_options",
]


def chat(messages: Any, **options: Any) -> ChatStream:
    """Send a chat and return its reply as a :class:`ChatStream` of text pieces.

    >>> for text in chat("Hello"):        # doctest: +SKIP
    ...     print(text, end="", flush=True)

    :param messages: a str (one user message) or a list of ``{"role", "content"}`` dicts.
    :param options: any :class:`Session` option and any :meth:`Session.chat` option. Calls with the
        same session options share one pooled session (one token, one connection).
    :raises InvalidRequestError: bad messages or options, before anything is sent.
    """
    session_options, chat_options = split_options(options)
    with resolve_session(None, session_options, what="chat()") as session:
        return session.chat(messages, **chat_options)


def complete(messages: Any, **options: Any) -> str:
    """Send a chat and return the whole reply as one str (same options as :func:`chat`)."""
    session_options, chat_options = split_options(options)
    with resolve_session(None, session_options, what="complete()") as session:
        return session.complete(messages, **chat_options)


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

    Prompts are pulled from ``prompts`` as workers free up, at most ``2 * max_workers`` ahead of
    the results handed out, in the thread that iterates the results: an endless generator starts
    yielding at once with flat memory. A list or tuple is checked whole before anything is sent;
    a bad prompt pulled from any other iterable becomes its result's ``error`` (an
    :class:`InvalidRequestError`), and the others go on.

    Stopping early (Ctrl-C while iterating, leaving the loop, or ``.close()``) cancels the prompts
    not yet started and aborts the chats running in this process, then returns within about a
    second. A generator that is still referred to stops only when closed, so keep it in
    ``contextlib.closing``:

    >>> with contextlib.closing(batch_iter(prompts)) as results:    # doctest: +SKIP
    ...     for r in results:
    ...         save(r)

    :param prompts: a list or any iterable of prompts (each a str or a list of messages); not one
        str, ``None`` or a mapping.
    :param max_workers: threads of the built-in pool (and connections kept). With an
        ``executor`` of your own, give its number of threads.
    :param session: the :class:`Session` to use; default: the shared one for ``options``.
    :param progress: show a tqdm progress bar (the ``progress`` extra): done, failed and the rate.
        Without tqdm installed, a warning (once per process) and no bar.
    :param executor: any :class:`concurrent.futures.Executor` instead of the built-in thread pool
        (it is not shut down). A :class:`~concurrent.futures.ThreadPoolExecutor` shares the
        session; an executor of another kind (processes, Dask's ``Client.get_executor()``) gets
        picklable settings instead, and each of its processes reuses one session.
    :param rate_limit: at most this many chats per second, across all workers (thread executors).
    :param options: :class:`Session` options (without ``session``) and :meth:`Session.chat` options.
    :raises InvalidRequestError: a bad prompt or option, before anything is sent.

    A chat still waiting for its token or for the reply's headers cannot be aborted: its worker
    thread ends when that wait ends or at the chat's timeout. Sources that block are described
    in the manual's page on batches.
    """
    from .batch import BatchOptions, iter_batch

    run = BatchOptions(
        max_workers=max_workers, progress=progress, executor=executor, rate_limit=rate_limit
    )
    session_options, chat_options = split_options(options)
    with _batch_session(session, session_options, executor) as client:
        yield from iter_batch(
            prompts,
            session=client,
            session_options=session_options if client is session else {},
            chat_options=chat_options,
            options=run,
            shared=shared_session,
        )


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
    from .batch import BatchOptions, collect, listed

    BatchOptions(
        max_workers=max_workers, progress=progress, executor=executor, rate_limit=rate_limit,
        return_exceptions=return_exceptions, on_result=on_result,
    )  # checked before the prompts are taken; batch_iter() checks all but the last two again
    items = listed(prompts)
    results = batch_iter(
        items, max_workers=max_workers, session=session, progress=progress, executor=executor,
        rate_limit=rate_limit, **options,
    )
    return collect(results, len(items), return_exceptions=return_exceptions, on_result=on_result)


def _batch_session(
    session: Optional[Session],
    session_options: dict[str, Any],
    executor: Optional[concurrent.futures.Executor],
) -> contextlib.AbstractContextManager[Optional[Session]]:
    """The session a batch runs on, kept open for the whole batch (see :func:`resolve_session`);
    ``None`` for an executor of other processes, which find their own from the options."""
    import concurrent.futures

    if executor is not None and not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return contextlib.nullcontext(session)
    return resolve_session(session, session_options, what="batch()")
