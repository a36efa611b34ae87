"""The public surface promised by API.md: names, the exception tree, packaging details."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest

import aichatonline_sync as aco

#: The names API.md requires to be importable from the top-level package (kept here, not parsed
#: from API.md, so the test runs anywhere).
REQUIRED = {
    "AiChatOnlineError",
    "InvalidRequestError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "AuthenticationError",
    "RateLimitError",
    "TokenError",
    "ProtocolError",
    "StreamError",
    "IncompleteStreamError",
    "UpstreamError",
    "BatchError",
    "BatchResult",
    "Session",
    "ChatStream",
    "Timeout",
    "RetryPolicy",
    "chat",
    "complete",
    "batch",
    "batch_iter",
    "AiChatOnline",
    "format_prompt",
    "get_random_string",
}

#: Public names added beyond API.md (it allows additions); listed so that none appears by accident.
EXTRA = {
    "Cancellation",
    "ChatEvent",
    "Conversation",
    "ReplyCache",
    "Usage",
    "close_shared_sessions",
    "display_stream",
}

#: Each exception and its parent in API.md's tree (``None``: the root).
TREE: dict[str, str | None] = {
    "AiChatOnlineError": None,
    "InvalidRequestError": "AiChatOnlineError",
    "APIConnectionError": "AiChatOnlineError",
    "APITimeoutError": "APIConnectionError",
    "APIStatusError": "AiChatOnlineError",
    "AuthenticationError": "APIStatusError",
    "RateLimitError": "APIStatusError",
    "TokenError": "AiChatOnlineError",
    "ProtocolError": "AiChatOnlineError",
    "StreamError": "AiChatOnlineError",
    "IncompleteStreamError": "StreamError",
    "UpstreamError": "StreamError",
    "BatchError": "AiChatOnlineError",
}


def ancestors(name: str) -> set[str]:
    chain = set()
    parent = TREE[name]
    while parent is not None:
        chain.add(parent)
        parent = TREE[parent]
    return chain


def test_all_is_sorted_and_unique() -> None:
    assert aco.__all__ == sorted(aco.__all__)
    assert len(aco.__all__) == len(set(aco.__all__))


def test_all_is_exactly_the_documented_names() -> None:
    assert set(aco.__all__) - {"__version__"} == REQUIRED | EXTRA


@pytest.mark.parametrize("name", sorted(REQUIRED | EXTRA))
def test_each_documented_name_is_exported_and_importable(name: str) -> None:
    assert name in aco.__all__
    assert getattr(aco, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from aichatonline_sync import {name}", namespace)
    assert namespace[name] is getattr(aco, name)


def test_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from aichatonline_sync import *", namespace)
    assert REQUIRED.issubset(namespace)


def test_version() -> None:
    assert isinstance(aco.__version__, str)
    assert aco.__version__[0].isdigit()
    assert aco.__version__.count(".") >= 1


def test_the_tree_covers_every_exception() -> None:
    exported = {
        name
        for name in aco.__all__
        if isinstance(getattr(aco, name), type) and issubclass(getattr(aco, name), BaseException)
    }
    assert exported == set(TREE)


@pytest.mark.parametrize("name", sorted(TREE))
def test_exception_hierarchy(name: str) -> None:
    cls = getattr(aco, name)
    assert issubclass(cls, Exception)
    assert issubclass(cls, aco.AiChatOnlineError)
    expected = ancestors(name)
    for other in TREE:
        if other == name:
            continue
        assert issubclass(cls, getattr(aco, other)) == (other in expected), other


def test_invalid_request_error_is_a_value_error() -> None:
    assert issubclass(aco.InvalidRequestError, ValueError)
    for name in TREE:
        if name != "InvalidRequestError":
            assert not issubclass(getattr(aco, name), ValueError), name


def test_batch_error_is_an_aichatonline_error() -> None:
    assert issubclass(aco.BatchError, aco.AiChatOnlineError)
    error = aco.BatchError("1 of 2 failed", results=["a", None], errors={1: aco.TokenError("x")})
    assert error.results == ["a", None]
    assert isinstance(error.errors[1], aco.TokenError)


def test_exception_attributes() -> None:
    status = aco.RateLimitError(
        "HTTP 429", status_code=429, body="slow down", url="http://h/x", retry_after=2.0
    )
    assert (status.status_code, status.body, status.url, status.retry_after) == (
        429,
        "slow down",
        "http://h/x",
        2.0,
    )
    upstream = aco.UpstreamError("error line", code=401, upstream_message="bad", partial="He")
    assert (upstream.code, upstream.message, upstream.partial) == (401, "bad", "He")
    assert aco.IncompleteStreamError("dropped", partial="Hel").partial == "Hel"


def test_testing_emulator_is_importable() -> None:
    testing = importlib.import_module("aichatonline_sync.testing")
    assert isinstance(testing.Emulator, type)


def test_py_typed_is_shipped() -> None:
    package_dir = Path(aco.__file__).parent
    assert (package_dir / "py.typed").is_file()


def test_package_logger_has_a_null_handler() -> None:
    logger = logging.getLogger("aichatonline_sync")
    assert any(isinstance(handler, logging.NullHandler) for handler in logger.handlers)


def test_gpt4free_provider_class_attributes() -> None:
    provider = aco.AiChatOnline
    assert provider.site_url == "https://aichatonline.org"
    assert provider.url == "https://aichatonlineorg.erweima.ai"
    assert provider.api_endpoint == "/aichatonline/api/chat/gpt"
    assert provider.working is False
    assert provider.default_model == "gpt-4o-mini"
    assert list(provider.models) == ["gpt-4o-mini"]
    assert provider.supports_stream is True


def test_gpt4free_provider_classmethods() -> None:
    for name in ("grab_token", "create_completion"):
        assert callable(getattr(aco.AiChatOnline, name))
        assert isinstance(aco.AiChatOnline.__dict__[name], classmethod), name
