"""Decompression bombs against the total deadline: ``python benchmarks/bombs.py [--lib DIR]``.

Each body is served by the library's emulator on 127.0.0.1 as one raw HTTP reply
(``Content-Encoding: gzip``) and read with ``Timeout(connect=2, read=2, total=3)`` and no
retries. The table shows what the chat raised, the wall time, and the CPU time of the reading
thread (``time.thread_time``). Not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from typing import Callable


def _bodies() -> list[tuple[str, Callable[[], bytes]]]:
    message = b'{"data": {"message": "Hi"}}\n'
    return [
        ("100 MiB of newlines", lambda: b"\n" * (100 << 20)),
        ("20 MiB of 'x\\n' lines", lambda: b"x\n" * (10 << 20)),
        ("20 MiB of '{\\n' lines", lambda: b"{\n" * (10 << 20)),
        ("a piece, then 100 MiB of newlines", lambda: message + b"\n" * (100 << 20)),
        ("5,000 chat lines (a real reply)", lambda: b"".join(
            b'{"data": {"message": "word %d "}}\n' % i for i in range(5000)
        )),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lib", help="import aichatonline_sync from this directory")
    args = parser.parse_args()
    if args.lib:
        sys.path.insert(0, os.path.abspath(args.lib))
    import aichatonline_sync as aco
    from aichatonline_sync.testing import Emulator

    print(f"aichatonline_sync from {os.path.dirname(aco.__file__)}")
    print(f"| {'body':<36} | {'gzip KiB':>8} | {'ratio':>6} | {'outcome':<22} | {'wall s':>6} | {'CPU s':>6} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 8}|{'-' * 24}|{'-' * 8}|{'-' * 8}|")
    timeout = aco.Timeout(connect=2, read=2, total=3)
    with Emulator() as emu:
        for name, make in _bodies():
            plain = make()
            body = gzip.compress(plain, 9)
            emu.raw_reply(
                "chat",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            )
            with aco.Session(emu.url, timeout=timeout, max_retries=0) as session:
                session.grab_token()
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    session.complete("hi")
                    outcome = "done"
                except aco.AiChatOnlineError as exc:
                    outcome = type(exc).__name__
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            ratio = len(plain) / len(body)
            print(
                f"| {name:<36} | {len(body) / 1024:8.1f} | {ratio:6.0f} | {outcome:<22} "
                f"| {wall:6.2f} | {cpu:6.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
