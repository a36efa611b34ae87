"""What the tests of the ``aichatonline`` command share, beyond ``test_cli``'s helpers: running the
console script with bytes, writing a prompts file, reading JSON lines whole, and gating the
emulator's replies so that a run can be stopped in the middle."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from test_cli import SCRIPT, TIMEOUT, _env

from aichatonline_sync.testing import Emulator

LINUX = sys.platform.startswith("linux")

#: Every test module of the command sets ``pytestmark = NEEDS_SCRIPT``.
NEEDS_SCRIPT = pytest.mark.skipif(
    SCRIPT is None, reason="the aichatonline console script is not installed (pip install -e .)"
)


def run_bytes(
    *args: Any,
    input: Optional[bytes] = None,
    env: Optional[dict[str, str]] = None,
    stdin: Any = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    preexec_fn: Optional[Callable[[], None]] = None,
) -> subprocess.CompletedProcess[bytes]:
    """Like ``run``, with bytes in and out (and arguments that may be bytes)."""
    assert SCRIPT is not None
    return subprocess.run(
        [SCRIPT, *args],
        input=input,
        stdin=stdin if input is None else None,
        stdout=stdout,
        stderr=stderr,
        env=_env(env),
        timeout=TIMEOUT,
        check=False,
        preexec_fn=preexec_fn,
    )


def prompts_file(tmp_path: Path, *lines: str, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def whole_json_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line of ``data`` parsed; fails on a half-written record."""
    assert data == b"" or data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class HoldAfterFirstChat:
    """Gates the emulator: the first chat is answered whole, every later one is held before its
    first piece until :meth:`release` (the stream is open, so the chat can be aborted)."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.gate = threading.Event()
        self.held = threading.Event()
        emu.before_piece = self

    def __call__(self, index: int) -> None:
        if len(self.emu.chat_requests) > 1:
            self.held.set()
            self.gate.wait(TIMEOUT)

    def release(self) -> None:
        self.gate.set()
