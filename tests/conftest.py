"""Shared fixtures: emulators that are always stopped, a sleep recorder for retries, and guards that
keep every test off the network (only loopback) and independent of the others.

Optional packages: ``pytest.importorskip`` is wrapped here. With ``AICHATONLINE_REQUIRE_OPTIONAL=1``
(as .ci/run sets on every row) a test that would skip because an optional package cannot be imported
fails instead: a CI row passes by running its tests, not by missing their packages. A package that
the test extra cannot install on this Python (``UNAVAILABLE_HERE``, after setup.cfg's markers) still
skips, with a reason that says so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, Callable

import _netguard
import pytest

from aichatonline_sync import RetryPolicy
from aichatonline_sync._client.api import close_shared_sessions
from aichatonline_sync.testing import Emulator

REQUIRE_OPTIONAL = os.environ.get("AICHATONLINE_REQUIRE_OPTIONAL", "") not in ("", "0")

#: Optional packages that setup.cfg's test extra does not install on this Python, and why.
UNAVAILABLE_HERE = (
    {"g4f": "g4f needs Python 3.10 or newer (the test extra installs it from 3.10 on)"}
    if sys.version_info < (3, 10)
    else {}
)

_importorskip = pytest.importorskip


def _importorskip_or_fail(modname: str, *args: Any, **kwargs: Any) -> Any:
    """``pytest.importorskip``, but a skip for a missing package fails under REQUIRE_OPTIONAL."""
    __tracebackhide__ = True  # a skip or failure is reported at the test's line, as pytest's is
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as skip:
        unavailable = UNAVAILABLE_HERE.get(modname.split(".", maxsplit=1)[0])
        if unavailable:
            raise pytest.skip.Exception(unavailable, allow_module_level=True) from None
        if not REQUIRE_OPTIONAL:
            raise
        pytest.fail(f"{skip.msg}; AICHATONLINE_REQUIRE_OPTIONAL is set: install it", pytrace=False)


pytest.importorskip = _importorskip_or_fail  # type: ignore[assignment]


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
