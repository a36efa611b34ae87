"""Token counting (``aichatonline_sync._client.usage``): counts against an independent o200k_base
reference on thousands of varied strings, truncation to a token budget, and the behaviour without
the ``tokens`` extra (in a subprocess where bpe-openai cannot be imported)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import _tokentext
import pytest

from aichatonline_sync import InvalidRequestError
from aichatonline_sync._client.usage import (
    Usage,
    count_tokens,
    encoding_for_model,
    tokens_available,
    truncate_to_tokens,
)

pytest.importorskip("bpe_openai", reason="bpe-openai is not installed (pip install -e '.[tokens]')")
pytest.importorskip("tiktoken", reason="tiktoken is not installed (the test extra has it)")


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    return _tokentext.tiktoken_o200k()


def test_counts_equal_tiktokens_on_3000_varied_strings(reference) -> None:  # type: ignore[no-untyped-def]
    texts = _tokentext.varied_texts(3000)
    scripts = {"emoji": "😀", "cjk": "你", "code": "def ", "newline": "\n"}
    assert all(any(mark in t for t in texts) for mark in scripts.values())
    mismatches = [
        (t, count_tokens(t), len(reference.encode_ordinary(t)))
        for t in texts
        if count_tokens(t) != len(reference.encode_ordinary(t))
    ]
    assert mismatches == []
    assert sum(count_tokens(t) or 0 for t in texts) > 100_000


def test_known_counts() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello world") == 2
    assert count_tokens("<|endoftext|>") == len(_tokentext.tiktoken_o200k().encode_ordinary("<|endoftext|>"))
    assert count_tokens("Hi", "gpt-4o-mini-2024-07-18") == 1


def test_a_text_of_more_than_a_million_characters_counts() -> None:
    text = "hello world 😀 你好 " * 70_000
    assert len(text) > 1_000_000
    assert count_tokens(text) == 5 * 70_000 + 1


def test_a_lone_surrogate_counts_as_a_replacement_character() -> None:
    assert count_tokens("a\ud800b") == count_tokens("a\ufffdb")


def test_truncate_gives_the_longest_prefix_within_the_budget(reference) -> None:  # type: ignore[no-untyped-def]
    for i, text in enumerate(_tokentext.varied_texts(300, seed=7)):
        total = len(reference.encode_ordinary(text))
        for limit in {0, 1, total // 2, max(total - 1, 0), total, total + 3}:
            prefix = truncate_to_tokens(text, limit)
            assert text.startswith(prefix)
            assert len(reference.encode_ordinary(prefix)) <= limit, (i, limit)
            if prefix != text:
                longer = text[: len(prefix) + 1]
                assert len(reference.encode_ordinary(longer)) > limit, (i, limit)
            else:
                assert total <= limit


def test_truncate_examples() -> None:
    assert truncate_to_tokens("Hello, world!", 2) == "Hello,"
    assert truncate_to_tokens("Hello, world!", 0) == ""
    assert truncate_to_tokens("Hello", 10) == "Hello"
    assert truncate_to_tokens("", 0) == ""


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_truncate_refuses_a_bad_budget(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        truncate_to_tokens("text", bad)  # type: ignore[arg-type]


def test_unknown_models_and_non_text_are_refused() -> None:
    assert encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_for_model("gpt-4o-mini-2024-07-18") == "o200k_base"
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        count_tokens("x", model="gpt-2")
    with pytest.raises(InvalidRequestError, match="str"):
        count_tokens(b"x")  # type: ignore[arg-type]


def test_usage_is_a_validated_frozen_value() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    assert usage == Usage(3, 5, 8)
    assert hash(usage) == hash(Usage(3, 5, 8))
    with pytest.raises(AttributeError):
        usage.total_tokens = 9  # type: ignore[misc]
    with pytest.raises(InvalidRequestError):
        Usage(3, 5, 9)
    with pytest.raises(InvalidRequestError):
        Usage(-1, 1, 0)


def test_the_tokenizer_loads_once_across_threads() -> None:
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda: results.append(count_tokens("abc def"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 8
    assert tokens_available()


WITHOUT_EXTRA = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "bpe_openai" or name.startswith("bpe_openai."):
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
from aichatonline_sync._client.usage import count_tokens, tokens_available, truncate_to_tokens
assert tokens_available() is False
assert count_tokens("Hello world") is None
assert truncate_to_tokens("Hello world", 1) == "Hello world"
assert "bpe_openai" not in sys.modules
print("ok")
"""


def test_without_the_tokens_extra_nothing_is_counted() -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_of_the_package_imports_no_tokenizer() -> None:
    code = "import sys, aichatonline_sync; print(sorted(m for m in sys.modules if m.startswith(('bpe_openai', 'tiktoken', 'opentelemetry'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "[]", out.stderr


def test_truncation_finds_the_longest_prefix_past_the_dips_of_merged_tokens() -> None:
    pytest.importorskip("bpe_openai")
    from aichatonline_sync._client.usage import count_tokens, truncate_to_tokens

    rng = random.Random(7)
    words = ["international", "emulator", "the", "interna", "tion", "😀", "中文字", "code()", "  "]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        limit = rng.randint(0, 20)
        longest = max(j for j in range(len(text) + 1) if count_tokens(text[:j]) <= limit)
        assert truncate_to_tokens(text, limit) == text[:longest]
    assert truncate_to_tokens("Hello, world!", 3) == "Hello, world"
