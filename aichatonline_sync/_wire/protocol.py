"""The upstream's wire protocol, in one place: endpoints, headers, and the shape of each message.

The client (``_client.session``, ``_client.token``), the emulator (``testing``) and the pytest plugin
all import these, so that a change of the protocol is made once. See ``UPSTREAM.md`` for what is
evidenced and what is guessed.

1. Token: ``GET {base}/api/v1/user/getUniqueId?canvas=-<10 random [a-z0-9]>`` answers a JSON object
   whose ``data`` is the token.
2. Chat: ``POST {base}/aichatonline/api/chat/gpt`` with the header ``UniqueId: <token>`` and the JSON
   body ``{"conversationId": ..., "prompt": ...}`` streams one JSON object per line; each line's
   text piece is at ``["data"]["message"]``.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Optional
from urllib.parse import urlsplit

__all__ = [
    "BASE_URL_ENV",
    "BLOCK_PAGE",
    "BROWSER_HEADERS",
    "CHAT_PATH",
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "MODELS",
    "OK_CODES",
    "RETRY_STATUSES",
    "TOKEN_HEADER",
    "TOKEN_PATH",
    "chat_body",
    "error_json",
    "is_number",
    "parse_retry_after",
    "piece_line",
    "request_headers",
    "token_reply",
]

#: The real service.
DEFAULT_BASE_URL = "https://aichatonlineorg.erweima.ai"
#: The environment variable that overrides the base URL.
BASE_URL_ENV = "AICHATONLINE_BASE_URL"
#: Path of the token endpoint (``GET``, with ``?canvas=-<10 random characters>``).
TOKEN_PATH = "/api/v1/user/getUniqueId"
#: Path of the chat endpoint (``POST``).
CHAT_PATH = "/aichatonline/api/chat/gpt"
#: The request header that carries the token.
TOKEN_HEADER = "UniqueId"

#: The only model the service offers (it is never sent).
DEFAULT_MODEL = "gpt-4o-mini"
MODELS = (DEFAULT_MODEL,)

#: HTTP statuses (and error-line codes) that are worth another attempt.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: Values of a line's ``code``/``status`` that mean success (compared after :func:`str.lower`
#: for strings): such a line is no error line.
OK_CODES = frozenset({0, 200, "0", "200", "ok", "success", "succeed", "succeeded", "true"})

#: The browser identity gpt4free sent (Firefox 119), minus encodings this client cannot decode
#: (``br`` needs brotli, which urllib3 would otherwise hand back undecoded without an error).
BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/119.0",
    "Accept-Language": "de,en-US;q=0.7,en;q=0.3",
    "Accept-Encoding": "gzip, deflate",
    "Sec-Fetch-Dest": "empty",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Site": "same-origin",
    "TE": "trailers",
}


_NUMERIC_CODE = re.compile(r"-?[0-9]{1,9}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def is_number(value: object, kinds: tuple[type, ...] = (int, float)) -> bool:
    """Whether ``value`` is an instance of ``kinds`` and no ``bool``: JSON's ``true`` is no number,
    though Python's ``True`` is an ``int``, and it is never a code, a count or a number of seconds.
    """
    return isinstance(value, kinds) and not isinstance(value, bool)


def upstream_code(value: Any) -> Any:
    """An error ``code`` as the upstream sent it: an ``int`` when it is a short number in a
    string (``"401"``), other text with its lone surrogates as U+FFFD, anything else as it is.

    Only one to nine ASCII digits (with an optional minus) are converted: ``int()`` also takes the
    digits of other scripts, and is slow on thousands of them.
    """
    if isinstance(value, str) and _NUMERIC_CODE.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, str):  # every text of ours encodes as UTF-8
        return _SURROGATE.sub("\ufffd", value)
    return value


def request_headers(base_url: str) -> dict[str, str]:
    """The headers of every request to ``base_url``: the browser identity and its origin."""
    parts = urlsplit(base_url)
    headers = dict(BROWSER_HEADERS)
    headers["Referer"] = f"{base_url}/chatgpt/chat/"
    headers["Origin"] = f"{parts.scheme}://{parts.netloc}"
    headers["Alt-Used"] = parts.netloc
    return headers


def chat_body(conversation_id: str, prompt: str) -> bytes:
    """The body of a chat request: JSON, ASCII-escaped as ``requests``' ``json=`` sends it."""
    data = {"conversationId": conversation_id, "prompt": prompt}
    return json.dumps(data, allow_nan=False).encode("ascii")


def token_reply(token: str) -> dict[str, Any]:
    """The token endpoint's reply object (as the sister services wrap theirs)."""
    return {"code": 200, "msg": "success", "data": token}


_LINE_HEAD = '{"code": 200, "msg": "success", "data": {"message": '
_encode_str = json.JSONEncoder(ensure_ascii=False).encode


def piece_line(piece: str) -> bytes:
    """One reply line carrying ``piece``: the same bytes as ``json.dumps({"code": 200, "msg":
    "success", "data": {"message": piece}}, ensure_ascii=False) + "\\n"``, encoded as UTF-8."""
    return (_LINE_HEAD + _encode_str(piece) + "}}\n").encode("utf-8")


def error_json(code: Any, message: str) -> bytes:
    """An error object as the sister services send them: ``{"code", "message", "data": null}``."""
    return json.dumps({"code": code, "message": message, "data": None}).encode("utf-8")


#: A Cloudflare-like block page, as a CDN in front of the service answers a client it distrusts
#: (the emulator's and the mock's ``html()`` fault).
BLOCK_PAGE = (
    '<!DOCTYPE html>\n<html lang="en-US">\n<head>\n<title>Just a moment...</title>\n'
    '<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">\n'
    '<meta name="robots" content="noindex,nofollow">\n</head>\n<body>\n'
    '<div class="main-wrapper" role="main"><div class="main-content">\n'
    "<h1>aichatonlineorg.erweima.ai</h1>\n"
    "<h2>Checking if the site connection is secure</h2>\n"
    "<noscript>Enable JavaScript and cookies to continue</noscript>\n"
    "</div></div>\n</body>\n</html>\n"
)


def parse_retry_after(headers: Mapping[str, str], now: Optional[float] = None) -> Optional[float]:
    """The delay asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), in
    seconds; ``None`` when neither is there or readable. A date in the past is ``0.0``.

    :param now: the :func:`time.time` to count a date from (default: the clock's).

    >>> parse_retry_after({"Retry-After": "2"})
    2.0
    >>> parse_retry_after({"retry-after-ms": "150"})
    0.15
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    value = lowered.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000.0
    value = lowered.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
