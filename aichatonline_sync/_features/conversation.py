"""``Conversation``: a chat history that grows by one user turn and one reply per question."""

from __future__ import annotations

import copy
import json
import os
import reprlib
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .._client.registry import check_session_options, resolve_session, split_options
from .._client.session import Session
from .._client.stream import ChatStream
from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError, InvalidRequestError
from .._wire.prompt import content_to_text, validate_content, validate_messages

__all__ = ["FILE_VERSION", "Conversation"]

logger = _redact.logger("aichatonline_sync")

#: The ``version`` written by :meth:`Conversation.save` and understood by :meth:`Conversation.load`.
FILE_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


#: Why an unfinished reply was closed, in the words of the error that iterating it raises.
_SUPERSEDED = "a newer question was asked on its Conversation (or it was cleared), so this reply is not added to the history"

_TAKES = "a str, or a list of {'type': 'text', 'text': ...} parts"


def _check_unicode(data: Mapping[str, Any]) -> None:
    """Refuse a saved form (:meth:`Conversation.to_dict`) that UTF-8 cannot hold: a lone UTF-16
    surrogate (from an escape such as ``\\ud83d``, or text decoded with ``surrogateescape``).

    :raises InvalidRequestError: naming the message (or the system message).
    """
    named: list[tuple[str, Any]] = [("the system message", data.get("system"))]
    messages = data.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, Mapping) else None
            named.append((f"message {index} (role {role!r})", message))
    for name, value in named:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{name} is not valid Unicode text: it has a lone surrogate "
                f"{exc.object[exc.start]!r}, which UTF-8 cannot hold"
            ) from None
        except (TypeError, ValueError):
            continue  # not JSON at all: the caller's own checks say so


def _check_content(content: Any, what: str) -> Any:
    """Check one question (a str or a list of parts) and return a private copy of it."""
    if isinstance(content, list) and any(
        isinstance(part, Mapping) and "role" in part for part in content
    ):
        raise InvalidRequestError(
            f"{what} must be {_TAKES}, not a list of messages: a Conversation keeps the messages "
            "itself (start from earlier ones with Conversation(messages=...))"
        )
    if not isinstance(content, (str, list)):
        raise InvalidRequestError(f"{what} must be {_TAKES}, not {type(content).__name__}")
    validate_content(content, what)
    if not content_to_text(content).strip():
        raise InvalidRequestError(f"{what} is empty (or only white space)")
    return copy.deepcopy(content)


class Conversation:
    """A chat that remembers: each question is sent with the whole history before it.

    >>> conv = Conversation(system="Be brief.")                     # doctest: +SKIP
    >>> conv.say("Hi")                                              # doctest: +SKIP
    'Hello! ...'
    >>> for text in conv.ask("What did I just say?"):               # doctest: +SKIP
    ...     print(text, end="")
    >>> len(conv)                                                   # doctest: +SKIP
    4

    A question and its reply are added to the history together, once the reply has been read to
    its end. If the chat fails, or its stream is closed before the end, *nothing* is added: the
    history never holds a question without its answer, and asking again is safe (the text that did
    arrive is on the exception's ``.partial``). Asking a new question while an earlier reply is
    still open closes that reply, which is then not added either: iterating it raises
    :class:`IncompleteStreamError` (it does not end as if complete).

    Threads: a conversation takes one turn at a time. :meth:`say` from several threads is
    serialised (each waits for the turn before it, and is sent with the history that holds it);
    :meth:`ask` waits for a :meth:`say` of another thread, but while a reply that another thread
    asked for is still open, :meth:`ask` and :meth:`say` raise :class:`AiChatOnlineError` instead
    of closing it. No turn is lost silently. Many conversations may share one :class:`Session`.

    :param system: the system message, sent first with every question (kept by :meth:`clear`).
    :param messages: an earlier history to start from (a list of ``{"role", "content"}`` dicts),
        by the rule of :meth:`Session.chat`: a content is a str, a list of
        ``{"type": "text", "text": ...}`` parts (other parts are dropped), or ``None`` or missing
        (no text). :meth:`load` reads back whatever :meth:`save` wrote of such a history.
    :param session: the :class:`Session` to chat through; default: the shared session for
        ``options``, as :func:`aichatonline_sync.chat` uses.
    :param options: :class:`Session` options (not with ``session``) and :meth:`Session.chat` options
        (``model``, ``timeout``, ``conversation_id``), used for every question.
    :raises InvalidRequestError: a bad system message, history or option.
    """

    def __init__(
        self,
        system: Optional[str] = None,
        *,
        messages: Optional[Sequence[Mapping[str, Any]]] = None,
        session: Optional[Session] = None,
        **options: Any,
    ) -> None:
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError(f"system must be a str or None, not {type(system).__name__}")
        if session is not None and not isinstance(session, Session):
            raise InvalidRequestError(
                f"session must be an aichatonline_sync.Session, not {type(session).__name__}"
            )
        session_options, chat_options = split_options(options)
        check_session_options(session, session_options, what="a Conversation")
        if "keep_text" in chat_options:
            raise InvalidRequestError(
                "a Conversation keeps the reply text: keep_text is not an option"
            )
        self._system = system
        self._session = session
        self._options = dict(options)
        self._session_options = session_options
        self._chat_options = chat_options
        self._history: list[dict[str, Any]] = []
        if isinstance(messages, str):
            raise InvalidRequestError(
                "messages must be a list of {'role': ..., 'content': ...} dicts"
            )
        if messages:
            self._history = [copy.deepcopy(m) for m in validate_messages(messages)]
        self._pending: Optional[ChatStream] = None
        # Bumped by clear(): a reply asked for with the history of an older generation is not added.
        self._generation = 0
        self._asker: Optional[threading.Thread] = None  # the thread that asked for _pending
        self._lock = threading.Lock()
        self._turn = threading.RLock()  # held for a whole say(), and while ask() sends

    # -- the history ----------------------------------------------------------------------------

    @property
    def system(self) -> Optional[str]:
        """The system message, or ``None``."""
        return self._system

    @property
    def session(self) -> Optional[Session]:
        """The :class:`Session` given, or ``None`` (the shared session for the options is used)."""
        return self._session

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The messages the next question is sent after: the system message (if any) and the
        history, as a new list of new dicts (changing it does not change the conversation)."""
        return self._snapshot()[1]

    def _snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """The generation of the history and the messages of :attr:`messages`, taken together."""
        with self._lock:
            generation, history = self._generation, copy.deepcopy(self._history)
        if self._system is None:
            return generation, history
        return generation, [{"role": "system", "content": self._system}, *history]

    def __len__(self) -> int:
        """The number of messages in the history, questions and replies (not the system message)."""
        return len(self._history)

    def __repr__(self) -> str:
        short = reprlib.Repr()
        short.maxstring = 40
        return f"<Conversation system={short.repr(self._system)} messages={len(self._history)}>"

    def clear(self) -> None:
        """Forget the questions and replies (the system message stays).

        A reply still streaming is closed and not added; so is one whose question is being sent
        (by :meth:`say` or :meth:`ask` in another thread) with the history before the clear.
        """
        with self._lock:
            self._generation += 1
            self._history.clear()
        self._discard_pending()

    def copy(self) -> Conversation:
        """A new conversation with the same system message, history, session and options.

        Replies still streaming belong to this conversation, not to the copy. ``copy.copy()`` and
        ``copy.deepcopy()`` do the same (the session is shared, not copied).
        """
        with self._lock:
            history = copy.deepcopy(self._history)
        clone = Conversation(self._system, session=self._session, **self._options)
        clone._history = history
        return clone

    def __copy__(self) -> Conversation:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Conversation:
        return self.copy()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Conversation cannot be pickled (it may hold a session and replies in flight): "
            "save it with to_dict() or save(), and make it again with from_dict() or load()"
        )

    # -- asking ---------------------------------------------------------------------------------

    def ask(self, content: Any, **chat_options: Any) -> ChatStream:
        """Send a question with the history before it, and return the reply as a :class:`ChatStream`.

        The question and the reply are added to the history when the stream has been read to its
        end; nothing is added if the chat fails or the stream is closed early.

        :param content: the question: a str, or a list of ``{"type": "text", "text": ...}`` parts
            (not a list of messages: the conversation holds those).
        :param chat_options: :meth:`Session.chat` options for this question only (``model``,
            ``timeout``, ``conversation_id``).
        :raises InvalidRequestError: an empty question or a bad option, before anything is sent.
        :raises AiChatOnlineError: a reply asked for by another thread is still open.
        """
        question = {"role": "user", "content": _check_content(content, "the question")}
        session_options, per_call = split_options(chat_options)
        if session_options:
            raise InvalidRequestError(
                f"give session options ({', '.join(sorted(session_options))}) when making the "
                "Conversation, not to ask()"
            )
        if "keep_text" in per_call:
            raise InvalidRequestError(
                "a Conversation keeps the reply text: keep_text is not an option"
            )
        options = {**self._chat_options, **per_call, "keep_text": True}
        with self._turn:  # waits while another thread's say() runs
            self._check_turn()
            self._discard_pending()
            generation, messages = self._snapshot()
            messages.append(question)
            # Leased while the chat opens; the stream then reads on even if the session is closed.
            with resolve_session(self._session, self._session_options, what="a Conversation") as session:
                stream = session.chat(messages, **options)
            return self._track(stream, question, generation)

    def _check_turn(self) -> None:
        with self._lock:
            pending, asker = self._pending, self._asker
        me = threading.current_thread()
        if pending is None or pending.closed or asker is None or asker is me:
            return
        if asker.is_alive():
            raise AiChatOnlineError(
                f"this Conversation is answering a question that the thread {asker.name!r} "
                "asked, and that reply is still open: a conversation takes one turn at a time. "
                "Read or close that reply first, or give each thread its own conversation "
                "(conv.copy())"
            )

    def _track(self, stream: ChatStream, question: dict[str, Any], generation: int) -> ChatStream:
        """Make ``stream`` the pending reply: it and ``question`` join the history at its end,
        unless :meth:`clear` ran since the history it was sent with was taken (``generation``)."""

        def on_complete(text: str) -> None:
            with self._lock:
                if self._pending is not stream or self._generation != generation:
                    return  # discarded by clear() or a newer question
                self._pending = None
                self._history.append(question)
                self._history.append({"role": "assistant", "content": text})
                count = len(self._history)
            logger.debug("conversation: added a question and its reply (%d messages)", count)

        stream.add_done_callback(on_complete)
        with self._lock:
            current = self._generation == generation
            if current:
                self._pending = stream
                self._asker = threading.current_thread()
        if not current:  # cleared while the question was sent: as if clear() came just after
            logger.debug("conversation: cleared while a question was sent; its reply is not added")
            stream.abort(_SUPERSEDED)
        return stream

    def say(self, content: Any, **chat_options: Any) -> str:
        """Send a question (see :meth:`ask`), wait for the whole reply and return it as one str.

        :raises StreamError: the stream broke (``.partial`` has the text so far); nothing is added.
        """
        with self._turn, self.ask(content, **chat_options) as stream:
            for _ in stream:
                pass
        return stream.text

    #: The same as :meth:`say` (the name :func:`aichatonline_sync.complete` uses).
    complete = say

    def _discard_pending(self) -> None:
        with self._lock:
            stream, self._pending = self._pending, None
        if stream is not None and not stream.closed:
            logger.debug("conversation: closed an unfinished reply; it is not added")
            stream.abort(_SUPERSEDED)

    # -- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The conversation as the JSON-ready dict that :meth:`save` writes."""
        with self._lock:
            history = copy.deepcopy(self._history)
        return {"version": FILE_VERSION, "system": self._system, "messages": history}

    def save(self, path: PathLike) -> None:
        """Write the system message and the history to ``path`` as JSON (UTF-8).

        The file is ``{"version": 1, "system": ..., "messages": [...]}``, written to a temporary
        file first and then moved into place, so a crash never leaves half a file.

        :raises InvalidRequestError: a message content that JSON in UTF-8 cannot hold (the
            message named), such as a lone surrogate, or a ``path`` that is a folder, a device or
            a FIFO; nothing is written. A symlink is followed: its target is replaced.
        :raises OSError: the file cannot be written.
        """
        data = self.to_dict()
        _check_unicode(data)
        try:
            text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"the conversation cannot be saved as JSON: {exc}") from exc
        # A symlink's target is replaced, not the link; a folder, device or FIFO never is.
        target = Path(os.path.realpath(path))
        if target.exists() and not target.is_file():
            raise InvalidRequestError(f"cannot save the conversation to {str(path)!r}: not a regular file")
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        logger.debug("conversation: saved %d messages to %s", len(self._history), target)

    @classmethod
    def from_dict(
        cls, data: Any, *, session: Optional[Session] = None, **options: Any
    ) -> Conversation:
        """Make a conversation from a dict as :meth:`to_dict` returns it.

        :raises InvalidRequestError: not such a dict, a version this library does not know, or a
            message that the constructor refuses.
        """
        if not isinstance(data, Mapping):
            raise InvalidRequestError(
                f"a saved conversation is a JSON object, not {type(data).__name__}"
            )
        version = data.get("version")
        if isinstance(version, bool) or version != FILE_VERSION:  # True == 1, but is no version
            raise InvalidRequestError(
                f"unknown saved conversation version {version!r} (this library reads version "
                f"{FILE_VERSION}; is the file from a newer aichatonline-sync?)"
            )
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError(f"'system' must be a string or null, not {system!r}")
        messages = data.get("messages", [])
        if not isinstance(messages, list):
            raise InvalidRequestError(f"'messages' must be a list, not {type(messages).__name__}")
        # The messages follow the constructor's rule, which is chat()'s: what it saved, it loads.
        return cls(system, messages=messages, session=session, **options)

    @classmethod
    def load(
        cls, path: PathLike, *, session: Optional[Session] = None, **options: Any
    ) -> Conversation:
        """Read a conversation written by :meth:`save`.

        :param path: the JSON file.
        :param session: the :class:`Session` to chat through (nothing of the session is saved).
        :param options: the same options as the constructor.
        :raises InvalidRequestError: the file is not a saved conversation (the message says why:
            not UTF-8, not JSON, not the format :meth:`save` writes, a message with a lone
            surrogate escaped in it (``"\\ud83d"``), which UTF-8 cannot hold, a message that the
            constructor refuses).
        :raises OSError: the file cannot be read.
        """
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(
                f"{os.fspath(path)} is not a saved conversation: it is not UTF-8 text (byte "
                f"{raw[exc.start]:#04x} at offset {exc.start})"
            ) from None
        try:
            data = json.loads(text)
        except RecursionError:
            raise InvalidRequestError(
                f"{os.fspath(path)} is not a saved conversation: its JSON is nested too deeply"
            ) from None
        except ValueError as exc:
            raise InvalidRequestError(
                f"{os.fspath(path)} is not a saved conversation: it is not JSON ({exc})"
            ) from None
        try:
            if isinstance(data, Mapping):
                _check_unicode(data)
            return cls.from_dict(data, session=session, **options)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{os.fspath(path)}: {exc}") from None
