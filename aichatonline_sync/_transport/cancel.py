"""``Cancellation``: stop chats from another thread, at any stage (retry waits included)."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, Optional, Protocol

from .._wire.errors import APIConnectionError

__all__ = ["Cancellation"]


class _Abortable(Protocol):
    def abort(self) -> None: ...


class Cancellation:
    """A cancel signal shared by any number of chats: pass it as ``cancel=`` and call :meth:`cancel`
    from any thread to stop them.

    A cancelled chat raises: before its first piece an :class:`APIConnectionError` (not retried),
    after it an :class:`IncompleteStreamError` with the ``.partial`` text. It raises at once in a
    retry wait (no request is sent after it), while it waits for its first piece or for the token
    that another thread is fetching, and while its stream is read (the connection is shut down, so
    a read blocked in another thread returns at once). A chat started after :meth:`cancel` fails
    before it sends anything. A request still waiting for the reply's headers (the token request,
    or the chat before its status line) is not interrupted: it ends at its timeout, and the chat
    then raises without retrying.

    >>> cancel = Cancellation()                                     # doctest: +SKIP
    >>> threading.Timer(5, cancel.cancel).start()
    >>> for text in session.chat("Tell me a long story", cancel=cancel):
    ...     print(text, end="")

    A batch makes one for its chats: stopping the batch cancels it.
    """

    def __init__(self) -> None:
        #: Set once :meth:`cancel` was called.
        self.event = threading.Event()
        self._lock = threading.Lock()
        # Weak: a stream dropped unread must still be released by the garbage collector.
        self._open: weakref.WeakSet[_Abortable] = weakref.WeakSet()

    @property
    def cancelled(self) -> bool:
        """``True`` once :meth:`cancel` was called."""
        return self.event.is_set()

    def cancel(self) -> None:
        """Cancel every chat that uses this, now and later. Idempotent; any thread."""
        with self._lock:
            self.event.set()
            streams = list(self._open)
            self._open.clear()
        for stream in streams:
            stream.abort()

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if cancelled meanwhile; ``True`` when cancelled."""
        return self.event.wait(seconds)

    def error(self, what: str, url: Optional[str] = None) -> APIConnectionError:
        """The error a chat raises when it is cancelled before its first piece."""
        where = f" to {url}" if url else ""
        return APIConnectionError(
            f"{what}{where} was cancelled (Cancellation.cancel() was called)",
            url=url,
            retryable=False,
        )

    def check(self, what: str, url: Optional[str] = None) -> None:
        """Raise :meth:`error` if cancelled."""
        if self.cancelled:
            raise self.error(what, url)

    def sleeper(
        self, sleep: Callable[[float], None], what: str, url: Optional[str] = None
    ) -> Callable[[float], None]:
        """A retry wait that ends (and raises) when cancelled. A ``sleep`` other than
        :func:`time.sleep` (a test's) is kept, and the cancel is checked after it."""

        def wait(seconds: float) -> None:
            if sleep is time.sleep:
                self.wait(seconds)
            else:
                sleep(seconds)
            self.check(what, url)

        return wait

    def add(self, stream: _Abortable) -> None:
        """Abort ``stream`` when cancelled (at once, if that happened already)."""
        with self._lock:
            if not self.event.is_set():
                self._open.add(stream)
                return
        stream.abort()

    def discard(self, stream: _Abortable) -> None:
        """Forget ``stream`` (it ended)."""
        with self._lock:
            self._open.discard(stream)

    def __repr__(self) -> str:
        return f"<Cancellation {'cancelled' if self.cancelled else 'active'}>"
