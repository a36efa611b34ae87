# ruff: noqa: RUF001 - the tables print the multiplication sign
"""Time to the first piece over an emulated TLS link:
``python benchmarks/tls_link.py [--quick] [--rtt 20 --rtt 80] [--rounds N] [--later N] [--write FILE]``.

This kernel has no ``netem``, so the link is a relay on 127.0.0.1 (:class:`Relay`, in its own
process) that holds every chunk it receives for half the round trip before it forwards it, in each
direction, keeping the order: a timed queue per direction (a reader thread stamps each chunk with
its due time, a writer thread sends it at that time), so that the delays never add up. The kernel
completes TCP's own handshake without the relay, so the relay charges it: a new connection's first
bytes towards the server are not due before one round trip after it was accepted (as if the client
had waited for the SYN-ACK). Behind the relay, the library's :class:`~aichatonline_sync.testing.Emulator`
speaks HTTPS (TLS 1.3, a trustme certificate) in a process of its own.

Three clients are compared, round-robin within each round, each trusting the trustme CA:

* ours: ``aichatonline_sync.Session(base_url=..., verify=CA)``, one session for its chats;
* gpt4free 6.7.1's ``AiChatOnline`` provider (``clients.G4F``), its aiohttp ``ClientSession`` given
  a connector with the CA's ``ssl.SSLContext``; it opens a session, a connection and a token per chat;
* a naive ``requests`` user: ``requests.get`` of a token, then ``requests.post(stream=True)`` and
  ``iter_lines()``, each chat.

For each: the first chat of a new client (new connection, TLS handshake, token) and the later chats
of the same client (their median), the time from the call to the first piece handed out and to the
last one, in milliseconds and in round trips (time / RTT), and the connections and token requests
the server saw per later chat. Exit status 1 if a client failed or a reply was wrong.

Everything stays on 127.0.0.1: a guard in this process refuses any other address, and gpt4free's
version check is switched off (its package is never used, only the provider's file: ``clients.load_g4f``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

HOST = "127.0.0.1"
TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"
PIECES = 100  # one reply: 100 word pieces (about 6 KB of JSON lines), sent at once
PROMPT = "How far is it?"


# --- the relay (runs in its own process) --------------------------------------------------------


class _Direction:
    """One direction of a relayed connection: a timed queue between a reader and a writer thread."""

    def __init__(
        self,
        conn: _Connection,
        src: socket.socket,
        dst: socket.socket,
        delay: float,
        not_before: float,
    ) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.delay = delay
        self.not_before = not_before  # a new connection's first bytes: after TCP's handshake
        self.queue: queue.SimpleQueue[tuple[float, Optional[bytes]]] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        put, recv, clock, delay = self.queue.put, self.src.recv, time.monotonic, self.delay
        try:
            while True:
                data = recv(65536)
                now = clock()
                put((max(now, self.not_before) + delay, data or None))
                if not data:
                    return
        except OSError:
            self.queue.put((clock() + delay, None))
        finally:
            self.conn.done()

    def _write(self) -> None:
        get, clock, sleep, sendall = self.queue.get, time.monotonic, time.sleep, self.dst.sendall
        try:
            while True:
                due, data = get()
                # An absolute deadline per chunk: a chunk that waited in the queue is not delayed
                # again, so the delays never add up. Sleep again if woken early.
                while True:
                    wait = due - clock()
                    if wait <= 0:
                        break
                    sleep(wait)
                if data is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                sendall(data)
        except OSError:
            self.conn.abort()
        finally:
            self.conn.done()


class _Connection:
    def __init__(
        self, client: socket.socket, upstream: socket.socket, delay: float, handshake: float
    ) -> None:
        self.socks = (client, upstream)
        self.lock = threading.Lock()
        self.running = 4
        accepted = time.monotonic()
        _Direction(self, client, upstream, delay, accepted + handshake)
        _Direction(self, upstream, client, delay, accepted)

    def abort(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def done(self) -> None:
        with self.lock:
            self.running -= 1
            last = self.running == 0
        if last:
            for sock in self.socks:
                sock.close()


class Relay:
    """A TCP relay on 127.0.0.1 to ``(HOST, target_port)`` that delays each direction by
    ``rtt / 2`` seconds and a new connection's first bytes to the server by one more ``rtt`` (TCP's
    handshake, which the kernel completes without us)."""

    def __init__(self, target_port: int, rtt: float, port: int = 0, handshake: bool = True) -> None:
        self.target = (HOST, target_port)
        self.delay = rtt / 2
        self.handshake = rtt if handshake else 0.0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(128)
        self.port: int = self.listener.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(client, upstream, self.delay, self.handshake)


# --- the child processes ------------------------------------------------------------------------


def _stdin_closed_exits() -> None:
    """The parent closes our stdin (or dies): exit at once."""

    def watch() -> None:
        for _ in sys.stdin:
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _relay_child(target_port: int, rtt_ms: float, handshake: bool) -> None:
    relay = Relay(target_port, rtt_ms / 1000, handshake=handshake)
    print(relay.port, flush=True)
    _stdin_closed_exits()
    relay.serve_forever()


def _server_child(cert_chain: str, key: str, pieces: int) -> None:
    from servers import make_pieces

    from aichatonline_sync.testing import Emulator

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_chain, key)
    emulator = Emulator(
        reply=make_pieces({"kind": "words", "n": pieces}), ssl_context=context, record=False
    ).start()
    print(emulator.port, flush=True)
    # Commands on stdin, one per line: "stats" answers the counters, "reset" zeroes them.
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "reset":
            emulator.reset()
            print("{}", flush=True)
        elif cmd == "stats":
            stats = {"connections": emulator.connections, "tokens": emulator.tokens_issued}
            print(json.dumps(stats), flush=True)
    emulator.stop()


class Child:
    """A child process of this script (``--relay-child`` or ``--server-child``) that prints its port
    first; it ends when its stdin is closed."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens: no sleep, no polling
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"{args[0]} did not start (said {line!r})")
        self.port = int(line)

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_relay(target_port: int, rtt_ms: float, handshake: bool = True) -> Child:
    """A :class:`Relay` in its own process (``.port``; ``.close()`` ends it)."""
    return Child("--relay-child", str(target_port), repr(float(rtt_ms)), str(int(handshake)))


class Certificates:
    """A trustme CA and a server certificate for 127.0.0.1 and localhost, as files in a temporary
    directory: ``ca`` (the CA's PEM, for ``verify=``), ``chain`` and ``key`` (the server's)."""

    def __init__(self) -> None:
        import trustme

        self.dir = tempfile.TemporaryDirectory(prefix="tls-link-")
        ca = trustme.CA()
        cert = ca.issue_cert(HOST, "localhost")
        self.ca = os.path.join(self.dir.name, "ca.pem")
        self.chain = os.path.join(self.dir.name, "server.pem")
        self.key = os.path.join(self.dir.name, "server.key")
        ca.cert_pem.write_to_path(self.ca)
        cert.private_key_pem.write_to_path(self.key)
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(self.chain, append=i > 0)

    def close(self) -> None:
        self.dir.cleanup()


# --- loopback only ------------------------------------------------------------------------------


def loopback_only() -> None:
    """Refuse, in this process, any name but localhost and any address but 127/8 or ::1 (gpt4free is
    imported here; nothing may leave the machine)."""
    import ipaddress

    def local(host: Any) -> bool:
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
        except ValueError:
            return False

    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not local(host):
            raise socket.gaierror(socket.EAI_NONAME, f"tls_link: loopback only, not {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            raise ConnectionRefusedError(f"tls_link: loopback only, not {address[0]!r}")

    def connect(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign, assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign, assignment]


# --- the clients --------------------------------------------------------------------------------

Sink = Callable[[str], Any]


class OursTLS:
    name = "aichatonline_sync"

    def __init__(self, base_url: str, ca: str) -> None:
        import aichatonline_sync

        self.session = aichatonline_sync.Session(base_url=base_url, verify=ca)

    def run(self, sink: Sink) -> None:
        with self.session.chat(PROMPT) as stream:
            for piece in stream:
                sink(piece)

    def close(self) -> None:
        self.session.close()


class NaiveRequests:
    """What a naive user writes: a fresh token and a fresh connection (module-level ``requests``
    calls, each its own ``Session``) per chat."""

    name = "requests, naive"

    def __init__(self, base_url: str, ca: str) -> None:
        self.base_url, self.ca = base_url, ca

    def run(self, sink: Sink) -> None:
        import requests

        token = requests.get(
            f"{self.base_url}{TOKEN_PATH}?canvas=-naive", verify=self.ca, timeout=(10, 60)
        ).json()["data"]
        response = requests.post(
            self.base_url + CHAT_PATH,
            json={"conversationId": "naive", "prompt": PROMPT},
            headers={"UniqueId": token},
            stream=True,
            verify=self.ca,
            timeout=(10, 60),
        )
        response.raise_for_status()
        with response:
            for line in response.iter_lines():
                if line:
                    sink(json.loads(line)["data"]["message"])

    def close(self) -> None:
        pass


class G4FTLS:
    """gpt4free 6.7.1's provider as shipped (``clients.G4F``: only its ``url`` and the host
    ``grab_token`` hard-codes are changed), its ``ClientSession`` given a connector that trusts the CA
    (the provider takes no ``ssl`` argument, so the name ``ClientSession`` in its module is patched
    while it runs)."""

    name = "g4f 6.7.1 provider"

    def __init__(self, base_url: str, ca: str) -> None:
        from clients import G4F, load_g4f

        module, error = load_g4f()
        if module is None:
            raise RuntimeError(error)
        debug: Any = sys.modules["g4f.debug"]
        debug.version_check = False  # no call home, ever
        self.module = module
        self.inner = G4F(base_url)
        self.context = ssl.create_default_context(cafile=ca)

    def run(self, sink: Sink) -> None:
        import aiohttp

        context, module = self.context, self.module
        original = module.ClientSession

        def client_session(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("connector", aiohttp.TCPConnector(ssl=context))
            return aiohttp.ClientSession(*args, **kwargs)

        module.ClientSession = client_session
        try:
            self.inner.run(PROMPT, sink)
        finally:
            module.ClientSession = original

    def close(self) -> None:
        self.inner.close()


CLIENTS: dict[str, Callable[[str, str], Any]] = {
    "ours": OursTLS,
    "g4f": G4FTLS,
    "naive": NaiveRequests,
}
LABEL = {
    "ours": "**aichatonline_sync** `Session`",
    "g4f": "g4f 6.7.1 provider",
    "naive": "requests, naive (token GET + `post(stream=True)` each chat)",
}


# --- the measure --------------------------------------------------------------------------------


class Failed(Exception):
    pass


def timed_chat(client: Any, expected: str) -> tuple[float, float]:
    """Seconds from the call to the first and to the last piece handed out; checks the reply."""
    stamps: list[float] = []
    pieces: list[str] = []
    clock = time.perf_counter

    def sink(piece: str) -> None:
        stamps.append(clock())
        pieces.append(piece)

    start = clock()
    client.run(sink)
    text = "".join(pieces)
    if text != expected or not stamps:
        raise Failed(f"{client.name}: a wrong reply ({len(pieces)} pieces, {len(text)} characters)")
    return stamps[0] - start, stamps[-1] - start


def measure_link(
    server: Child,
    ca: str,
    rtt_ms: float,
    keys: Sequence[str],
    rounds: int,
    later: int,
    expected: str,
    errors: list[str],
) -> dict[str, dict[str, list[float]]]:
    """Per client: ``first``/``first_last`` (one value per round), ``later``/``later_last`` (all
    later chats), ``conns``/``tokens`` (per later chat, one value per round)."""
    out: dict[str, dict[str, list[float]]] = {
        key: {
            "first": [],
            "first_last": [],
            "later": [],
            "later_last": [],
            "conns": [],
            "tokens": [],
        }
        for key in keys
    }
    with start_relay(server.port, rtt_ms) as relay:
        url = f"https://{HOST}:{relay.port}"
        failed: set[str] = set()
        for r in range(rounds):
            order = list(keys[r % len(keys) :]) + list(keys[: r % len(keys)])
            for key in order:
                if key in failed:
                    continue
                data = out[key]
                client = None
                try:
                    client = CLIENTS[key](url, ca)
                    first, last = timed_chat(client, expected)
                    data["first"].append(first)
                    data["first_last"].append(last)
                    server.call("reset")
                    for _ in range(later):
                        first, last = timed_chat(client, expected)
                        data["later"].append(first)
                        data["later_last"].append(last)
                    stats = server.call("stats")
                    data["conns"].append(stats["connections"] / later)
                    data["tokens"].append(stats["tokens"] / later)
                except Exception as exc:  # reported, and the exit status says so
                    failed.add(key)
                    errors.append(f"{key} at {rtt_ms:g} ms: {type(exc).__name__}: {exc}")
                finally:
                    if client is not None:
                        client.close()
    return out


def warm_up(server: Child, ca: str, keys: Sequence[str], expected: str, errors: list[str]) -> None:
    """One chat per client straight to the server (no relay), not counted: the first chat of a
    process also pays for lazy imports and caches (about 15 ms for ours), which is no network cost."""
    for key in list(keys):
        client = None
        try:
            client = CLIENTS[key](f"https://{HOST}:{server.port}", ca)
            timed_chat(client, expected)
        except Exception as exc:
            errors.append(f"{key}, warm-up: {type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                client.close()


def machine_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "-C", HERE, "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return (
        f"- {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
        f"{os.cpu_count()} CPUs (nproc), {cpu}, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; aichatonline_sync {ver('aichatonline-sync')} "
        f"(git {commit}), requests {ver('requests')}, urllib3 {ver('urllib3')}, "
        f"aiohttp {ver('aiohttp')}, g4f {ver('g4f')}, OpenSSL {ssl.OPENSSL_VERSION.split()[1]}; "
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def bench_tls(
    report: Callable[..., None],
    quick: bool,
    rtts: Sequence[float] = (20.0, 80.0),
    rounds: Optional[int] = None,
    later: Optional[int] = None,
) -> list[str]:
    """Runs the measure and reports it (``report(text)`` per line, markdown); returns the errors."""
    rounds = rounds or (2 if quick else 5)
    later = later or (5 if quick else 10)
    keys = list(CLIENTS)
    errors: list[str] = []
    from clients import load_g4f

    if load_g4f()[0] is None:
        errors.append(f"g4f: {load_g4f()[1]}")
        keys.remove("g4f")
    certs = Certificates()
    from servers import make_pieces

    expected = "".join(make_pieces({"kind": "words", "n": PIECES}))
    report(f"## Time to the first piece over an emulated TLS link{' (--quick)' if quick else ''}")
    report()
    report(machine_line())
    report(
        f"- link: `benchmarks/tls_link.py`'s relay (own process) delaying each direction by RTT/2, "
        f"plus one RTT before a new connection's first bytes (TCP's handshake); behind it the "
        f"emulator over TLS 1.3 (trustme certificate, own process); a reply of {PIECES} pieces "
        f"sent at once; each client warmed up first by one chat without the relay (imports); {rounds} rounds, round-robin; first chat: median of {rounds} new clients; "
        f"later chats: median of {rounds}×{later}"
    )
    report()
    started = time.perf_counter()
    try:
        with Child("--server-child", certs.chain, certs.key, str(PIECES)) as server:
            warm_up(server, certs.ca, keys, expected, errors)
            for rtt in rtts:
                results = measure_link(server, certs.ca, rtt, keys, rounds, later, expected, errors)
                report(f"### RTT {rtt:g} ms")
                report()
                headers = [
                    "client",
                    "first chat: first piece",
                    "first chat: last piece",
                    "later chats: first piece",
                    "later chats: last piece",
                    "connections / tokens per later chat",
                ]
                rows = []
                for key in keys:
                    data = results[key]
                    if not data["first"] or not data["later"]:
                        rows.append([LABEL[key], "failed", "", "", "", ""])
                        continue

                    def cell(values: list[float], rtt: float = rtt) -> str:
                        ms = statistics.median(values) * 1000
                        return f"{ms:.1f} ms ({ms / rtt:.1f} RTT)"

                    rows.append(
                        [
                            LABEL[key],
                            cell(data["first"]),
                            cell(data["first_last"]),
                            cell(data["later"]),
                            cell(data["later_last"]),
                            f"{statistics.median(data['conns']):.2g} / "
                            f"{statistics.median(data['tokens']):.2g}",
                        ]
                    )
                report("| " + " | ".join(headers) + " |")
                report("|" + "|".join("---" for _ in headers) + "|")
                for row in rows:
                    report("| " + " | ".join(str(c) for c in row) + " |")
                report()
    finally:
        certs.close()
    report(
        f"Run took {time.perf_counter() - started:.0f} s; load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    report()
    for error in errors:
        report(f"- **failed**: {error}")
    return errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 + 5 chats per client")
    parser.add_argument(
        "--rtt", action="append", type=float, metavar="MS", help="round trip in ms (repeatable)"
    )
    parser.add_argument("--rounds", type=int, help="new clients per link (default 5, quick 2)")
    parser.add_argument("--later", type=int, help="later chats per client (default 10, quick 5)")
    parser.add_argument("--write", metavar="FILE", help="also write the markdown report to FILE")
    args = parser.parse_args(argv)
    loopback_only()
    lines: list[str] = []

    def report(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    errors = bench_tls(report, args.quick, args.rtt or (20.0, 80.0), args.rounds, args.later)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--relay-child":
        _relay_child(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")
    elif len(sys.argv) == 5 and sys.argv[1] == "--server-child":
        _server_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
