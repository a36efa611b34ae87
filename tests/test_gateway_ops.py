"""Operating the gateway: ``/health``, ``/metrics`` (also summed over two gunicorn workers), CORS
(raw, and from a real headless Chromium page on another loopback origin that streams a reply), HEAD
without a body, logs in gunicorn's error log, and a client that goes away from a reply that is not
streamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http import server as http_server
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

import aichatonline_sync as aco
from aichatonline_sync.gateway import (
    CORS_ORIGINS_ENV,
    GATEWAY_KEY_ENV,
    app_from_env,
    make_app,
    metrics_hooks,
)
from aichatonline_sync.testing import Emulator

pytest.importorskip("prometheus_client")
pytest.importorskip("gunicorn")
from prometheus_client.parser import text_string_to_metric_families
from test_gateway import (
    KEY,
    MESSAGES,
    MODEL,
    REPLY,
    WAIT,
    EmulatorLog,
    child_env,
    read_line,
    serving,
    stop,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ORIGIN = "http://127.0.0.1:1"  # a page's origin in the raw tests (never contacted)


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``/metrics``: (name, labels) -> value."""
    with http() as client:
        response = client.get(f"{base}/metrics", timeout=WAIT)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_total(found: dict[Any, float], path: str, status: str) -> float:
    key = ("aichatonline_gateway_requests_total", (("path", path), ("status", status)))
    return found.get(key, 0.0)


@pytest.fixture
def local(emulator: Callable[..., Emulator]) -> Iterator[tuple[Emulator, str]]:
    emu = emulator(reply=REPLY)
    session = aco.Session(emu.url, max_retries=0, timeout=WAIT)
    with session, serving(make_app(session, api_key=KEY, cors_origins=[ORIGIN])) as base:
        yield emu, base


# -- health, HEAD, metrics ------------------------------------------------------------------------


def test_health_needs_no_key_and_calls_no_upstream(local: tuple[Emulator, str]) -> None:
    emu, base = local
    with http() as client:
        response = client.get(f"{base}/health", timeout=WAIT)
        head = client.head(f"{base}/health", timeout=WAIT)
        models_head = client.head(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT
        )
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert (head.status_code, head.content) == (200, b"")
    assert (models_head.status_code, models_head.content) == (200, b"")
    assert emu.requests == []


def test_metrics_count_requests_by_path_and_status(local: tuple[Emulator, str]) -> None:
    emu, base = local
    before = samples(base)
    auth = {"Authorization": f"Bearer {KEY}"}
    with http() as client:
        chat = {"model": MODEL, "messages": MESSAGES}
        assert client.post(f"{base}/v1/chat/completions", json=chat, headers=auth).ok
        streamed = client.post(
            f"{base}/v1/chat/completions", json={**chat, "stream": True}, headers=auth
        )
        assert streamed.text.endswith("data: [DONE]\n\n")
        assert client.post(f"{base}/v1/chat/completions", json=chat).status_code == 401
        assert client.get(f"{base}/v1/models/gpt-9", headers=auth).status_code == 404
        assert client.get(f"{base}/nowhere/{time.time()}", headers=auth).status_code == 404
        emu.fail("chat", 500)
        assert client.post(f"{base}/v1/chat/completions", json=chat, headers=auth).status_code == 502
    after = samples(base)

    def delta(path: str, status: str) -> float:
        return requests_total(after, path, status) - requests_total(before, path, status)

    assert delta("/v1/chat/completions", "200") == 2
    assert delta("/v1/chat/completions", "401") == 1
    assert delta("/v1/chat/completions", "502") == 1
    assert delta("/v1/models/{model}", "404") == 1
    assert delta("other", "404") == 1
    assert delta("/metrics", "200") == 1  # the first scrape
    errors = ("aichatonline_gateway_upstream_errors_total", (("type", "upstream_error"),))
    assert after[errors] - before.get(errors, 0) == 1
    ttfb = ("aichatonline_gateway_time_to_first_byte_seconds_count", (("path", "/v1/chat/completions"),))
    assert after[ttfb] - before.get(ttfb, 0) == 4
    assert after[("aichatonline_gateway_active_streams", ())] == 0


RETRIES = ("aichatonline_gateway_upstream_retries_total", ())
#: A Retry-After that makes a retry's wait a millisecond, for sessions whose sleep is the real one.
SOON = {"retry-after-ms": "1"}


def test_metrics_count_the_retries_of_a_session_made_with_metrics_hooks(
    emulator: Callable[..., Emulator], no_sleep: Any
) -> None:
    emu = emulator(reply=REPLY)
    session = aco.Session(
        emu.url, retry=no_sleep.policy(max_retries=2), timeout=WAIT, event_hooks=metrics_hooks()
    )
    with session, serving(make_app(session)) as base:
        before = samples(base)
        emu.fail("chat", 503, times=2)
        with http() as client:
            reply = client.post(
                f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}
            )
        assert reply.status_code == 200
        after = samples(base)
    assert after[RETRIES] - before.get(RETRIES, 0) == 2
    assert len(no_sleep.sleeps) == 2


def test_metrics_count_a_token_retry_and_a_chat_retry_once_each(
    emulator: Callable[..., Emulator], no_sleep: Any
) -> None:
    emu = emulator(reply=REPLY)
    session = aco.Session(
        emu.url, retry=no_sleep.policy(max_retries=3), timeout=WAIT, event_hooks=metrics_hooks()
    )
    with session, serving(make_app(session)) as base:
        before = samples(base)
        emu.fail("token", 500)
        emu.fail("chat", 502)
        with http() as client:
            reply = client.post(
                f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}
            )
        assert reply.status_code == 200, reply.text
        after = samples(base)
    assert (len(emu.token_requests), len(emu.chat_requests)) == (2, 2)
    assert after[RETRIES] - before.get(RETRIES, 0) == 2
    assert len(no_sleep.sleeps) == 2


def test_metrics_count_the_retries_of_the_session_the_app_makes(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator(reply=REPLY)
    app = app_from_env({"AICHATONLINE_BASE_URL": emu.url, "AICHATONLINE_MAX_RETRIES": "3"})
    try:
        with serving(app) as base:
            before = samples(base)
            emu.fail("token", 503, headers=SOON)
            emu.fail("chat", 503, headers=SOON, times=2)
            with http() as client:
                reply = client.post(
                    f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}
                )
            assert reply.status_code == 200, reply.text
            after = samples(base)
    finally:
        app.close()
    assert after[RETRIES] - before.get(RETRIES, 0) == 3


def test_a_given_session_without_metrics_hooks_adds_no_retries(
    emulator: Callable[..., Emulator], no_sleep: Any
) -> None:
    emu = emulator(reply=REPLY)
    session = aco.Session(emu.url, retry=no_sleep.policy(max_retries=2), timeout=WAIT)
    with session, serving(make_app(session)) as base:
        before = samples(base)
        emu.fail("chat", 503)
        with http() as client:
            reply = client.post(
                f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}
            )
        assert reply.status_code == 200
        after = samples(base)
    assert no_sleep.sleeps != []  # it was retried, and the retry was logged, not counted
    assert after.get(RETRIES, 0) == before.get(RETRIES, 0)


def test_the_gateway_command_counts_the_retries_of_its_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aichatonline_sync import gateway, testing
    from aichatonline_sync.cli import commands as _cli
    from aichatonline_sync.gateway.metrics import metrics

    emu = Emulator(reply=REPLY)
    monkeypatch.setattr(testing, "Emulator", lambda: emu)  # --emulator starts and stops this one
    counted: list[float] = []

    def make_app(session: aco.Session, **_: Any) -> object:
        registry = metrics().registry
        before = registry.get_sample_value(RETRIES[0]) or 0.0
        emu.fail("chat", 503, headers=SOON)
        assert session.complete(MESSAGES) == "".join(REPLY)
        counted.append((registry.get_sample_value(RETRIES[0]) or 0.0) - before)
        return object()

    def make_server(*_: Any) -> Any:
        raise OSError("not listening in this test")

    monkeypatch.setattr(gateway, "make_app", make_app)
    monkeypatch.setattr(gateway, "make_server", make_server)
    assert _cli.main(["gateway", "--emulator", "--max-retries", "2"]) == _cli.EXIT_FAILURE
    assert counted == [1.0]


def test_an_active_stream_is_counted(local: tuple[Emulator, str]) -> None:
    emu, base = local
    release = threading.Event()
    emu.before_piece = lambda index: index != 2 or release.wait(WAIT)
    with http() as client:
        response = client.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
            stream=True,
        )
        with response:
            assert samples(base)[("aichatonline_gateway_active_streams", ())] == 1
            release.set()
            assert response.text.endswith("[DONE]\n\n")
    deadline = time.monotonic() + WAIT
    while samples(base)[("aichatonline_gateway_active_streams", ())] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_metrics_without_prometheus_client_is_a_501(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import io, json\n"
        "from aichatonline_sync.gateway import make_app\n"
        "app = make_app()\n"
        "out = []\n"
        "body = app({'REQUEST_METHOD': 'GET', 'PATH_INFO': '/metrics', 'wsgi.input': io.BytesIO()},"
        " lambda status, headers, exc_info=None: out.append(status))\n"
        "print(out[0], json.loads(b''.join(body))['error']['code'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=child_env(), timeout=WAIT
    )
    assert result.stdout.strip() == "501 Not Implemented metrics_unavailable", result.stderr


# -- CORS -----------------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_the_key(
    local: tuple[Emulator, str],
) -> None:
    _, base = local
    requested = "authorization, content-type, x-stainless-lang, x-stainless-retry-count"
    with http() as client:
        response = client.options(
            f"{base}/v1/chat/completions",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": requested,
            },
            timeout=WAIT,
        )
        assert response.status_code == 204
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed == {h.strip() for h in requested.split(",")}
        assert response.content == b""
        # The answers themselves carry the header, errors too.
        ok = client.get(
            f"{base}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
        )
        refused = client.get(f"{base}/v1/models", headers={"Origin": ORIGIN})
        assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert refused.status_code == 401
        assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
        # Another origin, or none: no CORS header at all.
        other = client.options(
            f"{base}/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        plain = client.get(f"{base}/health")
    assert not [h for h in other.headers if h.lower().startswith("access-control-")]
    assert not [h for h in plain.headers if h.lower().startswith("access-control-")]


def test_cors_origins_come_from_the_environment() -> None:
    app = app_from_env({CORS_ORIGINS_ENV: "https://a.example, http://127.0.0.1:3000"})
    assert app.cors_origins == ("https://a.example", "http://127.0.0.1:3000")
    assert app_from_env({}).cors_origins == ()
    with pytest.raises(aco.InvalidRequestError, match=CORS_ORIGINS_ENV):
        app_from_env({CORS_ORIGINS_ENV: "not an origin"})
    with pytest.raises(aco.InvalidRequestError, match="cors_origins"):
        make_app(cors_origins=["https://a.example/path"])


PAGE = """<!doctype html><html><head><title>waiting</title></head><body><pre id="out"></pre>
<script>
(async () => {
  const out = document.getElementById("out");
  try {
    const response = await fetch("GATEWAY/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer KEY", "Content-Type": "application/json",
                "X-Stainless-Lang": "js"},
      body: JSON.stringify({model: "gpt-4o-mini", stream: true,
                            messages: [{role: "user", content: "Hi"}]}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", chunks = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const delta = JSON.parse(event.slice(6)).choices[0].delta;
        if (delta.content) { text += delta.content; chunks += 1; }
      }
    }
    report({status: response.status, text, chunks});
  } catch (error) {
    report({error: String(error)});
  }
})();
// The result goes back to the page's own server, which the test waits on.
function report(result) {
  fetch("/result", {method: "POST", body: JSON.stringify(result)});
}
</script></body></html>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_browser_page_on_another_origin_streams_a_reply(
    emulator: Callable[..., Emulator], tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    emu = emulator(reply=REPLY)
    page_server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), http_server.BaseHTTPRequestHandler)
    origin = f"http://127.0.0.1:{page_server.server_address[1]}"
    session = aco.Session(emu.url, max_retries=0, timeout=WAIT)
    with session, serving(make_app(session, api_key=KEY, cors_origins=[origin])) as base:
        html = PAGE.replace("GATEWAY", base).replace("KEY", KEY).encode()

        reported: list[bytes] = []
        done = threading.Event()

        class Page(http_server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(html)))
                self.end_headers()
                self.wfile.write(html)

            def do_POST(self) -> None:  # the page's result
                reported.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()
                done.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        page_server.RequestHandlerClass = Page
        thread = threading.Thread(target=page_server.serve_forever, daemon=True)
        thread.start()
        # The browser runs until the page reports (real time: a virtual-time budget ran out
        # before the fetch ended on a loaded machine).
        browser = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-proxy-server",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"{origin}/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        try:
            finished = done.wait(90)
        finally:
            browser.kill()
            _, stderr = browser.communicate(timeout=30)
            page_server.shutdown()
            page_server.server_close()
    assert finished, stderr.decode(errors="replace")[-2000:]
    assert json.loads(reported[0]) == {"status": 200, "text": "".join(REPLY), "chunks": len(REPLY)}
    assert len(emu.chat_requests) == 1


# -- under gunicorn: two workers, its log, a client that goes away --------------------------------


class Gunicorn:
    def __init__(self, proc: subprocess.Popen[bytes], base: str, log: list[str]) -> None:
        self.proc, self.base, self.log = proc, base, log

    def logged(self, pattern: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in list(self.log):
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        pytest.fail(f"gunicorn's log has no line matching {pattern!r}: {self.log[-20:]}")


@pytest.fixture(scope="module")
def gunicorn2() -> Iterator[tuple[Emulator, Gunicorn, Path]]:
    emu = Emulator(reply=REPLY).start()
    metrics_dir = Path(tempfile.mkdtemp(prefix="aco-metrics-"))
    env = {
        "AICHATONLINE_BASE_URL": emu.url,
        "AICHATONLINE_MAX_RETRIES": "0",
        "AICHATONLINE_TIMEOUT": str(WAIT),
        GATEWAY_KEY_ENV: KEY,
        CORS_ORIGINS_ENV: ORIGIN,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "--workers", "2",
         "--bind", "127.0.0.1:0", "--graceful-timeout", "3", "aichatonline_sync.gateway:app"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(env),
    )  # fmt: skip
    assert proc.stderr is not None
    base, booted, log = "", 0, []
    while booted < 2:
        line = read_line(proc.stderr, "gunicorn to start")
        log.append(line)
        found = re.search(r"Listening at: (http://\S+)", line)
        base = found.group(1) if found else base
        booted += "Booting worker" in line
    stderr = proc.stderr

    def keep_reading() -> None:
        for raw in iter(stderr.readline, b""):
            log.append(raw.decode(errors="replace"))

    threading.Thread(target=keep_reading, daemon=True).start()
    try:
        yield emu, Gunicorn(proc, base, log), metrics_dir
    finally:
        stop(proc)
        emu.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_pids(metrics_dir: Path) -> set[str]:
    return {m.group(1) for p in metrics_dir.iterdir() if (m := re.search(r"counter_(\d+)\.db", p.name))}


def test_metrics_are_summed_over_two_gunicorn_workers(
    gunicorn2: tuple[Emulator, Gunicorn, Path],
) -> None:
    _, server, metrics_dir = gunicorn2
    base = server.base
    before = requests_total(samples(base), "/v1/models", "200")
    sent = 0

    def one(_: int) -> int:
        with http() as client:  # a new connection each: the workers take turns accepting
            return client.get(
                f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT
            ).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        while len(worker_pids(metrics_dir)) < 2 or sent < 64:
            assert sent < 2000, "one worker served every request"
            assert set(pool.map(one, range(32))) == {200}
            sent += 32
    after = requests_total(samples(base), "/v1/models", "200")
    assert after - before == sent
    assert len(worker_pids(metrics_dir)) == 2


def test_failures_reach_gunicorns_error_log(gunicorn2: tuple[Emulator, Gunicorn, Path]) -> None:
    emu, server, _ = gunicorn2
    emu.reset()
    emu.fail("chat", 500)
    with http() as client:
        reply = client.post(
            f"{server.base}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=WAIT,
        )
        assert reply.status_code == 502
        assert client.post(f"{server.base}/v1/chat/completions", json={}).status_code == 401
    line = server.logged(r'\[WARNING\] 127\.0\.0\.1 "POST /v1/chat/completions" 502 upstream_error')
    assert "HTTP 500" in line
    server.logged(r'\[INFO\] 127\.0\.0\.1 "POST /v1/chat/completions" 401 invalid_api_key')
    assert KEY not in "".join(server.log)


def test_a_client_that_leaves_a_reply_that_is_not_streamed_closes_its_upstream_chat(
    gunicorn2: tuple[Emulator, Gunicorn, Path],
) -> None:
    emu, server, _ = gunicorn2
    emu.reset()
    long_reply = [f"p{index} " for index in range(5000)]
    sent: list[int] = []

    def pace(index: int) -> None:
        sent.append(index)
        time.sleep(0.002)

    emu.set_reply(long_reply)
    emu.before_piece = pace
    log = logging.getLogger("aichatonline_sync.testing")
    handler, level = EmulatorLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
        host, port = server.base.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + WAIT
            while len(sent) < 20:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        # The client is gone: the emulator's connection breaks long before the reply's end.
        assert handler.broken.wait(WAIT), "the upstream chat was not closed"
        assert len(sent) < len(long_reply) // 2
        server.logged(r'"POST /v1/chat/completions" 499')
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        emu.before_piece = None
        emu.set_reply(REPLY)


def test_the_doc_of_the_multiprocess_variable() -> None:
    from aichatonline_sync import gateway
    assert gateway.MULTIPROC_ENV == "PROMETHEUS_MULTIPROC_DIR"
    assert "PROMETHEUS_MULTIPROC_DIR" in (gateway.__doc__ or "")
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # the test process is single


def test_a_multiprocess_folder_that_is_missing_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-folder"
    done = subprocess.run(
        [sys.executable, "-m", "aichatonline_sync", "gateway", "--emulator", "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing)},
    )
    assert done.returncode == 2, done.stderr
    assert "PROMETHEUS_MULTIPROC_DIR" in done.stderr
    assert "Traceback" not in done.stderr


_STDERR_SCRIPT = """
import io, json, sys, wsgiref.util
from aichatonline_sync import Session
from aichatonline_sync.testing import Emulator
from aichatonline_sync.gateway import make_app

with Emulator() as emu:
    emu.fail("chat", 500, times=5)
    app = make_app(Session(emu.url, max_retries=0))
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    print(status[0])
"""


def test_a_5xx_is_logged_to_stderr_under_a_server_without_logging_with_metrics_on() -> None:
    """With prometheus-client installed (metrics on) and no logging set up, the gateway's warning
    of a 502 reaches stderr (the retry counter is no handler on the package's logger)."""
    done = subprocess.run(
        [sys.executable, "-c", _STDERR_SCRIPT], check=False, capture_output=True, text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "502 Bad Gateway"
    assert re.search(r"\[WARNING\] .*\"POST /v1/chat/completions\" 502 upstream_error", done.stderr)
