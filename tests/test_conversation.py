"""``Conversation``: the history sent with each question, when turns are added (and when not),
copies, files, options; against the real emulator."""

from __future__ import annotations

import copy
import json
import pickle
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import (
    ChatStream,
    Conversation,
    IncompleteStreamError,
    InvalidRequestError,
    Session,
    UpstreamError,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["Hello", " there", "!"]
REPLY = "".join(PIECES)


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def session(emu: Emulator) -> Any:
    with Session(emu.url, max_retries=0) as s:
        yield s


def last_prompt(emu: Emulator) -> str | None:
    return emu.chat_requests[-1].prompt


# --- the prompt sent --------------------------------------------------------------------------


def test_first_question_with_system_message(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="Be brief.", session=session)
    assert conv.say("Hi") == REPLY
    assert last_prompt(emu) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": REPLY},
    ]
    assert len(conv) == 2


def test_each_question_carries_the_whole_history(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="Be brief.", session=session)
    conv.say("Hi")
    conv.say("And then?")
    assert last_prompt(emu) == (
        f"System: Be brief.\nUser: Hi\nAssistant: {REPLY}\nUser: And then?\nAssistant:"
    )
    assert json.loads(emu.chat_requests[-1].body)["prompt"] == last_prompt(emu)
    assert len(conv) == 4


def test_without_system_message_the_first_question_goes_alone(
    emu: Emulator, session: Session
) -> None:
    conv = Conversation(session=session)
    conv.say("Hi")
    assert last_prompt(emu) == "Hi"  # gpt4free's format_prompt: one message is sent as is
    conv.say("More")
    assert last_prompt(emu) == f"User: Hi\nAssistant: {REPLY}\nUser: More\nAssistant:"


def test_a_starting_history(emu: Emulator, session: Session) -> None:
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]
    conv = Conversation(messages=earlier, session=session)
    earlier[0]["content"] = "changed"  # the conversation kept its own copy
    conv.say("Again")
    assert last_prompt(emu) == "User: Hi\nAssistant: Hey.\nUser: Again\nAssistant:"


def test_content_parts(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="S", session=session)
    parts = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": "x"}}]
    conv.say(parts)
    assert last_prompt(emu) == "System: S\nUser: Describe\nAssistant:"
    assert conv.messages[1] == {"role": "user", "content": parts}


# --- when turns are added ---------------------------------------------------------------------


def test_ask_streams_and_adds_both_turns_at_the_end(session: Session) -> None:
    conv = Conversation(session=session)
    stream = conv.ask("Hi")
    assert isinstance(stream, ChatStream)
    seen = []
    for piece in stream:
        seen.append(piece)
        assert len(conv) == 0  # nothing is added while the reply streams
    assert seen == PIECES
    assert stream.text == REPLY
    assert conv.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": REPLY},
    ]


def test_ask_as_a_context_manager(session: Session) -> None:
    conv = Conversation(session=session)
    with conv.ask("Hi") as stream:
        text = "".join(stream)
    assert text == REPLY
    assert len(conv) == 2


def test_a_stream_closed_early_adds_nothing(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="S", session=session)
    with conv.ask("Hi") as stream:
        assert next(stream) == "Hello"
    assert stream.closed
    assert len(conv) == 0
    conv.say("Again")
    assert last_prompt(emu) == "System: S\nUser: Again\nAssistant:"


def test_a_broken_stream_adds_nothing(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    conv.say("First")
    emu.drop(after=2)
    with pytest.raises(IncompleteStreamError) as info:
        conv.say("Second")
    assert info.value.partial == "Hello there"
    assert len(conv) == 2  # no question left without its answer
    conv.say("Third")
    assert last_prompt(emu) == f"User: First\nAssistant: {REPLY}\nUser: Third\nAssistant:"


def test_an_error_line_adds_nothing(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    emu.error_line(402, "no credit", after=1)
    with pytest.raises(UpstreamError):
        conv.say("Hi")
    assert len(conv) == 0


def test_a_chat_that_fails_before_any_text_adds_nothing(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    emu.fail("chat", 400)
    with pytest.raises(aco.APIStatusError):
        conv.ask("Hi")
    assert len(conv) == 0
    assert conv.say("Hi") == REPLY
    assert len(conv) == 2


def test_a_new_question_closes_an_unfinished_reply(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    first = conv.ask("One")
    assert next(first) == "Hello"
    conv.say("Two")
    assert first.closed
    # The closed reply does not end as if complete: iterating it raises, every time, and it is
    # never added.
    for _ in range(2):
        with pytest.raises(IncompleteStreamError, match="a newer question was asked") as info:
            list(first)
        assert info.value.partial == "Hello"
    assert conv.messages == [
        {"role": "user", "content": "Two"},
        {"role": "assistant", "content": REPLY},
    ]


def test_a_reply_never_read_is_not_added(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    conv.ask("Unread")
    conv.say("Read")
    assert last_prompt(emu) == "Read"
    assert len(conv) == 2


# --- the history as data ----------------------------------------------------------------------


def test_messages_is_a_copy(session: Session) -> None:
    conv = Conversation(system="S", session=session)
    conv.say("Hi")
    messages = conv.messages
    messages.append({"role": "user", "content": "x"})
    messages[1]["content"] = "changed"
    assert conv.messages[1] == {"role": "user", "content": "Hi"}
    assert len(conv) == 2


def test_clear_keeps_the_system_message(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="S", session=session)
    conv.say("Hi")
    pending = conv.ask("Unfinished")
    conv.clear()
    assert pending.closed
    assert len(conv) == 0
    assert conv.messages == [{"role": "system", "content": "S"}]
    assert conv.system == "S"
    conv.say("Again")
    assert last_prompt(emu) == "System: S\nUser: Again\nAssistant:"


def test_copy_is_independent(emu: Emulator, session: Session) -> None:
    conv = Conversation(system="S", session=session, model="gpt-4o-mini")
    conv.say("Hi")
    branch = conv.copy()
    assert branch.messages == conv.messages
    assert branch.session is session
    branch.say("Branch")
    assert len(branch) == 4
    assert len(conv) == 2
    conv.say("Trunk")
    assert last_prompt(emu) == f"System: S\nUser: Hi\nAssistant: {REPLY}\nUser: Trunk\nAssistant:"


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_the_copy_module_copies_like_copy(emu: Emulator, session: Session, how: Any) -> None:
    # copy.copy shared the history (a turn of the copy grew the original); deepcopy raised
    # TypeError (a lock).
    conv = Conversation(system="S", session=session)
    conv.say("Hi")
    branch = how(conv)
    branch.say("Branch")
    assert (len(conv), len(branch)) == (2, 4)
    assert branch.session is session  # shared, not copied


def test_a_conversation_is_not_pickled_but_saved(session: Session) -> None:
    conv = Conversation(system="S", session=session)
    with pytest.raises(TypeError, match=r"save it with to_dict\(\) or save\(\)"):
        pickle.dumps(conv)


def test_a_session_and_an_open_stream_say_at_once_that_they_are_not_pickled(
    emulator: Callable[..., Emulator],
) -> None:
    # Pickling an open ChatStream read its whole body through requests: it waited for the
    # server (60 s here, forever for an endless reply), then raised a requests exception.
    emu = emulator(reply=["a", "b"], before_piece=lambda index: index == 1 and gate.wait(20))
    gate = threading.Event()
    try:
        with Session(emu.url, max_retries=0) as session:
            with pytest.raises(TypeError, match="make one from its options"):
                pickle.dumps(session)
            with session.chat("hi") as stream:
                with pytest.raises(TypeError, match=r"keep its \.text"):
                    pickle.dumps(stream)
                gate.set()
                assert "".join(stream) == "ab"
    finally:
        gate.set()


def test_len_and_repr(session: Session) -> None:
    conv = Conversation(system="Be brief. " * 10, session=session)
    assert len(conv) == 0
    conv.say("Hi")
    assert len(conv) == 2
    text = repr(conv)
    assert text.startswith("<Conversation system='Be brief.")
    assert text.endswith("messages=2>")
    assert len(text) < 90
    assert repr(Conversation()) == "<Conversation system=None messages=0>"


# --- files ------------------------------------------------------------------------------------


def test_save_and_load(tmp_path: Path, emu: Emulator, session: Session) -> None:
    conv = Conversation(system="Sé brief.", session=session)
    conv.say("Hï")
    path = tmp_path / "chat.json"
    conv.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {
        "version": 1,
        "system": "Sé brief.",
        "messages": [
            {"role": "user", "content": "Hï"},
            {"role": "assistant", "content": REPLY},
        ],
    }
    assert "Hï" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left

    loaded = Conversation.load(str(path), session=session)
    assert loaded.messages == conv.messages
    loaded.say("Again")
    assert (
        last_prompt(emu)
        == f"System: Sé brief.\nUser: Hï\nAssistant: {REPLY}\nUser: Again\nAssistant:"
    )


# The rule of chat() for a content (a str, a list of parts, or None: no text), for the constructor
# and load alike.
CONTENTS = [
    pytest.param({"content": None}, id="none"),
    pytest.param({}, id="missing"),
    pytest.param({"content": [{"type": "text", "text": "parts"}]}, id="parts"),
    pytest.param({"content": [{"type": "image_url", "image_url": {"url": "u"}}]}, id="image-only"),
]


@pytest.mark.parametrize("content", CONTENTS)
def test_what_the_constructor_takes_is_saved_and_loaded(
    tmp_path: Path, emu: Emulator, session: Session, content: dict[str, Any]
) -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", **content}]
    conv = Conversation(messages=history, session=session)
    path = tmp_path / "chat.json"
    conv.save(path)
    loaded = Conversation.load(path, session=session)
    assert loaded.messages == conv.messages == history
    # ... and chat() takes it too: the loaded history is sent as the constructor's would be.
    conv.say("b")
    loaded.say("b")
    first, second = (r.prompt for r in emu.chat_requests)
    assert first == second
    assert first is not None
    assert first.startswith("User: a\n")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(5, id="int"),
        pytest.param([{"type": "text", "text": 5}], id="non-str-text"),
        pytest.param(["a"], id="str-part"),
    ],
)
def test_the_constructor_and_load_refuse_the_same_content(
    tmp_path: Path, emu: Emulator, content: Any
) -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": content}]
    with pytest.raises(InvalidRequestError) as made:
        Conversation(messages=history)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"version": 1, "messages": history}), encoding="utf-8")
    with pytest.raises(InvalidRequestError) as loaded:
        Conversation.load(path)
    assert str(loaded.value) == f"{path}: {made.value}"
    with pytest.raises(InvalidRequestError) as chatted:
        aco.chat(history, base_url=emu.url)
    assert str(chatted.value) == str(made.value)
    assert emu.requests == []


def test_save_overwrites(tmp_path: Path, session: Session) -> None:
    path = tmp_path / "chat.json"
    path.write_text("old", encoding="utf-8")
    Conversation(system="S", session=session).save(path)
    assert Conversation.load(path).system == "S"


def test_load_with_options(tmp_path: Path, emu: Emulator) -> None:
    path = tmp_path / "chat.json"
    Conversation().save(path)
    conv = Conversation.load(path, base_url=emu.url)
    assert conv.system is None
    assert conv.say("Hi") == REPLY


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ("[]", "is a JSON object"),
        ('{"system": "S", "messages": []}', "version None"),
        ('{"version": 2, "messages": []}', "version 2"),
        ('{"version": true, "messages": []}', "version True"),  # (True == 1)
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a RecursionError before
        ('{"version": 1, "system": 3, "messages": []}', "'system' must be"),
        ('{"version": 1, "messages": {}}', "'messages' must be a list"),
        ('{"version": 1, "messages": [{"content": "x"}]}', "role"),
        ('{"version": 1, "messages": [{"role": "user", "content": 5}]}', "must be a str"),
        (
            '{"version": 1, "messages": [{"role": "user", "content": [{"text": 5}]}]}',
            r"messages\[0\]\['content'\]\[0\]\['text'\] must be a str",
        ),
    ],
)
def test_load_rejects_what_is_no_saved_conversation(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "chat.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidRequestError, match=message) as info:
        Conversation.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b'{"version": 1, "system": "caf\xe9", "messages": []}', b"\xff\xfe{\x00", b"\x80abc"],
    ids=["latin-1", "utf-16", "binary"],
)
def test_load_rejects_a_file_that_is_not_utf8(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "chat.json"
    path.write_bytes(data)
    with pytest.raises(InvalidRequestError, match="not UTF-8 text") as info:
        Conversation.load(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnicodeDecodeError)


def test_load_accepts_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    text = '{"version": 1, "system": "Café", "messages": []}'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert Conversation.load(path).system == "Café"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Conversation.load(tmp_path / "missing.json")


def test_save_content_json_cannot_hold(tmp_path: Path) -> None:
    conv = Conversation(messages=[{"role": "user", "content": [{"type": "image", "data": b"x"}]}])
    with pytest.raises(InvalidRequestError, match="cannot be saved as JSON"):
        conv.save(tmp_path / "chat.json")
    assert list(tmp_path.iterdir()) == []


def test_dict_round_trip() -> None:
    conv = Conversation("S", messages=[{"role": "user", "content": "Hi"}])
    assert Conversation.from_dict(conv.to_dict()).messages == conv.messages


# --- sessions and options ---------------------------------------------------------------------


def test_shared_session_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator
) -> None:
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    conv = Conversation(system="S")
    conv.say("One")
    conv.say("Two")
    assert emu.tokens_issued == 1  # one pooled session and one token for the whole conversation
    assert emu.connections == 1


def test_session_options(emu: Emulator) -> None:
    conv = Conversation(base_url=emu.url, timeout=5, model="gpt-4o-mini")
    assert conv.say("Hi") == REPLY
    assert conv.session is None


def test_per_question_options(emu: Emulator, session: Session) -> None:
    conv = Conversation(session=session)
    conv.say("Hi", conversation_id="conv-1", timeout=5)
    assert emu.chat_requests[-1].json["conversationId"] == "conv-1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"system": 3}, "system must be a str"),
        ({"session": "http://x"}, "session must be"),
        ({"bogus": 1}, "unknown option"),
        ({"keep_text": False}, "keep_text"),
        ({"messages": "Hi"}, "messages must be a list"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        Conversation(**kwargs)


def test_session_options_with_a_session(session: Session) -> None:
    with pytest.raises(InvalidRequestError, match="to the Session"):
        Conversation(session=session, max_retries=3)


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("", {}, "empty"),
        ("  \n", {}, "empty"),
        ([{"type": "image_url"}], {}, "empty"),
        (None, {}, "must be a str, or a list of"),
        (3, {}, "must be a str, or a list of"),
        ([{"type": "text", "text": 3}], {}, r"\['text'\] must be a str"),
        ([{"role": "user", "content": "Hi"}], {}, "not a list of messages"),
        ({"role": "user", "content": "Hi"}, {}, "not dict"),
        (b"Hi", {}, "not bytes"),
        ("Hi", {"proxy": "http://p:1"}, "when making the Conversation"),
        ("Hi", {"keep_text": False}, "keep_text"),
        ("Hi", {"model": "gpt-5"}, "unknown model"),
    ],
)
def test_bad_questions_send_nothing(
    emu: Emulator, session: Session, content: Any, options: dict[str, Any], message: str
) -> None:
    conv = Conversation(session=session)
    with pytest.raises(InvalidRequestError, match=message):
        conv.ask(content, **options)
    assert emu.chat_requests == []
    assert len(conv) == 0


def test_complete_is_say(session: Session) -> None:
    conv = Conversation(session=session)
    assert conv.complete("Hi") == REPLY
    assert Conversation.complete is Conversation.say
