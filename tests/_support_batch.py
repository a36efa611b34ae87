"""What the batch tests share: a reply that echoes its prompt, one that fails for one prompt, and
the bounds they wait within."""

from __future__ import annotations

from typing import Callable

from aichatonline_sync import Timeout

#: A read timeout far longer than any wait of these tests: a worker that returns in time was woken
#: by the batch, not by its timeout.
LONG = Timeout(connect=5, read=60)
WAIT = 10.0


def echo(prompt: str) -> str:
    return f"echo of {prompt}: one two three"


def failing_reply(bad: str) -> Callable[[str], str]:
    def reply(prompt: str) -> str:
        if prompt == bad:
            raise RuntimeError("this prompt fails")
        return echo(prompt)

    return reply
