"""The sessions that module-level calls share: one per distinct set of session options, at most
:data:`MAX_SHARED_SESSIONS` of them.

``aco.chat("Hi")`` twice uses one session (one token, one pooled connection). Callers that vary
their options (per-call headers, a new ``requests.Session`` each time) would otherwise keep one
session, pool and token alive per variant: past the bound, the least recently used session is
dropped and closed, as soon as no call is using it any more (a stream already returned keeps
reading: its connection is its own until it ends).
"""

from __future__ import annotations

import atexit
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Optional

from .._wire.errors import InvalidRequestError
from .config import RetryPolicy, validate_base_url
from .session import CHAT_OPTIONS, SESSION_OPTIONS, Session, split_options

__all__ = [
    "CHAT_OPTIONS",
    "MAX_SHARED_SESSIONS",
    "SESSION_OPTIONS",
    "check_session_options",
    "close_shared_sessions",
    "resolve_session",
    "shared_session",
    "split_options",
    "using_shared_session",
]

#: The most sessions kept for module-level calls.
MAX_SHARED_SESSIONS = 8


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (objects without a value equality: by identity;
    the session made for them holds them, so their ``id`` is not reused while it is kept)."""
    if isinstance(value, dict):
        return tuple(sorted((str(key).lower(), _freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, RetryPolicy):
        return (value, id(value.sleep))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _key(options: dict[str, Any]) -> tuple[Any, ...]:
    """The registry key of a set of session options; a given ``requests.Session`` by identity."""
    return tuple(
        sorted(
            (name, ("id", id(value)) if name == "http" else _freeze(value))
            for name, value in options.items()
        )
    )


class _Entry:
    """A shared session and how many calls use it: once dropped from the registry, it is closed
    as soon as none does."""

    __slots__ = ("dropped", "session", "users")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.users = 0
        self.dropped = False


class _Registry:
    """The least recently used shared sessions, at most ``size``. Entries change under the lock;
    sessions are made under it (one per key) and closed outside it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, options: dict[str, Any]) -> _Entry:
        options = dict(options)
        options["base_url"] = validate_base_url(options.get("base_url"))
        key = _key(options)
        dropped: list[_Entry] = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.session.closed:
                entry = _Entry(Session(**options))  # may raise InvalidRequestError: nothing kept
                self._entries[key] = entry
                while len(self._entries) > self.size:
                    _, old = self._entries.popitem(last=False)
                    old.dropped = True
                    if old.users == 0:
                        dropped.append(old)
            self._entries.move_to_end(key)
            entry.users += 1
        for old in dropped:
            old.session.close()
        return entry

    def release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.dropped and entry.users == 0
        if close:
            entry.session.close()

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.session.close()

    def __len__(self) -> int:
        return len(self._entries)


_registry = _Registry(MAX_SHARED_SESSIONS)


@contextmanager
def using_shared_session(**session_options: Any) -> Iterator[Session]:
    """The shared :class:`Session` for these options, kept open until the block ends (even if
    it is dropped from the registry meanwhile)."""
    entry = _registry.acquire(session_options)
    try:
        yield entry.session
    finally:
        _registry.release(entry)


def resolve_session(
    session: Optional[Session], session_options: dict[str, Any], *, what: str
) -> AbstractContextManager[Session]:
    """The session a call runs on: ``session`` if one is given, else the shared session for
    ``session_options``, leased while the block runs so that the registry cannot close it
    meanwhile. The options are checked at once, before the block is entered.

    :param what: the caller as the error names it (``"batch()"``).
    :raises InvalidRequestError: both a ``session`` and session options are given.
    """
    check_session_options(session, session_options, what=what)
    if session is None:
        return using_shared_session(**session_options)
    return nullcontext(session)


def check_session_options(
    session: Optional[Session], session_options: dict[str, Any], *, what: str
) -> None:
    """Refuse session options given together with a ``session``: they would be ignored.

    :raises InvalidRequestError: naming the options and where they belong.
    """
    if session is not None and session_options:
        raise InvalidRequestError(
            f"give session options ({', '.join(sorted(session_options))}) to the Session, "
            f"not to {what} together with session="
        )


def shared_session(**session_options: Any) -> Session:
    """The shared :class:`Session` for these options (made on first use, then reused).

    It stays open while it is among the :data:`MAX_SHARED_SESSIONS` most recently used; for a
    longer use, prefer :func:`using_shared_session` or a :class:`Session` of your own.
    """
    entry = _registry.acquire(session_options)
    _registry.release(entry)
    return entry.session


def close_shared_sessions() -> None:
    """Close every shared session: the at most :data:`MAX_SHARED_SESSIONS` (8) sessions that
    module-level calls share, one per distinct set of session options. Done at exit; call it to
    drop their pooled connections and tokens sooner (a test's teardown, after changing proxy or CA
    environment variables, before a fork). The next module-level call makes a new session."""
    _registry.clear()


atexit.register(close_shared_sessions)
