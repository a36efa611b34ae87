"""``aichatonline chat -`` with its prompt typed at a terminal: a pseudo-terminal as stdin, the
prompt written to it as a person types it, ended by one Ctrl-D (EOT) at the start of a line."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from aichatonline_sync.testing import Emulator

if os.name == "posix":
    import pty

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal (POSIX)")

TIMEOUT = 10.0
EOT = b"\x04"  # what Ctrl-D sends: the terminal's end of file at the start of a line


def _script() -> str:
    candidate = Path(sys.executable).with_name("aichatonline")
    found = str(candidate) if candidate.exists() else shutil.which("aichatonline")
    if found is None:
        pytest.skip("the aichatonline console script is not installed (pip install -e .)")
    return found


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


def _env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _read_until_exit(proc: subprocess.Popen[bytes], timeout: float) -> Optional[bytes]:
    """The child's stdout once it has exited, or ``None`` when it is still running after
    ``timeout`` seconds (waiting for more input)."""
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return None
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    try:
        proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        return None
    return data


@pytest.mark.parametrize("typed", [[b"Hello\n"], [b"Hello\n", b"world\n"]])
def test_one_ctrl_d_at_the_start_of_a_line_ends_the_prompt(
    emu: Emulator, typed: list[bytes]
) -> None:
    main_fd, tty_fd = pty.openpty()
    proc = subprocess.Popen(
        [_script(), "chat", "--base-url", emu.url, "-"],
        stdin=tty_fd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    os.close(tty_fd)
    try:
        for line in typed:
            os.write(main_fd, line)
        os.write(main_fd, EOT)  # once
        out = _read_until_exit(proc, TIMEOUT)
        if out is None:
            pytest.fail("the command still waits for input after one Ctrl-D")
        prompt = b"".join(typed).decode()[:-1]
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""
        assert out.decode() == "".join(emu.pieces_for(prompt)) + "\n"
        assert [request.prompt for request in emu.chat_requests] == [prompt]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        os.close(main_fd)
