"""The transport: every request is sent here, every reply body is read here, and every exception of
``requests``, ``urllib3``, PySocks or the socket layer is turned into ours here.

This is the one module that touches anything private or undocumented of requests, urllib3,
http.client or the socket layer. Each use, why, and the public fallback that runs when the internals
are not what this module expects (tests/test_transport.py runs the streaming cases on the fallback):

1. ``response.raw._fp`` (urllib3's ``http.client.HTTPResponse``), its ``fp`` (the buffered socket
   reader) and its ``chunked``, ``length`` and ``will_close`` attributes. The body is read with
   ``fp.read1`` (one system call: whatever has arrived) and de-chunked by ``_wire.framing``, so each
   line is handed out as soon as it arrives in every framing, with and without gzip. Why: urllib3
   1.26 has no ``read1``; urllib3 2's ``read1`` is slow on one-line chunks; ``iter_content`` holds
   lines back on Content-Length and close-delimited bodies and on gzip (STREAMING.md).
   Fallback: ``raw.read1(n, decode_content=False)`` (urllib3 2.2 and later), else
   ``raw.stream(n, decode_content=False)`` (before 2.2: prompt on chunked bodies, whole reads
   otherwise), decoded by ``_wire.framing`` in the same bounded steps.
2. ``raw._connection.sock``: its timeout is shortened so that no read waits past a chat's total
   deadline. Fallback: the deadline is checked between reads, each bounded by the read timeout.
3. The same socket is shut down to abort a stream that another thread is reading (closing the
   response from here would wait for the reader's lock instead of waking it). Fallback:
   ``response.close()``, which may wait for the blocked read to end.
4. ``HTTPAdapter.poolmanager.pools`` and ``proxy_manager``: closing a session closes its pooled
   connections at once (urllib3 2's ``PoolManager.clear()`` leaves them to the garbage collector).
   Fallback: ``requests.Session.close()`` alone.

No other module reads a private name of another package or of this one.
"""

from __future__ import annotations

import collections
import http.client
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .._wire import redact as _redact
from .._wire.errors import (
    AiChatOnlineError,
    APIConnectionError,
    APITimeoutError,
    IncompleteStreamError,
    InvalidRequestError,
    ProtocolError,
    TokenError,
    status_error,
)
from .._wire.framing import READ_SIZE, BodyTruncated, Decoder, dechunk, make_decoder
from .._wire.protocol import parse_retry_after
from .._wire.redact import redact_url, scrub, scrub_quote
from .cancel import Cancellation

__all__ = [
    "BodyTruncated",
    "Cancelled",
    "DeadlineExceeded",
    "Endpoint",
    "Transport",
    "ABORTED",
    "FAILURES",
    "Failure",
    "Stage",
    "abort",
    "classify",
    "iter_body",
    "read_start",
    "scrub",
    "scrub_quote",
    "translate_exception",
]

logger = _redact.logger("aichatonline_sync")

#: Bytes of a non-2xx reply kept in the error (``APIStatusError.body``).
STATUS_BODY_LIMIT = 2048

TimeoutPair = tuple[Optional[float], Optional[float]]


class DeadlineExceeded(Exception):
    """The total deadline of a chat passed (internal; mapped to a timeout error)."""


class Cancelled(Exception):
    """The chat's :class:`Cancellation` was cancelled while its body was read (internal; the
    stream maps it)."""


# --- sending ------------------------------------------------------------------------------------


class Transport:
    """The ``requests.Session`` that every request goes through, with its proxy and TLS settings.

    The settings requests would merge at every call (the session's proxies, ``verify`` and
    ``cert``, and with ``trust_env`` the environment: proxy variables, ``NO_PROXY``, CA bundle
    variables) are merged once, here; a session made here is then told not to read the
    environment again (``trust_env = False``). A given ``http`` session keeps its mounts,
    adapters, cookies, auth and hooks.
    """

    def __init__(
        self,
        base_url: str,
        *,
        http: Optional[requests.Session] = None,
        proxy: Optional[str] = None,
        verify: Union[bool, str] = True,
        pool_maxsize: int = 10,
    ) -> None:
        self.proxy = proxy
        self.owns_http = http is None
        self.http = http if http is not None else _new_http(pool_maxsize)
        self._pool_maxsize = pool_maxsize
        self._pool_lock = threading.Lock()
        proxies = {"http": proxy, "https": proxy} if proxy else {}
        settings = self.http.merge_environment_settings(base_url, proxies, True, verify, None)
        self._send_settings: dict[str, Any] = {
            "proxies": settings["proxies"],
            "verify": verify if settings["verify"] is None else settings["verify"],
            "cert": settings["cert"],
            "stream": True,
            "allow_redirects": False,
        }
        if self.owns_http:
            self.http.trust_env = False

    def endpoint(self, method: str, url: str, headers: Mapping[str, str], shown_url: str) -> Endpoint:
        """One endpoint of the service, to send requests to (see :class:`Endpoint`)."""
        return Endpoint(self, method, url, headers, shown_url)

    def send(
        self, prepared: requests.PreparedRequest, *, timeout: TimeoutPair, shown_url: str,
        secrets: Iterable[Optional[str]],
    ) -> requests.Response:
        """Send a prepared request and return its streamed response (redirects are not followed).

        :raises AiChatOnlineError: the request failed before any reply (mapped by
            :func:`translate_exception`, the original kept as ``__cause__``).
        """
        try:
            return self.http.send(prepared, timeout=timeout, **self._send_settings)
        except Exception as exc:
            raise translate_exception(
                exc, url=shown_url, secrets=secrets, timeout=timeout, proxy=self.proxy
            ) from exc

    def status_error(
        self,
        response: requests.Response,
        *,
        url: str,
        what: str,
        token_sent: bool,
        secrets: Iterable[Optional[str]] = (),
        deadline: Optional[float] = None,
        read_timeout: Optional[float] = None,
    ) -> AiChatOnlineError:
        """The error for a non-2xx ``response`` (its first 2 KiB read; the response closed).

        The upstream may echo what it was sent: ``secrets`` (the token) and the proxy's password
        are scrubbed from the reason phrase, every header value and the body. The body is read
        no longer than ``deadline`` (what arrived by then is kept).
        """
        hidden = (*secrets, *_password_of(self.proxy))
        if 100 <= response.status_code < 200:
            # The real answer is still on the connection, unread: it must never go back to the
            # pool, where the next request would read that answer as its own.
            abort(response)
            response.close()
            body = ""
        else:
            body = read_start(response, secrets=hidden, deadline=deadline, read_timeout=read_timeout)
        return status_error(
            status=response.status_code,
            reason=scrub(response.reason or "", hidden),
            headers={key: scrub(value, hidden) for key, value in response.headers.items()},
            body=body,
            url=url,
            what=what,
            retry_after=parse_retry_after(response.headers),
            token_sent=token_sent,
        )

    def ensure_pool(self, size: int, grow_to: Optional[int] = None) -> None:
        """Keep at least ``size`` connections per host (one per thread); when the pool must grow,
        make it ``grow_to`` large (default ``size``). A given ``http`` session is left as it is."""
        if not self.owns_http or size <= self._pool_maxsize:
            return
        with self._pool_lock:
            if size > self._pool_maxsize:
                new = max(size, grow_to or size)
                logger.debug("connection pool: %d -> %d connections", self._pool_maxsize, new)
                _swap_adapter(self.http, new)
                self._pool_maxsize = new

    def close(self) -> None:
        """Close the pooled connections of a session made here (a given one is left open)."""
        if self.owns_http:
            _close_pools(self.http)
            self.http.close()


class Endpoint:
    """One endpoint: its request is prepared by requests once, and copied for every call.

    ``requests.Session.request`` merges the session's headers, params, auth and hooks and
    validates every header at each call, more than a third of a short chat's cost. Here
    ``Session.prepare_request`` does that once, at the first call; each call then takes a
    :meth:`~requests.PreparedRequest.copy` and sets its own parts with PreparedRequest's public
    ``prepare_*`` methods: the URL (when it has a query of its own), extra headers (the token),
    the body, and the cookies the session holds now (the upstream may set some). So a given
    ``http`` session's headers, params and auth are taken when an endpoint is first used, as its
    environment settings are; auth that signs each request anew is not supported.
    """

    def __init__(
        self,
        transport: Transport,
        method: str,
        url: str,
        headers: Mapping[str, str],
        shown_url: str,
    ) -> None:
        self._transport = transport
        self._method = method
        self._url = url
        self._headers = dict(headers)
        self.shown_url = shown_url
        self._template: Optional[requests.PreparedRequest] = None

    def _prepared(self) -> requests.PreparedRequest:
        template = self._template
        if template is None:
            request = requests.Request(self._method, self._url, headers=self._headers)
            template = self._transport.http.prepare_request(request)
            template.headers.pop("Cookie", None)  # set again at each call, from the session's jar
            self._template = template
        return template.copy()

    def send(
        self,
        *,
        timeout: TimeoutPair,
        secrets: Iterable[Optional[str]] = (),
        query: str = "",
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
    ) -> requests.Response:
        """Send one request to this endpoint and return its streamed response.

        :param query: appended to the URL (``"?canvas=-..."``).
        :raises AiChatOnlineError: the request failed before any reply.
        """
        try:
            prepared = self._prepared()
            if query:
                prepared.prepare_url(self._url + query, self._transport.http.params)
            if headers:
                prepared.headers.update(headers)
            prepared.prepare_body(body, None)
            cookies = self._transport.http.cookies
            if cookies:  # an empty jar would add nothing, at a cost
                prepared.prepare_cookies(cookies)
        except Exception as exc:
            raise translate_exception(
                exc, url=self.shown_url, secrets=secrets, stage="preparing"
            ) from exc
        return self._transport.send(
            prepared, timeout=timeout, shown_url=self.shown_url, secrets=secrets
        )


def _adapter(pool_maxsize: int) -> HTTPAdapter:
    # max_retries=0: tenacity owns the retries, and urllib3's own would multiply them.
    return HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)


def _new_http(pool_maxsize: int) -> requests.Session:
    http = requests.Session()
    adapter = _adapter(pool_maxsize)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def _swap_adapter(http: requests.Session, pool_maxsize: int) -> None:
    """Give ``http`` a new adapter with a larger pool while other threads send through it.

    ``Session.mount`` reorders ``http.adapters`` in place, under the feet of a thread that is
    looking up its adapter in it (``OrderedDict mutated during iteration``). So a new mapping,
    the same prefixes in the same order, replaces the old one in one assignment; the old adapter
    is then closed: its idle connections now, the ones in use as they are given back.
    """
    adapter = _adapter(pool_maxsize)
    old = http.adapters
    http.adapters = collections.OrderedDict(
        (prefix, adapter if prefix in ("http://", "https://") else mounted)
        for prefix, mounted in old.items()
    )
    replaced = {id(old[p]): old[p] for p in ("http://", "https://") if p in old}
    for mounted in replaced.values():
        mounted.close()


def _close_pools(http: requests.Session) -> None:
    """Close every pooled connection now (internal 4; the fallback is ``http.close()`` alone)."""
    for adapter in http.adapters.values():
        managers = [getattr(adapter, "poolmanager", None)]
        managers.extend(getattr(adapter, "proxy_manager", {}).values())
        for manager in managers:
            pools = getattr(manager, "pools", None)
            if pools is None or not hasattr(pools, "keys"):
                continue
            for key in list(pools.keys()):
                pool = pools.get(key)
                if pool is not None:
                    pool.close()


# --- reading ------------------------------------------------------------------------------------


class _Wire:
    """The ``http.client`` response under a ``requests`` response, read directly (internals 1, 2)."""

    def __init__(self, fp: http.client.HTTPResponse, read1: Callable[[int], bytes], sock: Any):
        self.fp = fp
        self.read1 = read1
        self.sock = sock if isinstance(sock, socket.socket) else None

    @classmethod
    def of(cls, response: requests.Response) -> Optional[_Wire]:
        """The wire under ``response``, or ``None`` when the internals are not as expected."""
        raw = response.raw
        fp = getattr(raw, "_fp", None)
        read1 = getattr(getattr(fp, "fp", None), "read1", None)
        if not isinstance(fp, http.client.HTTPResponse) or not callable(read1):
            return None
        if not isinstance(getattr(fp, "chunked", None), bool) or not hasattr(fp, "will_close"):
            return None
        return cls(fp, read1, _socket_of(raw))

    def chunks(self, deadline: Optional[float], read_timeout: Optional[float]) -> Iterator[bytes]:
        """The body's bytes as they arrive (de-chunked when chunked); no read waits past
        ``deadline``."""
        read1 = self.read1
        if deadline is not None:
            read1 = _deadline_read1(read1, self.sock, deadline, read_timeout)
        if self.fp.chunked:
            return dechunk(read1)
        return self._plain(read1)

    def _plain(self, read1: Callable[[int], bytes]) -> Iterator[bytes]:
        """A Content-Length or close-delimited body, one system call at a time."""
        fp = self.fp
        length = fp.length
        if length is None:
            while True:
                data = read1(READ_SIZE)
                if not data:
                    return
                yield data
        while length:
            data = read1(min(length, READ_SIZE))
            if not data:
                fp.length = length
                raise BodyTruncated(f"{length} bytes of the Content-Length never arrived")
            length -= len(data)
            yield data
        fp.length = 0

    def finish(self, response: requests.Response) -> None:
        """The body was read to its end: hand the connection back for reuse (http.client must
        see its response closed first), or close it when the server said so."""
        will_close = self.fp.will_close
        self.fp.close()
        if will_close:
            response.close()
        else:
            response.raw.release_conn()


def _socket_of(raw: Any) -> Optional[socket.socket]:
    """The socket under a urllib3 response (1.26 and 2.x), or ``None`` (internal 2)."""
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _deadline_read1(
    read1: Callable[[int], bytes],
    sock: Optional[socket.socket],
    deadline: float,
    read_timeout: Optional[float],
) -> Callable[[int], bytes]:
    """``read1`` that never waits past ``deadline``: the socket's timeout is shortened near it."""
    shortened = False

    def read(n: int) -> bytes:
        nonlocal shortened
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        if sock is not None and (read_timeout is None or remaining < read_timeout):
            sock.settimeout(remaining)
            shortened = True
        try:
            return read1(n)
        except socket.timeout:
            if shortened and deadline - time.monotonic() <= 0.001:
                raise DeadlineExceeded() from None
            raise

    return read


def _public_reads(raw: Any) -> Iterable[bytes]:
    """The public fallback: urllib3's own reads, undecoded (:func:`_decoded` decodes them).

    ``read1`` (urllib3 2.2 and later) is one read; before 2.2 there is none, and ``read(n)`` on
    urllib3 2.0 and 2.1 reads again and again until it has ``n`` bytes (losing what it had when a
    read fails, such as the text before a reset), so there ``stream`` reads one chunk at a time.
    """
    if hasattr(raw, "read1"):
        return iter(lambda: raw.read1(READ_SIZE, decode_content=False), b"")
    return raw.stream(READ_SIZE, decode_content=False)  # type: ignore[no-any-return]


def iter_body(
    response: requests.Response,
    *,
    deadline: Optional[float] = None,
    read_timeout: Optional[float] = None,
    cancel: Optional[Cancellation] = None,
) -> Iterator[bytes]:
    """Yield the decoded bytes of a streamed reply as they arrive, in every framing.

    On a normal end the connection goes back to the pool (or is closed when the server said so).
    ``deadline`` (a :func:`time.monotonic` value) bounds every read and every decode step, and
    ``cancel`` is checked at every step too.

    :raises BodyTruncated: the body ended early.
    :raises DeadlineExceeded: the total deadline passed.
    :raises Cancelled: ``cancel`` was cancelled.
    :raises ProtocolError: bad chunked framing or content encoding, or a body that expands past
        :data:`~aichatonline_sync._wire.framing.MAX_EXPANSION`.
    :raises OSError: socket errors and timeouts, as the socket raises them.
    """
    wire = _Wire.of(response)
    decoder = make_decoder(response.headers.get("Content-Encoding"))
    if wire is None:
        yield from _decoded(_public_reads(response.raw), decoder, deadline, cancel)
        response.raw.release_conn()
        return
    yield from _decoded(wire.chunks(deadline, read_timeout), decoder, deadline, cancel)
    wire.finish(response)


def _decoded(
    source: Iterable[bytes],
    decoder: Optional[Decoder],
    deadline: Optional[float],
    cancel: Optional[Cancellation],
) -> Iterator[bytes]:
    """The bytes of ``source`` decoded by ``decoder`` (``None``: as they are), in steps of at
    most :data:`~aichatonline_sync._wire.framing.DECODE_STEP` (or one read) bytes: the one loop every body goes
    through. The deadline and the cancellation are checked before each step, because a body
    already in memory can decode to far more than any read returns."""
    for data in source:
        steps = (data,) if decoder is None else decoder.decode(data)
        for step in steps:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded()
            if cancel is not None and cancel.cancelled:
                raise Cancelled()
            yield step
    if decoder is not None:
        tail = decoder.flush()
        if tail:
            yield tail


def read_start(
    response: requests.Response,
    limit: int = STATUS_BODY_LIMIT,
    *,
    secrets: Iterable[Optional[str]] = (),
    deadline: Optional[float] = None,
    read_timeout: Optional[float] = None,
) -> str:
    """The first ``limit`` bytes of a reply, as text (for errors), without ``secrets``; the
    response is closed. The read stops at ``deadline``, as a chat's does; what arrived is kept.

    A secret cut in two at the limit is masked too (:func:`scrub_quote`).
    """
    wanted = limit
    body = b""
    try:
        for chunk in iter_body(response, deadline=deadline, read_timeout=read_timeout):
            body += chunk
            if len(body) >= wanted:
                break
    except Exception:
        logger.debug("could not read the body of an HTTP %s reply", response.status_code)
    finally:
        response.close()
    # Cut first, then scrub (a scrubbed secret is shorter: cutting after would let the half of a
    # secret that was past the cut move in), the half of one at the cut end included.
    return scrub_quote(body[:limit].decode("utf-8", "replace"), secrets)


def abort(response: requests.Response) -> None:
    """Make a read of ``response`` that is blocked in another thread fail at once (internal 3)."""
    sock = _socket_of(response.raw)
    if sock is None:
        logger.debug("no socket to shut down; closing the response instead")
        response.close()
        return
    try:
        # The plain TCP shutdown, also for TLS: it wakes the reader, where SSLSocket.shutdown
        # would unwrap the TLS layer under the reader's feet.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        logger.debug("could not shut down a socket (already closed?)", exc_info=True)


# --- errors -------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception inside it: ``reason`` (urllib3), exceptions among ``args``
    (requests wraps urllib3's so), ``__cause__`` and ``__context__``; outermost first."""
    _redact.mask_chain(exc)  # ours keep it as __cause__, which every traceback prints
    seen: set[int] = set()
    order: list[BaseException] = []
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        order.append(item)
        context = None if item.__suppress_context__ else item.__context__
        inner = [getattr(item, "reason", None), *item.args, item.__cause__, context]
        todo.extend(x for x in inner if isinstance(x, BaseException))
    return order


_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>:? ?|\b[A-Z]\w*Connection(Pool)?\([^()]*\):? ?")


def _detail(chain: list[BaseException]) -> str:
    """What went wrong, in words: the system's words for the innermost error that has them."""
    for item in reversed(chain):
        # getattr: one raised by ssl.match_hostname (which early urllib3 1.26 releases call) has
        # no verify_message.
        verify_message = getattr(item, "verify_message", None)
        if isinstance(item, ssl.SSLCertVerificationError) and verify_message:
            return str(verify_message)
        if isinstance(item, OSError) and item.strerror:
            return str(item.strerror)
    for item in reversed(chain):
        text = _REPR.sub("", str(item)).strip(" :")
        if text and not text.startswith(("(", "[")):
            return text
    return type(chain[-1]).__name__


def _connect_timeout(item: BaseException) -> bool:
    # urllib3 2 makes NewConnectionError (refused, unreachable, ...) a ConnectTimeoutError too.
    return isinstance(
        item, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
    ) and not isinstance(item, urllib3.exceptions.NewConnectionError)


def _timeout(item: BaseException) -> bool:
    return isinstance(
        item, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)
    ) and not isinstance(item, urllib3.exceptions.NewConnectionError)


def _is(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda item: isinstance(item, types)


def _socks_error(item: BaseException) -> bool:
    socks = sys.modules.get("socks")  # PySocks, loaded by requests when it is installed
    error = getattr(socks, "ProxyError", None)
    return isinstance(error, type) and isinstance(item, error)


def _hostname_mismatch_types() -> tuple[type[BaseException], ...]:
    """The errors of a certificate that names another host: ssl's, and urllib3's own
    CertificateError where urllib3 checks host names itself (on Python 3.9, for example)."""
    import importlib

    found: list[type[BaseException]] = [ssl.CertificateError]
    for name in ("urllib3.util.ssl_match_hostname", "urllib3.packages.ssl_match_hostname"):
        try:
            error = getattr(importlib.import_module(name), "CertificateError", None)
        except ImportError:
            continue
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


#: Headers and URLs that requests, urllib3 (2.x has InvalidHeader) or the encoder refuse.
_INVALID: tuple[type[BaseException], ...] = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    UnicodeEncodeError,
    urllib3.exceptions.LocationParseError,
    *(
        error
        for error in (getattr(urllib3.exceptions, "InvalidHeader", None),)
        if isinstance(error, type)
    ),
)
_NAME_RESOLUTION = getattr(urllib3.exceptions, "NameResolutionError", socket.gaierror)  # urllib3 2


def _proxy_error(item: BaseException) -> bool:
    return _socks_error(item) or isinstance(
        item, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)
    )


def _any_timeout(item: BaseException) -> bool:
    return _timeout(item) or _connect_timeout(item)


#: Why a reply stopped after its first piece, when no row says more.
_BROKE = "the connection broke ({detail})"
#: Why a reply that stalled after its first piece stopped; without a read timeout there is no
#: number to name, and the reply is said to have broken (still ``timed_out``).
_NO_DATA = "no data for {read_seconds} s (read timeout)"
#: Why a chat ended when it was aborted without a reason of its own.
_ABORTED = "the chat was aborted (cancelled, or its batch was stopped)"

#: Where a failure happened: the request was being prepared (nothing sent), sent (no reply yet),
#: or the body of the token reply, or of a chat reply, was being read.
Stage = Literal["preparing", "sending", "token", "reply"]


class Failure(NamedTuple):
    """One row of :data:`FAILURES`: a kind of failure and what it is to the user.

    The sentence is a :meth:`str.format` template over ``{url}`` (without credentials),
    ``{detail}`` (the system's words, without secrets), ``{proxy}`` (``" <proxy URL>"`` or ``""``),
    ``{aborted}`` (the reason a chat was aborted), ``{connect_after}`` and ``{read_after}``
    (``" after N s"``, or ``""`` without that timeout) and ``{read_seconds}``.
    """

    kind: str
    #: Each test holds for some exception of the chain (a cause, context or reason of another).
    tests: tuple[Callable[[BaseException], bool], ...]
    #: The error before the first piece of a reply. A timeout exactly when it is an APITimeoutError.
    cls: type[AiChatOnlineError]
    sentence: str
    #: Why a reply stopped after its first piece ("... stopped after N characters: <after>").
    after: str = _BROKE
    #: ``APIConnectionError.retryable``: ``False`` when asking again cannot help.
    retryable: bool = True
    #: Holds only while the request is prepared: nothing was sent, so the fault is the caller's.
    preparing_only: bool = False

    @property
    def timed_out(self) -> bool:
        """Whether this kind of failure is a timeout (``.timed_out`` of its error)."""
        return issubclass(self.cls, APITimeoutError)


#: A chat aborted from another thread (its stream's abort(), its Cancellation, its batch stopped):
#: the socket was shut down on purpose, so nothing is retried.
ABORTED = Failure(
    "aborted", (_is(Cancelled),), APIConnectionError, "{aborted} before its first piece",
    after="{aborted}", retryable=False,
)

#: Every failure of requests, urllib3, PySocks and the socket layer, in order: the first row whose
#: tests hold for the exception's chain gives the failure. Classified by types, never by message.
FAILURES: tuple[Failure, ...] = (
    ABORTED,
    Failure(
        "deadline", (_is(DeadlineExceeded),), APITimeoutError,
        "the total deadline passed while waiting for {url}", after="the total deadline passed",
    ),
    Failure(
        "proxy-timeout", (_proxy_error, _any_timeout), APITimeoutError,
        "timed out reaching {url} through the proxy{proxy}", after=_NO_DATA,
    ),
    Failure(
        "proxy", (_proxy_error,), APIConnectionError,
        "could not reach {url} through the proxy{proxy} ({detail}). Check the proxy URL, its user "
        "name and password, and that the proxy is running.",
    ),
    Failure(
        "untrusted", (_is(ssl.SSLCertVerificationError, *_hostname_mismatch_types()),),
        APIConnectionError,
        "TLS failed for {url}: certificate verify failed ({detail}). If the server's certificate "
        "is signed by your own CA, pass verify='/path/to/ca.pem' or set REQUESTS_CA_BUNDLE.",
        retryable=False,  # a certificate does not get better by asking again
    ),
    Failure(
        "tls", (_is(ssl.SSLError, requests.exceptions.SSLError, urllib3.exceptions.SSLError),),
        APIConnectionError, "TLS failed for {url}: {detail}",
    ),
    Failure(
        "refused", (_is(ConnectionRefusedError),), APIConnectionError,
        "could not connect to {url}: connection refused. Is the service (or the emulator) "
        "running, and is the URL right?",
    ),
    Failure(
        "unresolved", (_is(socket.gaierror, _NAME_RESOLUTION),), APIConnectionError,
        "could not connect to {url}: the host name does not resolve ({detail})",
    ),
    Failure(
        "connect-timeout", (_connect_timeout,), APITimeoutError,
        "timed out connecting to {url}{connect_after}", after=_NO_DATA,
    ),
    Failure(
        "timeout", (_timeout,), APITimeoutError, "timed out waiting for {url}{read_after}",
        after=_NO_DATA,
    ),
    Failure(
        "invalid", (_is(*_INVALID),), InvalidRequestError, "invalid request to {url}: {detail}",
        preparing_only=True,
    ),
    Failure("invalid", (_is(*_INVALID),), ProtocolError, "malformed reply from {url}: {detail}"),
    Failure(
        "truncated", (_is(BodyTruncated, http.client.IncompleteRead),), APIConnectionError,
        "the connection to {url} closed before the reply was complete ({detail})",
        after="the connection closed before the end of the body ({detail})",
    ),
    Failure(
        "reset", (_is(ConnectionResetError, BrokenPipeError, ConnectionAbortedError),),
        APIConnectionError, "the connection to {url} was reset by the server ({detail})",
        after="the server reset the connection ({detail})",
    ),
    Failure("connection", (), APIConnectionError, "the connection to {url} failed: {detail}"),
)


def classify(exc: BaseException, *, preparing: bool = False) -> Failure:
    """The row of :data:`FAILURES` for ``exc`` (``preparing``: nothing was sent yet)."""
    return _row(_chain(exc), preparing=preparing)


def _row(chain: list[BaseException], *, preparing: bool) -> Failure:
    for row in FAILURES:
        if row.preparing_only and not preparing:
            continue
        if all(any(test(item) for item in chain) for test in row.tests):
            return row
    raise AssertionError("the last row of FAILURES holds for every exception")  # pragma: no cover


#: What an error of ours found in a body (bad framing or content encoding) is, by what was read.
_UNREADABLE: dict[str, tuple[type[AiChatOnlineError], str]] = {
    "token": (TokenError, "the token reply"),
    "reply": (ProtocolError, "the reply"),
}


def translate_exception(
    exc: BaseException,
    *,
    url: str,
    stage: Stage = "sending",
    secrets: Iterable[Optional[str]] = (),
    timeout: Union[TimeoutPair, float, None] = None,
    proxy: Optional[str] = None,
    stopped_after: Optional[str] = None,
    partial: str = "",
    aborted: Union[str, bool] = False,
) -> AiChatOnlineError:
    """The error of ours for a failure of a request or a reply: the one place that says what a
    failure is (by :data:`FAILURES`): its class, its sentence, and whether it timed out.

    The caller raises the result ``from exc``. Messages name the URL without credentials, and
    neither ``secrets`` nor the proxy's password.

    :param stage: where it failed. ``"preparing"``: nothing was sent, so an invalid URL or header
        is the caller's (:class:`InvalidRequestError`); later it is the reply's
        (:class:`ProtocolError`). ``"token"`` and ``"reply"``: a body was being read, and a
        :class:`ProtocolError` found in it (bad framing or encoding) makes that reply unreadable.
        Any other error of ours is returned as it is.
    :param timeout: the ``(connect, read)`` timeouts, or one for both, named in the sentences.
    :param stopped_after: how much of a reply was handed out (``"12 characters"``), once its
        first piece was: the error is then an :class:`IncompleteStreamError` that keeps
        ``partial``, and ``timed_out`` when the reply stalled.
    :param aborted: the reason a chat was aborted, or ``True`` when it was aborted without one.
    """
    if aborted is False and isinstance(exc, ProtocolError) and stage in _UNREADABLE:
        return _unreadable(exc, url, stage, secrets, stopped_after, partial)
    if aborted is False and isinstance(exc, AiChatOnlineError) and stopped_after is None:
        return exc
    chain = _chain(exc)
    row = ABORTED if aborted is not False else _row(chain, preparing=stage == "preparing")
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    shown = redact_url(url)
    fields = {
        "url": shown,
        "detail": scrub(_detail(chain), [*secrets, *_password_of(proxy)]),
        "proxy": f" {redact_url(proxy)}" if proxy else "",
        "aborted": aborted if isinstance(aborted, str) and aborted else _ABORTED,
        "connect_after": f" after {connect:g} s" if connect else "",
        "read_after": f" after {read:g} s" if read else "",
        "read_seconds": f"{read:g}" if read else "",
    }
    if stopped_after is not None:
        after = _BROKE if row.after == _NO_DATA and not read else row.after
        return _stopped(shown, stopped_after, after.format(**fields), partial, row.timed_out)
    message = row.sentence.format(**fields)
    if issubclass(row.cls, APIConnectionError):
        return row.cls(message, url=shown, retryable=row.retryable)
    return row.cls(message)


def _unreadable(
    exc: ProtocolError,
    url: str,
    stage: str,
    secrets: Iterable[Optional[str]],
    stopped_after: Optional[str],
    partial: str,
) -> AiChatOnlineError:
    """A body that broke our framing or encoding rules: its reply is unreadable."""
    if stopped_after is not None:
        return _stopped(redact_url(url), stopped_after, str(exc), partial, timed_out=False)
    cls, what = _UNREADABLE[stage]
    message = f"{what} from {redact_url(url)} is unreadable: {exc}"
    if cls is ProtocolError:  # its body quotes the reply, which may echo the token
        return ProtocolError(message, body=exc.body and scrub_quote(exc.body, secrets))
    return cls(message)


def _stopped(
    shown: str, stopped_after: str, reason: str, partial: str, timed_out: bool
) -> IncompleteStreamError:
    return IncompleteStreamError(
        f"the reply from {shown} stopped after {stopped_after}: {reason}",
        partial=partial,
        timed_out=timed_out,
    )


def _password_of(proxy: Optional[str]) -> tuple[Optional[str], ...]:
    if not proxy:
        return ()
    from urllib.parse import urlsplit

    try:
        return (urlsplit(proxy).password,)
    except ValueError:
        return ()
