"""Text is text: every piece handed out encodes as UTF-8, whatever UTF-16 surrogates the
upstream's JSON escapes, and a conversation refuses to save or load what UTF-8 cannot hold."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import pytest

from aichatonline_sync import Conversation, InvalidRequestError, Session
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
LOGGER = "aichatonline_sync"


def reply_of(*messages: str) -> bytes:
    """A raw HTTP reply with one line per message, non-ASCII escaped as UTF-16 (JavaScript's way)."""
    body = b"".join(json.dumps({"data": {"message": m}}).encode() + b"\n" for m in messages)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def surrogate_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and "surrogate" in r.getMessage()
    ]


def test_a_surrogate_pair_split_across_two_lines_is_joined(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = emulator()
    emu.raw_reply("chat", reply_of("Hi \ud83d", "\ude00 there", "\ud83d", "\ude00"))
    with Session(emu.url, max_retries=0) as session:
        stream = session.chat("hi")
        pieces = list(stream)
    # One piece per line; the high half waits for the next piece.
    assert pieces == ["Hi ", "\U0001f600 there", "", "\U0001f600"]
    assert stream.text == "Hi \U0001f600 there\U0001f600"
    for piece in pieces:
        piece.encode("utf-8")
    assert surrogate_warnings(caplog) == []


def test_a_lone_surrogate_becomes_a_replacement_character_with_one_warning(
    emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = emulator()
    emu.raw_reply("chat", reply_of("a\ud83d", "b", "\ude00c", "d\udc00e", "end \ud83d"))
    with Session(emu.url, max_retries=0) as session:
        pieces = list(session.chat("hi"))
    # A high half that no piece follows is handed out, replaced, at the end.
    assert pieces == ["a", "\ufffdb", "\ufffdc", "d\ufffde", "end ", "\ufffd"]
    for piece in pieces:
        piece.encode("utf-8")
    assert len(surrogate_warnings(caplog)) == 1


def test_a_conversation_lives_on_after_a_reply_with_a_lone_surrogate(
    emulator: MakeEmulator, tmp_path: Path
) -> None:
    emu = emulator()
    emu.raw_reply("chat", reply_of("broken \ud83d", "emoji"), close=False)
    with Session(emu.url, max_retries=0) as session:
        conversation = Conversation(session=session)
        assert conversation.say("hi") == "broken \ufffdemoji"
        assert conversation.say("again")  # the emulator's own reply
        conversation.save(tmp_path / "chat.json")
    assert len(Conversation.load(tmp_path / "chat.json")) == 4


def test_save_refuses_a_lone_surrogate_naming_the_message(tmp_path: Path) -> None:
    conversation = Conversation(
        messages=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "half an emoji \ud83d"},
        ]
    )
    target = tmp_path / "chat.json"
    with pytest.raises(InvalidRequestError, match=r"message 1 \(role 'assistant'\)"):
        conversation.save(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_load_refuses_an_escaped_lone_surrogate_naming_the_message(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    saved = {
        "version": 1,
        "system": None,
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "half \ud83d"}]},
        ],
    }
    path.write_text(json.dumps(saved), encoding="utf-8")  # (ASCII: the half is escaped)
    assert "\\ud83d" in path.read_text(encoding="utf-8")
    with pytest.raises(InvalidRequestError, match=r"chat\.json: message 2 \(role 'user'\)"):
        Conversation.load(path)
