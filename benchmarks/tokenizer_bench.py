"""Compares the offline o200k_base tokenizers for ``ChatStream.usage``, side by side in one run.

Candidates: bpe-openai's Rust tokenizer (through its shipped bindings, as ``_usage.py`` uses it,
and through its tiktoken-compatible ``get_encoding``), and tiktoken fed the ``o200k_base`` ranks
file that bpe-openai ships (tiktoken itself would download it on first use), checked against
tiktoken's pinned SHA-256 of that file. Each load runs in a fresh process; counting runs over the
same generated strings (``tests/_tokentext.py``) for every candidate, and every count is compared
with tiktoken's::

    python benchmarks/tokenizer_bench.py [--strings 3000]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

LOADERS = {
    "bpe-openai, bindings": (
        "from bpe_openai import _bindings as b\n"
        "t = b.tokenizer_for_encoding('o200k_base')\n"
        "count = t.count\n"
    ),
    "bpe-openai, get_encoding": (
        "import bpe_openai\n"
        "e = bpe_openai.get_encoding('o200k_base')\n"
        "count = lambda s: len(e.encode_ordinary(s))\n"
    ),
    "tiktoken + shipped file": (
        "import _tokentext\n"
        "e = _tokentext.tiktoken_o200k()\n"
        "count = lambda s: len(e.encode_ordinary(s))\n"
    ),
}

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
t0 = time.perf_counter()
{loader}
count('warm up')
load = time.perf_counter() - t0
import _tokentext
texts = _tokentext.varied_texts({n})
t0 = time.perf_counter()
counts = [count(s) for s in texts]
took = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"load": load, "took": took, "counts": counts, "rss": rss}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strings", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tests = os.path.join(HERE, "..", "tests")
    results = {}
    for name, loader in LOADERS.items():
        runs = []
        for _ in range(args.rounds):
            code = CHILD.format(tests=tests, loader=loader, n=args.strings)
            out = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout
            runs.append(json.loads(out))
        results[name] = runs
    reference = results["tiktoken + shipped file"][0]["counts"]
    total = sum(reference)
    print(f"{args.strings} strings, {total} tokens (o200k_base); median of {args.rounds} fresh processes")
    print()
    print("| tokenizer | counts equal to tiktoken's | first load, s | µs per 1k tokens | peak RSS, MB |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        agree = sum(a == b for a, b in zip(runs[0]["counts"], reference))
        load = sorted(r["load"] for r in runs)[len(runs) // 2]
        took = sorted(r["took"] for r in runs)[len(runs) // 2]
        rss = sorted(r["rss"] for r in runs)[len(runs) // 2]
        print(
            f"| {name} | {agree}/{len(reference)} | {load:.3f} | "
            f"{took / total * 1e3 * 1e6:.0f} | {rss:.0f} |"
        )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - t:.0f} s)")
