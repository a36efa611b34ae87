"""Security over real sockets: TLS verification (on by default, a CA bundle, off), proxies through a
real proxy server on loopback (HTTP CONNECT/forwarding and SOCKS5, with credentials), environment
proxies, and no proxy password or token in any log record, repr or error."""

from __future__ import annotations

import base64
import logging
import ssl
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme
from _proxy import PASSWORD, USER, ProxyServer

import aichatonline_sync as aco
from aichatonline_sync import (
    AiChatOnlineError,
    APIConnectionError,
    InvalidRequestError,
    RetryPolicy,
    Session,
    Timeout,
    UpstreamError,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["Once ", "upon ", "a ", "time."]
TEXT = "".join(PIECES)
SHORT = Timeout(connect=5, read=5)
WRONG = "wr0ngpw9"
PROXY_ENV = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "all_proxy", "no_proxy", "REQUEST_METHOD", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA bundle from the environment unless a test sets one."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(context)
    return context


@pytest.fixture
def https_emulator(emulator: MakeEmulator, ca: trustme.CA) -> Emulator:
    return emulator(reply=PIECES, ssl_context=server_context(ca, "127.0.0.1"))


def test_tls_is_verified_by_default(https_emulator: Emulator, no_sleep: Any) -> None:
    emu = https_emulator
    assert emu.url.startswith("https://")
    with (
        Session(emu.url, timeout=SHORT, retry=no_sleep.policy(0)) as session,
        pytest.raises(APIConnectionError) as info,
    ):
        session.complete("hi")
    error = info.value
    assert type(error) is APIConnectionError
    assert "certificate verify failed" in str(error)
    assert "verify=" in str(error)
    assert error.url == f"{emu.url}/api/v1/user/getUniqueId"
    assert emu.requests == []  # nothing was sent over the unverified connection


def test_tls_with_the_ca_bundle(https_emulator: Emulator, ca_bundle: str) -> None:
    with Session(https_emulator.url, timeout=SHORT, verify=ca_bundle, max_retries=0) as session:
        assert list(session.chat("hi")) == PIECES
    assert len(https_emulator.chat_requests) == 1


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_off(https_emulator: Emulator) -> None:
    with Session(https_emulator.url, timeout=SHORT, verify=False, max_retries=0) as session:
        assert session.complete("hi") == TEXT


def test_tls_checks_the_host_name(
    emulator: MakeEmulator, ca: trustme.CA, ca_bundle: str, no_sleep: Any
) -> None:
    """A certificate from the trusted CA, but for another host, is refused too."""
    emu = emulator(reply=PIECES, ssl_context=server_context(ca, "other.example"))
    with (
        Session(emu.url, timeout=SHORT, verify=ca_bundle, retry=no_sleep.policy(0)) as session,
        pytest.raises(APIConnectionError, match="verify") as info,
    ):
        session.complete("hi")
    assert type(info.value) is APIConnectionError
    assert emu.requests == []


# --- proxies ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ProxyServer]]:
    """One HTTP and one SOCKS5 proxy for the module (a pproxy each)."""
    pytest.importorskip("pproxy")
    log_dir = tmp_path_factory.mktemp("proxies")
    with ProxyServer("http", log_dir) as http, ProxyServer("socks5", log_dir) as socks:
        yield {"http": http, "socks5": socks}


@pytest.fixture
def own_proxy(tmp_path: Path) -> Iterator[Callable[[str], ProxyServer]]:
    """``make(scheme)``: a proxy of the test's own (to stop it); stopped after the test."""
    pytest.importorskip("pproxy")
    made: list[ProxyServer] = []

    def make(scheme: str) -> ProxyServer:
        server = ProxyServer(scheme, tmp_path)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


#: (the proxy server, the scheme of the proxy URL): socks5h lets the proxy resolve the host.
PROXY_KINDS = [("http", "http"), ("socks5", "socks5"), ("socks5", "socks5h")]
KIND_IDS = ["http", "socks5", "socks5h"]


@pytest.fixture(params=["http", "https"])
def target(
    request: pytest.FixtureRequest, emulator: MakeEmulator, ca: trustme.CA, ca_bundle: str
) -> tuple[Emulator, Any]:
    """The emulator to reach through the proxy, over HTTP or HTTPS, and the ``verify`` for it."""
    if request.param == "http":
        return emulator(reply=PIECES), True
    return emulator(reply=PIECES, ssl_context=server_context(ca, "127.0.0.1")), ca_bundle


@pytest.mark.parametrize(("server", "scheme"), PROXY_KINDS, ids=KIND_IDS)
def test_chat_goes_through_the_proxy(
    proxies: dict[str, ProxyServer], target: tuple[Emulator, Any], server: str, scheme: str
) -> None:
    emu, verify = target
    proxy = proxies[server]
    with Session(
        emu.url, proxy=proxy.url(scheme=scheme), verify=verify, timeout=SHORT, max_retries=0
    ) as session:
        assert list(session.chat("one")) == PIECES
        assert session.complete("two") == TEXT
    assert proxy.routed(emu.port) >= 1
    assert len(emu.chat_requests) == 2


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_a_stopped_proxy_is_a_proxy_error(
    own_proxy: Callable[[str], ProxyServer], emulator: MakeEmulator, no_sleep: Any, scheme: str
) -> None:
    """The chat works through the proxy, and fails once the proxy is gone: it went through it.
    The error blames the proxy, not the service."""
    emu = emulator(reply=PIECES)
    proxy = own_proxy(scheme)
    with Session(emu.url, proxy=proxy.url(), timeout=SHORT, retry=no_sleep.policy(0)) as session:
        assert session.complete("one") == TEXT
        proxy.stop()
        with pytest.raises(APIConnectionError) as info:
            session.complete("two")
    assert len(emu.chat_requests) == 1
    message = str(info.value)
    assert "proxy" in message
    assert f"127.0.0.1:{proxy.port}" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_a_wrong_proxy_password_is_a_proxy_error(
    proxies: dict[str, ProxyServer], target: tuple[Emulator, Any], no_sleep: Any, scheme: str
) -> None:
    emu, verify = target
    proxy = proxies[scheme]
    with (
        Session(
            emu.url, proxy=proxy.url(WRONG), verify=verify, timeout=SHORT, retry=no_sleep.policy(0)
        ) as session,
        pytest.raises(AiChatOnlineError) as info,
    ):
        session.complete("hi")
    assert emu.requests == []
    assert type(info.value) is APIConnectionError, repr(info.value)
    assert "proxy" in str(info.value)


def test_socks_without_pysocks_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "socks", None)  # import socks -> ImportError
    for scheme in ("socks5", "socks5h"):
        url = f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:1080"
        with pytest.raises(InvalidRequestError, match=r"aichatonline-sync\[socks\]") as info:
            Session("http://127.0.0.1:9", proxy=url)
        assert PASSWORD not in str(info.value)
        with pytest.raises(InvalidRequestError, match=r"aichatonline-sync\[socks\]"):
            aco.complete("hi", base_url="http://127.0.0.1:9", proxy=url)


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_environment_proxies_are_honoured(
    proxies: dict[str, ProxyServer],
    target: tuple[Emulator, Any],
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    emu, verify = target
    proxy = proxies[scheme]
    variable = "HTTPS_PROXY" if emu.url.startswith("https") else "HTTP_PROXY"
    monkeypatch.setenv(variable, proxy.url())
    with Session(emu.url, verify=verify, timeout=SHORT, max_retries=0) as session:
        assert session.complete("hi") == TEXT
    assert proxy.routed(emu.port) == 1


def test_a_given_proxy_overrides_the_environment(
    proxies: dict[str, ProxyServer], emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator(reply=PIECES)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    proxy = proxies["socks5"]
    with Session(emu.url, proxy=proxy.url(), timeout=SHORT, max_retries=0) as session:
        assert session.complete("hi") == TEXT
    assert proxy.routed(emu.port) == 1


# --- no secrets in logs, reprs or errors --------------------------------------------------------


def secrets_of(emu: Emulator, *passwords: str) -> list[str]:
    found = list(emu.issued_tokens)
    for password in passwords:
        found += [password, base64.b64encode(f"{USER}:{password}".encode()).decode()]
    return found


def assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret leaked into: {text[:300]!r}"


def error_texts(error: BaseException) -> list[str]:
    """What a user may print or log of an error: str, repr, and the whole chained traceback."""
    # The three-argument form: the one-argument one is Python 3.10+.
    chained = traceback.format_exception(type(error), error, error.__traceback__)
    return [str(error), repr(error), "".join(chained)]


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_no_secret_in_logs_reprs_or_errors(
    proxies: dict[str, ProxyServer],
    target: tuple[Emulator, Any],
    caplog: pytest.LogCaptureFixture,
    scheme: str,
) -> None:
    """Every logger at DEBUG while chats go through a proxy with a password and meet retries, a
    rejected token, an error line and a wrong proxy password."""
    caplog.set_level(logging.DEBUG)  # the root logger: every library, not only ours
    emu, verify = target
    proxy = proxies[scheme]
    texts: list[str] = []
    retry = RetryPolicy(max_retries=1, sleep=lambda seconds: None)
    with Session(emu.url, proxy=proxy.url(), verify=verify, timeout=SHORT, retry=retry) as session:
        texts.append(repr(session))
        emu.fail("chat", 503)  # a retry, logged with its reason
        assert session.complete("one") == TEXT
        emu.revoke_tokens()  # a rejected token, logged, and a fresh one
        assert session.complete("two") == TEXT
        emu.error_line(500, "model overloaded", after=2)
        with pytest.raises(UpstreamError) as upstream:
            session.complete("three")
        texts += error_texts(upstream.value)
        texts.append(repr(session))
    texts.append(repr(session))
    with (
        Session(emu.url, proxy=proxy.url(WRONG), verify=verify, timeout=SHORT, retry=retry) as wrong,
        pytest.raises(AiChatOnlineError) as refused,
    ):
        wrong.complete("four")
    texts += error_texts(refused.value)
    texts.append(repr(wrong))
    assert emu.tokens_issued == 2
    assert proxy.routed(emu.port) >= 1
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    assert_no_secret(texts, secrets_of(emu, PASSWORD, WRONG))


def test_no_secret_from_an_environment_proxy(
    proxies: dict[str, ProxyServer],
    emulator: MakeEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emu = emulator(reply=PIECES)
    proxy = proxies["http"]
    texts: list[str] = []
    for password in (PASSWORD, WRONG):
        monkeypatch.setenv("HTTP_PROXY", proxy.url(password))
        with Session(emu.url, timeout=SHORT, max_retries=0) as session:
            try:
                assert session.complete("hi") == TEXT
            except AiChatOnlineError as exc:
                texts += error_texts(exc)
            texts.append(repr(session))
    assert len(emu.chat_requests) == 1  # the right password worked, the wrong one failed
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    assert_no_secret(texts, secrets_of(emu, PASSWORD, WRONG))
