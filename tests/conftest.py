"""Shared fixtures: emulators that are always stopped, a sleep recorder for retries, and guards that
keep every test off the network (only loopback) and independent of the others.

With ``AICHATONLINE_REQUIRE_OPTIONAL=1`` (as .ci/run sets on every row), a test that skips because
an optional package cannot be imported (``pytest.importorskip``) fails instead: a CI row passes by
running its tests, not by missing their packages. A package that cannot be had on some Python
(g4f needs 3.10+) is skipped with ``skipif`` on the version, and a reason that says so.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any, Callable

import _netguard
import pytest

from aichatonline_sync import RetryPolicy
from aichatonline_sync._api import close_shared_sessions
from aichatonline_sync.testing import Emulator

REQUIRE_OPTIONAL = os.environ.get("AICHATONLINE_REQUIRE_OPTIONAL", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_OPTIONAL and report.skipped and call.excinfo is not None):
        return
    message = str(call.excinfo.value)
    if message.startswith("could not import"):  # pytest.importorskip's words
        report.outcome = "failed"
        report.longrepr = f"{message}: AICHATONLINE_REQUIRE_OPTIONAL is set, install it"


class SleepRecorder:
    """A fake ``sleep`` for :class:`RetryPolicy`: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def policy(self, max_retries: int = 2, **kwargs: Any) -> RetryPolicy:
        return RetryPolicy(max_retries=max_retries, sleep=self, **kwargs)


@pytest.fixture
def no_sleep() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def emulator() -> Iterator[Callable[..., Emulator]]:
    """``make(**kwargs)`` starts an :class:`Emulator`; every one made is stopped after the test."""
    made: list[Emulator] = []

    def make(**kwargs: Any) -> Emulator:
        emu = Emulator(**kwargs)
        made.append(emu)
        return emu.start()

    yield make
    for emu in reversed(made):
        emu.stop()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No environment leaks in, no host but this machine is resolved or reached (``_netguard``), no
    shared session leaks out."""
    monkeypatch.delenv("AICHATONLINE_BASE_URL", raising=False)
    _netguard.install(monkeypatch.setattr)
    yield
    close_shared_sessions()
