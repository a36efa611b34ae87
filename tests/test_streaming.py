"""Streaming against the real emulator over sockets: every framing, gzip, promptness, large replies,
connection reuse and release."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from aichatonline_sync import Session, Timeout
from aichatonline_sync.testing import Emulator

FRAMINGS = ["chunked", "length", "close"]
COMBOS = [(framing, gz) for framing in FRAMINGS for gz in (False, True)]
COMBO_IDS = [f"{framing}-{'gzip' if gz else 'plain'}" for framing, gz in COMBOS]

#: How long the emulator waits for the client to take a piece before it sends the next one. Longer
#: than the session's read timeout, so a client that holds pieces back fails instead of hanging.
HOOK_WAIT = 10.0
SHORT = Timeout(connect=5, read=5)

PIECES = [
    "Hello",
    ", ",
    "wörld ",
    "日本語 ",
    "\u2028",
    "",
    "emoji 🎉 ",
    'quote "x" and back\\slash ',
    "line\nbreak\r\n",
    "\u2029end\u0085",
]

MakeEmulator = Callable[..., Emulator]


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_pieces_and_text_are_exact(emulator: MakeEmulator, framing: str, gz: bool) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gz)
    expected = emu.pieces_for("prompt")
    assert expected == PIECES
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert list(session.chat("prompt")) == expected
        assert session.complete("prompt") == "".join(expected)
        stream = session.chat("prompt")
        assert list(stream) == expected
        assert stream.text == "".join(expected)


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_default_reply_quotes_the_prompt(emulator: MakeEmulator, framing: str, gz: bool) -> None:
    emu = emulator(framing=framing, gzip=gz)
    prompt = "Ünïcode prompt \u2028 with odd characters"
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert list(session.chat(prompt)) == emu.pieces_for(prompt)
    assert emu.chat_requests[0].prompt == prompt


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_each_piece_is_handed_out_before_the_next_is_sent(
    emulator: MakeEmulator, framing: str, gz: bool
) -> None:
    """The emulator sends piece i+1 only once the test has received piece i: a client that waits
    for more bytes before handing a piece out runs into its read timeout and fails."""
    received = [threading.Event() for _ in PIECES]
    late: list[int] = []

    def before_piece(index: int) -> None:
        if index > 0 and not received[index - 1].wait(HOOK_WAIT):
            late.append(index)

    emu = emulator(reply=PIECES, framing=framing, gzip=gz, before_piece=before_piece)
    got: list[str] = []
    try:
        with Session(emu.url, timeout=SHORT, max_retries=0) as session:
            for piece in session.chat("prompt"):
                got.append(piece)
                received[len(got) - 1].set()
    finally:
        for event in received:
            event.set()
    assert late == []
    assert got == PIECES


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_large_reply_is_exact(emulator: MakeEmulator, framing: str, gz: bool) -> None:
    pieces = [f"w{i}{'é' if i % 7 == 0 else ''} " for i in range(20000)]
    emu = emulator(reply=pieces, framing=framing, gzip=gz)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("big")
        assert list(stream) == pieces
        assert stream.text == "".join(pieces)
        assert session.complete("big") == "".join(pieces)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_sequential_chats_reuse_one_connection_and_token(
    emulator: MakeEmulator, framing: str, gz: bool
) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gz)
    text = "".join(PIECES)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert session.complete("1") == text
        assert list(session.chat("2")) == PIECES
        with session.chat("3") as stream:
            assert "".join(stream) == text
        assert session.complete("4") == text
        assert session.complete("5") == text
    assert len(emu.chat_requests) == 5
    assert emu.tokens_issued == 1
    assert emu.connections == 1


def test_close_delimited_replies_get_a_new_connection_each(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES, framing="close")
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        for prompt in "12345":
            assert session.complete(prompt) == "".join(PIECES)
    assert emu.tokens_issued == 1
    # The token request's connection carries the first chat; each chat then ends its connection.
    assert emu.connections == 5


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("how", ["break", "with", "close"])
def test_leaving_a_stream_early_then_chatting_again(
    emulator: MakeEmulator, framing: str, gz: bool, how: str
) -> None:
    """The first reply is held mid-stream by the server; leaving it early must not hang the session
    nor hand the half-read connection to the next chat."""
    gate = threading.Event()
    pieces = [f"piece{i} " for i in range(50)]

    def before_piece(index: int) -> None:
        if index >= 3:
            gate.wait(HOOK_WAIT)

    emu = emulator(reply=pieces, framing=framing, gzip=gz, before_piece=before_piece)
    try:
        with Session(emu.url, timeout=SHORT, max_retries=0) as session:
            if how == "break":
                for piece in session.chat("first"):
                    assert piece == "piece0 "
                    break
            elif how == "with":
                with session.chat("first") as stream:
                    assert next(stream) == "piece0 "
                assert stream.closed
            else:
                stream = session.chat("first")
                assert next(stream) == "piece0 "
                stream.close()
                stream.close()
                assert stream.closed
            if how != "break":
                assert list(stream) == []
            emu.before_piece = None
            assert session.complete("second") == "".join(pieces)
    finally:
        gate.set()
    assert emu.tokens_issued == 1
    assert len(emu.chat_requests) == 2
    assert emu.connections == 2


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_exhausted_stream_in_with_block_returns_the_connection(
    emulator: MakeEmulator, framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        with session.chat("one") as stream:
            assert list(stream) == PIECES
        assert stream.closed
        assert stream.text == "".join(PIECES)
        assert list(stream) == []
        assert session.complete("two") == "".join(PIECES)
    assert emu.connections == 1


def test_text_grows_while_iterating(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    seen: list[str] = []
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("p")
        for piece in stream:
            seen.append(piece)
            assert stream.text == "".join(seen)
            assert stream.partial == "".join(seen)
        assert stream.text == "".join(PIECES)
        assert stream.closed


@pytest.mark.parametrize("framing", FRAMINGS)
def test_keep_text_false_still_yields_every_piece(emulator: MakeEmulator, framing: str) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("p", keep_text=False)
        assert list(stream) == PIECES
        assert stream.text == ""


def test_stream_metadata(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    with (
        Session(emu.url, timeout=SHORT, max_retries=0) as session,
        session.chat("p", conversation_id="abc123XYZ_", model="gpt-4o-mini") as stream,
    ):
        assert stream.conversation_id == "abc123XYZ_"
        assert stream.model == "gpt-4o-mini"
        assert list(stream) == PIECES
    assert emu.chat_requests[0].json == {"conversationId": "abc123XYZ_", "prompt": "p"}


def test_one_stream_per_thread_interleaved(emulator: MakeEmulator) -> None:
    """Two streams of one session open at the same time, read alternately, stay separate."""
    emu = emulator(reply=lambda prompt: f"{prompt} says one two three four")
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        a = session.chat("alpha")
        b = session.chat("beta")
        got: dict[str, list[str]] = {"alpha": [], "beta": []}
        iterators: list[tuple[str, Any]] = [("alpha", iter(a)), ("beta", iter(b))]
        while iterators:
            for name, iterator in list(iterators):
                piece = next(iterator, None)
                if piece is None:
                    iterators.remove((name, iterator))
                else:
                    got[name].append(piece)
    assert got["alpha"] == emu.pieces_for("alpha")
    assert got["beta"] == emu.pieces_for("beta")
