"""``ChatStream``: the reply of one chat, as an iterator of text pieces."""

from __future__ import annotations

import logging
import operator
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import Callable, Optional

import requests

from ._errors import (
    AiChatOnlineError,
    APIConnectionError,
    APITimeoutError,
    IncompleteStreamError,
    ProtocolError,
    UpstreamError,
)
from ._parser import LineParser
from ._transport import DeadlineExceeded, iter_body, translate_exception

__all__ = ["ChatStream", "Reply"]

_FOLD_BLOCKS = 256  # fold the kept text after this many reads...
_FOLD_CHARS = 65536  # ... or this many characters (or 1/8 of the text, if more)

logger = logging.getLogger("aichatonline_sync")


class Reply:
    """The machinery of a :class:`ChatStream`: reading, parsing, keeping the text.

    Its generator holds it, but nothing here holds the generator or the ChatStream, so dropping
    the ChatStream closes the generator at once (no reference cycle waiting for the GC).
    """

    def __init__(
        self,
        response: requests.Response,
        *,
        url: str,
        deadline: Optional[float] = None,
        read_timeout: Optional[float] = None,
        max_line: int,
        keep_text: bool = True,
        secrets: Iterable[Optional[str]] = (),
    ) -> None:
        self._response = response
        self._url = url
        self._secrets = tuple(secrets)
        self._read_timeout = read_timeout
        self._body = iter_body(response, deadline=deadline, read_timeout=read_timeout)
        self._parser = LineParser(max_line)
        self._keep_text = keep_text
        self._pending: list[str] = []
        self._acc: Optional[str] = None
        self._text: Optional[str] = None
        self._batch: Optional[list[str]] = None
        self._position: Optional[Iterator[str]] = None
        self._first: list[str] = []
        self._finished = False
        self._released = False
        self._aborted = False  # set by a batch that stops: its failure is then not retried
        self._callbacks: list[Callable[[str], None]] = []

    def __del__(self) -> None:
        # Dropped before it was iterated (a started generator releases in its ``finally``).
        if not getattr(self, "_released", True):
            self._release()

    # -- the machinery --------------------------------------------------------------------------

    @property
    def text(self) -> str:
        if self._text is not None:
            return self._text
        done = (self._acc or "") + "".join(self._pending)
        batch, position = self._batch, self._position
        if batch is None or position is None:
            return done
        handed = len(batch) - operator.length_hint(position)  # of the batch being handed out
        return done + "".join(batch[:handed])

    def _prime(self) -> None:
        """Read until the first pieces have arrived (called by the session, inside its retries).

        :raises AiChatOnlineError: anything before the first piece (the stream is then closed).
        """
        try:
            batch = self._next_batch(started=False)
        except BaseException:
            self._release()
            raise
        if batch is None:  # pragma: no cover - _next_batch raises ProtocolError instead
            self._release()
            raise ProtocolError("the reply carried no text", body=self._parser.head)
        self._first = batch

    def _iterate(self) -> Generator[str, None, None]:
        try:
            batch: Optional[list[str]] = self._first
            self._first = []
            if not self._keep_text:
                while batch is not None:
                    yield from batch
                    batch = self._next_batch(started=True)
            else:
                # A batch (the pieces of one read) is handed out with ``yield from``, at C speed;
                # .text counts the pieces handed out of it by its iterator's position. Then the
                # batch is joined into one block, and the blocks fold into the kept text when
                # they are many or large (at least 1/8 of the text): ``acc += ...`` on a local
                # that nothing else holds grows the str in place on CPython (about 1.0x the text
                # in memory, no list of pieces plus a joined copy), and where it copies instead
                # (a tracer, coverage, another Python) the folds are few enough to stay linear.
                acc = ""
                pending = self._pending
                pending_chars = 0
                while batch is not None:
                    position = iter(batch)
                    self._batch, self._position = batch, position
                    yield from position
                    block = "".join(batch)
                    pending.append(block)
                    pending_chars += len(block)
                    self._batch = self._position = None
                    if len(pending) >= _FOLD_BLOCKS or pending_chars >= max(
                        _FOLD_CHARS, len(acc) >> 3
                    ):
                        self._acc = None  # it would pin the old str
                        acc += "".join(pending)
                        self._acc = acc
                        pending.clear()
                        pending_chars = 0
                    batch = self._next_batch(started=True)
                self._acc = None
                acc += "".join(pending)
                pending.clear()
                self._text = acc
            self._finished = True
            for callback in self._callbacks:
                callback(self.text)
        finally:
            self._release()

    def _next_batch(self, *, started: bool) -> Optional[list[str]]:
        """Read until at least one piece is complete; ``None`` at the normal end of the body."""
        parser = self._parser
        try:
            while True:
                if parser.error is not None:
                    raise self._upstream_error()
                data = next(self._body, None)
                if data is None:
                    tail = parser.close()
                    if tail:
                        return tail
                    if parser.error is not None:
                        raise self._upstream_error()
                    if parser.pieces == 0:
                        raise ProtocolError(
                            f"the reply from {self._url} is not a chat stream (no line carries "
                            f"data.message); it begins: {parser.head[:200]!r}",
                            body=parser.head,
                        )
                    return None
                pieces = parser.feed(data)
                if pieces:
                    return pieces
        except ProtocolError as exc:
            exc.partial = self.text
            raise
        except AiChatOnlineError:
            raise
        except Exception as exc:
            raise self._failure(exc, started) from exc

    def _upstream_error(self) -> UpstreamError:
        error = self._parser.error
        assert error is not None
        detail = f": {error.message}" if error.message else ""
        return UpstreamError(
            f"the upstream sent an error (code {error.code!r}){detail}",
            code=error.code,
            upstream_message=error.message,
            partial=self.text,
        )

    def _failure(self, exc: Exception, started: bool) -> AiChatOnlineError:
        translated = translate_exception(
            exc, url=self._url, secrets=self._secrets, timeout=self._read_timeout
        )
        if not started:
            if self._aborted:  # its socket was shut down on purpose: no retry, no warning
                return APIConnectionError(
                    f"the chat with {self._url} was aborted before its first piece "
                    "(its batch was stopped)",
                    url=self._url,
                    retryable=False,
                )
            return translated
        partial = self.text
        if isinstance(exc, DeadlineExceeded):
            reason = "the total deadline passed"
        elif isinstance(translated, APITimeoutError):
            reason = (
                f"no data for {self._read_timeout:g} s (read timeout)"
                if self._read_timeout
                else "timed out"
            )
        else:
            reason = "the connection broke"
        return IncompleteStreamError(
            f"the reply from {self._url} stopped after {len(partial)} characters: {reason} "
            f"({translated})",
            partial=partial,
        )

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._finished:
            return  # the body was read to its end: the connection is already back in the pool
        try:
            self._response.close()
        except Exception:
            logger.debug("error while closing a chat response", exc_info=True)


class ChatStream:
    """The reply of one chat: iterate it for the text pieces, in order, each as soon as it arrives.

    Exhausting it, :meth:`close`, leaving its ``with`` block, or an error releases the connection;
    so does dropping the last reference to it and to its iterator (for example ``break`` out of
    ``for text in aco.chat(...)``).
    After exhaustion :attr:`text` is the whole reply.

    >>> with session.chat("Hello") as stream:      # doctest: +SKIP
    ...     for piece in stream:
    ...         print(piece, end="")
    >>> stream.text                                 # doctest: +SKIP
    'Hello! ...'

    Not thread-safe: iterate one stream from one thread at a time.
    """

    def __init__(self, reply: Reply, *, conversation_id: str, model: str) -> None:
        self.conversation_id = conversation_id
        self.model = model
        self._reply = reply
        self._gen = self._reply._iterate()

    def __iter__(self) -> Iterator[str]:
        # The generator itself, so that a ``for`` loop runs at generator speed. It holds the
        # machinery but not this object: a loop over ``aco.chat(...)`` keeps the reply going,
        # and dropping the loop and the stream closes it at once.
        return self._gen

    def __next__(self) -> str:
        return next(self._gen)

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and release the connection. Idempotent."""
        self._gen.close()
        self._reply._release()

    def add_done_callback(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` once the reply has been read to its end (not on error or close).

        ``text`` is the whole reply (``""`` with ``keep_text=False``).
        """
        self._reply._callbacks.append(callback)

    @property
    def closed(self) -> bool:
        """``True`` once the stream is exhausted, closed, or failed."""
        return self._reply._released

    @property
    def text(self) -> str:
        """The text handed out so far; the whole reply once the stream is exhausted.

        ``""`` when the stream was made with ``keep_text=False``.
        """
        return self._reply.text

    @property
    def partial(self) -> str:
        """The text handed out so far (the same as :attr:`text` until the stream ends)."""
        return self._reply.text

    @property
    def _response(self) -> requests.Response:
        return self._reply._response

    def _prime(self) -> None:
        self._reply._prime()

    def __repr__(self) -> str:
        reply = self._reply
        state = "done" if reply._finished else ("closed" if reply._released else "open")
        return f"<ChatStream conversation_id={self.conversation_id!r} model={self.model!r} {state}>"

