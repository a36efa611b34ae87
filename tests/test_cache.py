"""The reply cache: ``ReplyCache``, ``Session(cache=)`` and every front end that takes it.

Every chat goes to the bundled emulator; a hit is proven by the emulator's counters (no request,
no connection) rather than by timing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import (
    Cancellation,
    IncompleteStreamError,
    InvalidRequestError,
    ReplyCache,
    Session,
    StreamError,
)
from aichatonline_sync._client.cache import APPLICATION_ID, cache_key, shared_cache
from aichatonline_sync._client.registry import _registry, shared_session
from aichatonline_sync.testing import Emulator

PIECES = ["Hel", "lo", ", ", "wor", "ld", "!"]
TEXT = "".join(PIECES)
MakeEmulator = Callable[..., Emulator]


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "replies.sqlite"


@pytest.fixture
def session(emu: Emulator, path: Path) -> Iterator[Session]:
    with Session(emu.url, cache=path) as s:
        yield s


def sent(emu: Emulator) -> tuple[int, int]:
    """What reached the emulator so far: requests and TCP connections."""
    return emu.request_count, emu.connections


# -- hits and misses -----------------------------------------------------------------------------


def test_a_hit_sends_nothing_and_replays_the_pieces_in_order(
    emu: Emulator, session: Session
) -> None:
    with session.chat("Hi") as first:
        assert first.cached is False
        assert list(first) == PIECES
    before = sent(emu)
    with session.chat("Hi") as second:
        assert second.cached is True
        assert second.text == ""  # nothing handed out yet: it still streams
        assert next(second) == PIECES[0]
        assert list(second) == PIECES[1:]
        assert second.text == TEXT
    assert sent(emu) == before  # no token request, no chat request, no connection
    assert second.closed
    assert len(emu.chat_requests) == 1


def test_a_hit_is_the_same_chat_stream(session: Session) -> None:
    session.complete("Hi")
    stream = session.chat("Hi", keep_text=False)
    assert type(stream) is aco.ChatStream
    assert stream.model == "gpt-4o-mini"
    assert len(stream.conversation_id) == 10
    done: list[str] = []
    stream.add_done_callback(done.append)
    assert "".join(stream) == TEXT
    assert stream.text == ""
    assert done == [""]
    assert "done" in repr(stream)

    early = session.chat("Hi")
    assert next(early) == PIECES[0]
    early.close()  # closed early: it just ends
    assert early.closed
    assert list(early) == []
    assert early.text == PIECES[0]

    aborted = session.chat("Hi")
    assert next(aborted) == PIECES[0]
    aborted.abort("stopped by the test")
    with pytest.raises(IncompleteStreamError, match="stopped by the test") as info:
        next(aborted)
    assert info.value.partial == PIECES[0]
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(aborted)


def test_a_hit_is_stopped_by_a_cancellation_from_another_thread(session: Session) -> None:
    session.complete("Hi")
    cancel = Cancellation()
    stream = session.chat("Hi", cancel=cancel)
    assert next(stream) == PIECES[0]
    worker = threading.Thread(target=cancel.cancel)
    worker.start()
    worker.join()
    with pytest.raises(StreamError):
        list(stream)
    cancel_first = Cancellation()
    cancel_first.cancel()
    with pytest.raises(aco.APIConnectionError):
        session.chat("Hi", cancel=cancel_first)  # cancelled before: not handed out


def test_the_key_is_the_model_and_the_prompt_not_the_conversation_or_the_token(
    emu: Emulator, path: Path
) -> None:
    with Session(emu.url, cache=path) as s:
        s.complete("Hi", conversation_id="aaaaaaaaaa")
        assert s.chat("Hi", conversation_id="bbbbbbbbbb").cached
    emu.revoke_tokens()
    with Session(emu.url, cache=path, reuse_token=False) as other:  # another token, same key
        before = sent(emu)
        assert other.chat("Hi").cached
        assert sent(emu) == before
        # The key is the prompt as sent: the same messages in another form are a hit...
        assert other.chat([{"role": "user", "content": "Hi"}]).cached
        # ... another prompt, or the same words after a system message, is another key: sent.
        assert not other.chat("Hi!").cached
        assert not other.chat([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}]).cached
        assert not other.chat([{"role": "user", "content": "Hi"}] * 2).cached
    assert cache_key("gpt-4o-mini", "User: Hi") != cache_key("gpt-4o", "User: Hi")
    with ReplyCache(path) as cache:
        prompt = "Hi"  # (one user message is sent as its text)
        assert cache.get("gpt-4o-mini", prompt) == PIECES
        assert cache.get("another-model", prompt) is None


def test_only_a_reply_read_to_its_end_is_stored(emu: Emulator, session: Session) -> None:
    stream = session.chat("closed early")
    next(stream)
    stream.close()
    for _piece in session.chat("left in a loop"):
        break
    emu.drop("chat", after=2)
    with pytest.raises(IncompleteStreamError):
        session.complete("dropped")
    emu.error_line(500, "boom", after=2)
    with pytest.raises(StreamError):
        session.complete("error line")
    emu.fail("chat", 400)
    with pytest.raises(aco.APIStatusError):
        session.complete("refused")
    assert session.cache is not None
    assert len(session.cache) == 0
    before = emu.request_count
    assert session.complete("closed early") == TEXT  # all of them are sent again
    assert emu.request_count > before
    assert len(session.cache) == 1


def test_a_stored_reply_keeps_pieces_that_are_empty_or_not_ascii(
    emulator: MakeEmulator, path: Path
) -> None:
    pieces = ["", "Grüße ", "🙂", "\n", "日本"]
    emu = emulator(reply=pieces)
    with Session(emu.url, cache=path) as s:
        assert s.complete("Hi") == "".join(pieces)
        assert list(s.chat("Hi")) == pieces


def test_a_failed_write_loses_nothing_but_the_entry(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    cache = session.cache
    assert cache is not None
    cache._db.execute("PRAGMA query_only = 1")  # every write now fails, as on a read-only file
    with caplog.at_level(logging.WARNING, logger="aichatonline_sync"):
        assert session.complete("Hi") == TEXT
    assert any("was not stored" in r.getMessage() and str(cache.path) in r.getMessage()
               for r in caplog.records)
    cache._db.execute("PRAGMA query_only = 0")
    assert len(cache) == 0


def test_a_closed_cache_sends_every_chat(emu: Emulator, path: Path) -> None:
    cache = ReplyCache(path)
    with Session(emu.url, cache=cache) as s:
        s.complete("Hi")
        assert s.chat("Hi").cached
        cache.close()
        cache.close()  # idempotent
        assert s.complete("Hi") == TEXT
        assert len(emu.chat_requests) == 2
    assert "closed" in repr(cache)


# -- the options ---------------------------------------------------------------------------------


def test_every_front_end_of_the_library_takes_the_option(emu: Emulator, path: Path) -> None:
    assert aco.complete("Hi", base_url=emu.url, cache=str(path)) == TEXT
    before = sent(emu)
    assert aco.chat("Hi", base_url=emu.url, cache=str(path)).cached
    assert aco.complete("Hi", base_url=emu.url, cache=str(path)) == TEXT
    assert aco.batch(["Hi", "Hi"], base_url=emu.url, cache=str(path)) == [TEXT, TEXT]
    conversation = aco.Conversation(base_url=emu.url, cache=str(path))
    assert "".join(conversation.ask("Hi")) == TEXT
    assert sent(emu) == before
    assert len(_registry) == 1  # one shared session for these options
    assert shared_session(base_url=emu.url, cache=str(path)).cache is shared_cache(path)
    assert "".join(conversation.ask("And then?")) == TEXT  # the whole history: a new key
    assert emu.request_count > before[0]


def test_the_option_takes_a_path_or_a_cache(emu: Emulator, path: Path) -> None:
    with Session(emu.url, cache=str(path)) as a, Session(emu.url, cache=path) as b:
        assert a.cache is b.cache is shared_cache(str(path))  # one per path per process
    with ReplyCache(path) as mine, Session(emu.url, cache=mine) as c:
        assert c.cache is mine
    assert Session(emu.url).cache is None
    for bad in (b"replies.sqlite", 3, ["x"]):
        with pytest.raises(InvalidRequestError, match="cache must be"):
            Session(emu.url, cache=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="cannot open the reply cache"):
        Session(emu.url, cache=path.parent / "no such folder" / "x.sqlite")
    # Pickled (a batch's process pool), it is the process's one cache for its path.
    assert pickle.loads(pickle.dumps(ReplyCache(path))) is shared_cache(path)


# -- the file --------------------------------------------------------------------------------


def test_a_file_that_is_not_a_reply_cache_is_an_error_naming_it(
    emu: Emulator, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is no database\n" * 100)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    db.close()
    foreign_bytes = foreign.read_bytes()
    for bad in (garbage, foreign):
        with pytest.raises(InvalidRequestError) as info:
            Session(emu.url, cache=bad)
        assert str(bad) in str(info.value)
        assert "not a reply cache" in str(info.value)
        with pytest.raises(InvalidRequestError, match="not a reply cache"):
            ReplyCache(bad)
    assert foreign.read_bytes() == foreign_bytes  # another program's file is left untouched
    assert emu.request_count == 0
    newer = tmp_path / "newer.sqlite"
    ReplyCache(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(InvalidRequestError, match="newer aichatonline-sync"):
        ReplyCache(newer)


def test_the_file_is_ours_in_wal_mode(path: Path) -> None:
    path.touch()  # an empty file is a new cache
    with ReplyCache(path) as cache:
        assert len(cache) == 0
        cache.put("gpt-4o-mini", "p", ["a", "b"])
        assert cache.get("gpt-4o-mini", "p") == ["a", "b"]
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        (stored,) = db.execute("SELECT pieces FROM replies").fetchone()
        assert json.loads(stored) == ["a", "b"]
        db.execute("UPDATE replies SET pieces = 'not json'")
        db.commit()
    finally:
        db.close()
    with ReplyCache(path) as cache:
        assert cache.get("gpt-4o-mini", "p") is None  # an unreadable entry is a miss


def test_clear_len_stats_and_age(path: Path) -> None:
    with ReplyCache(path) as cache:
        for n in range(5):
            cache.put("gpt-4o-mini", f"p{n}", [str(n)])
        assert len(cache) == 5
        stats = cache.stats()
        assert stats.entries == 5
        assert stats.size > 0
        assert stats.oldest is not None
        assert stats.newest is not None
        assert stats.oldest <= stats.newest
        cache._db.execute("UPDATE replies SET created = created - 7200 WHERE model = ?",
                          ("gpt-4o-mini",))
        cache.put("gpt-4o-mini", "fresh", ["f"])
        assert cache.clear(older_than=3600) == 5
        assert len(cache) == 1
        assert cache.get("gpt-4o-mini", "fresh") == ["f"]
        assert cache.clear() == 1
        assert len(cache) == 0
        assert cache.stats().oldest is None
        with pytest.raises(InvalidRequestError, match="older_than"):
            cache.clear(older_than=-1)


_FILL = """\
import sys
from aichatonline_sync import ReplyCache
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with ReplyCache(path) as cache:
    for n in range(count):
        assert cache.put("gpt-4o-mini", f"{name}-{n}", [name, str(n)] * 50), n
        assert cache.get("gpt-4o-mini", f"{name}-0") == [name, "0"] * 50
"""


def test_processes_fill_one_file_at_once(path: Path) -> None:
    count = 150
    children = [
        subprocess.Popen([sys.executable, "-c", _FILL, str(path), name, str(count)])
        for name in ("a", "b", "c")
    ]
    assert [child.wait(timeout=120) for child in children] == [0, 0, 0]
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    with ReplyCache(path) as cache:
        assert len(cache) == 3 * count
        for name in ("a", "b", "c"):
            for n in range(count):
                assert cache.get("gpt-4o-mini", f"{name}-{n}") == [name, str(n)] * 50


def test_threads_share_one_cache(emu: Emulator, session: Session) -> None:
    prompts = [f"prompt {n % 6}" for n in range(48)]
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(prompt: str) -> None:
        try:
            text = session.complete(prompt)
            with lock:
                results.append(text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [TEXT] * len(prompts)
    assert session.cache is not None
    assert len(session.cache) == 6
    before = sent(emu)
    assert aco.batch(sorted(set(prompts)), session=session, max_workers=6) == [TEXT] * 6
    assert sent(emu) == before


def test_importing_the_package_does_not_import_sqlite3() -> None:
    code = "import sys, aichatonline_sync; print('sqlite3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- front ends ----------------------------------------------------------------------------------


def test_display_stream_draws_a_cached_stream(
    monkeypatch: pytest.MonkeyPatch, session: Session
) -> None:
    IPython = pytest.importorskip("IPython")
    ipython_display = pytest.importorskip("IPython.display")
    calls: list[str] = []

    class Handle:
        def update(self, obj: dict[str, str], **kwargs: Any) -> None:
            calls.append(obj["text/markdown"])

    def display(obj: dict[str, str], **kwargs: Any) -> Handle:
        calls.append(obj["text/markdown"])
        return Handle()

    class KernelShell:
        kernel = object()

    monkeypatch.setattr(IPython, "get_ipython", KernelShell)
    monkeypatch.setattr(ipython_display, "display", display)
    session.complete("Hi")
    stream = session.chat("Hi")
    assert stream.cached
    assert aco.display_stream(stream, min_interval=0) == TEXT
    assert calls == ["".join(PIECES[: n + 1]) for n in range(len(PIECES))] + [TEXT]
    calls.clear()
    emu_requests = session.cache
    assert aco.display_stream("Hi", session=session, min_interval=0) == TEXT
    assert calls[-1] == TEXT
    assert emu_requests is session.cache


def _call(app: Any, body: dict[str, Any]) -> tuple[str, bytes]:
    data = json.dumps(body).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/chat/completions",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
    }
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    result = app(environ, lambda s, headers, exc_info=None: status.append(s))
    try:
        return status[0], b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()


def test_the_gateway_reads_the_variable(emu: Emulator, path: Path, tmp_path: Path) -> None:
    from aichatonline_sync.gateway import app_from_env

    env = {"AICHATONLINE_BASE_URL": emu.url, "AICHATONLINE_CACHE": str(path)}
    app = app_from_env(env)
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
        status, first = _call(app, body)
        assert status.startswith("200")
        before = sent(emu)
        for stream in (False, True):
            status, again = _call(app, {**body, "stream": stream})
            assert status.startswith("200")
            assert TEXT in again.decode() or all(p in again.decode() for p in PIECES)
        assert sent(emu) == before
        assert json.loads(first)["choices"][0]["message"]["content"] == TEXT
    finally:
        app.close()
    bad = tmp_path / "bad.sqlite"
    bad.write_text("no database")
    with pytest.raises(InvalidRequestError, match=r"bad\.sqlite"):  # at boot, not per request
        app_from_env({"AICHATONLINE_CACHE": str(bad)})
    with pytest.raises(InvalidRequestError, match="AICHATONLINE_CACHE"):
        app_from_env({"AICHATONLINE_CACHE": str(tmp_path)})  # a folder


_LLM = """\
import socket, sys
_real = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "::1", "localhost", b"127.0.0.1", b"localhost"):
        raise socket.gaierror(f"tests may only reach loopback, not {host!r}")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _loopback_only
from llm.cli import cli
cli(prog_name="llm")
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AICHATONLINE_", "LLM_", "OPENAI_"))
        and key.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


def test_the_llm_plugin_reads_the_variable(emu: Emulator, path: Path, tmp_path: Path) -> None:
    pytest.importorskip("llm")
    env = _clean_env(
        AICHATONLINE_BASE_URL=emu.url,
        AICHATONLINE_CACHE=str(path),
        LLM_USER_PATH=str(tmp_path / "llm"),
    )
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _LLM, "-m", "aichatonline", "Hi"],
            input="", capture_output=True, text=True, env=env, timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == TEXT + "\n"
    assert len(emu.chat_requests) == 1


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aichatonline_sync", *args],
        input="", capture_output=True, text=True, encoding="utf-8",
        env=_clean_env(**env), timeout=60, check=False,
    )


def test_the_command_line_chat_and_batch(emu: Emulator, path: Path, tmp_path: Path) -> None:
    first = _cli("chat", "--base-url", emu.url, "--cache", str(path), "Hi")
    assert (first.returncode, first.stdout) == (0, TEXT + "\n"), first.stderr
    before = sent(emu)
    again = _cli("chat", "--base-url", emu.url, "Hi", AICHATONLINE_CACHE=str(path))
    assert (again.returncode, again.stdout) == (0, TEXT + "\n"), again.stderr
    assert sent(emu) == before

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nWhat is HTTP?\n")
    for n in (1, 2):
        out = tmp_path / f"out{n}.jsonl"
        run = _cli("batch", str(prompts), "-o", str(out), "--base-url", emu.url,
                   "--cache", str(path))
        assert run.returncode == 0, run.stderr
        assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [TEXT] * 2
        if n == 1:
            before = sent(emu)
    assert sent(emu) == before  # the second batch: every prompt from the cache

    info = _cli("cache", "info", str(path))
    assert info.returncode == 0, info.stderr
    assert "2 entries" in info.stdout
    cleared = _cli("cache", "clear", "--older-than", "30d", AICHATONLINE_CACHE=str(path))
    assert cleared.returncode == 0
    assert "removed 0 entries, 2 left" in cleared.stdout
    cleared = _cli("cache", "clear", str(path))
    assert cleared.returncode == 0
    assert "removed 2 entries, 0 left" in cleared.stdout
    missing = _cli("cache", "info", str(tmp_path / "none.sqlite"))
    assert missing.returncode == 2
    assert "no reply cache" in missing.stderr
    assert not (tmp_path / "none.sqlite").exists()


def test_the_command_line_names_a_bad_cache_file(emu: Emulator, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_text("no database")
    for run in (
        _cli("chat", "--base-url", emu.url, "--cache", str(bad), "Hi"),
        _cli("chat", "--base-url", emu.url, "Hi", AICHATONLINE_CACHE=str(bad)),
        _cli("cache", "info", str(bad)),
    ):
        assert run.returncode == 2
        assert str(bad) in run.stderr
        assert "not a reply cache" in run.stderr
        assert "Traceback" not in run.stderr
    folder = _cli("chat", "--base-url", emu.url, "--cache", str(tmp_path), "Hi")
    assert folder.returncode == 2
    assert "--cache" in folder.stderr
    assert emu.request_count == 0


def test_a_damaged_file_is_our_error_naming_it_and_chats_go_on(
    emu: Emulator, path: Path
) -> None:
    with ReplyCache(path) as cache:
        for index in range(40):
            cache.put("gpt-4o-mini", f"prompt {index} " + "x" * 2000, ["reply"])
    db = sqlite3.connect(path)  # (everything into the file itself, out of its -wal)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with open(path, "r+b") as file:  # pages in the middle overwritten
        file.seek(4096 * 2)
        file.write(b"\xa5" * 4096 * 4)
    cache = ReplyCache(path)
    assert cache  # a cache is true, empty or not: no query
    with pytest.raises(aco.AiChatOnlineError, match="cannot be used") as info:
        cache.clear()
    assert str(path) in str(info.value)
    with Session(emu.url, cache=cache) as session:
        assert session.complete("Hi")  # a miss, logged; the chat goes on
    cache.close()


def test_a_path_with_a_nul_is_refused_as_the_callers_input() -> None:
    with pytest.raises(aco.InvalidRequestError, match="not a usable path"):
        Session("http://127.0.0.1:9", cache="a\0b")
