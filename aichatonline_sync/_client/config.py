"""Small, validated configuration objects: :class:`Timeout`, :class:`RetryPolicy`, URLs and proxies."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, TypeVar, Union, cast
from urllib.parse import urlsplit

from .._wire.errors import InvalidRequestError
from .._wire.protocol import BASE_URL_ENV, DEFAULT_BASE_URL, RETRY_STATUSES, is_number
from .._wire.redact import redact_url

__all__ = [
    "DEFAULT_BASE_URL",
    "MAX_CONNECTIONS",
    "RetryPolicy",
    "Timeout",
    "TimeoutTypes",
    "UNSET",
    "check_bool",
    "check_int",
    "is_number",
    "reject_options",
    "validate_base_url",
    "validate_headers",
    "validate_proxy",
    "validate_retry",
    "validate_verify",
]


#: The longest wait that can be given (a year): the socket layer cannot take an infinite or much
#: larger timeout (``OverflowError: timestamp out of range``, at the first request).
MAX_SECONDS = 365 * 24 * 3600.0


def _check_seconds(name: str, value: object, *, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if not is_number(value):
        raise InvalidRequestError(f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(cast(float, value))
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if math.isnan(seconds) or seconds <= 0:
        raise InvalidRequestError(f"{name} must be a positive number of seconds, not {value!r}")
    if seconds > MAX_SECONDS:
        hint = " (None means no limit)" if allow_none else ""
        raise InvalidRequestError(
            f"{name} must be at most {MAX_SECONDS:.0f} seconds (a year){hint}, not {_shown(value)}"
        )
    return seconds


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a real ``bool``; ``"no"``, ``1`` or ``None`` are refused (they would be
    taken as true or false by accident).

    :raises InvalidRequestError: anything else, naming the option.
    """
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be True or False, not {_shown(value)}")
    return value


def check_int(name: str, value: object, *, low: int = 0, high: Optional[int] = None) -> int:
    """``value`` if it is a whole number (not a ``bool``) with ``low <= value <= high``.

    :raises InvalidRequestError: anything else, naming the option and its bounds.
    """
    number = cast(int, value)
    if not is_number(value, (int,)) or number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidRequestError(f"{name} must be a whole number {bounds}, not {_shown(value)}")
    return number


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"


@dataclass(frozen=True)
class Timeout:
    """How long to wait, in seconds (``None``: no limit).

    :param connect: the longest wait to open a connection.
    :param read: the longest wait between two bytes of a reply, also while it streams.
    :param total: a deadline for a whole chat (token, retries and the stream), or ``None``. It
        bounds every read of a reply body (the token's, an error's, the chat's) and shortens each
        request's timeouts to what is left; it is checked between reads, so it cannot cut short
        the wait for a reply's headers beyond the read timeout between their bytes.

    >>> Timeout(connect=5, read=30)
    Timeout(connect=5.0, read=30.0, total=None)
    >>> Timeout.coerce((3, 20)) == Timeout(3, 20)
    True
    """

    connect: Optional[float] = 10.0
    read: Optional[float] = 60.0
    total: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            object.__setattr__(self, name, _check_seconds(f"timeout {name}", getattr(self, name)))

    @classmethod
    def coerce(cls, value: TimeoutTypes) -> Timeout:
        """Build a :class:`Timeout` from a number (connect and read), a ``(connect, read)`` tuple, or a
        :class:`Timeout`. ``None`` gives the defaults.

        :raises InvalidRequestError: for anything else, or a negative or zero number.
        """
        if value is None:
            return cls()
        if isinstance(value, Timeout):
            return value
        if isinstance(value, tuple):
            if len(value) != 2:
                raise InvalidRequestError(f"a timeout tuple must be (connect, read), not {value!r}")
            return cls(connect=value[0], read=value[1])
        seconds = _check_seconds("timeout", value, allow_none=False)
        return cls(connect=seconds, read=seconds)

    def within(self, deadline: Optional[float]) -> tuple[Optional[float], Optional[float]]:
        """The ``(connect, read)`` pair for a request, shortened to what is left before
        ``deadline`` (a :func:`time.monotonic` value)."""
        if deadline is None:
            return (self.connect, self.read)
        remaining = max(0.001, deadline - time.monotonic())
        connect, read = self.connect, self.read
        return (
            remaining if connect is None else min(connect, remaining),
            remaining if read is None else min(read, remaining),
        )

    def replace(self, **changes: Any) -> Timeout:
        """A copy with some fields changed, validated like the constructor."""
        return _replace(self, changes)


TimeoutTypes = Union[Timeout, float, int, tuple[Optional[float], Optional[float]], None]


#: The most retries a policy may ask for: far more than any wait is worth (with the default
#: delays, over 22 hours of retrying), and a bound that the backoff's arithmetic stays within.
MAX_RETRIES = 10_000


@dataclass(frozen=True)
class RetryPolicy:
    """What to retry and how long to wait (built on tenacity).

    Retried: connection errors and timeouts before any text, HTTP 408, 409, 425, 429, 500, 502, 503
    and 504 (and error lines with those codes before any text), for the token request and for opening
    the chat stream. The wait before retry *n* is drawn at random between ``initial_delay`` and
    ``min(max_delay, initial_delay * 2 ** (n - 1))``; a ``Retry-After`` or ``retry-after-ms`` header
    replaces it, unless it asks for more than ``max_retry_after`` seconds: then the error is raised at once.

    :param max_retries: retries after the first attempt. A chat's token request and its chat
        request share them: one attempt takes the token and opens the chat.
    :param initial_delay: the shortest wait between two attempts, in seconds.
    :param max_delay: the longest wait drawn by the backoff, in seconds.
    :param max_retry_after: the longest ``Retry-After`` honoured, in seconds.
    :param sleep: the function that waits (inject a fake one in tests); neither shown nor compared.

    >>> RetryPolicy(max_retries=3)
    RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=8.0, max_retry_after=60.0)
    """

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    #: HTTP statuses (and error-line codes) that are retried.
    RETRY_STATUSES: ClassVar[frozenset[int]] = RETRY_STATUSES

    def __post_init__(self) -> None:
        check_int("max_retries", self.max_retries, high=MAX_RETRIES)
        for name in ("initial_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            if not is_number(value) or not value >= 0:
                raise InvalidRequestError(f"{name} must be a number >= 0, not {_shown(value)}")
            if value > MAX_SECONDS:  # time.sleep cannot take an infinite wait
                raise InvalidRequestError(
                    f"{name} must be at most {MAX_SECONDS:.0f} seconds (a year), not {_shown(value)}"
                )
            object.__setattr__(self, name, float(value))
        if self.max_delay < self.initial_delay:
            raise InvalidRequestError(
                f"max_delay ({self.max_delay}) must not be below initial_delay ({self.initial_delay})"
            )
        if not callable(self.sleep):
            raise InvalidRequestError(f"sleep must be callable, not {self.sleep!r}")

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed, validated like the constructor."""
        return _replace(self, changes)


_Value = TypeVar("_Value", Timeout, RetryPolicy)


def _replace(value: _Value, changes: dict[str, Any]) -> _Value:
    names = {item.name for item in fields(value)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"{type(value).__name__} has no field {unknown[0]!r}")
    return dataclasses.replace(value, **changes)


class _Unset:
    """The type of :data:`UNSET`."""

    _instance: ClassVar[Optional[_Unset]] = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"


#: "Not given", where ``None`` or a default value would also be a valid choice.
UNSET: Any = _Unset()


def validate_retry(max_retries: Any, retry: Any) -> RetryPolicy:
    """The session's :class:`RetryPolicy`: ``retry``, or one with ``max_retries``, not both."""
    if retry is None:
        return RetryPolicy() if max_retries is UNSET else RetryPolicy(max_retries=max_retries)
    if not isinstance(retry, RetryPolicy):
        raise InvalidRequestError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
    if max_retries is not UNSET:
        raise InvalidRequestError(
            "give either max_retries or retry=RetryPolicy(max_retries=...), not both"
        )
    return retry


_HASHED_CERT = re.compile(r"[0-9a-f]{8}\.r?[0-9]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def validate_headers(headers: Any, *, what: str = "headers") -> dict[str, str]:
    """Check request headers (``what`` names them in errors): a mapping of str names (HTTP
    tokens) to str values that requests and http.client can send."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidRequestError(f"{what} must be a mapping, not {type(headers).__name__}")
    checked = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequestError(f"{what}: header names and values must be str: {key!r}")
        if not _HEADER_NAME.fullmatch(key):
            raise InvalidRequestError(f"{what}: invalid header name {key!r}")
        if any(ch in value for ch in "\r\n\0"):
            raise InvalidRequestError(f"{what}: the value of header {key!r} contains a line break")
        if value[:1] in (" ", "\t"):  # requests refuses it at every send
            raise InvalidRequestError(f"{what}: the value of header {key!r} begins with white space")
        try:
            value.encode("latin-1")  # what http.client sends header values as
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"{what}: the value of header {key!r} has characters HTTP headers cannot carry "
                "(only Latin-1): encode it first, e.g. with urllib.parse.quote"
            ) from None
        checked[key] = value
    return checked


def validate_verify(verify: Any) -> Union[bool, str]:
    """Check ``verify``: ``True``, ``False``, or the path of a CA bundle file or folder that exists."""
    if isinstance(verify, bool):
        return verify
    if not isinstance(verify, (str, os.PathLike)):
        raise InvalidRequestError(f"verify must be True, False or a CA bundle path, not {verify!r}")
    path = os.fspath(verify)
    if not isinstance(path, str) or not os.path.exists(path):
        raise InvalidRequestError(
            f"verify={path!r}: no CA bundle there (no such file or folder); give the path of a "
            "PEM file of trusted certificates, or True for the system's"
        )
    if os.path.isdir(path):  # a folder of hashed certificates is read lazily, at each handshake
        if not any(_HASHED_CERT.fullmatch(name) for name in os.listdir(path)):
            raise InvalidRequestError(
                f"verify={path!r} is a folder without hashed certificates (named like "
                "'1a2b3c4d.0', as c_rehash makes them); give a PEM file or such a folder"
            )
        return path
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise InvalidRequestError(f"verify={path!r} is not a regular file or folder")
    import ssl  # loaded here, so that a wrong file fails now, not at every chat's handshake

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
        certificates = context.cert_store_stats()["x509"]
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise InvalidRequestError(
            f"verify={path!r} is not a readable CA bundle ({reason}); give the path of a PEM "
            "file of trusted certificates, or True for the system's"
        ) from None
    if not certificates:
        raise InvalidRequestError(f"verify={path!r} holds no certificate (only revocation lists?)")
    return path


#: The most connections per host, and threads of a batch: urllib3 fills a pool's queue with
#: one slot per connection when it makes the pool, so a huge size never finishes its first chat.
MAX_CONNECTIONS = 1024


def validate_base_url(base_url: Optional[str]) -> str:
    """Resolve and check the base URL: ``base_url``, else ``$AICHATONLINE_BASE_URL``, else the default.

    :returns: the URL without a trailing slash.
    :raises InvalidRequestError: anything but an http(s) URL with a host.
    """
    source = "base_url"
    if base_url is None:
        env = os.environ.get(BASE_URL_ENV)
        if env:
            base_url, source = env, f"${BASE_URL_ENV}"
        else:
            return DEFAULT_BASE_URL
    if not isinstance(base_url, str):
        raise InvalidRequestError(f"{source} must be a str, not {type(base_url).__name__}")
    try:
        parts = urlsplit(base_url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidRequestError(f"{source} is not a valid URL: {redact_url(base_url)!r}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(
            f"{source} must be an http:// or https:// URL with a host, not {redact_url(base_url)!r}"
        )
    if parts.query or parts.fragment:
        raise InvalidRequestError(
            f"{source} must not have a query or fragment: {redact_url(base_url)!r}"
        )
    url = base_url.strip().rstrip("/")
    _check_url_text(source, url)
    return url


def _check_url_text(source: str, url: str) -> None:
    """Refuse, before anything is sent, a URL that requests would refuse (or send mangled) when
    the first request is prepared: white space or control characters, a host it cannot encode."""
    bad = next((ch for ch in url if ch.isspace() or ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        raise InvalidRequestError(
            f"{source} contains {'white space' if bad.isspace() else 'a control character'} "
            f"({bad!r}): {redact_url(url)!r}"
        )
    import requests  # the transport's own check, so that both agree

    try:
        requests.PreparedRequest().prepare_url(url + "/", None)
    except Exception as exc:
        detail, password = str(exc), urlsplit(url).password
        if password:  # requests quotes the URL's user part in its message
            detail = detail.replace(password, "***")
        raise InvalidRequestError(
            f"{source} is not a valid URL ({detail}): {redact_url(url)!r}"
        ) from None


_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")


def validate_proxy(proxy: Any) -> Optional[str]:
    """Check a proxy URL: ``http://``, ``https://``, or SOCKS (``socks5://``, ``socks5h://``,
    ``socks4://``, ``socks4a://``; the ``socks`` extra).

    :raises InvalidRequestError: a URL that cannot be parsed, an unknown scheme, or a SOCKS proxy
        without PySocks installed. The message never contains the password.
    """
    if proxy is None:
        return None
    if not isinstance(proxy, str):
        raise InvalidRequestError(
            f"proxy must be a URL str like http://host:3128, not {type(proxy).__name__}"
        )
    if not proxy.strip():
        raise InvalidRequestError(
            "proxy is an empty string: give a proxy URL like http://host:3128, or leave it out "
            "(None) for no proxy of your own (HTTP_PROXY/HTTPS_PROXY then apply)"
        )
    proxy = proxy.strip()
    shown = redact_url(proxy)
    try:
        parts = urlsplit(proxy)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequestError(f"proxy is not a valid URL: {shown!r}") from exc
    if parts.scheme not in _PROXY_SCHEMES or not parts.hostname:
        raise InvalidRequestError(
            f"proxy must look like http://host:port, https://host:port or socks5://host:port, "
            f"not {shown!r}"
        )
    del port
    _check_url_text("proxy", proxy)
    if parts.scheme.startswith("socks"):
        try:
            import socks  # noqa: F401
        except ImportError:
            raise InvalidRequestError(
                f'the SOCKS proxy {shown!r} needs PySocks: pip install "aichatonline-sync[socks]"'
            ) from None
    return str(proxy)


def reject_options(
    given: Mapping[str, Any],
    *,
    valid: Iterable[str],
    what: str,
    elsewhere: Iterable[str] = (),
    elsewhere_hint: str = "",
) -> None:
    """Refuse keyword options that ``what`` does not take, with one :class:`InvalidRequestError`
    naming them and listing the valid ones (instead of Python's ``TypeError``).

    :param given: the keyword options that were not recognised (nothing happens when empty).
    :param valid: the option names that ``what`` takes.
    :param what: the callable, as the message names it (``"Session.chat()"``).
    :param elsewhere: names that are options of something else (``Session()``'s own options):
        the message then says where they go, with ``elsewhere_hint``.
    """
    if not given:
        return
    elsewhere = frozenset(elsewhere)
    misplaced = sorted(name for name in given if name in elsewhere)
    unknown = sorted(name for name in given if name not in elsewhere)
    parts = []
    if unknown:
        parts.append(f"unknown option(s) {', '.join(unknown)}")
    if misplaced:
        parts.append(f"{', '.join(misplaced)} {elsewhere_hint}".rstrip())
    raise InvalidRequestError(
        f"{what}: {'; '.join(parts)}. Valid options are: {', '.join(sorted(valid))}"
    )
