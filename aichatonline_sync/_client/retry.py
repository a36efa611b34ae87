"""Retries, built on tenacity: one predicate decides, one function waits, every retry is logged."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from .._transport.cancel import Cancellation
from .._wire import redact as _redact
from .._wire.errors import (
    APIConnectionError,
    APIStatusError,
    UpstreamError,
)
from .config import RetryPolicy

if TYPE_CHECKING:  # tenacity is imported at the first request, not at ``import aichatonline_sync``
    import tenacity

__all__ = ["backoff", "build_retrying", "retry_reason", "run_with_retries"]

logger = _redact.logger("aichatonline_sync")

T = TypeVar("T")



def _code_of(exc: BaseException) -> Optional[int]:
    """The status of a reply, or the code of an error line before any text; else ``None``."""
    if isinstance(exc, APIStatusError):
        return exc.status_code
    if isinstance(exc, UpstreamError) and not exc.partial and isinstance(exc.code, int):
        return exc.code
    return None


def retry_reason(exc: BaseException, policy: RetryPolicy) -> Optional[str]:
    """Why ``exc`` is worth another attempt, or ``None`` when it is not. The one predicate."""
    if isinstance(exc, APIConnectionError):
        return f"{type(exc).__name__}: {exc}" if exc.retryable else None
    code = _code_of(exc)
    if code is None or code not in policy.RETRY_STATUSES:
        return None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None and retry_after > policy.max_retry_after:
        logger.debug(
            "not retrying %s: Retry-After %.3g s is above max_retry_after %.3g s",
            code,
            retry_after,
            policy.max_retry_after,
        )
        return None
    kind = "HTTP status" if isinstance(exc, APIStatusError) else "error line with code"
    return f"{kind} {code}"


def backoff(policy: RetryPolicy, attempt: int, exc: Optional[BaseException] = None) -> float:
    """The wait before retry number ``attempt`` (1-based): ``Retry-After`` if given, else a random
    delay between ``initial_delay`` and ``min(max_delay, initial_delay * 2 ** (attempt - 1))``."""
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return float(retry_after)
    # 2 ** 60 times any delay is past every max_delay; a larger power would overflow a float.
    ceiling = min(policy.max_delay, policy.initial_delay * 2 ** min(attempt - 1, 60))
    return random.uniform(policy.initial_delay, max(policy.initial_delay, ceiling))


def build_retrying(
    policy: RetryPolicy,
    *,
    what: str,
    deadline: Optional[float] = None,
    cancel: Optional[Cancellation] = None,
    url: Optional[str] = None,
    on_retry: Optional[Callable[[int, float, BaseException], None]] = None,
    step: Optional[Callable[[BaseException], str]] = None,
) -> tenacity.Retrying:
    """The :class:`tenacity.Retrying` for one call of ``what`` ("chat request", "token request").

    - retry: :func:`retry_reason` (the one predicate);
    - stop: after ``policy.max_retries`` retries, or when the next wait would end past
      ``deadline`` (a :func:`time.monotonic` value), or once ``cancel`` is cancelled;
    - wait: :func:`backoff` (``Retry-After`` when the reply asked for it);
    - sleep: ``policy.sleep``, ended early by ``cancel`` (which then raises its error, naming
      ``url``);
    - before each retry, a warning with the step that failed (``step(error)``, default ``what``),
      the reason and the wait, and ``on_retry(attempt, wait, error)`` (the session's event
      hooks). The last error is raised as it is.

    An attempt may hold several steps (a chat's: the token, then the chat): they share the budget.
    """
    import tenacity  # at the first request, not at ``import aichatonline_sync``

    def should_retry(exc: BaseException) -> bool:
        return retry_reason(exc, policy) is not None

    def wait(state: tenacity.RetryCallState) -> float:
        outcome = state.outcome
        return backoff(policy, state.attempt_number, outcome.exception() if outcome else None)

    def past_deadline(state: tenacity.RetryCallState) -> bool:
        if deadline is None or time.monotonic() + state.upcoming_sleep < deadline:
            return False
        logger.debug("%s: not retrying, the total deadline would pass", what)
        return True

    def log(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "%s failed (%s); retry %d of %d in %.2f s",
            what if step is None or exc is None else step(exc),
            "?" if exc is None else retry_reason(exc, policy),
            state.attempt_number,
            policy.max_retries,
            state.upcoming_sleep,
        )
        if on_retry is not None and exc is not None:
            on_retry(state.attempt_number, state.upcoming_sleep, exc)

    stops: list[Any] = [tenacity.stop_after_attempt(policy.max_retries + 1), past_deadline]
    sleep: Callable[[float], None] = policy.sleep
    if cancel is not None:
        stops.append(tenacity.stop_when_event_set(cancel.event))
        sleep = cancel.sleeper(policy.sleep, f"the {what}", url)
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(should_retry),
        stop=tenacity.stop_any(*stops),
        wait=wait,
        sleep=sleep,
        before_sleep=log,
        reraise=True,
    )


def run_with_retries(
    func: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    deadline: Optional[float] = None,
    cancel: Optional[Cancellation] = None,
    url: Optional[str] = None,
) -> T:
    """Call ``func`` until it succeeds, it raises something not retried, or the policy gives up
    (see :func:`build_retrying`); the last error is raised as it is."""
    retrying = build_retrying(policy, what=what, deadline=deadline, cancel=cancel, url=url)
    return retrying(func)
