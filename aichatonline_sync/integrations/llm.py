"""A plugin for Simon Willison's ``llm`` command line: the model ``aichatonline`` (gpt-4o-mini).

Installed with the package (``pip install ".[llm]"``, or ``llm install .`` from a checkout),
``llm`` finds it through the ``llm`` entry point group::

    llm -m aichatonline "Hello"                   # streams the reply
    llm -m aichatonline -s "Be brief." "Hello"    # with a system message
    llm -c "And then?"                            # continues the last conversation
    llm chat -m aichatonline                      # a conversation in the terminal
    llm --async -m aichatonline "Hello"           # the async model (for llm's async API)
    llm -u -m aichatonline "Hello"                # shows the token usage (the tokens extra)

Every turn sends the whole conversation, formatted as gpt4free's ``format_prompt`` does (the
service keeps no history of its own). The settings are those of the ``aichatonline`` command:
``$AICHATONLINE_BASE_URL``, ``$AICHATONLINE_PROXY``, ``$AICHATONLINE_TIMEOUT``,
``$AICHATONLINE_MAX_RETRIES`` and ``$AICHATONLINE_CACHE`` (a reply cache file: a prompt answered
before is replayed from it, nothing sent). Failures are :class:`llm.ModelError` with this library's message.

The async model runs the same blocking stream off the event loop: the chat and each read of it
in a worker thread (``asyncio.to_thread``), so the loop is never blocked. Both models report the
token usage (``llm -u``, and ``llm logs``) when the ``tokens`` extra is installed.

This module imports ``llm``: only ``llm`` loads it (``import aichatonline_sync`` never does).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from typing import Any, Callable, Optional

import llm

from .. import ChatStream, chat
from .._client.env import session_options_from_env
from .._wire.errors import AiChatOnlineError
from .._wire.protocol import DEFAULT_MODEL

__all__ = [
    "MODEL_ID", "AiChatOnlineAsyncModel", "AiChatOnlineModel", "prompt_messages", "register_models"
]

#: The model id ``llm -m`` takes.
MODEL_ID = "aichatonline"


def _text_of(message: Any) -> str:
    """The text parts of an ``llm`` message (reasoning, tool calls and attachments left out)."""
    from llm.parts import TextPart

    return "".join(part.text for part in message.parts if isinstance(part, TextPart))


def prompt_messages(prompt: llm.Prompt, conversation: Optional[llm.Conversation]) -> list[dict[str, str]]:
    """The whole conversation up to ``prompt``, as ``{"role", "content"}`` dicts.

    ``llm`` 0.32 and later hand the whole chain over as ``prompt.messages``; before that, a model
    rebuilt it from ``conversation.responses`` (as ``llm``'s own OpenAI plugin did).
    """
    chain = getattr(prompt, "messages", None)
    if chain is not None:
        return [{"role": str(message.role), "content": _text_of(message)} for message in chain]
    messages: list[dict[str, str]] = []
    system: Optional[str] = None
    for earlier in conversation.responses if conversation is not None else ():
        if earlier.prompt.system and earlier.prompt.system != system:
            system = earlier.prompt.system
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": earlier.prompt.prompt})
        messages.append({"role": "assistant", "content": earlier.text_or_raise()})
    if prompt.system and prompt.system != system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.prompt})
    return messages


class AiChatOnlineModel(llm.Model):  # type: ignore[misc,unused-ignore]  # (Any where llm is not installed)
    """The AiChatOnline service (gpt-4o-mini) as an ``llm`` model."""

    model_id = MODEL_ID
    can_stream = True

    def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.Response,
        conversation: Optional[llm.Conversation],
    ) -> Iterator[str]:
        messages = _checked_messages(prompt, conversation)
        try:
            with chat(messages, model=DEFAULT_MODEL, **session_options_from_env()) as reply:
                yield from reply
            _record(response, reply)
        except AiChatOnlineError as exc:
            raise llm.ModelError(str(exc)) from exc

    def __str__(self) -> str:
        return f"AiChatOnline: {self.model_id} ({DEFAULT_MODEL})"


class AiChatOnlineAsyncModel(llm.AsyncModel):  # type: ignore[misc,unused-ignore]
    """The same model for ``llm --async`` and llm's async Python API."""

    model_id = MODEL_ID
    can_stream = True

    async def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.AsyncResponse,
        conversation: Optional[llm.AsyncConversation],
    ) -> AsyncGenerator[str, None]:
        messages = _checked_messages(prompt, conversation)
        reply: Optional[ChatStream] = None
        try:
            reply = await asyncio.to_thread(
                chat, messages, model=DEFAULT_MODEL, **session_options_from_env()
            )
            while True:
                piece = await asyncio.to_thread(next, reply, None)
                if piece is None:
                    break
                yield piece
            await asyncio.to_thread(_record, response, reply)  # counting may load the tokenizer
        except AiChatOnlineError as exc:
            raise llm.ModelError(str(exc)) from exc
        finally:
            if reply is not None:
                reply.close()  # a cancelled task: from this thread, it aborts the read in flight

    def __str__(self) -> str:
        return f"AiChatOnline: {self.model_id} ({DEFAULT_MODEL})"


def _checked_messages(prompt: llm.Prompt, conversation: Any) -> list[dict[str, str]]:
    if not (prompt.prompt or "").strip():  # llm 0.32+ then hands over no message at all
        raise llm.ModelError("the prompt is empty (or only white space)")
    return prompt_messages(prompt, conversation)


def _record(response: Any, reply: ChatStream) -> None:
    """What ``llm`` logs of a reply read to its end: its model and id, and its token usage."""
    response.response_json = {"model": reply.model, "conversation_id": reply.conversation_id}
    usage = reply.usage
    if usage is not None:
        response.set_usage(input=usage.prompt_tokens, output=usage.completion_tokens)


@llm.hookimpl  # type: ignore[misc,untyped-decorator,unused-ignore]
def register_models(register: Callable[..., None]) -> None:
    """``llm``'s hook: register the model ``aichatonline``, blocking and async."""
    register(AiChatOnlineModel(), AiChatOnlineAsyncModel())
