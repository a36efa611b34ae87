"""The token never shows in an error: echoed in an error line, it is scrubbed from the
message."""

from __future__ import annotations

from typing import Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_a_token_echoed_in_an_error_line_is_scrubbed(emulator: MakeEmulator) -> None:
    emu = emulator()
    with aco.Session(emu.url, timeout=SHORT, max_retries=0) as session:
        token = session.grab_token()
        emu.error_line(400, f"UniqueId {token} is not valid")
        with pytest.raises(aco.UpstreamError) as info:
            session.complete("hi")
    assert token not in str(info.value)
    assert token not in info.value.message
