"""The AiChatOnline service mocked with ``responses``: :class:`AiChatOnlineMock`, which the
``aichatonline_mock`` fixture (:mod:`.pytest_plugin`) gives.

It answers the token request (any ``canvas``) and the chat request at its ``base_url`` as the
emulator does, by the same model (:mod:`.faults`): the same reply values, the same checks of a chat
(401 for a token it did not hand out, 400 for a body that is not a JSON object with a str
``prompt``), and the faults a mock can play (:meth:`~AiChatOnlineMock.fail`,
:meth:`~AiChatOnlineMock.error_line`, :meth:`~AiChatOnlineMock.html`,
:meth:`~AiChatOnlineMock.drop`, from :class:`~.faults.FaultScheduler`, as the emulator's). What
only a socket can do (a stall, a framing, raw bytes) needs the emulator.

``responses`` is imported only when a mock is made.
"""

from __future__ import annotations

import errno
import io
import json
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .._client.config import check_bool
from .._wire.protocol import (
    CHAT_PATH,
    TOKEN_HEADER,
    TOKEN_PATH,
    error_json,
    piece_line,
    token_reply,
)
from . import faults as _faults
from .faults import DEFAULT_CONTENT_TYPE, Drop, ErrorLine, FaultQueue, FaultScheduler, Reply

if TYPE_CHECKING:
    import responses
    from requests import PreparedRequest

__all__ = ["LOOPBACK_URLS", "MOCK_BASE_URL", "AiChatOnlineMock"]

#: The base URL the ``aichatonline_mock`` fixture answers for.
MOCK_BASE_URL = "https://aichatonline.test"

#: The URLs that the mock passes through to the real server (``rsps.passthru_prefixes``).
LOOPBACK_URLS = re.compile(
    r"https?://(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?([/?#]|\Z)",
    re.IGNORECASE,
)

#: A mocked reply: ``(status, headers, body)``, or an exception to raise instead.
_Reply = Union[tuple[int, dict[str, str], Any], Exception]

_DEFAULT_MOCK_REPLY = "Hello! This is the AiChatOnline mock."


class AiChatOnlineMock(FaultScheduler):
    """The upstream mocked with ``responses``, as given by the ``aichatonline_mock`` fixture.

    :param rsps: a started (or about to be started) :class:`responses.RequestsMock`.
    :param base_url: the base URL to answer for.
    :param token: the token the token mock hands out (default: 32 random hex chars).
    :param passthrough_loopback: let requests to loopback URLs (:data:`LOOPBACK_URLS`: an
        emulator, a local server) reach the real server.
    """

    def __init__(
        self,
        rsps: responses.RequestsMock,
        base_url: str = MOCK_BASE_URL,
        token: str | None = None,
        *,
        passthrough_loopback: bool = True,
    ) -> None:
        if token is not None:
            _faults.check_headers({TOKEN_HEADER: token})
        #: The base URL answered for (no trailing slash).
        self.base_url = base_url.rstrip("/")
        #: The :class:`responses.RequestsMock`; register more responses on it as usual.
        self.rsps = rsps
        #: The token handed out by the token mock; a chat carrying any other gets HTTP 401.
        self.token = token if token is not None else secrets.token_hex(16)
        self._reply = _faults.reply_source(None, _DEFAULT_MOCK_REPLY)
        self._required: set[str] = set()
        self._faults = FaultQueue()  # (thread-safe: responses runs callbacks in callers' threads)
        if check_bool("passthrough_loopback", passthrough_loopback):
            rsps.add_passthru(LOOPBACK_URLS)
        self.token_url = re.compile(
            re.escape(f"{self.base_url}{TOKEN_PATH}") + r"(\?.*)?\Z"
        )
        #: The chat URL.
        self.chat_url = f"{self.base_url}{CHAT_PATH}"
        self._token_response = _add_callback(
            rsps, "GET", self.token_url, callback=self._token_callback, content_type=None
        )
        self._chat_response = _add_callback(
            rsps,
            "POST",
            self.chat_url,
            callback=self._chat_callback,
            content_type=None,
        )

    @property
    def pieces(self) -> list[str]:
        """The pieces each chat is answered with (``[]`` for a callable reply)."""
        return list(self._reply.pieces)

    @property
    def token_calls(self) -> int:
        """How many token requests the mock answered."""
        return int(self._token_response.call_count)

    @property
    def chat_calls(self) -> int:
        """How many chat requests the mock answered."""
        return int(self._chat_response.call_count)

    def set_reply(self, reply: str | Iterable[str] | Callable[[str], str] | None) -> list[str]:
        """Set what every following chat is answered with, and require at least one chat.

        :param reply: as the emulator's: None (the default reply), a str (split into word pieces
            like the emulator does), the pieces themselves, or a callable taking the prompt and
            returning the reply's text.
        :returns: the pieces; ``"".join()`` of them is the reply text (``[]`` for a callable,
            whose pieces depend on each prompt).
        :raises InvalidRequestError: (a ``ValueError``) for anything else, as the emulator's.
        """
        self._reply = _faults.reply_source(reply, _DEFAULT_MOCK_REPLY)
        self._required.add("chat")
        return list(self._reply.pieces)

    def require(self, *, token: bool = True, chat: bool = True) -> None:
        """Make the test fail at teardown unless these built-in mocks were requested.

        :param token: require at least one token request.
        :param chat: require at least one chat request.
        """
        if check_bool("token", token):
            self._required.add("token")
        if check_bool("chat", chat):
            self._required.add("chat")

    def revoke_tokens(self) -> None:
        """Invalidate the token handed out so far, as the emulator's :meth:`revoke_tokens`: the
        next chat carrying it gets HTTP 401, and token requests hand out a new :attr:`token`."""
        self.token = secrets.token_hex(16)

    def _token_callback(self, request: PreparedRequest) -> _Reply:
        fault = self._faults.take("token")
        if isinstance(fault, Reply):
            return _response(fault)
        if isinstance(fault, Drop):
            return _dropped()
        reply = json.dumps(token_reply(self.token))
        return 200, {"Content-Type": "application/json"}, reply

    def _chat_callback(self, request: PreparedRequest) -> _Reply:
        # As the emulator: a queued fault answers whatever the request carries; otherwise the
        # service's own checks come first (401 for a token it did not issue, 400 for a bad body).
        fault = self._faults.take("chat")
        if isinstance(fault, Reply):
            return _response(fault)
        parsed = _json_body(request)
        if fault is None:
            sent = request.headers.get(TOKEN_HEADER)
            known = isinstance(sent, str) and sent.strip() == self.token
            rejection = _faults.chat_rejection(known, parsed)
            if rejection is not None:
                return _response(rejection)
        prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
        try:
            pieces = self._reply.pieces_for(prompt if isinstance(prompt, str) else "")
        except Exception as exc:  # as the emulator answers a reply callable that failed
            return _response(Reply(500, error_json(500, f"reply callable failed: {exc!r}")))
        lines = [piece_line(piece) for piece in pieces]
        headers = {"Content-Type": DEFAULT_CONTENT_TYPE}
        if isinstance(fault, ErrorLine):
            return 200, headers, b"".join(lines[: fault.after]) + fault.line
        if isinstance(fault, Drop):
            return 200, headers, _BrokenBody(b"".join(lines[: fault.after]))
        return 200, headers, b"".join(lines)

    def remove_unrequired(self) -> None:
        """Remove the built-in mocks that were neither required nor requested, so that the
        strict ``responses`` check passes without them (the fixture calls it at teardown)."""
        for name, response in (("token", self._token_response), ("chat", self._chat_response)):
            if name not in self._required and response.call_count == 0:
                self.rsps.remove(response)


class _BrokenBody(io.BufferedReader):
    """A body that hands out ``data`` and then fails as a reset connection does, to every read
    (``read`` and ``read1``, whatever urllib3 calls; each read returns what it has, as a socket's
    does, so that the data before the reset is not lost in a read that asked for more)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(b""))
        self._data = data
        self._position = 0

    def read(self, size: Optional[int] = -1) -> bytes:
        if self._position >= len(self._data):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (mock drop)")
        end = len(self._data) if size is None or size < 0 else self._position + size
        chunk = self._data[self._position : end]
        self._position += len(chunk)
        return chunk

    read1 = read


def _dropped() -> Exception:
    import requests  # (requests is loaded already: the mock patches it)

    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (mock drop)")
    return requests.ConnectionError(reset)


def _response(reply: Reply) -> _Reply:
    return reply.status, reply.header_dict(), reply.body


def _add_callback(
    rsps: responses.RequestsMock, method: str, url: Any, **kwargs: Any
) -> responses.BaseResponse:
    """``rsps.add_callback(...)``, returning the response it adds (``add_callback`` itself returns
    ``None`` in responses 0.23, which legacy code bases still pin)."""
    import responses  # lazy: responses is optional

    return rsps.add(responses.CallbackResponse(method, url, **kwargs))


def _json_body(request: PreparedRequest) -> Any:
    """The request body parsed as JSON, or None if it is empty or not JSON (as the emulator)."""
    body = request.body
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
