"""``TokenStore``: the token from ``getUniqueId``: fetched, parsed, kept, and refreshed when rejected."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple, Optional

import requests

from .._transport.cancel import Cancellation
from .._transport.transport import Transport, iter_body, translate_exception
from .._wire import redact as _redact
from .._wire.errors import APITimeoutError, TokenError
from .._wire.prompt import get_random_string
from .._wire.protocol import is_number, upstream_code
from .config import Timeout

__all__ = ["TokenSlot", "TokenStore", "parse_token"]

logger = _redact.logger("aichatonline_sync")

_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,256}")
_TOKEN_BODY_LIMIT = 65536
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_token(body: bytes, url: str) -> str:
    """The token in the body of a token reply: the ``data`` of a JSON object.

    :raises TokenError: no usable token (not JSON, no ``data``, not a short printable string).
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise TokenError(
            f"the token reply from {url} is not JSON; it begins: "
            f"{body[:200].decode('utf-8', 'replace')!r}"
        ) from None
    token = data.get("data") if isinstance(data, dict) else None
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        shape = (
            "missing"
            if token is None
            else f"a {type(token).__name__} that is not a short printable string"
        )
        code, said = _upstream_words(data)
        words = ""
        if code is not None or said is not None:
            words = f"; the upstream says: code {code!r}" + (f", {said!r}" if said else "")
        raise TokenError(
            f"the token reply from {url} has no usable token: its 'data' is {shape}{words}",
            code=code,
            upstream_message=said,
        )
    _redact.remember(token)  # before anything can echo it
    return token


def _upstream_words(data: object) -> tuple[object, Optional[str]]:
    """The ``code`` and ``message`` of a token reply that carries them (an error reply)."""
    if not isinstance(data, dict):
        return None, None
    code = upstream_code(data.get("code"))
    if not is_number(code, (int, str)):
        code = None
    said = data.get("message", data.get("msg"))
    if not isinstance(said, str):
        return code, None
    return code, _SURROGATE.sub("\ufffd", said[:500])  # text, as every message of ours is


class _Outcome(NamedTuple):
    """How one fetch ended: a ``token``, an ``error`` every waiter shares, or neither (withdrawn:
    the leader's own cancel, deadline or interrupt ended it, which is no verdict for the others)."""

    token: Optional[str] = None
    error: Optional[Exception] = None


_WITHDRAWN = _Outcome()


class _Waker:
    """Wakes the threads waiting on ``condition`` when a :class:`Cancellation` fires."""

    def __init__(self, condition: threading.Condition) -> None:
        self._condition = condition

    def abort(self) -> None:
        with self._condition:
            self._condition.notify_all()


class TokenSlot:
    """The kept token and the one fetch that may replace it: a single flight.

    Invariants, checked where the state changes:

    - at most one fetch is in flight: :meth:`join` makes a caller the leader only while
      ``fetching`` is false, and sets it; only the leader's :meth:`end` clears it, once;
    - every fetch that ends bumps ``ended`` and leaves its outcome; a waiter returns the outcome of
      a fetch that ended after it began to wait (its token, or its shared error), or, when that
      fetch was withdrawn, tries again (leading or waiting) as if it had just come;
    - a waiter leaves early only for its own reasons: its cancel (woken by a :class:`_Waker`) or its
      deadline (the wait's timeout), each with its own error; the fetch goes on for the others.

    The condition's lock is reentrant because a cancel that already fired wakes in the thread that
    registers the waker, which holds the lock.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.RLock())
        self._token: Optional[str] = None
        self._fetching = False
        self._ended = 0
        self._last = _WITHDRAWN

    @property
    def token(self) -> Optional[str]:
        """The kept token, or ``None``."""
        with self._changed:
            return self._token

    def clear(self) -> None:
        """Forget the kept token; a fetch in flight still keeps the one it gets."""
        with self._changed:
            self._token = None

    def join(
        self,
        *,
        stale: Optional[str],
        refresh: bool,
        deadline: Optional[float],
        cancel: Optional[Cancellation],
        url: str,
    ) -> Optional[str]:
        """The token for one caller, or ``None``: the caller leads a fetch and must :meth:`end` it.

        The kept token is taken unless it is ``stale`` (rejected) or ``refresh`` asks for a new one;
        else the caller waits for the fetch in flight, or leads one, unless ``cancel`` fired.

        :raises APIConnectionError: ``cancel`` fired (not retryable).
        :raises APITimeoutError: ``deadline`` passed while waiting.
        :raises Exception: the shared error of the fetch waited for.
        """
        waker: Optional[_Waker] = None
        try:
            with self._changed:
                while True:
                    if self._token is not None and not refresh and self._token != stale:
                        return self._token
                    if cancel is not None:
                        cancel.check("the token request", url)
                    if not self._fetching:
                        self._fetching = True
                        return None
                    if waker is None and cancel is not None:
                        waker = _Waker(self._changed)
                        cancel.add(waker)
                    outcome = self._await_end(deadline, cancel, url)
                    if outcome.token is not None:
                        return outcome.token
                    if outcome.error is not None:
                        raise outcome.error
        finally:
            if waker is not None and cancel is not None:
                cancel.discard(waker)

    def _await_end(
        self, deadline: Optional[float], cancel: Optional[Cancellation], url: str
    ) -> _Outcome:
        """Wait, holding the lock, until the fetch in flight ends; its outcome."""
        logger.debug("waiting for the token that another thread is fetching from %s", url)
        seen = self._ended
        while self._ended == seen:
            if cancel is not None:
                cancel.check("the token request", url)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise APITimeoutError(
                    f"the total deadline passed while waiting for the token from {url}", url=url
                )
            self._changed.wait(remaining)
        return self._last

    def end(self, *, token: Optional[str] = None, error: Optional[Exception] = None) -> None:
        """The leader's fetch ended: with its ``token``, with an ``error`` that every waiter shares,
        or with neither (withdrawn: its own cancel, deadline or interrupt ended it). Keep the
        token and wake every waiter."""
        assert token is None or error is None, "a fetch ends one way"
        with self._changed:
            assert self._fetching, "only the leader ends a fetch, and once"
            self._fetching = False
            self._ended += 1
            self._last = _Outcome(token, error)
            if token is not None:
                self._token = token
            self._changed.notify_all()


class TokenStore:
    """The token of one session.

    With ``reuse=True`` one token is kept for every chat, fetched once even when many threads ask
    at the same time (a :class:`TokenSlot`), and fetched again only when the upstream rejects it
    (:meth:`get` with ``stale=``) or on ``refresh=True``. With ``reuse=False`` every call fetches a
    fresh one. Each fetch is one request: the caller's retry policy decides whether to try again.

    :param url: the token endpoint (``{base_url}/api/v1/user/getUniqueId``).
    :param shown_url: the same, as errors and logs show it (no credentials).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        url: str,
        shown_url: str,
        headers: Mapping[str, str],
        reuse: bool,
    ) -> None:
        self._transport = transport
        self._endpoint = transport.endpoint("GET", url, headers, shown_url)
        self._shown_url = shown_url
        self._reuse = reuse
        self._slot = TokenSlot()

    @property
    def shown_url(self) -> str:
        """The token endpoint, as errors and logs show it."""
        return self._shown_url

    @property
    def current(self) -> Optional[str]:
        """The kept token, if any (to keep it out of messages)."""
        return self._slot.token

    def clear(self) -> None:
        """Forget the kept token (the session closes)."""
        self._slot.clear()

    def get(
        self,
        timeout: Timeout,
        *,
        deadline: Optional[float] = None,
        cancel: Optional[Cancellation] = None,
        stale: Optional[str] = None,
        refresh: bool = False,
    ) -> str:
        """The token to send: the kept one, unless it is ``stale`` (rejected) or ``refresh``.

        :raises TokenError, APIStatusError, APIConnectionError: the one token request failed, or
            the fetch this call waited for did.
        """
        if not self._reuse:
            return self._request(timeout, deadline, cancel)
        token = self._slot.join(
            stale=stale, refresh=refresh, deadline=deadline, cancel=cancel, url=self._shown_url
        )
        if token is not None:
            return token
        error: Optional[Exception] = None
        try:
            token = self._request(timeout, deadline, cancel)
            return token
        except Exception as exc:
            ended_by_own_limits = (cancel is not None and cancel.cancelled) or (
                deadline is not None and time.monotonic() >= deadline
            )
            error = None if ended_by_own_limits else exc
            raise
        finally:
            self._slot.end(token=token, error=error)

    def _request(
        self, timeout: Timeout, deadline: Optional[float], cancel: Optional[Cancellation]
    ) -> str:
        """One token request: nothing is sent once ``cancel`` fired."""
        if cancel is not None:
            cancel.check("the token request", self._shown_url)
        response = self._endpoint.send(
            query=f"?canvas=-{get_random_string()}", timeout=timeout.within(deadline)
        )
        if not 200 <= response.status_code < 300:
            raise self._transport.status_error(
                response, url=self._shown_url, what="the token request", token_sent=False,
                secrets=(self._slot.token,), deadline=deadline, read_timeout=timeout.read,
            )
        token = parse_token(self._read(response, deadline, timeout.read), self._shown_url)
        logger.debug("got a token from %s", self._shown_url)
        return token

    def _read(
        self, response: requests.Response, deadline: Optional[float], read_timeout: Optional[float]
    ) -> bytes:
        """The body of a token reply, read no longer than ``deadline`` (as a chat's is)."""
        body = b""
        try:
            for chunk in iter_body(response, deadline=deadline, read_timeout=read_timeout):
                body += chunk
                if len(body) > _TOKEN_BODY_LIMIT:
                    raise TokenError(
                        f"the token reply from {self._shown_url} is larger than "
                        f"{_TOKEN_BODY_LIMIT} bytes; not a token"
                    )
        except TokenError:
            raise
        except Exception as exc:
            raise translate_exception(
                exc, url=self._shown_url, stage="token", proxy=self._transport.proxy
            ) from exc
        finally:
            response.close()
        return body
