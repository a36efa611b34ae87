"""The exceptions of ``aichatonline_sync``.

Every error the library raises is an :class:`AiChatOnlineError`; no ``requests`` or ``urllib3``
exception escapes the public API (the original is kept as ``__cause__``). Whether a failure was a
timeout is ``.timed_out`` on every error (``True`` for an :class:`APITimeoutError`, and for an
:class:`IncompleteStreamError` of a reply that stalled)::

    AiChatOnlineError
    ├── InvalidRequestError (also a ValueError)  bad messages or options; raised before any network I/O
    ├── APIConnectionError                       could not connect, or the connection failed before a reply
    │   └── APITimeoutError
    ├── APIStatusError                           a non-2xx reply: .status_code, .body, .url
    │   ├── AuthenticationError                  401, 403
    │   └── RateLimitError                       429: .retry_after
    ├── TokenError                               the token endpoint answered 2xx without a usable token
    ├── ProtocolError                            a 2xx chat reply that is no chat stream
    ├── StreamError                              the stream failed after it began: .partial
    │   ├── IncompleteStreamError                connection dropped, or read timed out, mid-stream
    │   └── UpstreamError                        an error line from the upstream: .code, .message
    └── BatchError                               some prompts of a batch failed: .results, .errors
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from .redact import scrub

__all__ = [
    "AiChatOnlineError",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BatchError",
    "IncompleteStreamError",
    "InvalidRequestError",
    "ProtocolError",
    "RateLimitError",
    "StreamError",
    "TokenError",
    "UpstreamError",
    "html_page_title",
    "status_error",
]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict) and any(isinstance(v, str) for v in value.values()):
        return {k: scrub(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


class AiChatOnlineError(Exception):
    """Base class of every error raised by this library.

    Its message and every text attribute (``.body``, ``.headers``, ``.message``, ...) are masked of
    the secrets the library knows (tokens, proxy passwords; see :mod:`.redact`) when they are set,
    whoever sets them; ``.partial``, the reply's text as it was handed out, is kept as it came.

    Errors pickle with their attributes (``.partial``, ``.status_code``, ...), so a batch run in
    other processes hands them back whole.

    :ivar timed_out: ``True`` when the failure was a timeout: every :class:`APITimeoutError` (a
        connect or read timeout, or the total deadline, before the first piece), and an
        :class:`IncompleteStreamError` whose reply stalled after its first piece, past the read
        timeout or the total deadline. ``False`` for every other error. Decide on it, never on the
        message: the gateway answers 504 for it, 502 for other upstream failures.
    """

    timed_out: bool = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*map(_masked, args))

    def __setattr__(self, name: str, value: Any) -> None:
        # .partial is the reply's text as it was handed out, piece by piece: kept as it came.
        super().__setattr__(name, value if name == "partial" else _masked(value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class InvalidRequestError(AiChatOnlineError, ValueError):
    """Bad messages or options. Raised before any network I/O."""


class APIConnectionError(AiChatOnlineError):
    """Could not connect, or the connection failed before a reply arrived.

    :ivar url: the URL of the request (without credentials), or ``None``.
    """

    def __init__(self, message: str, *, url: Optional[str] = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.url = url
        #: ``False`` when asking again cannot help (an untrusted certificate, proxy credentials).
        self.retryable = retryable


class APITimeoutError(APIConnectionError):
    """A connect or read timeout, or the total deadline, before the first piece of text.

    Its :attr:`~AiChatOnlineError.timed_out` is ``True``.
    """

    timed_out = True


class APIStatusError(AiChatOnlineError):
    """The upstream answered with a non-2xx status.

    :ivar status_code: the HTTP status.
    :ivar body: the first 2 KiB of the reply body, as text.
    :ivar url: the URL of the request (without credentials).
    :ivar headers: the reply headers.
    :ivar retry_after: the delay asked for by ``Retry-After``/``retry-after-ms``, in seconds, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: str = "",
        url: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.url = url
        self.headers: dict[str, str] = dict(headers or {})
        self.retry_after = retry_after


class AuthenticationError(APIStatusError):
    """HTTP 401 or 403: the upstream rejected the token, even after one fresh token."""


class RateLimitError(APIStatusError):
    """HTTP 429. ``retry_after`` is the delay the upstream asked for, in seconds, or ``None``."""


class TokenError(AiChatOnlineError):
    """The token endpoint answered 2xx without a usable token.

    :ivar code: the ``code`` of the upstream's reply, when it carried one (an ``int`` when it is
        numeric), else ``None``.
    :ivar message: the ``message`` of the upstream's reply, when it carried one, else ``None``.
    """

    def __init__(self, message: str, *, code: Any = None, upstream_message: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = upstream_message


class ProtocolError(AiChatOnlineError):
    """A 2xx chat reply that is no chat stream (an HTML page, no line carrying a message, a line too long).

    :ivar body: the start of the reply body, as text.
    :ivar partial: the text handed out before the problem was found (usually ``""``).
    """

    def __init__(self, message: str, *, body: str = "", partial: str = "") -> None:
        super().__init__(message)
        self.body = body
        self.partial = partial


class StreamError(AiChatOnlineError):
    """The stream failed after it began. ``partial`` is the text handed out so far."""

    def __init__(self, message: str, *, partial: str = "") -> None:
        super().__init__(message)
        self.partial = partial


class IncompleteStreamError(StreamError):
    """The connection dropped, or a read timed out, in the middle of a reply.

    :ivar timed_out: ``True`` when the reply stalled: no data within the read timeout, or the total
        deadline passed; ``False`` when the connection broke or the stream was closed.
    """

    def __init__(self, message: str, *, partial: str = "", timed_out: bool = False) -> None:
        super().__init__(message, partial=partial)
        self.timed_out = timed_out


class UpstreamError(StreamError):
    """The upstream sent an error line (``{"code": ..., "message": ...}``) instead of text.

    :ivar code: the error code of the line (an ``int`` when it is numeric), or ``None``.
    :ivar message: the error message of the line.
    """

    def __init__(
        self, message: str, *, code: Any = None, upstream_message: str = "", partial: str = ""
    ) -> None:
        super().__init__(message, partial=partial)
        self.code = code
        self.message = upstream_message


class BatchError(AiChatOnlineError):
    """Some prompts of a batch failed; every prompt was still run.

    :ivar results: one entry per prompt, in input order: the text, or ``None`` where it failed.
    :ivar errors: ``{index: exception}`` for the prompts that failed.
    """

    def __init__(
        self, message: str, *, results: list[Optional[str]], errors: dict[int, BaseException]
    ) -> None:
        super().__init__(message)
        self.results = results
        self.errors = errors


def status_error(
    *,
    status: int,
    reason: str,
    headers: Mapping[str, str],
    body: str,
    url: str,
    what: str,
    retry_after: Optional[float],
    token_sent: bool,
) -> AiChatOnlineError:
    """The error for a non-2xx reply to ``what`` (``"the chat request"``, ...): the one mapping of
    HTTP statuses to exception classes.

    :param token_sent: whether the request carried a token (only then can a 401/403 mean that the
        upstream rejected it; a proxy that answers 401 instead of 407 is not the upstream).
    """
    reason = f" {reason}" if reason else ""
    if 100 <= status < 200:
        # http.client reads past 100 Continue only; any other interim reply (103 Early Hints)
        # comes out as if it were the answer, with the real one still unread behind it.
        return ProtocolError(
            f"{what} to {url} got an interim reply, HTTP {status}{reason}, where its answer "
            "should be: the HTTP layer skips only 100 Continue. A proxy or CDN in between that "
            "sends early hints must be told not to.",
            body=body,
        )
    if status == 407:  # only a proxy answers this: it is no reply of the service
        return APIConnectionError(
            f"the proxy refused {what} to {url}: HTTP 407{reason}. "
            "Check the proxy's user name and password.",
            url=url,
            retryable=False,
        )
    cls: type[APIStatusError] = APIStatusError
    hint = advice = ""
    page = html_page_title(headers, body)
    if 300 <= status < 400:
        location = headers.get("Location") or headers.get("location")
        advice = (
            f": it redirects to {location or '(no Location header)'}. Redirects are not followed "
            "(a token or a chat sent elsewhere would leak or be lost); check base_url"
        )
    elif status in (401, 403):
        cls = AuthenticationError
        hint = (
            " (the upstream rejected the token)"
            if token_sent
            else " (no token was sent yet: a proxy or gateway in between may require credentials)"
        )
    elif status == 429:
        cls = RateLimitError
        hint = " (rate limited" + (f"; retry after {retry_after:g} s)" if retry_after else ")")
    if page is not None:  # no answer of the service: a block page, a captcha, a proxy's page
        shown = f" titled {page!r}" if page else ""
        hint = (
            f" (an HTML page{shown}, not the service's answer: a firewall, CDN or proxy in "
            "between blocked or failed the request, e.g. a captcha or a block page)"
        )
        if status in (401, 403):
            advice = "; a fresh token does not help: try another network or proxy, or later"
    return cls(
        f"{what} failed: HTTP {status}{reason}{hint} from {url}{advice}",
        status_code=status,
        body=body,
        url=url,
        headers=headers,
        retry_after=retry_after,
    )


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def html_page_title(headers: Mapping[str, str], body: str) -> Optional[str]:
    """The ``<title>`` of a reply that is an HTML page (white space folded, at most 80
    characters; ``""`` without one), or ``None`` when the reply is no HTML page, by its
    ``Content-Type`` or by a body that begins like one."""
    content_type = next(
        (value for key, value in headers.items() if key.lower() == "content-type"), ""
    )
    start = body.lstrip()[:15].lower()
    if not (
        content_type.lower().startswith(("text/html", "application/xhtml"))
        or start.startswith(("<!doctype html", "<html"))
    ):
        return None
    found = _TITLE.search(body)
    return " ".join(found.group(1).split())[:80] if found else ""
