"""Following a batch as it runs: ``on_result`` (checked before anything is sent; an error in it
stops the batch) and the ``progress=True`` bar (tqdm, or one warning where it is missing)."""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any, Callable

import pytest
from _support_batch import LONG, echo, failing_reply

import aichatonline_sync as aco
from aichatonline_sync import (
    APIStatusError,
    BatchResult,
    InvalidRequestError,
    Session,
)
from aichatonline_sync._client import batch as _batch
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


def test_on_result_error_stops_the_batch(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)

    def on_result(result: BatchResult) -> None:
        raise RuntimeError("stop here")

    with (
        Session(emu.url, timeout=LONG, max_retries=0) as session,
        pytest.raises(RuntimeError, match="stop here"),
    ):
        aco.batch([f"p{i}" for i in range(20)], session=session, max_workers=1, on_result=on_result)
    assert len(emu.chat_requests) < 20


def test_on_result_must_be_callable(emulator: MakeEmulator) -> None:
    emu = emulator(reply=echo)
    with pytest.raises(InvalidRequestError, match="on_result"):
        aco.batch(["a"], base_url=emu.url, on_result=42)
    assert emu.requests == []


def test_progress_without_tqdm_warns_once_and_runs_the_batch(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(_batch._NoTqdm, "warned", False)
    emu = emulator(reply=echo)
    with pytest.warns(
        RuntimeWarning, match=r"pip install \"aichatonline-sync\[progress\]\""
    ) as got:
        assert aco.batch(["a", "b"], base_url=emu.url, progress=True) == [echo("a"), echo("b")]
    assert len(got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        results = list(aco.batch_iter(["c"], base_url=emu.url, progress=True))
    assert [r.text for r in results] == [echo("c")]
    assert len(emu.chat_requests) == 3


def test_progress_bar_counts_done_and_failed(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bars: list[Any] = []
    output = io.StringIO()

    class Recording(tqdm_auto.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = output
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm_auto, "tqdm", Recording)
    emu = emulator(reply=failing_reply("p2"))
    prompts = [f"p{i}" for i in range(4)]
    results = aco.batch(
        prompts, base_url=emu.url, max_retries=0, progress=True, return_exceptions=True
    )
    assert isinstance(results[2], APIStatusError)
    [bar] = bars
    assert bar.total == 4
    assert bar.n == 4
    assert "failed=1" in bar.postfix
    text = output.getvalue()
    assert "4/4" in text
    assert "prompt/s" in text
