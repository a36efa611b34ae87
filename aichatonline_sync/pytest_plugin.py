"""pytest fixtures for code that uses :mod:`aichatonline_sync` (loaded through the ``pytest11`` entry
point in every project that has the package installed).

Fixtures (none is autouse):

``aichatonline_emulator``
    A started :class:`aichatonline_sync.testing.Emulator` (function scope), stopped after the test.
    Its constructor arguments can be set with the marker
    ``@pytest.mark.aichatonline_emulator(framing="length", gzip=True, ...)``.
``aichatonline_emulator_factory``
    A callable taking :class:`~aichatonline_sync.testing.Emulator` keyword arguments and returning
    a started emulator; every emulator it made is stopped after the test.
``aichatonline_mock``
    An :class:`AiChatOnlineMock`: a strict :class:`responses.RequestsMock` (needs
    ``pip install responses``) that answers the token request (any ``canvas``) and the chat request
    at :attr:`AiChatOnlineMock.base_url` (``https://aichatonline.test``). Requests to loopback
    addresses (``127.x.x.x``, ``localhost``, ``[::1]``: an :class:`~aichatonline_sync.testing.Emulator`,
    any local server) pass through to the real server, so the mock and a real emulator work in
    one test; requests to any other URL fail with a :class:`requests.ConnectionError`, and the
    chat mock only matches a request whose ``UniqueId`` header is :attr:`AiChatOnlineMock.token`
    and whose JSON body has ``conversationId`` and ``prompt``. The mock has the emulator's faults
    (:meth:`~AiChatOnlineMock.fail`, :meth:`~AiChatOnlineMock.error_line`,
    :meth:`~AiChatOnlineMock.html`, :meth:`~AiChatOnlineMock.drop`), queued per endpoint.

Strictness of ``aichatonline_mock``: the mock is created with ``assert_all_requests_are_fired=True``,
so every response *the test registers itself* on ``mock.rsps`` must be requested. The two built-in
responses (token and chat) are not required, so a test that only grabs a token passes, with one
exception: once the test calls :meth:`AiChatOnlineMock.set_reply` it has asked for a chat, and the
test fails at teardown if no chat was made. :meth:`AiChatOnlineMock.require` states such
expectations explicitly. A queued fault that no request used fails the test at teardown too.

Importing this module is cheap: neither ``responses`` nor the emulator is imported until a fixture
needs it.
"""

from __future__ import annotations

import collections
import errno
import http
import io
import json
import re
import secrets
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pytest

from ._protocol import BLOCK_PAGE, CHAT_PATH, TOKEN_PATH, error_json, piece_line, token_reply

if TYPE_CHECKING:
    import responses
    from requests import PreparedRequest

    from aichatonline_sync.testing import Emulator

__all__ = ["LOOPBACK_URLS", "MOCK_BASE_URL", "AiChatOnlineMock"]

#: The base URL the ``aichatonline_mock`` fixture answers for.
MOCK_BASE_URL = "https://aichatonline.test"

#: The URLs that the mock passes through to the real server (``rsps.passthru_prefixes``).
LOOPBACK_URLS = re.compile(
    r"https?://(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?([/?#]|\Z)",
    re.IGNORECASE,
)

_ENDPOINTS = ("token", "chat")
_STREAM_TYPE = "text/event-stream;charset=UTF-8"

#: A mocked reply: ``(status, headers, body)``, or an exception to raise instead.
_Reply = Union[tuple[int, dict[str, str], Any], Exception]

_MARKER = "aichatonline_emulator"
_DEFAULT_MOCK_REPLY = "Hello! This is the AiChatOnline mock."


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``aichatonline_emulator`` marker (so ``--strict-markers`` accepts it).

    :param config: the pytest configuration.
    """
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(**kwargs): keyword arguments for the Emulator of the "
        "aichatonline_emulator fixture",
    )


@pytest.fixture
def aichatonline_emulator_factory() -> Iterator[Callable[..., Emulator]]:
    """A callable that starts an emulator with the given keyword arguments.

    :returns: ``make(**kwargs) -> Emulator``; every emulator made is stopped after the test.
    """
    from aichatonline_sync.testing import Emulator  # lazy: keeps the plugin cheap

    made: list[Emulator] = []

    def make(**kwargs: Any) -> Emulator:
        emulator = Emulator(**kwargs)
        emulator.start()
        made.append(emulator)
        return emulator

    try:
        yield make
    finally:
        for emulator in reversed(made):
            emulator.stop()


@pytest.fixture
def aichatonline_emulator(
    request: pytest.FixtureRequest,
    aichatonline_emulator_factory: Callable[..., Emulator],
) -> Emulator:
    """A started emulator, stopped after the test.

    :param request: the pytest fixture request (for the ``aichatonline_emulator`` marker).
    :param aichatonline_emulator_factory: makes and later stops the emulator.
    :returns: the running emulator; pass ``emulator.url`` as ``base_url``.
    """
    kwargs: dict[str, Any] = {}
    marker = request.node.get_closest_marker(_MARKER)
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{_MARKER} takes keyword arguments only")
        kwargs.update(marker.kwargs)
    return aichatonline_emulator_factory(**kwargs)


class AiChatOnlineMock:
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
        from responses import matchers  # lazy: responses is optional

        #: The base URL answered for (no trailing slash).
        self.base_url = base_url.rstrip("/")
        #: The :class:`responses.RequestsMock`; register more responses on it as usual.
        self.rsps = rsps
        #: The token handed out by the token mock, and required by the chat mock.
        self.token = token if token is not None else secrets.token_hex(16)
        self._pieces: list[str] = _split(_DEFAULT_MOCK_REPLY)
        self._required: set[str] = set()
        self._faults_lock = threading.Lock()  # responses runs callbacks in the callers' threads
        self._faults: dict[str, collections.deque[list[Any]]] = {
            name: collections.deque() for name in _ENDPOINTS
        }
        if passthrough_loopback:
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
            match=[matchers.header_matcher({"UniqueId": self.token}), _chat_body_matcher],
        )

    @property
    def pieces(self) -> list[str]:
        """The pieces each chat is answered with."""
        return list(self._pieces)

    @property
    def token_calls(self) -> int:
        """How many token requests the mock answered."""
        return int(self._token_response.call_count)

    @property
    def chat_calls(self) -> int:
        """How many chat requests the mock answered."""
        return int(self._chat_response.call_count)

    def set_reply(self, reply: str | Iterable[str]) -> list[str]:
        """Set what every following chat is answered with, and require at least one chat.

        :param reply: a str (split into word pieces like the emulator does) or the pieces themselves.
        :returns: the pieces; ``"".join()`` of them is the reply text.
        """
        if isinstance(reply, str):
            pieces = _split(reply)
        else:
            pieces = list(reply)
            if not all(isinstance(p, str) for p in pieces):
                raise TypeError("every reply piece must be a str")
        self._pieces = pieces
        self._required.add("chat")
        return list(pieces)

    def require(self, *, token: bool = True, chat: bool = True) -> None:
        """Make the test fail at teardown unless these built-in mocks were requested.

        :param token: require at least one token request.
        :param chat: require at least one chat request.
        """
        if token:
            self._required.add("token")
        if chat:
            self._required.add("chat")

    # -- faults, as the emulator's -----------------------------------------------------------

    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | bytes | dict[str, Any] | list[Any] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next request(s) to ``endpoint`` with an HTTP error status.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200 to 599).
        :param headers: extra reply headers, e.g. ``{"Retry-After": "2"}``.
        :param body: None for ``{"code": status, "message": "<reason phrase>", "data": null}``; a
            dict or list is sent as JSON; a str or bytes as is (``text/plain``).
        :param times: how many requests get this reply.
        """
        _check_status(status)
        content_type = "application/json"
        if body is None:
            data = error_json(status, _phrase(status))
        elif isinstance(body, (bytes, bytearray)):
            data, content_type = bytes(body), "text/plain; charset=utf-8"
        elif isinstance(body, str):
            data, content_type = body.encode(), "text/plain; charset=utf-8"
        elif isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        else:
            raise ValueError(f"body must be None, str, bytes, dict or list, not {body!r}")
        extra = dict(_check_headers(headers))
        if not any(name.lower() == "content-type" for name in extra):
            extra["Content-Type"] = content_type
        self._queue(endpoint, (status, extra, data), times)

    def error_line(
        self,
        code: int,
        message: str = "upstream error",
        *,
        after: int = 0,
        key: str = "message",
        times: int = 1,
    ) -> None:
        """Answer the next chat(s) with HTTP 200, ``after`` pieces of the reply, then the error
        line ``{"code": code, key: message, "data": null}``.

        :param code: the body-level error code, e.g. 429 or 500.
        :param message: the error message.
        :param after: how many pieces come first (fewer if the reply is shorter).
        :param key: the key of the message (``"message"`` or ``"msg"``).
        :param times: how many chats get this reply.
        """
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError(f"code must be an int, not {code!r}")
        if not isinstance(message, str) or not isinstance(key, str):
            raise ValueError("message and key must be str")
        _check_count("after", after, 0)
        line = json.dumps({"code": code, key: message, "data": None}, ensure_ascii=False)
        self._queue("chat", ("error_line", after, line.encode() + b"\n"), times)

    def html(self, endpoint: str = "chat", *, status: int = 200, times: int = 1) -> None:
        """Answer the next request(s) to ``endpoint`` with a Cloudflare-like HTML page.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200, or e.g. 403 or 503).
        :param times: how many requests get the page.
        """
        _check_status(status)
        headers = {"Content-Type": "text/html; charset=UTF-8"}
        self._queue(endpoint, (status, headers, BLOCK_PAGE.encode()), times)

    def drop(self, endpoint: str = "chat", *, after: int = 0, times: int = 1) -> None:
        """Break the connection of the next request(s) to ``endpoint``, as far as a mock can.

        A chat gets the 200 headers and ``after`` pieces, then its body read fails with
        ``ConnectionResetError`` (a reset); a token request fails with no reply at all. (What a
        mock cannot do: a real socket, framing, a stall. Use the emulator for those.)

        :param endpoint: ``"token"`` or ``"chat"``.
        :param after: how many pieces a chat gets before the break (must be 0 for the token).
        :param times: how many requests get this treatment.
        """
        _check_count("after", after, 0)
        if endpoint == "token" and after:
            raise ValueError("after must be 0 for the token endpoint")
        self._queue(endpoint, ("drop", after, b""), times)

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many fault replies are still queued (for ``"token"``, ``"chat"``, or both)."""
        names = _ENDPOINTS if endpoint is None else (_check_endpoint(endpoint),)
        with self._faults_lock:
            return sum(fault[1] for name in names for fault in self._faults[name])

    def _queue(self, endpoint: str, fault: tuple[Any, ...], times: int) -> None:
        _check_endpoint(endpoint)
        _check_count("times", times, 1)
        with self._faults_lock:
            self._faults[endpoint].append([fault, times])

    def _take_fault(self, endpoint: str) -> Optional[tuple[Any, ...]]:
        with self._faults_lock:
            queue = self._faults[endpoint]
            if not queue:
                return None
            entry = queue[0]
            entry[1] -= 1
            if entry[1] <= 0:
                queue.popleft()
            fault: tuple[Any, ...] = entry[0]
            return fault

    def _token_callback(self, request: PreparedRequest) -> _Reply:
        fault = self._take_fault("token")
        if fault is None:
            return 200, {"Content-Type": "application/json"}, json.dumps(token_reply(self.token))
        if fault[0] == "drop":
            return _dropped()
        return fault[0], fault[1], fault[2]

    def _chat_callback(self, request: PreparedRequest) -> _Reply:
        fault = self._take_fault("chat")
        lines = [piece_line(piece) for piece in self._pieces]
        headers = {"Content-Type": _STREAM_TYPE}
        if fault is None:
            return 200, headers, b"".join(lines)
        kind = fault[0]
        if kind == "error_line":
            return 200, headers, b"".join(lines[: fault[1]]) + fault[2]
        if kind == "drop":
            return 200, headers, _BrokenBody(b"".join(lines[: fault[1]]))
        return fault[0], fault[1], fault[2]

    def _unused_faults(self) -> int:
        return self.pending_faults()

    def _drop_unrequired(self) -> None:
        """Before the final assertion: forget the built-in mocks nobody asked for."""
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


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _check_endpoint(endpoint: str) -> str:
    if endpoint not in _ENDPOINTS:
        raise ValueError(f"endpoint must be 'token' or 'chat', not {endpoint!r}")
    return endpoint


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, not {value!r}")


def _check_status(status: object) -> None:
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"status must be an int from 200 to 599, not {status!r}")


def _check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError(f"headers must map str to str, not {headers!r}")
    return dict(headers)


def _add_callback(
    rsps: responses.RequestsMock, method: str, url: Any, **kwargs: Any
) -> responses.BaseResponse:
    """``rsps.add_callback(...)``, returning the response it adds (``add_callback`` itself returns
    ``None`` in responses 0.23, which legacy code bases still pin)."""
    import responses  # lazy: responses is optional

    return rsps.add(responses.CallbackResponse(method, url, **kwargs))


def _split(text: str) -> list[str]:
    from aichatonline_sync.testing import split_pieces  # lazy: keeps the plugin cheap

    return split_pieces(text)


def _chat_body_matcher(request: PreparedRequest) -> tuple[bool, str]:
    body = request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return False, "the chat body is not JSON"
    if not isinstance(data, dict):
        return False, "the chat body is not a JSON object"
    missing = [key for key in ("conversationId", "prompt") if key not in data]
    if missing:
        return False, f"the chat body lacks {', '.join(missing)}"
    return True, ""


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Remember whether a test's call phase failed (the mock then skips its teardown assertion).

    :param item: the test item.
    :param call: the phase that ran.
    """
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True


@pytest.fixture
def aichatonline_mock(request: pytest.FixtureRequest) -> Iterator[AiChatOnlineMock]:
    """The upstream mocked with ``responses`` at ``https://aichatonline.test``.

    :param request: the pytest fixture request.
    :returns: an :class:`AiChatOnlineMock`; the mock is active for the whole test.
    """
    try:
        import responses  # lazy: responses is optional
    except ImportError:
        pytest.fail(
            "the aichatonline_mock fixture needs the 'responses' package: pip install responses",
            pytrace=False,
        )
    rsps = responses.RequestsMock(assert_all_requests_are_fired=True)
    mock = AiChatOnlineMock(rsps)
    rsps.start()
    try:
        yield mock
        if not request.node.stash.get(_CALL_FAILED, False):
            unused = mock._unused_faults()
            if unused:
                pytest.fail(
                    f"aichatonline_mock: {unused} queued fault repl{'y was' if unused == 1 else 'ies were'}"
                    " never used (no request reached it)",
                    pytrace=False,
                )
            mock._drop_unrequired()
            rsps.stop(allow_assert=True)
    finally:
        rsps.stop(allow_assert=False)
        rsps.reset()
