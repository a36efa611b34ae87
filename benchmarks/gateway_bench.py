# ruff: noqa: RUF001 - the tables print the multiplication and minus signs
"""The OpenAI-compatible gateway against the direct client, side by side in one run.

``python benchmarks/gateway_bench.py [--quick] [--write FILE]`` (also ``benchmarks/run.py --only
gateway``). Needs ``openai`` and ``gunicorn`` (``pip install -e ".[test]"``).

Four processes: this one runs the clients; an upstream (this file with ``--upstream``: a lean
threaded server of the service's protocol, HTTP/1.1 keep-alive, chunked, that paces each reply on an
absolute schedule and puts the ``time.perf_counter_ns()`` stamp taken just before each line's
``sendall`` into the piece itself, so that every piece of every concurrent stream carries its own
send time; CLOCK_MONOTONIC is the same clock in every process); gunicorn (``-k gthread``) serving
``aichatonline_sync.gateway:app``; and ``aichatonline gateway`` (the standard library's server).
The clients: ``aichatonline_sync.Session`` straight to the upstream ("direct"), and the official
``openai`` client through each gateway, which hands a piece to its caller after its own SSE parse and
pydantic model. Each measure runs the paths round-robin.

1. Added latency per piece: the upstream's stamp to the moment the client hands the piece out, over
   paced replies; the gateway's cost is its median minus the direct median (target <= 0.5 ms).
2. Short chats (20 pieces, unpaced), one after another: the median time per chat; the gateway's
   cost is the difference (target <= 2 ms), without and with ``stream=True``.
3. 256 concurrent paced streams through one gunicorn (2 workers of 256 threads), and the same 256
   straight to the upstream from one Session: every stream must complete, and no piece be held more
   than 10 ms longer than direct.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN_PATH = b"/api/v1/user/getUniqueId"
HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
WAIT = 60.0


# --- the upstream (its own process) ----------------------------------------------------------


def _read_request(rfile: Any) -> Optional[tuple[bytes, bytes]]:
    line = rfile.readline()
    if not line:
        return None
    target = line.split()[1]
    length = 0
    while True:
        header = rfile.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return target, rfile.read(length) if length else b""


def _line(stamp: int) -> bytes:
    line = b'{"code":200,"msg":"success","data":{"message":"%d "}}\n' % stamp
    return b"%x\r\n%s\r\n" % (len(line), line)


def _stream(conn: socket.socket, spec: dict[str, Any]) -> None:
    count, delay = int(spec["n"]), float(spec["delay"])
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    if not delay:  # a short chat: the whole reply in one send
        conn.sendall(
            head + b"".join(_line(time.perf_counter_ns()) for _ in range(count)) + b"0\r\n\r\n"
        )
        return
    conn.sendall(head)
    start = time.perf_counter()
    for index in range(count):
        wait = start + index * delay - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        conn.sendall(_line(time.perf_counter_ns()))
    conn.sendall(b"0\r\n\r\n")


def _serve_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn, conn.makefile("rb") as rfile:
        while True:
            request = _read_request(rfile)
            if request is None:
                return
            target, body = request
            if target.startswith(TOKEN_PATH):
                data = json.dumps({"code": 200, "msg": "success", "data": secrets.token_hex(16)})
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(data), data.encode())
                )
            else:
                _stream(conn, json.loads(json.loads(body)["prompt"]))


def _upstream_main() -> None:
    listener = socket.create_server((HOST, 0), backlog=4096)
    sys.stdout.write(f"{listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_safe_serve, args=(conn,), daemon=True).start()


def _safe_serve(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        _serve_connection(conn)


# --- the processes -------------------------------------------------------------------------------


def _child_env(upstream: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["AICHATONLINE_BASE_URL"] = upstream
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class Processes:
    """The upstream, gunicorn and ``aichatonline gateway``, started and stopped together."""

    def __init__(self, threads: int, workers: int = 2) -> None:
        self.workers, self.threads = workers, threads
        self.procs: list[subprocess.Popen[str]] = []
        upstream = self._start([sys.executable, os.path.abspath(__file__), "--upstream"], "stdout")
        self.upstream = f"http://{HOST}:{self._line(upstream, 'stdout').strip()}"
        env = _child_env(self.upstream)
        gunicorn = self._start(
            [
                sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", str(workers),
                "--threads", str(threads), "--bind", f"{HOST}:0", "--backlog", "4096",
                "aichatonline_sync.gateway:app",
            ],
            "stderr",
            env=env,
        )  # fmt: skip
        port, booted = "", 0
        while booted < workers:
            line = self._line(gunicorn, "stderr")
            found = re.search(r"Listening at: http://[\d.]+:(\d+)", line)
            port = found.group(1) if found else port
            booted += "Booting worker" in line
        threading.Thread(target=gunicorn.stderr.read, daemon=True).start()  # (never a full pipe)
        self.gunicorn = f"http://{HOST}:{port}/v1"
        stdlib = self._start(
            [sys.executable, "-m", "aichatonline_sync", "gateway", "--port", "0"], "stdout", env=env
        )
        found = re.search(r"on (http://\S+/v1),", self._line(stdlib, "stdout"))
        assert found, "aichatonline gateway did not start"
        self.stdlib = found.group(1)

    def _start(self, args: list[str], pipe: str, env: Optional[dict[str, str]] = None) -> Any:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if pipe == "stderr" else None,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def _line(proc: Any, pipe: str) -> str:
        line: str = getattr(proc, pipe).readline()
        if not line:
            raise RuntimeError(f"process {proc.args[:4]} ended without a word")
        return line

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the clients -------------------------------------------------------------------------------

#: One piece: (upstream stamp, arrival at the client, hand-out by the client), perf_counter_ns.
#: The direct client has no separate arrival: it is its hand-out.
Piece = tuple[int, int, int]
_STAMP = re.compile(rb'"content":"(\d+) "')


def _spec(n: int, delay: float) -> str:
    return json.dumps({"n": n, "delay": delay})


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


class Direct:
    label = "direct: `Session.chat` to the upstream"

    def __init__(self, upstream: str, pool: int = 32) -> None:
        import aichatonline_sync as aco

        self.session = aco.Session(upstream, pool_maxsize=pool, max_retries=0)

    def stream(self, prompt: str) -> list[Piece]:
        out: list[Piece] = []
        now = time.perf_counter_ns
        for piece in self.session.chat(prompt):
            handed = now()
            out.append((int(piece), handed, handed))
        return out

    def complete(self, prompt: str) -> str:
        return self.session.complete(prompt)

    def complete_streamed(self, prompt: str) -> str:
        return self.session.complete(prompt)

    def close(self) -> None:
        self.session.close()


def _httpx() -> Any:
    """The HTTP library under the ``openai`` client (``httpx``; ``httpx2`` for openai 3)."""
    import importlib

    import openai  # noqa: F401

    return importlib.import_module("httpx2" if "httpx2" in sys.modules else "httpx")


def _stamping_transport(arrivals: dict[int, int]) -> Any:
    """An httpx transport that notes when each piece's SSE chunk reaches the client (before the
    ``openai`` client parses it): the bytes as its HTTP layer hands them on."""
    httpx = _httpx()

    class Stamped(httpx.SyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __iter__(self) -> Any:
            tail = b""
            for data in self.inner:
                arrived = time.perf_counter_ns()
                window = tail + data
                for found in _STAMP.finditer(window):
                    arrivals.setdefault(int(found.group(1)), arrived)
                tail = window[-64:]
                yield data

        def close(self) -> None:
            self.inner.close()

    class Stamping(httpx.BaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=300)
            self.inner = httpx.HTTPTransport(limits=limits, trust_env=False)

        def handle_request(self, request: Any) -> Any:
            response = self.inner.handle_request(request)
            return httpx.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=Stamped(response.stream),
                extensions=response.extensions,
            )

        def close(self) -> None:
            self.inner.close()

    return Stamping()


class OpenAIClient:
    """The official ``openai`` client through a gateway."""

    def __init__(self, label: str, url: str, transport: Any = None) -> None:
        import openai

        self.label = label
        self.arrivals: dict[int, int] = {}
        httpx = _httpx()
        http = httpx.Client(transport=transport or _stamping_transport(self.arrivals), timeout=WAIT)
        self.client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, http_client=http)

    def stream(self, prompt: str) -> list[Piece]:
        out: list[Piece] = []
        now = time.perf_counter_ns
        stream = self.client.chat.completions.create(
            model=MODEL, messages=_messages(prompt), stream=True
        )
        for chunk in stream:
            handed = now()
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                stamp = int(content)
                out.append((stamp, self.arrivals.pop(stamp), handed))
        return out

    def complete(self, prompt: str) -> str:
        completion = self.client.chat.completions.create(model=MODEL, messages=_messages(prompt))
        return completion.choices[0].message.content or ""

    def complete_streamed(self, prompt: str) -> str:
        stream = self.client.chat.completions.create(
            model=MODEL, messages=_messages(prompt), stream=True
        )
        return "".join((chunk.choices[0].delta.content or "") for chunk in stream if chunk.choices)

    def close(self) -> None:
        self.client.close()


class Recorded:
    """The ``openai`` client with no server at all: an httpx ``MockTransport`` answers with the
    bytes a gateway answered before. What the client costs by itself."""

    def __init__(self, source: OpenAIClient, prompt: str) -> None:
        import openai

        httpx = _httpx()
        self.label = "the `openai` client alone (no server: replayed replies)"
        bodies = {}
        for streamed in (False, True):
            response = source.client.chat.completions.with_raw_response.create(
                model=MODEL, messages=_messages(prompt), stream=streamed
            )
            bodies[streamed] = (dict(response.headers), response.http_response.read())

        def answer(request: Any) -> Any:
            headers, body = bodies[b'"stream":true' in request.content.replace(b" ", b"")]
            headers.pop("transfer-encoding", None)
            headers.pop("content-length", None)
            return httpx.Response(200, headers=headers, content=body)

        http = httpx.Client(transport=httpx.MockTransport(answer))
        self.client = openai.OpenAI(base_url="http://replay/v1", api_key="x", http_client=http)

    complete = OpenAIClient.complete
    complete_streamed = OpenAIClient.complete_streamed

    def close(self) -> None:
        self.client.close()


class Lean:
    """``http.client`` through a gateway (a kept-alive connection per thread): the gateway's own
    cost, with a client that costs next to nothing."""

    def __init__(self, label: str, url: str) -> None:
        from urllib.parse import urlsplit

        self.label = label
        parts = urlsplit(url)
        self.address = (str(parts.hostname), int(parts.port or 80))
        self.path = f"{parts.path}/chat/completions"
        self.local = threading.local()

    def _connection(self) -> Any:
        import http.client

        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(*self.address, timeout=WAIT)
            self.local.connection = connection
        return connection

    def _response(self, prompt: str, stream: bool) -> Any:
        import http.client

        body = json.dumps({"model": MODEL, "messages": _messages(prompt), "stream": stream})
        for attempt in range(2):
            connection = self._connection()
            try:
                connection.request("POST", self.path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                # The server closed the connection while it sat idle (gunicorn's keep-alive
                # is 2 s): open a new one, as any pooled client does.
                connection.close()
                self.local.connection = None
                if attempt:
                    raise
        assert response.status == 200, response.read()
        return response

    def _post(self, prompt: str, stream: bool) -> bytes:
        data: bytes = self._response(prompt, stream).read()
        return data

    def stream(self, prompt: str) -> list[Piece]:
        """Each SSE line as soon as it is complete (``readline`` of the chunked body)."""
        out: list[Piece] = []
        now = time.perf_counter_ns
        response = self._response(prompt, True)
        while True:
            line = response.readline()
            if not line:
                break
            arrived = now()
            found = _STAMP.search(line)
            if found:
                out.append((int(found.group(1)), arrived, arrived))
        return out

    def complete(self, prompt: str) -> str:
        content: str = json.loads(self._post(prompt, False))["choices"][0]["message"]["content"]
        return content

    def complete_streamed(self, prompt: str) -> str:
        text = []
        for event in self._post(prompt, True).split(b"\n\n"):
            if event.startswith(b"data: {"):
                text.append(json.loads(event[6:])["choices"][0]["delta"].get("content") or "")
        return "".join(text)

    def close(self) -> None:
        connection = getattr(self.local, "connection", None)
        if connection is not None:
            connection.close()


def _ms(values: Sequence[int]) -> list[float]:
    return [value / 1e6 for value in values]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rotated(keys: Sequence[str], number: int) -> list[str]:
    shift = number % len(keys)
    return [*keys[shift:], *keys[:shift]]


# --- 1. added latency per piece ----------------------------------------------------------------


def bench_latency(report: Any, clients: dict[str, Any], quick: bool) -> None:
    pieces, delay = 50, 0.020
    rounds = 2 if quick else 6
    prompt = _spec(pieces, delay)
    arrival: dict[str, list[float]] = {key: [] for key in clients}
    handout: dict[str, list[float]] = {key: [] for key in clients}
    for client in clients.values():
        client.stream(_spec(5, 0))  # warm: token, connection, imports
    for number in range(rounds):
        for key in _rotated(list(clients), number):
            got = clients[key].stream(prompt)
            assert len(got) == pieces, (key, len(got))
            arrival[key].extend(_ms([a - s for s, a, _ in got]))
            handout[key].extend(_ms([h - s for s, _, h in got]))
    report(
        f"### 1. Latency per piece: {pieces} pieces {delay * 1000:.0f} ms apart, {rounds} replies per "
        "path, round-robin; ms from the upstream's stamp (just before the line's `sendall`)"
    )
    report()
    direct = statistics.median(handout["direct"])
    rows = []
    for key, client in clients.items():
        if key == "direct":
            rows.append([client.label + ", handed out", *_cells(handout[key], direct, False)])
            continue
        if isinstance(client, Lean):
            rows.append(
                [f"{client.label}: reads the SSE line", *_cells(arrival[key], direct, True)]
            )
            continue
        rows.append(
            [f"{client.label}: chunk reaches the client", *_cells(arrival[key], direct, True)]
        )
        rows.append([f"{client.label}: `openai` hands it out", *_cells(handout[key], direct, True)])
    report.table(["path, and when", "median", "p90", "worst", "added (median − direct)"], rows)
    report(
        "\"Reaches the client\": the SSE chunk's bytes as the `openai` client's HTTP layer (httpx) "
        "hands them on, noted by a transport wrapper, before the `openai` client parses them; the "
        "gateway's cost is that minus the direct client's hand-out. \"Hands it out\" adds the "
        "`openai` client's own SSE parse and pydantic objects (see the next table for its cost)."
    )
    report()
    for key, client in clients.items():
        if not isinstance(client, OpenAIClient):
            continue
        added = statistics.median(arrival[key]) - direct
        report.target(
            f"gateway latency per piece ({key})",
            "added median ≤ 0.5 ms",
            f"{added:+.3f} ms (direct {direct:.3f}, at the openai client {direct + added:.3f}; "
            f"after its parse {statistics.median(handout[key]):.3f})",
            added <= 0.5,
        )


def _cells(values: list[float], direct: float, added: bool) -> list[str]:
    median = statistics.median(values)
    return [
        f"{median:.3f}",
        f"{_pct(values, 0.9):.3f}",
        f"{max(values):.2f}",
        f"{median - direct:+.3f}" if added else "",
    ]


# --- 2. short chats ----------------------------------------------------------------------------


def bench_short(report: Any, clients: dict[str, Any], quick: bool) -> None:
    chats, block = (40, 10) if quick else (200, 10)
    prompt = _spec(20, 0)
    modes = {"stream=False": "complete", "stream=True": "complete_streamed"}
    times: dict[tuple[str, str], list[float]] = {}
    for client in clients.values():
        client.complete(prompt)
    for number in range(chats // block):
        for mode, method in modes.items():
            for key in _rotated(list(clients), number):
                call: Callable[[str], str] = getattr(clients[key], method)
                spent = times.setdefault((key, mode), [])
                for _ in range(block):
                    started = time.perf_counter_ns()
                    text = call(prompt)
                    spent.append((time.perf_counter_ns() - started) / 1e6)
                    assert text.count(" ") == 20, text
    report(
        f"### 2. Short chats: 20 pieces sent at once, {chats} chats per path and mode one after "
        f"another, in round-robin blocks of {block}; median ms per chat (added: minus direct)"
    )
    report()
    direct = statistics.median(times[("direct", "stream=False")])
    rows = []
    for key, client in clients.items():
        cells = [client.label]
        for mode in modes:
            median = statistics.median(times[(key, mode)])
            shown = key in ("direct", "alone")
            cells.append(f"{median:.2f}" + ("" if shown else f" ({median - direct:+.2f})"))
        rows.append(cells)
    report.table(["path", "stream=False", "stream=True"], rows)
    report(
        "The direct client reads the reply as a stream either way (`Session.complete`). With "
        "`http.client` (one kept-alive connection, the body read whole) the rows show what the "
        "gateway adds; with the `openai` client, also what that client costs by itself wherever "
        "it is pointed (the row without a server)."
    )
    report()
    for key in clients:
        if not key.startswith("lean"):
            continue
        for mode in modes:
            added = statistics.median(times[(key, mode)]) - direct
            report.target(
                f"gateway per short chat ({key[5:]}, {mode})",
                "added ≤ 2 ms",
                f"{added:+.2f} ms (direct {direct:.2f}; with the openai client "
                f"{statistics.median(times[('openai ' + key[5:], mode)]) - direct:+.2f})",
                added <= 2.0,
            )


# --- 3. 256 concurrent streams -----------------------------------------------------------------


def _concurrently(
    client: Any, count: int, prompt: str, spread: float = 0.0
) -> tuple[list[list[Piece]], list[str]]:
    """``count`` streams at the same time, started ``spread`` seconds apart in all."""
    results: list[Optional[list[Piece]]] = [None] * count
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait(WAIT)
            time.sleep(spread * index / count)
            results[index] = client.stream(prompt)
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    return [r for r in results if r is not None], errors


def bench_concurrent(report: Any, procs: Processes, quick: bool) -> None:
    count = 64 if quick else 256
    pieces, delay, spread = 40, 0.100, 1.0
    prompt = _spec(pieces, delay)
    clients: dict[str, Any] = {
        "direct": Direct(procs.upstream, pool=count),
        "http.client": Lean("", procs.gunicorn),
    }
    order = ["direct", "http.client", "direct again"]
    runs: dict[str, tuple[list[list[Piece]], list[str], float]] = {}
    try:
        for client in clients.values():  # warm: threads, connections, the tokens of both workers
            _concurrently(client, 32, _spec(3, 0.01))
        # What the imports and the warm-up left in this process is kept out of the collector's
        # full passes, which would otherwise stall every thread at once, direct or not.
        gc.collect()
        gc.freeze()
        for key in order:
            started = time.perf_counter()
            done, errors = _concurrently(clients[key.split()[0]], count, prompt, spread=spread)
            runs[key] = (done, errors, time.perf_counter() - started)
    finally:
        for client in clients.values():
            client.close()
    report(
        f"### 3. {count} concurrent streams of {pieces} pieces {delay * 1000:.0f} ms apart, started "
        f"over {spread:g} s (then all {count} run together for {pieces * delay - spread:g} s) "
        f"through one gunicorn (`-k gthread`, {procs.workers} workers × {procs.threads} threads), "
        "each read by a thread of "
        "this process with `http.client`, against one `Session` straight to the upstream from as "
        "many threads (run before and after)"
    )
    report()
    rows = []
    arrivals: dict[str, list[float]] = {}
    complete: dict[str, int] = {}
    for key in order:
        done, errors, wall = runs[key]
        arrival = sorted(_ms([a - s for sample in done for s, a, _ in sample]))
        arrivals[key] = arrival
        complete[key] = sum(len(sample) == pieces for sample in done)
        label = "through gunicorn, each SSE line read" if key == "http.client" else key
        rows.append(
            [
                label,
                f"{complete[key]}/{count}" + (f" ({len(errors)} errors)" if errors else ""),
                f"{statistics.median(arrival):.2f}",
                f"{_pct(arrival, 0.99):.2f}",
                f"{_pct(arrival, 0.999):.2f}",
                f"{arrival[-1]:.2f}",
                f"{wall:.1f}",
            ]
        )
    report.table(
        ["path", "complete", "median ms", "p99 ms", "p99.9 ms", "worst ms", "wall s"], rows
    )
    direct = [(a + b) / 2 for a, b in zip(arrivals["direct"], arrivals["direct again"])]
    through = arrivals["http.client"]
    same = len(through) == len(direct)
    held = max(g - d for g, d in zip(through, direct)) if same else float("inf")
    report(
        "Held longer, piece for piece by rank (the k-th slowest piece through gunicorn against the "
        f"k-th slowest direct one, the two direct runs averaged): at most {held:+.2f} ms; at the "
        f"99th percentile {_pct(through, 0.99) - _pct(direct, 0.99):+.2f} ms, at the median "
        f"{statistics.median(through) - statistics.median(direct):+.3f} ms."
    )
    report()
    report(
        "The `openai` client is not in this table: 256 of its streams at this pace need more CPU "
        "than the 2 shared cores have left for it (it spends 1-2 ms to make a request and 0.2-0.4 "
        "ms to parse a chunk, tables 1 and 2), so that its lateness would be its own, not the "
        "gateway's (benchmarks/RESULTS.md has trial runs)."
    )
    report()
    errors = runs["http.client"][1]
    report.target(
        f"{count} concurrent streams through gunicorn",
        "all complete; no piece held > 10 ms longer than direct",
        f"{complete['http.client']}/{count} complete, {len(errors)} errors; held at most "
        f"{held:+.2f} ms longer (rank for rank)",
        complete["http.client"] == count and not errors and held <= 10,
    )


# --- the whole run -----------------------------------------------------------------------------


SECTIONS = ("latency", "short", "concurrent")


def bench_gateway(
    report: Any, quick: bool, sections: Sequence[str] = SECTIONS, workers: int = 2
) -> None:
    """The three measures, with their own processes (``run.py --only gateway`` calls this)."""
    try:
        import gunicorn  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        report(f"_gateway section skipped: {exc} (pip install -e '.[test]')_\n")
        return
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report("## Gateway: the OpenAI-compatible gateway against the direct client")
    report()
    report(
        f"Upstream, gunicorn and `aichatonline gateway` each in their own process on {HOST}, the "
        f"clients in this one. {os.cpu_count()} CPUs, shared with other engineers' work while this "
        f"ran (load average at the start: {load}): absolute numbers move with that load; the "
        "side-by-side differences within one run are what counts."
    )
    report()
    procs = Processes(threads=256, workers=workers)
    try:
        streaming: dict[str, Any] = {
            "direct": Direct(procs.upstream),
            "gunicorn": OpenAIClient("`openai` → gunicorn gthread", procs.gunicorn),
            "stdlib": OpenAIClient("`openai` → `aichatonline gateway`", procs.stdlib),
        }
        chats: dict[str, Any] = {}
        try:
            streaming["lean gunicorn"] = Lean("`http.client` → gunicorn gthread", procs.gunicorn)
            streaming["lean stdlib"] = Lean("`http.client` → `aichatonline gateway`", procs.stdlib)
            if "latency" in sections:
                bench_latency(report, streaming, quick)
            chats = {
                "direct": streaming["direct"],
                "lean gunicorn": streaming["lean gunicorn"],
                "lean stdlib": streaming["lean stdlib"],
                "openai gunicorn": streaming["gunicorn"],
                "openai stdlib": streaming["stdlib"],
                "alone": Recorded(streaming["gunicorn"], _spec(20, 0)),
            }
            if "short" in sections:
                bench_short(report, chats, quick)
        finally:
            for client in {id(c): c for c in [*streaming.values(), *chats.values()]}.values():
                client.close()
        if "concurrent" in sections:
            bench_concurrent(report, procs, quick)
    finally:
        procs.close()
    report(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    report()


def main(argv: Optional[Sequence[str]] = None) -> int:
    sys.path.insert(0, HERE)
    from run import Report, mark

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (about a minute)")
    parser.add_argument("--write", metavar="FILE", help="also write the markdown report to FILE")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="gunicorn's worker processes (default: 2)"
    )
    args = parser.parse_args(argv)
    report = Report()
    bench_gateway(report, args.quick, args.only or SECTIONS, args.workers)
    report("### Targets")
    report()
    report.table(
        ["measure", "target", "measured", ""],
        [[m, t, v, mark(ok)] for m, t, v, ok in report.targets],
    )
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--upstream"]:
        _upstream_main()
    sys.exit(main())
