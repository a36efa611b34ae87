"""The fault matrix: every fault at every stage of a chat, over real sockets against the emulator.

Each row is one fault at one stage -- the token request (``token``), opening the chat before any
text (``open``), or after ``K`` pieces were handed out (``mid``) -- and the outcome it must have:
``Ok`` (recovered, with the number of attempts the emulator saw and the waits the retry policy
asked for) or ``Raises`` (the exact error type, with ``.partial`` equal to the text handed out).
A new fault is one line in ``ROWS``.

Every row runs in a worker thread with a bounded join: a client that hangs fails the row (the
emulator is stopped to unblock it) instead of hanging the suite.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import pytest

from aichatonline_sync import (
    AiChatOnlineError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    IncompleteStreamError,
    ProtocolError,
    RateLimitError,
    Session,
    StreamError,
    Timeout,
    TokenError,
    UpstreamError,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["Once ", "upon ", "a ", "tïme ", "日本 ", "there ", "was ", "a ", "stream."]
TEXT = "".join(PIECES)
K = 2  # pieces handed out before a mid-stream fault
HANDED = PIECES[:K]

QUICK = Timeout(connect=2, read=0.5)
#: The total deadline fires long before the read timeout: proves which one ended the chat.
DEADLINE = Timeout(connect=2, read=5, total=0.6)
SLOW_READ = Timeout(connect=2, read=5)
STALL = 10.0  # outlives every timeout above, yet ends: a client without timeouts fails, not hangs
LIMIT = 20.0  # a row still running after this is a hang
MAX_LINE = 4096
INITIAL, MAXIMUM = 0.01, 0.04  # backoff bounds of the policy (sleeps are recorded, not slept)
RETRIED = (408, 409, 425, 429, 500, 502, 503, 504)


# --- raw replies --------------------------------------------------------------------------------


def line(piece: str) -> bytes:
    return json.dumps({"code": 200, "msg": "success", "data": {"message": piece}}).encode() + b"\n"


def lines(pieces: list[str]) -> bytes:
    return b"".join(line(piece) for piece in pieces)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(*parts: bytes, end: bytes = b"0\r\n\r\n", headers: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    return head + headers + b"\r\n" + b"".join(chunk(part) for part in parts) + end


def lengthed(body: bytes, headers: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + headers + b"\r\n" + body


def gzipped(data: bytes) -> bytes:
    """``data`` as a gzip stream flushed (decodable so far) but not finished."""
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


TOKEN_JSON = b'{"code": 200, "msg": "success", "data": "0123456789abcdef"}'
GARBAGE = b"\x00\xff\xfeSSH-2.0-not-http \x1b[31m\r\n\r\n"
JUNK_LINES = b"\x00\xff junk {{\n<html><body>oops</body></html>\n[1, 2]\n\"str\"\n"
BLANK = b"\n" * 5000  # one chunk of blank lines; several are sent, then the server stalls
HUGE = "x" * 10_000  # a piece whose line is longer than MAX_LINE


def token_body(token: Any) -> dict[str, Any]:
    return {"code": 200, "msg": "success", "data": token}


# --- expected outcomes --------------------------------------------------------------------------

Sleeps = Union[int, tuple[float, ...]]  # how many backoff waits, or exactly these waits


@dataclass(frozen=True)
class Ok:
    """The chat returned the whole reply (after retries, if any)."""

    attempts: int = 2  # requests to the faulty endpoint
    sleeps: Sleeps = 1
    tokens: Optional[int] = None  # tokens issued by the chat; default 1 at stage token, else 0


@dataclass(frozen=True)
class Raises:
    """The chat raised exactly ``error``."""

    error: type[AiChatOnlineError]
    attempts: Optional[int] = 1  # None: nothing reached the emulator (it is stopped)
    sleeps: Sleeps = 0
    match: str = ""
    status: Optional[int] = None
    code: Optional[int] = None
    tokens: Optional[int] = None  # default 0


@dataclass(frozen=True)
class Row:
    stage: str  # "token", "open" or "mid"
    fault: str
    inject: Callable[[Emulator], object]
    expect: Union[Ok, Raises]
    timeout: Timeout = QUICK
    max_elapsed: float = 8.0

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.fault}"


def status_rows(stage: str) -> list[Row]:
    """The retried statuses: recovered (with and without Retry-After), and persisting."""
    where = "token" if stage == "token" else "chat"
    rows = []
    for status in RETRIED:
        error = RateLimitError if status == 429 else APIStatusError
        rows += [
            Row(stage, f"{status}", lambda e, s=status: e.fail(where, s), Ok()),
            Row(stage, f"{status}-retry-after", lambda e, s=status: e.fail(where, s, headers={"Retry-After": "1"}), Ok(sleeps=(1.0,))),
            Row(stage, f"{status}-persisting", lambda e, s=status: e.fail(where, s, times=3), Raises(error, 3, 2, status=status)),
        ]
    return [
        *rows,
        Row(stage, "503-retry-after-ms", lambda e: e.fail(where, 503, headers={"retry-after-ms": "150"}), Ok(sleeps=(0.15,))),
        Row(stage, "429-retry-after-too-long", lambda e: e.fail(where, 429, headers={"Retry-After": "120"}), Raises(RateLimitError, 1, 0, status=429)),
        Row(stage, "400", lambda e: e.fail(where, 400), Raises(APIStatusError, 1, 0, status=400)),
        Row(stage, "404", lambda e: e.fail(where, 404), Raises(APIStatusError, 1, 0, status=404)),
    ]


# One line per fault and stage.
ROWS: list[Row] = [
    # -- the token request ----------------------------------------------------------------------
    Row("token", "refused", lambda e: e.stop(), Raises(APIConnectionError, None, 2, match="connection refused")),
    Row("token", "reset", lambda e: e.drop("token"), Ok()),
    Row("token", "reset-persisting", lambda e: e.drop("token", times=3), Raises(APIConnectionError, 3, 2)),
    Row("token", "stall-past-read", lambda e: e.stall("token", seconds=STALL), Ok()),
    Row("token", "stall-past-read-persisting", lambda e: e.stall("token", seconds=STALL, times=3), Raises(APITimeoutError, 3, 2)),
    Row("token", "stall-past-deadline", lambda e: e.stall("token", seconds=STALL), Raises(APITimeoutError, 1, 0), DEADLINE, 3.0),
    *status_rows("token"),
    Row("token", "401", lambda e: e.fail("token", 401), Raises(AuthenticationError, 1, 0, status=401)),
    Row("token", "403", lambda e: e.fail("token", 403), Raises(AuthenticationError, 1, 0, status=403)),
    Row("token", "html", lambda e: e.html("token"), Raises(TokenError, 1, 0)),
    Row("token", "html-503", lambda e: e.html("token", status=503), Ok()),
    Row("token", "not-json", lambda e: e.token_reply("not json", content_type="text/plain"), Raises(TokenError, 1, 0)),
    Row("token", "data-null", lambda e: e.token_reply(token_body(None)), Raises(TokenError, 1, 0)),
    Row("token", "data-int", lambda e: e.token_reply(token_body(42)), Raises(TokenError, 1, 0)),
    Row("token", "data-list", lambda e: e.token_reply(token_body(["a", "b"])), Raises(TokenError, 1, 0)),
    Row("token", "json-list", lambda e: e.token_reply([1, 2]), Raises(TokenError, 1, 0)),
    Row("token", "error-body", lambda e: e.token_reply({"code": 500, "msg": "busy", "data": None}), Raises(TokenError, 1, 0)),
    Row("token", "hostile-crlf", lambda e: e.token_reply(token_body("tok\r\nX-Injected: 1")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-lf", lambda e: e.token_reply(token_body("tok\nHost: evil")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-nul", lambda e: e.token_reply(token_body("tok\x00en")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-del", lambda e: e.token_reply(token_body("tok\x7f")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-esc", lambda e: e.token_reply(token_body("\x1b[2Jtok")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-tab", lambda e: e.token_reply(token_body("tok\ten")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-space", lambda e: e.token_reply(token_body("tok en")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-non-ascii", lambda e: e.token_reply(token_body("tök")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-empty", lambda e: e.token_reply(token_body("")), Raises(TokenError, 1, 0)),
    Row("token", "hostile-too-long", lambda e: e.token_reply(token_body("f" * 257)), Raises(TokenError, 1, 0)),
    Row("token", "endless-body", lambda e: e.token_reply('{"data": "' + "x" * 100_000 + '"}'), Raises(TokenError, 1, 0)),
    Row("token", "garbage", lambda e: e.raw_reply("token", GARBAGE), Ok()),
    Row("token", "garbage-persisting", lambda e: e.raw_reply("token", GARBAGE, times=3), Raises(APIConnectionError, 3, 2)),
    Row("token", "gzip-claimed-plain-body", lambda e: e.raw_reply("token", lengthed(TOKEN_JSON, b"Content-Encoding: gzip\r\n")), Raises(TokenError, 1, 0)),
    Row("token", "br-claimed", lambda e: e.raw_reply("token", lengthed(TOKEN_JSON, b"Content-Encoding: br\r\n")), Raises(TokenError, 1, 0)),
    # -- opening the chat, before any text ------------------------------------------------------
    Row("open", "refused", lambda e: e.stop(), Raises(APIConnectionError, None, 2, match="connection refused")),
    Row("open", "reset", lambda e: e.drop("chat"), Ok()),
    Row("open", "reset-persisting", lambda e: e.drop("chat", times=3), Raises(APIConnectionError, 3, 2)),
    Row("open", "stall-past-read", lambda e: e.stall("chat", seconds=STALL), Ok()),
    Row("open", "stall-past-read-persisting", lambda e: e.stall("chat", seconds=STALL, times=3), Raises(APITimeoutError, 3, 2)),
    Row("open", "stall-past-deadline", lambda e: e.stall("chat", seconds=STALL), Raises(APITimeoutError, 1, 0), DEADLINE, 3.0),
    *status_rows("open"),
    Row("open", "401", lambda e: e.fail("chat", 401), Ok(2, 0, tokens=1)),
    Row("open", "403", lambda e: e.fail("chat", 403), Ok(2, 0, tokens=1)),
    Row("open", "401-persisting", lambda e: e.fail("chat", 401, times=2), Raises(AuthenticationError, 2, 0, status=401, tokens=1)),
    Row("open", "403-persisting", lambda e: e.fail("chat", 403, times=2), Raises(AuthenticationError, 2, 0, status=403, tokens=1)),
    Row("open", "html", lambda e: e.html("chat"), Raises(ProtocolError, 1, 0, match="HTML")),
    Row("open", "html-503", lambda e: e.html("chat", status=503), Ok()),
    Row("open", "error-line-503", lambda e: e.error_line(503, "busy"), Ok()),
    Row("open", "error-line-503-persisting", lambda e: e.error_line(503, "busy", times=3), Raises(UpstreamError, 3, 2, code=503)),
    Row("open", "error-line-400", lambda e: e.error_line(400, "bad prompt"), Raises(UpstreamError, 1, 0, code=400)),
    Row("open", "error-line-401", lambda e: e.error_line(401, "invalid UniqueId"), Ok(2, 0, tokens=1)),
    Row("open", "error-line-401-persisting", lambda e: e.error_line(401, "invalid UniqueId", times=2), Raises(UpstreamError, 2, 0, code=401, tokens=1)),
    Row("open", "endless-line", lambda e: e.set_reply([HUGE, *PIECES]), Raises(ProtocolError, 1, 0, match=f"longer than {MAX_LINE}")),
    Row("open", "endless-line-no-newline", lambda e: e.raw_reply("chat", chunked(HUGE.encode(), end=b""), close=False), Raises(ProtocolError, 1, 0, match=f"longer than {MAX_LINE}"), SLOW_READ, 3.0),
    Row("open", "garbage", lambda e: e.raw_reply("chat", GARBAGE), Ok()),
    Row("open", "garbage-persisting", lambda e: e.raw_reply("chat", GARBAGE, times=3), Raises(APIConnectionError, 3, 2)),
    Row("open", "junk-body", lambda e: e.raw_reply("chat", chunked(JUNK_LINES)), Raises(ProtocolError, 1, 0, match="not a chat stream")),
    Row("open", "bad-chunk-size", lambda e: e.raw_reply("chat", chunked(end=b"zz\r\nabc\r\n0\r\n\r\n")), Raises(ProtocolError, 1, 0)),
    Row("open", "gzip-claimed-plain-body", lambda e: e.raw_reply("chat", lengthed(lines(PIECES), b"Content-Encoding: gzip\r\n")), Raises(ProtocolError, 1, 0, match="gzip")),
    Row("open", "br-claimed", lambda e: e.raw_reply("chat", lengthed(lines(PIECES), b"Content-Encoding: br\r\n")), Raises(ProtocolError, 1, 0, match="br")),
    Row("open", "blank-lines-then-stall", lambda e: e.raw_reply("chat", chunked(BLANK, BLANK, BLANK, end=b""), close=False, times=3), Raises(APITimeoutError, 3, 2)),
    Row("open", "blank-lines-past-deadline", lambda e: e.raw_reply("chat", chunked(BLANK, BLANK, BLANK, end=b""), close=False), Raises(APITimeoutError, 1, 0), DEADLINE, 3.0),
    # -- mid-stream, after K pieces -------------------------------------------------------------
    Row("mid", "dropped", lambda e: e.drop("chat", after=K), Raises(IncompleteStreamError)),
    Row("mid", "stall-past-read", lambda e: e.stall("chat", after=K, seconds=STALL), Raises(IncompleteStreamError, match="read timeout")),
    Row("mid", "stall-past-deadline", lambda e: e.stall("chat", after=K, seconds=STALL), Raises(IncompleteStreamError, match="deadline"), DEADLINE, 3.0),
    Row("mid", "error-line-503", lambda e: e.error_line(503, "busy", after=K), Raises(UpstreamError, code=503)),
    Row("mid", "error-line-401", lambda e: e.error_line(401, "invalid UniqueId", after=K), Raises(UpstreamError, code=401)),
    # After text was handed out, every failure is a StreamError with .partial (issue 11).
    Row("mid", "endless-line", lambda e: e.set_reply([*HANDED, HUGE, *PIECES[K:]]), Raises(IncompleteStreamError, match=f"longer than {MAX_LINE}")),
    Row("mid", "junk-lines-are-skipped", lambda e: e.raw_reply("chat", chunked(lines(HANDED), JUNK_LINES, lines(PIECES[K:]))), Ok(1, 0)),
    Row("mid", "bad-chunk-size", lambda e: e.raw_reply("chat", chunked(lines(HANDED), end=b"zz\r\nabc\r\n0\r\n\r\n")), Raises(IncompleteStreamError, match="chunk")),
    Row("mid", "gzip-turns-to-junk", lambda e: e.raw_reply("chat", chunked(gzipped(lines(HANDED)), b"\xff\xfe junk", headers=b"Content-Encoding: gzip\r\n")), Raises(IncompleteStreamError, match="gzip")),
    Row("mid", "blank-lines-then-stall", lambda e: e.raw_reply("chat", chunked(lines(HANDED), BLANK, BLANK, end=b""), close=False), Raises(IncompleteStreamError, match="read timeout")),
    Row("mid", "blank-lines-past-deadline", lambda e: e.raw_reply("chat", chunked(lines(HANDED), BLANK, BLANK, end=b""), close=False), Raises(IncompleteStreamError, match="deadline"), DEADLINE, 3.0),
]  # fmt: skip


# --- the runner ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    got: list[str]
    error: Optional[BaseException] = None
    opened: bool = False  # chat() returned a stream (the error, if any, came while iterating)
    elapsed: float = 0.0


def run_bounded(emu: Emulator, session: Session, timeout: Timeout) -> Outcome:
    outcome = Outcome(got=[])

    def work() -> None:
        started = time.monotonic()
        try:
            stream = session.chat("hi", timeout=timeout)
            outcome.opened = True
            for piece in stream:
                outcome.got.append(piece)
        except BaseException as exc:
            outcome.error = exc
        finally:
            outcome.elapsed = time.monotonic() - started

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(LIMIT)
    if worker.is_alive():
        emu.stop()  # resets every connection: unblocks the client
        worker.join(5)
        pytest.fail(f"the chat still ran after {LIMIT} s: a hang")
    return outcome


def check_sleeps(sleeps: list[float], expected: Sleeps) -> None:
    if isinstance(expected, tuple):
        assert tuple(sleeps) == expected
    else:
        assert len(sleeps) == expected, sleeps
        assert all(INITIAL <= s <= MAXIMUM for s in sleeps), sleeps


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_fault(emulator: MakeEmulator, no_sleep: Any, row: Row) -> None:
    emu = emulator(reply=PIECES)
    policy = no_sleep.policy(2, initial_delay=INITIAL, max_delay=MAXIMUM)
    with Session(emu.url, timeout=QUICK, retry=policy, max_line_bytes=MAX_LINE) as session:
        if row.stage != "token":
            session.grab_token()
            emu.reset()  # count only what the chat does (the token stays valid)
        row.inject(emu)
        outcome = run_bounded(emu, session, row.timeout)

    expect = row.expect
    endpoint = emu.token_requests if row.stage == "token" else emu.chat_requests
    assert outcome.elapsed < row.max_elapsed
    if isinstance(expect, Ok):
        assert outcome.error is None, repr(outcome.error)
        assert outcome.got == PIECES
        assert len(endpoint) == expect.attempts
        tokens = expect.tokens if expect.tokens is not None else int(row.stage == "token")
        if row.stage == "token":
            assert len(emu.chat_requests) == 1
    else:
        error = outcome.error
        assert type(error) is expect.error, repr(error)
        assert isinstance(error, AiChatOnlineError)
        assert expect.match in str(error)
        if expect.attempts is not None:
            assert len(endpoint) == expect.attempts
        if expect.status is not None:
            assert isinstance(error, APIStatusError)
            assert error.status_code == expect.status
        if expect.code is not None:
            assert isinstance(error, UpstreamError)
            assert error.code == expect.code
        if isinstance(error, APIConnectionError):
            assert error.__cause__ is not None  # the original is kept
        # The error came while iterating exactly when text was handed out before it.
        assert outcome.opened is (row.stage == "mid")
        assert outcome.got == (HANDED if row.stage == "mid" else [])
        if isinstance(error, (StreamError, ProtocolError)):
            assert error.partial == "".join(outcome.got)
        if row.stage == "token":
            assert emu.chat_requests == []  # nothing is sent with a token that is not one
        tokens = expect.tokens or 0
    check_sleeps(no_sleep.sleeps, expect.sleeps)
    assert emu.tokens_issued == tokens
    if row.stage != "token":
        assert len(emu.token_requests) == tokens
