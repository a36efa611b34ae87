"""``AiChatOnline`` inside gpt4free's own machinery, with the real ``g4f`` package, against the emulator.

``g4f.ChatCompletion.create`` (stream and not), ``g4f.client.Client`` and ``g4f.client.AsyncClient``
(stream and not). The tests that need ``g4f`` skip where it is not installed (the ``test`` extra
installs g4f 6.7.1; CI runs this file again with the newest release). gpt4free's version check
(its one network call on first use) is turned off, its files go to a temporary folder, and the
loopback guard of ``conftest.py`` stays on, so nothing but the emulator is reached.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import AiChatOnline
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]
MESSAGES = [{"role": "user", "content": "Hi"}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]
HISTORY_PROMPT = "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
PIECES = ["Hel", "lo ", "wörld", "!"]
WORKER = "aichatonline-g4f"
MANUAL_PAGE = Path(__file__).resolve().parent.parent / "docs" / "integrations.rst"


def provider_for(emu: Emulator) -> type[AiChatOnline]:
    class P(AiChatOnline):
        url = emu.url

    return P


@pytest.fixture(autouse=True)
def _no_g4f_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("G4F_PROXY", raising=False)


@pytest.fixture
def g4f(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The real ``g4f``, with its version check off and its files (usage logs) in ``tmp_path``."""
    module = pytest.importorskip("g4f", reason="g4f is not installed (pip install -e '.[gpt4free]')")
    import g4f.cookies
    import g4f.debug

    monkeypatch.setattr(g4f.debug, "version_check", False)
    monkeypatch.setattr(g4f.cookies.CookiesConfig, "cookies_dir", str(tmp_path / "g4f"))
    yield module
    # gpt4free patches asyncio with nest_asyncio when its sync API runs inside a loop: that must
    # never have happened here (it would change asyncio for every later test).
    assert not hasattr(asyncio, "_nest_patched")


# -- without g4f --------------------------------------------------------------------------------


def test_importing_the_package_and_the_class_does_not_import_g4f_or_llm() -> None:
    code = (
        "import sys, aichatonline_sync as aco; aco.AiChatOnline.params; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('g4f', 'llm', 'asyncio')"
        " or m == 'aichatonline_sync.integrations.llm'))"
    )
    path = [str(Path(aco.__file__).resolve().parent.parent), *sys.path]
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {path!r}; {code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_the_class_works_where_g4f_cannot_be_imported(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    code = f"""
import asyncio, sys
sys.modules["g4f"] = None  # "import g4f" now fails, as where it is not installed
from aichatonline_sync import AiChatOnline

class P(AiChatOnline):
    url = {emu.url!r}

async def collect():
    return [piece async for piece in P.create_async_generator("gpt-4o-mini", [{{"role": "user", "content": "Hi"}}])]

print(list(P.create_completion("gpt-4o-mini", "Hi")), asyncio.run(collect()), P.needs_auth)
"""
    path = [str(Path(aco.__file__).resolve().parent.parent), *sys.path]
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {path!r}\n{code}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{PIECES!r} {PIECES!r} False"


def test_the_provider_protocol_attributes() -> None:
    assert AiChatOnline.needs_auth is False
    assert AiChatOnline.supports_stream is True
    assert AiChatOnline.supports_message_history is True
    assert AiChatOnline.supports_system_message is True
    assert AiChatOnline.get_dict() == {
        "name": "AiChatOnline",
        "url": "https://aichatonlineorg.erweima.ai",
        "label": None,
    }
    assert AiChatOnline.get_parent() == "AiChatOnline"
    assert AiChatOnline.get_models() == ["gpt-4o-mini"]
    assert set(AiChatOnline.get_parameters()) == {
        "model", "messages", "stream", "proxy", "timeout", "max_retries"
    }
    example = AiChatOnline.get_parameters(as_json=True)
    assert example["provider"] == "AiChatOnline"
    assert example["model"] == "gpt-4o-mini"
    assert example["stream"] is True
    assert AiChatOnline.params.startswith("g4f.Provider.AiChatOnline supports: (")
    assert "proxy: Optional[str] = None," in AiChatOnline.params


def test_a_subclass_describes_itself(emulator: MakeEmulator) -> None:
    provider = provider_for(emulator())
    assert provider.get_dict()["name"] == "P"
    assert provider.get_dict()["url"] == provider.url
    assert provider.params.startswith("g4f.Provider.P supports: (")


def test_create_async_generator_streams_without_g4f(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    provider = provider_for(emu)

    async def run() -> tuple[list[str], str]:
        pieces = [p async for p in provider.create_async_generator("gpt-4o-mini", HISTORY)]
        whole = await provider.create_async("gpt-4o-mini", MESSAGES)
        return pieces, whole

    assert asyncio.run(run()) == (PIECES, "".join(PIECES))
    assert [r.prompt for r in emu.chat_requests] == [HISTORY_PROMPT, "Hi"]


def test_async_errors_are_our_typed_errors(emulator: MakeEmulator) -> None:
    emu = emulator(reply=PIECES)
    emu.fail("chat", 503)
    provider = provider_for(emu)

    async def run() -> None:
        async for _ in provider.create_async_generator("gpt-4o-mini", MESSAGES, max_retries=0):
            pass

    with pytest.raises(aco.APIStatusError) as info:
        asyncio.run(run())
    assert info.value.status_code == 503


def test_async_bad_messages_are_invalid_requests(emulator: MakeEmulator) -> None:
    emu = emulator()

    async def run() -> None:
        async for _ in provider_for(emu).create_async_generator("gpt-4o-mini", "   "):
            pass

    with pytest.raises(aco.InvalidRequestError):
        asyncio.run(run())
    assert emu.requests == []


def test_leaving_the_async_stream_early_stops_the_chat_at_once(emulator: MakeEmulator) -> None:
    release = threading.Event()
    emu = emulator(reply=PIECES)
    # The emulator holds the third piece back until the test ends: only a cancel can end the
    # client's read of it (the read timeout is far away).
    emu.before_piece = lambda index: None if index < 2 else release.wait(30)
    provider = provider_for(emu)

    async def run() -> list[str]:
        got: list[str] = []
        stream = provider.create_async_generator("gpt-4o-mini", MESSAGES, timeout=(5, 30))
        async for piece in stream:
            got.append(piece)
            if len(got) == 2:
                break
        await stream.aclose()
        return got

    try:
        assert asyncio.run(run()) == PIECES[:2]
        workers = [t for t in threading.enumerate() if t.name == WORKER]
        for worker in workers:
            worker.join(10)
        assert not any(worker.is_alive() for worker in workers)
    finally:
        release.set()


def test_g4f_proxy_is_the_default_proxy(
    emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from _proxy import ProxyServer

    emu = emulator(reply="via proxy")
    with ProxyServer("http", tmp_path) as proxy:
        monkeypatch.setenv("G4F_PROXY", proxy.url())
        text = "".join(provider_for(emu).create_completion("gpt-4o-mini", MESSAGES))
        assert text == "via proxy"
        assert proxy.routed(emu.port) >= 1


# -- inside g4f ---------------------------------------------------------------------------------


def test_chat_completion_create_streams(emulator: MakeEmulator, g4f: ModuleType) -> None:
    emu = emulator(reply=PIECES)
    result = g4f.ChatCompletion.create(
        model="gpt-4o-mini",
        messages=HISTORY,
        provider=provider_for(emu),
        stream=True,
        ignore_working=True,
    )
    assert list(result) == PIECES
    assert emu.chat_requests[0].prompt == HISTORY_PROMPT


def test_chat_completion_create_without_stream(emulator: MakeEmulator, g4f: ModuleType) -> None:
    emu = emulator(reply=PIECES)
    text = g4f.ChatCompletion.create(
        model="gpt-4o-mini", messages=MESSAGES, provider=provider_for(emu), ignore_working=True
    )
    assert text == "".join(PIECES)


def test_chat_completion_refuses_the_provider_as_not_working(
    emulator: MakeEmulator, g4f: ModuleType
) -> None:
    # Its last known status: gpt4free asks for ignore_working=True, as it did for its own class.
    from g4f.errors import ProviderNotWorkingError

    emu = emulator()
    with pytest.raises(ProviderNotWorkingError):
        g4f.ChatCompletion.create(model="gpt-4o-mini", messages=MESSAGES, provider=provider_for(emu))
    assert emu.requests == []


def test_chat_completion_passes_proxy_and_g4f_proxy(
    emulator: MakeEmulator, g4f: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from _proxy import ProxyServer

    emu = emulator(reply="ok")
    provider = provider_for(emu)
    with ProxyServer("http", tmp_path) as proxy:
        text = g4f.ChatCompletion.create(
            model="", messages=MESSAGES, provider=provider, proxy=proxy.url(), ignore_working=True
        )
        routed = proxy.routed(emu.port)
        assert (text, routed >= 1) == ("ok", True)
        monkeypatch.setenv("G4F_PROXY", proxy.url())
        text = g4f.ChatCompletion.create(
            model="", messages=MESSAGES, provider=provider, ignore_working=True
        )
        assert (text, proxy.routed(emu.port) > routed) == ("ok", True)
        # A bad proxy: our InvalidRequestError, with the password kept out of the message.
        with pytest.raises(aco.InvalidRequestError) as info:
            g4f.ChatCompletion.create(
                model="",
                messages=MESSAGES,
                provider=provider,
                proxy="ftp://user:s3cretpw@127.0.0.1:1",
                ignore_working=True,
            )
        assert "s3cretpw" not in str(info.value)


def test_client_create_without_stream(emulator: MakeEmulator, g4f: ModuleType) -> None:
    from g4f.client import Client

    emu = emulator(reply=PIECES)
    client = Client(provider=provider_for(emu))
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HISTORY)
    assert completion.choices[0].message.content == "".join(PIECES)
    assert completion.choices[0].finish_reason == "stop"
    # g4f 6 names the provider; g4f 8 only when a provider sends its own ProviderInfo.
    assert completion.provider in ("P", None)
    assert emu.chat_requests[0].prompt == HISTORY_PROMPT
    assert client.models.get_all() == ["gpt-4o-mini"]


def test_client_create_streams(emulator: MakeEmulator, g4f: ModuleType) -> None:
    from g4f.client import Client

    emu = emulator(reply=PIECES)
    client = Client(provider=provider_for(emu))
    chunks = list(client.chat.completions.create(model="", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == [*PIECES, None]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_client_proxy_reaches_the_session(
    emulator: MakeEmulator, g4f: ModuleType, tmp_path: Path
) -> None:
    from _proxy import ProxyServer
    from g4f.client import Client

    emu = emulator(reply="ok")
    with ProxyServer("http", tmp_path) as proxy:
        client = Client(provider=provider_for(emu), proxies=proxy.url())
        completion = client.chat.completions.create(model="", messages=MESSAGES)
        assert completion.choices[0].message.content == "ok"
        routed = proxy.routed(emu.port)
        assert routed >= 1
        completion = Client(provider=provider_for(emu)).chat.completions.create(
            model="", messages=MESSAGES, proxy=proxy.url()
        )
        assert completion.choices[0].message.content == "ok"
        assert proxy.routed(emu.port) > routed


def test_client_errors_are_our_typed_errors(emulator: MakeEmulator, g4f: ModuleType) -> None:
    from g4f.client import Client

    emu = emulator(reply=PIECES)
    emu.error_line(code=500, message="upstream broke", after=2)
    client = Client(provider=provider_for(emu))
    stream = client.chat.completions.create(model="", messages=MESSAGES, stream=True)
    got: list[str] = []

    def read() -> None:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)

    with pytest.raises(aco.UpstreamError) as info:
        read()
    assert got == PIECES[:2]
    assert info.value.partial == "".join(PIECES[:2])


def test_async_client_create_without_stream(emulator: MakeEmulator, g4f: ModuleType) -> None:
    from g4f.client import AsyncClient

    emu = emulator(reply=PIECES)

    async def run() -> Any:
        client = AsyncClient(provider=provider_for(emu))
        return await client.chat.completions.create(model="gpt-4o-mini", messages=HISTORY)

    completion = asyncio.run(run())
    assert completion.choices[0].message.content == "".join(PIECES)
    assert emu.chat_requests[0].prompt == HISTORY_PROMPT


def test_async_client_create_streams(emulator: MakeEmulator, g4f: ModuleType) -> None:
    from g4f.client import AsyncClient

    emu = emulator(reply=PIECES)

    async def run() -> list[Any]:
        client = AsyncClient(provider=provider_for(emu))
        return [
            chunk.choices[0].delta.content
            async for chunk in client.chat.completions.create(
                model="", messages=MESSAGES, stream=True
            )
        ]

    assert asyncio.run(run()) == [*PIECES, None]


def test_async_client_streams_piece_by_piece(emulator: MakeEmulator, g4f: ModuleType) -> None:
    """Each piece reaches the ``async for`` while the upstream still holds the next one back."""
    from g4f.client import AsyncClient

    emu = emulator(reply=PIECES)
    gates = [threading.Event() for _ in PIECES]
    emu.before_piece = lambda index: gates[index].wait(30) if index else None

    async def run() -> list[str]:
        client = AsyncClient(provider=provider_for(emu))
        got: list[str] = []
        async for chunk in client.chat.completions.create(model="", messages=MESSAGES, stream=True):
            content = chunk.choices[0].delta.content
            if content is not None:
                got.append(content)
                if len(got) < len(PIECES):
                    gates[len(got)].set()  # the next piece is sent only now
        return got

    try:
        assert asyncio.run(run()) == PIECES
    finally:
        for gate in gates:
            gate.set()


def test_chat_completion_create_async(emulator: MakeEmulator, g4f: ModuleType) -> None:
    emu = emulator(reply=PIECES)
    provider = provider_for(emu)

    async def run() -> tuple[str, list[str]]:
        whole = await g4f.ChatCompletion.create_async(
            model="", messages=MESSAGES, provider=provider, ignore_working=True
        )
        streamed = g4f.ChatCompletion.create_async(
            model="", messages=MESSAGES, provider=provider, stream=True, ignore_working=True
        )
        return whole, [piece async for piece in streamed]

    assert asyncio.run(run()) == ("".join(PIECES), PIECES)


def readme_example() -> str:
    """The gpt4free example of docs/integrations.rst (a literal block, run here where g4f is
    installed)."""
    lines = MANUAL_PAGE.read_text(encoding="utf-8").splitlines()
    start = lines.index("installed. The tests run this example against the emulator::") + 1
    body: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        body.append(line[4:])
    return "\n".join(body).strip() + "\n"


def test_the_readme_example_runs(
    emulator: MakeEmulator,
    g4f: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emu = emulator(reply=PIECES)
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    exec(compile(readme_example(), str(MANUAL_PAGE), "exec"), {"messages": HISTORY})
    text = "".join(PIECES)
    assert capsys.readouterr().out == f"{text}{text}\n{text}{text}"
    assert [r.prompt for r in emu.chat_requests] == [HISTORY_PROMPT] * 4


def test_the_readme_example_turns_the_version_check_off_before_g4f_would_ask_pypi(
    emulator: MakeEmulator, g4f: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import g4f.debug
    import g4f.version

    checks: list[str] = []
    monkeypatch.setattr(g4f.debug, "version_check", True)  # as g4f starts: the example, copied
    monkeypatch.setattr(g4f.version.utils, "check_version", lambda *a: checks.append("PyPI"))
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emulator(reply=PIECES).url)
    exec(compile(readme_example(), str(MANUAL_PAGE), "exec"), {"messages": HISTORY})
    assert checks == []


def test_the_sync_api_inside_a_running_loop_needs_no_nest_asyncio(
    emulator: MakeEmulator, g4f: ModuleType
) -> None:
    """Inside a running loop (Jupyter) gpt4free's sync calls of an async provider need
    nest_asyncio; ours is blocking code, and the fixture checks that asyncio was not patched."""
    from g4f.client import Client

    emu = emulator(reply=PIECES)

    async def cell() -> tuple[str, str]:
        provider = provider_for(emu)
        text = g4f.ChatCompletion.create(
            model="", messages=MESSAGES, provider=provider, ignore_working=True
        )
        completion = Client(provider=provider).chat.completions.create(model="", messages=MESSAGES)
        return text, completion.choices[0].message.content

    assert asyncio.run(cell()) == ("".join(PIECES), "".join(PIECES))


def test_base_url_from_the_environment_inside_g4f(
    emulator: MakeEmulator, g4f: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from g4f.client import Client

    emu = emulator(reply="from env")
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    completion = Client(provider=AiChatOnline).chat.completions.create(model="", messages=MESSAGES)
    assert completion.choices[0].message.content == "from env"
    assert completion.provider in ("AiChatOnline", None)
