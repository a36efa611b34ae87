"""The transport's public fallbacks: what runs when the internals of urllib3 and http.client that
``aichatonline_sync._transport.transport`` reads are not what it expects (its docstring lists each one).

Each test forces one fallback and runs real chats against the emulator over sockets.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import pytest
import requests
import urllib3

from aichatonline_sync import IncompleteStreamError, Session, Timeout
from aichatonline_sync._transport import transport as _transport
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
SHORT = Timeout(connect=5, read=5)
FRAMINGS = ["chunked", "length", "close"]
COMBOS = [(framing, gz) for framing in FRAMINGS for gz in (False, True)]
COMBO_IDS = [f"{framing}-{'gzip' if gz else 'plain'}" for framing, gz in COMBOS]
PIECES = ["Hello", ", ", "wörld ", "日本語 ", "\u2028", "emoji 🎉 ", "line\nbreak\r\n", "end"]
# HTTPResponse.read1: urllib3 2.2 on; before it (1.26, 2.0, 2.1) the fallback reads with stream().
HAS_READ1 = hasattr(urllib3.response.HTTPResponse, "read1")


@pytest.fixture
def public_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Internal 1 unavailable: every body is read with urllib3's public reads. Records each call."""
    calls: list[bool] = []

    def unavailable(response: requests.Response) -> None:
        calls.append(True)

    monkeypatch.setattr(_transport._Wire, "of", staticmethod(unavailable))
    return calls


def test_the_internals_are_used_on_this_stack(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that the fallback never becomes the default silently after an upgrade of urllib3."""
    found: list[Optional[Any]] = []
    real = _transport._Wire.of

    def spy(response: requests.Response) -> Optional[Any]:
        wire = real(response)
        found.append(wire)
        return wire

    monkeypatch.setattr(_transport._Wire, "of", staticmethod(spy))
    emu = emulator(reply=PIECES)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        assert session.complete("hi") == "".join(PIECES)
    assert found
    assert all(wire is not None and wire.sock is not None for wire in found)


@pytest.mark.parametrize(("framing", "gz"), COMBOS, ids=COMBO_IDS)
def test_fallback_reads_every_framing_exactly(
    emulator: MakeEmulator, public_reads: list[bool], framing: str, gz: bool
) -> None:
    emu = emulator(reply=PIECES, framing=framing, gzip=gz)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("prompt")
        assert list(stream) == PIECES
        assert stream.text == "".join(PIECES)
        assert session.complete("again") == "".join(PIECES)
    assert public_reads  # the fallback did run


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_fallback_hands_the_connection_back(
    emulator: MakeEmulator, public_reads: list[bool], framing: str
) -> None:
    emu = emulator(reply=PIECES, framing=framing)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        for _ in range(3):
            assert session.complete("hi") == "".join(PIECES)
    assert emu.connections == 1
    assert emu.tokens_issued == 1


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_fallback_hands_each_piece_out_on_arrival(
    emulator: MakeEmulator, public_reads: list[bool], framing: str
) -> None:
    """urllib3's ``read1`` (2.2 on) is prompt in every framing; ``stream()`` (urllib3 1.26 to 2.1)
    only on chunked bodies (the reason for internal 1)."""
    if not HAS_READ1 and framing != "chunked":
        pytest.skip(
            f"urllib3 {urllib3.__version__} has no read1 (2.2 on): its public reads wait for "
            "whole blocks on a body that is not chunked"
        )
    received = [threading.Event() for _ in PIECES]
    late: list[int] = []

    def before_piece(index: int) -> None:
        if index > 0 and not received[index - 1].wait(10):
            late.append(index)

    emu = emulator(reply=PIECES, framing=framing, before_piece=before_piece)
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


@pytest.fixture
def no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Internals 2 and 3 unavailable: no socket to shorten the timeout of or to shut down."""
    monkeypatch.setattr(_transport, "_socket_of", lambda raw: None)


def test_abort_fallback_closes_the_response(emulator: MakeEmulator, no_socket: None) -> None:
    emu = emulator(reply=[f"p{i} " for i in range(2000)], chunk_delay=0.001)
    with Session(emu.url, timeout=SHORT, max_retries=0) as session:
        stream = session.chat("hi")
        first = next(stream)
        stream.abort()
        with pytest.raises(IncompleteStreamError) as info:
            for _ in stream:
                pass
        assert info.value.partial.startswith(first)
        assert stream.closed
        assert session.complete("again").startswith("p0 ")  # the session still works


def test_deadline_fallback_still_ends_the_chat(emulator: MakeEmulator, no_socket: None) -> None:
    emu = emulator(reply=[f"p{i} " for i in range(50)], chunk_delay=0.05)
    timeout = Timeout(connect=5, read=5, total=0.5)
    with Session(emu.url, timeout=timeout, max_retries=0) as session:
        stream = session.chat("hi")
        with pytest.raises(IncompleteStreamError, match="deadline"):
            for _ in stream:
                pass


def test_close_fallback(emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Internal 4 unavailable: ``requests.Session.close()`` alone; the session still closes."""
    monkeypatch.setattr(_transport, "_close_pools", lambda http: None)
    closed: list[bool] = []
    real_close = requests.Session.close

    def close(self: requests.Session) -> None:
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(requests.Session, "close", close)
    emu = emulator(reply=PIECES)
    session = Session(emu.url, timeout=SHORT, max_retries=0)
    assert session.complete("hi") == "".join(PIECES)
    session.close()
    assert closed == [True]
    assert session.closed



# -- growing the pool while other threads send -----------------------------------------------------


def test_growing_the_pool_leaves_a_lookup_in_progress_intact_and_closes_the_old_pool(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator()
    transport = _transport.Transport(emu.url, pool_maxsize=2)
    token = transport.endpoint("GET", f"{emu.url}/api/v1/user/getUniqueId", {}, emu.url)
    http = transport.http
    try:
        token.send(timeout=(5, 5)).close()
        old = http.get_adapter(emu.url)
        assert old.poolmanager.pools.keys()  # the connection to the emulator, kept
        lookup = iter(http.adapters.items())  # what get_adapter does in another thread
        next(lookup)

        transport.ensure_pool(8)

        assert len(list(lookup)) == 1  # no "OrderedDict mutated during iteration"
        new = http.get_adapter(emu.url)
        assert new is not old
        assert new is http.get_adapter(emu.url.replace("http://", "https://"))
        assert list(http.adapters) == ["https://", "http://"]
        assert not old.poolmanager.pools.keys()  # the old adapter was closed
        response = token.send(timeout=(5, 5))
        assert response.status_code == 200
        response.close()
        assert new.poolmanager.pools.keys()
    finally:
        transport.close()
