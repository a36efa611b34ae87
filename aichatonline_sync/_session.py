"""``Session``: the token, the pooled connection, retries and timeouts, shared by many chats."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from ._config import (
    RetryPolicy,
    Timeout,
    TimeoutTypes,
    redact_url,
    validate_base_url,
    validate_proxy,
)
from ._errors import (
    AiChatOnlineError,
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    InvalidRequestError,
    ProtocolError,
    RateLimitError,
    TokenError,
    UpstreamError,
)
from ._parser import DEFAULT_MAX_LINE
from ._prompt import build_prompt, get_random_string
from ._retry import parse_retry_after, run_with_retries
from ._stream import ChatStream, Reply
from ._transport import iter_body, translate_exception

__all__ = ["DEFAULT_MODEL", "MODELS", "Session"]

logger = logging.getLogger("aichatonline_sync")

DEFAULT_MODEL = "gpt-4o-mini"
MODELS = (DEFAULT_MODEL,)

TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"

#: The browser identity gpt4free sent (Firefox 119), minus encodings this client cannot decode.
BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/119.0",
    "Accept-Language": "de,en-US;q=0.7,en;q=0.3",
    "Accept-Encoding": "gzip, deflate",
    "Sec-Fetch-Dest": "empty",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Site": "same-origin",
    "TE": "trailers",
}

_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,256}")
_CONVERSATION_RE = re.compile(r"[\x21-\x7e]{1,128}")
_STATUS_BODY_LIMIT = 2048
_TOKEN_BODY_LIMIT = 65536
_DEFAULT_POOL = 10


def _read_start(response: requests.Response) -> str:
    """The first 2 KiB of a reply that is an error, as text; the response is closed."""
    body = b""
    try:
        for chunk in iter_body(response):
            body += chunk
            if len(body) >= _STATUS_BODY_LIMIT:
                break
    except Exception:
        logger.debug("could not read the body of an HTTP %s reply", response.status_code)
    finally:
        response.close()
    return body[:_STATUS_BODY_LIMIT].decode("utf-8", "replace")


def _status_error(
    response: requests.Response, url: str, what: str
) -> Union[APIStatusError, APIConnectionError]:
    """Read at most 2 KiB of a non-2xx reply and build the matching :class:`APIStatusError`."""
    text = _read_start(response)
    status = response.status_code
    if status == 407:  # only a proxy answers this: it is no reply of the service
        return APIConnectionError(
            f"the proxy refused {what} to {url}: HTTP 407 Proxy Authentication Required. "
            "Check the proxy's user name and password.",
            url=url,
            retryable=False,
        )
    retry_after = parse_retry_after(response.headers)
    cls: type[APIStatusError] = APIStatusError
    hint = ""
    if status in (401, 403):
        cls = AuthenticationError
        hint = " (the upstream rejected the token)"
    elif status == 429:
        cls = RateLimitError
        hint = " (rate limited" + (f"; retry after {retry_after:g} s)" if retry_after else ")")
    reason = response.reason or ""
    return cls(
        f"{what} failed: HTTP {status} {reason}{hint} from {url}",
        status_code=status,
        body=text,
        url=url,
        headers=dict(response.headers),
        retry_after=retry_after,
    )


class Session:
    """A blocking client session: one token, one connection pool, shared by many chats and threads.

    >>> with Session(timeout=30, max_retries=3) as s:       # doctest: +SKIP
    ...     for text in s.chat("Hello"):
    ...         print(text, end="")

    :param base_url: the service's base URL; default ``$AICHATONLINE_BASE_URL``, else the real one.
    :param proxy: one proxy URL for http and https (``socks5://`` needs the ``socks`` extra).
    :param timeout: a number, a ``(connect, read)`` tuple, or a :class:`Timeout`.
    :param max_retries: retries after the first attempt (see :class:`RetryPolicy`).
    :param retry: a :class:`RetryPolicy`, for full control.
    :param headers: extra or overriding request headers.
    :param verify: TLS verification: ``True``, ``False``, or a CA bundle path.
    :param reuse_token: keep the token for later chats (a fresh one when it is rejected).
    :param http: an existing :class:`requests.Session` to send through (not closed by :meth:`close`).
    :param max_line_bytes: the longest reply line accepted (default 1 MiB).
    :param pool_maxsize: connections kept per host (default 10; raise it for more threads).
    :raises InvalidRequestError: a bad option; nothing is sent.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        proxy: Optional[str] = None,
        timeout: TimeoutTypes = None,
        max_retries: int = 2,
        retry: Optional[RetryPolicy] = None,
        headers: Optional[Mapping[str, str]] = None,
        verify: Union[bool, str] = True,
        reuse_token: bool = True,
        http: Optional[requests.Session] = None,
        max_line_bytes: int = DEFAULT_MAX_LINE,
        pool_maxsize: int = _DEFAULT_POOL,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        self.proxy = validate_proxy(proxy)
        self.timeout = Timeout.coerce(timeout)
        if retry is not None:
            if not isinstance(retry, RetryPolicy):
                raise InvalidRequestError(
                    f"retry must be a RetryPolicy, not {type(retry).__name__}"
                )
            if max_retries not in (2, retry.max_retries):
                raise InvalidRequestError(
                    "give either max_retries or retry=RetryPolicy(max_retries=...), not both"
                )
            self.retry = retry
        else:
            self.retry = RetryPolicy(max_retries=max_retries)
        self.headers = self._check_headers(headers)
        if not isinstance(verify, (bool, str)):
            raise InvalidRequestError(
                f"verify must be True, False or a CA bundle path, not {verify!r}"
            )
        self.verify = verify
        if not isinstance(reuse_token, bool):
            raise InvalidRequestError(f"reuse_token must be True or False, not {reuse_token!r}")
        self.reuse_token = reuse_token
        if http is not None and not isinstance(http, requests.Session):
            raise InvalidRequestError(f"http must be a requests.Session, not {type(http).__name__}")
        for name, value in (("max_line_bytes", max_line_bytes), ("pool_maxsize", pool_maxsize)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a whole number >= 1, not {value!r}")
        self.max_line_bytes = max_line_bytes
        self._owns_http = http is None
        self._http = http if http is not None else self._make_http(pool_maxsize)
        self._pool_maxsize = pool_maxsize
        self._proxies = {"http": self.proxy, "https": self.proxy} if self.proxy else None
        self._verify: Union[bool, str] = verify
        if self._owns_http:
            # requests reads the environment (proxies, NO_PROXY, CA bundle variables, .netrc) on
            # every request, about a quarter of a short chat's cost: read it once, here.
            settings = self._http.merge_environment_settings(
                self.base_url, dict(self._proxies or {}), True, verify, None
            )
            self._proxies = settings["proxies"] or None
            self._verify = verify if settings["verify"] is None else settings["verify"]
            self._http.trust_env = False
        self._token: Optional[str] = None
        self._token_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._closed = False
        self._request_headers = self._build_headers()
        self._token_url = f"{self.base_url}{TOKEN_PATH}"
        self._chat_url = f"{self.base_url}{CHAT_PATH}"
        # The chat POST of a session that made its own requests.Session skips Session.request
        # (about a third of a short chat's cost): nothing a user set can be on that session
        # (auth, hooks, mounts), so the request is prepared as requests would, once, and each
        # chat only adds its token. A given ``http`` keeps the full path.
        self._chat_headers: Optional[CaseInsensitiveDict[str]] = None
        if self._owns_http:
            prepared = requests.PreparedRequest()
            prepared.prepare_url(self._chat_url, None)
            self._chat_url = prepared.url or self._chat_url
            merged: CaseInsensitiveDict[str] = CaseInsensitiveDict()  # requests' merge_setting
            for name, field in self._http.headers.items():
                merged[name] = field if isinstance(field, str) else field.decode("latin-1")
            merged.update(self._request_headers)
            self._chat_headers = merged
        # What messages, errors and logs show: the URLs without credentials.
        self._shown_token_url = redact_url(self._token_url)
        self._shown_chat_url = redact_url(self._chat_url)

    # -- set-up ---------------------------------------------------------------------------------

    @staticmethod
    def _check_headers(headers: Optional[Mapping[str, str]]) -> dict[str, str]:
        if headers is None:
            return {}
        if not isinstance(headers, Mapping):
            raise InvalidRequestError(f"headers must be a mapping, not {type(headers).__name__}")
        checked = {}
        for key, value in headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidRequestError(f"header names and values must be str: {key!r}")
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key):
                raise InvalidRequestError(f"invalid header name {key!r}")
            if any(ch in value for ch in "\r\n\0"):
                raise InvalidRequestError(f"the value of header {key!r} contains a line break")
            checked[key] = value
        return checked

    def _build_headers(self) -> dict[str, str]:
        parts = urlsplit(self.base_url)
        headers = dict(BROWSER_HEADERS)
        headers["Referer"] = f"{self.base_url}/chatgpt/chat/"
        headers["Origin"] = f"{parts.scheme}://{parts.netloc}"
        headers["Alt-Used"] = parts.netloc
        lowered = {key.lower(): key for key in headers}
        for key, value in self.headers.items():
            old = lowered.get(key.lower())
            if old is not None:
                del headers[old]
            headers[key] = value
        return headers

    @staticmethod
    def _make_http(pool_maxsize: int) -> requests.Session:
        http = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        return http

    def ensure_pool(self, size: int) -> None:
        """Make the connection pool hold at least ``size`` connections (for ``size`` threads).

        Only for a session that made its own ``requests.Session``; a given ``http`` is left alone.
        """
        if not self._owns_http or size <= self._pool_maxsize:
            return
        with self._pool_lock:
            if size <= self._pool_maxsize:
                return
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
            self._http.mount("http://", adapter)
            self._http.mount("https://", adapter)
            self._pool_maxsize = size

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not a ``requests.Session`` given as ``http``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._token = None
        if self._owns_http:
            _close_pools(self._http)
            self._http.close()

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise AiChatOnlineError(
                "this Session is closed; create a new Session (or use aichatonline_sync.chat())"
            )

    def __repr__(self) -> str:
        proxy = f", proxy={redact_url(self.proxy)!r}" if self.proxy else ""
        state = ", closed" if self._closed else ""
        return f"<Session base_url={redact_url(self.base_url)!r}{proxy}{state}>"

    # -- helpers --------------------------------------------------------------------------------

    def _secrets(self, *extra: Optional[str]) -> tuple[Optional[str], ...]:
        password = urlsplit(self.proxy).password if self.proxy else None
        return (password, self._token, *extra)

    def _timeout_for(self, timeout: Timeout, deadline: Optional[float]) -> tuple[Any, Any]:
        connect, read = timeout.connect, timeout.read
        if deadline is not None:
            remaining = max(0.001, deadline - time.monotonic())
            connect = remaining if connect is None else min(connect, remaining)
            read = remaining if read is None else min(read, remaining)
        return (connect, read)

    def _send(
        self,
        method: str,
        url: str,
        *,
        timeout: Timeout,
        deadline: Optional[float],
        headers: Optional[dict[str, str]] = None,
        json: Any = None,
        token: Optional[str] = None,
    ) -> requests.Response:
        self._check_open()
        connect_read = self._timeout_for(timeout, deadline)
        try:
            return self._http.request(
                method,
                url,
                headers=headers if headers is not None else self._request_headers,
                json=json,
                timeout=connect_read,
                proxies=self._proxies,
                verify=self._verify,
                stream=True,
                allow_redirects=False,
            )
        except Exception as exc:
            raise self._send_error(exc, url.split("?", 1)[0], token, connect_read) from exc

    def _send_error(
        self, exc: Exception, url: str, token: Optional[str], connect_read: tuple[Any, Any]
    ) -> AiChatOnlineError:
        """The library's error for a request that failed before any reply (one place)."""
        return translate_exception(
            exc,
            url=url,
            secrets=self._secrets(token),
            timeout=connect_read[0]
            if isinstance(exc, requests.exceptions.ConnectTimeout)
            else connect_read[1],
            proxy=self.proxy,
        )

    def _post_chat(
        self, body: dict[str, str], token: str, timeout: Timeout, deadline: Optional[float]
    ) -> requests.Response:
        """The chat POST as ``requests.Session.request`` sends it, without preparing it again.

        ``Session.request`` merges the session's settings and prepares the request at every call;
        here the headers were merged once, and the request goes to ``Session.send`` as it would
        from there. Same bytes on the wire (headers, then cookies, then the body's headers), and
        the same ``send``: cookies, hooks, redirect handling, and mocks that patch ``send`` or an
        adapter (``requests-mock``, ``responses``) see it.
        """
        self._check_open()
        assert self._chat_headers is not None
        http = self._http
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        headers = self._chat_headers.copy()
        headers["UniqueId"] = token
        if "Content-Type" not in headers:  # a user's own, in any case, is kept
            headers["Content-Type"] = "application/json"
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = self._chat_url
        request.headers = headers
        request.hooks = {"response": []}
        connect_read = self._timeout_for(timeout, deadline)
        try:
            if http.cookies:  # what the token reply (or an earlier chat) set
                request.prepare_cookies(http.cookies)
            request.body = data
            headers["Content-Length"] = str(len(data))
            return http.send(
                request,
                stream=True,
                timeout=connect_read,
                verify=self._verify,
                cert=None,
                proxies=self._proxies or {},
                allow_redirects=False,
            )
        except Exception as exc:
            raise self._send_error(exc, self._shown_chat_url, token, connect_read) from exc

    # -- the token ------------------------------------------------------------------------------

    def grab_token(self, refresh: bool = False) -> str:
        """Return the session's token, fetching it from ``getUniqueId`` when needed.

        :param refresh: fetch a new token even when one is kept.
        :raises TokenError: a 2xx reply without a usable token.
        :raises APIStatusError: a non-2xx reply (after retries).
        :raises APIConnectionError: the token request could not be made (after retries).
        """
        self._check_open()
        return self._token_for(timeout=self.timeout, deadline=None, refresh=refresh)

    def _token_for(
        self,
        *,
        timeout: Timeout,
        deadline: Optional[float],
        refresh: bool = False,
        stale: Optional[str] = None,
    ) -> str:
        if not self.reuse_token:
            return self._fetch_token(timeout, deadline)
        with self._token_lock:
            current = self._token
            if current is not None and not refresh and (stale is None or current != stale):
                return current
            token = self._fetch_token(timeout, deadline)
            self._token = token
            return token

    def _fetch_token(self, timeout: Timeout, deadline: Optional[float]) -> str:
        def attempt() -> str:
            url = f"{self._token_url}?canvas=-{get_random_string()}"
            response = self._send("GET", url, timeout=timeout, deadline=deadline)
            if not 200 <= response.status_code < 300:
                raise _status_error(response, self._shown_token_url, "the token request")
            return self._read_token(response)

        return run_with_retries(attempt, self.retry, what="token request", deadline=deadline)

    def _read_token(self, response: requests.Response) -> str:
        body = b""
        try:
            for chunk in iter_body(response):
                body += chunk
                if len(body) > _TOKEN_BODY_LIMIT:
                    raise TokenError(
                        f"the token reply from {self._shown_token_url} is larger than "
                        f"{_TOKEN_BODY_LIMIT} bytes; not a token"
                    )
        except ProtocolError as exc:
            raise TokenError(f"the token reply from {self._shown_token_url} is unreadable: {exc}") from exc
        except AiChatOnlineError:
            raise
        except Exception as exc:
            raise translate_exception(exc, url=self._shown_token_url, secrets=self._secrets()) from exc
        finally:
            response.close()
        try:
            data = json.loads(body)
        except ValueError:
            raise TokenError(
                f"the token reply from {self._shown_token_url} is not JSON; it begins: "
                f"{body[:200].decode('utf-8', 'replace')!r}"
            ) from None
        token = data.get("data") if isinstance(data, dict) else None
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            shape = (
                "missing"
                if token is None
                else f"a {type(token).__name__} that is not a short printable string"
            )
            raise TokenError(
                f"the token reply from {self._shown_token_url} has no usable token: its 'data' is {shape}"
            )
        logger.debug("got a token from %s", self._shown_token_url)
        return token

    # -- chatting -------------------------------------------------------------------------------

    def chat(
        self,
        messages: Any,
        *,
        model: Optional[str] = None,
        timeout: TimeoutTypes = None,
        conversation_id: Optional[str] = None,
        keep_text: bool = True,
        _on_open: Optional[Callable[[ChatStream], None]] = None,
        _sleep: Optional[Callable[[float], None]] = None,
    ) -> ChatStream:
        """Send a chat and return its reply as a :class:`ChatStream` of text pieces.

        The call returns once the first piece has arrived; errors before it (after the retries)
        are raised here, errors after it while iterating.

        :param messages: a str (one user message) or a list of ``{"role", "content"}`` dicts.
        :param model: ``"gpt-4o-mini"`` (the only model the service offers) or ``None``.
        :param timeout: overrides the session's timeout for this chat.
        :param conversation_id: the upstream's ``conversationId`` (default: 10 random characters).
        :param keep_text: keep the text for :attr:`ChatStream.text` (``False`` saves memory).
        :raises InvalidRequestError: bad messages or options, before anything is sent.
        """
        self._check_open()
        prompt = build_prompt(messages)
        model = self._check_model(model)
        chat_timeout = self.timeout if timeout is None else Timeout.coerce(timeout)
        if conversation_id is None:
            conversation_id = get_random_string()
        elif not isinstance(conversation_id, str) or not _CONVERSATION_RE.fullmatch(
            conversation_id
        ):
            raise InvalidRequestError(
                f"conversation_id must be 1-128 printable characters without spaces, "
                f"not {conversation_id!r}"
            )
        if not isinstance(keep_text, bool):
            raise InvalidRequestError(f"keep_text must be True or False, not {keep_text!r}")
        deadline = time.monotonic() + chat_timeout.total if chat_timeout.total else None
        body = {"conversationId": conversation_id, "prompt": prompt}
        refreshed = False

        def attempt() -> ChatStream:
            nonlocal refreshed
            token = self._chat_token(chat_timeout, deadline)
            try:
                return self._open(body, token, model, chat_timeout, deadline, keep_text, _on_open)
            except (AuthenticationError, UpstreamError) as exc:
                if refreshed or not _is_auth_rejection(exc):
                    raise
                refreshed = True
                logger.info("the upstream rejected the token (%s); fetching a fresh one", exc)
                token = self._chat_token(chat_timeout, deadline, stale=token)
                return self._open(body, token, model, chat_timeout, deadline, keep_text, _on_open)

        try:
            return run_with_retries(
                attempt, self.retry, what="chat request", deadline=deadline, sleep=_sleep
            )
        except _TokenFailure as failure:
            raise failure.error from failure.error.__cause__

    def _chat_token(
        self, timeout: Timeout, deadline: Optional[float], stale: Optional[str] = None
    ) -> str:
        try:
            return self._token_for(timeout=timeout, deadline=deadline, stale=stale)
        except AiChatOnlineError as exc:
            # The token request has its own retries: the chat's must not multiply them.
            raise _TokenFailure(exc) from exc

    @staticmethod
    def _check_model(model: Optional[str]) -> str:
        if model is None or model == "":
            return DEFAULT_MODEL
        if model not in MODELS:
            raise InvalidRequestError(
                f"unknown model {model!r}: the service offers only {', '.join(MODELS)}"
            )
        return model

    def _open(
        self,
        body: dict[str, str],
        token: str,
        model: str,
        timeout: Timeout,
        deadline: Optional[float],
        keep_text: bool,
        on_open: Optional[Callable[[ChatStream], None]] = None,
    ) -> ChatStream:
        if self._chat_headers is not None:
            response = self._post_chat(body, token, timeout, deadline)
        else:
            headers = dict(self._request_headers)
            headers["UniqueId"] = token
            if not any(key.lower() == "content-type" for key in headers):
                headers["Content-Type"] = "application/json"
            response = self._send(
                "POST",
                self._chat_url,
                timeout=timeout,
                deadline=deadline,
                headers=headers,
                json=body,
                token=token,
            )
        if not 200 <= response.status_code < 300:
            raise _status_error(response, self._shown_chat_url, "the chat request")
        content_type = response.headers.get("Content-Type", "").lower()
        if content_type.startswith("text/html"):
            page = _read_start(response)
            raise ProtocolError(
                f"the chat reply from {self._shown_chat_url} is an HTML page, not a chat stream "
                f"(a captcha or an outage page?); it begins: {page[:200]!r}",
                body=page,
            )
        reply = Reply(
            response,
            url=self._shown_chat_url,
            deadline=deadline,
            read_timeout=timeout.read,
            max_line=self.max_line_bytes,
            keep_text=keep_text,
            secrets=self._secrets(token),
        )
        stream = ChatStream(reply, conversation_id=body["conversationId"], model=model)
        if on_open is not None:  # lets a batch abort a chat still waiting for its first piece
            try:
                on_open(stream)
            except BaseException:
                stream.close()
                raise
        stream._prime()
        return stream

    def batch(self, prompts: Any, **batch_options: Any) -> list[Any]:
        """Run many prompts concurrently on this session; see :func:`aichatonline_sync.batch`."""
        from ._batch import batch

        return batch(prompts, session=self, **batch_options)

    def complete(self, messages: Any, **options: Any) -> str:
        """Send a chat and return the whole reply as one str (same options as :meth:`chat`)."""
        options["keep_text"] = True  # the text is the result, and .partial of a failure
        with self.chat(messages, **options) as stream:
            for _ in stream:
                pass
            return stream.text


def _close_pools(http: requests.Session) -> None:
    """Close every pooled connection now. urllib3 2's ``PoolManager.clear()`` only forgets its
    pools, which then close when garbage-collected: late if a stream or an error still holds them."""
    for adapter in http.adapters.values():
        managers = [getattr(adapter, "poolmanager", None)]
        managers.extend(getattr(adapter, "proxy_manager", {}).values())
        for manager in managers:
            pools = getattr(manager, "pools", None)
            if pools is None:
                continue
            for key in list(pools.keys()):
                pool = pools.get(key)
                if pool is not None:
                    pool.close()


class _TokenFailure(Exception):
    """Carries a token error through the chat's retries, which must not retry it again."""

    def __init__(self, error: AiChatOnlineError) -> None:
        super().__init__(str(error))
        self.error = error


def _is_auth_rejection(exc: BaseException) -> bool:
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, UpstreamError) and not exc.partial and exc.code in (401, 403)
