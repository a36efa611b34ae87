"""The deployment of docs/deploy/: real nginx, configured by docs/deploy/nginx.conf (its ports
changed to free ones, nothing else), in front of a real gunicorn (``-k gthread --threads 4``)
serving ``aichatonline_sync.gateway:app`` against the emulator, all on loopback.

- Each streamed piece comes through nginx as it is written, not bunched with the next ones.
- 100 slow clients, each sending its request headers a line at a time, do not keep the 4 threads
  from answering others: nginx holds them until their requests are whole.

nginx is Debian's ``nginx`` package (CI installs it); where it is not installed the tests skip,
saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

import pytest
import requests

from aichatonline_sync.testing import Emulator

CONFIG = Path(__file__).resolve().parent.parent / "docs" / "deploy" / "nginx.conf"
WAIT = 20.0
MODEL = "gpt-4o-mini"
THREADS = 4
SLOW_CLIENTS = 100
PIECES = [f"piece{n} " for n in range(8)]
DELAY = 0.3  #: seconds between two pieces the emulator writes


def _nginx() -> Optional[str]:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):  # not on a user's PATH
        found = "/usr/sbin/nginx"
    return found


NGINX = _nginx()

pytestmark = [
    pytest.mark.skipif(
        NGINX is None, reason="nginx is not installed (apt-get install nginx; CI installs it)"
    ),
    pytest.mark.skipif(
        find_spec("gunicorn") is None or os.name != "posix",
        reason='gunicorn is not installed, or not on this OS (pip install -e ".[test]")',
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"{what} exited with {proc.returncode}: {err.decode(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on port {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def site_config(nginx_port: int, gunicorn_port: int) -> str:
    """docs/deploy/nginx.conf with its two ports changed: the tested configuration is the
    documented one."""
    text = CONFIG.read_text(encoding="utf-8")
    text, listens = re.subn(r"(?m)^(\s*)listen 80;", rf"\1listen 127.0.0.1:{nginx_port};", text)
    text, servers = re.subn(
        r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{gunicorn_port};", text
    )
    assert (listens, servers) == (1, 1), "docs/deploy/nginx.conf: 'listen 80;' or its server moved"
    return text


def _main_config(tmp: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf gives the site: an ``http`` block that includes it; every
    file nginx writes in ``tmp``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # (its workers must reach tmp)
    temp = "\n".join(
        f"    {name}_temp_path {tmp / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    include {site};
}}
"""


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator(reply=PIECES, chunk_delay=DELAY) as emu:
        yield emu


@pytest.fixture(scope="module")
def gunicorn(emulator: Emulator) -> Iterator[int]:
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env.update(
        AICHATONLINE_BASE_URL=emulator.url,
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    command = ["gunicorn", "-k", "gthread", "--workers", "1", "--threads", str(THREADS)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *command,
            "--bind",
            f"127.0.0.1:{port}",
            "aichatonline_sync.gateway:app",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _wait_for_port(port, proc, "gunicorn")
        yield port
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def nginx(gunicorn: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert NGINX is not None
    tmp = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    site = tmp / "aichatonline-gateway.conf"
    site.write_text(site_config(port, gunicorn), encoding="utf-8")
    (tmp / "nginx.conf").write_text(_main_config(tmp, site), encoding="utf-8")
    settings = f"daemon off; pid {tmp / 'nginx.pid'}; error_log stderr;"
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", settings],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(port, proc, "nginx")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        yield session


def test_each_streamed_piece_comes_through_nginx_as_it_is_written(
    nginx: str, emulator: Emulator, http: requests.Session
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    arrivals: list[float] = []
    texts: list[str] = []
    with http.post(
        f"{nginx}/v1/chat/completions", json=body, stream=True, timeout=WAIT
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines(chunk_size=1):
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[len(b"data: ") :])["choices"][0]["delta"]
            if delta.get("content"):
                arrivals.append(time.monotonic())
                texts.append(delta["content"])
    assert texts == PIECES
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    # Held back by a buffer, several pieces would arrive at once (gaps near 0).
    assert min(gaps) > DELAY / 2, gaps
    assert arrivals[-1] - arrivals[0] > DELAY * (len(PIECES) - 1) * 0.8, gaps


def test_slow_clients_do_not_starve_gunicorns_threads(
    nginx: str, gunicorn: int, http: requests.Session
) -> None:
    port = int(nginx.rsplit(":", 1)[1])
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        # They go on trickling, a header line each, while others are answered.
        for round_ in range(3):
            began = time.monotonic()
            for sock in slow:
                sock.sendall(f"X-Trickle-{round_}: slow\r\n".encode())
            answered = http.get(f"{nginx}/v1/models", timeout=WAIT)
            took = time.monotonic() - began
            assert answered.status_code == 200
            assert answered.json()["data"][0]["id"] == MODEL
            assert took < 2.0, f"a normal request took {took:.1f} s while slow clients trickled"
            chat = http.post(
                f"{nginx}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
                timeout=WAIT,
            )
            assert chat.status_code == 200, chat.text
            time.sleep(0.5)
    finally:
        for sock in slow:
            sock.close()
