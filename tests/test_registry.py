"""The bounded registry of shared sessions behind module-level ``aco.chat``/``aco.complete``.

Everything runs over the real emulator. Open connections are counted on the client side, from the
kernel's table of TCP sockets (``/proc/net/tcp``): a pooled connection that was really closed is
no longer ``ESTABLISHED`` the moment ``close()`` returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync._client import registry as _registry
from aichatonline_sync._client.registry import (
    MAX_SHARED_SESSIONS,
    shared_session,
)
from aichatonline_sync.testing import Emulator, split_pieces

MakeEmulator = Callable[..., Emulator]

REPLY = "Shared sessions keep one token and one pooled connection."
#: A reply of many pieces, for a stream that is held open in the middle.
LONG_PIECES = [f"piece{i} " for i in range(40)]

_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_ESTABLISHED = "01"


def open_connections_to(port: int) -> int:
    """How many client sockets of this machine are connected (ESTABLISHED) to ``port``.

    The emulator listens on a fresh ephemeral port, so these are the test's own connections.
    """
    tables = [table for table in _TCP_TABLES if table.exists()]
    if not tables:
        pytest.skip("counting open TCP connections needs /proc/net/tcp (Linux)")
    count = 0
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == _ESTABLISHED:
                count += 1
    return count


def headers_options(emu: Emulator, index: int) -> dict[str, Any]:
    """Session options that differ only in one per-call header."""
    return {"base_url": emu.url, "headers": {"X-N": str(index)}}


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=REPLY)


# -- one session for the same settings ----------------------------------------------------------


def test_same_settings_make_one_token_request_and_one_connection(emu: Emulator) -> None:
    first = aco.complete("hi", base_url=emu.url)
    second = aco.complete("hi", base_url=emu.url)

    assert first == second == REPLY
    assert emu.tokens_issued == 1
    assert len(emu.token_requests) == 1
    assert emu.connections == 1
    assert len(emu.chat_requests) == 2
    assert len(_registry._registry) == 1


def test_shared_session_is_the_one_module_level_calls_use(emu: Emulator) -> None:
    session = shared_session(base_url=emu.url)
    assert aco.complete("hi", base_url=emu.url) == REPLY
    assert shared_session(base_url=emu.url) is session
    assert session.grab_token() == emu.issued_tokens[0]  # the token of that call, kept
    assert emu.tokens_issued == 1


# -- bounded: varying options do not keep a session each ----------------------------------------


def test_per_call_headers_keep_at_most_max_sessions_and_close_the_dropped(emu: Emulator) -> None:
    calls = 20
    sessions: list[aco.Session] = []
    for index in range(calls):
        options = headers_options(emu, index)
        sessions.append(shared_session(**options))  # the session this call is about to use
        assert aco.complete("hi", **options) == REPLY
        assert len(_registry._registry) <= MAX_SHARED_SESSIONS

    assert len(_registry._registry) == MAX_SHARED_SESSIONS
    assert len({id(session) for session in sessions}) == calls  # one per distinct header
    dropped, kept = sessions[:-MAX_SHARED_SESSIONS], sessions[-MAX_SHARED_SESSIONS:]
    assert [session.closed for session in dropped] == [True] * len(dropped)
    assert [session.closed for session in kept] == [False] * len(kept)
    # Each session opened one connection (token and chat on it); only the kept ones stay open.
    assert emu.connections == calls
    assert open_connections_to(emu.port) == MAX_SHARED_SESSIONS
    # Every call sent its own header (so every call really used its own session).
    assert [request.header("X-N") for request in emu.chat_requests] == [
        str(index) for index in range(calls)
    ]


def test_least_recently_used_session_is_dropped_first(emu: Emulator) -> None:
    first = shared_session(**headers_options(emu, 0))
    for index in range(1, MAX_SHARED_SESSIONS):
        shared_session(**headers_options(emu, index))
    assert shared_session(**headers_options(emu, 0)) is first  # used again: now the newest

    shared_session(**headers_options(emu, MAX_SHARED_SESSIONS))  # one too many: drops number 1

    assert not first.closed
    assert len(_registry._registry) == MAX_SHARED_SESSIONS
    assert shared_session(**headers_options(emu, 0)) is first


def test_a_new_requests_session_per_call_stays_bounded(emu: Emulator) -> None:
    calls = 20
    with contextlib.ExitStack() as stack:
        https = [stack.enter_context(requests.Session()) for _ in range(calls)]
        sessions: list[aco.Session] = []
        for http in https:
            sessions.append(shared_session(base_url=emu.url, http=http))
            assert aco.complete("hi", base_url=emu.url, http=http) == REPLY
            assert len(_registry._registry) <= MAX_SHARED_SESSIONS

        assert len(_registry._registry) == MAX_SHARED_SESSIONS
        assert len({id(session) for session in sessions}) == calls
        dropped = sessions[:-MAX_SHARED_SESSIONS]
        assert [session.closed for session in dropped] == [True] * len(dropped)
        assert not any(session.closed for session in sessions[-MAX_SHARED_SESSIONS:])
        # A requests.Session given as http= belongs to the caller: dropping the shared session
        # that used it leaves it working.
        response = https[0].get(f"{emu.url}/api/v1/user/getUniqueId?canvas=-abcdefghij", timeout=5)
        assert response.status_code == 200


# -- a stream outlives the drop of its session --------------------------------------------------


class PieceGate:
    """A ``before_piece`` hook that holds the reply before piece ``at`` until :meth:`open`."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = threading.Event()
        self.released = threading.Event()

    def __call__(self, index: int) -> None:
        if index == self.at:
            self.reached.set()
            self.released.wait(10)  # bounded: a failing test never hangs the emulator

    def open(self) -> None:
        self.released.set()


@pytest.fixture
def gate() -> Iterator[PieceGate]:
    hold = PieceGate(at=1)
    yield hold
    hold.open()


def test_open_stream_keeps_reading_after_its_session_is_dropped(
    emulator: MakeEmulator, gate: PieceGate
) -> None:
    slow = emulator(reply=LONG_PIECES, before_piece=gate)
    fast = emulator(reply=REPLY)
    session = shared_session(base_url=slow.url)

    stream = aco.chat("tell me a long story", base_url=slow.url)
    with stream:
        assert next(stream) == LONG_PIECES[0]
        assert gate.reached.wait(5)  # the server holds the rest of the reply
        for index in range(MAX_SHARED_SESSIONS + 1):
            assert aco.complete("hi", **headers_options(fast, index)) == REPLY
        assert len(_registry._registry) == MAX_SHARED_SESSIONS
        assert shared_session(base_url=slow.url) is not session  # it was dropped...
        assert not stream.closed  # ... while the stream was open

        gate.open()
        rest = list(stream)

    assert [LONG_PIECES[0], *rest] == LONG_PIECES
    assert stream.text == "".join(LONG_PIECES)
    assert session.closed


def test_call_in_progress_keeps_its_session_open_until_it_ends(
    emulator: MakeEmulator, gate: PieceGate
) -> None:
    slow = emulator(reply=LONG_PIECES, before_piece=gate)
    fast = emulator(reply=REPLY)
    session = shared_session(base_url=slow.url)
    results: list[str] = []
    errors: list[BaseException] = []

    def complete_slowly() -> None:
        try:
            results.append(aco.complete("tell me a long story", base_url=slow.url))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=complete_slowly, daemon=True)
    worker.start()
    try:
        assert gate.reached.wait(5)  # the worker's complete() is in the middle of its reply
        for index in range(MAX_SHARED_SESSIONS + 1):
            assert aco.complete("hi", **headers_options(fast, index)) == REPLY
        assert shared_session(base_url=slow.url) is not session  # dropped from the registry
        assert not session.closed  # but still in use by complete()
    finally:
        gate.open()
        worker.join(10)

    assert not worker.is_alive()
    assert errors == []
    assert results == ["".join(LONG_PIECES)]
    assert session.closed  # closed once its last call ended


# -- close_shared_sessions ----------------------------------------------------------------------


def test_close_shared_sessions_closes_them_all_and_the_next_call_works(emu: Emulator) -> None:
    sessions = []
    for index in range(3):
        options = headers_options(emu, index)
        assert aco.complete("hi", **options) == REPLY
        sessions.append(shared_session(**options))
    assert open_connections_to(emu.port) == 3

    aco.close_shared_sessions()

    assert [session.closed for session in sessions] == [True, True, True]
    assert len(_registry._registry) == 0
    assert open_connections_to(emu.port) == 0

    assert aco.complete("hi", base_url=emu.url) == REPLY
    assert len(_registry._registry) == 1
    assert emu.tokens_issued == 4  # a new session, with a new token
    assert open_connections_to(emu.port) == 1
    aco.close_shared_sessions()
    aco.close_shared_sessions()  # idempotent
    assert len(_registry._registry) == 0


def test_close_shared_sessions_is_the_registry_function() -> None:
    assert aco.close_shared_sessions is _registry.close_shared_sessions
    assert "close_shared_sessions" in aco.__all__


def test_chat_stream_from_module_level_chat(emu: Emulator) -> None:
    with aco.chat("hi", base_url=emu.url) as stream:
        pieces = list(stream)
    assert pieces == split_pieces(REPLY)
    assert stream.text == REPLY


@pytest.mark.parametrize("front", ["conversation", "display_stream"])
def test_a_shared_session_dropped_while_its_chat_opens_stays_open_for_that_chat(
    emulator: MakeEmulator, front: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator(reply=REPLY)
    other = emulator(reply=REPLY)
    http = requests.Session()
    dropped: list[aco.Session] = []

    def drop_it_now(response: requests.Response, **_: Any) -> None:
        # Runs inside the token request of the chat below: other calls push its session out.
        if not dropped and "getUniqueId" in response.url:
            dropped.append(shared_session(base_url=emu.url, http=http))
            for index in range(MAX_SHARED_SESSIONS + 1):
                aco.complete("hi", **headers_options(other, index))
            assert len(_registry._registry) == MAX_SHARED_SESSIONS

    http.hooks["response"].append(drop_it_now)
    if front == "conversation":
        text = aco.Conversation(base_url=emu.url, http=http).say("hello")
    else:
        ipython = pytest.importorskip("IPython")
        monkeypatch.setattr(ipython, "get_ipython", object)  # a shell without a kernel
        monkeypatch.setattr(pytest.importorskip("IPython.display"), "display", lambda *a, **k: None)
        text = aco.display_stream("hello", base_url=emu.url, http=http)

    assert text == REPLY
    assert len(dropped) == 1
    assert dropped[0].closed  # closed once the chat that held it had opened its stream


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
