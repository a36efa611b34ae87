"""Benchmark servers, run in their own process so that they never share the client's GIL.

``python benchmarks/servers.py`` starts a control loop: it reads one JSON command per line on stdin
and answers one JSON line on stdout. The parent (``run.py``) drives it through :class:`ServerProcess`.

Two kinds of server speak the AiChatOnline protocol (token GET, chat POST, one JSON line per piece):

* ``lean``: a minimal threaded HTTP/1.1 server. A whole chat reply (head and body, every framing,
  optionally gzip) is built once when configured and sent with one ``sendall``, so the server costs
  next to nothing per reply. With ``delay`` > 0 it sends one line every ``delay`` seconds instead
  (on an absolute schedule) and stamps each line with ``time.perf_counter_ns()`` just before its
  ``sendall``; ``perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in every process, so the
  client can subtract those stamps from its own receive times (command ``stamps``).
* ``emulator``: the library's own :class:`aichatonline_sync.testing.Emulator`, to show how far the
  lean server is from it (``run.py``'s "server check" table).

Both listen on 127.0.0.1 only. Commands: ``configure`` (returns the port, the number of pieces and
characters of the reply), ``stats`` (connections accepted, token and chat requests since ``reset``),
``reset``, ``stamps`` (the send stamps of the last paced reply), ``quit``. ``request_delay`` makes the
lean server wait that long before answering each request (a simulated network round trip).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, Optional

TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"
HOST = "127.0.0.1"

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "over",
    "new",
    "sound",
    "take",
    "only",
    "little",
    "work",
    "know",
    "place",
    "year",
    "live",
    "me",
    "back",
    "give",
    "most",
    "very",
    "after",
    "thing",
    "our",
    "just",
    "name",
    "good",
    "sentence",
    "man",
    "think",
    "say",
    "great",
    "where",
    "help",
    "through",
    "much",
    "before",
    "line",
    "right",
    "too",
    "mean",
    "old",
    "any",
    "same",
    "tell",
    "boy",
    "follow",
    "came",
    "want",
    "show",
    "also",
    "around",
    "form",
    "three",
    "small",
    "set",
    "put",
    "end",
    "does",
    "another",
    "well",
    "large",
    "must",
    "big",
    "even",
    "such",
    "because",
    "turn",
    "here",
    "why",
    "ask",
    "went",
    "men",
    "read",
    "need",
    "land",
    "different",
    "home",
    "us",
    "move",
    "try",
    "kind",
    "hand",
    "picture",
    "again",
    "change",
    "off",
    "play",
    "spell",
    "air",
    "away",
    "animal",
    "house",
    "point",
    "page",
    "letter",
    "mother",
    "answer",
    "found",
    "study",
    "still",
    "learn",
    "should",
    "America",
    "world",
    "Zürich",
    "naïve",
    "café",
    "déjà",
    "vu",
]


# --- reply content ------------------------------------------------------------------------------


def make_pieces(spec: dict[str, Any]) -> list[str]:
    """The reply pieces for a spec (deterministic).

    ``{"kind": "words", "n": N}``: N word pieces (a word and a space, 2 to 12 characters, a few
    non-ASCII). ``{"kind": "sized", "chars": C, "size": S}``: C characters of random words cut into
    pieces of S characters (ASCII only, so characters == UTF-8 bytes).
    """
    rng = random.Random(spec.get("seed", 1))
    if spec["kind"] == "words":
        words = _WORDS
        return [rng.choice(words) + " " for _ in range(int(spec["n"]))]
    if spec["kind"] == "sized":
        chars, size = int(spec["chars"]), int(spec["size"])
        ascii_words = [w for w in _WORDS if w.isascii()]
        block = " ".join(rng.choices(ascii_words, k=4096)) + " "
        reps = chars // len(block) + 1
        # Vary the blocks a little so that gzip sees text, not one repeated block.
        text = "".join(block[i % 97 :] + block[: i % 97] for i in range(reps))[:chars]
        return [text[i : i + size] for i in range(0, chars, size)]
    raise ValueError(f"unknown reply kind {spec['kind']!r}")


_LINE_HEAD = b'{"code": 200, "msg": "success", "data": {"message": '


def piece_line(piece: str) -> bytes:
    """One reply line, byte for byte what the emulator sends."""
    return _LINE_HEAD + json.dumps(piece, ensure_ascii=False).encode() + b"}}\n"


def _segments(lines: list[bytes], gzip: bool) -> list[bytes]:
    if not gzip:
        return lines
    comp = zlib.compressobj(wbits=31)
    out = [comp.compress(line) + comp.flush(zlib.Z_SYNC_FLUSH) for line in lines]
    tail = comp.flush()
    if out:
        out[-1] += tail
    else:
        out = [tail]
    return out


def _head(framing: str, gzip: bool, length: int, keep_alive: bool) -> bytes:
    head = [
        "HTTP/1.1 200 OK",
        "Server: bench-lean",
        "Content-Type: text/event-stream;charset=UTF-8",
        "Cache-Control: no-cache",
    ]
    if gzip:
        head.append("Content-Encoding: gzip")
    if framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    elif framing == "length":
        head.append(f"Content-Length: {length}")
    head.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


class Reply:
    """A chat reply prepared for one framing: the head, and the body as framed pieces."""

    def __init__(self, pieces: list[str], framing: str, gzip: bool, delay: float) -> None:
        self.framing = framing
        self.gzip = gzip
        self.delay = delay
        self.pieces = len(pieces)
        self.chars = sum(len(p) for p in pieces)
        self.text_bytes = sum(len(p.encode()) for p in pieces)
        segments = _segments([piece_line(p) for p in pieces], gzip)
        if framing == "chunked":
            self.framed = [b"%x\r\n%s\r\n" % (len(s), s) for s in segments if s]
            self.terminator = b"0\r\n\r\n"
        else:
            self.framed = segments
            self.terminator = b""
        self.body_bytes = sum(len(s) for s in segments)
        self.keep_alive = framing != "close"
        self.head = _head(framing, gzip, self.body_bytes, self.keep_alive)
        # The whole response, for replies sent at once.
        self.whole: Optional[bytes] = None
        if delay <= 0:
            self.whole = self.head + b"".join(self.framed) + self.terminator
            self.framed = []


# --- the lean server ----------------------------------------------------------------------------


class RunQueueClock:
    """Nanoseconds the calling thread has spent runnable but not running (waiting for a CPU), from
    ``/proc/thread-self/schedstat``; always 0 where that file does not exist. About 1 µs a call."""

    def __init__(self) -> None:
        try:
            self.fd: Optional[int] = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def __call__(self) -> int:
        if self.fd is None:
            return 0
        return int(os.pread(self.fd, 100, 0).split()[1])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LeanServer:
    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.reply: Optional[Reply] = None
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "tokens": 0, "chats": 0}
        self.stamps: list[int] = []
        self.waits: list[int] = []
        self.request_delay = 0.0
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.stats["connections"] += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        close = True
        try:
            while True:
                line = rfile.readline(65537)
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    continue
                method, target, version = line.decode("latin-1").split()
                headers: dict[str, str] = {}
                for _ in range(200):
                    raw = rfile.readline(65537)
                    if raw in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = raw.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = b""
                if "content-length" in headers:
                    body = rfile.read(int(headers["content-length"]))
                keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
                path = target.split("?", 1)[0]
                if self.request_delay:
                    time.sleep(self.request_delay)  # a simulated network round trip
                if method == "GET" and path == TOKEN_PATH:
                    token = secrets.token_hex(16)
                    with self.lock:
                        self.stats["tokens"] += 1
                        self.tokens.add(token)
                    data = json.dumps({"code": 200, "msg": "success", "data": token}).encode()
                    self._simple(sock, 200, data, keep)
                elif method == "POST" and path == CHAT_PATH:
                    with self.lock:
                        self.stats["chats"] += 1
                        valid = headers.get("uniqueid", "") in self.tokens
                    reply = self.reply
                    if not valid or reply is None:
                        self._simple(
                            sock, 401, b'{"code": 401, "message": "invalid UniqueId"}', keep
                        )
                    else:
                        json.loads(body)  # a real server parses the body too
                        self._chat(sock, reply)
                        keep = keep and reply.keep_alive
                else:
                    self._simple(sock, 404, b'{"code": 404, "message": "no such path"}', keep)
                if not keep:
                    return
        except (OSError, ValueError):
            close = False
        finally:
            try:
                if close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            rfile.close()
            sock.close()

    @staticmethod
    def _simple(sock: socket.socket, status: int, body: bytes, keep: bool) -> None:
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode("latin-1")
        sock.sendall(head + body)

    def _chat(self, sock: socket.socket, reply: Reply) -> None:
        if reply.whole is not None:
            sock.sendall(reply.whole)
            return
        stamps: list[int] = []
        waits: list[int] = []
        self.stamps = stamps
        self.waits = waits
        framed, count = reply.framed, len(reply.framed)
        sendall, now_ns, sleep = sock.sendall, time.perf_counter_ns, time.sleep
        runqueue_wait = RunQueueClock()
        start = time.perf_counter()
        for index, line in enumerate(framed):
            chunk = reply.head + line if index == 0 else line
            if index == count - 1:
                chunk += reply.terminator
            if index:
                wait = start + index * reply.delay - time.perf_counter()
                if wait > 0:
                    sleep(wait)
            before = runqueue_wait()
            stamps.append(now_ns())
            sendall(chunk)
            # Time this thread spent runnable but not running, from the stamp to the send (about).
            waits.append(runqueue_wait() - before)
        runqueue_wait.close()

    def configure(self, reply: Reply) -> None:
        self.reply = reply

    def close(self) -> None:
        self.stopping = True
        self.listener.close()


# --- the control loop (in the server process) ---------------------------------------------------


def _serve_forever() -> None:
    lean = LeanServer()
    emulator: Any = None
    cache: dict[str, list[str]] = {}
    out = sys.stdout
    for raw in sys.stdin:
        cmd = json.loads(raw)
        op = cmd.pop("cmd")
        answer: dict[str, Any] = {}
        if op == "configure":
            key = json.dumps(cmd["reply"], sort_keys=True)
            if key not in cache:
                cache.clear()
                cache[key] = make_pieces(cmd["reply"])
            pieces = cache[key]
            reply = Reply(pieces, cmd["framing"], cmd.get("gzip", False), cmd.get("delay", 0.0))
            if emulator is not None:
                emulator.stop()
                emulator = None
            lean.configure(reply)
            lean.request_delay = float(cmd.get("request_delay", 0.0))
            port = lean.port
            extra: dict[str, Any] = {}
            if cmd.get("server", "lean") in ("emulator", "both"):
                from aichatonline_sync.testing import Emulator

                emulator = Emulator(
                    reply=pieces,
                    framing=cmd["framing"],
                    gzip=cmd.get("gzip", False),
                    chunk_delay=cmd.get("delay", 0.0),
                ).start()
                extra["emulator_port"] = emulator.port
                if cmd["server"] == "emulator":
                    port = emulator.port
            answer = {
                "port": port,
                "pieces": reply.pieces,
                "chars": reply.chars,
                "text_bytes": reply.text_bytes,
                "body_bytes": reply.body_bytes,
                "lean_port": lean.port,
                **extra,
            }
        elif op == "stats":
            if emulator is not None:
                answer = {
                    "connections": emulator.connections,
                    "tokens": emulator.tokens_issued,
                    "chats": len(emulator.chat_requests),
                }
            else:
                with lean.lock:
                    answer = dict(lean.stats)
        elif op == "reset":
            if emulator is not None:
                emulator.reset()
            with lean.lock:
                lean.stats = {"connections": 0, "tokens": 0, "chats": 0}
        elif op == "stamps":
            answer = {"stamps": list(lean.stamps), "waits": list(lean.waits)}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if op == "quit":
            break
    lean.close()
    if emulator is not None:
        emulator.stop()


class ServerProcess:
    """The parent's handle on a server process (``with ServerProcess() as srv: srv.call(...)``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.port = 0

    def call(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark server process died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def configure(self, **kwargs: Any) -> dict[str, Any]:
        answer = self.call("configure", **kwargs)
        self.port = answer["port"]
        return answer

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve_forever()
