"""pytest fixtures for code that uses :mod:`aichatonline_sync` (loaded through the ``pytest11`` entry
point in every project that has the package installed).

Fixtures (none is autouse). Each one that points chats at a double closes the sessions that
module-level calls share (:func:`aichatonline_sync.close_shared_sessions`) when it is set up and
when it is torn down, so no token or pooled connection of one test reaches the next:

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
    one test; requests to any other URL fail with a :class:`requests.ConnectionError`. The mock
    judges a chat as the emulator does (one model, :mod:`aichatonline_sync.testing.faults`): a
    ``UniqueId`` other than :attr:`AiChatOnlineMock.token` is answered with HTTP 401 (so the
    library's fresh-token retry runs), a body that is not a JSON object with a str ``prompt``
    with HTTP 400. It has the emulator's faults (:meth:`~AiChatOnlineMock.fail`,
    :meth:`~AiChatOnlineMock.error_line`, :meth:`~AiChatOnlineMock.html`,
    :meth:`~AiChatOnlineMock.drop`), built and checked by the same code, queued per endpoint.

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

import errno
import io
import json
import re
import secrets
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pytest

from .. import close_shared_sessions
from .._client.config import check_bool
from .._wire.protocol import CHAT_PATH, TOKEN_HEADER, TOKEN_PATH, piece_line, token_reply
from . import faults as _faults
from .faults import DEFAULT_CONTENT_TYPE, Drop, ErrorLine, FaultQueue, Reply

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

    close_shared_sessions()
    try:
        yield make
    finally:
        close_shared_sessions()
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
        if token is not None:
            _faults.check_headers({TOKEN_HEADER: token})
        #: The base URL answered for (no trailing slash).
        self.base_url = base_url.rstrip("/")
        #: The :class:`responses.RequestsMock`; register more responses on it as usual.
        self.rsps = rsps
        #: The token handed out by the token mock; a chat carrying any other gets HTTP 401.
        self.token = token if token is not None else secrets.token_hex(16)
        self._pieces: list[str] = _faults.split_pieces(_DEFAULT_MOCK_REPLY)
        self._reply_func: Optional[Callable[[str], str]] = None
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

    def set_reply(self, reply: str | Iterable[str] | Callable[[str], str] | None) -> list[str]:
        """Set what every following chat is answered with, and require at least one chat.

        :param reply: as the emulator's: None (the default reply), a str (split into word pieces
            like the emulator does), the pieces themselves, or a callable taking the prompt and
            returning the reply's text.
        :returns: the pieces; ``"".join()`` of them is the reply text (``[]`` for a callable,
            whose pieces depend on each prompt).
        :raises InvalidRequestError: (a ``ValueError``) for anything else, as the emulator's.
        """
        if callable(reply) and not isinstance(reply, (str, bytes, bytearray, Mapping)):
            self._reply_func = reply
            self._pieces = []
        else:
            self._reply_func = None
            self._pieces = _faults.reply_pieces(_DEFAULT_MOCK_REPLY if reply is None else reply)
        self._required.add("chat")
        return list(self._pieces)

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

    # -- faults, built by the model the emulator uses (._faults) ---------------------------------

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
        :param status: the HTTP status (200 to 599, but not 204 or 304, which carry no body).
        :param headers: extra reply headers, e.g. ``{"Retry-After": "2"}``.
        :param body: None for ``{"code": status, "message": "<reason phrase>", "data": null}``; a
            dict or list is sent as JSON; a str or bytes as is (``text/plain``).
        :param times: how many requests get this reply.
        """
        self._faults.add(endpoint, _faults.fail(status, headers=headers, body=body), times)

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
        fault = _faults.error_line(code, message, after=after, key=key)
        self._faults.add("chat", fault, times)

    def html(self, endpoint: str = "chat", *, status: int = 200, times: int = 1) -> None:
        """Answer the next request(s) to ``endpoint`` with a Cloudflare-like HTML page.

        :param endpoint: ``"token"`` or ``"chat"``.
        :param status: the HTTP status (200, or e.g. 403 or 503).
        :param times: how many requests get the page.
        """
        self._faults.add(endpoint, _faults.html(status), times)

    def drop(self, endpoint: str = "chat", *, after: int = 0, times: int = 1) -> None:
        """Break the connection of the next request(s) to ``endpoint``, as far as a mock can.

        A chat gets the 200 headers and ``after`` pieces, then its body read fails with
        ``ConnectionResetError`` (a reset); a token request fails with no reply at all. (What a
        mock cannot do: a real socket, framing, a stall. Use the emulator for those.)

        :param endpoint: ``"token"`` or ``"chat"``.
        :param after: how many pieces a chat gets before the break (must be 0 for the token).
        :param times: how many requests get this treatment.
        """
        self._faults.add(endpoint, _faults.drop(endpoint, after=after), times)

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many fault replies are still queued (for ``"token"``, ``"chat"``, or both)."""
        return self._faults.pending(endpoint)

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
        if fault is None:
            sent = request.headers.get(TOKEN_HEADER)
            known = isinstance(sent, str) and sent.strip() == self.token
            rejection = _faults.chat_rejection(known, _json_body(request))
            if rejection is not None:
                return _response(rejection)
        pieces = self._pieces
        if self._reply_func is not None:
            body = _json_body(request)
            prompt = body.get("prompt") if isinstance(body, dict) else None
            pieces = _faults.reply_pieces(self._reply_func(prompt if isinstance(prompt, str) else ""))
        lines = [piece_line(piece) for piece in pieces]
        headers = {"Content-Type": DEFAULT_CONTENT_TYPE}
        if isinstance(fault, ErrorLine):
            return 200, headers, b"".join(lines[: fault.after]) + fault.line
        if isinstance(fault, Drop):
            return 200, headers, _BrokenBody(b"".join(lines[: fault.after]))
        return 200, headers, b"".join(lines)

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
    close_shared_sessions()
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
        close_shared_sessions()
        rsps.stop(allow_assert=False)
        rsps.reset()
