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
    at :attr:`AiChatOnlineMock.base_url` (``https://aichatonline.test``). Requests to any other URL
    fail with a :class:`requests.ConnectionError`, and the chat mock only matches a request whose
    ``UniqueId`` header is :attr:`AiChatOnlineMock.token` and whose JSON body has
    ``conversationId`` and ``prompt``.

Strictness of ``aichatonline_mock``: the mock is created with ``assert_all_requests_are_fired=True``,
so every response *the test registers itself* on ``mock.rsps`` must be requested. The two built-in
responses (token and chat) are not required, so a test that only grabs a token passes, with one
exception: once the test calls :meth:`AiChatOnlineMock.set_reply` it has asked for a chat, and the
test fails at teardown if no chat was made. :meth:`AiChatOnlineMock.require` states such
expectations explicitly.

Importing this module is cheap: neither ``responses`` nor the emulator is imported until a fixture
needs it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Callable

import pytest

from ._protocol import CHAT_PATH, TOKEN_PATH, piece_line, token_reply

if TYPE_CHECKING:
    import responses
    from requests import PreparedRequest

    from aichatonline_sync.testing import Emulator

__all__ = ["MOCK_BASE_URL", "AiChatOnlineMock"]

#: The base URL the ``aichatonline_mock`` fixture answers for.
MOCK_BASE_URL = "https://aichatonline.test"

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
    """

    def __init__(
        self,
        rsps: responses.RequestsMock,
        base_url: str = MOCK_BASE_URL,
        token: str | None = None,
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
        self.token_url = re.compile(
            re.escape(f"{self.base_url}{TOKEN_PATH}") + r"(\?.*)?\Z"
        )
        #: The chat URL.
        self.chat_url = f"{self.base_url}{CHAT_PATH}"
        self._token_response = rsps.add(
            "GET",
            self.token_url,
            json=token_reply(self.token),
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

    def _chat_callback(self, request: PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        body = b"".join(piece_line(piece) for piece in self._pieces)
        return 200, {"Content-Type": "text/event-stream;charset=UTF-8"}, body

    def _drop_unrequired(self) -> None:
        """Before the final assertion: forget the built-in mocks nobody asked for."""
        for name, response in (("token", self._token_response), ("chat", self._chat_response)):
            if name not in self._required and response.call_count == 0:
                self.rsps.remove(response)


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
            mock._drop_unrequired()
            rsps.stop(allow_assert=True)
    finally:
        rsps.stop(allow_assert=False)
        rsps.reset()
