"""The one redaction point: the secrets this process's sessions know, kept out of every output.

A session remembers its proxy password when it is made and every token it is issued
(:func:`remember`). From then on they are masked (``***``) in everything that leaves the library:

- every log record of the package's loggers (:class:`RedactingFilter`, on each of them: a filter
  on a parent logger does not see the records of its children), its arguments, exception text and
  stack included;
- the message and every text attribute of an :class:`~.errors.AiChatOnlineError` (its
  constructor and ``__setattr__`` call :func:`scrub`);
- every warning the library issues (:func:`warn`).

The registry is process-wide, not per session: a secret echoed into an error of one session is
still a secret when another session logs it. It keeps the newest :data:`MAX_SECRETS`, so that a
long-running process issuing a token per chat does not grow without end; it is guarded by a lock,
and :func:`scrub` reads an immutable snapshot, so no reader ever sees it half-updated.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Iterable
from typing import Optional

__all__ = [
    "LOGGERS",
    "MAX_SECRETS",
    "RedactingFilter",
    "redact_url",
    "logger",
    "mask_chain",
    "remember",
    "scrub",
    "scrub_quote",
    "warn",
]

#: How many tokens are remembered (the most recently used ones).
MAX_SECRETS = 1024
#: A remembered secret shorter than this is not masked in free text (log lines, error messages
#: of other sessions): masking a few characters everywhere would garble them. A session still
#: masks its own shorter secrets (down to :data:`_EXPLICIT_MIN`) in the errors it builds, and a
#: password of any length in URLs (``redact_url``).
_MIN_LENGTH = 8
_EXPLICIT_MIN = 3
_MASK = "***"

_lock = threading.Lock()
_tokens: dict[str, None] = {}  # least recently used first; written under _lock
_pinned: set[str] = set()  # passwords: never evicted (a handful per process); under _lock
_snapshot: tuple[str, ...] = ()  # what scrub() reads: replaced whole, never changed in place


def remember(*secrets: Optional[str], pin: bool = False) -> None:
    """Mask these secrets in every later output of the library (``None`` and short ones ignored).

    Tokens are kept while they are among the :data:`MAX_SECRETS` most recently remembered (a
    token in use is remembered again at each chat); ``pin=True`` (passwords) keeps a secret for
    the life of the process.
    """
    global _snapshot
    given = [s for s in secrets if isinstance(s, str) and len(s) >= _MIN_LENGTH]
    if not given:
        return
    with _lock:
        changed = False
        for secret in given:
            if pin:
                changed |= secret not in _pinned
                _pinned.add(secret)
            elif secret in _tokens:
                _tokens[secret] = _tokens.pop(secret)  # now the most recently used
            else:
                _tokens[secret] = None
                changed = True
        while len(_tokens) > MAX_SECRETS:
            del _tokens[next(iter(_tokens))]
        if changed:  # scrub() depends on the set only, not on the order of use
            # Longest first: a secret that contains another is masked whole.
            _snapshot = tuple(sorted(_pinned.union(_tokens), key=len, reverse=True))


def _all(extra: Iterable[Optional[str]]) -> tuple[str, ...]:
    given = tuple(s for s in extra if isinstance(s, str) and len(s) >= _EXPLICIT_MIN)
    return (*given, *_snapshot) if given else _snapshot


def scrub(text: str, extra: Iterable[Optional[str]] = ()) -> str:
    """``text`` with every remembered secret (and every one of ``extra``) masked."""
    for secret in _all(extra):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def scrub_quote(text: str, extra: Iterable[Optional[str]] = ()) -> str:
    """:func:`scrub` for the start of a body cut at some length: the beginning of a secret left
    at the cut end is masked too (of 3 characters or more for a secret in ``extra``, the
    session's own; of :data:`_MIN_LENGTH` for the others, which a few characters would match by
    chance)."""
    given = tuple(s for s in extra if isinstance(s, str) and len(s) >= _EXPLICIT_MIN)
    text = scrub(text, given)
    for secrets, least in ((given, _EXPLICIT_MIN), (_snapshot, _MIN_LENGTH)):
        for secret in secrets:
            for size in range(min(len(secret) - 1, len(text)), least - 1, -1):
                if text.endswith(secret[:size]):
                    return text[:-size] + _MASK
    return text


def mask_chain(exc: BaseException) -> None:
    """Mask the secrets in ``exc`` and every exception it holds (``__cause__``,
    ``__context__``, exceptions among its ``args``), in place: the foreign exceptions the library
    keeps as ``__cause__`` of its own are printed in every traceback."""
    if not _snapshot:
        return
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        args = tuple(scrub(a) if isinstance(a, str) else a for a in item.args)
        if args != item.args:
            item.args = args
        for name in ("strerror", "filename", "msg", "reason"):  # what OSError & co. print
            value = getattr(item, name, None)
            if isinstance(value, str) and scrub(value) != value:
                with contextlib.suppress(AttributeError, TypeError):  # a read-only attribute
                    setattr(item, name, scrub(value))
        inner = [*item.args, getattr(item, "reason", None), item.__cause__, item.__context__]
        todo.extend(x for x in inner if isinstance(x, BaseException))


class RedactingFilter(logging.Filter):
    """Masks the remembered secrets in a record: its message (arguments merged in), its exception
    text and its stack. Formatters reuse ``exc_text`` when it is set, so the traceback they print
    is the masked one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _snapshot:
            return True
        message = record.getMessage()
        masked = scrub(message)
        if masked != message:  # a record without secrets keeps its arguments for handlers
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            masked = scrub(record.exc_text)
            if masked != record.exc_text:
                # A formatter that formats exc_info itself (JSON loggers, Sentry) would print
                # the secret: only the masked text is left to it.
                record.exc_text, record.exc_info = masked, None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_FILTER = RedactingFilter()
#: Every logger of the package. Each gets the filter when this module is first imported (by
#: the package's ``__init__``), so that a record is masked even when it is logged through a
#: logger whose module was not imported yet (``logging.getLogger("aichatonline_sync.gateway")``).
LOGGERS = ("aichatonline_sync", "aichatonline_sync.gateway", "aichatonline_sync.testing")


def logger(name: str = "aichatonline_sync") -> logging.Logger:
    """The package's logger ``name`` (one of :data:`LOGGERS`), with the redacting filter on it."""
    if name not in LOGGERS:
        raise ValueError(f"{name!r} is not one of the package's loggers: add it to LOGGERS")
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log


for _name in LOGGERS:
    logger(_name)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue a warning, masked, attributed to the first caller outside this package (the user's
    line, as ``skip_file_prefixes`` does on Python 3.12)."""
    level = 2  # 1 is this function; 2 its caller
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    del frame
    warnings.warn(scrub(message), category, stacklevel=level)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs, reprs and messages).

    Works on the raw text, so a password with ``/``, ``#``, ``?`` or ``@`` in it is hidden too.

    >>> redact_url("http://user:secret@proxy:3128")
    'http://user:***@proxy:3128'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return url
    userinfo, hostpart = rest[:at], rest[at + 1 :]
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url  # a user name alone is no secret
    hidden = f"{user}:***" if user else "***"
    return f"{scheme}{sep}{hidden}@{hostpart}"
