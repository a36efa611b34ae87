"""``_cli_io``'s record writer under a stop signal, in-process: a SIGTERM that comes while a record
is written waits for its end, and what the batch counts is what was written (the summary line of
``aichatonline batch`` is made from those counts)."""

from __future__ import annotations

import io
import signal
import sys
import threading

import pytest

from aichatonline_sync._cli_io import RecordWriter, StopSignals, Terminated

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGTERM")


class SignalledStream(io.StringIO):
    """A text stream that sends this process a SIGTERM in the middle of taking a record."""

    def write(self, text: str) -> int:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this (the main) thread
        return super().write(text)


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
