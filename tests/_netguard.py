"""The tests' network guard: nothing but this machine (the loopback range, or the wildcard address a
server binds to) is ever resolved, connected to or sent to.

``conftest.py`` installs it around every test. It allows what a local server or cluster legitimately
does (``bind`` anywhere; ``getaddrinfo(None, port, flags=AI_PASSIVE)`` for the wildcard address, as
tornado and Dask do; ``localhost``; any 127.0.0.0/8 or ::1 literal) and refuses every other host
*before* any lookup or packet, with the same errors as a failed lookup or a refused connection:

- :func:`guard_getaddrinfo`: ``socket.getaddrinfo`` (what ``create_connection``, urllib3, asyncio
  and tornado resolve with); a name other than ``localhost`` is never looked up, and a result that
  is not this machine's (a ``localhost`` mapped elsewhere) is refused too;
- :func:`guard_connect`: ``socket.socket.connect``, ``connect_ex`` and ``sendto``, which resolve a
  name in C without ``socket.getaddrinfo``: an AF_INET/AF_INET6 address must be this machine's.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable

REFUSED = "tests may only reach loopback, not"


def local_host(host: Any) -> bool:
    """Whether ``host`` (as given to ``getaddrinfo`` or ``connect``) can only mean this machine."""
    if host is None or host in ("", b""):  # getaddrinfo: loopback, or the wildcard with AI_PASSIVE
        return True
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    return local_address(host)


def local_address(address: str) -> bool:
    """Whether an IP literal is loopback (127.0.0.0/8, ::1, ::ffff:127.x) or unspecified (0.0.0.0,
    ::, what a server binds to). A name is not an address: ``False``."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the zone is no help
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def guard_getaddrinfo(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real`` (``socket.getaddrinfo``) for this machine's hosts only."""

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not local_host(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{REFUSED} {host!r}")
        results = real(host, *args, **kwargs)
        for result in results:
            sockaddr = result[4]
            if result[0] in (socket.AF_INET, socket.AF_INET6) and not local_address(sockaddr[0]):
                raise socket.gaierror(socket.EAI_NONAME, f"{REFUSED} {host!r} ({sockaddr[0]})")
        return results

    return getaddrinfo


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0] if isinstance(address, tuple) and address else address
        if not local_host(host):
            raise ConnectionRefusedError(f"{REFUSED} {host!r}")


def guard_connect(real: Callable[..., Any]) -> Callable[..., Any]:
    """``socket.socket.connect`` or ``connect_ex`` (``real``) to this machine's addresses only."""

    def connect(self: socket.socket, address: Any) -> Any:
        _check(self, address)
        return real(self, address)

    return connect


def guard_sendto(real: Callable[..., Any]) -> Callable[..., Any]:
    """``socket.socket.sendto`` (``real``) to this machine's addresses only."""

    def sendto(self: socket.socket, data: Any, *args: Any) -> Any:
        _check(self, args[-1] if args else None)
        return real(self, data, *args)

    return sendto


def install(setattr_: Callable[[Any, str, Any], None]) -> None:
    """Install the guards with ``setattr_`` (``monkeypatch.setattr``, which undoes them)."""
    setattr_(socket, "getaddrinfo", guard_getaddrinfo(socket.getaddrinfo))
    setattr_(socket.socket, "connect", guard_connect(socket.socket.connect))
    setattr_(socket.socket, "connect_ex", guard_connect(socket.socket.connect_ex))
    setattr_(socket.socket, "sendto", guard_sendto(socket.socket.sendto))
