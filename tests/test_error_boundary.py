"""The one error boundary: bad input is refused when it is given, before any I/O; whatever the
upstream sends, nothing but the library's own exceptions comes out, and never an
``InvalidRequestError`` (that one is only for the caller's input).

Over real loopback sockets: the emulator answers with hand-made bytes (``raw_reply``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aichatonline_sync as aco
from aichatonline_sync import (
    AiChatOnlineError,
    InvalidRequestError,
    ProtocolError,
    Session,
    Timeout,
)
from aichatonline_sync.testing import Emulator

QUICK = Timeout(connect=2, read=1, total=3)
LINE = b'{"data":{"message":"hi"}}\n'


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _fresh(emu: Emulator) -> Iterator[None]:
    emu.reset()
    yield
    emu.reset()


# -- the caller's input: refused when it is given ----------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "http://exa mple.com",
        "http://127.0.0.1:9/\x00",
        "http://127.0.0.1:9/a\tb",
        "http://exa%mple.com",
        "http://127.0.0.1:9/\x7f",
    ],
)
def test_a_base_url_requests_cannot_send_is_refused_by_the_session(base_url: str) -> None:
    with pytest.raises(InvalidRequestError, match="base_url"):
        Session(base_url)


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({"X": " a"}, "begins with white space"),
        ({"X": "\ta"}, "begins with white space"),
        ({"X": "中文"}, "Latin-1"),
        ({"X": "a\r\nY: b"}, "line break"),
        ({"X Y": "a"}, "invalid header name"),
    ],
)
def test_a_header_requests_cannot_send_is_refused_before_any_io(
    emu: Emulator, headers: dict[str, str], words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        aco.complete("Hi", base_url=emu.url, headers=headers)
    assert emu.request_count == 0


@pytest.mark.parametrize(
    "options",
    [
        {"reuse_token": 1},
        {"pool_maxsize": 10**9},
        {"pool_maxsize": 0},
        {"max_line_bytes": 1 << 40},
        {"verify": __file__},  # a file, but no CA bundle
    ],
)
def test_a_session_option_out_of_bounds_is_refused(emu: Emulator, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        Session(emu.url, **options)
    assert emu.request_count == 0


@pytest.mark.parametrize(
    "options",
    [
        {"progress": "yes"},
        {"return_exceptions": "no"},
        {"keep_text": 1},
        {"max_workers": 10**6},
    ],
)
def test_a_batch_option_of_the_wrong_kind_is_refused_before_any_io(
    emu: Emulator, options: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequestError):
        aco.batch(["a", "b"], base_url=emu.url, **options)
    assert emu.request_count == 0


def test_a_batch_on_a_closed_session_fails_once_before_anything_is_sent(emu: Emulator) -> None:
    session = Session(emu.url)
    session.close()
    with pytest.raises(AiChatOnlineError, match="closed Session"):
        session.batch(["a", "b", "c"])
    assert emu.request_count == 0


def test_a_ca_bundle_is_accepted_and_a_wrong_file_names_itself(tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    assert Session("https://127.0.0.1:9", verify=str(bundle)).verify == str(bundle)
    wrong = tmp_path / "notes.txt"
    wrong.write_text("not a certificate\n")
    with pytest.raises(InvalidRequestError, match=r"notes\.txt.*not a readable CA bundle"):
        Session("https://127.0.0.1:9", verify=str(wrong))


# -- the upstream's replies: never the caller's fault ------------------------------------------


def _run(emu: Emulator, endpoint: str, data: bytes) -> BaseException:
    emu.raw_reply(endpoint, data)
    with Session(emu.url, max_retries=0, timeout=QUICK) as session, pytest.raises(
        AiChatOnlineError
    ) as info:
        session.complete("Hi")
    return info.value


@pytest.mark.parametrize("endpoint", ["token", "chat"])
def test_conflicting_content_lengths_are_a_protocol_error(emu: Emulator, endpoint: str) -> None:
    error = _run(
        emu, endpoint, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"
    )
    assert type(error) is ProtocolError
    assert "malformed reply" in str(error)


@pytest.mark.parametrize("endpoint", ["token", "chat"])
def test_an_interim_103_reply_is_reported_for_what_it_is(emu: Emulator, endpoint: str) -> None:
    final = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LINE), LINE)
    error = _run(emu, endpoint, b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + final)
    assert type(error) is ProtocolError
    assert "interim reply, HTTP 103 Early Hints" in str(error)


def test_a_100_continue_before_the_reply_is_skipped(emu: Emulator) -> None:
    final = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LINE), LINE)
    emu.raw_reply("chat", b"HTTP/1.1 100 Continue\r\n\r\n" + final)
    assert aco.complete("Hi", base_url=emu.url, max_retries=0) == "hi"


# -- a property: hostile options and hostile replies, in every combination ---------------------

_STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 103 Early Hints",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 401 Unauthorized",
    b"HTTP/1.1 999 Odd",
    b"HTTP/1.0 200 OK",
    b"HTTQ/1.1 200 OK",
    b"HTTP/1.1 2000 OK",
    b"",
    b"\xff\xfe garbage",
]
_HEADERS = [
    b"Content-Length: 5",
    b"Content-Length: 7",
    b"Content-Length: -1",
    b"Content-Length: abc",
    b"Content-Length: 99999999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Content-Encoding: gzip",
    b"Content-Encoding: br",
    b"Content-Type: text/html",
    b"Content-Type: application/json",
    b"Retry-After: -5",
    b"Retry-After: Wed, 99 Foo 2099",
    b"Location: http://user:pw@elsewhere/",
    b"no colon here",
    b" folded: continuation",
    b"X: " + b"a" * 70000,
    b"Set-Cookie: a=\xff; Path=/",
]
_BODIES = [
    b'{"code": "\xc2\xb2", "message": "odd code"}',
    b'{"code": "--5", "message": "\\ud800"}',
    b'{"code": "' + b"9" * 5000 + b'"}\n',
    b"[" * 100000,
    b"",
    LINE,
    LINE * 3,
    b"hello",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\nhello\r\n",
    b"\x1f\x8b\x08\x00garbage",
    b'{"code": 401, "message": "no"}\n',
    b'{"data": "tok"}',
    b'{"data":{"message":"\\ud83d"}}\n',
    b"<html><title>blocked</title></html>",
    b"\xff\xfe\xfd\n",
]


@st.composite
def hostile_replies(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from(_STATUS_LINES))
    headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=4))
    body = draw(st.sampled_from(_BODIES))
    return b"\r\n".join([status, *headers, b"", body])


_JUNK = [None, True, 0, -1, 2**70, float("nan"), float("inf"), "", " ", "yes", b"x", [], object()]
_URLS = ["http://exa mple.com", "http://127.0.0.1:9/\x00", "socks9://h:1", "http://[::1",
         "http://u:p@127.0.0.1:9", "ftp://h", "http://h:99999", "http://exa%mple.com"]


def _hostile(*specific: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from([*specific, *_JUNK])


#: Each option drawn on its own (present or not), from values aimed at it and from junk.
_HOSTILE_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "base_url": _hostile(*_URLS),
        "proxy": _hostile(*_URLS),
        "headers": _hostile({"X": " a"}, {"X": "中"}, {"X": "a\x7f"}, {"": "a"}, {"X": 1}),
        "timeout": _hostile((1, -1), (None, None, None), 1e300),
        "max_retries": _hostile(10**30, 10**5),
        "verify": _hostile(__file__, "/nonexistent.pem"),
        "reuse_token": _hostile(1, "no"),
        "max_line_bytes": _hostile(1 << 40),
        "pool_maxsize": _hostile(10**9),
        "model": _hostile("gpt-5"),
        "conversation_id": _hostile("a b", "\x00" * 10),
        "keep_text": _hostile(1, "no"),
    },
)


#: Options that are valid but unusual, drawn together with the hostile replies.
_ODD_BUT_VALID = st.fixed_dictionaries(
    {},
    optional={
        "max_line_bytes": st.sampled_from([1, 16, 1 << 20]),
        "reuse_token": st.booleans(),
        "keep_text": st.booleans(),
        "headers": st.sampled_from([{}, {"Accept-Encoding": "gzip"}, {"X-Odd": "é"}]),
    },
)
_CHAT_OPTIONS = ("model", "conversation_id", "keep_text")


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    session = {"max_retries": 0, "timeout": QUICK}
    session.update({k: v for k, v in options.items() if k not in _CHAT_OPTIONS})
    return session, {k: v for k, v in options.items() if k in _CHAT_OPTIONS}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_HOSTILE_OPTIONS)
def test_hostile_options_are_refused_before_any_io_or_accepted(
    emu: Emulator, options: dict[str, Any]
) -> None:
    emu.reset()
    session_options, chat_options = _split(options)
    if "max_retries" in options:  # refused or taken; the chat below does not retry (no waits)
        with contextlib.suppress(InvalidRequestError):
            Session(emu.url, max_retries=options["max_retries"]).close()
    session_options["max_retries"] = 0
    base_url = session_options.pop("base_url", emu.url)
    try:
        with Session(base_url, **session_options) as session:
            session.complete("Hi", **chat_options)
    except InvalidRequestError:
        assert emu.request_count == 0, "an InvalidRequestError after something was sent"
    except AiChatOnlineError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_ODD_BUT_VALID, endpoint=st.sampled_from(["token", "chat"]), data=hostile_replies())
def test_hostile_replies_raise_nothing_but_our_exceptions_and_never_the_callers(
    emu: Emulator, options: dict[str, Any], endpoint: str, data: bytes
) -> None:
    emu.reset()
    session_options, chat_options = _split(options)
    emu.raw_reply(endpoint, data)
    pieces: list[str] = []
    with Session(emu.url, **session_options) as session:
        try:
            for piece in session.chat("Hi", **chat_options):
                pieces.append(piece)
        except InvalidRequestError as exc:  # pragma: no cover - the failure this test looks for
            pytest.fail(f"the upstream's reply came out as the caller's fault: {exc!r}")
        except AiChatOnlineError:
            pass
    assert emu.request_count >= 1
    "".join(pieces).encode("utf-8")  # every piece handed out is text


def test_the_property_test_reaches_the_network(emu: Emulator) -> None:
    """The replies above really are read: a good one gives its text."""
    emu.raw_reply("chat", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LINE), LINE))
    assert Session(emu.url, max_retries=0, timeout=QUICK).complete("Hi") == "hi"


def test_a_reply_that_never_comes_is_a_timeout_not_a_foreign_error() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(aco.APITimeoutError):
            Session(url, max_retries=0, timeout=Timeout(connect=2, read=0.3)).complete("Hi")


def test_the_connection_of_an_interim_reply_never_serves_another_chat(emu: Emulator) -> None:
    # The answer behind the 103 stays on the connection: the next chat must not read it.
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LINE), LINE)
    emu.raw_reply("chat", b"HTTP/1.1 103 Early Hints\r\n\r\n" + stale, close=False)
    emu.set_reply("fresh")
    with Session(emu.url, max_retries=0, timeout=QUICK) as session:
        with pytest.raises(ProtocolError, match="interim reply"):
            session.complete("one")
        assert session.complete("two") == "fresh"


def test_a_batch_on_a_shut_down_executor_gives_each_prompt_our_error(emu: Emulator) -> None:
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(2)
    pool.shutdown()
    results = aco.batch(["a", "b"], base_url=emu.url, executor=pool, return_exceptions=True)
    assert [type(r) for r in results] == [AiChatOnlineError, AiChatOnlineError]
    assert "executor refused" in str(results[0])
    assert emu.chat_requests == []


def test_an_executor_that_is_no_executor_is_refused(emu: Emulator) -> None:
    with pytest.raises(InvalidRequestError, match=r"concurrent\.futures\.Executor"):
        aco.batch(["a"], base_url=emu.url, executor="nope")


def test_grab_token_refresh_must_be_a_bool(emu: Emulator) -> None:
    with Session(emu.url) as session, pytest.raises(InvalidRequestError, match="refresh"):
        session.grab_token(refresh="no")
    assert emu.request_count == 0


def test_verify_must_hold_certificates(tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    import os

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidRequestError, match="folder without hashed certificates"):
        Session("https://127.0.0.1:9", verify=str(empty))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        Session("https://127.0.0.1:9", verify=str(fifo))  # (it would block, reading)
    key_only = tmp_path / "key.pem"
    trustme.CA().private_key_pem.write_to_path(str(key_only))
    with pytest.raises(InvalidRequestError):
        Session("https://127.0.0.1:9", verify=str(key_only))


def test_save_never_replaces_what_is_not_a_regular_file(tmp_path: Any) -> None:
    import os

    conversation = aco.Conversation()
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        conversation.save(folder)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        conversation.save(fifo)
    assert fifo.is_fifo()
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    conversation.save(link)
    assert link.is_symlink()
    assert aco.Conversation.load(real).messages == []
