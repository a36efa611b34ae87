"""Test doubles of the AiChatOnline service, for your tests and for use without a network.

- :class:`Emulator` (:mod:`.emulator`): a real HTTP/1.1 server on loopback that speaks the
  service's protocol, with its faults played byte for byte on the socket (drops, stalls, resets,
  framings, raw bytes).
- :class:`AiChatOnlineMock` (:mod:`.mock`): the service mocked with ``responses``, as the
  ``aichatonline_mock`` pytest fixture gives it.

Both are one model of the service (:mod:`.faults`): they take the same arguments, refuse the same
ones, and answer the same request alike. The pytest fixtures are in :mod:`.pytest_plugin`.
"""

from __future__ import annotations

from .emulator import (
    CHAT_PATH,
    DEFAULT_CONTENT_TYPE,
    DEFAULT_MAX_RECORDS,
    MAX_TOKENS,
    TOKEN_PATH,
    Emulator,
    RecordedRequest,
    ReplySpec,
    default_reply,
    split_pieces,
)
from .mock import AiChatOnlineMock

__all__ = [
    "CHAT_PATH",
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_MAX_RECORDS",
    "MAX_TOKENS",
    "TOKEN_PATH",
    "AiChatOnlineMock",
    "Emulator",
    "RecordedRequest",
    "ReplySpec",
    "default_reply",
    "split_pieces",
]
