"""Batch benchmark: ``python benchmarks/batch_bench.py [--prompts 200] [--workers 32] [--runs 3]``.

200 prompts, each taking 200 ms at the server (the emulator, in its own process, streams 5 pieces
50 ms apart), run 32 at a time by:

* ``aco.batch(prompts, max_workers=32)``: one shared session, one token, a pool of 32 connections;
* naive threads: ``ThreadPoolExecutor(32)`` around ``aco.complete()`` (the shared session's default
  pool of 10 connections), to show what ``batch()`` fixes;
* gpt4free's way: asyncio and aiohttp, ``asyncio.gather`` under a semaphore of 32, each prompt
  opening a new ``ClientSession`` and asking for a token and then the chat (as gpt4free's
  AiChatOnline provider did), reading ``async for line in response.content``.

Each client runs in a fresh subprocess, the clients take turns, and the table shows the median wall
time of ``--runs`` runs against the ideal ``ceil(prompts / workers) x latency``, the connections and
token requests the server saw, and urllib3's "Connection pool is full" warnings. The aiohttp client
needs ``aiohttp``: this interpreter's, else ``--aiohttp-python`` (default: /work/venv-bench's, if
there). Not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

PIECES = 5
DEFAULT_AIOHTTP_PYTHON = "/work/venv-bench/bin/python"
TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"


# -- the server ---------------------------------------------------------------------------------


def _serve(conn: Any, latency: float) -> None:
    """Run the emulator and answer ``stats``/``reset``/``stop`` over the pipe."""
    from aichatonline_sync.testing import Emulator

    emu = Emulator(reply=[f"piece{i} " for i in range(PIECES)], chunk_delay=latency / (PIECES - 1))
    emu.start()
    conn.send(emu.url)
    try:
        while True:
            command = conn.recv()
            if command == "stats":
                conn.send(
                    {
                        "connections": emu.connections,
                        "tokens": len(emu.token_requests),
                        "chats": len(emu.chat_requests),
                    }
                )
            elif command == "reset":
                emu.reset()
                conn.send(None)
            else:
                break
    finally:
        emu.stop()
        conn.send(None)


class Server:
    def __init__(self, latency: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, latency), daemon=True)
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("the emulator process did not start within 30 s")
        self.url: str = self._conn.recv()

    def ask(self, command: str) -> Any:
        self._conn.send(command)
        if not self._conn.poll(30):
            raise RuntimeError(f"the emulator process did not answer {command!r}")
        return self._conn.recv()

    def stop(self) -> None:
        try:
            self.ask("stop")
        finally:
            self._process.join(10)


# -- the clients (each run in a fresh subprocess: --client NAME) --------------------------------


class _PoolWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Connection pool is full" in record.getMessage():
            self.count += 1


def _warm_imports() -> None:
    """Import what the library imports lazily (batch, tenacity) outside the timed part, as the
    aiohttp client imports aiohttp before its clock starts."""
    import tenacity  # noqa: F401

    import aichatonline_sync as aco

    _ = aco.batch


def _client_ours(url: str, prompts: list[str], workers: int) -> dict[str, Any]:
    import aichatonline_sync as aco

    _warm_imports()
    started = time.perf_counter()
    results = aco.batch(prompts, max_workers=workers, base_url=url, return_exceptions=True)
    wall = time.perf_counter() - started
    failures = sum(not isinstance(r, str) for r in results)
    return {"wall": wall, "failures": failures}


def _client_naive(url: str, prompts: list[str], workers: int) -> dict[str, Any]:
    import concurrent.futures

    import aichatonline_sync as aco

    def one(prompt: str) -> Optional[str]:
        try:
            return aco.complete(prompt, base_url=url)
        except aco.AiChatOnlineError:
            return None

    _warm_imports()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    return {"wall": wall, "failures": sum(r is None for r in results)}


def _client_aiohttp(url: str, prompts: list[str], workers: int) -> dict[str, Any]:
    import random
    import string

    import aiohttp

    headers = {
        "User-Agent": "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/119.0",
        "Accept-Language": "de,en-US;q=0.7,en;q=0.3",
        "Accept-Encoding": "gzip, deflate",
        "Referer": f"{url}/chatgpt/chat/",
        "Content-Type": "application/json",
        "Origin": url,
    }

    def random_string(length: int = 10) -> str:
        return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(length))

    async def one(prompt: str, semaphore: asyncio.Semaphore) -> Optional[str]:
        async with semaphore:
            try:
                async with aiohttp.ClientSession(headers=headers) as session:
                    token_url = f"{url}{TOKEN_PATH}?canvas=-{random_string()}"
                    async with session.get(token_url) as response:
                        response.raise_for_status()
                        token = (await response.json())["data"]
                    body = {"conversationId": random_string(), "prompt": prompt}
                    async with session.post(
                        f"{url}{CHAT_PATH}", headers={**headers, "UniqueId": token}, json=body
                    ) as response:
                        response.raise_for_status()
                        text = []
                        async for line in response.content:
                            try:
                                text.append(json.loads(line)["data"]["message"])
                            except (ValueError, KeyError, TypeError):
                                continue
                        return "".join(text)
            except aiohttp.ClientError:
                return None

    async def main() -> list[Optional[str]]:
        semaphore = asyncio.Semaphore(workers)
        return await asyncio.gather(*(one(p, semaphore) for p in prompts))

    started = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - started
    return {"wall": wall, "failures": sum(r is None for r in results)}


def _client_floor(url: str, prompts: list[str], workers: int) -> dict[str, Any]:
    """No library: ``workers`` threads, each with one kept-alive ``http.client`` connection, one
    token for all, and the lines split and decoded as the others do: this machine's floor."""
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for prompt in prompts:
        todo.put(prompt)
    failures = [0]

    def worker(token: str) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            while True:
                try:
                    prompt = todo.get_nowait()
                except queue.Empty:
                    return
                body = json.dumps({"conversationId": "floor", "prompt": prompt})
                headers = {"UniqueId": token, "Content-Type": "application/json"}
                conn.request("POST", CHAT_PATH, body=body, headers=headers)
                response = conn.getresponse()
                text = [json.loads(line)["data"]["message"] for line in response if line.strip()]
                if not text:
                    failures[0] += 1
        finally:
            conn.close()

    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", f"{TOKEN_PATH}?canvas=-floor")
    token = json.loads(conn.getresponse().read())["data"]
    conn.close()
    threads = [threading.Thread(target=worker, args=(token,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"wall": wall, "failures": failures[0]}


CLIENTS = {
    "ours": _client_ours,
    "naive": _client_naive,
    "aiohttp": _client_aiohttp,
    "floor": _client_floor,
}
LABELS = {
    "ours": "**`aco.batch(max_workers=32)`**",
    "naive": "naive threads: `ThreadPoolExecutor(32)` + `aco.complete()`",
    "aiohttp": "gpt4free's way: aiohttp, `gather` + semaphore(32), token + chat per prompt",
    "floor": "floor: no library, 32 threads x one kept-alive `http.client` connection",
}


def _run_client(name: str, url: str, prompts: int, workers: int) -> None:
    """The body of a client subprocess: one batch, then one JSON line on stdout."""
    warnings = _PoolWarnings()
    logging.getLogger("urllib3").addHandler(warnings)
    texts = [f"prompt {i}" for i in range(prompts)]
    outcome = CLIENTS[name](url, texts, workers)
    outcome["pool_warnings"] = warnings.count
    sys.stdout.write(json.dumps(outcome) + "\n")


# -- the driver -----------------------------------------------------------------------------------


def _one_chat(url: str, count: int = 5) -> float:
    """The fastest of ``count`` sequential chats over one kept-alive ``http.client`` connection:
    the latency of one chat at this server (its 200 ms plus the server's timer slack and the
    round trip), with no client library in the way."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", f"{TOKEN_PATH}?canvas=-floor")
        token = json.loads(conn.getresponse().read())["data"]
        best = math.inf
        for i in range(count):
            body = json.dumps({"conversationId": f"floor{i}", "prompt": "floor"})
            started = time.perf_counter()
            conn.request(
                "POST",
                CHAT_PATH,
                body=body,
                headers={"UniqueId": token, "Content-Type": "application/json"},
            )
            conn.getresponse().read()
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        conn.close()


def _has_aiohttp(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import aiohttp"], capture_output=True, timeout=60, check=False
    )
    return probe.returncode == 0


def _spawn(python: str, name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        python,
        os.path.abspath(__file__),
        "--client",
        name,
        "--url",
        url,
        "--prompts",
        str(args.prompts),
        "--workers",
        str(args.workers),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client {name} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per chat at the server")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--aiohttp-python", default=None)
    parser.add_argument("--client", choices=sorted(CLIENTS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        _run_client(args.client, args.url, args.prompts, args.workers)
        return 0

    pythons = {"ours": sys.executable, "naive": sys.executable, "floor": sys.executable}
    candidates = [sys.executable, args.aiohttp_python or DEFAULT_AIOHTTP_PYTHON]
    aiohttp_python = next((p for p in candidates if os.path.exists(p) and _has_aiohttp(p)), None)
    if aiohttp_python is None:
        sys.stderr.write("no Python with aiohttp found: the gpt4free column is left out\n")
    else:
        pythons = {"ours": sys.executable, "naive": sys.executable, "aiohttp": aiohttp_python}
        pythons["floor"] = sys.executable

    server = Server(args.latency)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pythons}
    try:
        one_chat = _one_chat(server.url)
        for _ in range(args.runs):
            for name, python in pythons.items():
                server.ask("reset")
                outcome = _spawn(python, name, server.url, args)
                outcome.update(server.ask("stats"))
                runs[name].append(outcome)
    finally:
        server.stop()

    rounds = math.ceil(args.prompts / args.workers)
    ideal = rounds * args.latency
    floor_wall = statistics.median(o["wall"] for o in runs["floor"])
    print(
        f"{args.prompts} prompts, {args.latency * 1000:g} ms each at the server, "
        f"{args.workers} at a time. Ideal: ceil({args.prompts}/{args.workers}) x "
        f"{args.latency:g} s = {ideal:.2f} s (one chat alone, no library: "
        f"{one_chat * 1000:.1f} ms). Median of {args.runs} runs (best in brackets), token and "
        f"connections included, imports not; x floor: against the median of the no-library "
        f"row. Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.\n"
    )
    print(
        "| client | wall time (s) | x ideal | x floor | connections | token requests | "
        "pool-full warnings | failures |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, outcomes in runs.items():
        walls = [o["wall"] for o in outcomes]
        wall = statistics.median(walls)

        def most(key: str, outcomes: list[dict[str, Any]] = outcomes) -> int:
            return max(int(o[key]) for o in outcomes)

        pool = str(most("pool_warnings")) if name in ("ours", "naive") else "n/a"
        print(
            f"| {LABELS[name]} | {wall:.3f} ({min(walls):.3f}) | {wall / ideal:.3f} "
            f"({min(walls) / ideal:.3f}) | {wall / floor_wall:.3f} | "
            f"{most('connections')} | {most('tokens')} | {pool} | {most('failures')} |"
        )
    print("\n(connections, token requests, warnings and failures: the most of any run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
