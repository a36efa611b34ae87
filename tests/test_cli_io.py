"""``_cli_io`` in-process: its bounded reads of INPUT and stdin (with small bounds), and its record
writer under a stop signal: a SIGTERM that comes while a record is written waits for its end, and
what the batch counts is what was written (the summary line of ``aichatonline batch`` is made from
those counts). The command itself is tested in tests/test_cli_input.py and test_cli_output.py."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from aichatonline_sync.cli.io import (
    RecordWriter,
    StopSignals,
    Terminated,
    UsageError,
    read_input,
    read_stdin,
)

POSIX = sys.platform != "win32"
LIMIT = 3 << 20  # 3 MiB: more than one block of the reader (1 MiB)


def stdin_of(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


@pytest.mark.parametrize("size", [0, 1, LIMIT - 1, LIMIT])
def test_stdin_up_to_the_bound_is_read_whole(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    monkeypatch.setattr(sys, "stdin", stdin_of(data))
    assert read_stdin("the prompt", LIMIT) == data


def test_stdin_over_the_bound_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", stdin_of(b"x" * (LIMIT + 1)))
    with pytest.raises(UsageError) as caught:
        read_stdin("the prompt", LIMIT)
    assert str(caught.value) == "the prompt on stdin is larger than 3 MiB. Nothing was sent"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_stdin_stops_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    with open("/dev/zero", "rb") as zeros:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(zeros))
        with pytest.raises(UsageError) as caught:
            read_input("-", LIMIT)
        monkeypatch.undo()
    assert str(caught.value).startswith("INPUT on stdin is larger than 3 MiB: it is read whole")
    assert "use batch_iter() in Python" in str(caught.value)


def test_a_bound_that_is_no_whole_mib_is_said_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"Hi\n" * 10)
    assert read_input(str(path), 30) == (f"INPUT {str(path)!r}", "Hi\n" * 10)
    with pytest.raises(UsageError, match=r"is larger than 29 bytes: "):
        read_input(str(path), 29)




class SignalledStream(io.StringIO):
    """A text stream that sends this process a SIGTERM in the middle of taking a record."""

    def write(self, text: str) -> int:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this (the main) thread
        return super().write(text)


@pytest.mark.skipif(not POSIX, reason="needs SIGTERM")
def test_a_sigterm_during_a_write_is_raised_after_the_record_and_its_count() -> None:
    assert threading.current_thread() is threading.main_thread()
    stream = SignalledStream()
    counted: list[bool] = []
    with StopSignals() as signals:
        writer = RecordWriter("stdout", stream=stream, signals=signals)
        with pytest.raises(Terminated):
            writer.write({"id": 1, "text": "hi"}, then=lambda: counted.append(True))
    assert stream.getvalue() == '{"id": 1, "text": "hi"}\n'  # whole
    assert writer.written == 1  # counted before the signal was raised
    assert counted == [True]


def test_without_a_signal_the_count_follows_each_record() -> None:
    stream = io.StringIO()
    counted: list[int] = []
    with StopSignals() as signals:
        writer = RecordWriter("stdout", stream=stream, signals=signals)
        for index in range(3):
            writer.write({"id": index}, then=lambda index=index: counted.append(index))
    assert writer.written == 3
    assert counted == [0, 1, 2]
    assert stream.getvalue().splitlines() == ['{"id": 0}', '{"id": 1}', '{"id": 2}']
