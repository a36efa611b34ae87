"""The tests' network guard (``_netguard``, installed by conftest around every test): this machine is
allowed, as a local server or cluster uses it; every other host is refused before any lookup or
packet. The refusals are checked with stand-ins for the real calls (or a closed socket), so that a
broken guard fails the test without anything leaving the machine."""

from __future__ import annotations

import socket
from typing import Any

import _netguard
import pytest

from aichatonline_sync.testing import Emulator

# None and "": getaddrinfo's loopback (or, with AI_PASSIVE, the wildcard address a server binds to).
LOCAL = [None, "", b"", "localhost", "LOCALHOST", b"localhost", "127.0.0.1", "127.3.2.1",
         b"127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"]
REMOTE = ["example.com", b"example.com", "localhost.example.com", "127.0.0.1.example.com",
          "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.1.1", "8.8.8.8", "::ffff:8.8.8.8",
          "2001:db8::1", "fe80::1%lo", 3232235777]


@pytest.mark.parametrize("host", LOCAL)
def test_this_machine_is_local(host: Any) -> None:
    assert _netguard.local_host(host)


@pytest.mark.parametrize("host", REMOTE)
def test_every_other_host_is_refused_before_any_lookup(host: Any) -> None:
    looked_up: list[Any] = []
    guarded = _netguard.guard_getaddrinfo(lambda *args, **kwargs: looked_up.append(args))
    with pytest.raises(socket.gaierror, match=_netguard.REFUSED):
        guarded(host, 443)
    assert looked_up == []


def test_a_local_name_resolving_elsewhere_is_refused() -> None:
    def mapped_elsewhere(*args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]

    with pytest.raises(socket.gaierror, match=_netguard.REFUSED):
        _netguard.guard_getaddrinfo(mapped_elsewhere)("localhost", 443)


@pytest.mark.parametrize("host", REMOTE[:-1])
@pytest.mark.parametrize("call", ["connect", "connect_ex", "sendto"])
def test_connect_and_sendto_elsewhere_are_refused(host: Any, call: str) -> None:
    """On a closed socket: had the guard let the call through, it would fail with EBADF, sending
    nothing."""
    kind = socket.SOCK_DGRAM if call == "sendto" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.close()
    address = (host, 443) if family == socket.AF_INET else (host, 443, 0, 0)
    args = (b"x", address) if call == "sendto" else (address,)
    with pytest.raises(ConnectionRefusedError, match=_netguard.REFUSED):
        getattr(sock, call)(*args)


def test_the_guard_is_installed() -> None:
    with pytest.raises(socket.gaierror, match=_netguard.REFUSED):
        socket.getaddrinfo("203.0.113.7", 443)  # a literal: no lookup even without the guard
    sock = socket.socket()
    sock.close()
    with pytest.raises(ConnectionRefusedError, match=_netguard.REFUSED):
        sock.connect(("203.0.113.7", 443))


def test_a_local_cluster_may_bind_and_resolve_the_wildcard() -> None:
    """What tornado's ``bind_sockets`` does for Dask's scheduler: ``getaddrinfo(None, port,
    AF_UNSPEC, SOCK_STREAM, 0, AI_PASSIVE)``, then a bind to each address (port 0 here)."""
    infos = socket.getaddrinfo(None, 0, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    assert infos
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            assert sock.getsockname()[1] > 0
    assert socket.getaddrinfo(None, 80, socket.AF_INET)[0][4][0] == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_connections_go_through(emulator: Any, host: str) -> None:
    emu: Emulator = emulator()
    with socket.create_connection((host, emu.port), timeout=10) as sock:
        assert sock.getpeername()[0] in ("127.0.0.1", "::1")
    with socket.socket() as sock:
        sock.settimeout(10)
        assert sock.connect_ex(("127.0.0.1", emu.port)) == 0
