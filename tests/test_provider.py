"""The gpt4free-compatible ``AiChatOnline`` provider against the emulator."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest
import requests

from aichatonline_sync import AiChatOnline, APIStatusError, InvalidRequestError, TokenError
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
MESSAGES = [{"role": "user", "content": "Hi"}]
HEX32 = re.compile(r"[0-9a-f]{32}")


def provider_for(emu: Emulator) -> type[AiChatOnline]:
    class P(AiChatOnline):
        url = emu.url

    return P


def test_gpt4free_class_attributes() -> None:
    assert AiChatOnline.site_url == "https://aichatonline.org"
    assert AiChatOnline.url == "https://aichatonlineorg.erweima.ai"
    assert AiChatOnline.api_endpoint == "/aichatonline/api/chat/gpt"
    assert AiChatOnline.working is False
    assert AiChatOnline.default_model == "gpt-4o-mini"
    assert AiChatOnline.default_model in AiChatOnline.models
    assert AiChatOnline.supports_stream is True


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_create_completion_streams_pieces(emulator: MakeEmulator, framing: str) -> None:
    emu = emulator(reply=["Hel", "lo ", "wörld", "\u2028!"], framing=framing)
    provider = provider_for(emu)
    result = provider.create_completion("gpt-4o-mini", MESSAGES, timeout=10)
    assert list(result) == ["Hel", "lo ", "wörld", "\u2028!"]
    assert emu.chat_requests[0].prompt == "Hi"


def test_create_completion_without_stream_yields_one_str(emulator: MakeEmulator) -> None:
    emu = emulator(reply=["Hel", "lo ", "wörld"])
    provider = provider_for(emu)
    assert list(provider.create_completion("gpt-4o-mini", MESSAGES, stream=False)) == [
        "Hello wörld"
    ]


def test_create_completion_formats_the_prompt_like_gpt4free(emulator: MakeEmulator) -> None:
    emu = emulator()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "How"}, {"type": "text", "text": " are you?"}],
        },
    ]
    prompt = "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    text = "".join(provider_for(emu).create_completion("", messages))
    assert emu.chat_requests[0].prompt == prompt
    assert text == "".join(emu.pieces_for(prompt))


def test_each_call_fetches_a_fresh_token(emulator: MakeEmulator) -> None:
    emu = emulator(reply="a b c")
    provider = provider_for(emu)
    for expected in (1, 2, 3):
        assert "".join(provider.create_completion("gpt-4o-mini", MESSAGES)) == "a b c"
        assert emu.tokens_issued == expected
    assert [r.unique_id for r in emu.chat_requests] == emu.issued_tokens


def test_base_url_from_the_environment(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator(reply="from env")
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    assert list(AiChatOnline.create_completion("gpt-4o-mini", MESSAGES)) == ["from ", "env"]
    assert len(emu.chat_requests) == 1


def test_subclass_url_wins_over_the_environment(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = emulator(reply="subclass")
    unused = emulator(reply="environment")
    monkeypatch.setenv("AICHATONLINE_BASE_URL", unused.url)
    assert "".join(provider_for(used).create_completion("gpt-4o-mini", MESSAGES)) == "subclass"
    assert unused.requests == []


def test_unknown_gpt4free_kwargs_are_ignored(emulator: MakeEmulator) -> None:
    emu = emulator(reply="ok")
    pieces = provider_for(emu).create_completion(
        "gpt-4o-mini", MESSAGES, proxy=None, web_search=False, temperature=0.2, max_retries=0
    )
    assert list(pieces) == ["ok"]


def test_bad_messages_fail_at_once(emulator: MakeEmulator) -> None:
    emu = emulator()
    with pytest.raises(InvalidRequestError):
        provider_for(emu).create_completion("gpt-4o-mini", [{"role": "user", "content": "  "}])
    assert emu.requests == []


def test_grab_token_returns_the_emulator_token(emulator: MakeEmulator) -> None:
    emu = emulator()
    http = requests.Session()
    http.headers["X-Mine"] = "kept"
    try:
        token = provider_for(emu).grab_token(http)
    finally:
        http.close()
    assert HEX32.fullmatch(token)
    assert emu.issued_tokens == [token]
    request = emu.token_requests[0]
    assert request.header("X-Mine") == "kept"
    assert re.fullmatch(r"-[a-z0-9]{10}", request.query["canvas"])


def test_grab_token_errors_are_library_errors(emulator: MakeEmulator) -> None:
    emu = emulator()
    emu.token_reply({"code": 200, "data": None})
    with requests.Session() as http, pytest.raises(TokenError):
        provider_for(emu).grab_token(http)
    emu.fail("token", 404)
    with requests.Session() as http, pytest.raises(APIStatusError):
        provider_for(emu).grab_token(http)


def test_partial_iteration_then_close_does_not_hang(emulator: MakeEmulator) -> None:
    emu = emulator(reply=[f"p{i} " for i in range(100)])
    provider = provider_for(emu)
    gen: Any = provider.create_completion("gpt-4o-mini", MESSAGES, timeout=5)
    assert next(gen) == "p0 "
    gen.close()
    assert "".join(provider.create_completion("gpt-4o-mini", MESSAGES, timeout=5)) == "".join(
        f"p{i} " for i in range(100)
    )
