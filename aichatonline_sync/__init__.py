"""aichatonline_sync: a synchronous, streaming client for the AiChatOnline chat service.

>>> import aichatonline_sync as aco
>>> for text in aco.chat("Hello"):          # doctest: +SKIP
...     print(text, end="", flush=True)
"""

import logging

from ._api import chat, complete
from ._batch import BatchResult, batch, batch_iter
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
from ._provider import AiChatOnline
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
    "ChatStream",
    "IncompleteStreamError",
    "InvalidRequestError",
    "ProtocolError",
    "RateLimitError",
    "RetryPolicy",
    "Session",
    "StreamError",
    "Timeout",
    "TokenError",
    "UpstreamError",
    "__version__",
    "batch",
    "batch_iter",
    "chat",
    "complete",
    "format_prompt",
    "get_random_string",
]

logging.getLogger("aichatonline_sync").addHandler(logging.NullHandler())
