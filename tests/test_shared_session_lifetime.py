"""A shared session stays open while a module-level call uses it, however many other option sets
pass through the bounded registry meanwhile."""

from __future__ import annotations

import threading
from typing import Any, Callable

import aichatonline_sync as aco
from aichatonline_sync._client.registry import MAX_SHARED_SESSIONS
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_a_module_level_batch_keeps_its_shared_session_open(emulator: MakeEmulator) -> None:
    """Other option sets used meanwhile must not close the session a running batch uses."""
    started = threading.Event()
    go = threading.Event()

    def reply(prompt: str) -> str:
        if prompt == "first":
            started.set()
            go.wait(10)
        return f"re {prompt}"

    emu = emulator(reply=reply)
    other = emulator()
    out: list[Any] = []
    thread = threading.Thread(
        target=lambda: out.append(
            aco.batch(["first", "a", "b", "c"], base_url=emu.url, max_workers=1, max_retries=0)
        )
    )
    thread.start()
    assert started.wait(10)
    for i in range(MAX_SHARED_SESSIONS + 1):
        aco.complete("x", base_url=other.url, headers={"X-N": str(i)}, max_retries=0)
    go.set()
    thread.join(10)
    assert out == [["re first", "re a", "re b", "re c"]]
