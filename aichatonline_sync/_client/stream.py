"""``ChatStream``: the reply of one chat, as an iterator of text pieces; ``Reply``, its machinery."""

from __future__ import annotations

import enum
import io
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from threading import get_ident
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

#: Why a stream closed by a thread other than its reader ended, in the words of its error.
_CLOSED = "the stream was closed"



class State(enum.Enum):
    """Where a :class:`Reply` is. It moves only forward, from ``OPEN`` to one of the others."""

    OPEN = "open"  #: pieces may still be handed out
    DONE = "done"  #: read to its normal end
    FAILED = "failed"  #: a read raised (the error is kept)
    CLOSED = "closed"  #: closed or aborted before its end


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

    Its mutable state is guarded by one lock, so that :meth:`abort`, :meth:`release` and
    :attr:`text` may run in any thread while one thread reads. The lock is never held across a
    read of the body, a hook or a callback. The one exception is the handing out of a batch's
    pieces: they wait in a :class:`collections.deque`, whose ``popleft`` and ``pop`` are atomic
    by its documented contract, so a piece costs no lock; whoever ends the batch drains the rest
    from the other end under the lock, and every piece is then taken exactly once, by a reader
    or by the drain, the readers' pieces being a prefix of the batch. Nothing here holds the :class:`ChatStream`: dropping
    the stream releases the reply at once (no reference cycle).
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
        self._lock = threading.Lock()
        self._response = response
        self._url = url
        self._secrets = tuple(secrets)
        self._read_timeout = read_timeout
        self._body = iter_body(response, deadline=deadline, read_timeout=read_timeout, cancel=cancel)
        self._parser = LineParser(max_line)
        self._kept = _KeptText() if keep_text else None
        self._handed = 0  # characters handed out and settled, without keep_text
        # The batch being handed out and the pieces of it not yet handed out (its tail):
        # text = kept + batch[: len(batch) - len(pieces)].
        self._batch: list[str] = []
        self._pieces: deque[str] = deque()
        self._state = State.OPEN
        self._released = False
        #: The thread inside a read of the body (the lock is not held then), or ``None``.
        self.reader: Optional[threading.Thread] = None
        #: The ident of the thread that read last (at first the one that made the reply).
        self.last_reader = get_ident()
        self._callbacks: list[Callable[[str], None]] = []
        self._cancel = cancel
        self._observer: Optional[ChatCall] = None
        self._error: Optional[BaseException] = None
        self.aborted = False  #: :meth:`abort` was called
        self.abort_reason: Optional[str] = None  #: why, when :meth:`abort` was given a reason
        if cancel is not None:
            cancel.add(self)

    def __del__(self) -> None:
        # A reply dropped before its end (its stream dropped) still closes its connection.
        if not getattr(self, "_released", True):
            self.release()

    @property
    def state(self) -> State:
        """Where the reply is (:class:`State`)."""
        return self._state

    @property
    def finished(self) -> bool:
        """Read to its end."""
        return self._state is State.DONE

    @property
    def released(self) -> bool:
        """The connection was released (at the end, on close or on error)."""
        return self._released

    @property
    def kept(self) -> bool:
        """Whether the text is kept (``keep_text``)."""
        return self._kept is not None

    @property
    def text(self) -> str:
        """The text handed out so far (``""`` without ``keep_text``)."""
        with self._lock:
            return self._text_locked()

    def _text_locked(self) -> str:
        if self._kept is None:
            return ""
        batch = self._batch
        return self._kept.text() + "".join(batch[: len(batch) - len(self._pieces)])

    def _hand_out_locked(self, batch: list[str]) -> None:
        self._batch = batch
        self._pieces = deque(batch)

    def _settle_locked(self) -> None:
        """Move what was handed out of the batch into the kept text; drop the rest of the batch."""
        pieces, rest = self._pieces, 0
        try:
            while True:
                pieces.pop()  # from the tail, while readers may still take from the head
                rest += 1
        except IndexError:
            pass
        handed = self._batch[: len(self._batch) - rest]
        if handed:
            if self._kept is not None:
                self._kept.add(handed)
            else:
                self._handed += sum(map(len, handed))
        self._batch = []

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
        with self._lock:
            self._hand_out_locked(first)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        """The next piece, read from the body when the batch is handed out.

        :raises StopIteration: at the end, and ever after the reply ended.
        :raises AiChatOnlineError: another thread is inside a read (``busy``), the reply was
            aborted with a reason, or the body failed.
        """
        # Without the lock only for the thread that read last: another thread's first piece is
        # taken under the lock with ``last_reader``, so that :meth:`close` sees whose it was.
        if self.last_reader == get_ident():
            try:
                return self._pieces.popleft()
            except IndexError:
                pass  # read outside this block: the IndexError must not become a failure's context
        return self._read()

    def _read(self) -> str:
        """The batch is handed out: read the next one and hand out its first piece."""
        with self._lock:
            try:
                piece = self._pieces.popleft()  # a batch another thread read meanwhile
            except IndexError:
                pass
            else:
                self.last_reader = get_ident()
                return piece
            refusal, busy_with = self._refusal_locked(), self.reader
            if refusal is None:
                self._settle_locked()
                self.reader = threading.current_thread()
                self.last_reader = get_ident()
        if refusal is not None:
            return self._refuse(refusal, busy_with)
        try:
            batch = self._next_batch(started=True)
            while batch is not None and not batch:
                batch = self._next_batch(started=True)
        except BaseException as exc:
            with self._lock:
                self.reader = None
                if isinstance(exc, AiChatOnlineError):
                    self._error = exc
            self.release()
            raise
        if batch is None:
            self._finish()
            raise StopIteration
        with self._lock:
            self.reader = None
            if self.abort_reason is None and not self._released:
                # The first piece is taken before the rest is published: no other thread's
                # popleft can take it from under this read.
                pieces = deque(batch)
                piece = pieces.popleft()
                self._batch, self._pieces = batch, pieces
                self.last_reader = get_ident()
                return piece
            # Aborted with a reason while this read ran: what it read is not handed out, and the
            # error is recorded in this same hold of the lock, so that a release by another
            # thread in between reports this error (one object for chat_error and every read).
            error: Optional[BaseException] = None
            if self.abort_reason is not None:
                if self._error is None:
                    self._error = self._aborted_error_locked()
                error = self._error
        if error is None:
            raise StopIteration
        self.release()
        raise error

    def _refusal_locked(self) -> Optional[str]:
        """Why no read may start now (``None``: it may)."""
        if self._state is State.DONE:
            return "ended"
        if self.abort_reason is not None:
            return "aborted"
        if self.reader is not None:
            return "busy"
        if self._released:
            return "ended"
        return None

    def _refuse(self, refusal: str, reader: Optional[threading.Thread]) -> str:
        if refusal == "busy":
            raise busy_error(reader)
        if refusal == "aborted":
            raise self.aborted_failure()
        raise StopIteration

    def _finish(self) -> None:
        """The normal end: the kept text becomes one str, then the observer and the callbacks."""
        try:
            with self._lock:
                self.reader = None
                if self.abort_reason is not None:
                    # Aborted with a reason while the last read ran: the end is not handed out.
                    error = self._error = self._aborted_error_locked()
                    raise error
                text = self._kept.finish() if self._kept is not None else ""
                self._state = State.DONE
                callbacks, self._callbacks = self._callbacks, []
                observer, self._observer = self._observer, None
            if observer is not None:
                observer.finished(text, kept=self._kept is not None)
            for callback in callbacks:
                callback(text)
        finally:
            self.release()

    def observe(self, observer: ChatCall) -> None:
        """Report the reply's end, failure, or early close to ``observer`` (once)."""
        with self._lock:
            self._observer = observer

    def add_done_callback(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` when the reply has been read to its end; at once if it was."""
        with self._lock:
            if self._state is not State.DONE:
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
        with self._lock:
            return self._handed_count_locked()

    def _handed_count_locked(self) -> str:
        if self._kept is not None:
            return f"{len(self._text_locked())} characters"
        batch = self._batch
        handed = self._handed + sum(map(len, batch[: len(batch) - len(self._pieces)]))
        return f"{handed} characters (not kept)"

    def abort(self, reason: Optional[str] = None) -> None:
        """Stop the reply from any thread: a read blocked on it fails at once (see :meth:`ChatStream.abort`).

        With a reason, nothing more is handed out, not even the rest of the batch being handed out.
        """
        with self._lock:
            if self._released:
                return
            if reason is not None and self.abort_reason is None:
                self.abort_reason = reason
                self._settle_locked()
            self.aborted = True
        abort(self._response)

    def release_if_idle(self) -> None:
        """:meth:`release`, unless a thread is inside a read (that read fails and releases)."""
        with self._lock:
            if self.reader is not None:
                return
        # No read can begin now: one begins only under the lock, and refuses an aborted reply.
        self.release()

    def aborted_error(self) -> IncompleteStreamError:
        """The error of a reply aborted with a reason, for every later attempt to read it."""
        with self._lock:
            return self._aborted_error_locked()

    def aborted_failure(self) -> BaseException:
        """What a read of a reply aborted with a reason raises: the reply is released unless a
        read runs, and the error is the one its chat ended with (the one ``chat_error`` carried)."""
        self.release_if_idle()
        with self._lock:
            error = self._error if self._error is not None else self._aborted_error_locked()
        # Raised again at each read: its traceback is reset so that it does not grow each time
        # (a hook that kept the error sees the traceback of the latest raise).
        return error.with_traceback(None)

    def _aborted_error_locked(self) -> IncompleteStreamError:
        return IncompleteStreamError(
            f"the reply from {self._url} was closed after {self._handed_count_locked()}: "
            f"{self.abort_reason}",
            partial=self._text_locked(),
        )

    def release(self) -> None:
        """Release the connection, once: later calls do nothing. A body read to its end already
        went back to the pool."""
        with self._lock:
            if self._released:
                return
            observer = self._release_locked()
        self._released_now(observer)

    def close_by_reader(self) -> bool:
        """Release the reply if the calling thread read it last and no read runs now (whether it
        did and the release are one step: no other thread can take a piece in between).

        :returns: ``False`` when another thread read last or a read runs now (the caller then
            aborts); ``True`` when it released the reply, or the reply was released or ended
            already.
        """
        with self._lock:
            if self._released or self._state is State.DONE:
                return True
            if self.last_reader != get_ident() or self.reader is not None:
                return False
            observer = self._release_locked()
        self._released_now(observer)
        return True

    def _release_locked(self) -> Optional[ChatCall]:
        """Mark the reply released and its end state; the observer to tell, outside the lock."""
        self._released = True
        self._settle_locked()
        if self._state is State.OPEN:
            # An abort with a reason is the reply's failure however it lands: inside a read
            # (that read raises it) or between reads (the next read would).
            if self._error is None and self.abort_reason is not None:
                self._error = self._aborted_error_locked()
            self._state = State.CLOSED if self._error is None else State.FAILED
        observer, self._observer = self._observer, None
        return observer

    def _released_now(self, observer: Optional[ChatCall]) -> None:
        """What follows a release, outside the lock: the observer, and closing the connection."""
        error, finished = self._error, self._state is State.DONE
        if self._parser.skipped:
            logger.debug("skipped %d reply lines that carry no message", self._parser.skipped)
        if self._cancel is not None:
            self._cancel.discard(self)
        if observer is not None:
            if error is not None:
                observer.failed(error)
            else:
                observer.closed()
        if finished:
            return
        try:
            self._response.close()
        except Exception:
            logger.debug("error while closing a chat response", exc_info=True)


def busy_error(reader: Optional[threading.Thread]) -> AiChatOnlineError:
    """The error of a second thread that reads a stream while ``reader`` reads it."""
    by = f"the thread {reader.name!r}" if reader is not None else "another thread"
    return AiChatOnlineError(
        f"this ChatStream is being read by {by}; a stream is read by one thread at a time "
        "(to stop it from another thread, call its abort())"
    )


class ChatStream:
    """The reply of one chat: iterate it for the text pieces, in order, each as soon as it arrives.

    Exhausting it, :meth:`close`, leaving its ``with`` block, or an error releases the connection;
    so does dropping the last reference to it (for example ``break`` out of
    ``for text in aco.chat(...)``). After exhaustion :attr:`text` is the whole reply.

    >>> with session.chat("Hello") as stream:      # doctest: +SKIP
    ...     for piece in stream:
    ...         print(piece, end="")
    >>> stream.text                                 # doctest: +SKIP
    'Hello! ...'

    Read a stream from one thread at a time. A ``for`` loop (``iter()``) belongs to the thread that
    began it: a loop of another thread, while that thread is alive and the stream open, raises
    :class:`AiChatOnlineError`; so does ``next()`` while another thread is inside a read.
    ``next()`` from one thread after another (a thread pool's workers, in turn) is fine.
    :meth:`abort` and :meth:`close` may be called from any thread.
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
        #: The thread whose ``for`` loop reads the stream (guarded by the reply's lock).
        self._loop: Optional[threading.Thread] = None

    def __iter__(self) -> Iterator[str]:
        """Claim the stream for this thread's loop (see the class's thread rules)."""
        reply = self._reply
        me = threading.current_thread()
        with reply._lock:
            refused = reply.abort_reason is not None and reply.state is not State.DONE
            owner = self._loop
            if not refused and (
                owner is None or owner is me or reply.released or not owner.is_alive()
            ):
                self._loop = me
                reply.last_reader = get_ident()
                # The reply itself, so that a loop costs one call per piece. It does not hold this
                # stream: dropping the loop and the stream releases the reply at once.
                return reply
        if refused:
            raise reply.aborted_failure()
        raise busy_error(owner)

    def __next__(self) -> str:
        return next(self._reply)

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
        if not self._reply.close_by_reader():
            self.abort(_CLOSED)

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
        if reason is not None:
            reply.release_if_idle()

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
        with self._lock:
            self._hand_out_locked(list(pieces))

    def _next_batch(self, *, started: bool) -> Optional[list[str]]:
        """Every piece is handed out in the first batch: the end follows it, unless the reply was
        aborted meanwhile (as a network reply's next read would fail)."""
        if self.abort_reason is not None:
            raise self.aborted_error()
        if self.aborted:
            raise self._failure(ConnectionAbortedError("aborted"), started)
        return None
