"""Event hooks (``Session(event_hooks=...)``) over the emulator: which events a chat emits, in
which order and with what; hooks that raise; hooks through module-level calls; ``cache_hit``; and
``ChatStream.usage``."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

import pytest
from _support_threads import WAIT, PauseAt, in_thread

import aichatonline_sync as aco
from aichatonline_sync import ChatEvent
from aichatonline_sync._client.hooks import EVENTS, EventHooks
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]


class Recorder:
    def __init__(self) -> None:
        self.events: list[ChatEvent] = []

    def __call__(self, event: ChatEvent) -> None:
        self.events.append(event)

    @property
    def names(self) -> list[str]:
        return [event.name for event in self.events]

    def hooks(self) -> dict[str, list[Any]]:
        return {name: [self] for name in EVENTS}


def test_a_chat_read_to_its_end(emulator: MakeEmulator) -> None:
    emu = emulator(reply="Hello there, friend!")
    rec = Recorder()
    with aco.Session(emu.url, event_hooks=rec.hooks()) as session:
        for _ in session.chat("Hi", conversation_id="abcdefghij"):
            pass
    assert rec.names == ["chat_start", "first_piece", "chat_end"]
    start, first, end = rec.events
    assert start.model == "gpt-4o-mini"
    assert start.conversation_id == "abcdefghij"
    assert start.url == f"{emu.url}/aichatonline/api/chat/gpt"
    assert first.stream is not None
    assert first.stream.conversation_id == "abcdefghij"
    assert end.text == "Hello there, friend!"
    pytest.importorskip("bpe_openai", reason="bpe-openai is not installed (the tokens extra)")
    assert end.usage == aco.Usage(1, 5, 6)  # "Hi"; "Hello"," there",","," friend","!"


def test_retries_are_events_with_attempt_wait_and_error(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator(reply="ok")
    emu.fail("chat", 503, times=2)
    rec = Recorder()
    with aco.Session(emu.url, retry=no_sleep.policy(max_retries=3), event_hooks=rec.hooks()) as s:
        assert s.complete("Hi") == "ok"
    assert rec.names == ["chat_start", "retry", "retry", "first_piece", "chat_end"]
    retries = rec.events[1:3]
    assert [e.attempt for e in retries] == [1, 2]
    assert [e.wait for e in retries] == no_sleep.sleeps
    assert all(isinstance(e.error, aco.APIStatusError) for e in retries)


def test_a_chat_that_fails_before_its_first_piece(emulator: MakeEmulator, no_sleep: Any) -> None:
    emu = emulator()
    emu.fail("chat", 503, times=5)
    rec = Recorder()
    session = aco.Session(emu.url, retry=no_sleep.policy(max_retries=1), event_hooks=rec.hooks())
    with session, pytest.raises(aco.APIStatusError) as raised:
        session.chat("Hi")
    assert rec.names == ["chat_start", "retry", "chat_error"]
    assert rec.events[-1].error is raised.value


def test_a_chat_that_fails_after_its_first_piece(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    emu.drop("chat", after=1)
    rec = Recorder()
    with aco.Session(emu.url, event_hooks=rec.hooks()) as s:
        stream = s.chat("Hi")
        with pytest.raises(aco.IncompleteStreamError) as raised:
            for _ in stream:
                pass
    assert rec.names == ["chat_start", "first_piece", "chat_error"]
    assert rec.events[-1].error is raised.value


@pytest.mark.parametrize("where", ["this thread", "another thread"])
def test_an_abort_with_a_reason_between_reads_is_the_chats_error(
    emulator: MakeEmulator, where: str
) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    rec = Recorder()
    with aco.Session(emu.url, event_hooks=rec.hooks()) as s:
        stream = s.chat("Hi")
        assert next(stream) == "one "
        if where == "this thread":
            stream.abort("enough")
        else:
            other = threading.Thread(target=stream.abort, args=("enough",))
            other.start()
            other.join()
        assert rec.names == ["chat_start", "first_piece", "chat_error"]
        error = rec.events[-1].error
        assert isinstance(error, aco.IncompleteStreamError)
        assert error.partial == "one "
        assert str(error).endswith(": enough")
        with pytest.raises(aco.IncompleteStreamError) as raised:
            next(stream)
        assert str(raised.value) == str(error)
    assert rec.names == ["chat_start", "first_piece", "chat_error"]


def test_a_stream_closed_early_has_no_last_event(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["one ", "two ", "three"])
    rec = Recorder()
    with aco.Session(emu.url, event_hooks=rec.hooks()) as s:
        for _ in s.chat("Hi"):
            break
        gc.collect()
    assert rec.names == ["chat_start", "first_piece"]


def test_a_hook_that_raises_is_logged_once_and_the_chat_goes_on(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = emulator(reply="fine")
    rec = Recorder()

    def broken(event: ChatEvent) -> None:
        raise RuntimeError("boom")

    hooks = {"chat_start": [broken, rec], "chat_end": [broken, rec]}
    with caplog.at_level(logging.WARNING, logger="aichatonline_sync"), aco.Session(
        emu.url, event_hooks=hooks
    ) as s:
        assert s.complete("Hi") == "fine"
        assert s.complete("Hi") == "fine"
    assert rec.names == ["chat_start", "chat_end"] * 2
    warnings = [r for r in caplog.records if "hook" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]  # once per hook and exception type
    assert "RuntimeError" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("hooks", "match"),
    [
        ({"chat_begin": []}, "unknown event 'chat_begin'"),
        ({"retry": print}, "must be a list"),
        ({"retry": [1]}, "not callable"),
        ([("retry", [])], "must be a dict"),
    ],
)
def test_bad_hooks_are_refused_before_anything_is_sent(hooks: Any, match: str) -> None:
    with pytest.raises(aco.InvalidRequestError, match=match):
        aco.Session("http://127.0.0.1:9", event_hooks=hooks)


def test_module_level_calls_share_a_session_per_hooks(emulator: MakeEmulator) -> None:
    from aichatonline_sync._client.registry import _registry

    emu = emulator(reply="shared")
    rec = Recorder()
    hooks = {"chat_end": [rec]}
    assert aco.complete("Hi", base_url=emu.url, event_hooks=hooks) == "shared"
    assert aco.complete("Hi", base_url=emu.url, event_hooks={"chat_end": [rec]}) == "shared"
    assert len(_registry) == 1
    assert rec.names == ["chat_end", "chat_end"]
    assert len(emu.token_requests) == 1


def test_cache_hit_is_emitted_for_a_stream_handed_out_from_a_cache(emulator: MakeEmulator) -> None:
    emu = emulator(reply="cached")
    rec = Recorder()
    hooks = EventHooks({"cache_hit": [rec]})
    with aco.Session(emu.url) as s:
        stream = s.chat("Hi")
        hooks.cache_hit(stream, url="http://cache")
        stream.close()
    assert rec.names == ["cache_hit"]
    assert rec.events[0].stream is stream
    assert rec.events[0].conversation_id == stream.conversation_id


def test_a_reply_cache_hit_is_a_cache_hit_event_and_sends_nothing(
    emulator: MakeEmulator, tmp_path: Any
) -> None:
    emu = emulator(reply="cached")
    rec = Recorder()
    with aco.Session(emu.url, event_hooks=rec.hooks(), cache=tmp_path / "replies.db") as s:
        assert s.complete("Hi") == "cached"
        sent = emu.request_count
        rec.events.clear()
        with s.chat("Hi") as stream:
            assert list(stream) == ["cached"]
            assert stream.cached
    assert emu.request_count == sent
    assert rec.names == ["cache_hit"]
    assert rec.events[0].stream is stream


def test_usage_of_a_stream(emulator: MakeEmulator) -> None:
    pytest.importorskip("bpe_openai", reason="bpe-openai is not installed (the tokens extra)")
    from aichatonline_sync._client.usage import count_tokens

    emu = emulator()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    with aco.Session(emu.url) as s:
        stream = s.chat(messages)
        assert stream.usage is None  # not read to its end yet
        text = "".join(stream)
        prompt = aco.format_prompt(messages)
        assert stream.usage == aco.Usage(
            count_tokens(prompt), count_tokens(text), count_tokens(prompt) + count_tokens(text)  # type: ignore[operator]
        )
        assert stream.usage.prompt_tokens == 12  # type: ignore[union-attr]
        quiet = s.chat("Hi", keep_text=False)
        "".join(quiet)
        assert quiet.usage is None  # no text kept, nothing to count
        cut = s.chat("Hi")
        next(cut)
        cut.close()
        assert cut.usage is None


def test_hooks_see_nothing_of_a_session_without_them(emulator: MakeEmulator) -> None:
    assert not EventHooks(None)
    assert not EventHooks({"retry": []})


def test_ctrl_c_in_a_retry_wait_is_the_chats_last_event(emulator: MakeEmulator) -> None:
    emu = emulator()
    emu.fail("chat", 503)
    rec = Recorder()

    def interrupt(seconds: float) -> None:  # the retry wait, interrupted
        raise KeyboardInterrupt

    policy = aco.RetryPolicy(max_retries=2, sleep=interrupt)
    with aco.Session(emu.url, retry=policy, event_hooks=rec.hooks()) as s, pytest.raises(KeyboardInterrupt):
        s.complete("Hi")
    assert rec.names == ["chat_start", "retry", "chat_error"]
    assert isinstance(rec.events[-1].error, KeyboardInterrupt)


def test_a_chats_end_reported_from_two_threads_at_once_is_one_event() -> None:
    """The reply, a Ctrl-C and a close may report a chat's end from different threads. The first
    report is paused where it marks the chat ended, if it does so without the lock; the second
    report then runs to its end: there is still one last event."""
    from aichatonline_sync._client.hooks import ChatCall

    rec = Recorder()
    call = ChatCall(
        EventHooks(rec.hooks()), model="gpt-4o-mini", conversation_id="c", url="u", prompt="p"
    )
    pause = PauseAt(ChatCall._end, "self._done = True", when=lambda f: not call._lock.locked())

    def report_first() -> None:
        try:
            pause.run(lambda: call.finished("text", kept=True))
        finally:
            pause.paused.set()  # also when it ran through: the test goes on either way

    first, first_out = in_thread(report_first, "first")
    assert pause.paused.wait(WAIT)
    if pause.done:  # paused after its check, without the lock: the second report runs now
        call.failed(aco.IncompleteStreamError("cut"))
        pause.resume()
    first.join(WAIT)
    assert not first.is_alive()
    assert "error" not in first_out
    assert rec.names == ["chat_end"]
