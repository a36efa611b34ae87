"""``TokenStore``: the token from ``getUniqueId``: fetched, parsed, kept, and refreshed when rejected."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from typing import Optional

import requests

from .._transport.cancel import Cancellation
from .._transport.transport import Transport, iter_body, translate_exception
from .._wire import redact as _redact
from .._wire.errors import APITimeoutError, TokenError
from .._wire.prompt import get_random_string
from .._wire.protocol import upstream_code
from .config import RetryPolicy, Timeout
from .retry import run_with_retries

__all__ = ["TokenStore", "parse_token"]

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
    except (ValueError, RecursionError):  # (RecursionError: JSON nested too deep)
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
    if not isinstance(code, (int, str)) or isinstance(code, bool):
        code = None
    said = data.get("message", data.get("msg"))
    if not isinstance(said, str):
        return code, None
    return code, _SURROGATE.sub("\ufffd", said[:500])  # (text, as every message of ours is)


class _Flight:
    """One token fetch in progress, that other threads wait for instead of fetching too."""

    def __init__(self) -> None:
        self.token: Optional[str] = None
        self.error: Optional[BaseException] = None
        #: The fetch failed for a reason of the fetching thread's own (its cancel, its deadline):
        #: a waiting thread fetches for itself instead of taking that failure.
        self.own_fault = False
        self.done = False
        self._wakers: list[threading.Event] = []
        self._lock = threading.Lock()

    def waker(self) -> threading.Event:
        """An event set when the fetch ends (at once, if it has ended)."""
        event = threading.Event()
        with self._lock:
            if self.done:
                event.set()
            else:
                self._wakers.append(event)
        return event

    def finish(self) -> None:
        with self._lock:
            self.done = True
            wakers, self._wakers = self._wakers, []
        for event in wakers:
            event.set()


class _Waker:
    """What a :class:`Cancellation` aborts to wake a thread that waits for another's fetch."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def abort(self) -> None:
        self._event.set()


class TokenStore:
    """The token of one session.

    With ``reuse=True`` one token is kept for every chat, fetched once even when many threads ask
    at the same time, and fetched again only when the upstream rejects it (:meth:`get` with
    ``stale=``) or on ``refresh=True``. With ``reuse=False`` every call fetches a fresh one.

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
        retry: RetryPolicy,
        reuse: bool,
    ) -> None:
        self._transport = transport
        self._endpoint = transport.endpoint("GET", url, headers, shown_url)
        self._shown_url = shown_url
        self._retry = retry
        self._reuse = reuse
        self._token: Optional[str] = None
        self._flight: Optional[_Flight] = None
        self._lock = threading.Lock()  # guards _token and _flight; never held during I/O

    @property
    def current(self) -> Optional[str]:
        """The kept token, if any (to keep it out of messages)."""
        return self._token

    def clear(self) -> None:
        self._token = None

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

        :raises TokenError, APIStatusError, APIConnectionError: after the token request's retries.
        """
        if not self._reuse:
            return self._fetch(timeout, deadline, cancel)
        while True:
            with self._lock:
                current = self._token
                if current is not None and not refresh and current != stale:
                    return current  # (another thread may have replaced the stale one already)
                flight = self._flight
                leading = flight is None
                if flight is None:
                    flight = self._flight = _Flight()
            if leading:
                return self._lead(flight, timeout, deadline, cancel)
            token = self._follow(flight, deadline, cancel)
            if token is not None:
                return token
            refresh = False  # the fetch it waited for failed on its own account: fetch anew

    def _lead(
        self,
        flight: _Flight,
        timeout: Timeout,
        deadline: Optional[float],
        cancel: Optional[Cancellation],
    ) -> str:
        """Fetch the token for every thread that asks meanwhile."""
        try:
            flight.token = self._fetch(timeout, deadline, cancel)
            return flight.token
        except BaseException as exc:
            flight.error = exc
            flight.own_fault = (
                not isinstance(exc, Exception)  # KeyboardInterrupt & co. belong to this thread
                or (cancel is not None and cancel.cancelled)
                or (deadline is not None and time.monotonic() >= deadline)
            )
            raise
        finally:
            with self._lock:
                if flight.token is not None:
                    self._token = flight.token
                self._flight = None
            flight.finish()

    def _follow(
        self, flight: _Flight, deadline: Optional[float], cancel: Optional[Cancellation]
    ) -> Optional[str]:
        """Wait for another thread's fetch, within this caller's deadline and cancel.

        :returns: its token, or ``None`` when it failed for a reason of its own.
        :raises: its error, as :class:`concurrent.futures.Future` raises one result's error in
            every thread that waits for it.
        """
        logger.debug("waiting for the token that another thread is fetching from %s", self._shown_url)
        event = flight.waker()
        waker = _Waker(event)
        if cancel is not None:
            cancel.add(waker)
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            event.wait(remaining)
        finally:
            if cancel is not None:
                cancel.discard(waker)
        if cancel is not None:
            cancel.check("the token request", self._shown_url)
        if not flight.done:
            raise APITimeoutError(
                f"the total deadline passed while waiting for the token from {self._shown_url}",
                url=self._shown_url,
            )
        if flight.token is not None:
            return flight.token
        if flight.own_fault:
            return None
        assert flight.error is not None
        raise flight.error

    def _fetch(
        self, timeout: Timeout, deadline: Optional[float], cancel: Optional[Cancellation]
    ) -> str:
        def attempt() -> str:
            if cancel is not None:
                cancel.check("the token request", self._shown_url)  # nothing sent once cancelled
            response = self._endpoint.send(
                query=f"?canvas=-{get_random_string()}", timeout=timeout.within(deadline)
            )
            if not 200 <= response.status_code < 300:
                raise self._transport.status_error(
                    response, url=self._shown_url, what="the token request", token_sent=False,
                    secrets=(self._token,), deadline=deadline, read_timeout=timeout.read,
                )
            return parse_token(self._read(response, deadline, timeout.read), self._shown_url)

        token = run_with_retries(
            attempt,
            self._retry,
            what="token request",
            deadline=deadline,
            cancel=cancel,
            url=self._shown_url,
        )
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
