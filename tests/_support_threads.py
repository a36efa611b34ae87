"""Threads for tests: run one piece of work in a thread of its own and keep what it returned or
raised; pause a thread at a line of the library to force an interleaving."""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any, Callable

WAIT = 10.0


def in_thread(work: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


def line_of(func: Any, text: str) -> int:
    """The line number of the first line of ``func`` that contains ``text``."""
    lines, start = inspect.getsourcelines(func)
    for i, line in enumerate(lines):
        if text in line:
            return start + i
    raise AssertionError(f"{text!r} not in {func.__qualname__}")


class PauseAt:
    """Pause the thread that runs :meth:`run` just before ``func`` executes the line containing
    ``text`` (the first time ``when(frame)`` holds), until :meth:`resume`."""

    def __init__(self, func: Any, text: str, when: Callable[[Any], bool] = lambda f: True) -> None:
        self.code = func.__code__
        self.line = line_of(func, text)
        self.when = when
        self.paused = threading.Event()
        self.go = threading.Event()
        self.done = False

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if (
            not self.done
            and event == "line"
            and frame.f_lineno == self.line
            and self.when(frame)
        ):
            self.done = True
            self.paused.set()
            assert self.go.wait(WAIT)
        return self._local

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is self.code and not self.done:
            return self._local
        return None

    def run(self, work: Callable[[], Any]) -> Any:
        sys.settrace(self._global)
        try:
            return work()
        finally:
            sys.settrace(None)

    def resume(self) -> None:
        self.go.set()
