"""``Session``: one token, one connection pool, retries and timeouts, shared by many chats.

The session only orchestrates: options are checked by :mod:`.config`, requests go through the
transport's :class:`Transport`, the token is the :class:`~.token.TokenStore`'s, retries are a
:func:`~.retry.build_retrying`, and the reply is read by :class:`~.stream.Reply`.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union
from urllib.parse import urlsplit

import requests

from .._transport.cancel import Cancellation
from .._transport.transport import Transport, read_start
from .._wire import redact as _redact
from .._wire.errors import (
    AiChatOnlineError,
    AuthenticationError,
    InvalidRequestError,
    ProtocolError,
    UpstreamError,
    html_page_title,
)
from .._wire.parser import DEFAULT_MAX_LINE
from .._wire.prompt import build_prompt, get_random_string, validate_conversation_id
from .._wire.protocol import CHAT_PATH, DEFAULT_MODEL, MODELS, TOKEN_HEADER, TOKEN_PATH, chat_body
from .._wire.protocol import request_headers as protocol_headers
from .._wire.redact import redact_url
from .config import (
    MAX_CONNECTIONS,
    UNSET,
    RetryPolicy,
    Timeout,
    TimeoutTypes,
    check_bool,
    check_int,
    reject_options,
    validate_base_url,
    validate_headers,
    validate_proxy,
    validate_retry,
    validate_verify,
)
from .hooks import ChatCall, EventHooks, Hook
from .retry import build_retrying, run_with_retries
from .stream import ChatStream, RecordedReply, Reply, StoredReply
from .token import TokenStore

if TYPE_CHECKING:  # concurrent.futures and sqlite3 are slow to import: loaded where used
    import concurrent.futures

    from .batch import BatchResult
    from .cache import ReplyCache

__all__ = ["CHAT_OPTIONS", "DEFAULT_MODEL", "MODELS", "SESSION_OPTIONS", "Session", "split_options"]

logger = _redact.logger("aichatonline_sync")

#: The longest reply line that can be allowed (the parser holds a line whole until it ends).
MAX_LINE_LIMIT = 1 << 30
#: Connections kept per host: enough for the threads of most batches and gateways (a free slot
#: costs nothing until a connection fills it); a batch grows it to its number of workers.
_DEFAULT_POOL = 32


class _Chat(NamedTuple):
    """One chat, checked: what is sent, and how long it may take."""

    body: bytes
    prompt: str  # formatted: with the model, the key of a reply cache
    conversation_id: str
    model: str
    timeout: Timeout
    deadline: Optional[float]
    keep_text: bool
    cancel: Optional[Cancellation]


class Session:
    """A blocking client session: one token, one connection pool, shared by many chats and threads.

    >>> with Session(timeout=30, max_retries=3) as s:       # doctest: +SKIP
    ...     for text in s.chat("Hello"):
    ...         print(text, end="")

    :param base_url: the service's base URL; default ``$AICHATONLINE_BASE_URL``, else the real one.
    :param proxy: one proxy URL for http and https (``socks5://`` needs the ``socks`` extra).
    :param timeout: a number, a ``(connect, read)`` tuple, or a :class:`Timeout`.
    :param max_retries: retries after the first attempt (default 2; see :class:`RetryPolicy`).
    :param retry: a :class:`RetryPolicy`, for full control (not together with ``max_retries``).
    :param headers: extra or overriding request headers.
    :param verify: TLS verification: ``True``, ``False``, or the path of a CA bundle.
    :param reuse_token: keep the token for later chats (a fresh one when it is rejected).
    :param http: an existing :class:`requests.Session` to send through (not closed by :meth:`close`).
    :param max_line_bytes: the longest reply line accepted (default 1 MiB).
    :param pool_maxsize: connections kept per host (default 32; raise it for more threads).
    :param event_hooks: ``{"chat_start": [fn], ...}``: functions called with a :class:`ChatEvent`
        at each moment of a chat (the manual's "Event hooks" lists the events).
    :param cache: a :class:`ReplyCache` or the path of its file: replies replayed, not sent.
    :raises InvalidRequestError: a bad option; nothing is sent.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        proxy: Optional[str] = None,
        timeout: TimeoutTypes = None,
        max_retries: int = UNSET,
        retry: Optional[RetryPolicy] = None,
        headers: Optional[Mapping[str, str]] = None,
        verify: Union[bool, str] = True,
        reuse_token: bool = True,
        http: Optional[requests.Session] = None,
        max_line_bytes: int = DEFAULT_MAX_LINE,
        pool_maxsize: int = _DEFAULT_POOL,
        event_hooks: Optional[Mapping[str, Sequence[Hook]]] = None,
        cache: Union[str, os.PathLike[str], ReplyCache, None] = None,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        self.proxy = validate_proxy(proxy)
        _redact.remember(_password(self.base_url), _password(self.proxy), pin=True)
        self.timeout = Timeout.coerce(timeout)
        self.retry = validate_retry(max_retries, retry)
        self.headers = validate_headers(headers)
        self.verify = validate_verify(verify)
        self.reuse_token = check_bool("reuse_token", reuse_token)
        _check_http(http)
        self.max_line_bytes = check_int("max_line_bytes", max_line_bytes, low=1, high=MAX_LINE_LIMIT)
        pool_maxsize = check_int("pool_maxsize", pool_maxsize, low=1, high=MAX_CONNECTIONS)
        self._hooks = EventHooks(event_hooks)
        self.cache = _cache_option(cache)
        self._closed = False
        self._transport = Transport(
            self.base_url, http=http, proxy=self.proxy, verify=self.verify, pool_maxsize=pool_maxsize
        )
        headers = _merge_headers(protocol_headers(self.base_url), self.headers)
        chat_headers = dict(headers)
        if not any(key.lower() == "content-type" for key in chat_headers):
            chat_headers["Content-Type"] = "application/json"  # a user's own, in any case, wins
        # What messages, errors and logs show: the URLs without credentials.
        self._shown_chat_url = redact_url(f"{self.base_url}{CHAT_PATH}")
        self._chat = self._transport.endpoint(
            "POST", f"{self.base_url}{CHAT_PATH}", chat_headers, self._shown_chat_url
        )
        self._tokens = TokenStore(
            self._transport,
            url=f"{self.base_url}{TOKEN_PATH}",
            shown_url=redact_url(f"{self.base_url}{TOKEN_PATH}"),
            headers=headers,
            reuse=reuse_token,
        )

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not a ``requests.Session`` given as ``http``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._tokens.clear()
        self._transport.close()

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def ensure_pool(self, size: int, grow_to: Optional[int] = None) -> None:
        """Keep at least ``size`` connections (for ``size`` threads); when the pool must grow, make
        it ``grow_to`` large. A given ``http`` is left alone."""
        self._transport.ensure_pool(size, grow_to)

    def _check_open(self) -> None:
        if self._closed:
            raise AiChatOnlineError(
                "this Session is closed; create a new Session (or use aichatonline_sync.chat())"
            )

    def __repr__(self) -> str:
        proxy = f", proxy={redact_url(self.proxy)!r}" if self.proxy else ""
        state = ", closed" if self._closed else ""
        return f"<Session base_url={redact_url(self.base_url)!r}{proxy}{state}>"

    def __reduce__(self) -> Any:
        raise TypeError("a Session cannot be pickled: make one from its options where it is used")

    # -- the token --------------------------------------------------------------------------------

    def grab_token(self, refresh: bool = False) -> str:
        """Return the session's token, fetching it from ``getUniqueId`` when needed.

        :param refresh: fetch a new token even when one is kept.
        :raises TokenError: a 2xx reply without a usable token.
        :raises APIStatusError: a non-2xx reply (after retries).
        :raises APIConnectionError: the token request could not be made (after retries).
        """
        self._check_open()
        fetch = functools.partial(self._tokens.get, self.timeout, refresh=check_bool("refresh", refresh))
        return run_with_retries(fetch, self.retry, what="token request", url=self._tokens.shown_url)

    # -- chatting ---------------------------------------------------------------------------------

    def chat(
        self,
        messages: Any,
        *,
        model: Optional[str] = None,
        timeout: TimeoutTypes = None,
        conversation_id: Optional[str] = None,
        keep_text: bool = True,
        cancel: Optional[Cancellation] = None,
        **unknown: Any,
    ) -> ChatStream:
        """Send a chat and return its reply as a :class:`ChatStream` of text pieces.

        The call returns once the first piece has arrived; errors before it (after the retries)
        are raised here, errors after it while iterating.

        :param messages: a str (one user message) or a list of ``{"role", "content"}`` dicts.
        :param model: ``"gpt-4o-mini"`` (the only model the service offers) or ``None``.
        :param timeout: overrides the session's timeout for this chat.
        :param conversation_id: the upstream's ``conversationId`` (default: 10 random characters).
        :param keep_text: keep the text for :attr:`ChatStream.text` (``False`` saves memory).
        :param cancel: a :class:`Cancellation` that stops this chat from another thread.
        :raises InvalidRequestError: bad messages or options (an unknown option too, or an option
            of :class:`Session` itself), before anything is sent.
        :raises AiChatOnlineError: the chat failed before its first piece, after the retries
            (:class:`APIConnectionError`, :class:`APIStatusError`, :class:`TokenError`,
            :class:`ProtocolError` or :class:`UpstreamError`).
        """
        reject_options(unknown, valid=CHAT_OPTIONS, what="Session.chat()", elsewhere=SESSION_OPTIONS,
                       elsewhere_hint="belong to Session(...), not to one chat")
        self._check_open()
        chat_timeout = self.timeout if timeout is None else timeout
        chat = _prepare(messages, model, chat_timeout, conversation_id, keep_text, cancel)
        if self.cache is not None and (stored := _replay(chat, self.cache)) is not None:
            self._hooks.cache_hit(stored, url=self._shown_chat_url)
            return stored
        return self._hooks.run(functools.partial(self._send, chat), chat, self._shown_chat_url)

    def _send(self, chat: _Chat, call: Optional[ChatCall]) -> ChatStream:
        """The chat's attempts, each from the token to the first piece, under one ``Retrying``."""
        retrying = build_retrying(
            self.retry, what="chat request", deadline=chat.deadline, cancel=chat.cancel,
            url=self._shown_chat_url, on_retry=None if call is None else call.retry,
            step=self._step,
        )
        return retrying(self._attempt, chat, call)

    def _attempt(self, chat: _Chat, call: Optional[ChatCall]) -> ChatStream:
        """One attempt: the token, then the chat until its first piece. A token the upstream
        rejects is replaced once, within the attempt: ``max_retries`` does not count that."""
        token = self._tokens.get(chat.timeout, deadline=chat.deadline, cancel=chat.cancel)
        try:
            return self._open(chat, token, call)
        except (AuthenticationError, UpstreamError) as exc:
            if not _is_rejection(exc):
                raise
            logger.info("the upstream rejected the token (%s); fetching a fresh one", exc)
        fresh = self._tokens.get(chat.timeout, deadline=chat.deadline, cancel=chat.cancel, stale=token)
        return self._open(chat, fresh, call)

    def _step(self, exc: BaseException) -> str:
        """The step of an attempt that ``exc`` came from, as retry warnings name it."""
        return "token request" if getattr(exc, "url", None) == self._tokens.shown_url else "chat request"

    def complete(self, messages: Any, **options: Any) -> str:
        """Send a chat and return the whole reply as one str (same options as :meth:`chat`)."""
        options["keep_text"] = True  # the text is the result, and .partial of a failure
        with self.chat(messages, **options) as stream:
            for _ in stream:
                pass
            return stream.text

    def batch(
        self,
        prompts: Any,
        *,
        max_workers: int = 8,
        progress: bool = False,
        return_exceptions: bool = False,
        executor: Optional[concurrent.futures.Executor] = None,
        rate_limit: Optional[float] = None,
        on_result: Optional[Callable[[BatchResult], object]] = None,
        **chat_options: Any,
    ) -> list[Any]:
        """Run many prompts concurrently on this session; see :func:`aichatonline_sync.batch`."""
        from .batch import BatchOptions, run_batch

        run = BatchOptions(
            max_workers=max_workers, progress=progress, executor=executor, rate_limit=rate_limit,
            return_exceptions=return_exceptions, on_result=on_result,
        )
        session_options, chat_options = split_options(chat_options)
        return run_batch(
            prompts, session=self, session_options=session_options, chat_options=chat_options,
            options=run,
        )

    def _open(self, chat: _Chat, token: str, call: Optional[ChatCall] = None) -> ChatStream:
        """One attempt: post the chat and read until its first piece."""
        self._check_open()
        if chat.cancel is not None:
            chat.cancel.check("the chat request", self._shown_chat_url)
        _redact.remember(token)  # a token in use stays among the most recently remembered
        secrets = (*self._secrets(), token)
        response = self._chat.send(
            headers={TOKEN_HEADER: token},
            body=chat.body,
            timeout=chat.timeout.within(chat.deadline),
            secrets=secrets,
        )
        if not 200 <= response.status_code < 300:
            raise self._transport.status_error(
                response, url=self._shown_chat_url, what="the chat request", token_sent=True,
                secrets=secrets, deadline=chat.deadline, read_timeout=chat.timeout.read,
            )
        if response.headers.get("Content-Type", "").lower().startswith("text/html"):
            page = read_start(
                response, secrets=secrets, deadline=chat.deadline, read_timeout=chat.timeout.read
            )
            raise _html_error(page, self._shown_chat_url)
        return _read_reply(
            response, chat, self.cache, url=self._shown_chat_url, max_line=self.max_line_bytes,
            secrets=secrets, call=call,
        )

    def _secrets(self) -> tuple[Optional[str], ...]:
        password = urlsplit(self.proxy).password if self.proxy else None
        return (password, self._tokens.current)


def _cache_option(cache: Union[str, os.PathLike[str], ReplyCache, None]) -> Optional[ReplyCache]:
    """The ``cache=`` option as a :class:`ReplyCache` (a path: the process's one for it)."""
    if cache is None:
        return None
    from .cache import resolve_cache

    return resolve_cache(cache)


def _replay(chat: _Chat, cache: ReplyCache) -> Optional[ChatStream]:
    """The stored reply to this chat as a stream (nothing is sent), or ``None`` (a miss)."""
    pieces = cache.get(chat.model, chat.prompt)
    if pieces is None:
        return None
    where = f"the reply cache {cache.path!r}"
    if chat.cancel is not None:
        chat.cancel.check("the chat", where)
    logger.debug("reply cache hit in %r: %d pieces", cache.path, len(pieces))
    reply = StoredReply(pieces, url=where, keep_text=chat.keep_text, cancel=chat.cancel)
    return ChatStream(
        reply, conversation_id=chat.conversation_id, model=chat.model, prompt=chat.prompt
    )


def _read_reply(
    response: requests.Response,
    chat: _Chat,
    cache: Optional[ReplyCache],
    *,
    url: str,
    max_line: int,
    secrets: tuple[Optional[str], ...],
    call: Optional[ChatCall] = None,
) -> ChatStream:
    """Read a chat's reply until its first piece, as a stream; with a cache, the reply is
    stored once it was read to its end (a partial one never is)."""
    reply = (Reply if cache is None else RecordedReply)(
        response,
        url=url,
        deadline=chat.deadline,
        read_timeout=chat.timeout.read,
        max_line=max_line,
        keep_text=chat.keep_text,
        secrets=secrets,
        cancel=chat.cancel,
    )
    reply.prime()
    stream = ChatStream(
        reply, conversation_id=chat.conversation_id, model=chat.model, prompt=chat.prompt, call=call
    )
    if cache is not None and isinstance(reply, RecordedReply):
        recorded = reply.recorded

        def store(_text: str) -> None:  # done callbacks run only at the normal end
            cache.put(chat.model, chat.prompt, recorded)

        stream.add_done_callback(store)
    return stream


def _prepare(
    messages: Any,
    model: Optional[str],
    timeout: TimeoutTypes,
    conversation_id: Optional[str],
    keep_text: bool,
    cancel: Optional[Cancellation],
) -> _Chat:
    """Check every input of a chat, before anything is sent."""
    prompt = build_prompt(messages)
    if model in (None, ""):
        model = DEFAULT_MODEL
    elif model not in MODELS:
        raise InvalidRequestError(
            f"unknown model {model!r}: the service offers only {', '.join(MODELS)}"
        )
    chat_timeout = Timeout.coerce(timeout)
    if conversation_id is None:
        conversation_id = get_random_string()
    validate_conversation_id(conversation_id)
    check_bool("keep_text", keep_text)
    if cancel is not None and not isinstance(cancel, Cancellation):
        raise InvalidRequestError(f"cancel must be a Cancellation, not {type(cancel).__name__}")
    total = chat_timeout.total
    return _Chat(
        body=chat_body(conversation_id, prompt),
        prompt=prompt,
        conversation_id=conversation_id,
        model=str(model),
        timeout=chat_timeout,
        deadline=None if total is None else time.monotonic() + total,
        keep_text=keep_text,
        cancel=cancel,
    )


#: Options of :class:`Session`, by name (the module-level functions accept them all).
SESSION_OPTIONS = frozenset(inspect.signature(Session).parameters)
#: Options of :meth:`Session.chat` (``timeout`` is one of them: it needs no session of its own).
CHAT_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(Session.chat).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into ``(session_options, chat_options)``.

    :raises InvalidRequestError: an unknown option name.
    """
    unknown = set(options) - SESSION_OPTIONS - CHAT_OPTIONS
    if unknown:
        valid = ", ".join(sorted(SESSION_OPTIONS | CHAT_OPTIONS))
        raise InvalidRequestError(
            f"unknown option(s): {', '.join(sorted(unknown))}; valid options are: {valid}"
        )
    chat_options = {key: value for key, value in options.items() if key in CHAT_OPTIONS}
    session_options = {key: value for key, value in options.items() if key not in CHAT_OPTIONS}
    return session_options, chat_options


def _merge_headers(base: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` on top; a name given in another case replaces the base's."""
    headers = dict(base)
    lowered = {key.lower(): key for key in headers}
    for key, value in extra.items():
        old = lowered.get(key.lower())
        if old is not None:
            del headers[old]
        headers[key] = value
    return headers


def _html_error(page: str, url: str) -> ProtocolError:
    """The error for a chat answered with an HTML page (``page``: its start, secrets scrubbed)."""
    return ProtocolError(
        f"the chat reply from {url} is an HTML page, not a chat stream "
        f"(a captcha or an outage page?); it begins: {page[:200]!r}",
        body=page,
    )


def _check_http(http: Any) -> None:
    """A given ``requests.Session``: its headers are sent too, so they pass our checks."""
    if http is None:
        return
    if not isinstance(http, requests.Session):
        raise InvalidRequestError(f"http must be a requests.Session, not {type(http).__name__}")
    validate_headers(
        {
            k: v.decode("latin-1") if isinstance(v, bytes) else v
            for k, v in http.headers.items()
            if v is not None  # requests drops a header whose value is None
        },
        what="http.headers",
    )


def _password(url: Optional[str]) -> Optional[str]:
    try:
        return urlsplit(url).password if url else None
    except ValueError:
        return None


def _is_rejection(exc: BaseException) -> bool:
    """Did the upstream reject the token (a 401/403 status, or such an error line before text)?"""
    if isinstance(exc, AuthenticationError):  # an HTML block page is no verdict on the token
        return html_page_title(exc.headers, exc.body) is None
    return isinstance(exc, UpstreamError) and not exc.partial and exc.code in (401, 403)
