"""gpt4free compatibility: the ``AiChatOnline`` provider class, blocking."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any, ClassVar, Optional

import requests

from ._config import validate_base_url
from ._prompt import Messages, build_prompt
from ._protocol import BASE_URL_ENV, CHAT_PATH, DEFAULT_BASE_URL, DEFAULT_MODEL, MODELS
from ._session import Session

__all__ = ["AiChatOnline"]

logger = logging.getLogger("aichatonline_sync")

_PASSED_ON = ("timeout", "max_retries", "retry", "headers", "verify", "conversation_id")


class AiChatOnline:
    """gpt4free's ``AiChatOnline`` provider, made blocking (no event loop, no nest_asyncio).

    >>> for text in AiChatOnline.create_completion("gpt-4o-mini", [{"role": "user", "content": "Hi"}]):
    ...     print(text, end="")                                           # doctest: +SKIP

    ``url`` is the base URL it talks to: override it in a subclass, or set ``$AICHATONLINE_BASE_URL``.
    Like gpt4free, every call makes a new token and a new connection; use :class:`Session` to reuse them.
    """

    site_url: ClassVar[str] = "https://aichatonline.org"
    url: ClassVar[str] = DEFAULT_BASE_URL
    api_endpoint: ClassVar[str] = CHAT_PATH
    working: ClassVar[bool] = False
    default_model: ClassVar[str] = DEFAULT_MODEL
    models: ClassVar[list[str]] = list(MODELS)
    supports_stream: ClassVar[bool] = True
    supports_system_message: ClassVar[bool] = True
    supports_message_history: ClassVar[bool] = True

    @classmethod
    def base_url(cls) -> str:
        """The URL this provider talks to: a subclass's ``url``, else the environment, else the default."""
        if cls.url != AiChatOnline.url or not os.environ.get(BASE_URL_ENV):
            return validate_base_url(cls.url)
        return validate_base_url(None)

    @classmethod
    def grab_token(cls, session: requests.Session, proxy: Optional[str] = None) -> str:
        """Fetch a token from ``getUniqueId`` through ``session`` (as gpt4free's classmethod did).

        :raises TokenError: a 2xx reply without a usable token.
        :raises APIStatusError: a non-2xx reply.
        """
        with Session(cls.base_url(), proxy=proxy, http=session, reuse_token=False) as client:
            return client.grab_token()

    @classmethod
    def create_completion(
        cls,
        model: str,
        messages: Messages,
        stream: bool = True,
        proxy: Optional[str] = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield the reply's text pieces (one str, the whole reply, when ``stream`` is false).

        Extra gpt4free keyword arguments that mean nothing here are ignored (logged at debug level);
        ``timeout``, ``max_retries``, ``retry``, ``headers``, ``verify`` and ``conversation_id`` are used.
        """
        build_prompt(messages)  # bad messages fail here, not at the first next()
        options = {key: kwargs.pop(key) for key in _PASSED_ON if key in kwargs}
        if kwargs:
            logger.debug("AiChatOnline.create_completion ignores %s", ", ".join(sorted(kwargs)))
        chat_options = {key: options.pop(key) for key in ("conversation_id",) if key in options}
        client = Session(cls.base_url(), proxy=proxy, reuse_token=False, **options)
        return cls._generate(client, model, messages, stream, chat_options)

    @staticmethod
    def _generate(
        client: Session, model: str, messages: Messages, stream: bool, chat_options: dict[str, Any]
    ) -> Iterator[str]:
        with client, client.chat(messages, model=model or None, **chat_options) as reply:
            if stream:
                yield from reply
            else:
                yield "".join(reply)
