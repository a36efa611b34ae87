"""Errors in plain words that name their URL: bad chunk framing before the first piece, and a
chat cancelled before it was sent."""

from __future__ import annotations

from typing import Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = aco.Timeout(connect=5, read=5)


def test_bad_chunk_framing_before_the_first_piece_names_the_url_in_plain_words(
    emulator: MakeEmulator,
) -> None:
    emu = emulator()
    emu.raw_reply(
        "chat",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: text/event-stream\r\n\r\nzz\xff\r\nabc\r\n",
    )
    with aco.Session(emu.url, max_retries=0) as session, pytest.raises(aco.ProtocolError) as info:
        session.complete("hi")

    message = str(info.value)
    assert emu.url in message
    assert "bad chunk size 'zz\\xff'" in message
    assert "b'" not in message


def test_a_cancelled_chat_names_its_url(emulator: MakeEmulator) -> None:
    emu = emulator()
    cancel = aco.Cancellation()
    with aco.Session(emu.url) as session:
        session.grab_token()
        cancel.cancel()
        with pytest.raises(aco.APIConnectionError) as info:
            session.complete("hi", cancel=cancel)

    assert f"the chat request to {emu.url}/" in str(info.value)
    assert "was cancelled" in str(info.value)
    assert info.value.url is not None
    assert info.value.url.startswith(emu.url)
