"""Event hooks: the moments of a chat, handed to the caller's functions and to tracing.

``Session(event_hooks={"chat_start": [fn], ...})``, in the spirit of httpx's ``event_hooks``:
each name maps to a list of callables, each called with one :class:`ChatEvent`, in the thread
where the moment happens (the caller's, or the one reading the stream). The events:

- ``chat_start``: a chat was checked and is about to be sent (once per chat, not per attempt);
- ``retry``: an attempt failed and another follows (``attempt``, ``wait``, ``error``);
- ``first_piece``: the first piece of text arrived (``stream``); ``Session.chat`` returns next;
- ``chat_end``: the reply was read to its end (``text``; ``usage``, counted when first read);
- ``chat_error``: the chat failed, before or after its first piece (``error``);
- ``cache_hit``: a reply was served from a reply cache (``stream``), with nothing sent.

A chat's last event is ``chat_end`` or ``chat_error``; a stream closed before its end by its reader
has neither (an abort with a reason, or a close from another thread, is a ``chat_error``).
A hook that raises does not break the chat: the exception is logged at WARNING (once per hook and
exception type, with its traceback) and the other hooks and the chat go on. Hooks cannot change
the request or the reply.

OpenTelemetry spans (:mod:`.tracing`) ride on the same moments, through :class:`ChatCall`, so a
chat that has neither hooks nor a tracer provider pays one dictionary look-up per chat.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._wire import redact as _redact
from .._wire.errors import InvalidRequestError

#: :mod:`.tracing`, once a span was made (never imported otherwise). Kept here, not imported
#: again where a span ends: a stream dropped at interpreter exit ends its span when imports
#: no longer work.
_tracing: Any = None

if TYPE_CHECKING:
    from .events import ChatEvent
    from .stream import ChatStream
    from .usage import Usage

__all__ = ["EVENTS", "ChatCall", "EventHooks", "Hook"]

logger = _redact.logger("aichatonline_sync")

#: The event names ``event_hooks`` accepts.
EVENTS = ("chat_start", "retry", "first_piece", "chat_end", "chat_error", "cache_hit")


Hook = Callable[["ChatEvent"], object]


class EventHooks:
    """A session's validated hooks (``event_hooks``), and the tracing check."""

    def __init__(self, hooks: Optional[Mapping[str, Sequence[Hook]]] = None) -> None:
        self._hooks: dict[str, tuple[Hook, ...]] = {}
        self._warned: set[tuple[int, type[BaseException]]] = set()
        if hooks is None:
            return
        if not isinstance(hooks, Mapping):
            raise InvalidRequestError(
                f"event_hooks must be a dict of event name to a list of callables, "
                f"not {type(hooks).__name__}"
            )
        for name, functions in hooks.items():
            if name not in EVENTS:
                raise InvalidRequestError(
                    f"unknown event {name!r} in event_hooks; the events are: {', '.join(EVENTS)}"
                )
            if callable(functions) or not isinstance(functions, (list, tuple)):
                raise InvalidRequestError(
                    f"event_hooks[{name!r}] must be a list of callables, not {type(functions).__name__}"
                )
            for function in functions:
                if not callable(function):
                    raise InvalidRequestError(
                        f"event_hooks[{name!r}] holds {type(function).__name__}, which is not callable"
                    )
            if functions:
                self._hooks[name] = tuple(functions)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def event(self, name: str, model: str, conversation_id: str, url: str, **details: Any) -> None:
        """Build the :class:`ChatEvent` and :meth:`emit` it (only when a hook listens to it)."""
        if name in self._hooks:
            # Making the dataclass costs import time: only sessions with hooks pay it.
            from .events import ChatEvent

            self.emit(ChatEvent(name, model, conversation_id, url, **details))

    def emit(self, event: ChatEvent) -> None:
        """Call the hooks of ``event.name``; an exception of one is logged and ignored."""
        for hook in self._hooks.get(event.name, ()):
            try:
                hook(event)
            except Exception as exc:
                key = (id(hook), type(exc))
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(
                        "the %s hook %r raised %s; ignored (the chat goes on)",
                        event.name, hook, type(exc).__name__, exc_info=True,
                    )

    def begin(self, *, model: str, conversation_id: str, url: str, prompt: str) -> Optional[ChatCall]:
        """The :class:`ChatCall` of a new chat, or ``None`` when nothing listens (no hook, no
        tracer provider). Emits ``chat_start``."""
        span = None
        # An application that set a tracer provider has imported opentelemetry.trace: until it is
        # imported, nothing of tracing is loaded or checked.
        if "opentelemetry.trace" in sys.modules:
            global _tracing
            from . import tracing as _tracing

            span = _tracing.start_span(
                model=model, url=url, prompt=prompt, conversation_id=conversation_id
            )
        if span is None and not self._hooks:
            return None
        call = ChatCall(
            self, model=model, conversation_id=conversation_id, url=url, prompt=prompt, span=span
        )
        call.emit("chat_start")
        return call

    def run(self, send: Callable[[Optional[ChatCall]], ChatStream], chat: Any, url: str) -> ChatStream:
        """``send(call)`` for ``chat`` (its ``model``, ``conversation_id`` and ``prompt``) to
        ``url``, between the chat's first events: ``chat_start``, then ``first_piece`` or
        ``chat_error``."""
        call = self.begin(
            model=chat.model, conversation_id=chat.conversation_id, url=url, prompt=chat.prompt
        )
        if call is None:
            return send(None)
        try:
            stream = send(call)
        except BaseException as exc:  # Ctrl-C in a retry wait ends the chat too
            call.failed(exc)
            raise
        call.first_piece(stream)
        return stream

    def cache_hit(self, stream: ChatStream, *, url: str) -> None:
        """Emit ``cache_hit`` for ``stream``, a reply served from a cache (for the reply cache:
        call it when a hit is handed out instead of sending the chat)."""
        self.event("cache_hit", stream.model, stream.conversation_id, url, stream=stream)


class ChatCall:
    """The listeners of one chat: the session's hooks and, when tracing is on, its span. The
    reply reports its end to it (:meth:`finished`, :meth:`failed`, :meth:`closed`); it holds no
    stream, so that dropping a stream still closes it at once."""

    __slots__ = (
        "_counted", "_done", "_hooks", "_lock", "_span", "_usage", "conversation_id", "model",
        "prompt", "url",
    )

    def __init__(
        self,
        hooks: EventHooks,
        *,
        model: str,
        conversation_id: str,
        url: str,
        prompt: str,
        span: Any = None,
    ) -> None:
        self._hooks = hooks
        self._span = span
        # The end (finished, failed or closed) and the count may come from different threads:
        # the lock makes the first end the only one, and the count happen once.
        self._lock = threading.Lock()
        self._done = False
        self._counted = False
        self._usage: Optional[Usage] = None
        self.model = model
        self.conversation_id = conversation_id
        self.url = url
        self.prompt = prompt

    def usage(self, text: str) -> Optional[Usage]:
        """The counts of this chat's prompt and of ``text`` (its reply), counted once."""
        with self._lock:
            if not self._counted:
                from .usage import usage_of

                self._usage = usage_of(self.prompt, text, self.model)
                self._counted = True
            return self._usage

    def _end(self) -> bool:
        """Whether this is the chat's one end: the first of finished, failed and closed."""
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def emit(
        self,
        name: str,
        *,
        attempt: Optional[int] = None,
        wait: Optional[float] = None,
        error: Optional[BaseException] = None,
        stream: Optional[ChatStream] = None,
        text: Optional[str] = None,
    ) -> None:
        """Call the session's hooks of ``name`` with this chat's event."""
        if self._hooks:
            count = None if text is None else (lambda: self.usage(text))
            self._hooks.event(
                name, self.model, self.conversation_id, self.url,
                attempt=attempt, wait=wait, error=error, stream=stream, text=text, _count=count,
            )

    def retry(self, attempt: int, wait: float, error: BaseException) -> None:
        """Attempt ``attempt`` failed with ``error``; the next follows in ``wait`` seconds."""
        if self._span is not None:
            _tracing.retry(self._span, attempt, wait, error)
        self.emit("retry", attempt=attempt, wait=wait, error=error)

    def first_piece(self, stream: ChatStream) -> None:
        """The first piece of ``stream`` arrived."""
        if self._span is not None:
            self._span.add_event("first_piece")
        self.emit("first_piece", stream=stream)

    def finished(self, text: str, kept: bool) -> None:
        """The reply was read to its end; ``text`` is all of it when ``kept``."""
        if not self._end():
            return
        if not kept:
            with self._lock:
                self._counted = True  # nothing to count the reply from
        if self._span is not None:
            _tracing.end(self._span, model=self.model, usage=self.usage(text), text=text)
        self.emit("chat_end", text=text)

    def failed(self, error: BaseException) -> None:
        """The chat failed with ``error``, before or after its first piece."""
        if not self._end():
            return
        if self._span is not None:
            _tracing.end(self._span, error=error)
        self.emit("chat_error", error=error)

    def closed(self) -> None:
        """The stream was closed before its end: no event; the span ends."""
        if not self._end():
            return
        if self._span is not None:
            _tracing.end(self._span)
