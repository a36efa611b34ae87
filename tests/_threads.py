"""Run one piece of work in many threads at once (a barrier lines them up), bounded in time."""

from __future__ import annotations

import threading
from typing import Callable


def run_threads(
    count: int, work: Callable[[int], str], *, wait: float = 10.0
) -> tuple[dict[int, str], list[BaseException]]:
    """Run ``work(i)`` for ``i`` in ``range(count)``, each in its own thread, all released together.

    :returns: the results by index, and the exceptions raised. A thread still running after 30 s
        fails the test (a hang, not a slow machine).
    """
    barrier = threading.Barrier(count, timeout=wait)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results, errors
