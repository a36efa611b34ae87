"""The emulated link of ``benchmarks/tls_link.py``: its relay (a process of its own) really holds each
direction for half the round trip, and this client gets a correct reply through it over TLS.

Only lower bounds are asserted (a round trip through the relay takes at least the configured RTT,
measured on the monotonic clock before and after): a slow machine makes them easier, never harder.
Nothing sleeps to synchronise: each child process prints its port once it listens, which is read.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aichatonline_sync import Session
from aichatonline_sync.testing import Emulator

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
RTT_MS = 50.0
RTT = RTT_MS / 1000
SLACK = 1e-6  # float rounding of the clock's sums, nothing more


def _load_tls_link() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tls_link", os.path.join(BENCHMARKS, "tls_link.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tls_link", module)
    spec.loader.exec_module(module)
    return module


tls_link = _load_tls_link()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (a thread per connection); yields its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def echo(sock: socket.socket) -> None:
        with sock:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += more
    return data


def test_a_round_trip_through_the_relay_takes_at_least_the_rtt(echo_server: int) -> None:
    with tls_link.start_relay(echo_server, RTT_MS) as relay:
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            # A new connection: TCP's handshake (one RTT) and the round trip itself.
            assert time.monotonic() - start >= 2 * RTT - SLACK
            for message in (b"pong", b"x" * 100_000):  # one chunk, then many: the same bound
                before = time.monotonic()
                sock.sendall(message)
                assert _recv_exactly(sock, len(message)) == message
                assert time.monotonic() - before >= RTT - SLACK


def test_the_relay_keeps_order_and_half_closes(echo_server: int) -> None:
    relay = tls_link.start_relay(echo_server, 10.0, handshake=False)
    with relay, socket.create_connection(("127.0.0.1", relay.port), timeout=30) as sock:
        blob = bytes(range(256)) * 2000
        for i in range(0, len(blob), 4096):
            sock.sendall(blob[i : i + 4096])
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            received += more
        assert received == blob


@pytest.fixture
def tls_emulator(tmp_path: Any) -> Iterator[tuple[Emulator, str]]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    with Emulator(ssl_context=context, reply=["Hello", ", ", "link", "!"]) as emu:
        yield emu, ca_path


def test_ours_through_the_relay_over_tls(tls_emulator: tuple[Emulator, str]) -> None:
    emu, ca_path = tls_emulator
    relay = tls_link.start_relay(emu.port, RTT_MS)
    with relay, Session(base_url=f"https://127.0.0.1:{relay.port}", verify=ca_path) as session:
        pieces: list[str] = []
        with session.chat("hi") as stream:
            pieces.extend(stream)
        assert pieces == ["Hello", ", ", "link", "!"]
        # A later chat: the kept-alive TLS connection and the cached token, so one round trip,
        # which the relay still imposes.
        before = time.monotonic()
        assert session.complete("again") == "Hello, link!"
        assert time.monotonic() - before >= RTT - SLACK
    assert emu.tokens_issued == 1
    assert emu.connections == 1
    assert [r.prompt for r in emu.chat_requests] == ["hi", "again"]


def test_a_child_that_cannot_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        tls_link.Child("--no-such-mode")
