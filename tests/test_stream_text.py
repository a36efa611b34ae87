"""``ChatStream.text`` is exactly the text handed out so far, also inside one read's batch."""

from __future__ import annotations

from typing import Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

PIECES = ["Hé", "llo", " ", "wörld", "", "!", " 日本", "\u2028end"]


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
@pytest.mark.parametrize("gzip", [False, True])
def test_text_follows_every_piece(
    emulator: Callable[..., Emulator], framing: str, gzip: bool
) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gzip)
    with aco.Session(emu.url) as session, session.chat("hi") as stream:
        seen = []
        for piece in stream:
            seen.append(piece)
            assert stream.text == "".join(seen)
            assert stream.partial == stream.text
        assert seen == PIECES
        assert stream.text == "".join(PIECES)


def test_keep_text_false_keeps_nothing(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(reply=PIECES, framing="length")
    with aco.Session(emu.url) as session, session.chat("hi", keep_text=False) as stream:
        assert list(stream) == PIECES
        assert stream.text == ""


@pytest.mark.parametrize("keep_text", [True, False])
def test_a_broken_stream_says_how_much_was_handed_out(
    emulator: Callable[..., Emulator], keep_text: bool
) -> None:
    # Without keep_text it said "stopped after 0 characters" (the gateway's every mid-stream error).
    emu = emulator(reply=PIECES)
    emu.drop("chat", after=4)
    seen: list[str] = []
    with (  # noqa: PT012 - the loop is under test
        aco.Session(emu.url, max_retries=0) as session,
        pytest.raises(aco.IncompleteStreamError) as info,
    ):
        for piece in session.chat("hi", keep_text=keep_text):
            seen.append(piece)
    assert seen == PIECES[:4]
    count = len("".join(PIECES[:4]))
    expected = f"stopped after {count} characters" + ("" if keep_text else " (not kept)") + ":"
    assert expected in str(info.value)
    assert info.value.partial == ("".join(seen) if keep_text else "")


def test_partial_of_an_error_after_a_batch(emulator: Callable[..., Emulator]) -> None:
    """The error line arrives in the same read as the pieces before it: they are all handed
    out first, and .partial is exactly their text."""
    emu = emulator(reply=PIECES)
    emu.error_line(500, "boom", after=5)
    with aco.Session(emu.url) as session:
        seen = []
        with pytest.raises(aco.UpstreamError) as info:  # noqa: PT012 - the loop is under test
            for piece in session.chat("hi"):
                seen.append(piece)
        assert seen == PIECES[:5]
        assert info.value.partial == "".join(PIECES[:5])
