"""README.rst cannot rot: every Python block runs against the emulator, the blocks that define tests
run under pytest with the package's fixtures, every console session is replayed and its output
compared, and every other ``aichatonline`` command line in it must parse."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from aichatonline_sync.cli.commands import UsageError, build_parser
from aichatonline_sync.testing import Emulator

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.rst"
NEWCOMER_COMMANDS = (
    'pip install . && aichatonline chat --emulator "Hello"',
    'pip install -e ".[test]" && python -m pytest',
)
#: Blocks marked ``.. skip-test`` (each needs something the tests cannot have); keep it small.
MAX_SKIPPED = 1

_DIRECTIVE = re.compile(r"^\.\. code-block::\s*(\S+)\s*$")


@dataclass(frozen=True)
class Block:
    kind: str  # "python", "console", ... or "literal" for a ``::`` block
    line: int  # 1-based line of the first line of code
    code: str
    skip: bool


def _indented_block(lines: list[str], start: int) -> tuple[int, str]:
    """The indented block after line ``start`` (0-based index): (1-based first line, dedented text)."""
    index = start + 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    first = index
    body: list[str] = []
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
        body.append(lines[index])
        index += 1
    while body and not body[-1].strip():
        body.pop()
    indent = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
    return first + 1, "\n".join(x[indent:] for x in body) + "\n"


def read_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, text in enumerate(lines):
        match = _DIRECTIVE.match(text)
        if match:
            kind = match.group(1)
        elif text.rstrip().endswith("::") and not text.startswith(".."):
            kind = "literal"
        else:
            continue
        previous = next((x for x in reversed(lines[:index]) if x.strip()), "")
        line, code = _indented_block(lines, index)
        blocks.append(Block(kind, line, code, previous.startswith(".. skip-test")))
    return blocks


BLOCKS = read_blocks()
PYTHON = [b for b in BLOCKS if b.kind == "python" and not b.skip and "def test_" not in b.code]
PYTEST = [b for b in BLOCKS if b.kind == "python" and not b.skip and "def test_" in b.code]
CONSOLE = [b for b in BLOCKS if b.kind == "console" and not b.skip]


# --- the shape of the manual ------------------------------------------------------------------


def test_newcomer_commands_come_first_exactly() -> None:
    head = README.read_text(encoding="utf-8").split("\n-------", 1)[0]  # before the first section
    for command in NEWCOMER_COMMANDS:
        assert f"\n    {command}\n" in head, command
    assert head.index(NEWCOMER_COMMANDS[0]) < head.index(NEWCOMER_COMMANDS[1])


def test_only_checkable_blocks_and_few_skips() -> None:
    assert {b.kind for b in BLOCKS} <= {"python", "console", "literal"}
    assert PYTHON
    assert PYTEST
    assert CONSOLE
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [b.line for b in skipped]


@pytest.mark.parametrize(
    "section",
    [
        "Quickstart",
        "Notebooks",
        "Conversations",
        "Batches",
        "Command line",
        "The emulator, and testing your own code",
        "Errors",
        "Retries",
        "Timeouts, proxies and TLS",
        "Logging",
        "Benchmarks",
        "Moving from gpt4free",
    ],
)
def test_sections(section: str) -> None:
    assert f"\n{section}\n{'-' * len(section)}\n" in README.read_text(encoding="utf-8")


# --- Python blocks ----------------------------------------------------------------------------


class FakeKernelDisplay:
    """``IPython`` as a Jupyter kernel has it, for ``display_stream``: records what is shown."""

    def __init__(self) -> None:
        self.shown: dict[int, str] = {}
        self.kernel = object()

    def display(self, obj: dict[str, str], **kwargs: Any) -> Any:
        number = len(self.shown)
        self.shown[number] = obj["text/markdown"]
        owner = self

        class Handle:
            def update(self, new: dict[str, str], **kwargs: Any) -> None:
                owner.shown[number] = new["text/markdown"]

        return Handle()


@pytest.fixture
def fake_ipython(monkeypatch: pytest.MonkeyPatch) -> FakeKernelDisplay:
    fake = FakeKernelDisplay()
    package = types.ModuleType("IPython")
    package.get_ipython = lambda: fake  # type: ignore[attr-defined]
    display = types.ModuleType("IPython.display")
    display.display = fake.display  # type: ignore[attr-defined]
    package.display = display  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", package)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return fake


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger("aichatonline_sync")
    saved = (root.level, list(root.handlers), ours.level, list(ours.handlers))
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    ours.setLevel(saved[2])
    ours.handlers[:] = saved[3]


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    # Padded with newlines so that a traceback names the README's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    exec(code, namespace)


def test_python_blocks_run_against_the_emulator(
    emulator: Callable[..., Emulator],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_ipython: FakeKernelDisplay,
    restore_logging: None,
) -> None:
    emu = emulator()
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    for block in PYTHON:
        run_block(block, namespace)
    out = capsys.readouterr().out

    assert "This is the AiChatOnline emulator" in out
    assert "alice:***@proxy.example:3128" in out
    assert "s3cret" not in out
    shown = list(fake_ipython.shown.values())
    assert any('You said: "Write a haiku about HTTP"' in text for text in shown)
    assert all(text.endswith("one line per piece.") for text in shown)  # the final update
    assert (tmp_path / "conversation.json").is_file()
    # The examples did reach the emulator, not the real service.
    assert len(emu.chat_requests) >= len(PYTHON)


def test_blocks_that_define_tests_pass_under_pytest(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import aichatonline_sync.testing.pytest_plugin as plugin\n\n"
        "def pytest_configure(config):\n"
        "    if not config.pluginmanager.is_registered(plugin):\n"
        "        config.pluginmanager.register(plugin, 'aichatonline_sync.testing.pytest_plugin')\n"
    )
    count = 0
    for number, block in enumerate(PYTEST):
        pytester.makepyfile(**{f"test_readme_block_{number}": block.code})
        count += len(re.findall(r"^def test_", block.code, re.M))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=count)


# --- command lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    command: str
    expected: str


def console_steps(block: Block) -> list[Step]:
    steps: list[Step] = []
    command: str | None = None
    expected: list[str] = []
    for text in block.code.splitlines():
        if text.startswith("$ "):
            if command is not None:
                steps.append(Step(command, "\n".join(expected)))
            command, expected = text[2:], []
        else:
            assert command is not None, f"README.rst:{block.line}: output before any '$ ' command"
            expected.append(text)
    if command is not None:
        steps.append(Step(command, "\n".join(expected)))
    return steps


def matches(expected: str, actual: str) -> bool:
    """``expected`` with ``...`` standing for any text."""
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual, re.S) is not None


def shell_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AICHATONLINE_") and not key.lower().endswith("_proxy")
    }
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the package under test
    env["HOME"] = str(tmp_path)
    return env


@pytest.mark.parametrize("block", CONSOLE, ids=lambda b: f"README.rst:{b.line}")
def test_console_sessions_replay(block: Block, tmp_path: Path) -> None:
    steps = console_steps(block)
    script = ["set +e"]
    if shutil.which("aichatonline", path=os.path.dirname(sys.executable)) is None:
        # Not installed as a script (e.g. run from a source tree): the module does the same.
        script.append(
            f'aichatonline() {{ {shlex.quote(sys.executable)} -m aichatonline_sync "$@"; }}'
        )
    for number, step in enumerate(steps):
        script.append(
            f"{{ {step.command}\n}} 2>&1; __rc=$?; printf '\\n@@{number}@@\\n'; (exit $__rc)"
        )
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env=shell_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    outputs = re.split(r"\n@@\d+@@\n", result.stdout)
    assert len(outputs) == len(steps) + 1, result.stdout + result.stderr
    for step, output in zip(steps, outputs):
        actual = output.rstrip("\n")
        assert matches(step.expected, actual), (
            f"$ {step.command}\n--- README.rst:{block.line} shows:\n{step.expected}\n"
            f"--- the command printed:\n{actual}"
        )


def command_lines() -> list[tuple[int, list[str]]]:
    """Every ``aichatonline ...`` invocation in literal blocks (those of console blocks are run)."""
    found = []
    for block in BLOCKS:
        if block.kind != "literal":
            continue
        for offset, text in enumerate(block.code.splitlines()):
            if "aichatonline" not in text:
                continue
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token in ("|", "||", "&&", ";", "&"):
                    if command and command[0] == "aichatonline":
                        found.append((block.line + offset, command[1:]))
                    command = []
                else:
                    command.append(token)
    return found


def test_every_command_line_parses() -> None:
    commands = command_lines()
    assert commands
    parser = build_parser()
    for line, args in commands:
        while ">" in args or "<" in args:  # drop redirections and their targets
            at = next(i for i, a in enumerate(args) if a in (">", "<"))
            del args[at : at + 2]
        try:
            parser.parse_args(args)
        except UsageError as exc:  # pragma: no cover - the message says what rotted
            pytest.fail(f"README.rst:{line}: aichatonline {shlex.join(args)}: {exc}")
