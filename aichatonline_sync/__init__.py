"""aichatonline_sync: a synchronous, streaming client for the AiChatOnline chat service.

>>> import aichatonline_sync as aco
>>> for text in aco.chat("Hello"):          # doctest: +SKIP
...     print(text, end="", flush=True)
"""

import importlib
import logging
from typing import TYPE_CHECKING, Any

from . import _redact
from ._api import batch, batch_iter, chat, close_shared_sessions, complete
from ._cancel import Cancellation
from ._config import RetryPolicy, Timeout
from ._errors import (
    AiChatOnlineError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BatchError,
    IncompleteStreamError,
    InvalidRequestError,
    ProtocolError,
    RateLimitError,
    StreamError,
    TokenError,
    UpstreamError,
)
from ._prompt import format_prompt, get_random_string
from ._session import Session
from ._stream import ChatStream
from ._version import __version__

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AiChatOnline",
    "AiChatOnlineError",
    "AuthenticationError",
    "BatchError",
    "BatchResult",
    "Cancellation",
    "ChatEvent",
    "ChatStream",
    "Conversation",
    "IncompleteStreamError",
    "InvalidRequestError",
    "ProtocolError",
    "RateLimitError",
    "ReplyCache",
    "RetryPolicy",
    "Session",
    "StreamError",
    "Timeout",
    "TokenError",
    "UpstreamError",
    "Usage",
    "__version__",
    "batch",
    "batch_iter",
    "chat",
    "close_shared_sessions",
    "complete",
    "display_stream",
    "format_prompt",
    "get_random_string",
]

if TYPE_CHECKING:
    from ._batch import BatchResult
    from ._cache import ReplyCache
    from ._conversation import Conversation
    from ._events import ChatEvent
    from ._notebook import display_stream
    from ._provider import AiChatOnline
    from ._usage import Usage

# Loaded at first use, to keep ``import aichatonline_sync`` cheap.
_LAZY = {
    "AiChatOnline": "._provider",
    "BatchResult": "._batch",
    "ChatEvent": "._events",
    "Conversation": "._conversation",
    "ReplyCache": "._cache",
    "display_stream": "._notebook",
    "Usage": "._usage",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_redact.logger().addHandler(logging.NullHandler())
