"""Emulator soak: ``python benchmarks/emulator_soak.py [--chats 10000] [--threads 4]``.

Does the emulator's memory stay flat when it runs for days (``aichatonline serve``)? Each variant
runs an emulator in its own process (``record=True`` with the default ring of
``DEFAULT_MAX_RECORDS``, ``record=False``, and ``max_records=None``, which keeps every record as
the emulator did before the ring), sends it ``--chats`` chats from this process (one
:class:`~aichatonline_sync.Session`, ``--threads`` threads, a fresh token every 100 chats so that
tokens pile up too), and reads the server process's resident memory (``VmRSS`` in
``/proc/PID/status``) after a warm-up of 500 chats and then at every tenth of the run. The table
shows the RSS at each checkpoint and the growth from the warm-up to the end.

Linux only (``/proc``). Not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

WARM_UP = 500


def _serve(conn: Any, options: dict[str, Any]) -> None:
    """Run an emulator with ``options`` until told to stop."""
    from aichatonline_sync.testing import Emulator

    emu = Emulator(reply="a short reply of a few words, as the soak needs", **options)
    emu.start()
    conn.send(emu.url)
    try:
        while conn.recv() != "stop":
            conn.send((emu.request_count, len(emu.requests), len(emu.issued_tokens)))
    finally:
        emu.stop()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _chats(session: Any, start: int, count: int, threads: int) -> None:
    def one(i: int) -> None:
        if i % 100 == 0:
            session.grab_token(refresh=True)  # a new token now and then: tokens pile up too
        text = session.complete(f"prompt {i}")
        if not text.startswith("a short reply"):
            raise RuntimeError(f"wrong reply: {text!r}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(start, start + count)))


def run(name: str, options: dict[str, Any], chats: int, threads: int) -> list[str]:
    import aichatonline_sync as aco

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(child, options), daemon=True)
    server.start()
    url = parent.recv()
    checkpoints: list[float] = []
    try:
        with aco.Session(url, max_retries=0, pool_maxsize=threads) as session:
            _chats(session, 0, WARM_UP, threads)
            checkpoints.append(_rss_mib(server.pid or 0))
            step = chats // 10
            for done in range(0, chats, step):
                _chats(session, WARM_UP + done, step, threads)
                checkpoints.append(_rss_mib(server.pid or 0))
        parent.send("stats")
        seen, records, tokens = parent.recv()
    finally:
        parent.send("stop")
        server.join(10)
    growth = checkpoints[-1] - checkpoints[0]
    shown = " ".join(f"{value:6.1f}" for value in checkpoints[::2])
    return [
        f"| {name} | {seen} | {records} | {tokens} | {shown} | {growth:+.1f} |",
    ]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("this benchmark reads /proc: Linux only")
    variants = [
        ("default ring", {}),
        ("record=False", {"record": False}),
        ("max_records=None (the old way)", {"max_records": None}),
    ]
    print(
        f"{args.chats} chats after a warm-up of {WARM_UP}, {args.threads} threads, "
        "a fresh token every 100 chats; the server's RSS in MiB at every fifth of the run\n"
    )
    print("| emulator | requests seen | records kept | tokens kept | RSS (MiB) | growth |")
    print("|---|---|---|---|---|---|")
    for name, options in variants:
        for row in run(name, options, args.chats, args.threads):
            print(row, flush=True)


if __name__ == "__main__":
    main()
