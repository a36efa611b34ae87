"""Reply cache benchmark: ``python benchmarks/cache_bench.py [--chats 200] [--pieces 50 1000]``.

One warm :class:`Session` (its token kept, its connection pooled) against the emulator, which runs
in its own process (so it never takes this process's GIL) and streams each reply with no delay:
what is measured is the client's cost, not the service's. Three ways, side by side, for each reply
size:

* **no cache**: ``Session(url)``, a new prompt each chat;
* **cache miss**: ``Session(url, cache=path)``, a new prompt each chat (a lookup that misses, the
  request, and the reply stored at its end);
* **cache hit**: the same session, prompts answered before (one lookup, nothing sent).

Columns: the time from ``session.chat()`` to the first piece (median and 90th percentile), the
time of the whole chat read to its end, and the CPU time of this process per chat. The ways take
turns in rounds, so a stall of the machine hits them alike. Not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _serve(conn: Any, pieces: int) -> None:
    from aichatonline_sync.testing import Emulator

    with Emulator(reply=[f"word{i} " for i in range(pieces)], record=False) as emu:
        conn.send(emu.url)
        conn.recv()  # until told to stop


def _chat(session: Any, prompt: str) -> tuple[float, float, float]:
    """``(time to the first piece, time of the whole chat, CPU time)`` of one chat."""
    cpu = time.process_time()
    start = time.perf_counter()
    with session.chat(prompt) as stream:
        it = iter(stream)
        next(it)
        first = time.perf_counter() - start
        for _ in it:
            pass
    return first, time.perf_counter() - start, time.process_time() - cpu


def _measure(pieces: int, chats: int, rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    from aichatonline_sync import Session

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(child, pieces), daemon=True)
    server.start()
    url = parent.recv()
    folder = tempfile.mkdtemp(prefix="cache-bench-")
    results: dict[str, list[tuple[float, float, float]]] = {
        "no cache": [],
        "cache miss": [],
        "cache hit": [],
    }
    try:
        with Session(url) as plain, Session(url, cache=os.path.join(folder, "c.sqlite")) as cached:
            for s in (plain, cached):  # warm: a token and a pooled connection
                s.complete("warm-up")
            hits = [f"hit {n}" for n in range(chats)]
            for prompt in hits:
                cached.complete(prompt)
            ways: dict[str, Callable[[int, int], tuple[float, float, float]]] = {
                "no cache": lambda r, n: _chat(plain, f"plain {r} {n}"),
                "cache miss": lambda r, n: _chat(cached, f"miss {r} {n}"),
                "cache hit": lambda r, n: _chat(cached, hits[n]),
            }
            per_round = chats // rounds
            for r in range(rounds):
                for name, run in ways.items():
                    for n in range(r * per_round, (r + 1) * per_round):
                        results[name].append(run(r, n))
    finally:
        parent.send("stop")
        server.join(timeout=10)
    return results


def _row(name: str, samples: list[tuple[float, float, float]]) -> str:
    firsts = sorted(s[0] for s in samples)
    whole = statistics.median(s[1] for s in samples)
    cpu = statistics.mean(s[2] for s in samples)
    p90 = firsts[int(0.9 * (len(firsts) - 1))]
    return (
        f"| {name} | {statistics.median(firsts) * 1e6:,.0f} | {p90 * 1e6:,.0f} "
        f"| {whole * 1e6:,.0f} | {cpu * 1e6:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200, help="chats per way and size")
    parser.add_argument("--rounds", type=int, default=5, help="turns the ways take")
    parser.add_argument("--pieces", type=int, nargs="+", default=[50, 1000])
    args = parser.parse_args()
    import aichatonline_sync

    print(
        f"Python {sys.version.split()[0]}, aichatonline_sync {aichatonline_sync.__version__}, "
        f"{os.cpu_count()} CPUs, {args.chats} chats per way, in {args.rounds} rounds"
    )
    for pieces in args.pieces:
        results = _measure(pieces, args.chats, args.rounds)
        print(f"\n### {pieces} pieces per reply (microseconds)\n")
        print("| way | first piece, median | first piece, p90 | whole chat, median | CPU per chat |")
        print("|---|---|---|---|---|")
        for name, samples in results.items():
            print(_row(name, samples))


if __name__ == "__main__":
    main()
