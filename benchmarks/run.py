# ruff: noqa: RUF001 - the tables print the multiplication and minus signs
"""The benchmark suite of aichatonline_sync: ``python benchmarks/run.py [--quick] [--write FILE]``.

It starts its own server process (``servers.py``: a lean server on 127.0.0.1, and the library's
emulator for the server check), and compares this client with stock ``requests`` reads, the aiohttp
read gpt4free used (inside asyncio), gpt4free 6.7.1's own provider (where it loads) and a raw-socket
floor (``clients.py``), on the targets of the performance issue:

1. throughput: 200,000 one-line pieces, chunked (one HTTP chunk per line), Content-Length and
   close-delimited; round-robin, medians, thousand pieces per second;
2. added latency per piece: one line every 20 ms, stamped by the server just before it is sent,
   minus the client's time when the piece is handed to the caller; three framings, with and
   without gzip;
3. sequential short chats: connections and token requests in all, and the median time per chat;
4. memory: each case in a fresh subprocess, peak RSS after a 1 MB and after a 100 MB reply;
5. import time: fresh subprocesses, perf_counter around the import.

``--quick`` runs a reduced version (under two minutes). Needs ``pip install -e .[bench]``
(aiohttp, and g4f==6.7.1 for its column). Not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from clients import READERS, STOCK, BarePost, HttpClientKept, Ours, Urllib3Kept, load_g4f  # noqa: E402
from servers import RunQueueClock, ServerProcess  # noqa: E402

FRAMINGS = ("chunked", "length", "close")
LABEL = {
    "ours": "**aichatonline_sync**",
    "ours_nokeep": "aichatonline_sync keep_text=False",
    "iter_lines": "requests `iter_lines()`",
    "iter_lines_64k": "requests `iter_lines(65536)`",
    "iter_content_none": "requests `iter_content(None)`",
    "raw_read1": "requests `raw.read1(65536)`",
    "aiohttp": "aiohttp `async for line in content` (gpt4free's read)",
    "g4f": "g4f 6.7.1 provider",
    "floor": "raw-socket floor",
}


class Report:
    """Prints markdown as it goes and keeps it for ``--write``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.targets: list[tuple[str, str, str, bool]] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self("| " + " | ".join(headers) + " |")
        self("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            self("| " + " | ".join(str(cell) for cell in row) + " |")
        self()

    def target(self, measure: str, target: str, measured: str, met: bool) -> None:
        self.targets.append((measure, target, measured, met))


def mark(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def available(keys: Sequence[str], report: Report) -> list[str]:
    out = []
    for key in keys:
        if key == "g4f":
            module, error = load_g4f()
            if module is None:
                report(f"_g4f column skipped: {error}_\n")
                continue
        out.append(key)
    return out


# --- 0. the machine ----------------------------------------------------------------------------


def machine(report: Report, quick: bool) -> None:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(
            ["git", "-C", HERE, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    import hashlib

    import aichatonline_sync

    package = os.path.dirname(aichatonline_sync.__file__)
    digest = hashlib.sha1()
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as fh:
                digest.update(name.encode() + fh.read())
    report(f"# aichatonline_sync benchmarks{' (--quick)' if quick else ''}")
    report()
    report(f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    report(
        f"- machine: {os.cpu_count()} CPUs (nproc), {cpu}, {platform.system()} {platform.release()}"
    )
    report(f"- Python {platform.python_version()} ({platform.python_implementation()})")
    report(
        f"- aichatonline_sync {ver('aichatonline-sync')} (git {commit}), requests {ver('requests')}, "
        f"urllib3 {ver('urllib3')}, aiohttp {ver('aiohttp')}, g4f {ver('g4f')}"
    )
    report(f"- library measured: `{package}` (sources sha1 {digest.hexdigest()[:12]})")
    report(f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(
        "- server: `benchmarks/servers.py` in its own process on 127.0.0.1 (lean server unless said)"
    )
    report()


# --- 1. throughput -----------------------------------------------------------------------------


def time_run(client: Any, prompt: str, expect: dict[str, Any]) -> tuple[float, float]:
    """Wall and CPU seconds of one chat, checking that every piece arrived."""
    pieces: list[str] = []
    cpu = time.process_time()
    start = time.perf_counter()
    client.run(prompt, pieces.append)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    chars = sum(map(len, pieces))
    if len(pieces) != expect["pieces"] or chars != expect["chars"]:
        raise AssertionError(
            f"{client.name}: got {len(pieces)} pieces / {chars} chars, "
            f"expected {expect['pieces']} / {expect['chars']}"
        )
    return elapsed, cpu


class Rounds:
    """Wall and CPU seconds of every reader, one value per round (round-aligned lists)."""

    def __init__(self, pieces: int, wall: dict[str, list[float]], cpu: dict[str, list[float]]):
        self.pieces = pieces
        self.wall = wall
        self.cpu = cpu

    def rate(self, key: str, cpu: bool = False) -> float:
        """Median thousand pieces per second."""
        times = (self.cpu if cpu else self.wall)[key]
        return self.pieces / 1000 / statistics.median(times)

    def ratio(self, key: str, other: str, cpu: bool = False) -> float:
        """Speed of ``key`` over ``other``: the median over rounds of the ratio within each round
        (paired, so that load which changes from round to round cancels out)."""
        data = self.cpu if cpu else self.wall
        return statistics.median(o / k for k, o in zip(data[key], data[other]))


def throughput_round_robin(
    srv: ServerProcess,
    keys: Sequence[str],
    framing: str,
    lines: int,
    repeats: int,
    server: str = "lean",
) -> Rounds:
    """Every reader once per round, in an order rotated each round, ``repeats`` rounds."""
    expect = srv.configure(reply={"kind": "words", "n": lines}, framing=framing, server=server)
    clients = {key: READERS[key](srv.base_url) for key in keys}
    for client in clients.values():
        if isinstance(client, Ours):
            client.warm()
    times: dict[str, list[float]] = {key: [] for key in keys}
    cpus: dict[str, list[float]] = {key: [] for key in keys}
    try:
        for rep in range(repeats):
            order = list(keys[rep % len(keys) :]) + list(keys[: rep % len(keys)])
            for key in order:
                gc.collect()
                wall, cpu = time_run(clients[key], "Hello", expect)
                times[key].append(wall)
                cpus[key].append(cpu)
    finally:
        for client in clients.values():
            client.close()
    return Rounds(expect["pieces"], times, cpus)


def bench_throughput(srv: ServerProcess, report: Report, quick: bool) -> None:
    lines = 50_000 if quick else 200_000
    repeats = 3 if quick else 9
    keys = available(["ours", "ours_nokeep", *STOCK, "aiohttp", "g4f", "floor"], report)
    report(
        f"## 1. Throughput: {lines:,} one-line pieces (thousand pieces/s, median of {repeats} rounds)"
    )
    report()
    report(
        'Each reply line is `{"code": 200, "msg": "success", "data": {"message": "<word> "}}`; '
        "chunked sends one HTTP chunk per line. Every reader parses each line as JSON (`json.loads`; "
        "ours and the floor decode each block's text once and `raw_decode` each line) and hands "
        "`data.message` to the caller (who keeps it); ours also keeps `.text` unless keep_text=False. "
        "Each round runs every reader once, in a rotated order."
    )
    report()
    res = {f: throughput_round_robin(srv, keys, f, lines, repeats) for f in FRAMINGS}
    report("Wall-clock rate (in brackets: pieces per CPU second of the client process).")
    report()
    report.table(
        ["reader", *FRAMINGS],
        [
            [LABEL[key]]
            + [f"{res[f].rate(key):.0f} ({res[f].rate(key, True):.0f})" for f in FRAMINGS]
            for key in keys
        ],
    )
    report(
        "Ratios: the median over rounds of the ratio within a round (in brackets: the same by CPU "
        "time). The best stock method is the one with the best median rate in that framing."
    )
    report()
    ratio_rows = []
    for ours_key in ("ours", "ours_nokeep"):
        for framing in FRAMINGS:
            r = res[framing]
            best = max(STOCK, key=r.rate)
            others = [best, "g4f", "aiohttp", "floor"]
            got = {
                other: (r.ratio(ours_key, other), r.ratio(ours_key, other, True))
                for other in others
                if other in keys
            }

            def shown(other: str) -> str:
                return f"{got[other][0]:.2f} ({got[other][1]:.2f})" if other in got else "--"

            ratio_rows.append(
                [
                    LABEL[ours_key],
                    framing,
                    f"{shown(best)} vs {LABEL[best]}",
                    shown("g4f"),
                    shown("aiohttp"),
                    shown("floor"),
                ]
            )
            if ours_key == "ours":
                for other, target, limit in (
                    (best, "≥ 1.5 × best stock", 1.5),
                    ("g4f", "≥ 2 × g4f 6.7.1 provider", 2.0),
                ):
                    if other not in got:
                        continue
                    wall, cpu = got[other]
                    report.target(
                        f"throughput {framing}",
                        target,
                        f"{wall:.2f} × (CPU {cpu:.2f} ×)",
                        wall >= limit,
                    )
    report.table(
        [
            "client",
            "framing",
            "ours / best stock (≥ 1.5)",
            "ours / g4f provider (≥ 2)",
            "ours / aiohttp",
            "ours / floor (for information)",
        ],
        ratio_rows,
    )


def bench_server_check(srv: ServerProcess, report: Report, quick: bool) -> None:
    lines = 50_000 if quick else 200_000
    repeats = 2 if quick else 5
    keys = ["ours", "floor"]
    report(
        f"## 0. Server check: lean server versus the library's Emulator ({lines:,} pieces, thousand pieces/s)"
    )
    report()
    report(
        "The same readers against both servers (in one server process, apart from the client), "
        "interleaved round by round; emu/lean is the median of the paired ratios. Where the floor "
        "reads the emulator much slower than the lean server, the emulator would be the bottleneck; "
        "the other tables use the lean server, which sends a prepared reply with one `sendall`."
    )
    report()
    rows = []
    for framing in FRAMINGS:
        expect = srv.configure(reply={"kind": "words", "n": lines}, framing=framing, server="both")
        urls = {
            "lean": f"http://127.0.0.1:{expect['lean_port']}",
            "emulator": f"http://127.0.0.1:{expect['emulator_port']}",
        }
        clients = {(key, where): READERS[key](url) for key in keys for where, url in urls.items()}
        for client in clients.values():
            if isinstance(client, Ours):
                client.warm()
        order = list(clients)
        times: dict[tuple[str, str], list[float]] = {case: [] for case in order}
        try:
            for rep in range(repeats):
                for case in order[rep % len(order) :] + order[: rep % len(order)]:
                    gc.collect()
                    times[case].append(time_run(clients[case], "Hello", expect)[0])
        finally:
            for client in clients.values():
                client.close()
        rate = {case: lines / 1000 / statistics.median(ts) for case, ts in times.items()}

        def paired(key: str, times: dict[tuple[str, str], list[float]] = times) -> float:
            lean, emu = times[(key, "lean")], times[(key, "emulator")]
            return statistics.median(t_lean / t_emu for t_lean, t_emu in zip(lean, emu))

        rows.append(
            [
                framing,
                f"{rate[('floor', 'lean')]:.0f}",
                f"{rate[('floor', 'emulator')]:.0f}",
                f"{paired('floor'):.2f}",
                f"{rate[('ours', 'lean')]:.0f}",
                f"{rate[('ours', 'emulator')]:.0f}",
                f"{paired('ours'):.2f}",
            ]
        )
    report.table(
        [
            "framing",
            "floor, lean",
            "floor, emulator",
            "emu/lean",
            "ours, lean",
            "ours, emulator",
            "emu/lean",
        ],
        rows,
    )


# --- 2. latency --------------------------------------------------------------------------------


def bench_latency(srv: ServerProcess, report: Report, quick: bool) -> None:
    lines = 15 if quick else 50
    repeats = 1 if quick else 3
    delay = 0.020
    keys = available(["ours", *STOCK, "aiohttp", "g4f", "floor"], report)
    configs = [(f, gz) for f in FRAMINGS for gz in (False, True)]
    report(
        f"## 2. Added latency per piece: {lines} lines 20 ms apart, {repeats} run(s) each; "
        "median / worst ms over all pieces"
    )
    report()
    report(
        "Server stamp (`perf_counter_ns` just before the line's `sendall`, CLOCK_MONOTONIC, the same "
        "clock in both processes) to the moment the reader hands the piece to the caller. A worst "
        "case of a few ms that the raw-socket floor shares is the machine (other processes on its "
        "2 cores), not the reader."
    )
    report()
    results: dict[tuple[str, str, bool], tuple[float, float]] = {}
    owned: dict[tuple[str, str, bool], float] = {}
    for framing, gz in configs:
        expect = srv.configure(
            reply={"kind": "words", "n": lines}, framing=framing, gzip=gz, delay=delay
        )
        clients = {key: READERS[key](srv.base_url) for key in keys}
        for client in clients.values():
            if isinstance(client, Ours):
                client.warm()
        samples: dict[str, list[float]] = {key: [] for key in keys}
        own: dict[str, list[float]] = {key: [] for key in keys}
        clock = RunQueueClock()
        try:
            for rep in range(repeats):
                order = list(keys[rep % len(keys) :]) + list(keys[: rep % len(keys)])
                for key in order:
                    received: list[int] = []
                    waited: list[int] = [clock()]

                    def sink(
                        _piece: str,
                        r: list[int] = received,
                        w: list[int] = waited,
                        now: Callable[[], int] = time.perf_counter_ns,
                        clock: RunQueueClock = clock,
                    ) -> None:
                        r.append(now())
                        w.append(clock())  # after the stamp: not part of this piece's time

                    clients[key].run("Hello", sink)
                    answer = srv.call("stamps")
                    sent, server_waits = answer["stamps"], answer["waits"]
                    if len(received) != expect["pieces"] or len(sent) != len(received):
                        raise AssertionError(f"{key}: {len(received)} pieces, {len(sent)} stamps")
                    for i, (r, s) in enumerate(zip(received, sent)):
                        latency = (r - s) / 1e6
                        samples[key].append(latency)
                        # Scheduling waits of both processes in this piece's window: the client's
                        # since the previous piece (it sleeps in recv in between), the server's
                        # around its stamp and send.
                        # (The last wait may not be in yet: the client can ask for the stamps
                        # before the server's sendall of the last line has returned.)
                        server_wait = server_waits[i] if i < len(server_waits) else 0
                        sched = (waited[i + 1] - waited[i] + server_wait) / 1e6
                        own[key].append(max(0.0, latency - sched))
        finally:
            clock.close()
            for client in clients.values():
                client.close()
        for key in keys:
            results[(key, framing, gz)] = (statistics.median(samples[key]), max(samples[key]))
            owned[(key, framing, gz)] = max(own[key])
    headers = ["reader"] + [f"{f}{' gzip' if gz else ''}" for f, gz in configs]

    def cell(v: tuple[float, float]) -> str:
        return f"{v[0]:.2f} / {v[1]:.2f}" if v[1] < 100 else f"{v[0]:.0f} / {v[1]:.0f}"

    report.table(
        headers, [[LABEL[key]] + [cell(results[(key, f, gz)]) for f, gz in configs] for key in keys]
    )
    report(
        "The worst case again, with the time either process spent waiting for a CPU in that piece's "
        "window taken out (`/proc/thread-self/schedstat`: runnable, not running; the client's since "
        "its previous piece, the server's around its stamp and send). What is left is mostly the "
        "reader's own delay (a VM's stolen time is not in these counters, and the client's waits "
        "since its previous piece may include some before this piece was sent). For information: "
        "the targets are judged on the table above."
    )
    report()

    def own_cell(key: str, f: str, gz: bool) -> str:
        value = owned[(key, f, gz)]
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"

    report.table(
        ["reader (worst ms, scheduling waits out)", *headers[1:]],
        [[LABEL[key]] + [own_cell(key, f, gz) for f, gz in configs] for key in keys],
    )
    for f, gz in configs:
        med, worst = results[("ours", f, gz)]
        mine = owned[("ours", f, gz)]
        floor_worst = results[("floor", f, gz)][1] if "floor" in keys else float("nan")
        report.target(
            f"latency {f}{' gzip' if gz else ''}",
            "median ≤ 0.5 ms, worst ≤ 2 ms",
            f"{med:.2f} / {worst:.2f} ms ({mine:.2f} with scheduling waits out; "
            f"floor's worst {floor_worst:.2f})",
            med <= 0.5 and worst <= 2.0,
        )


# --- 3. sequential chats -----------------------------------------------------------------------


def bench_session(srv: ServerProcess, report: Report, quick: bool) -> None:
    _session_table(srv, report, 8 if quick else 20, 10, 0.0)
    _session_table(srv, report, 2 if quick else 4, 5, 0.010)


def _session_table(srv: ServerProcess, report: Report, rounds: int, block: int, rtt: float) -> None:
    pieces = 20
    expect = srv.configure(
        reply={"kind": "words", "n": pieces}, framing="chunked", request_delay=rtt
    )
    url = srv.base_url
    import aichatonline_sync

    class SharedChat:
        name = "aichatonline_sync.chat() (module-level, shared session)"

        def run(self, prompt: str, sink: Callable[[str], Any]) -> None:
            with aichatonline_sync.chat(prompt, base_url=url) as stream:
                for piece in stream:
                    sink(piece)

        def close(self) -> None:
            pass

    class Complete:
        name = "aichatonline_sync Session.complete()"

        def __init__(self) -> None:
            self.session = aichatonline_sync.Session(url)

        def run(self, prompt: str, sink: Callable[[str], Any]) -> None:
            sink(self.session.complete(prompt))

        def close(self) -> None:
            self.session.close()

    class NoEnv:
        """Ours over a requests.Session with trust_env=False (given with ``http=``): what resolving
        environment proxies/CA/netrc once per Session, not on every request, would save."""

        name = "aichatonline_sync, http=requests.Session(trust_env=False)"

        def __init__(self) -> None:
            import requests

            http = requests.Session()
            http.trust_env = False
            self.session = aichatonline_sync.Session(url, http=http)
            self.http = http

        def run(self, prompt: str, sink: Callable[[str], Any]) -> None:
            with self.session.chat(prompt) as stream:
                for piece in stream:
                    sink(piece)

        def close(self) -> None:
            self.session.close()
            self.http.close()

    def bare_noenv() -> BarePost:
        client = BarePost(url, trust_env=False)
        client.name = "requests.Session(trust_env=False).post (kept alive)"
        return client

    makers: dict[str, Callable[[], Any]] = {
        "ours": lambda: Ours(url),
        "complete": Complete,
        "shared": SharedChat,
        "noenv": NoEnv,
        "bare": lambda: BarePost(url),
        "bare_noenv": bare_noenv,
        "urllib3": lambda: Urllib3Kept(url),
        "httpclient": lambda: HttpClientKept(url),
        "aiohttp": lambda: READERS["aiohttp"](url),
    }
    if rtt:
        makers = {key: makers[key] for key in ("ours", "bare", "aiohttp")}
    if load_g4f()[0] is not None:
        makers["g4f"] = lambda: READERS["g4f"](url)
    else:
        report(f"_g4f column skipped: {load_g4f()[1]}_\n")
    keys = list(makers)
    counts = {key: {"connections": 0, "tokens": 0, "chats": 0} for key in keys}
    times: dict[str, list[float]] = {key: [] for key in keys}
    clients = {}

    def add(key: str) -> None:
        for name, value in srv.call("stats").items():
            counts[key][name] += value

    for key in keys:  # set-up (sessions, the baselines' one token) is counted too
        srv.call("reset")
        clients[key] = makers[key]()
        add(key)
    try:
        for rnd in range(rounds):
            order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for key in order:
                client = clients[key]
                srv.call("reset")
                gc.collect()  # the garbage of the client before (g4f's) is not this one's cost
                for _ in range(block):
                    got: list[str] = []
                    start = time.perf_counter()
                    client.run("Hello", got.append)
                    times[key].append(time.perf_counter() - start)
                    if sum(map(len, got)) != expect["chars"]:
                        raise AssertionError(f"{key}: wrong reply")
                add(key)
    finally:
        for client in clients.values():
            client.close()
    med = {key: statistics.median(ts) * 1000 for key, ts in times.items()}
    if rtt:
        report(
            f"### 3b. The same with {rtt * 1000:.0f} ms server delay before every answer "
            f"(a simulated network round trip; no TLS or TCP handshake cost): {rounds * block} chats per client"
        )
        report()
    else:
        report(
            f"## 3. Sequential short chats ({pieces} pieces, chunked): {rounds * block} chats per client, "
            f"round-robin blocks of {block}"
        )
        report()
    if not rtt:
        report(
            "Connections and token requests are counted by the server over all chats of a client, its "
            "set-up included. Baselines fetch their one token at set-up; g4f's provider makes a new "
            "ClientSession, token and connection per chat. aiohttp is the gpt4free read with one "
            "kept-alive ClientSession (not what g4f did). The `trust_env=False` rows show what requests "
            "spends per call re-reading the environment (proxies, no_proxy, netrc, CA bundle)."
        )
        report()
    rows = []
    for key in keys:
        c = counts[key]
        name = {"ours": "**aichatonline_sync Session.chat()**"}.get(
            key, getattr(clients[key], "name", key)
        )
        rows.append(
            [
                name,
                c["chats"],
                c["connections"],
                c["tokens"],
                f"{med[key]:.2f}",
                f"{med[key] / med['bare']:.2f}",
            ]
        )
    report.table(
        ["client", "chats", "TCP connections", "token requests", "median ms/chat", "÷ bare post"],
        rows,
    )
    if rtt:
        if "g4f" in med:
            report(
                f"g4f 6.7.1 provider ÷ ours with {rtt * 1000:.0f} ms per round trip: **{med['g4f'] / med['ours']:.1f} ×**."
            )
            report()
        return
    c = counts["ours"]
    report.target(
        "sequential chats",
        "1 connection, 1 token",
        f"{c['connections']} / {c['tokens']}",
        c["connections"] == 1 and c["tokens"] == 1,
    )
    if "g4f" in med:
        speed = med["g4f"] / med["ours"]
        report.target("sequential chats", "≥ 2 × faster than g4f", f"{speed:.1f} ×", speed >= 2.0)
        report(f"g4f 6.7.1 provider ÷ ours: **{speed:.1f} ×** slower per chat.")
        report()


# --- 4. memory ---------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kib(reset: bool) -> int:
    if reset:
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_memory(key: str, url: str, consumer: str) -> None:
    """In a fresh process: one chat; print the RSS before it and the peak RSS during it (KiB).

    The peak is reset just before the chat, so that memory freed after the imports (which the
    chat's own allocations would reuse unseen by ru_maxrss) does not hide growth.
    """
    client = READERS[key](url)
    if isinstance(client, Ours):
        client.warm()
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS") if reset else _peak_kib(False)
    count = [0, 0]
    result: Any = None
    if consumer == "concat":
        # keep_text=False, the caller building the text with `text += piece` (CPython resizes a str
        # with one reference in place): what a stream could do inside for `.text`.
        assert isinstance(client, Ours)
        assert not client.keep_text
        with client.session.chat("Hello", keep_text=False) as stream:
            text = ""
            for piece in stream:
                text += piece
        result = text
        count = [-1, len(text)]
    elif isinstance(client, Ours) and client.keep_text:
        with client.session.chat("Hello") as stream:
            for _piece in stream:
                count[0] += 1
        result = stream.text
        count[1] = len(result)
    else:

        def sink(piece: str) -> None:
            count[0] += 1
            count[1] += len(piece)

        client.run("Hello", sink)
    peak = _peak_kib(reset)
    del result
    client.close()
    print(
        json.dumps(
            {
                "before_kib": before,
                "peak_kib": peak,
                "pieces": count[0],
                "chars": count[1],
                "reset": reset,
            }
        )
    )


def _run_child(key: str, url: str, consumer: str = "") -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child-memory", key, url, consumer or "-"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {key} failed: {proc.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


def bench_memory(srv: ServerProcess, report: Report, quick: bool) -> None:
    small, big = 1_000_000, (5_000_000 if quick else 100_000_000)
    size = 100
    keys = available(["ours", "ours_nokeep", "concat", *STOCK, "aiohttp", "g4f", "floor"], report)
    report(
        f"## 4. Memory: peak RSS growth from a {small / 1e6:.0f} MB to a {big / 1e6:.0f} MB reply "
        f"({size}-character pieces), each run in a fresh process"
    )
    report()
    report(
        "Growth = (peak RSS during the chat − RSS before it) for the big reply − the same for the small "
        "one; the peak is reset just before the chat (`/proc/self/clear_refs`, VmHWM). For keepers: ÷ the "
        "growth of the kept text (bytes = characters, ASCII), target ≤ 2.5; for streaming "
        "consumers (keep_text=False, the stock readers counting pieces) the growth in MiB, "
        "target ≤ 2 MiB for ours. `concat` = keep_text=False with the caller doing `text += piece`."
    )
    report()
    cases: list[tuple[str, bool]] = [(f, False) for f in FRAMINGS] + [("chunked", True)]
    growth: dict[tuple[str, str, bool], tuple[float, float]] = {}
    for framing, gz in cases:
        peaks: dict[tuple[str, int], dict[str, Any]] = {}
        for chars in (small, big):
            expect = srv.configure(
                reply={"kind": "sized", "chars": chars, "size": size}, framing=framing, gzip=gz
            )
            case_keys = keys if not gz else ["ours", "ours_nokeep", "floor"]
            for key in case_keys:
                reader, consumer = ("ours_nokeep", "concat") if key == "concat" else (key, "")
                got = _run_child(reader, srv.base_url, consumer)
                if got["chars"] != expect["chars"]:
                    raise AssertionError(
                        f"memory {key}: {got['chars']} chars, expected {expect['chars']}"
                    )
                peaks[(key, chars)] = got
        for key in {k for k, _ in peaks}:
            # The chat's own peak above the RSS it started from, big reply minus small reply.
            grow_kib = (peaks[(key, big)]["peak_kib"] - peaks[(key, big)]["before_kib"]) - (
                peaks[(key, small)]["peak_kib"] - peaks[(key, small)]["before_kib"]
            )
            growth[(key, framing, gz)] = (grow_kib / 1024, grow_kib * 1024 / (big - small))
    cols = [f"{f}{' gzip' if gz else ''}" for f, gz in cases]
    rows = []
    for key in keys:
        label = (
            "aichatonline_sync keep_text=False + caller `text += piece`"
            if key == "concat"
            else LABEL[key]
        )
        keeper = key in ("ours", "concat")
        cells = []
        for f, gz in cases:
            if (key, f, gz) not in growth:
                cells.append("")
                continue
            mib, ratio = growth[(key, f, gz)]
            cells.append(f"{mib:.1f} MiB = {ratio:.2f} × text" if keeper else f"{mib:.1f} MiB")
        rows.append([label, *cells])
    report.table(["consumer", *cols], rows)
    for f, gz in cases:
        name = f"{f}{' gzip' if gz else ''}"
        mib, ratio = growth[("ours", f, gz)]
        report.target(f"memory keep_text {name}", "≤ 2.5 × text", f"{ratio:.2f} ×", ratio <= 2.5)
        mib, _ = growth[("ours_nokeep", f, gz)]
        report.target(f"memory keep_text=False {name}", "≤ 2 MiB", f"{mib:.1f} MiB", mib <= 2.0)

    # Small (word) pieces: the per-piece cost of keeping a list of str.
    w_small, w_big = 1_000_000, (3_000_000 if quick else 10_000_000)
    rows = []
    for key, consumer in (("ours", ""), ("ours_nokeep", "concat")):
        res = {}
        for chars in (w_small, w_big):
            srv.configure(reply={"kind": "sized", "chars": chars, "size": 6}, framing="chunked")
            res[chars] = _run_child(key, srv.base_url, consumer)
        grow_kib = (res[w_big]["peak_kib"] - res[w_big]["before_kib"]) - (
            res[w_small]["peak_kib"] - res[w_small]["before_kib"]
        )
        label = (
            "aichatonline_sync (keep_text=True)"
            if not consumer
            else "keep_text=False + caller `text += piece`"
        )
        rows.append(
            [label, f"{grow_kib / 1024:.1f} MiB", f"{grow_kib * 1024 / (w_big - w_small):.2f} ×"]
        )
    report(
        f"Word-sized pieces (6 characters, chunked), {w_small / 1e6:.0f} MB → {w_big / 1e6:.0f} MB of text:"
    )
    report()
    report.table(["consumer", "RSS growth", "÷ text growth"], rows)


# --- 5. import ---------------------------------------------------------------------------------


def _import_env(cached: bool) -> dict[str, str]:
    env = dict(os.environ)
    if cached:
        # Bytecode as a pip install leaves it, kept outside the work tree.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(_tmpdir(), "pycache")
    else:
        # As in this sandbox: requests' bytecode from its install, ours compiled at every import.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


_TMP: list[str] = []


def _tmpdir() -> str:
    if not _TMP:
        import atexit
        import shutil
        import tempfile

        _TMP.append(tempfile.mkdtemp(prefix="aco-bench-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _installed_prefix() -> str:
    """``python -S`` code that puts site-packages and a plain copy of the measured package on
    ``sys.path``, as a regular (not editable) install would: no ``.pth`` file runs, so the
    editable install's finder (which imports ``inspect`` and more at start-up) is not loaded."""
    import shutil
    import site

    import aichatonline_sync

    copy = os.path.join(_tmpdir(), "installed")
    if not os.path.isdir(copy):
        shutil.copytree(
            os.path.dirname(aichatonline_sync.__file__),
            os.path.join(copy, "aichatonline_sync"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return f"import sys; sys.path[:0] = [{copy!r}]; sys.path.extend({paths!r}); "


def _import_time(module: str, cached: bool) -> tuple[float, float]:
    """Wall and CPU milliseconds of ``import module`` in a fresh interpreter: ``cached`` as a
    regular install with bytecode; otherwise in this venv as it is (editable, no bytecode)."""
    code = (
        "import time; w = time.perf_counter(); c = time.process_time(); "
        f"import {module}; print(time.perf_counter() - w, time.process_time() - c)"
    )
    args = (
        [sys.executable, "-S", "-c", _installed_prefix() + code]
        if cached
        else [sys.executable, "-c", code]
    )
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=_import_env(cached),
    )
    wall, cpu = out.stdout.split()
    return float(wall) * 1000, float(cpu) * 1000


def _importtime_self(module: str, runs: int) -> dict[str, int]:
    """``-X importtime`` self microseconds per module, the minimum over ``runs`` processes."""
    out: dict[str, int] = {}
    for _ in range(runs):
        proc = subprocess.run(
            [
                sys.executable,
                "-S",
                "-X",
                "importtime",
                "-c",
                _installed_prefix() + f"import {module}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=_import_env(True),
        )
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, _cum, name = (part.strip() for part in line[len("import time:") :].split("|"))
            out[name] = min(out.get(name, 1 << 60), int(self_us))
    return out


def _p25(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0]


def bench_import(report: Report, quick: bool) -> None:
    n = 11 if quick else 61
    modules = ("requests", "aichatonline_sync")
    for module in modules:  # write the bytecode cache once
        _import_time(module, True)
    rows = []
    extra = extra_cpu = 0.0
    for cached in (True, False):
        wall: dict[str, list[float]] = {m: [] for m in modules}
        cpu: dict[str, list[float]] = {m: [] for m in modules}
        for rnd in range(n):
            for module in modules if rnd % 2 == 0 else modules[::-1]:
                w, c = _import_time(module, cached)
                wall[module].append(w)
                cpu[module].append(c)
        what = "installed, bytecode cached" if cached else "this editable venv, no bytecode"
        for m in modules:
            rows.append(
                [
                    f"`import {m}`",
                    what,
                    f"{statistics.median(wall[m]):.1f}",
                    f"{min(wall[m]):.1f}",
                    f"{statistics.median(cpu[m]):.1f}",
                ]
            )
        # Paired: the difference within each round, then the median.
        d_wall = statistics.median(o - r for r, o in zip(wall[modules[0]], wall[modules[1]]))
        d_cpu = statistics.median(o - r for r, o in zip(cpu[modules[0]], cpu[modules[1]]))
        d_min = min(wall[modules[1]]) - min(wall[modules[0]])
        d_p25 = _p25(wall[modules[1]]) - _p25(wall[modules[0]])
        rows.append(
            [
                "difference",
                what,
                f"**{d_wall:.1f}** (p25: {d_p25:.1f})",
                f"{d_min:.1f}",
                f"**{d_cpu:.1f}**",
            ]
        )
        if cached:
            extra, extra_cpu = d_wall, d_cpu
    report(f"## 6. Import time (fresh processes, {n} rounds, both imports in each round)")
    report()
    report(
        "The target is judged as a regular install leaves things: a plain copy of the package, "
        "bytecode cached (under a temporary PYTHONPYCACHEPREFIX), and `python -S` with site-packages "
        "put on sys.path by hand, so that no `.pth` runs (an editable install's finder imports "
        "`inspect` and more at start-up, before the timed import). The second block is this venv "
        "as it is: editable, and PYTHONDONTWRITEBYTECODE=1 as this sandbox sets it, so the package "
        "compiles at every import. The difference is the median of the differences within each round "
        "(p25: the difference of the lower quartiles; start-up noise on this VM is one-sided, "
        "often ±20 ms)."
    )
    report()
    report.table(["import", "bytecode", "median ms", "min ms", "median CPU ms"], rows)
    runs = 3 if quick else 5
    base = _importtime_self("requests", runs)
    ours = _importtime_self("aichatonline_sync", runs)
    groups: dict[str, int] = {}
    for name, us in ours.items():
        if name not in base:
            top = name.split(".")[0]
            groups[top] = groups.get(top, 0) + us
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:8]
    report(
        "What `aichatonline_sync` imports beyond `requests` (`-X importtime` self time, the minimum "
        f"of {runs} runs per module, summed per top-level package):"
    )
    report()
    report.table(["package", "ms"], [[f"`{name}`", f"{us / 1000:.1f}"] for name, us in top])
    report.target(
        "import",
        "≤ 25 ms more than requests",
        f"{extra:.1f} ms (CPU {extra_cpu:.1f} ms)",
        extra <= 25.0,
    )


# --- 5b. under a tracer--------------------------------------------------------------------------


def bench_tracer(srv: ServerProcess, report: Report, quick: bool) -> None:
    """keep_text under a profile function (as coverage, debuggers and profilers install one)."""
    sizes = (1_000_000, 2_000_000)
    rows = []
    for chars in sizes:
        srv.configure(reply={"kind": "sized", "chars": chars, "size": 100}, framing="chunked")
        row = [f"{chars / 1e6:.0f} MB"]
        for key in ("ours", "ours_nokeep"):
            client = READERS[key](srv.base_url)
            client.warm()  # type: ignore[attr-defined]
            try:
                for traced in (False, True):
                    start = time.perf_counter()
                    if traced:
                        sys.setprofile(lambda *_: None)
                    try:
                        client.run("Hello", lambda _piece: None)
                    finally:
                        sys.setprofile(None)
                    row.append(f"{(time.perf_counter() - start) * 1000:.0f}")
            finally:
                client.close()
        rows.append(row)
    report(
        "## 5. One chat under a tracer (`sys.setprofile`, as coverage, debuggers and profilers do)"
    )
    report()
    report(
        "100-character pieces, chunked, one run each, ms. CPython grows a str in place on `s += t` "
        "only in its specialised bytecode, which a trace or profile function turns off."
    )
    report()
    report.table(
        ["reply", "keep_text", "keep_text, traced", "keep_text=False", "keep_text=False, traced"],
        rows,
    )


# --- main --------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (under ~2 minutes)")
    parser.add_argument("--write", metavar="FILE", help="also write the markdown report to FILE")
    parser.add_argument(
        "--lib",
        metavar="DIR",
        help="benchmark the aichatonline_sync package found in DIR (e.g. a `git archive` of a commit) "
        "instead of the installed one",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[
            "server",
            "throughput",
            "latency",
            "session",
            "memory",
            "tracer",
            "import",
            "gateway",
            "tls",
        ],
        help="run only these sections (repeatable); `gateway` (gateway_bench.py) and `tls` "
        "(tls_link.py) run only when named",
    )
    args = parser.parse_args(argv)
    if args.lib:
        lib = os.path.abspath(args.lib)
        sys.path.insert(0, lib)
        os.environ["PYTHONPATH"] = lib + os.pathsep + os.environ.get("PYTHONPATH", "")
    sections = args.only or [
        "server",
        "throughput",
        "latency",
        "session",
        "memory",
        "tracer",
        "import",
    ]
    report = Report()
    started = time.perf_counter()
    machine(report, args.quick)
    with ServerProcess() as srv:
        if "server" in sections:
            bench_server_check(srv, report, args.quick)
        if "throughput" in sections:
            bench_throughput(srv, report, args.quick)
        if "latency" in sections:
            bench_latency(srv, report, args.quick)
        if "session" in sections:
            bench_session(srv, report, args.quick)
        if "memory" in sections:
            bench_memory(srv, report, args.quick)
        if "tracer" in sections:
            bench_tracer(srv, report, args.quick)
    if "import" in sections:
        bench_import(report, args.quick)
    if "gateway" in sections:
        from gateway_bench import bench_gateway

        bench_gateway(report, args.quick)
    failed = False
    if "tls" in sections:
        from tls_link import bench_tls, loopback_only

        loopback_only()
        failed = bool(bench_tls(report, args.quick))
    report("## Targets")
    report()
    report.table(
        ["measure", "target", "measured", ""],
        [[m, t, v, mark(ok)] for m, t, v, ok in report.targets],
    )
    met = sum(ok for *_, ok in report.targets)
    report(
        f"{met} of {len(report.targets)} targets met; run took {time.perf_counter() - started:.0f} s; "
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write("\n".join(report.lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--child-memory":
        _child_memory(sys.argv[2], sys.argv[3], "" if sys.argv[4] == "-" else sys.argv[4])
        sys.exit(0)
    sys.exit(main())
