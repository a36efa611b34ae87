"""The gateway's reply limits (``_gateway_limits.ReplyLimiter``), pure: every way of splitting a
reply into pieces gives the same cut, for stop strings and for a token budget."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aichatonline_sync.gateway.limits import ReplyLimiter


def count(text: str) -> int:  # a toy tokenizer: a token per word
    return len(text.split())


def truncate(text: str, limit: int) -> str:
    words = text.split()
    if len(words) <= limit:
        return text
    return text[: text.index(words[limit], sum(len(w) for w in words[:limit]))].rstrip()


def run(pieces: list[str], stop: list[str], limit: Optional[int] = None) -> tuple[str, Optional[str]]:
    options = {"count": count, "truncate": truncate} if limit is not None else {}
    limiter = ReplyLimiter(stop, limit, **options)  # type: ignore[arg-type]
    out = []
    for piece in pieces:
        out.append(limiter.feed(piece))
        if limiter.done:
            break
    out.append(limiter.end())
    assert "".join(out) == limiter.text
    return limiter.text, limiter.finish_reason


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


@given(st.text("ab c", max_size=30), st.lists(st.text("ab c", min_size=1, max_size=3), max_size=3), st.lists(st.integers(0, 40)))
@example("aca", ["c", "aca"], [2])  # a longer stop string that began first ends after a shorter
def test_stop_cuts_before_the_first_stop_string_however_the_reply_is_split(
    text: str, stop: list[str], cuts: list[int]
) -> None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    expected = text[: min(hits)] if hits else text
    assert run(split(text, cuts), stop) == (expected, "stop")


@given(st.text("ab ", max_size=30), st.integers(1, 5), st.lists(st.integers(0, 40)))
def test_the_budget_sends_a_prefix_within_it(text: str, limit: int, cuts: list[int]) -> None:
    sent, reason = run(split(text, cuts), [], limit)
    assert text.startswith(sent)
    assert count(sent) <= limit
    assert reason == ("length" if count(text) > limit else "stop")


def test_nothing_passes_after_the_cut() -> None:
    limiter = ReplyLimiter(["x"])
    assert limiter.feed("abxcd") == "ab"
    assert limiter.done
    assert limiter.feed("more") == ""
    assert limiter.end() == ""
    assert limiter.finish_reason == "stop"


def test_a_budget_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="count and truncate"):
        ReplyLimiter((), 5)
