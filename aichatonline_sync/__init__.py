"""aichatonline_sync: a synchronous, streaming client for the AiChatOnline chat service.

>>> import aichatonline_sync as aco
>>> for text in aco.chat("Hello"):          # doctest: +SKIP
...     print(text, end="", flush=True)
"""

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from ._client import config as _config
from ._client.api import batch, batch_iter, chat, close_shared_sessions, complete
from ._client.config import RetryPolicy, Timeout
from ._client.session import Session
from ._client.stream import ChatStream
from ._transport.cancel import Cancellation
from ._version import __version__
from ._wire import redact as _redact
from ._wire.errors import (
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
from ._wire.prompt import format_prompt, get_random_string

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
    from ._client.batch import BatchResult
    from ._client.cache import ReplyCache
    from ._client.events import ChatEvent
    from ._client.usage import Usage
    from ._features.conversation import Conversation
    from ._features.notebook import display_stream
    from .integrations.gpt4free import AiChatOnline

# Loaded at first use, to keep ``import aichatonline_sync`` cheap.
_LAZY = {
    "AiChatOnline": ".integrations.gpt4free",
    "BatchResult": "._client.batch",
    "ChatEvent": "._client.events",
    "Conversation": "._features.conversation",
    "ReplyCache": "._client.cache",
    "display_stream": "._features.notebook",
    "Usage": "._client.usage",
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
# Pickles of Timeout and RetryPolicy made by 0.1 name the module they lived in then.
sys.modules.setdefault(f"{__name__}._config", _config)
