"""Messages to prompt: ``format_prompt``, ``get_random_string`` and message validation."""

from __future__ import annotations

import string
from typing import Any

import pytest
import responses

import aichatonline_sync as aco
from aichatonline_sync import InvalidRequestError, format_prompt, get_random_string
from aichatonline_sync._wire.prompt import build_prompt, validate_messages

NOWHERE = "http://127.0.0.1:9"  # nothing listens on the discard port


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


# -- format_prompt: UPSTREAM.md's examples ------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "kwargs", "expected"),
    [
        ([user("Hi")], {}, "Hi"),
        (
            [{"role": "system", "content": "Be brief."}, user("Hi")],
            {},
            "System: Be brief.\nUser: Hi\nAssistant:",
        ),
        (
            [user("Hi"), {"role": "assistant", "content": "Hello!"}, user("How are you?")],
            {},
            "User: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:",
        ),
        (
            [
                user(
                    [
                        {"type": "text", "text": "Describe"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        {"type": "text", "text": " this"},
                    ]
                )
            ],
            {},
            "Describe this",
        ),
        (
            [{"role": "system", "content": "  "}, user("Hi")],
            {},
            "User: Hi\nAssistant:",
        ),
        ([user("Hi")], {"add_special_tokens": True}, "User: Hi\nAssistant:"),
    ],
)
def test_upstream_examples(
    messages: list[dict[str, Any]], kwargs: dict[str, Any], expected: str
) -> None:
    assert format_prompt(messages, **kwargs) == expected


def test_single_message_ignores_its_role() -> None:
    assert format_prompt([{"role": "system", "content": "Be brief."}]) == "Be brief."
    assert format_prompt([{"role": "assistant", "content": "Hi\nthere"}]) == "Hi\nthere"


def test_include_system_false_drops_system_and_developer() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "developer", "content": "D"},
        user("Hi"),
        {"role": "assistant", "content": "Hello"},
    ]
    assert format_prompt(messages, include_system=False) == "User: Hi\nAssistant: Hello\nAssistant:"
    assert format_prompt(messages) == (
        "System: S\nDeveloper: D\nUser: Hi\nAssistant: Hello\nAssistant:"
    )


def test_do_continue_leaves_out_the_assistant_suffix() -> None:
    messages = [user("Hi"), {"role": "assistant", "content": "Hel"}]
    assert format_prompt(messages, do_continue=True) == "User: Hi\nAssistant: Hel"
    assert format_prompt([user("Hi")], add_special_tokens=True, do_continue=True) == "User: Hi"


def test_role_is_capitalized() -> None:
    messages = [{"role": "USER", "content": "a"}, {"role": "tool", "content": "b"}]
    assert format_prompt(messages) == "User: a\nTool: b\nAssistant:"


def test_none_content() -> None:
    assert format_prompt([user(None)]) == ""
    assert format_prompt([user(None), user("Hi")]) == "User: Hi\nAssistant:"


def test_list_content() -> None:
    parts = [
        {"text": "no type "},  # a part without "type" counts as text
        {"type": "image_url", "image_url": {"url": "u"}},
        {"type": "file", "text": "dropped"},
        {"type": "text", "text": "kept"},
    ]
    assert format_prompt([user(parts)]) == "no type kept"
    assert format_prompt([user(parts), user("x")]) == "User: no type kept\nUser: x\nAssistant:"
    only_image = [{"type": "image_url", "image_url": {"url": "u"}}]
    assert format_prompt([user(only_image), user("x")]) == "User: x\nAssistant:"


@pytest.mark.parametrize("blank", ["", " ", "\n\t ", None, []])
def test_white_space_only_messages_are_dropped(blank: Any) -> None:
    messages = [user("a"), {"role": "assistant", "content": blank}, user("b")]
    assert format_prompt(messages) == "User: a\nUser: b\nAssistant:"


def test_text_is_kept_verbatim() -> None:
    messages = [user("  padded  "), user("line1\nline2")]
    assert format_prompt(messages) == "User:   padded  \nUser: line1\nline2\nAssistant:"


# -- get_random_string ------------------------------------------------------------------------


def test_random_string_default() -> None:
    value = get_random_string()
    assert isinstance(value, str)
    assert len(value) == 10
    assert set(value) <= set(string.ascii_lowercase + string.digits)


@pytest.mark.parametrize("length", [0, 1, 5, 32, 100])
def test_random_string_length(length: int) -> None:
    value = get_random_string(length)
    assert len(value) == length
    assert set(value) <= set(string.ascii_lowercase + string.digits)


def test_random_string_uses_the_whole_alphabet() -> None:
    drawn = {get_random_string() for _ in range(300)}
    assert len(drawn) == 300
    chars = set("".join(drawn))
    assert chars == set(string.ascii_lowercase + string.digits)


# -- validation -------------------------------------------------------------------------------

BAD_MESSAGES = [
    pytest.param(42, "int", id="int"),
    pytest.param({"role": "user", "content": "Hi"}, "dict", id="dict"),
    pytest.param(b"Hi", "bytes", id="bytes"),
    pytest.param(None, "NoneType", id="None"),
    pytest.param([], "empty", id="empty-list"),
    pytest.param(["Hi"], "messages[0]", id="str-message"),
    pytest.param([user("a"), 7], "messages[1]", id="int-message"),
    pytest.param([{"content": "Hi"}], "role", id="missing-role"),
    pytest.param([{"role": 1, "content": "Hi"}], "role", id="int-role"),
    pytest.param([{"role": None, "content": "Hi"}], "role", id="none-role"),
    pytest.param([user(5)], "content", id="int-content"),
    pytest.param([user({"type": "text", "text": "Hi"})], "content", id="dict-content"),
    pytest.param([user(b"Hi")], "content", id="bytes-content"),
    pytest.param([user(["Hi"])], "content", id="str-part"),
    pytest.param("", "empty", id="empty-str"),
    pytest.param("   ", "empty", id="blank-str"),
    pytest.param([user("  ")], "empty", id="blank-message"),
    pytest.param([user(None)], "empty", id="none-content-only"),
    pytest.param(
        [{"role": "system", "content": " "}, user("\n")], "empty", id="all-blank-messages"
    ),
    pytest.param(
        [user([{"type": "image_url", "image_url": {"url": "u"}}])], "empty", id="image-only"
    ),
]


@pytest.mark.parametrize(("messages", "named"), BAD_MESSAGES)
def test_build_prompt_rejects(messages: Any, named: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        build_prompt(messages)
    assert isinstance(info.value, ValueError)
    assert named in str(info.value)


def test_validate_messages_shapes() -> None:
    assert validate_messages("Hi") == [user("Hi")]
    assert validate_messages([user("Hi")]) == [user("Hi")]
    assert validate_messages((user("Hi"),)) == [user("Hi")]


def test_build_prompt_formats() -> None:
    assert build_prompt("Hi") == "Hi"
    assert build_prompt([user("Hi")]) == "Hi"
    assert (
        build_prompt([{"role": "system", "content": "Be brief."}, user("Hi")])
        == "System: Be brief.\nUser: Hi\nAssistant:"
    )


@pytest.mark.parametrize(("messages", "named"), BAD_MESSAGES)
@pytest.mark.parametrize("function", [aco.chat, aco.complete])
def test_module_level_rejects_before_any_network_io(
    function: Any, messages: Any, named: str
) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        with pytest.raises(InvalidRequestError) as info:
            function(messages, base_url=NOWHERE, max_retries=0)
        assert len(mock.calls) == 0  # not even an attempt
    assert named in str(info.value)


def test_module_level_rejects_without_a_mock_too() -> None:
    """Against a port where nothing listens: a connection error would mean I/O was attempted."""
    with pytest.raises(InvalidRequestError):
        aco.chat("   ", base_url=NOWHERE, max_retries=0)
    with pytest.raises(InvalidRequestError):
        aco.complete([{"content": "Hi"}], base_url=NOWHERE, max_retries=0)
