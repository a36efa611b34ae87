"""Messages to prompt: gpt4free's ``format_prompt`` and ``get_random_string``, plus validation."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Union

from .errors import InvalidRequestError

__all__ = [
    "Messages",
    "build_prompt",
    "content_to_text",
    "format_prompt",
    "get_random_string",
    "validate_content",
    "validate_conversation_id",
    "validate_messages",
]

#: A prompt string, or a list of ``{"role": ..., "content": ...}`` dicts.
Messages = Union[str, Sequence[Mapping[str, Any]]]

_ALPHABET = string.ascii_lowercase + string.digits
_SYSTEM_ROLES = ("system", "developer")


def get_random_string(length: int = 10) -> str:
    """Return ``length`` random characters drawn from ``a-z0-9`` (as gpt4free does).

    >>> len(get_random_string())
    10
    """
    return "".join(random.choice(_ALPHABET) for _ in range(length))


def content_to_text(content: Any) -> str:
    """The text of a message content, as gpt4free takes it: a str as it is, ``None`` as ``""``,
    a part its ``text``, a list the text of its text parts joined."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Mapping):
        # gpt4free: a part with "text" gives it; any other dict (a file, an image) gives nothing.
        return content_to_text(content["text"]) if "text" in content else ""
    if isinstance(content, list):
        return "".join(
            content_to_text(part)
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        )
    return str(content)


def format_prompt(
    messages: Sequence[Mapping[str, Any]],
    add_special_tokens: bool = False,
    do_continue: bool = False,
    include_system: bool = True,
) -> str:
    """Turn a list of messages into one prompt string, exactly as gpt4free's helper does.

    One message (and no special tokens) is passed through as its text. Otherwise every message
    becomes ``Role: text`` on its own line, followed by ``Assistant:`` unless ``do_continue``.

    >>> format_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    'System: Be brief.\\nUser: Hi\\nAssistant:'

    :param messages: ``{"role": str, "content": str | list-of-parts | None}`` dicts.
    :param add_special_tokens: use the ``Role: text`` form even for a single message.
    :param do_continue: leave out the trailing ``Assistant:``.
    :param include_system: keep system and developer messages.
    :returns: the prompt.
    """
    if not add_special_tokens and len(messages) == 1:
        return content_to_text(messages[0].get("content"))
    lines = []
    for message in messages:
        role = str(message.get("role", ""))
        if not include_system and role in _SYSTEM_ROLES:
            continue
        text = content_to_text(message.get("content"))
        if not text.strip():
            continue
        lines.append(f"{role.capitalize()}: {text}")
    formatted = "\n".join(lines)
    if do_continue:
        return formatted
    return f"{formatted}\nAssistant:"


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check the shape of ``messages`` and return it as a list of dicts.

    One rule for text, in a content as in its parts: text is a ``str``, never converted. A content
    is a str, ``None`` or a list of parts; a part whose ``type`` is ``"text"`` (or missing) has a
    str ``text``; parts of other types are dropped, whatever they hold.

    :raises InvalidRequestError: naming the first problem found.
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if isinstance(messages, (bytes, bytearray)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(
            "messages must be a str or a list of {'role': ..., 'content': ...} dicts, "
            f"not {type(messages).__name__}"
        )
    if not messages:
        raise InvalidRequestError("messages is an empty list: give at least one message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{index}] must be a dict with 'role' and 'content', "
                f"not {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"messages[{index}]['role'] must be a non-empty str, got {role!r}"
            )
        validate_content(message.get("content"), f"messages[{index}]['content']")
        checked.append(dict(message))
    return checked


def validate_content(content: object, where: str) -> None:
    """Check one message content: a str, ``None``, or a list of parts (see :func:`_check_part`).

    :param where: what the message calls it (``"messages[0]['content']"``).
    :raises InvalidRequestError: naming the first problem found.
    """
    if content is not None and not isinstance(content, (str, list)):
        raise InvalidRequestError(
            f"{where} must be a str, a list of parts or None, not {type(content).__name__}"
        )
    if isinstance(content, list):
        for part_index, part in enumerate(content):
            _check_part(part, f"{where}[{part_index}]")


def _check_part(part: object, where: str) -> None:
    """One part of a list content. The rule, for contents and parts alike: text is a str. A part is
    text when its ``type`` is ``"text"`` or missing, and then its ``text`` must be a str; parts of
    other types (images, files) are dropped whatever they hold."""
    if not isinstance(part, Mapping):
        raise InvalidRequestError(
            f"{where} must be a dict like {{'type': 'text', 'text': ...}}, not {type(part).__name__}"
        )
    kind = part.get("type", "text")
    if not isinstance(kind, str):
        raise InvalidRequestError(f"{where}['type'] must be a str, not {type(kind).__name__}")
    if kind != "text":
        return
    if "text" not in part:
        raise InvalidRequestError(f"{where} is a text part without 'text'")
    text = part["text"]
    if not isinstance(text, str):
        raise InvalidRequestError(
            f"{where}['text'] must be a str (the text of a text part), not {type(text).__name__}"
        )


def build_prompt(messages: object) -> str:
    """Validate ``messages`` and format them into the prompt sent upstream.

    :raises InvalidRequestError: bad messages, or a prompt that is empty or only white space.
    """
    checked = validate_messages(messages)
    if not any(content_to_text(message.get("content")).strip() for message in checked):
        raise InvalidRequestError(
            "the prompt is empty (or only white space) after formatting the messages"
        )
    prompt = format_prompt(checked)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the prompt cannot be sent: it is not valid Unicode text (a lone surrogate "
            f"{prompt[exc.start]!r} at character {exc.start}; was it decoded with "
            "errors='surrogateescape'?)"
        ) from None
    return prompt


_CONVERSATION_RE = re.compile(r"[\x21-\x7e]{1,128}")


def validate_conversation_id(conversation_id: object) -> str:
    """Check a ``conversationId``: 1-128 printable ASCII characters without spaces."""
    if not isinstance(conversation_id, str) or not _CONVERSATION_RE.fullmatch(conversation_id):
        raise InvalidRequestError(
            "conversation_id must be 1-128 printable characters without spaces, "
            f"not {conversation_id!r}"
        )
    return conversation_id
