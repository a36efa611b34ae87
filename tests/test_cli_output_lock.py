"""``aichatonline batch`` locks its OUTPUT: a second run on the same OUTPUT, while the first still
runs, exits 2 at once and sends nothing (else both would run every prompt not yet done)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aichatonline_sync.cli import io as _cli_io
from aichatonline_sync.cli.io import UsageError, lock_output, open_output
from aichatonline_sync.testing import Emulator

TIMEOUT = 20.0
PROMPTS = [f"question {n}" for n in range(1, 31)]

needs_flock = pytest.mark.skipif(_cli_io._flock is None, reason="this system has no flock()")


def _script() -> str:
    candidate = Path(sys.executable).with_name("aichatonline")
    found = str(candidate) if candidate.exists() else shutil.which("aichatonline")
    if found is None:
        pytest.skip("the aichatonline console script is not installed (pip install -e .)")
    return found


def _env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@needs_flock
def test_a_second_batch_on_the_same_output_exits_2_at_once_and_sends_nothing(
    emu: Emulator, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    output = tmp_path / "results.jsonl"
    command = [_script(), "batch", str(prompts), "-o", str(output), "--base-url", emu.url]
    emu.stall("chat")  # the first run's first chat waits (its one worker with it) until stopped
    first = subprocess.Popen(
        [*command, "--workers", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        _wait_for(lambda: len(emu.chat_requests) == 1, "the first run's first chat")
        tokens = len(emu.token_requests)
        began = time.monotonic()
        second = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=TIMEOUT,
            check=False,
        )
        took = time.monotonic() - began
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("aichatonline: error: ")
        assert f"OUTPUT {str(output)!r} is in use by another batch run" in lines[0]
        assert took < 5.0  # at once: it does not wait for the lock
        assert len(emu.chat_requests) == 1
        assert len(emu.token_requests) == tokens
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()
    assert first.returncode == 143
    # The lock ends with its run: the next one resumes and runs every prompt, once.
    third = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT * 3,
        check=False,
    )
    assert third.returncode == 0, third.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(record["id"] for record in records if "text" in record) == list(
        range(1, len(PROMPTS) + 1)
    )


@needs_flock
def test_the_lock_is_held_while_the_descriptor_is_open(tmp_path: Path) -> None:
    path = str(tmp_path / "out.jsonl")
    fd = open_output(path)
    try:
        with pytest.raises(UsageError, match="is in use by another batch run"):
            open_output(path)
    finally:
        os.close(fd)
    os.close(open_output(path))  # free again


def test_where_there_is_no_flock_the_run_goes_on_unlocked_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_cli_io, "_flock", None)
    path = str(tmp_path / "out.jsonl")
    with caplog.at_level(logging.DEBUG, logger="aichatonline_sync"):
        first, second = open_output(path), open_output(path)
    os.close(first)
    os.close(second)
    assert [r.getMessage() for r in caplog.records] == [
        f"OUTPUT {path!r} is not locked: this system has no flock()"
    ] * 2


def test_a_device_is_not_locked() -> None:
    first, second = os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY)
    try:
        lock_output(first, os.devnull)
        lock_output(second, os.devnull)  # no lock taken, none refused
    finally:
        os.close(first)
        os.close(second)
