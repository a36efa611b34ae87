"""Token usage, counted offline with the model's tokenizer.

gpt-4o-mini's tokenizer is ``o200k_base``. It comes from **bpe-openai** (the ``tokens`` extra):
its wheels carry the encoding, so counting never downloads anything (tiktoken fetches its
encoding files on first use, which fails on machines without internet), one ``abi3`` wheel
serves CPython 3.9 to 3.13, and it counts exactly what tiktoken counts, faster
(``benchmarks/tokenizer_bench.py``, ``benchmarks/RESULTS.md``). It is used through its
Rust tokenizer object (``bpe_openai._bindings``, typed in the ``.pyi`` stub the wheel ships),
because its tiktoken-like ``Encoding`` wrapper refuses texts of a million characters or more,
and only the object counts without building a list of ids or stops counting at a limit.

The tokenizer loads at its first use (a second or two, once per process), never at
``import aichatonline_sync``; until then nothing of bpe-openai is imported.

>>> from aichatonline_sync._client.usage import count_tokens, truncate_to_tokens
>>> count_tokens("Hello, world!")                       # doctest: +SKIP
4
>>> truncate_to_tokens("Hello, world!", 2)              # doctest: +SKIP
'Hello,'
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .._wire.errors import InvalidRequestError
from .config import check_int

if TYPE_CHECKING:
    from typing import Protocol

    class _Tokenizer(Protocol):
        def count(self, text: str) -> int: ...
        def count_till_limit(self, text: str, token_limit: int) -> Optional[int]: ...


__all__ = [
    "Usage", "count_tokens", "encoding_for_model", "tokens_available", "truncate_to_tokens",
    "usage_of",
]

DEFAULT_MODEL = "gpt-4o-mini"
# Dated snapshots of a model count with the model's encoding.
_ENCODINGS = ((re.compile(r"gpt-4o-mini(-\d{4}-\d{2}-\d{2})?"), "o200k_base"),)


@dataclass(frozen=True)
class Usage:
    """Token counts of one chat: the formatted prompt, the reply text, and their sum.

    >>> Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = getattr(self, name)
            check_int(f"Usage.{name}", value)
        if self.total_tokens != self.prompt_tokens + self.completion_tokens:
            raise InvalidRequestError(
                f"Usage.total_tokens must be prompt_tokens + completion_tokens "
                f"({self.prompt_tokens} + {self.completion_tokens}), got {self.total_tokens}"
            )


def encoding_for_model(model: str) -> str:
    """The name of ``model``'s encoding (``"o200k_base"`` for gpt-4o-mini and its dated names).

    :raises InvalidRequestError: for a model whose tokenizer is unknown here.
    """
    for pattern, encoding in _ENCODINGS:
        if isinstance(model, str) and pattern.fullmatch(model):
            return encoding
    raise InvalidRequestError(f"no tokenizer is known for model {model!r}; only {DEFAULT_MODEL!r}")


#: How far past the first prefix that does not fit a longer one is looked for, in characters.
_LOOK_AHEAD = 64

_lock = threading.Lock()
_tokenizers: dict[str, Optional[_Tokenizer]] = {}
_available: Optional[bool] = None


def tokens_available() -> bool:
    """Whether the ``tokens`` extra is installed (checked without importing it)."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("bpe_openai") is not None
        except (ImportError, ValueError):
            _available = False
    return _available


def _tokenizer(model: str) -> Optional[_Tokenizer]:
    encoding = encoding_for_model(model)
    try:
        return _tokenizers[encoding]
    except KeyError:
        pass
    with _lock:
        if encoding not in _tokenizers:
            loaded: Optional[_Tokenizer] = None
            if tokens_available():
                # Its loader reads the shipped file with importlib.resources.open_binary,
                # deprecated on Python 3.11-3.12: not the caller's concern.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    try:
                        bindings = importlib.import_module("bpe_openai._bindings")
                    except ImportError:
                        pass
                    else:
                        loaded = bindings.tokenizer_for_encoding(encoding)
            _tokenizers[encoding] = loaded
        return _tokenizers[encoding]


def _encodable(text: str) -> str:
    # A lone surrogate has no UTF-8 form; it counts as U+FFFD, as bpe-openai's own wrapper does.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidRequestError(f"text must be a str, got {type(text).__name__}")
    return text


def count_tokens(text: str, model: str = DEFAULT_MODEL) -> Optional[int]:
    """The number of tokens of ``text`` under ``model``'s tokenizer, or ``None`` without the
    ``tokens`` extra. Special-token text such as ``<|endoftext|>`` counts as ordinary text.

    :raises InvalidRequestError: ``text`` is not a str, or the model's tokenizer is unknown.
    """
    text = _check_text(text)
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return None
    return tokenizer.count(_encodable(text)) if text else 0


def truncate_to_tokens(text: str, max_tokens: int, model: str = DEFAULT_MODEL) -> str:
    """The longest prefix of ``text`` that counts at most ``max_tokens`` tokens: it fits, and
    one more character would not. ``text`` itself when it fits.

    Without the ``tokens`` extra, ``text`` is returned unchanged (nothing can be counted).

    :raises InvalidRequestError: ``max_tokens`` is not an int >= 0, ``text`` is not a str, or the
        model's tokenizer is unknown.
    """
    text = _check_text(text)
    check_int("max_tokens", max_tokens)
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return text

    def fits(length: int) -> bool:
        prefix = _encodable(text[:length])
        return length == 0 or tokenizer.count_till_limit(prefix, max_tokens) is not None

    if fits(len(text)):
        return text
    # Invariant: the prefix of ``low`` characters fits and the one of ``high`` does not.
    low, high = 0, len(text)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    # The count of a prefix is not monotonic: a character can complete a merge and lower it
    # ("interna" may count more than "international"), so a longer prefix past this boundary
    # may fit again; such dips span one word at most.
    for length in range(low + 1, min(len(text), low + _LOOK_AHEAD) + 1):
        if fits(length):
            low = length
    return text[:low]


def usage_of(prompt: str, completion: str, model: str = DEFAULT_MODEL) -> Optional[Usage]:
    """The :class:`Usage` of a chat that sent ``prompt`` (formatted) and got ``completion``, or
    ``None`` without the ``tokens`` extra."""
    prompt_tokens = count_tokens(prompt, model)
    completion_tokens = count_tokens(completion, model)
    if prompt_tokens is None or completion_tokens is None:
        return None
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
