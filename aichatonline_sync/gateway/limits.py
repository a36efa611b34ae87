"""The gateway's reply limits: ``stop`` strings and a token budget, applied to a stream of pieces.

Pure text in, text out, no I/O: :class:`ReplyLimiter` takes the upstream's pieces one at a time
and says what may be sent on, so that the gateway can close the upstream chat the moment the reply
is cut.

- ``stop``: the reply ends before the first occurrence of any stop string, which may span pieces.
  The tail of the text that could still begin a stop string is held back until the next piece
  shows whether it does (at most the longest stop string less one character), also past a stop
  string found later in it; at the end of the reply it is sent, up to a stop string in it.
- ``max_tokens``: the reply ends once its text would count more than ``max_tokens`` tokens under
  the model's tokenizer; the last piece is cut at the longest prefix that fits. A prefix counts
  tokens as it is; when appending text merges tokens across the boundary differently, nothing
  already sent is ever taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

__all__ = ["Counter", "ReplyLimiter", "Truncator"]

#: ``count(text) -> tokens``
Counter = Callable[[str], int]
#: ``truncate(text, max_tokens) -> the longest prefix of text within max_tokens tokens``
Truncator = Callable[[str, int], str]


class ReplyLimiter:
    """Cut a streamed reply at a stop string or a token budget.

    >>> limiter = ReplyLimiter(stop=["world"])
    >>> limiter.feed("Hello, wor"), limiter.feed("ld!"), limiter.finish_reason
    ('Hello, ', '', 'stop')

    :param stop: the stop strings (empty ones are ignored).
    :param max_tokens: the token budget, or ``None``; with a budget, ``count`` and ``truncate``.
    """

    def __init__(
        self,
        stop: Sequence[str] = (),
        max_tokens: Optional[int] = None,
        *,
        count: Optional[Counter] = None,
        truncate: Optional[Truncator] = None,
    ) -> None:
        self._stops = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        if max_tokens is not None and (count is None or truncate is None):
            raise ValueError("a token budget needs count and truncate")
        self._max_tokens = max_tokens
        self._count = count
        self._truncate = truncate
        self._pending = ""  # text read but not yet sent: it may begin a stop string
        self._sent: list[str] = []
        self._sent_length = 0
        #: ``None`` while the reply goes on; ``"stop"`` or ``"length"`` once it was cut.
        self.finish_reason: Optional[str] = None

    @property
    def done(self) -> bool:
        """Whether the reply was cut: nothing more will be sent, close the upstream."""
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All the text sent so far."""
        return "".join(self._sent)

    @property
    def active(self) -> bool:
        """Whether there is any limit at all (without one, pieces pass through untouched)."""
        return bool(self._stops) or self._max_tokens is not None

    def feed(self, piece: str) -> str:
        """The part of ``piece`` (with text held back before) that may be sent now."""
        if self.finish_reason is not None:
            return ""
        if not self.active:
            self._sent.append(piece)
            return piece
        text = self._pending + piece
        if self._stops:
            cut = self._first_match(text)
            if cut >= 0:
                # A longer stop string that began earlier may still complete ("aca" in "ac"
                # once "c" is found): wait for it, holding the text from where it began.
                start = self._earliest_open(text, cut)
                if start >= 0:
                    self._pending = text[start:]
                    return self._budget(text[:start])
                out = self._budget(text[:cut])
                if self.finish_reason is None:
                    self.finish_reason = "stop"
                self._pending = ""
                return out
            keep = self._held_back(text)
            self._pending = text[len(text) - keep :] if keep else ""
            text = text[: len(text) - keep]
        return self._budget(text)

    def end(self) -> str:
        """The reply's end: the text still held back, and ``finish_reason`` set (``"stop"``
        unless the budget cut it)."""
        if self.finish_reason is not None:
            return ""
        text, self._pending = self._pending, ""
        cut = self._first_match(text) if self._stops else -1
        out = self._budget(text[:cut] if cut >= 0 else text)
        if self.finish_reason is None:
            self.finish_reason = "stop"
        return out

    def _first_match(self, text: str) -> int:
        """Where the first stop string in ``text`` begins, or -1."""
        return min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)

    def _earliest_open(self, text: str, cut: int) -> int:
        """The first place before ``cut`` where the rest of ``text`` begins a longer stop string
        that has not ended yet, or -1."""
        for start in range(max(0, len(text) - self._hold), cut):
            tail = text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return start
        return -1

    def _held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string."""
        for size in range(min(self._hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    def _budget(self, text: str) -> str:
        """Send ``text`` within the token budget."""
        if not text:
            return ""
        if self._max_tokens is not None:
            assert self._count is not None
            assert self._truncate is not None
            whole = self.text + text
            if self._count(whole) > self._max_tokens:
                self.finish_reason = "length"
                fits = self._truncate(whole, self._max_tokens)
                sent = self._sent_length
                text = fits[sent:] if len(fits) > sent and fits.startswith(self.text) else ""
        self._sent.append(text)
        self._sent_length += len(text)
        return text
