"""``ChatStream.add_done_callback``: called once with the whole reply when it was read to its end,
also when it is added after that end (as ``concurrent.futures`` does)."""

from __future__ import annotations

from typing import Callable

from aichatonline_sync import Session
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


def test_a_callback_added_after_the_end_runs_at_once(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["Hello", ", world"])
    calls: list[str] = []
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        early: list[str] = []
        stream.add_done_callback(early.append)
        assert list(stream) == ["Hello", ", world"]
        assert early == ["Hello, world"]
        stream.add_done_callback(calls.append)
        assert calls == ["Hello, world"]
        stream.add_done_callback(calls.append)
    assert calls == ["Hello, world", "Hello, world"]
    assert early == ["Hello, world"]  # never called twice


def test_a_callback_added_after_a_close_is_not_called(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["Hello", ", world"])
    calls: list[str] = []
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        assert next(stream) == "Hello"
        stream.close()
        stream.add_done_callback(calls.append)
    assert calls == []
