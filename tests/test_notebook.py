"""Notebooks: ``display_stream`` (with IPython's display mocked), chats inside a running asyncio
event loop, and ``examples/quickstart.ipynb`` executed for real by a Jupyter kernel."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import aichatonline_sync as aco
from aichatonline_sync import (
    Conversation,
    IncompleteStreamError,
    InvalidRequestError,
    Session,
    display_stream,
)
from aichatonline_sync.testing import Emulator

MakeEmulator = Callable[..., Emulator]

PIECES = ["# Title", "\n\n", "Some ", "**bold** ", "text."]
TEXT = "".join(PIECES)
NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.fixture
def emu(emulator: MakeEmulator) -> Emulator:
    return emulator(reply=PIECES)


@pytest.fixture
def session(emu: Emulator) -> Iterator[Session]:
    with Session(emu.url, max_retries=0) as s:
        yield s


class Display:
    """Stands in for ``IPython.display.display``: records every display and update."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def __call__(self, obj: dict[str, str], **kwargs: Any) -> Any:
        self.calls.append(("display", obj, kwargs))
        return self.Handle(self) if kwargs.get("display_id") else None

    class Handle:
        def __init__(self, owner: Display) -> None:
            self.owner = owner

        def update(self, obj: dict[str, str], **kwargs: Any) -> None:
            self.owner.calls.append(("update", obj, kwargs))

    @property
    def texts(self) -> list[str]:
        return [obj["text/markdown"] for _, obj, _ in self.calls]


class KernelShell:
    kernel = object()  # what a Jupyter kernel's shell has and a terminal shell has not


class TerminalShell:
    pass


@pytest.fixture
def ipython(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Display]:
    """``use(shell)`` makes ``display_stream`` see ``shell`` as the running IPython shell."""
    IPython = pytest.importorskip("IPython")
    ipython_display = pytest.importorskip("IPython.display")

    def use(shell: Any) -> Display:
        display = Display()
        monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
        monkeypatch.setattr(ipython_display, "display", display)
        return display

    return use


# --- display_stream ---------------------------------------------------------------------------


def test_live_updates_every_piece_then_a_final_one(ipython: Any, session: Session) -> None:
    display = ipython(KernelShell())
    assert display_stream(session.chat("Hi"), min_interval=0) == TEXT
    kinds = [kind for kind, _, _ in display.calls]
    assert kinds == ["display"] + ["update"] * len(PIECES)
    prefixes = ["".join(PIECES[: n + 1]) for n in range(len(PIECES))]
    assert display.texts == [*prefixes, TEXT]  # each update shows all the text so far
    first, *updates = display.calls
    assert first[2] == {"raw": True, "display_id": True}
    assert all(kwargs == {"raw": True} for _, _, kwargs in updates)
    assert all(obj["text/plain"] == obj["text/markdown"] for _, obj, _ in display.calls)


def test_throttled_updates_still_end_with_the_whole_text(ipython: Any, session: Session) -> None:
    display = ipython(KernelShell())
    assert display_stream(session.chat("Hi"), min_interval=3600) == TEXT
    assert [kind for kind, _, _ in display.calls] == ["display", "update"]
    assert display.texts == [PIECES[0], TEXT]


def test_messages_are_sent_first(ipython: Any, emu: Emulator, session: Session) -> None:
    display = ipython(KernelShell())
    assert display_stream("Hi", session=session, min_interval=3600) == TEXT
    assert emu.chat_requests[-1].prompt == "Hi"
    assert display.texts[-1] == TEXT


def test_messages_with_options_use_the_shared_session(ipython: Any, emu: Emulator) -> None:
    ipython(KernelShell())
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert display_stream(messages, base_url=emu.url, conversation_id="c1") == TEXT
    assert display_stream("Again", base_url=emu.url) == TEXT
    assert emu.chat_requests[0].json == {
        "conversationId": "c1",
        "prompt": "System: S\nUser: Hi\nAssistant:",
    }
    assert emu.tokens_issued == 1


def test_any_iterator_of_str(ipython: Any) -> None:
    display = ipython(KernelShell())
    assert display_stream(iter(["a", "b"]), min_interval=0) == "ab"
    assert display.texts == ["a", "ab", "ab"]


def test_a_conversation_reply(ipython: Any, session: Session) -> None:
    ipython(KernelShell())
    conv = Conversation(session=session)
    assert display_stream(conv.ask("Hi")) == TEXT
    assert len(conv) == 2  # read to its end by display_stream: both turns were added


def test_a_broken_stream_shows_what_arrived_and_raises(
    ipython: Any, emu: Emulator, session: Session
) -> None:
    display = ipython(KernelShell())
    emu.drop(after=3)
    stream = session.chat("Hi")
    with pytest.raises(IncompleteStreamError) as info:
        display_stream(stream, min_interval=3600)
    partial = "".join(PIECES[:3])
    assert info.value.partial == partial
    assert display.texts[-1] == partial
    assert stream.closed


def test_an_interrupt_closes_the_stream_and_shows_what_arrived(ipython: Any) -> None:
    display = ipython(KernelShell())
    closed = []

    def pieces() -> Iterator[str]:
        try:
            yield "Hel"
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    with pytest.raises(KeyboardInterrupt):
        display_stream(pieces(), min_interval=3600)
    assert closed == [True]
    assert display.texts == ["Hel", "Hel"]


def test_a_terminal_shell_shows_the_reply_once(ipython: Any, session: Session) -> None:
    display = ipython(TerminalShell())
    assert display_stream(session.chat("Hi"), min_interval=0) == TEXT
    assert display.calls == [
        ("display", {"text/markdown": TEXT, "text/plain": TEXT}, {"raw": True})
    ]


def test_outside_ipython_it_raises_and_sends_nothing(ipython: Any, emu: Emulator) -> None:
    display = ipython(None)
    with pytest.raises(InvalidRequestError, match="none is running here") as info:
        display_stream("Hi", base_url=emu.url)
    assert "aichatonline_sync.chat(" in str(info.value)
    assert emu.requests == []
    assert display.calls == []


def test_without_ipython_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator
) -> None:
    monkeypatch.setitem(sys.modules, "IPython", None)  # import IPython -> ImportError
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    with pytest.raises(InvalidRequestError, match=r"aichatonline-sync\[notebook\]"):
        display_stream("Hi", base_url=emu.url)
    assert emu.requests == []


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((iter(["a"]),), {"model": "gpt-4o-mini"}, "apply when display_stream"),
        ((3,), {}, "not int"),
        (("Hi",), {"min_interval": -1}, "min_interval"),
        (("Hi",), {"min_interval": float("nan")}, "min_interval"),
        (("Hi",), {"bogus": 1}, "unknown option"),
        (("",), {}, "empty"),
    ],
)
def test_bad_arguments(
    ipython: Any, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    display = ipython(KernelShell())
    with pytest.raises(InvalidRequestError, match=message):
        display_stream(*args, **kwargs)
    assert display.calls == []


def test_session_options_with_a_session(ipython: Any, session: Session) -> None:
    ipython(KernelShell())
    with pytest.raises(InvalidRequestError, match="to the Session"):
        display_stream("Hi", session=session, max_retries=1)


# --- no event loop needed ---------------------------------------------------------------------


def test_blocking_calls_work_inside_a_running_event_loop(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator
) -> None:
    """Jupyter runs every cell inside a running asyncio loop; gpt4free's sync API then failed
    (``run_until_complete`` inside a running loop) unless nest_asyncio patched it."""
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)

    async def cell() -> list[Any]:
        loop = asyncio.get_running_loop()
        # What a sync wrapper around async code runs into here:
        coroutine = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="running"):
            loop.run_until_complete(coroutine)
        coroutine.close()
        # This client is plain blocking code: it does not care.
        conv = Conversation(system="S")
        return [
            aco.complete("Hi"),
            "".join(aco.chat("Hi")),
            conv.say("Hi"),
            aco.batch(["a", "b"], max_workers=2),
        ]

    assert asyncio.run(cell()) == [TEXT, TEXT, TEXT, [TEXT, TEXT]]


# --- the example notebook, run by a real Jupyter kernel ---------------------------------------

_CHECK = """\
import asyncio, json, sys
try:
    asyncio.get_running_loop()
    running = True
except RuntimeError:
    running = False
print(json.dumps({"prefix": sys.prefix, "loop_running": running}))
"""


def test_quickstart_notebook_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import json

    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)  # the kernel talks to the emulator on loopback

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{NOTEBOOK.name}: commit it with its outputs cleared"
            assert cell.execution_count is None
    nb.cells.append(nbformat.v4.new_code_cell(_CHECK, id="test-check"))

    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on any error in any cell

    cells = {cell.get("id"): cell for cell in nb.cells}
    check = json.loads(cells["test-check"].outputs[-1]["text"])
    assert check["prefix"] == sys.prefix, "the kernel must run this Python (the venv's ipykernel)"
    assert check["loop_running"] is True  # the cells ran inside a running asyncio loop

    shown = [
        output["data"]["text/markdown"]
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "display_data" and "text/markdown" in output["data"]
    ]
    assert shown, "display_stream showed nothing"
    assert any("Please answer in **Markdown**" in text for text in shown)
    assert all(text.endswith("one line per piece.") for text in shown)  # the final update landed
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
