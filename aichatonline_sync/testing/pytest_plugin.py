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
    An :class:`~aichatonline_sync.testing.AiChatOnlineMock` (:mod:`.mock`): a strict
    :class:`responses.RequestsMock` (needs ``pip install responses``) that answers the token
    request (any ``canvas``) and the chat request at :attr:`AiChatOnlineMock.base_url`
    (``https://aichatonline.test``). Requests to loopback addresses (``127.x.x.x``,
    ``localhost``, ``[::1]``: an :class:`~aichatonline_sync.testing.Emulator`, any local
    server) pass through to the real server, so the mock and a real emulator work in
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

Importing this module does not import ``responses``: the mock fixture does, when a test uses
it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any, Callable

import pytest

from .. import close_shared_sessions
from .emulator import Emulator
from .mock import LOOPBACK_URLS, MOCK_BASE_URL, AiChatOnlineMock

__all__ = ["LOOPBACK_URLS", "MOCK_BASE_URL", "AiChatOnlineMock"]

_MARKER = "aichatonline_emulator"


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
            unused = mock.pending_faults()
            if unused:
                pytest.fail(
                    f"aichatonline_mock: {unused} queued fault repl{'y was' if unused == 1 else 'ies were'}"
                    " never used (no request reached it)",
                    pytrace=False,
                )
            mock.remove_unrequired()
            rsps.stop(allow_assert=True)
    finally:
        close_shared_sessions()
        rsps.stop(allow_assert=False)
        rsps.reset()
