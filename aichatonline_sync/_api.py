"""The module-level ``chat()`` and ``complete()``: find or make a shared ``Session``, and delegate."""

from __future__ import annotations

import atexit
import threading
from typing import Any

from ._config import RetryPolicy, validate_base_url
from ._errors import InvalidRequestError
from ._session import Session
from ._stream import ChatStream

__all__ = [
    "CHAT_OPTIONS",
    "SESSION_OPTIONS",
    "chat",
    "close_shared_sessions",
    "complete",
    "shared_session",
    "split_options",
]


def _parameters(function: Any, keyword_only: bool = False) -> frozenset[str]:
    """The parameter names of a plain function, read off its code (``inspect`` costs ms to import)."""
    code = function.__code__
    first = code.co_argcount if keyword_only else 1  # skip ``self``
    names = code.co_varnames[first : code.co_argcount + code.co_kwonlyargcount]
    return frozenset(name for name in names if not name.startswith("_"))


#: Options of :class:`Session` accepted by the module-level functions.
SESSION_OPTIONS = _parameters(Session.__init__)
#: Options of :meth:`Session.chat` (``timeout`` is one of them: it does not need its own session).
CHAT_OPTIONS = _parameters(Session.chat, keyword_only=True)

_sessions: dict[tuple[Any, ...], Session] = {}
_lock = threading.Lock()


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into ``(session_options, chat_options)``.

    :raises InvalidRequestError: an unknown option name.
    """
    unknown = set(options) - SESSION_OPTIONS - CHAT_OPTIONS
    if unknown:
        valid = ", ".join(sorted(SESSION_OPTIONS | CHAT_OPTIONS))
        raise InvalidRequestError(
            f"unknown option(s): {', '.join(sorted(unknown))}; valid options are: {valid}"
        )
    chat_options = {key: value for key, value in options.items() if key in CHAT_OPTIONS}
    session_options = {key: value for key, value in options.items() if key not in CHAT_OPTIONS}
    return session_options, chat_options


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(key).lower(), _freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    if isinstance(value, RetryPolicy):
        return (value, id(value.sleep))
    return value


def shared_session(**session_options: Any) -> Session:
    """The process-wide :class:`Session` for these settings (made on first use, then reused)."""
    options = dict(session_options)
    options["base_url"] = validate_base_url(options.get("base_url"))
    http = options.get("http")
    key = tuple(
        sorted(
            (name, ("id", id(value)) if name == "http" and http is not None else _freeze(value))
            for name, value in options.items()
        )
    )
    with _lock:
        session = _sessions.get(key)
        if session is None or session.closed:
            session = Session(**options)
            _sessions[key] = session
        return session


def close_shared_sessions() -> None:
    """Close every shared session (done at exit; call it to drop pooled connections sooner)."""
    with _lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for session in sessions:
        session.close()


atexit.register(close_shared_sessions)


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
    return shared_session(**session_options).chat(messages, **chat_options)


def complete(messages: Any, **options: Any) -> str:
    """Send a chat and return the whole reply as one str (same options as :func:`chat`)."""
    session_options, chat_options = split_options(options)
    return shared_session(**session_options).complete(messages, **chat_options)
