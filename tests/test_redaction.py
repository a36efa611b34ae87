"""The one redaction point: a token or proxy password echoed into any field of a hostile reply
never reaches a log record (at any level, exception text included), an exception's message or
attributes, a repr, or a warning.

Over real loopback sockets: the emulator issues the token, then answers with hand-made bytes that
echo it everywhere.
"""

from __future__ import annotations

import gzip
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator

import pytest

import aichatonline_sync as aco
from aichatonline_sync import AiChatOnlineError, Session, Timeout
from aichatonline_sync.testing import Emulator

QUICK = Timeout(connect=2, read=1, total=3)
PASSWORD = "pr0xy-pa55word-xyz"


class Everything(logging.Handler):
    """Every record of the package, formatted as a handler would write it (traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def everything() -> Iterator[Everything]:
    handler = Everything()
    package = logging.getLogger("aichatonline_sync")
    level = package.level
    package.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        package.setLevel(level)


def shown(error: BaseException) -> list[str]:
    """What a user may print or log of an error: str, repr, the chained traceback, attributes."""
    chained = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return [str(error), repr(error), chained, *(repr(v) for v in vars(error).values())]


def _http(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def hostile_chat_replies(token: str) -> dict[str, bytes]:
    """Replies to a chat that echo the token into every field there is."""
    t = token.encode()
    line = b'{"data":{"message":"ok"}}\n'
    return {
        "reason phrase": _http(f"500 Broken {token}", b"x"),
        "header": _http("503 Busy", b"x", f"X-Echo: {token}", f"Retry-After: {token}"),
        "status body": _http("400 Bad", b'{"error": "bad token ' + t + b'"}'),
        "redirect": _http("302 Found", b"", f"Location: http://127.0.0.1/?t={token}"),
        "html page": _http("200 OK", b"<html><title>" + t + b"</title></html>", "Content-Type: text/html"),
        "no chat stream": _http("200 OK", b"token=" + t + b"\n"),
        "skipped lines": _http(
            "200 OK", b"not json " + t + b"\n" + b'{"other": "' + t + b'"}\n' + line
        ),
        "bad utf-8": _http("200 OK", b'{"data":{"message":"\xff ' + t + b'"}}\n' + line),
        "error line": _http("200 OK", line + b'{"code": 500, "message": "bad ' + t + b'"}\n'),
        "error line first": _http("200 OK", b'{"code": 401, "message": "rejected ' + t + b'"}\n'),
        "cut line": _http("200 OK", line + b'{"data":{"message":"' + t)[:-3],
        "gzip garbage": _http("200 OK", gzip.compress(line)[:12] + t, "Content-Encoding: gzip"),
        "too long": _http("200 OK", b'{"data":{"message":"' + t * 4000 + b'"}}\n'),
    }


def test_an_echoed_token_reaches_no_log_error_repr_or_warning(
    everything: Everything,
) -> None:
    with Emulator() as emu, Session(
        emu.url, max_retries=0, timeout=QUICK, max_line_bytes=65536
    ) as session:
        token = session.grab_token()
        outputs: list[str] = []
        for name, data in hostile_chat_replies(token).items():
            emu.raw_reply("chat", data)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    stream = session.chat("Hi")
                    outputs.append(repr(stream))
                    for _ in stream:
                        pass
                except AiChatOnlineError as error:
                    outputs.extend(shown(error))
                else:
                    outputs.append(repr(stream))
            outputs.extend(str(w.message) for w in caught)
            outputs.append(repr(session))
            assert not [o for o in outputs if token in o], f"{name}: the token leaked"
        logged = "\n".join(everything.lines)
        assert token not in logged
        assert "***" in logged  # the records were there, masked (not dropped)
        # The echoes really were read: the skipped lines were logged, masked.
        assert any("not json" in line or "not JSON" in line for line in everything.lines)


def test_the_token_endpoint_echoing_a_token_reaches_no_error(everything: Everything) -> None:
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        token = session.grab_token()
        emu.token_reply({"code": 500, "message": f"no more tokens like {token}"})
        with pytest.raises(aco.TokenError) as info:
            session.grab_token(refresh=True)
        assert info.value.code == 500
        assert info.value.message == "no more tokens like ***"
        assert not [o for o in shown(info.value) if token in o]
        assert token not in "\n".join(everything.lines)


def test_a_proxy_password_is_masked_in_every_logger_of_the_package(everything: Everything) -> None:
    Session("http://127.0.0.1:9", proxy=f"http://user:{PASSWORD}@127.0.0.1:3128").close()
    for name in ("aichatonline_sync", "aichatonline_sync.gateway", "aichatonline_sync.testing"):
        logger = logging.getLogger(name)
        logger.warning("echoed %s", PASSWORD)
        try:
            raise RuntimeError(f"inner {PASSWORD}")
        except RuntimeError:
            logger.exception("failed with %r", {"p": PASSWORD})
    logged = "\n".join(everything.lines)
    assert PASSWORD not in logged
    assert logged.count("***") >= 9


def test_an_error_made_anywhere_is_masked_whoever_sets_its_fields() -> None:
    Session("http://127.0.0.1:9", proxy=f"http://user:{PASSWORD}@127.0.0.1:3128").close()
    error = aco.APIStatusError(
        f"failed {PASSWORD}", status_code=500, body=PASSWORD, headers={"X": PASSWORD}
    )
    error.extra = f"later {PASSWORD}"
    assert not [o for o in shown(error) if PASSWORD in o]


def test_a_record_without_secrets_keeps_its_arguments(everything: Everything) -> None:
    Session("http://127.0.0.1:9", proxy=f"http://user:{PASSWORD}@127.0.0.1:3128").close()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("aichatonline_sync")
    logger.addHandler(handler)
    try:
        logger.warning("plain %s", 42)
    finally:
        logger.removeHandler(handler)
    assert records[0].args == (42,)


def test_the_missing_tqdm_warning_points_at_the_callers_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from aichatonline_sync._client import batch as _batch
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(_batch._NoTqdm, "warned", False)
    with Emulator() as emu, pytest.warns(RuntimeWarning, match="needs tqdm") as caught:
        aco.batch(["a"], base_url=emu.url, progress=True)
    assert caught[0].filename == __file__


def test_display_stream_outside_ipython_closes_the_stream_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "IPython", None)
    with Emulator() as emu:
        stream = aco.chat("Hi", base_url=emu.url)
        with pytest.raises(aco.InvalidRequestError):
            aco.display_stream(stream)
        assert stream.closed


def test_a_password_stays_masked_after_many_tokens(everything: Everything) -> None:
    from aichatonline_sync._wire import redact as _redact
    Session("http://127.0.0.1:9", proxy=f"http://user:{PASSWORD}@127.0.0.1:3128").close()
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        token = session.grab_token()
        session.complete("Hi")  # the token in use
        for index in range(_redact.MAX_SECRETS + 10):  # as many chats with reuse_token=False
            _redact.remember(f"other-token-{index:012d}")
        session.complete("Hi")  # used again: among the most recently used once more
        logging.getLogger("aichatonline_sync").warning("echo %s %s", PASSWORD, token)
    assert "WARNING aichatonline_sync echo *** ***" in everything.lines


def test_a_traceback_with_a_secret_reaches_no_formatter_that_formats_it_itself() -> None:
    Session("http://127.0.0.1:9", proxy=f"http://user:{PASSWORD}@127.0.0.1:3128").close()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("aichatonline_sync")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"upstream said {PASSWORD}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.exc_info is None  # a JSON or Sentry formatter has only the masked text
    assert PASSWORD not in (record.exc_text or "")
    assert "***" in (record.exc_text or "")


def test_the_partial_text_of_a_broken_reply_is_kept_as_it_came() -> None:
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        token = session.grab_token()
        emu.set_reply([f"your token is {token}", " and more"])
        emu.drop(after=1)
        with pytest.raises(aco.IncompleteStreamError) as info:
            session.complete("Hi")
    assert info.value.partial == f"your token is {token}"
    assert token not in str(info.value)


def test_the_foreign_exception_kept_as_the_cause_is_masked_too() -> None:
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        token = session.grab_token()
        emu.raw_reply("chat", f"HTTP/1.1 abc {token}\r\n\r\n".encode())
        with pytest.raises(AiChatOnlineError) as info:
            session.complete("Hi")
    assert info.value.__cause__ is not None
    assert not [o for o in shown(info.value) if token in o]


def test_a_skipped_line_cut_in_the_middle_of_a_token_shows_none_of_it(
    everything: Everything,
) -> None:
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        token = session.grab_token()
        line = b'{"data":{"message":"ok"}}\n'
        emu.raw_reply("chat", _http("200 OK", b"x" * 60 + token.encode() + b"\n" + line))
        assert session.complete("Hi") == "ok"
    skipped = [entry for entry in everything.lines if "skipped" in entry]
    assert skipped
    assert token[:8] not in skipped[0]
    assert "***" in skipped[0]


def test_an_error_code_that_is_no_text_is_mended() -> None:
    with Emulator() as emu, Session(emu.url, max_retries=0, timeout=QUICK) as session:
        emu.raw_reply("chat", _http("200 OK", b'{"code": "\\ud800", "message": "down"}\n'))
        with pytest.raises(aco.UpstreamError) as info:
            session.complete("Hi")
    assert info.value.code == "\ufffd"


def test_the_command_line_shows_no_token_echoed_into_a_broken_header() -> None:
    import subprocess

    token = "0123456789abcdef0123456789abcdef"
    with Emulator() as emu:
        emu.token_reply({"data": token})
        body = b'{"data":{"message":"ok"}}\n'
        emu.raw_reply(
            "chat",
            b"HTTP/1.1 200 OK\r\n" + token.encode() + b"\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        done = subprocess.run(
            [sys.executable, "-m", "aichatonline_sync", "chat", "--base-url", emu.url,
             "--max-retries", "0", "Hi"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert token not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
