"""Settings from the environment: the ``AICHATONLINE_*`` variables read by the command line, the
llm plugin and the gateway, parsed and checked in one place: this module is their one reader.

``AICHATONLINE_BASE_URL`` is also read by :class:`Session` itself when it is given no ``base_url``
(so that it is not among :func:`session_options_from_env`); a front end that shows or checks the URL
reads it here, with :func:`setting_from_env`. A variable that is unset or blank counts as not given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

from .._wire.errors import InvalidRequestError
from .._wire.protocol import BASE_URL_ENV
from .config import Timeout, validate_base_url, validate_proxy

__all__ = [
    "BASE_URL_ENV",
    "CACHE_ENV",
    "GATEWAY_KEY_ENV",
    "MAX_RETRIES_ENV",
    "PROXY_ENV",
    "TIMEOUT_ENV",
    "gateway_key_from_env",
    "parse_base_url",
    "parse_cache_path",
    "parse_count",
    "parse_gateway_key",
    "parse_proxy",
    "parse_seconds",
    "parse_timeout",
    "session_options_from_env",
    "setting_from_env",
]

PROXY_ENV = "AICHATONLINE_PROXY"
TIMEOUT_ENV = "AICHATONLINE_TIMEOUT"
MAX_RETRIES_ENV = "AICHATONLINE_MAX_RETRIES"
GATEWAY_KEY_ENV = "AICHATONLINE_GATEWAY_KEY"
CACHE_ENV = "AICHATONLINE_CACHE"


def parse_seconds(value: str) -> float:
    """A positive, finite number of seconds.

    :raises ValueError: ``"must be a positive number of seconds, not '...'"`` (or ``"a number"``).
    """
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    return seconds


def parse_timeout(value: str) -> Timeout:
    """``SECONDS`` (connect and read), ``CONNECT,READ``, or ``none`` (no limit; each part too), as
    the command line's ``--timeout`` takes it.

    >>> parse_timeout("5,none")
    Timeout(connect=5.0, read=None, total=None)

    :raises ValueError: what is wrong with it.
    """
    parts = [part.strip().lower() for part in value.split(",")]
    if len(parts) > 2:
        raise ValueError(f"must be SECONDS, CONNECT,READ or 'none', not {value!r}")
    seconds = [None if part == "none" else parse_seconds(part) for part in parts]
    return Timeout(connect=seconds[0], read=seconds[-1])


def parse_count(value: str, minimum: int = 0) -> int:
    """A whole number ``>= minimum``.

    :raises ValueError: ``"must be a whole number >= 0, not '...'"``.
    """
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"must be a whole number >= {minimum}, not {value!r}")
    return number


def parse_proxy(value: str) -> str:
    """A proxy URL, checked as :class:`Session` checks it (credentials never in the message).

    :raises ValueError: what is wrong with it.
    """
    try:
        proxy = validate_proxy(value)
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None
    assert proxy is not None
    return proxy


def parse_base_url(value: str) -> str:
    """An http(s) base URL, checked as :class:`Session` checks it (without its trailing slash).

    :raises ValueError: ``"must be an http:// or https:// URL with a host, not '...'"`` (and such).
    """
    try:
        return validate_base_url(value)
    except InvalidRequestError as exc:
        raise ValueError(str(exc).replace("base_url ", "", 1)) from None


def parse_cache_path(value: str) -> str:
    """The path of a reply cache file (``~`` expanded; the file is checked when a session opens
    it).

    :raises ValueError: ``"must be the path of a file, not '...'"``.
    """
    path = os.path.expanduser(value)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"must be the path of a file, not {value!r}")
    return path


def parse_gateway_key(value: str) -> str:
    """The gateway's API key: printable ASCII, no spaces (what a ``Bearer`` header can carry).

    :raises ValueError: what is wrong with it (the key itself is never in the message).
    """
    if not value or not all("!" <= char <= "~" for char in value):
        raise ValueError(
            "must be a non-empty string of printable ASCII characters without spaces"
        )
    return value


#: option -> (its variable, its parser): the options of a Session, ...
_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "proxy": (PROXY_ENV, parse_proxy),
    "timeout": (TIMEOUT_ENV, parse_timeout),
    "max_retries": (MAX_RETRIES_ENV, parse_count),
    "cache": (CACHE_ENV, parse_cache_path),
}
#: ... and the others.
_OTHER_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "base_url": (BASE_URL_ENV, parse_base_url),
    "gateway_key": (GATEWAY_KEY_ENV, parse_gateway_key),
}


def setting_from_env(option: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The value of one setting from its variable, or ``None`` when the variable is unset or blank.
    ``option`` is a :class:`Session` option, ``"proxy"``, ``"timeout"``, ``"max_retries"``,
    ``"cache"`` or ``"base_url"``, or the gateway's ``"gateway_key"``.

    A front end with its own options (the command line) reads a variable only for an option that
    was not given, so that a bad variable does not matter when the option overrides it.

    :raises InvalidRequestError: a bad value, as ``"$AICHATONLINE_TIMEOUT: must be a positive
        number of seconds, not '0'"``.
    """
    name, parse = _SETTINGS[option] if option in _SETTINGS else _OTHER_SETTINGS[option]
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"${name}: {exc}") from None


def session_options_from_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The :class:`Session` options that ``$AICHATONLINE_PROXY``, ``$AICHATONLINE_TIMEOUT``,
    ``$AICHATONLINE_MAX_RETRIES`` and ``$AICHATONLINE_CACHE`` give (only those that are set, not
    blank).

    >>> session_options_from_env({"AICHATONLINE_TIMEOUT": "30", "AICHATONLINE_PROXY": ""})
    {'timeout': Timeout(connect=30.0, read=30.0, total=None)}

    :param environ: the variables (default :data:`os.environ`).
    :raises InvalidRequestError: a bad value, naming its variable (see :func:`setting_from_env`).
    """
    options = {option: setting_from_env(option, environ) for option in _SETTINGS}
    return {option: value for option, value in options.items() if value is not None}


def gateway_key_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The gateway's key, ``$AICHATONLINE_GATEWAY_KEY`` (``None`` when unset).

    Set but blank is an error, not "no key": ``AICHATONLINE_GATEWAY_KEY="$KEY"`` with ``$KEY``
    unset or mistyped must not serve an open gateway without a word.

    :raises InvalidRequestError: a bad or blank key, as ``"$AICHATONLINE_GATEWAY_KEY: must be ..."``.
    """
    variables = os.environ if environ is None else environ
    if GATEWAY_KEY_ENV in variables and not variables[GATEWAY_KEY_ENV].strip():
        raise InvalidRequestError(
            f"${GATEWAY_KEY_ENV} is set but empty: give it a key, or unset it to serve without one"
        )
    key: Optional[str] = setting_from_env("gateway_key", environ)
    return key
