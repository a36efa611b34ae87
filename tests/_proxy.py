"""A real proxy server on loopback for the tests: pproxy in a subprocess, speaking HTTP (CONNECT and
forwarding) or SOCKS5, with a user name and password.

``ProxyServer("http", log_dir).start()`` listens on a free port; ``.url()`` is the proxy URL with
the credentials (or a wrong password); ``.routed(port)`` counts the connections the proxy opened to
``127.0.0.1:port`` (from its verbose log), which proves that a request went through it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

USER = "user"
PASSWORD = "s3cretpw"
READY_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyServer:
    """pproxy listening on ``127.0.0.1`` with ``scheme`` (``"http"`` or ``"socks5"``)."""

    def __init__(self, scheme: str, log_dir: Path) -> None:
        self.scheme = scheme
        self.port = free_port()
        self.log_path = log_dir / f"pproxy-{scheme}-{self.port}.log"
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> ProxyServer:
        listen = f"{self.scheme}://127.0.0.1:{self.port}#{USER}:{PASSWORD}"
        with open(self.log_path, "wb") as log:
            # --auth 0: check the credentials on every connection (pproxy otherwise trusts an
            # address that authenticated once).
            self.process = subprocess.Popen(
                [sys.executable, "-u", "-m", "pproxy", "-l", listen, "--auth", "0", "-v"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pproxy exited at start:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pproxy not listening after {READY_SECONDS} s") from None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.02)  # a short pause that also notices an early exit

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, password: str = PASSWORD, scheme: Optional[str] = None) -> str:
        return f"{scheme or self.scheme}://{USER}:{password}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def routed(self, port: int) -> int:
        """How many connections the proxy opened to ``127.0.0.1:port``."""
        return self.log().count(f" -> 127.0.0.1:{port}\n")
