"""The token request goes out like the chat: through a given ``requests.Session`` with its
params."""

from __future__ import annotations

from typing import Callable

import requests

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_the_token_request_keeps_a_given_sessions_params(emulator: MakeEmulator) -> None:
    emu = emulator()
    http = requests.Session()
    http.params = {"k": "v"}
    with aco.Session(emu.url, timeout=SHORT, http=http) as session:
        session.grab_token()
    http.close()
    query = emu.requests[0].query
    assert query["k"] == "v"
    assert query["canvas"].startswith("-")
