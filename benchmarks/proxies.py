"""Streaming through real reverse proxies: ``python benchmarks/proxies.py [--pieces 10] [--delay 0.1]``.

What a deployment behind nginx or HAProxy does to the stream, measured: the emulator (in this
process) sends ``--pieces`` pieces ``--delay`` s apart, and a :class:`~aichatonline_sync.Session`
reads them directly and through each proxy configuration (each proxy a real ``nginx`` or
``haproxy`` process started here with a configuration written to a temporary folder). For each
piece, its lag is its arrival time minus when the server sent it (``i * delay`` after the chat
began, which includes the request's own round trip, a few ms);
the table shows the median and worst lag, when the first piece arrived, and the reply's
``Content-Encoding`` as the client saw it. Needs the ``nginx`` and ``haproxy`` binaries (e.g.
``apt-get install nginx haproxy``); a missing one's rows are skipped. Linux; not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import requests

import aichatonline_sync as aco
from aichatonline_sync.testing import Emulator

NGINX = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {http}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            {location}
        }}
    }}
}}
"""

HAPROXY = """
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    {defaults}
frontend front
    bind 127.0.0.1:{port}
    default_backend back
backend back
    server emulator 127.0.0.1:{upstream}
"""

HTTP11 = 'proxy_http_version 1.1; proxy_set_header Connection "";'
GZIP = "gzip on; gzip_types text/event-stream;"

#: (proxy, name, settings for the template, the emulator's extra reply headers)
VARIANTS: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
    ("direct", "no proxy", {}, {}),
    ("nginx", "nginx, defaults (HTTP/1.0 upstream, proxy_buffering on)", {}, {}),
    ("nginx", "nginx, proxy_http_version 1.1", {"location": HTTP11}, {}),
    ("nginx", "nginx, proxy_buffering off", {"location": "proxy_buffering off;"}, {}),
    ("nginx", "nginx, upstream sends X-Accel-Buffering: no", {}, {"X-Accel-Buffering": "no"}),
    ("nginx", "nginx, gzip on (default gzip_types)", {"http": "gzip on;"}, {}),
    (
        "nginx",
        "nginx, gzip on (default gzip_types), proxy_buffering off",
        {"location": "proxy_buffering off;", "http": "gzip on;"},
        {},
    ),
    ("nginx", "nginx, gzip on, gzip_types text/event-stream", {"http": GZIP}, {}),
    (
        "nginx",
        "nginx, gzip on, gzip_types text/event-stream, proxy_buffering off",
        {"location": "proxy_buffering off;", "http": GZIP},
        {},
    ),
    ("nginx", "nginx, HTTP/1.1, gzip_types text/event-stream", {"location": HTTP11, "http": GZIP}, {}),
    (
        "nginx",
        "nginx, HTTP/1.1, gzip_types text/event-stream, proxy_buffering off",
        {"location": HTTP11 + " proxy_buffering off;", "http": GZIP},
        {},
    ),
    ("haproxy", "HAProxy, defaults", {}, {}),
    ("haproxy", "HAProxy, option http-no-delay", {"defaults": "option http-no-delay"}, {}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited: {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the proxy did not listen in time")


@contextmanager
def proxy(kind: str, settings: dict[str, str], upstream: int) -> Iterator[str]:
    """The base URL to chat through: the emulator itself, or a proxy started for it."""
    if kind == "direct":
        yield f"http://127.0.0.1:{upstream}"
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"aco-{kind}-") as tmp:
        values = {"tmp": tmp, "port": str(port), "upstream": str(upstream)}
        if kind == "nginx":
            text = NGINX.format(http=settings.get("http", ""), location=settings.get("location", ""), **values)
            path = os.path.join(tmp, "nginx.conf")
            command = ["nginx", "-c", path, "-p", tmp, "-g", "daemon off;"]
        else:
            text = HAPROXY.format(defaults=settings.get("defaults", ""), **values)
            path = os.path.join(tmp, "haproxy.cfg")
            command = ["haproxy", "-db", "-f", path]
        with open(path, "w") as file:
            file.write(text)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


def measure(url: str, pieces: int, delay: float, runs: int) -> dict[str, Any]:
    lags: list[float] = []
    firsts: list[float] = []
    each: list[list[float]] = []
    with aco.Session(url, max_retries=0, timeout=30) as session:
        session.complete("warm up")
        for _ in range(runs):
            start = time.perf_counter()
            arrivals = [time.perf_counter() - start for _ in session.chat("measure")]
            if len(arrivals) != pieces:
                raise RuntimeError(f"{len(arrivals)} pieces arrived, not {pieces}")
            firsts.append(arrivals[0])
            each.append([arrival - i * delay for i, arrival in enumerate(arrivals)])
            lags.extend(each[-1])
    headers = {"Accept-Encoding": "gzip"}
    token = requests.get(f"{url}/api/v1/user/getUniqueId?canvas=-abcdefghij", timeout=30).json()
    with requests.post(
        f"{url}/aichatonline/api/chat/gpt",
        json={"conversationId": "c", "prompt": "x"},
        headers={**headers, "UniqueId": token["data"]},
        stream=True,
        timeout=30,
    ) as response:
        encoding = response.headers.get("Content-Encoding", "none")
        response.raw.read()
    return {
        "median": statistics.median(lags) * 1000,
        "worst": max(lags) * 1000,
        "first": statistics.median(firsts) * 1000,
        "encoding": encoding,
        "each": " ".join(f"{statistics.median(column) * 1000:.0f}" for column in zip(*each)),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--each", action="store_true", help="also show the lag of each piece")
    args = parser.parse_args(argv)
    versions = []
    for binary, flag in (("nginx", "-v"), ("haproxy", "-v")):
        if shutil.which(binary):
            done = subprocess.run([binary, flag], capture_output=True, text=True, check=False)
            versions.append((done.stdout + done.stderr).splitlines()[0].strip())
    print(
        f"{args.pieces} pieces {args.delay * 1000:.0f} ms apart (chunked), {args.runs} chats per "
        f"row; lag = arrival minus send time, ms; {'; '.join(versions)}\n"
    )
    extra, rule = (" lag of each piece |", "---|") if args.each else ("", "")
    print(f"| path | median lag | worst lag | first piece after | Content-Encoding |{extra}")
    print(f"|---|---|---|---|---|{rule}")
    for kind, name, settings, reply_headers in VARIANTS:
        if kind != "direct" and not shutil.which(kind):
            print(f"| {name} | (no {kind} binary) | | | |")
            continue
        pieces = [f"piece {i} " for i in range(args.pieces)]
        with Emulator(reply=pieces, chunk_delay=args.delay, reply_headers=reply_headers) as emu:
            with proxy(kind, settings, emu.port) as url:
                row = measure(url, args.pieces, args.delay, args.runs)
        print(
            f"| {name} | {row['median']:.1f} | {row['worst']:.1f} | {row['first']:.0f} | "
            f"{row['encoding']} |" + (f" {row['each']} |" if args.each else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
