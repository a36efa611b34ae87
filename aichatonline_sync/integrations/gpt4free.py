"""gpt4free compatibility: the ``AiChatOnline`` provider class, blocking, and a provider inside
gpt4free's own machinery (``g4f.ChatCompletion``, ``g4f.client.Client`` and ``AsyncClient``).

The class implements gpt4free's provider protocol itself (the attributes and classmethods that
``g4f`` reads from a provider class) instead of subclassing ``g4f``'s ``AbstractProvider``: this
module never imports ``g4f``, so the class works the same with or without it installed, and with
every ``g4f`` release the tests cover (see README: "gpt4free").
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import requests

from .. import Cancellation, Session
from .._client.config import validate_base_url
from .._wire import redact as _redact
from .._wire.prompt import Messages, build_prompt
from .._wire.protocol import BASE_URL_ENV, CHAT_PATH, DEFAULT_BASE_URL, DEFAULT_MODEL, MODELS

if TYPE_CHECKING:
    import asyncio

__all__ = ["G4F_PROXY_ENV", "AiChatOnline"]

logger = _redact.logger("aichatonline_sync")

#: gpt4free's proxy variable, used when no ``proxy`` is given (as ``g4f.ChatCompletion`` does).
G4F_PROXY_ENV = "G4F_PROXY"

_PASSED_ON = ("timeout", "max_retries", "retry", "headers", "verify", "conversation_id", "cancel")
_CHAT_OPTIONS = ("conversation_id", "cancel")
#: The parameters ``get_parameters`` reports (gpt4free lists only those it knows, ``SAFE_PARAMETERS``).
_G4F_PARAMETERS = ("model", "messages", "stream", "proxy", "timeout", "max_retries")
_PARAMETER_EXAMPLES: dict[str, Any] = {
    "messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "proxy": "http://user:password@127.0.0.1:3128",
    "timeout": 60,
    "max_retries": 2,
}


def _describe(provider: type[AiChatOnline]) -> str:
    """gpt4free's ``params`` text: the parameters ``provider`` takes, one a line."""
    lines = []
    for parameter in provider.get_parameters().values():
        line = f"\n    {parameter.name}"
        if parameter.annotation is not inspect.Parameter.empty:
            line += f": {parameter.annotation}"
        if parameter.default is not inspect.Parameter.empty:
            line += f" = {parameter.default!r}"
        lines.append(line + ",")
    return f"g4f.Provider.{provider.__name__} supports: ({''.join(lines)}\n)"


class AiChatOnline:
    """gpt4free's ``AiChatOnline`` provider, made blocking (no event loop, no nest_asyncio).

    >>> for text in AiChatOnline.create_completion("gpt-4o-mini", [{"role": "user", "content": "Hi"}]):
    ...     print(text, end="")                                           # doctest: +SKIP

    It is also a provider for gpt4free's own API (``g4f.ChatCompletion`` asks for
    ``ignore_working=True``: ``working`` is ``False``, gpt4free's last known status):

    >>> g4f.ChatCompletion.create("gpt-4o-mini", messages, provider=AiChatOnline,
    ...                           stream=True, ignore_working=True)       # doctest: +SKIP
    >>> g4f.client.Client(provider=AiChatOnline).chat.completions.create(
    ...     messages=messages, model="gpt-4o-mini")                       # doctest: +SKIP

    ``url`` is the base URL it talks to: override it in a subclass, or set ``$AICHATONLINE_BASE_URL``.
    ``proxy`` defaults to ``$G4F_PROXY``. Like gpt4free, every call makes a new token and a new
    connection; use :class:`Session` to reuse them.
    """

    site_url: ClassVar[str] = "https://aichatonline.org"
    url: ClassVar[str] = DEFAULT_BASE_URL
    api_endpoint: ClassVar[str] = CHAT_PATH
    working: ClassVar[bool] = False
    default_model: ClassVar[str] = DEFAULT_MODEL
    models: ClassVar[list[str]] = list(MODELS)
    model_aliases: ClassVar[dict[str, str]] = {}
    supports_stream: ClassVar[bool] = True
    supports_system_message: ClassVar[bool] = True
    supports_message_history: ClassVar[bool] = True
    # The rest of gpt4free's provider protocol (``BaseProvider``'s attributes).
    needs_auth: ClassVar[bool] = False
    active_by_default: ClassVar[Optional[bool]] = None
    #: gpt4free's per-piece ``stream_timeout`` applies (newer g4f releases read this).
    use_stream_timeout: ClassVar[bool] = True
    #: Counted up and down by gpt4free as chats succeed and fail.
    live: ClassVar[int] = 0
    #: The parameters it takes, as gpt4free's ``params`` describes them.
    params: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = _describe(cls)

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

        ``proxy`` defaults to ``$G4F_PROXY``. Extra gpt4free keyword arguments that mean nothing
        here are ignored (logged at debug level); ``timeout``, ``max_retries``, ``retry``,
        ``headers``, ``verify``, ``conversation_id`` and ``cancel`` are used.

        :raises InvalidRequestError: bad messages or options, here (before the first piece).
        """
        build_prompt(messages)  # bad messages fail here, not at the first next()
        options = {key: kwargs.pop(key) for key in _PASSED_ON if key in kwargs}
        if kwargs:
            logger.debug("AiChatOnline.create_completion ignores %s", ", ".join(sorted(kwargs)))
        chat_options = {key: options.pop(key) for key in _CHAT_OPTIONS if key in options}
        if proxy is None:
            proxy = os.environ.get(G4F_PROXY_ENV) or None
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

    # -- gpt4free's provider protocol ----------------------------------------------------------

    @classmethod
    async def create_async_generator(
        cls,
        model: str,
        messages: Messages,
        proxy: Optional[str] = None,
        stream: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[str]:
        """The asynchronous form of :meth:`create_completion`, for ``g4f.client.AsyncClient``.

        The blocking chat runs in a thread of its own, and each piece is handed to the event loop
        as it arrives. Leaving the ``async for`` early (``break``, ``aclose()``, a cancelled task,
        a gpt4free timeout) stops the chat at once and releases its connection.
        """
        cancel = Cancellation()
        kwargs["cancel"] = cancel
        pieces = cls.create_completion(model, messages, stream=stream, proxy=proxy, **kwargs)
        async for piece in _from_thread(pieces, cancel):
            yield piece

    @classmethod
    async def create_async(cls, model: str, messages: Messages, **kwargs: Any) -> str:
        """The whole reply as one str, awaited (gpt4free's ``AsyncProvider`` method)."""
        kwargs["stream"] = False
        return "".join([piece async for piece in cls.create_async_generator(model, messages, **kwargs)])

    @classmethod
    def create_function(cls, *args: Any, **kwargs: Any) -> Iterator[str]:
        """What ``g4f.ChatCompletion.create`` and ``g4f.client.Client`` call (g4f 6.x)."""
        return cls.create_completion(*args, **kwargs)

    @classmethod
    def async_create_function(cls, *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        """What ``g4f.ChatCompletion.create_async`` and ``g4f.client.AsyncClient`` call (g4f 6.x)."""
        return cls.create_async_generator(*args, **kwargs)

    @classmethod
    def get_dict(cls) -> dict[str, Any]:
        """``{"name", "url", "label"}``, as gpt4free describes a provider."""
        return {"name": cls.__name__, "url": cls.url, "label": getattr(cls, "label", None)}

    @classmethod
    def get_parent(cls) -> str:
        return str(getattr(cls, "parent", cls.__name__))

    @classmethod
    def get_models(cls, **kwargs: Any) -> list[str]:
        """The models the service offers (``g4f.client.Client(...).models.get_all()``)."""
        return list(cls.models)

    @classmethod
    def get_parameters(cls, as_json: bool = False) -> dict[str, Any]:
        """The parameters gpt4free may pass: ``inspect.Parameter`` objects, or with ``as_json``
        an example value for each (as gpt4free's API and GUI show them)."""
        signature = inspect.signature(cls.create_completion)
        known = {
            name: inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
            for name in _G4F_PARAMETERS
        }
        known.update(
            (name, parameter)
            for name, parameter in signature.parameters.items()
            if name in _G4F_PARAMETERS
        )
        if not as_json:
            return known
        values = {name: _PARAMETER_EXAMPLES.get(name, p.default) for name, p in known.items()}
        values.update(model=cls.default_model, stream=cls.supports_stream)
        return {"provider": cls.__name__, **values}


AiChatOnline.params = _describe(AiChatOnline)


async def _from_thread(pieces: Iterator[str], cancel: Cancellation) -> AsyncIterator[str]:
    """Iterate ``pieces`` in a thread of its own, yielding each to the running loop; ``cancel``
    stops it when the consumer leaves early."""
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Optional[str], Optional[BaseException]]] = asyncio.Queue()
    worker = threading.Thread(
        target=_pump, args=(pieces, loop, queue), name="aichatonline-g4f", daemon=True
    )
    worker.start()
    try:
        while True:
            piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                return
            yield piece
    finally:
        cancel.cancel()  # a no-op once the chat ended; else its read fails at once, in the worker


def _pump(
    pieces: Iterator[str],
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[tuple[Optional[str], Optional[BaseException]]],
) -> None:
    def put(item: tuple[Optional[str], Optional[BaseException]]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(queue.put_nowait, item)

    try:
        for piece in pieces:
            put((piece, None))
    except BaseException as exc:
        put((None, exc))
    else:
        put((None, None))
