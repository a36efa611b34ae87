# ruff: noqa: RUF001 - the tables print the multiplication and minus signs
"""The OpenAI-compatible gateway against the direct client, side by side in one run, each gateway
with its metrics and CORS off and on.

``python benchmarks/gateway_bench.py [--quick] [--write FILE]`` (also ``benchmarks/run.py --only
gateway``). Needs ``openai``, ``gunicorn`` and ``prometheus-client`` (``pip install -e ".[test]"``).

Six processes: this one runs the clients; an upstream (this file with ``--upstream``: a lean
threaded server of the service's protocol, HTTP/1.1 keep-alive, chunked, that paces each reply on an
absolute schedule and puts the ``time.perf_counter_ns()`` stamp taken just before each line's
``sendall`` into the piece itself, so that every piece of every concurrent stream carries its own
send time; CLOCK_MONOTONIC is the same clock in every process); and, for each of the two
configurations below, gunicorn (``-k gthread``) serving ``aichatonline_sync.gateway:app`` and
``aichatonline gateway`` (on waitress), all four on the one upstream.

- Features off: no metrics and no CORS. The gateway's metrics are on whenever ``prometheus_client``
  can be imported, so these two gateways start with a ``PYTHONPATH`` entry first in line that
  holds a package ``prometheus_client`` of one line, ``raise ImportError(...)``: the gateway's
  ``import prometheus_client`` fails as when the package is not installed, and it runs without
  metrics exactly as it then does (``/metrics`` answers 501), with no change to the installed
  packages. No CORS origins are configured and the clients send no ``Origin``.
- Features on: ``prometheus_client`` importable, so every request is counted and timed; gunicorn's
  2 workers keep their values in files under ``$PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary
  directory), as a deployment of several workers must; ``aichatonline gateway`` (one process) in
  memory. CORS origin ``http://app.example`` (``$AICHATONLINE_GATEWAY_CORS_ORIGINS`` for gunicorn,
  ``--cors-origin`` for ``aichatonline gateway``), and the clients send ``Origin: http://app.example``
  with every request, so that every answer carries the CORS headers.

Before measuring, each gateway's ``/metrics`` is asked, with that ``Origin``, whether it is what it
should be (501 without CORS headers off, 200 with them on).

The clients: ``aichatonline_sync.Session`` straight to the upstream ("direct", one for both
configurations), and the official ``openai`` client through each gateway, which hands a piece to its
caller after its own SSE parse and pydantic model. Each measure runs all the paths round-robin, the
two configurations side by side, and checks its target for both.

1. Added latency per piece: the upstream's stamp to the moment the client hands the piece out, over
   paced replies; the gateway's cost is its median minus the direct median (target <= 0.5 ms).
2. Short chats (20 pieces, unpaced), one after another: the median time per chat; the gateway's
   cost is the difference (target <= 2 ms), without and with ``stream=True``.
3. 256 concurrent paced streams through one gunicorn (2 workers of 256 threads), the same 256
   through the other gunicorn, and straight to the upstream from one Session (direct, off, on,
   direct, on, off): every stream must complete, and no piece be held more than 10 ms longer than
   direct.
4. Only with ``--only servers`` (``--former REF`` adds our former server from that git commit):
   the server under the gateway, waitress (``aichatonline gateway``) and gunicorn gthread (1
   worker), each with 256 threads: the time to the first piece and per piece of one stream at a
   time, non-streamed chats per second from 8 threads, and 64 and 256 streams at once (lateness,
   the server's CPU per piece, its resident memory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN_PATH = b"/api/v1/user/getUniqueId"
HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
WAIT = 60.0
#: The two configurations of every gateway, side by side.
CONFIGS = ("off", "on")
#: The origin allowed by the gateways with the features on, and sent by their clients.
ORIGIN = "http://app.example"
CORS_ENV = "AICHATONLINE_GATEWAY_CORS_ORIGINS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The whole of the ``prometheus_client`` package that hides the real one (features off).
HIDDEN_PROMETHEUS = (
    'raise ImportError("prometheus_client hidden by benchmarks/gateway_bench.py: features off")\n'
)


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
        if not key.startswith("AICHATONLINE_")
        and not key.lower().endswith("_proxy")
        and key != MULTIPROC_ENV
    }
    env["AICHATONLINE_BASE_URL"] = upstream
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class Processes:
    """The upstream, and gunicorn and ``aichatonline gateway`` with the features off and on,
    started and stopped together. ``gunicorn[config]`` and ``stdlib[config]`` are their ``/v1``
    URLs, ``pids[config]`` gunicorn's workers."""

    def __init__(self, threads: int, workers: int = 2) -> None:
        self.workers, self.threads = workers, threads
        self.procs: list[subprocess.Popen[str]] = []
        self.scratch = tempfile.mkdtemp(prefix="gateway-bench-")
        self.gunicorn: dict[str, str] = {}
        self.stdlib: dict[str, str] = {}
        self.pids: dict[str, list[int]] = {}
        try:
            upstream = self._start(
                [sys.executable, os.path.abspath(__file__), "--upstream"], "stdout"
            )
            self.upstream = f"http://{HOST}:{self._line(upstream, 'stdout').strip()}"
            for config in CONFIGS:
                self._start_gateways(config)
        except BaseException:
            self.close()
            raise

    def _env(self, config: str) -> dict[str, str]:
        env = _child_env(self.upstream)
        if config == "off":
            hidden = os.path.join(self.scratch, "no-prometheus")
            os.makedirs(os.path.join(hidden, "prometheus_client"))
            with open(os.path.join(hidden, "prometheus_client", "__init__.py"), "w") as fh:
                fh.write(HIDDEN_PROMETHEUS)
            env["PYTHONPATH"] = os.pathsep.join([hidden, env["PYTHONPATH"]])
        else:
            env[CORS_ENV] = ORIGIN
        return env

    def _start_gateways(self, config: str) -> None:
        env = self._env(config)
        gunicorn_env = dict(env)
        if config == "on":
            gunicorn_env[MULTIPROC_ENV] = os.path.join(self.scratch, "prometheus-multiproc")
            os.makedirs(gunicorn_env[MULTIPROC_ENV])
        gunicorn = self._start(
            [
                sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", str(self.workers),
                "--threads", str(self.threads), "--bind", f"{HOST}:0", "--backlog", "4096",
                "aichatonline_sync.gateway:app",
            ],
            "stderr",
            env=gunicorn_env,
        )  # fmt: skip
        port, pids = "", list[int]()
        while len(pids) < self.workers:
            line = self._line(gunicorn, "stderr")
            found = re.search(r"Listening at: http://[\d.]+:(\d+)", line)
            port = found.group(1) if found else port
            booted = re.search(r"Booting worker with pid: (\d+)", line)
            if booted:
                pids.append(int(booted.group(1)))
        threading.Thread(target=gunicorn.stderr.read, daemon=True).start()  # (never a full pipe)
        self.gunicorn[config] = f"http://{HOST}:{port}/v1"
        self.pids[config] = pids
        cors = ["--cors-origin", ORIGIN] if config == "on" else []
        stdlib = self._start(
            [sys.executable, "-m", "aichatonline_sync", "gateway", "--port", "0", *cors],
            "stdout",
            env=env,
        )
        found = re.search(r"on (http://\S+/v1),", self._line(stdlib, "stdout"))
        assert found, "aichatonline gateway did not start"
        self.stdlib[config] = found.group(1)

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

    def cpu_seconds(self, config: str) -> Optional[float]:
        """The CPU time (user and system) that gunicorn's workers have spent so far, or ``None``
        without ``/proc``."""
        total = 0
        try:
            for pid in self.pids[config]:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            return None
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _get(url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """``GET path`` of the server of ``url`` (its status, headers in lower case, body)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=WAIT)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def check_features(report: Any, procs: Processes) -> None:
    """Asks each gateway's ``/metrics``, with the ``Origin`` of the features-on clients, whether
    its metrics and CORS are as configured; raises ``AssertionError`` if not."""
    seen = []
    for config in CONFIGS:
        for name, url in (("gunicorn", procs.gunicorn[config]), ("stdlib", procs.stdlib[config])):
            status, headers, body = _get(url, "/metrics", {"Origin": ORIGIN})
            allowed = headers.get("access-control-allow-origin")
            if config == "on":
                assert status == 200, (name, config, status, body)
                assert b"aichatonline_gateway_active_streams" in body, (name, config, body)
                assert allowed == ORIGIN, (name, config, allowed)
            else:
                assert status == 501, (name, config, status, body)
                assert b"metrics_unavailable" in body, (name, config, body)
                assert allowed is None, (name, config, allowed)
            seen.append(f"{name} {config}: {status}, {'with' if allowed else 'no'} CORS headers")
    report(f"Checked before measuring, `GET /metrics` with `Origin: {ORIGIN}`: {'; '.join(seen)}.")
    report()


def _requests_counted(url: str) -> int:
    """The ``/v1/chat/completions`` requests that the gateway's ``/metrics`` counted (summed over
    gunicorn's workers)."""
    status, _, body = _get(url, "/metrics", {})
    assert status == 200, status
    total = 0.0
    for line in body.decode().splitlines():
        if (
            line.startswith("aichatonline_gateway_requests_total{")
            and "/v1/chat/completions" in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


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

    def __init__(self, label: str, url: str, headers: Optional[dict[str, str]] = None) -> None:
        import openai

        self.label = label
        self.arrivals: dict[int, int] = {}
        httpx = _httpx()
        http = httpx.Client(transport=_stamping_transport(self.arrivals), timeout=WAIT)
        self.client = openai.OpenAI(
            base_url=url, api_key="bench", max_retries=0, http_client=http, default_headers=headers
        )

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

    def __init__(self, label: str, url: str, headers: Optional[dict[str, str]] = None) -> None:
        from urllib.parse import urlsplit

        self.label = label
        self.headers = {"Content-Type": "application/json", **(headers or {})}
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
                connection.request("POST", self.path, body, self.headers)
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


# --- the paths ----------------------------------------------------------------------------------

#: The two gateways (by the key that names them) and their labels.
GATEWAYS = {"gunicorn": "gunicorn gthread", "stdlib": "`aichatonline gateway`"}
#: The clients through a gateway (by the key's first word) and their labels.
KINDS = {"openai": "`openai`", "lean": "`http.client`"}


def _key(kind: str, gateway: str, config: str) -> str:
    return f"{kind} {gateway} {config}"


def _headers(config: str) -> Optional[dict[str, str]]:
    """What the clients of a configuration add to every request."""
    return {"Origin": ORIGIN} if config == "on" else None


def make_clients(procs: Processes) -> dict[str, Any]:
    """The direct client, and each kind of client through each gateway in each configuration."""
    clients: dict[str, Any] = {"direct": Direct(procs.upstream)}
    try:
        for kind, make in (("openai", OpenAIClient), ("lean", Lean)):
            for gateway, label in GATEWAYS.items():
                for config in CONFIGS:
                    url = getattr(procs, gateway)[config]
                    clients[_key(kind, gateway, config)] = make(
                        f"{KINDS[kind]} → {label}", url, _headers(config)
                    )
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    return clients


def _through(clients: dict[str, Any], kind: str) -> list[tuple[str, dict[str, str]]]:
    """``(gateway, {config: key})`` for the clients of ``kind`` in ``clients``."""
    return [
        (gateway, {config: _key(kind, gateway, config) for config in CONFIGS})
        for gateway in GATEWAYS
        if all(_key(kind, gateway, config) in clients for config in CONFIGS)
    ]


def _side_by_side(first: str, measure: str) -> list[str]:
    """The headers of a table with one measure in each configuration."""
    return [first, *(f"{config}: {measure}" for config in CONFIGS)]


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
        "path, all paths round-robin; ms from the upstream's stamp (just before the line's "
        "`sendall`): median (p90, worst), and added (median − direct), with the features off and on"
    )
    report()
    direct = statistics.median(handout["direct"])
    same = [_cells(handout["direct"]), ""]
    rows = [[clients["direct"].label + ", handed out", *same, *same, ""]]
    whens = {
        "openai": (("chunk reaches the client", arrival), ("`openai` hands it out", handout)),
        "lean": (("reads the SSE line", arrival),),
    }
    for kind in KINDS:
        for _, keys in _through(clients, kind):
            for when, source in whens[kind]:
                row = [f"{clients[keys['off']].label}: {when}"]
                medians = {}
                for config in CONFIGS:
                    medians[config] = statistics.median(source[keys[config]])
                    row += [_cells(source[keys[config]]), f"{medians[config] - direct:+.3f}"]
                rows.append([*row, f"{medians['on'] - medians['off']:+.3f}"])
    headers = ["path, and when"]
    for config in CONFIGS:
        headers += [f"{config}: median (p90, worst)", f"{config}: added"]
    report.table([*headers, "on − off"], rows)
    report(
        "\"Reaches the client\": the SSE chunk's bytes as the `openai` client's HTTP layer (httpx) "
        "hands them on, noted by a transport wrapper, before the `openai` client parses them; the "
        "gateway's cost is that minus the direct client's hand-out. \"Hands it out\" adds the "
        "`openai` client's own SSE parse and pydantic objects (see the next table for its cost). "
        "The direct client is one and the same for both configurations."
    )
    report()
    for gateway, keys in _through(clients, "openai"):
        for config in CONFIGS:
            added = statistics.median(arrival[keys[config]]) - direct
            report.target(
                f"gateway latency per piece ({gateway}, features {config})",
                "added median ≤ 0.5 ms",
                f"{added:+.3f} ms (direct {direct:.3f}, at the openai client {direct + added:.3f}; "
                f"after its parse {statistics.median(handout[keys[config]]):.3f})",
                added <= 0.5,
            )


def _cells(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({_pct(values, 0.9):.3f}, {max(values):.2f})"


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
        f"another, in round-robin blocks of {block} over all paths; median ms per chat (added: "
        "minus direct), with the features off and on"
    )
    report()
    direct = statistics.median(times[("direct", "stream=False")])

    def cell(key: str, mode: str) -> str:
        median = statistics.median(times[(key, mode)])
        return f"{median:.2f}" + (
            "" if key in ("direct", "alone") else f" ({median - direct:+.2f})"
        )

    def same(key: str) -> list[str]:  # a client that is the same in both configurations
        cells = [cell(key, mode) for mode in modes]
        return [clients[key].label, *cells, *cells, ""]

    rows = [same("direct")]
    for kind in ("lean", "openai"):
        for _, keys in _through(clients, kind):
            row = [clients[keys["off"]].label]
            for config in CONFIGS:
                row += [cell(keys[config], mode) for mode in modes]
            differences = [
                statistics.median(times[(keys["on"], mode)])
                - statistics.median(times[(keys["off"], mode)])
                for mode in modes
            ]
            rows.append([*row, ", ".join(f"{d:+.2f}" for d in differences)])
    if "alone" in clients:
        rows.append(same("alone"))
    headers = ["path"]
    for config in CONFIGS:
        headers += [f"{config}: {mode}" for mode in modes]
    report.table([*headers, "on − off (False, True)"], rows)
    report(
        "The direct client reads the reply as a stream either way (`Session.complete`); it and the "
        "client without a server are the same in both configurations. With `http.client` (one "
        "kept-alive connection, the body read whole) the rows show what the gateway adds; with the "
        "`openai` client, also what that client costs by itself wherever it is pointed (the row "
        "without a server)."
    )
    report()
    for gateway, keys in _through(clients, "lean"):
        for config in CONFIGS:
            for mode in modes:
                added = statistics.median(times[(keys[config], mode)]) - direct
                openai_key = _key("openai", gateway, config)
                with_openai = (
                    f"; with the openai client "
                    f"{statistics.median(times[(openai_key, mode)]) - direct:+.2f}"
                    if (openai_key, mode) in times
                    else ""
                )
                report.target(
                    f"gateway per short chat ({gateway}, features {config}, {mode})",
                    "added ≤ 2 ms",
                    f"{added:+.2f} ms (direct {direct:.2f}{with_openai})",
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


#: The order of the concurrent runs (ABBA: each configuration as often early as late).
CONCURRENT_ORDER = ("direct", "off", "on", "direct", "on", "off")


def bench_concurrent(report: Any, procs: Processes, quick: bool) -> None:
    count = 64 if quick else 256
    pieces, delay, spread = 40, 0.100, 1.0
    prompt = _spec(pieces, delay)
    clients: dict[str, Any] = {"direct": Direct(procs.upstream, pool=count)}
    for config in CONFIGS:
        clients[config] = Lean("", procs.gunicorn[config], _headers(config))
    runs: list[tuple[str, list[list[Piece]], list[str], float, Optional[float]]] = []
    try:
        for client in clients.values():  # warm: threads, connections, the tokens of both workers
            _concurrently(client, 32, _spec(3, 0.01))
        # What the imports and the warm-up left in this process is kept out of the collector's
        # full passes, which would otherwise stall every thread at once, direct or not.
        gc.collect()
        gc.freeze()
        for key in CONCURRENT_ORDER:
            cpu = procs.cpu_seconds(key) if key in CONFIGS else None
            started = time.perf_counter()
            done, errors = _concurrently(clients[key], count, prompt, spread=spread)
            wall = time.perf_counter() - started
            after = procs.cpu_seconds(key) if key in CONFIGS else None
            spent = after - cpu if cpu is not None and after is not None else None
            runs.append((key, done, errors, wall, spent))
    finally:
        for client in clients.values():
            client.close()
    report(
        f"### 3. {count} concurrent streams of {pieces} pieces {delay * 1000:.0f} ms apart, started "
        f"over {spread:g} s (then all {count} run together for {pieces * delay - spread:g} s) "
        f"through one gunicorn (`-k gthread`, {procs.workers} workers × {procs.threads} threads) "
        "with the features off and through the other with them on, each stream read by a thread "
        "of this process with `http.client`, against one `Session` straight to the upstream from "
        f"as many threads; in the order {', '.join(CONCURRENT_ORDER)}"
    )
    report()
    rows = []
    arrivals: dict[str, list[float]] = {key: [] for key in clients}
    complete: dict[str, int] = dict.fromkeys(clients, 0)
    failed: dict[str, int] = dict.fromkeys(clients, 0)
    cpu_per_piece: dict[str, list[float]] = {config: [] for config in CONFIGS}
    seen: set[str] = set()
    for key, done, errors, wall, spent in runs:
        arrival = sorted(_ms([a - s for sample in done for s, a, _ in sample]))
        arrivals[key].extend(arrival)
        whole = sum(len(sample) == pieces for sample in done)
        complete[key] += whole
        failed[key] += len(errors)
        if spent is not None:
            cpu_per_piece[key].append(spent * 1e6 / max(1, whole * pieces))
        label = f"through gunicorn, features {key}" if key in CONFIGS else key
        label += " again" if key in seen else ""
        seen.add(key)
        rows.append(
            [
                label,
                f"{whole}/{count}" + (f" ({len(errors)} errors)" if errors else ""),
                f"{statistics.median(arrival):.2f}",
                f"{_pct(arrival, 0.99):.2f}",
                f"{_pct(arrival, 0.999):.2f}",
                f"{arrival[-1]:.2f}",
                f"{wall:.1f}",
                f"{cpu_per_piece[key][-1]:.0f}" if spent is not None else "",
            ]
        )
    report.table(
        [
            "path", "complete", "median ms", "p99 ms", "p99.9 ms", "worst ms", "wall s",
            "workers' CPU µs per piece",
        ],
        rows,
    )  # fmt: skip
    direct = sorted(arrivals["direct"])
    held: dict[str, float] = {}
    lines = []
    for config in CONFIGS:
        through = sorted(arrivals[config])
        same = len(through) == len(direct)
        held[config] = max(g - d for g, d in zip(through, direct)) if same else float("inf")
        lines.append(
            f"features {config}: at most {held[config]:+.2f} ms; at the 99th percentile "
            f"{_pct(through, 0.99) - _pct(direct, 0.99):+.2f} ms, at the median "
            f"{statistics.median(through) - statistics.median(direct):+.3f} ms"
        )
    report(
        "Held longer, piece for piece by rank (the k-th slowest piece through a gunicorn, its two "
        "runs pooled, against the k-th slowest direct one, the two direct runs pooled): "
        + "; ".join(lines)
        + ". The workers' CPU: what gunicorn's worker processes spent during the run (user and "
        "system, from `/proc/PID/stat`), per piece delivered, requests included."
    )
    report()
    report(
        "The `openai` client is not in this table: 256 of its streams at this pace need more CPU "
        "than the 2 shared cores have left for it (it spends 1-2 ms to make a request and 0.2-0.4 "
        "ms to parse a chunk, tables 1 and 2), so that its lateness would be its own, not the "
        "gateway's (benchmarks/RESULTS.md has trial runs)."
    )
    report()
    runs_each = CONCURRENT_ORDER.count("off")
    for config in CONFIGS:
        report.target(
            f"{count} concurrent streams through gunicorn, features {config}",
            "all complete; no piece held > 10 ms longer than direct",
            f"{complete[config]}/{count * runs_each} complete in {runs_each} runs, "
            f"{failed[config]} errors; held at most {held[config]:+.2f} ms longer (rank for rank)",
            complete[config] == count * runs_each and not failed[config] and held[config] <= 10,
        )


# --- 4. the servers under `aichatonline gateway` -------------------------------------------------

#: The servers compared, by the key that names them, and their labels.
SERVERS = {
    "former": "our former HTTP/1.1 server (`http.server`, a thread per connection)",
    "waitress": "waitress (`aichatonline gateway` now)",
    "gunicorn": "gunicorn gthread (1 worker)",
}


def _serve_main(kind: str, former: str) -> None:
    """``--serve waitress|former FILE``: the gateway from the environment on one server, in this
    process; prints its port."""
    from aichatonline_sync.gateway import app_from_env, make_server

    app = app_from_env()
    if kind == "former":
        import importlib.util

        # Loaded as a module of the gateway package, so that its relative imports resolve.
        spec = importlib.util.spec_from_file_location("aichatonline_sync.gateway._former", former)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        server: Any = module.GatewayServer(app, HOST, 0)
    else:
        server = make_server(app, HOST, 0)
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def _former_source(ref: str, scratch: str) -> str:
    """The file of our former server at the git commit ``ref``."""
    text = subprocess.run(
        ["git", "-C", os.path.dirname(HERE), "show", f"{ref}:aichatonline_sync/gateway/server.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = os.path.join(scratch, "former_server.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


class ServerProcesses:
    """The upstream, and the gateway on each of :data:`SERVERS` (its own process each)."""

    def __init__(self, former_ref: Optional[str], threads: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.scratch = tempfile.mkdtemp(prefix="gateway-servers-")
        self.urls: dict[str, str] = {}
        self.pids: dict[str, list[int]] = {}
        try:
            upstream = self._start([sys.executable, os.path.abspath(__file__), "--upstream"], None)
            self.upstream = f"http://{HOST}:{upstream.stdout.readline().strip()}"
            env = _child_env(self.upstream)
            if former_ref:
                former = _former_source(former_ref, self.scratch)
                self._own("former", [former], env)
            self._own("waitress", [], env)
            gunicorn = self._start(
                [
                    sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", "1",
                    "--threads", str(threads), "--bind", f"{HOST}:0", "--backlog", "4096",
                    "aichatonline_sync.gateway:app",
                ],
                env,
                pipe="stderr",
            )  # fmt: skip
            port, pids = "", []
            while not pids:
                line = gunicorn.stderr.readline()
                if not line:
                    raise RuntimeError("gunicorn ended without a word")
                found = re.search(r"Listening at: http://[\d.]+:(\d+)", line)
                port = found.group(1) if found else port
                booted = re.search(r"Booting worker with pid: (\d+)", line)
                if booted:
                    pids.append(int(booted.group(1)))
            threading.Thread(target=gunicorn.stderr.read, daemon=True).start()
            self.urls["gunicorn"] = f"http://{HOST}:{port}/v1"
            self.pids["gunicorn"] = [gunicorn.pid, *pids]
        except BaseException:
            self.close()
            raise

    def _own(self, kind: str, args: list[str], env: dict[str, str]) -> None:
        proc = self._start(
            [sys.executable, os.path.abspath(__file__), "--serve", kind, *args], env
        )
        port = proc.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the {kind} server ended without a word")
        self.urls[kind] = f"http://{HOST}:{port}/v1"
        self.pids[kind] = [proc.pid]

    def _start(
        self, args: list[str], env: Optional[dict[str, str]], pipe: str = "stdout"
    ) -> Any:
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

    def memory(self, kind: str) -> tuple[float, float]:
        """The server's resident memory now and at its peak, MiB (its processes summed)."""
        now = peak = 0
        for pid in self.pids[kind]:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        now += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        peak += int(line.split()[1])
        return now / 1024, peak / 1024

    def cpu_seconds(self, kind: str) -> float:
        total = 0
        for pid in self.pids[kind]:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _first_and_rest(client: Lean, prompt: str) -> tuple[float, list[float]]:
    """One stream: the time from sending the request to the first piece's arrival, and each
    piece's arrival after the upstream sent it, ms."""
    started = time.perf_counter_ns()
    pieces = client.stream(prompt)
    first = (pieces[0][1] - started) / 1e6 if pieces else float("inf")
    return first, _ms([arrival - stamp for stamp, arrival, _ in pieces])


def _throughput(client: Lean, prompt: str, count: int, threads: int) -> float:
    """Non-streamed chats per second, ``count`` of them from ``threads`` threads."""
    barrier = threading.Barrier(threads + 1)
    errors: list[str] = []

    def run(share: int) -> None:
        barrier.wait(WAIT)
        try:
            for _ in range(share):
                client.complete(prompt)
        except BaseException as exc:
            errors.append(repr(exc))

    workers = [
        threading.Thread(target=run, args=(count // threads,), daemon=True) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(WAIT)
    started = time.perf_counter()
    for worker in workers:
        worker.join(WAIT * 4)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} chats failed: {errors[0]}")
    return (count // threads) * threads / wall


def bench_servers(report: Any, quick: bool, former_ref: Optional[str]) -> None:
    """Our former server, waitress and gunicorn gthread under the same gateway, side by side."""
    threads = 256
    procs = ServerProcesses(former_ref, threads)
    kinds = list(procs.urls)
    clients = {kind: Lean("", procs.urls[kind]) for kind in kinds}
    try:
        report(
            "### 4. The server under the gateway: "
            + ", ".join(SERVERS[kind] for kind in kinds)
            + f", each in its own process with {threads} threads, the clients (`http.client`, a "
            "kept-alive connection per thread) in this one; round-robin, in turn"
        )
        report()
        for client in clients.values():  # warm: threads, connections, the token
            _concurrently(client, 16, _spec(3, 0.01))
        gc.collect()
        gc.freeze()
        # a. one stream at a time
        rounds = 10 if quick else 40
        first: dict[str, list[float]] = {kind: [] for kind in kinds}
        piece: dict[str, list[float]] = {kind: [] for kind in kinds}
        for number in range(rounds):
            for kind in _rotated(kinds, number):
                f, p = _first_and_rest(clients[kind], _spec(20, 0.02))
                first[kind].append(f)
                piece[kind].extend(p)
        report(
            f"a. One stream at a time ({rounds} each, 20 pieces 20 ms apart): the time from the "
            "request to the first piece, and each piece's arrival after the upstream sent it, ms"
        )
        report()
        report.table(
            ["server", "first piece median", "p90", "per piece median", "p99", "worst"],
            [
                [
                    SERVERS[kind],
                    f"{statistics.median(first[kind]):.2f}",
                    f"{_pct(first[kind], 0.9):.2f}",
                    f"{statistics.median(piece[kind]):.3f}",
                    f"{_pct(piece[kind], 0.99):.3f}",
                    f"{max(piece[kind]):.2f}",
                ]
                for kind in kinds
            ],
        )
        # b. throughput of chats that are not streamed
        count, senders = (200, 8) if quick else (800, 8)
        rates: dict[str, list[float]] = {kind: [] for kind in kinds}
        for number in range(2):
            for kind in _rotated(kinds, number):
                rates[kind].append(_throughput(clients[kind], _spec(20, 0), count, senders))
        report(
            f"b. Chats not streamed (20 pieces each, unpaced), {count} from {senders} threads at "
            "once, two runs each: chats per second"
        )
        report()
        report.table(
            ["server", "run 1", "run 2"],
            [[SERVERS[kind], *(f"{rate:.0f}" for rate in rates[kind])] for kind in kinds],
        )
        # c. many streams at once
        pieces, delay, spread = (20, 0.1, 1.0) if quick else (40, 0.1, 1.0)
        rows = []
        for count in (64, 256):
            for kind in kinds:
                cpu = procs.cpu_seconds(kind)
                started = time.perf_counter()
                done, errors = _concurrently(
                    Lean("", procs.urls[kind]), count, _spec(pieces, delay), spread
                )
                wall = time.perf_counter() - started
                spent = procs.cpu_seconds(kind) - cpu
                late = sorted(_ms([a - s for sample in done for s, a, _ in sample]))
                whole = sum(len(sample) == pieces for sample in done)
                now, peak = procs.memory(kind)
                rows.append(
                    [
                        str(count),
                        SERVERS[kind],
                        f"{whole}/{count}" + (f" ({len(errors)} errors)" if errors else ""),
                        f"{statistics.median(late):.2f}" if late else "",
                        f"{_pct(late, 0.99):.2f}" if late else "",
                        f"{_pct(late, 0.999):.2f}" if late else "",
                        f"{late[-1]:.2f}" if late else "",
                        f"{wall:.1f}",
                        f"{spent * 1e6 / max(1, whole * pieces):.0f}",
                        f"{now:.0f} / {peak:.0f}",
                    ]
                )
        report(
            f"c. Many streams at once ({pieces} pieces {delay * 1000:.0f} ms apart, started over "
            f"{spread:g} s): each piece's arrival after the upstream sent it, ms; the server's "
            "CPU per piece; its resident memory after the run and at its peak (gunicorn: master "
            "and worker)"
        )
        report()
        report.table(
            [
                "streams", "server", "complete", "median ms", "p99 ms", "p99.9 ms", "worst ms",
                "wall s", "CPU µs per piece", "RSS MiB now / peak",
            ],
            rows,
        )  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
        procs.close()


# --- the whole run -----------------------------------------------------------------------------


SECTIONS = ("latency", "short", "concurrent")
#: Run only when named: ``--only servers``.
EXTRA_SECTIONS = ("servers",)


def bench_gateway(
    report: Any, quick: bool, sections: Sequence[str] = SECTIONS, workers: int = 2
) -> None:
    """The three measures, with their own processes (``run.py --only gateway`` calls this)."""
    try:
        import gunicorn  # noqa: F401
        import openai  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        report(f"_gateway section skipped: {exc} (pip install -e '.[test]')_\n")
        return
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report(
        "## Gateway: the OpenAI-compatible gateway against the direct client, features off and on"
    )
    report()
    report(
        f"Upstream, and gunicorn and `aichatonline gateway` with the features off and on, each in "
        f"their own process on {HOST}, the clients in this one. Features off: no metrics "
        "(`prometheus_client` hidden from those gateways, which then run as without it), no CORS "
        "origin configured, no `Origin` sent. Features on: Prometheus metrics (gunicorn's workers "
        f"with `{MULTIPROC_ENV}`), CORS origin `{ORIGIN}` configured and sent by every client. "
        f"{os.cpu_count()} CPUs, shared with other engineers' work while this ran (load average at "
        f"the start: {load}): absolute numbers move with that load; the side-by-side differences "
        "within one run are what counts."
    )
    report()
    procs = Processes(threads=256, workers=workers)
    try:
        check_features(report, procs)
        streaming = make_clients(procs)
        chats: dict[str, Any] = {}
        try:
            if "latency" in sections:
                bench_latency(report, streaming, quick)
            chats = {
                key: client for key, client in streaming.items() if not key.startswith("openai")
            }
            chats.update((k, c) for k, c in streaming.items() if k.startswith("openai"))
            chats["alone"] = Recorded(streaming[_key("openai", "gunicorn", "off")], _spec(20, 0))
            if "short" in sections:
                bench_short(report, chats, quick)
        finally:
            for client in {id(c): c for c in [*streaming.values(), *chats.values()]}.values():
                client.close()
        if "concurrent" in sections:
            bench_concurrent(report, procs, quick)
        counted = _requests_counted(procs.gunicorn["on"])
        report(
            f"The features-on gunicorn's `/metrics` counted {counted} requests to "
            f"`/v1/chat/completions` at the end, summed over its {workers} workers."
        )
        report()
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
        "--only",
        action="append",
        choices=SECTIONS + EXTRA_SECTIONS,
        help="run only these sections (repeatable); 'servers' runs only when named",
    )
    parser.add_argument(
        "--former",
        metavar="REF",
        help="with --only servers: also measure our former server, from this git commit",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="gunicorn's worker processes (default: 2)"
    )
    args = parser.parse_args(argv)
    report = Report()
    sections = args.only or SECTIONS
    if any(section in SECTIONS for section in sections):
        bench_gateway(report, args.quick, sections, args.workers)
    if "servers" in sections:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        report(f"{os.cpu_count()} CPUs, shared; load average at the start: {load}.")
        report()
        bench_servers(report, args.quick, args.former)
        report(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
        report()
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
    if sys.argv[1:2] == ["--serve"]:
        _serve_main(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
        sys.exit(0)
    sys.exit(main())
