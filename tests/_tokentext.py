# ruff: noqa: RUF001  (the text is meant to mix look-alike scripts)
"""Varied text for tokenizer checks, and an independent o200k_base reference.

The reference is tiktoken (OpenAI's own tokenizer, its BPE and its pattern) loaded with the
``o200k_base`` ranks file that bpe-openai ships, accepted only if it has the SHA-256 that
tiktoken itself pins for that file: so the data is OpenAI's, and the algorithm that applies it is
another project's than the one under test. tiktoken would download the file on first use; here it
finds it in a private cache directory instead, so nothing leaves the machine.
"""

import gzip
import hashlib
import os
import random
import tempfile
import threading
from importlib import resources
from typing import Any

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_lock = threading.Lock()
_reference: Any = None


def tiktoken_o200k() -> Any:
    """tiktoken's ``o200k_base`` Encoding, built offline (see the module docstring)."""
    global _reference
    with _lock:
        if _reference is not None:
            return _reference
        import tiktoken
        import tiktoken.load
        import tiktoken_ext.openai_public as public

        raw = resources.files("bpe_openai.data").joinpath("o200k_base.tiktoken.gz").read_bytes()
        data = gzip.decompress(raw)
        assert hashlib.sha256(data).hexdigest() == O200K_SHA256
        spec = public.o200k_base.__code__.co_consts
        assert O200K_URL in spec, "tiktoken loads o200k_base from elsewhere"
        assert O200K_SHA256 in spec, "tiktoken pins another o200k_base"
        cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
        with open(os.path.join(cache, hashlib.sha1(O200K_URL.encode()).hexdigest()), "wb") as f:
            f.write(data)
        before = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        try:
            _reference = tiktoken.Encoding(**public.o200k_base())
        finally:
            if before is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = before
        return _reference


_WORDS = [
    "the", "quick", "brown", "fox", "Hello", "HELLO", "hello", "world", "don't", "DON'T", "it's",
    "we'll", "they've", "I'm", "you'd", "naïve", "café", "résumé", "Straße", "coöperate",
]
_EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪", "🏳️‍🌈", "❤️", "🤖", "✨", "🧑🏿‍💻", "⌚", "🫠", "1️⃣",
]
_CJK = ["你好", "世界", "中文分词", "日本語のテキスト", "カタカナ", "한국어 문장", "漢字", "。", "，"]
_OTHER = ["Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया", "שלום", "Γειά σου", "ÅÄÖ", "e\u0301", "ﬁ"]
_CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM users WHERE id = 42;",
    '{"key": [1, 2.5, null, true], "s": "\\u00e9"}',
    "<div class=\"a\">&amp;</div>",
    "#!/usr/bin/env bash\nset -euo pipefail\n",
    "x = lambda *a, **k: (a, k)  # comment",
    "\tif err != nil {\n\t\treturn err\n\t}\n",
    "https://example.com/path?q=1&r=2#frag",
]
_SPACES = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "   \n ", "\u00a0", "\u3000"]
_SPECIAL = ["<|endoftext|>", "<|endofprompt|>", "<|im_start|>"]


def _random_codepoints(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 12)):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                         rng.randint(0x3000, 0x9FFF), rng.randint(0x1F300, 0x1FAFF),
                         rng.randint(0x10000, 0x10FFFF)])
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


def varied_texts(n: int, seed: int = 20) -> list[str]:
    """``n`` strings mixing ASCII, emoji, CJK, other scripts, code, digits and white space."""
    rng = random.Random(seed)
    kinds = [
        lambda: rng.choice(_WORDS),
        lambda: rng.choice(_EMOJI),
        lambda: rng.choice(_CJK),
        lambda: rng.choice(_OTHER),
        lambda: rng.choice(_CODE),
        lambda: rng.choice(_SPACES),
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
        lambda: rng.choice(".,;:!?'\"()[]{}-_/\\@#$%^&*+=~`|<>"),
        lambda: rng.choice(_SPECIAL),
        lambda: _random_codepoints(rng),
    ]
    texts = ["", " ", "a", "\n", "😀" * 50, "a" * 1000, " " * 300, "你" * 200]
    while len(texts) < n:
        parts = [rng.choice(kinds)() for _ in range(rng.randint(1, 40))]
        sep = rng.choice(["", " ", " ", "\n"])
        texts.append(sep.join(parts))
    return texts[:n]
