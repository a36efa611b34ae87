"""``ChatEvent``: what an event hook receives (the events are listed in :mod:`.hooks` and in the
manual's "Event hooks").

Its own module so that ``import aichatonline_sync`` does not pay for making the dataclass: only a
session with hooks loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from .stream import ChatStream
    from .usage import Usage

__all__ = ["ChatEvent"]


@dataclass(frozen=True)
class ChatEvent:
    """One moment of one chat, as hooks receive it.

    :ivar name: ``chat_start``, ``retry``, ``first_piece``, ``chat_end``, ``chat_error`` or
        ``cache_hit``.
    :ivar model: the model asked for.
    :ivar conversation_id: the chat's ``conversationId``.
    :ivar url: the chat URL (without credentials).
    :ivar attempt: for ``retry``, the number of the attempt that failed (1 for the first).
    :ivar wait: for ``retry``, the seconds before the next attempt.
    :ivar error: for ``retry`` and ``chat_error``, the exception.
    :ivar stream: for ``first_piece`` and ``cache_hit``, the :class:`ChatStream`.
    :ivar text: for ``chat_end``, the whole reply (``""`` with ``keep_text=False``).
    """

    name: str
    model: str
    conversation_id: str
    url: str
    attempt: Optional[int] = None
    wait: Optional[float] = None
    error: Optional[BaseException] = None
    stream: Optional[ChatStream] = None
    text: Optional[str] = None
    _count: Optional[Callable[[], Optional[Usage]]] = field(default=None, repr=False, compare=False)

    @property
    def usage(self) -> Optional[Usage]:
        """For ``chat_end``: the chat's token counts (counted at the first read; ``None`` without
        the ``tokens`` extra, or with ``keep_text=False``)."""
        return None if self._count is None else self._count()
