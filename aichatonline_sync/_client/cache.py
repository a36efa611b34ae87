"""``ReplyCache``: finished replies in a SQLite file, keyed by the model and the formatted prompt.

A :class:`~._session.Session` made with ``cache=`` looks every chat up here before it sends
anything; a hit is replayed as a :class:`~._stream.ChatStream` of the stored pieces, and a miss is
stored once it was read to its end. The file is shared safely by the threads of a process and by
processes: it is in WAL mode (readers never wait for the writer), SQLite lets one writer at a time
in and makes the others wait (``busy_timeout``), and every write is one transaction.

What is in the file: one table ``replies`` (``key``, ``model``, ``pieces`` as JSON text,
``created`` in Unix seconds), ``PRAGMA application_id`` = :data:`APPLICATION_ID` (what tells our
file from any other SQLite file) and ``PRAGMA user_version`` = :data:`SCHEMA_VERSION`.
Entries never expire on their own: :meth:`ReplyCache.clear` (``older_than=``) and
``aichatonline cache clear`` remove them.

This module imports :mod:`sqlite3`: only a session given ``cache=`` (or ``ReplyCache`` itself)
loads it, so ``import aichatonline_sync`` does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Optional, Union

from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError, InvalidRequestError
from .config import is_number

__all__ = [
    "APPLICATION_ID",
    "KEY_VERSION",
    "SCHEMA_VERSION",
    "CacheStats",
    "ReplyCache",
    "cache_key",
    "resolve_cache",
    "shared_cache",
]

logger = _redact.logger("aichatonline_sync")

#: ``PRAGMA application_id`` of a reply cache ("ACOc"): a SQLite file without it is not ours.
APPLICATION_ID = 0x41434F63
#: ``PRAGMA user_version``: the layout of the table.
SCHEMA_VERSION = 1
#: Part of every key: a change of what a key means (the prompt's formatting) starts afresh.
KEY_VERSION = 1
#: How long a writer waits for another one (another thread or process) before giving up.
BUSY_TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    pieces TEXT NOT NULL,
    created REAL NOT NULL
)
"""

PathTypes = Union[str, "os.PathLike[str]"]


def cache_key(model: str, prompt: str) -> str:
    """The key of a reply: a SHA-256 of the key version, the model and the formatted prompt
    (never the conversation id or the token, which change from chat to chat)."""
    data = json.dumps([KEY_VERSION, model, prompt]).encode("ascii")
    return hashlib.sha256(data).hexdigest()


class CacheStats:
    """What :meth:`ReplyCache.stats` reports: ``entries``, ``size`` (bytes of the file and its
    WAL), ``oldest`` and ``newest`` (Unix seconds, ``None`` when empty)."""

    __slots__ = ("entries", "newest", "oldest", "size")

    def __init__(
        self, entries: int, size: int, oldest: Optional[float], newest: Optional[float]
    ) -> None:
        self.entries = entries
        self.size = size
        self.oldest = oldest
        self.newest = newest

    def __repr__(self) -> str:
        return (
            f"CacheStats(entries={self.entries}, size={self.size}, oldest={self.oldest}, "
            f"newest={self.newest})"
        )


class ReplyCache:
    """A SQLite file of finished replies, keyed by the model and the formatted prompt.

    >>> with ReplyCache("replies.sqlite") as cache:          # doctest: +SKIP
    ...     with Session(cache=cache) as s:
    ...         s.complete("Hello")        # sent, and stored once read to its end
    ...         s.complete("Hello")        # replayed from the file: nothing is sent
    ...     len(cache)
    1

    Safe across the threads of a process and across processes. Opening checks the file: one that
    is not SQLite, or a SQLite file of another program, is an :class:`InvalidRequestError` naming
    it, raised here rather than in the middle of a chat. A failed write (a full disk, a read-only
    file) loses nothing but the entry: it is logged as a warning and the reply goes on.

    :param path: the file (made when missing; its directory must exist).
    :raises InvalidRequestError: the file cannot be opened, or is not a reply cache.
    """

    def __init__(self, path: PathTypes) -> None:
        if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
            raise InvalidRequestError(
                f"cache must be None, a path (str or os.PathLike) or a ReplyCache, "
                f"not {type(path).__name__}"
            )
        self.path = os.fspath(path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise InvalidRequestError(f"cache must be a path of a file, not {path!r}")
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._db = _open(self.path)

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. Idempotent; a session using the cache then sends every chat."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ReplyCache {self.path!r}{state}>"

    def __reduce__(self) -> Any:
        # Another process (a batch's process pool) opens the same file, once per process.
        return (shared_cache, (self.path,))

    def _database(self) -> sqlite3.Connection:
        """The connection, opened again in a child process (a SQLite connection must not cross
        a fork). Call with the lock held."""
        if self._closed:
            raise AiChatOnlineError(f"the reply cache {self.path!r} is closed")
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._db = _open(self.path)
        return self._db

    # -- entries ----------------------------------------------------------------------------------

    def get(self, model: str, prompt: str) -> Optional[list[str]]:
        """The stored pieces of the reply to ``prompt`` (formatted) from ``model``, or ``None``.

        A read that fails (a closed cache, an unreadable entry) is a miss, logged; it never raises.
        """
        key = cache_key(model, prompt)
        try:
            with self._lock:
                row = self._database().execute(
                    "SELECT pieces FROM replies WHERE key = ?", (key,)
                ).fetchone()
            if row is None:
                return None
            pieces = json.loads(row[0])
            if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
                raise ValueError("the stored pieces are not a list of str")
        except (sqlite3.Error, ValueError, AiChatOnlineError) as exc:
            logger.warning("reply cache %r: cannot read an entry (%s); sending the chat", self.path, exc)
            return None
        return pieces

    def put(self, model: str, prompt: str, pieces: list[str]) -> bool:
        """Store the pieces of a finished reply (replacing an older entry for the same key).

        :returns: whether it was stored; a failure (a full disk, a read-only file, a closed cache)
            is logged as a warning, never raised: the reply itself is not lost.
        """
        data = json.dumps(pieces)  # ASCII, so any str, even a lone surrogate, is stored as it is
        try:
            with self._lock:
                self._database().execute(
                    "INSERT OR REPLACE INTO replies (key, model, pieces, created) VALUES (?, ?, ?, ?)",
                    (cache_key(model, prompt), model, data, time.time()),
                )
        except (sqlite3.Error, AiChatOnlineError) as exc:
            logger.warning("reply cache %r: the reply was not stored (%s)", self.path, exc)
            return False
        return True

    def __bool__(self) -> bool:  # an empty cache is a cache, and ``if cache:`` runs no query
        return True

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite's errors said as ours."""
        with self._lock:
            try:
                yield self._database()
            except sqlite3.Error as exc:
                raise AiChatOnlineError(
                    f"the reply cache {self.path!r} cannot be used: {exc} (a damaged file? "
                    "delete it; chats go on without it)"
                ) from exc

    def __len__(self) -> int:
        with self._reading() as db:
            row = db.execute("SELECT count(*) FROM replies").fetchone()
        return int(row[0])

    def clear(self, older_than: Optional[float] = None) -> int:
        """Remove entries: all of them, or those stored more than ``older_than`` seconds ago.

        The file shrinks when nobody else is using it at that moment (``VACUUM``).

        :returns: how many entries were removed.
        :raises InvalidRequestError: ``older_than`` is not a number of seconds >= 0.
        """
        if older_than is not None and (
            not is_number(older_than)
            or not math.isfinite(older_than)
            or older_than < 0
        ):
            raise InvalidRequestError(
                f"older_than must be None or a number of seconds >= 0, not {older_than!r}"
            )
        with self._reading() as db:
            if older_than is None:
                removed = db.execute("DELETE FROM replies").rowcount
            else:
                cutoff = time.time() - older_than
                removed = db.execute("DELETE FROM replies WHERE created < ?", (cutoff,)).rowcount
            try:
                db.execute("VACUUM")
            except sqlite3.OperationalError as exc:  # another connection is reading or writing
                logger.debug("reply cache %r: not vacuumed (%s)", self.path, exc)
        return int(removed)

    def stats(self) -> CacheStats:
        """How many entries, how many bytes on disk, and the oldest and newest entry's time."""
        with self._reading() as db:
            count, oldest, newest = db.execute(
                "SELECT count(*), min(created), max(created) FROM replies"
            ).fetchone()
        size = sum(
            os.path.getsize(name)
            for name in (self.path, f"{self.path}-wal")
            if os.path.exists(name)
        )
        return CacheStats(int(count), size, oldest, newest)


def _open(path: str) -> sqlite3.Connection:
    """Open ``path`` as a reply cache, making the table in a new or empty file.

    :raises InvalidRequestError: the file cannot be opened, is not SQLite, or is another
        program's SQLite file (which is then left untouched).
    """
    try:
        # Autocommit (each statement its own transaction); one connection shared by the threads,
        # which the cache's lock takes in turn.
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise InvalidRequestError(
            f"cannot open the reply cache {path!r}: {exc} (does its directory exist?)"
        ) from None
    try:
        if not _is_ours(db, path):
            # A new or empty file: made ours in one transaction, which a second process making
            # it at the same moment waits for (and then finds it made).
            db.execute("BEGIN IMMEDIATE")
            try:
                if not _is_ours(db, path):
                    db.execute(_SCHEMA)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable at each checkpoint, never corrupt
    except sqlite3.DatabaseError as exc:
        db.close()
        if "readonly" in str(exc):
            raise InvalidRequestError(
                f"the reply cache {path!r} cannot be written ({exc}): a reply cache needs to "
                "write the file and, beside it, its -wal and -shm files; give a path in a "
                "writable folder"
            ) from None
        if isinstance(exc, sqlite3.OperationalError):
            reason = f"cannot use it: {exc}"
        else:
            reason = f"it is not a reply cache ({exc})"
        raise InvalidRequestError(
            f"the reply cache {path!r}: {reason}; give another path, or delete the file if it "
            "is an old cache"
        ) from None
    except InvalidRequestError:
        db.close()
        raise
    return db


def _is_ours(db: sqlite3.Connection, path: str) -> bool:
    """``True`` for our file, ``False`` for an empty one; raises for anything else."""
    # One statement, so one snapshot: read apart, a file another process makes between two reads
    # would show its tables with a marker read before it was set.
    application_id, version, tables = db.execute(
        "SELECT (SELECT application_id FROM pragma_application_id),"
        " (SELECT user_version FROM pragma_user_version),"
        " (SELECT count(*) FROM sqlite_master)"
    ).fetchone()
    if application_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise InvalidRequestError(
                f"the reply cache {path!r} was made by a newer aichatonline-sync (schema "
                f"{version}, this one reads {SCHEMA_VERSION}); upgrade, or give another path"
            )
        return True
    if application_id == 0 and version == 0 and tables == 0:
        return False
    raise InvalidRequestError(
        f"the reply cache {path!r} is a SQLite file of another program (application_id "
        f"{application_id:#x}, {tables} schema objects), not a reply cache of aichatonline-sync; "
        "give another path"
    )


_SHARED: dict[tuple[int, str], ReplyCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(path: PathTypes) -> ReplyCache:
    """The process's one :class:`ReplyCache` for ``path`` (what ``Session(cache=path)`` uses:
    sessions of one process share its connection). Made on first use, again after a close.

    :raises InvalidRequestError: as :class:`ReplyCache` does.
    """
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        return ReplyCache(path)
    if "\0" in os.fspath(path):  # Python 3.9's realpath takes a NUL, and sqlite3 then refuses it
        raise InvalidRequestError(f"cache: not a usable path (embedded null byte): {path!r}")
    try:
        key = (os.getpid(), os.path.realpath(os.fspath(path)))
    except ValueError as exc:
        raise InvalidRequestError(f"cache: not a usable path ({exc}): {path!r}") from None
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None or cache.closed:
            cache = _SHARED[key] = ReplyCache(path)
        return cache


def resolve_cache(value: Any) -> Optional[ReplyCache]:
    """The ``cache=`` option of a :class:`Session`: ``None``, a path, or a :class:`ReplyCache`.

    :raises InvalidRequestError: another type, or a file that is not a reply cache.
    """
    if value is None or isinstance(value, ReplyCache):
        return value
    return shared_cache(value)
