"""``ChatStream``: the reply of one chat, as an iterator of text pieces; ``Reply``, its machinery."""

from __future__ import annotations

import io
import operator
import threading
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional

import requests

from .._transport.cancel import Cancellation
from .._transport.transport import (
    BodyTruncated,
    abort,
    iter_body,
    scrub,
    scrub_quote,
    translate_exception,
)
from .._wire import redact as _redact
from .._wire.errors import (
    AiChatOnlineError,
    IncompleteStreamError,
    ProtocolError,
    UpstreamError,
)
from .._wire.parser import LineParser

if TYPE_CHECKING:
    from .hooks import ChatCall
    from .usage import Usage

__all__ = ["ChatStream", "RecordedReply", "Reply", "StoredReply"]

logger = _redact.logger("aichatonline_sync")

#: Guards the first claim of a stream by its reading thread.
_READER_LOCK = threading.Lock()
#: Makes "finished" and the callbacks to call one step: a callback is called once, by the reader
#: or by the thread that adds it after the end, never both or neither.
_CALLBACK_LOCK = threading.Lock()

#: Why a stream closed by a thread other than its reader ended, in the words of its error.
_CLOSED = "the stream was closed"

_SECOND = operator.itemgetter(1)


class _KeptText:
    """The text handed out so far: each read's pieces joined into one block, small blocks folded
    into larger ones (so that many tiny pieces do not cost an object each), joined on demand."""

    _FOLD_BLOCKS = 256
    _FOLD_CHARS = 65536

    def __init__(self) -> None:
        self._folded: list[str] = []
        self._blocks: list[str] = []
        self._chars = 0

    def add(self, pieces: list[str]) -> None:
        block = "".join(pieces)
        self._blocks.append(block)
        self._chars += len(block)
        if len(self._blocks) >= self._FOLD_BLOCKS or self._chars >= self._FOLD_CHARS:
            self._folded.append("".join(self._blocks))
            self._blocks.clear()
            self._chars = 0

    def text(self) -> str:
        return "".join(self._folded) + "".join(self._blocks)

    def finish(self) -> str:
        """The whole text, kept as one str from now on."""
        self._folded.extend(self._blocks)
        self._blocks.clear()
        text = "".join(self._folded)
        self._folded = [text]
        return text


class Reply:
    """Reads one chat reply: the body's bytes to pieces, the kept text, and the connection's release.

    Its generator (:meth:`pieces`) holds it, but nothing here holds the generator or the
    :class:`ChatStream`: dropping the stream closes the generator at once (no reference cycle).
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
        cancel: Optional[Cancellation] = None,
    ) -> None:
        self._response = response
        self._url = url
        self._secrets = tuple(secrets)
        self._read_timeout = read_timeout
        self._body = iter_body(response, deadline=deadline, read_timeout=read_timeout, cancel=cancel)
        self._parser = LineParser(max_line)
        self._kept = _KeptText() if keep_text else None
        self._handed = 0  # characters handed out without keep_text (batches handed out whole)
        self._batch: Optional[list[str]] = None  # the pieces being handed out...
        self._position: Optional[Iterator[str]] = None  # ... and the iterator over them
        self._gate: Optional[list[None]] = None  # ... which hands out no more once it is cleared
        self._first: list[str] = []
        self._callbacks: list[Callable[[str], None]] = []
        self._cancel = cancel
        self._observer: Optional[ChatCall] = None
        self._error: Optional[BaseException] = None
        self.finished = False  #: read to its end
        self.released = False  #: the connection was released (at the end, on close or error)
        self.aborted = False  #: :meth:`abort` was called
        self.abort_reason: Optional[str] = None  #: why, when :meth:`abort` was given a reason
        if cancel is not None:
            cancel.add(self)

    def __del__(self) -> None:
        # Dropped before it was iterated (a started generator releases in its ``finally``).
        if not getattr(self, "released", True):
            self.release()

    @property
    def kept(self) -> bool:
        """Whether the text is kept (``keep_text``)."""
        return self._kept is not None

    @property
    def text(self) -> str:
        """The text handed out so far (``""`` without ``keep_text``)."""
        if self._kept is None:
            return ""
        done = self._kept.text()
        batch, position = self._batch, self._position
        if batch is None or position is None:
            return done
        handed = len(batch) - operator.length_hint(position)  # of the batch being handed out
        return done + "".join(batch[:handed])

    def prime(self) -> None:
        """Read until the first piece of text has arrived (the session does this inside its
        retries). Empty pieces before it (a stream may begin with ``""``) are kept for the user
        but read past, so that an error line after them is still one before any text: retried,
        and a rejected token still gets its fresh one.

        :raises AiChatOnlineError: anything before the first text (the reply is then released).
        """
        first: list[str] = []
        try:
            while True:
                batch = self._next_batch(started=False)
                if batch is None:
                    break
                first.extend(batch)
                if any(batch):
                    break
        except BaseException:
            self.release()
            raise
        self._first = first

    def pieces(self) -> Generator[str, None, None]:
        """The pieces, in order: those :meth:`prime` read first, then the rest as they arrive."""
        try:
            batch: Optional[list[str]] = self._first
            self._first = []
            kept = self._kept
            while batch is not None:
                # ``yield from`` hands a batch out at generator speed. An abort with a reason stops
                # it in one step, from any thread (:meth:`_stop_handing_out`); the reason is
                # checked after the batch is published, so a batch read just then is stopped too.
                if kept is None:
                    self._batch = batch  # cleared to stop: nothing counts what was handed out
                    if self.abort_reason is not None:
                        raise self.aborted_error()
                    yield from batch
                    self._handed += sum(map(len, batch))  # (for the messages of errors)
                else:
                    # :attr:`text` counts what was handed out of the batch by the position of its
                    # iterator, which the gate (consulted first) stops without moving.
                    position = iter(batch)
                    gate: list[None] = [None] * len(batch)
                    self._batch, self._position, self._gate = batch, position, gate
                    if self.abort_reason is not None:
                        raise self.aborted_error()
                    yield from map(_SECOND, zip(gate, position))
                    rest = operator.length_hint(position)
                    kept.add(batch[:-rest] if rest else batch)
                    self._batch = self._position = self._gate = None
                batch = self._next_batch(started=True)
            text = kept.finish() if kept is not None else ""
            with _CALLBACK_LOCK:
                self.finished = True
                callbacks, self._callbacks = self._callbacks, []
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.finished(text, kept=kept is not None)
            for callback in callbacks:
                callback(text)
        except AiChatOnlineError as exc:
            self._error = exc
            raise
        finally:
            self.release()

    def observe(self, observer: ChatCall) -> None:
        """Report the reply's end, failure, or early close to ``observer`` (once)."""
        self._observer = observer

    def add_done_callback(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` when the reply has been read to its end; at once if it was."""
        with _CALLBACK_LOCK:
            if not self.finished:
                self._callbacks.append(callback)
                return
        callback(self.text)

    def _next_batch(self, *, started: bool) -> Optional[list[str]]:
        """Read until at least one piece is complete; ``None`` at the normal end of the body."""
        if self.abort_reason is not None:  # even if the rest of the body is buffered already
            raise self.aborted_error()
        parser = self._parser
        try:
            while True:
                if parser.error is not None:
                    raise self._upstream_error()
                data = next(self._body, None)
                if data is None:
                    tail = parser.close()
                    if parser.cut_short:
                        raise BodyTruncated(
                            f"the body ended in the middle of a line ({parser.cut_short} bytes of it)"
                        )
                    break
                pieces = parser.feed(data)
                if pieces:
                    return pieces
        except UpstreamError:
            raise
        except Exception as exc:
            raise self._failure(exc, started) from exc
        if tail:
            return tail
        self._end()
        return None

    def _end(self) -> None:
        """The checks at the normal end of the body (outside :meth:`_failure`: their errors are
        complete as they are)."""
        parser = self._parser
        if parser.error is not None:
            raise self._upstream_error()
        if parser.pieces == 0:
            head = scrub_quote(parser.head, self._secrets)  # the upstream may echo the token
            raise ProtocolError(
                f"the reply from {self._url} is not a chat stream (no line carries "
                f"data.message); it begins: {head[:200]!r}",
                body=head,
            )

    def _upstream_error(self) -> UpstreamError:
        error = self._parser.error
        assert error is not None
        message = scrub(error.message, self._secrets)  # the upstream may echo the token
        detail = f": {message}" if message else ""
        return UpstreamError(
            f"the upstream sent an error (code {error.code!r}){detail}",
            code=error.code,
            upstream_message=message,
            partial=self.text,
        )

    def _failure(self, exc: Exception, started: bool) -> AiChatOnlineError:
        """What a failure of the body is to the user (:func:`translate_exception`): before the first
        piece, the error itself; after it, an IncompleteStreamError with the text so far."""
        return translate_exception(
            exc, url=self._url, stage="reply", secrets=self._secrets, timeout=self._read_timeout,
            stopped_after=self._handed_count() if started else None, partial=self.text,
            aborted=self.abort_reason or self.aborted,
        )

    def _handed_count(self) -> str:
        """How many characters were handed out, for a message (also without ``keep_text``)."""
        if self._kept is None:
            return f"{self._handed} characters (not kept)"
        return f"{len(self.text)} characters"

    def abort(self, reason: Optional[str] = None) -> None:
        """Stop the reply from any thread: a read blocked on it fails at once (see :meth:`ChatStream.abort`)."""
        if self.released:
            return
        if reason is not None and self.abort_reason is None:
            self.abort_reason = reason
        self.aborted = True
        if self.abort_reason is not None:
            self._stop_handing_out()
        abort(self._response)

    def _stop_handing_out(self) -> None:
        """Stop the batch being handed out after the piece the reader has (one atomic step, so
        safe against a reader running in another thread; :attr:`text` stays what it got)."""
        gate, batch = self._gate, self._batch
        if gate is not None:
            gate.clear()
        elif batch is not None and self._kept is None:
            batch.clear()

    def aborted_error(self) -> IncompleteStreamError:
        """The error of a reply aborted with a reason, for every later attempt to read it."""
        return IncompleteStreamError(
            f"the reply from {self._url} was closed after {self._handed_count()}: "
            f"{self.abort_reason}",
            partial=self.text,
        )

    def release(self) -> None:
        """Release the connection (idempotent). A body read to its end already went back to the pool."""
        if self.released:
            return
        self.released = True
        if self._parser.skipped:
            logger.debug("skipped %d reply lines that carry no message", self._parser.skipped)
        if self._cancel is not None:
            self._cancel.discard(self)
        observer, self._observer = self._observer, None
        if observer is not None:
            if self._error is not None:
                observer.failed(self._error)
            else:
                observer.closed()
        if self.finished:
            return
        try:
            self._response.close()
        except Exception:
            logger.debug("error while closing a chat response", exc_info=True)


class ChatStream:
    """The reply of one chat: iterate it for the text pieces, in order, each as soon as it arrives.

    Exhausting it, :meth:`close`, leaving its ``with`` block, or an error releases the connection;
    so does dropping the last reference to it and to its iterator (for example ``break`` out of
    ``for text in aco.chat(...)``). After exhaustion :attr:`text` is the whole reply.

    >>> with session.chat("Hello") as stream:      # doctest: +SKIP
    ...     for piece in stream:
    ...         print(piece, end="")
    >>> stream.text                                 # doctest: +SKIP
    'Hello! ...'

    Read a stream from one thread at a time. A ``for`` loop (``iter()``) belongs to the thread that
    began it: a loop of another thread, while that thread is alive and the stream open, raises
    :class:`AiChatOnlineError`; so does ``next()`` while another thread is inside a read (Python's
    own ``ValueError('generator already executing')`` is what a second reader would otherwise get,
    at random). ``next()`` from one thread after another (a thread pool's workers, in turn) is
    fine. :meth:`abort` and :meth:`close` may be called from any thread.
    """

    def __init__(
        self,
        reply: Reply,
        *,
        conversation_id: str,
        model: str,
        prompt: Optional[str] = None,
        call: Optional[ChatCall] = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.model = model
        self._reply = reply
        self._prompt = prompt
        self._call = call
        self._usage: Optional[Usage] = None
        if call is not None:
            reply.observe(call)
        self._gen = reply.pieces()
        self._reader: Optional[threading.Thread] = None  # the thread that iterates it
        # The thread that read last (began a loop, or called next()); at first the one that made it.
        self._last_reader = threading.get_ident()

    def __iter__(self) -> Iterator[str]:
        self._check_reader()
        # The generator itself, so that a ``for`` loop runs at generator speed. It holds the
        # machinery but not this object: dropping the loop and the stream closes it at once.
        return self._gen

    def __next__(self) -> str:
        self._check_aborted()
        try:
            piece = next(self._gen)
        except ValueError as exc:
            if type(exc) is ValueError and "already executing" in str(exc):
                raise self._busy() from None
            raise
        self._last_reader = threading.get_ident()  # (a refused read does not make a reader)
        return piece

    def _check_aborted(self) -> None:
        """A stream aborted with a reason raises it at once, every time it is iterated."""
        reply = self._reply
        if reply.abort_reason is not None and not reply.finished:
            if not getattr(self._gen, "gi_running", False):
                reply.release()
            raise reply.aborted_error()

    def _check_reader(self) -> None:
        """Refuse a loop of a second thread while the thread that loops over it is alive (a loop
        gets the bare generator, which no later check can guard)."""
        self._check_aborted()
        me = threading.current_thread()
        reader = self._reader
        if reader is None:
            with _READER_LOCK:
                if self._reader is None:
                    self._reader = me
                reader = self._reader
        if reader is me or self._reply.released or not reader.is_alive():
            self._reader = me
            self._last_reader = me.ident or 0
            return
        raise self._busy()

    def _busy(self) -> AiChatOnlineError:
        reader = self._reader
        by = f"the thread {reader.name!r}" if reader is not None else "another thread"
        return AiChatOnlineError(
            f"this ChatStream is being read by {by}; a stream is read by one thread at a time "
            "(to stop it from another thread, call its abort())"
        )

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
        """Stop reading and release the connection. Idempotent.

        From the thread that reads the stream (or made it, before any read), the stream just ends.
        From another thread, before the reply's end, it does what ``abort("the stream was
        closed")`` does: the reader's next read raises :class:`IncompleteStreamError` (``.partial``
        keeps the text it got), so a reply cut off never looks complete.
        """
        reply = self._reply
        if reply.finished or reply.released:
            return
        if threading.get_ident() != self._last_reader:
            self.abort(_CLOSED)
            return
        try:
            self._gen.close()
        except ValueError:  # 'generator already executing': another thread is inside a read
            self.abort(_CLOSED)
            return
        reply.release()

    def abort(self, reason: Optional[str] = None) -> None:
        """Stop the stream from any thread: a read blocked in another thread fails at once with
        :class:`IncompleteStreamError` (``.partial`` keeps the text so far). Idempotent.

        :param reason: why, in the words of the error. With a reason, every later attempt to
            iterate the stream raises that error at once (nothing more is handed out, not even
            the rest of pieces already read, and ``.partial`` is exactly the text handed out),
            and the connection is released at once unless a read runs in another thread.
        """
        reply = self._reply
        reply.abort(reason)
        if reason is not None and not getattr(self._gen, "gi_running", False):
            reply.release()

    def add_done_callback(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` once the reply has been read to its end (not on error or close);
        at once when it already was (as :meth:`concurrent.futures.Future.add_done_callback` does).

        ``text`` is the whole reply (``""`` with ``keep_text=False``).
        """
        self._reply.add_done_callback(callback)

    @property
    def closed(self) -> bool:
        """``True`` once the stream is exhausted, closed, or failed."""
        return self._reply.released

    @property
    def text(self) -> str:
        """The text handed out so far; the whole reply once the stream is exhausted.

        ``""`` when the stream was made with ``keep_text=False``.
        """
        return self._reply.text

    @property
    def usage(self) -> Optional[Usage]:
        """The token counts of the formatted prompt and of the reply, once the stream was read to
        its end (counted offline with the model's tokenizer at the first read of this property).

        ``None`` before the end, without the ``tokens`` extra, or with ``keep_text=False``.
        """
        reply = self._reply
        if self._usage is None and reply.finished and reply.kept and self._prompt is not None:
            if self._call is not None:
                self._usage = self._call.usage(reply.text)
            else:
                from .usage import usage_of

                self._usage = usage_of(self._prompt, reply.text, self.model)
        return self._usage

    @property
    def partial(self) -> str:
        """The text handed out so far (the same as :attr:`text` until the stream ends)."""
        return self._reply.text

    def __repr__(self) -> str:
        reply = self._reply
        state = "done" if reply.finished else ("closed" if reply.released else "open")
        return f"<ChatStream conversation_id={self.conversation_id!r} model={self.model!r} {state}>"

    @property
    def cached(self) -> bool:
        """``True`` when the reply came from the session's reply cache (nothing was sent)."""
        return isinstance(self._reply, StoredReply)

    def __reduce__(self) -> Any:
        # pickle would read the whole body through requests (waiting for the server, then a
        # requests exception): say at once what can be kept instead.
        raise TypeError("a ChatStream cannot be pickled (it is a live connection): keep its .text")


class RecordedReply(Reply):
    """A reply read from the network that also keeps every piece the body gave, in order, as
    :attr:`recorded` (for a reply cache to store once the reply was read to its end)."""

    def __init__(self, response: requests.Response, **options: Any) -> None:
        super().__init__(response, **options)
        self.recorded: list[str] = []

    def _next_batch(self, *, started: bool) -> Optional[list[str]]:
        batch = super()._next_batch(started=started)
        if batch is not None:
            self.recorded.extend(batch)
        return batch


class StoredReply(Reply):
    """A reply replayed from a reply cache: the stored pieces, handed out as a network reply's
    are (the same iteration, text, abort, close and done callbacks), with no connection.

    An empty response stands in for the connection, so that releasing and aborting it need no
    case of their own.
    """

    def __init__(
        self,
        pieces: list[str],
        *,
        url: str,
        keep_text: bool = True,
        cancel: Optional[Cancellation] = None,
    ) -> None:
        response = requests.Response()
        response.raw = io.BytesIO()
        super().__init__(response, url=url, max_line=1, keep_text=keep_text, cancel=cancel)
        self._first = list(pieces)

    def _next_batch(self, *, started: bool) -> Optional[list[str]]:
        """Every piece is handed out in the first batch: the end follows it, unless the reply was
        aborted meanwhile (as a network reply's next read would fail)."""
        if self.abort_reason is not None:
            raise self.aborted_error()
        if self.aborted:
            raise self._failure(ConnectionAbortedError("aborted"), started)
        return None
