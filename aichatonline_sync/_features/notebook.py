"""``display_stream``: show a streaming reply as live Markdown in a Jupyter notebook."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

from .._client.config import is_number
from .._client.registry import resolve_session, split_options
from .._client.session import Session
from .._wire import redact as _redact
from .._wire.errors import InvalidRequestError

__all__ = ["DEFAULT_MIN_INTERVAL", "display_stream"]

logger = _redact.logger("aichatonline_sync")

#: The shortest time between two updates of the output, in seconds.
DEFAULT_MIN_INTERVAL = 0.05

_NEEDS_IPYTHON = (
    "display_stream() needs IPython, which Jupyter always has: "
    'pip install "aichatonline-sync[notebook]"'
)
_NO_SHELL = (
    "display_stream() shows the reply in a Jupyter notebook (or another IPython shell), and none "
    "is running here. In a script, write the pieces yourself: "
    "for text in aichatonline_sync.chat(messages): print(text, end='', flush=True); "
    "or take the whole reply with aichatonline_sync.complete(messages)"
)


def _ipython() -> tuple[Callable[..., Any], Any]:
    """``(IPython.display.display, the running shell)``; a clear error when there is neither."""
    try:
        import IPython
        from IPython.display import display
    except ImportError:
        raise InvalidRequestError(_NEEDS_IPYTHON) from None
    shell = IPython.get_ipython()
    if shell is None:
        raise InvalidRequestError(_NO_SHELL)
    return display, shell


def _bundle(text: str) -> dict[str, str]:
    # Markdown for notebooks; the same text as plain text for consoles, terminals and exports.
    return {"text/markdown": text, "text/plain": text}


def display_stream(
    stream_or_messages: Union[Iterator[str], str, Sequence[Mapping[str, Any]]],
    *,
    session: Optional[Session] = None,
    min_interval: float = DEFAULT_MIN_INTERVAL,
    **options: Any,
) -> str:
    """Show a reply as Markdown in the cell's output, updated live as pieces arrive; return its text.

    >>> text = display_stream("Write a haiku about HTTP")          # doctest: +SKIP
    >>> text = display_stream(conversation.ask("And in French?"))  # doctest: +SKIP

    In Jupyter (any front end with a kernel: JupyterLab, Notebook, VS Code, Colab) one output is
    created and then updated in place, at most every ``min_interval`` seconds, and always once more
    at the end, so it ends up showing the whole reply. In a terminal IPython shell, which cannot
    update an output, the reply is shown once, when it is complete. If the stream breaks, the text
    that arrived is shown and the error is raised.

    The library itself never prints: outside IPython there is nowhere to display, so this raises
    :class:`InvalidRequestError` (before anything is sent) instead of writing to stdout.

    :param stream_or_messages: a :class:`ChatStream` (or any iterator of str pieces) to show, or
        messages (a str or a list of ``{"role", "content"}`` dicts) to send first.
    :param session: the :class:`Session` to send the messages through (default: the shared session
        for ``options``, as :func:`aichatonline_sync.chat` does).
    :param min_interval: the shortest time between two updates, in seconds (``0``: every piece).
    :param options: the options of :func:`aichatonline_sync.chat`, when messages are given.
    :returns: the whole reply.
    :raises InvalidRequestError: no IPython (install the ``notebook`` extra) or no IPython shell,
        bad messages or options; raised before anything is sent.
    :raises StreamError: the stream broke (``.partial`` has the text that arrived, also shown).
    """
    try:
        return _display(stream_or_messages, session, min_interval, options)
    finally:
        # A stream given here is ours to close, also when it is refused before any display: its
        # request was sent already, and leaving it open would hold its connection.
        if not isinstance(stream_or_messages, (str, Sequence)):
            close = getattr(stream_or_messages, "close", None)
            if callable(close):
                close()


def _display(
    stream_or_messages: Any, session: Optional[Session], min_interval: float, options: dict[str, Any]
) -> str:
    if (
        not is_number(min_interval)
        or not math.isfinite(min_interval)
        or min_interval < 0
    ):
        raise InvalidRequestError(
            f"min_interval must be a number of seconds >= 0, not {min_interval!r}"
        )
    is_messages = isinstance(stream_or_messages, (str, Sequence))
    if not is_messages and not isinstance(stream_or_messages, Iterator):
        raise InvalidRequestError(
            "display_stream() takes a ChatStream (or another iterator of str) or messages, "
            f"not {type(stream_or_messages).__name__}"
        )
    if not is_messages and (options or session is not None):
        raise InvalidRequestError(
            "options and session= apply when display_stream() is given messages; "
            "give them to the chat that made the stream instead"
        )
    if is_messages:
        session_options, chat_options = split_options(options)
        lease = resolve_session(session, session_options, what="display_stream()")
    display, shell = _ipython()
    # Only a kernel (Jupyter) can update an output in place; a terminal shell shows the end result.
    live = getattr(shell, "kernel", None) is not None
    if is_messages:
        pieces: Iterator[str]
        # Leased while the chat opens; the stream then reads on even if the session is closed.
        with lease as client:
            pieces = client.chat(stream_or_messages, **chat_options)
    else:
        pieces = stream_or_messages

    parts: list[str] = []
    handle: Any = None
    last = 0.0
    updates = 0
    try:
        for piece in pieces:
            if not isinstance(piece, str):
                raise InvalidRequestError(
                    f"display_stream() shows str pieces, not {type(piece).__name__}"
                )
            parts.append(piece)
            if not live:
                continue
            now = time.monotonic()
            if handle is None:
                handle = display(_bundle("".join(parts)), raw=True, display_id=True)
                last = now
            elif now - last >= min_interval:
                handle.update(_bundle("".join(parts)), raw=True)
                updates += 1
                last = now
    finally:
        close = getattr(pieces, "close", None)
        if callable(close):
            close()
        text = "".join(parts)
        # The final update: always, so the output ends with everything that arrived.
        if handle is not None:
            handle.update(_bundle(text), raw=True)
            updates += 1
        elif text:
            display(_bundle(text), raw=True)
        logger.debug("display_stream: showed %d characters (%d updates)", len(text), updates)
    return text
