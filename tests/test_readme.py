"""The README and the manual cannot rot: every Python block of README.rst and of each page of
docs/ runs against the emulator, the blocks that define tests run under pytest with the package's
fixtures, every console session is replayed and its output compared, and every other
``aichatonline`` command line in them must parse."""

from __future__ import annotations

import ast
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

import aichatonline_sync.__main__ as entry
from aichatonline_sync.testing import Emulator

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
DOCS = ROOT / "docs"
#: README.rst, then every page of the manual.
PAGES = [README, *sorted(DOCS.glob("*.rst"))]
NEWCOMER_COMMANDS = (
    'pip install . && aichatonline chat --emulator "Hello"',
    'pip install -e ".[test]" && python -m pytest',
)
#: Blocks marked ``.. skip-test`` (each needs something the tests cannot have); keep it small.
MAX_SKIPPED = 1
#: ``::`` blocks of Python that this file does not run, each with the test that does.
RUN_ELSEWHERE = {
    ("docs/integrations.rst", "import g4f.debug"): "tests/test_gpt4free.py (needs g4f)",
    ("docs/features.rst", "from opentelemetry import trace"): (
        "test_the_tracing_example_prints_a_span, in a fresh interpreter (it sets the process's "
        "one tracer provider)"
    ),
}

_DIRECTIVE = re.compile(r"^\.\. code-block::\s*(\S+)\s*$")
# The command module behind ``aichatonline`` and ``python -m aichatonline_sync``, wherever it lives.
_cli = sys.modules[entry.main.__module__]


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    page: str  # "README.rst", "docs/sessions.rst", ...
    kind: str  # "python", "console", ... or "literal" for a ``::`` block
    line: int  # 1-based line of the first line of code
    code: str
    skip: bool

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_literal_python(self) -> bool:
        """A ``::`` block that is a Python program (shell lines and configuration files are not)."""
        if self.kind != "literal":
            return False
        try:
            tree = ast.parse(self.code)
        except SyntaxError:
            return False
        return any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body)


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


def read_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
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
        blocks.append(Block(page_name(path), kind, line, code, previous.startswith(".. skip-test")))
    return blocks


BLOCKS = {page_name(path): read_blocks(path) for path in PAGES}
ALL_BLOCKS = [b for blocks in BLOCKS.values() for b in blocks]


def python_blocks(page: str) -> list[Block]:
    """The page's Python blocks that run in one namespace, in order."""
    return [
        b for b in BLOCKS[page] if b.kind == "python" and not b.skip and "def test_" not in b.code
    ]


def pytest_blocks(page: str) -> list[Block]:
    return [b for b in BLOCKS[page] if b.kind == "python" and not b.skip and "def test_" in b.code]


PAGES_WITH_PYTHON = [page for page in BLOCKS if python_blocks(page)]
PYTEST = [b for page in BLOCKS for b in pytest_blocks(page)]
CONSOLE = [b for b in ALL_BLOCKS if b.kind == "console" and not b.skip]


# --- the shape of the README and the manual ---------------------------------------------------


def test_newcomer_commands_come_first_exactly() -> None:
    head = README.read_text(encoding="utf-8").split("\n-------", 1)[0]  # before the first section
    for command in NEWCOMER_COMMANDS:
        assert f"\n    {command}\n" in head, command
    assert head.index(NEWCOMER_COMMANDS[0]) < head.index(NEWCOMER_COMMANDS[1])


def test_readme_is_an_introduction_not_the_manual() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert 100 <= lines <= 220, f"README.rst has {lines} lines: the manual belongs in docs/"


def test_only_checkable_blocks_and_few_skips() -> None:
    assert {b.kind for b in ALL_BLOCKS} <= {"python", "console", "literal"}
    assert PAGES_WITH_PYTHON
    assert PYTEST
    assert CONSOLE
    skipped = [b.where for b in ALL_BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.mark.parametrize("page", list(BLOCKS))
def test_every_python_example_of_the_page_is_run(page: str) -> None:
    """No example is skipped silently: each Python block of the page runs here (or under pytest),
    or is one of the few ``RUN_ELSEWHERE`` names, or is marked ``.. skip-test``."""
    blocks = BLOCKS[page]
    run_here = python_blocks(page) + pytest_blocks(page)
    elsewhere = [
        b for b in blocks if b.is_literal_python and (page, b.code.splitlines()[0]) in RUN_ELSEWHERE
    ]
    not_run = [
        b.where
        for b in blocks
        if (b.kind == "python" or b.is_literal_python)
        and not b.skip
        and b not in run_here
        and b not in elsewhere
    ]
    assert not_run == [], "Python examples that no test runs (use '.. code-block:: python')"
    if any(b.kind == "python" or b.is_literal_python for b in blocks):
        assert run_here, f"{page} has Python examples and none of them runs here"


def test_run_elsewhere_names_blocks_that_exist() -> None:
    found = {(b.page, b.code.splitlines()[0]) for b in ALL_BLOCKS if b.is_literal_python}
    assert set(RUN_ELSEWHERE) <= found, set(RUN_ELSEWHERE) - found


def test_every_manual_page_is_in_the_toctree_and_linked_from_the_readme() -> None:
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    toctree = set(re.findall(r"^   (\w+)$", index, re.M))
    for path in DOCS.glob("*.rst"):
        if path.stem == "index":
            continue
        assert path.stem in toctree, f"docs/index.rst: no {path.stem} in a toctree"
        assert f"<docs/{path.name}>`__" in readme, f"README.rst does not link docs/{path.name}"


@pytest.mark.parametrize(
    ("page", "section"),
    [
        ("README.rst", "A short tour"),
        ("README.rst", "Benchmarks"),
        ("README.rst", "The manual"),
        ("docs/install.rst", "What CI tests"),
        ("docs/sessions.rst", "Quickstart"),
        ("docs/sessions.rst", "Session"),
        ("docs/sessions.rst", "ChatStream"),
        ("docs/sessions.rst", "Cancelling a chat from another thread"),
        ("docs/sessions.rst", "Shared sessions"),
        ("docs/sessions.rst", "Text encoding"),
        ("docs/conversations.rst", "Notebooks"),
        ("docs/conversations.rst", "Conversations"),
        ("docs/batch.rst", "Batches"),
        ("docs/cli.rst", "Command line"),
        ("docs/testing.rst", "The emulator, and testing your own code"),
        ("docs/testing.rst", "Reliability: the faults tried"),
        ("docs/errors.rst", "Errors"),
        ("docs/errors.rst", "Retries"),
        ("docs/errors.rst", "Timeouts, proxies and TLS"),
        ("docs/features.rst", "Reply cache"),
        ("docs/features.rst", "Token usage"),
        ("docs/features.rst", "Event hooks"),
        ("docs/features.rst", "Tracing with OpenTelemetry"),
        ("docs/logging.rst", "Logging"),
        ("docs/benchmarks.rst", "Benchmarks"),
        ("docs/integrations.rst", "Moving from gpt4free"),
        ("docs/integrations.rst", "The llm plugin"),
        ("docs/gateway.rst", "An OpenAI-compatible gateway"),
        ("docs/gateway.rst", "Operating it"),
        ("docs/deploy.rst", "Deploying behind a proxy"),
        ("docs/deploy.rst", "The gateway behind nginx, under systemd"),
        ("docs/api.rst", "API reference"),
    ],
)
def test_sections(page: str, section: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(section)}\n[-=~]{{{len(section)}}}\n", text, re.M), section


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
    # Padded with newlines so that a traceback names the page's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(ROOT / block.page), "exec")
    exec(code, namespace)


def check_quickstart(out: str, shown: list[str], folder: Path) -> None:
    assert "This is the AiChatOnline emulator" in out


def check_errors(out: str, shown: list[str], folder: Path) -> None:
    assert "alice:***@proxy.example:3128" in out


def check_conversations(out: str, shown: list[str], folder: Path) -> None:
    assert any('You said: "Write a haiku about HTTP"' in text for text in shown)
    assert all(text.endswith("one line per piece.") for text in shown)  # the final update
    assert (folder / "conversation.json").is_file()


def check_features(out: str, shown: list[str], folder: Path) -> None:
    assert "1 replies stored" in out
    assert "first piece after" in out


#: What each page's examples must print or leave behind, beyond running without an error.
PAGE_CHECKS: dict[str, Callable[[str, list[str], Path], None]] = {
    "README.rst": check_quickstart,
    "docs/sessions.rst": check_quickstart,
    "docs/errors.rst": check_errors,
    "docs/conversations.rst": check_conversations,
    "docs/features.rst": check_features,
    "docs/gateway.rst": check_quickstart,
}
_CHATS = re.compile(r"\b(chat|complete|say|ask|batch|batch_iter|display_stream|create)\(")


def test_page_checks_name_pages_with_python() -> None:
    assert set(PAGE_CHECKS) <= set(PAGES_WITH_PYTHON)


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON)
def test_python_blocks_run_against_the_emulator(
    page: str,
    emulator: Callable[..., Emulator],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_ipython: FakeKernelDisplay,
    restore_logging: None,
) -> None:
    """The page's Python blocks, in order, in one namespace (a page reads top to bottom)."""
    emu = emulator()
    monkeypatch.setenv("AICHATONLINE_BASE_URL", emu.url)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = python_blocks(page)
    for block in blocks:
        run_block(block, namespace)
    out = capsys.readouterr().out

    assert "s3cret" not in out
    if page in PAGE_CHECKS:
        PAGE_CHECKS[page](out, list(fake_ipython.shown.values()), tmp_path)
    # The examples did reach the emulator, not the real service (those that make their own
    # emulator aside).
    chatting = [b for b in blocks if _CHATS.search(b.code) and "Emulator(" not in b.code]
    assert len(emu.chat_requests) >= len(chatting)


def test_the_tracing_example_prints_a_span(
    emulator: Callable[..., Emulator], tmp_path: Path
) -> None:
    """docs/features.rst's OpenTelemetry example, in a fresh interpreter: it sets the process's
    one tracer provider, which the tests of this process must not inherit."""
    pytest.importorskip("opentelemetry.sdk")
    block = next(
        b for b in BLOCKS["docs/features.rst"] if b.code.startswith("from opentelemetry import")
    )
    env = shell_env(tmp_path)
    env["AICHATONLINE_BASE_URL"] = emulator().url
    result = subprocess.run(
        [sys.executable, "-c", "import aichatonline_sync as aco\n" + block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"name": "chat gpt-4o-mini"' in result.stdout, result.stdout


def test_blocks_that_define_tests_pass_under_pytest(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import aichatonline_sync.testing.pytest_plugin as plugin\n\n"
        "def pytest_configure(config):\n"
        "    if not config.pluginmanager.is_registered(plugin):\n"
        "        config.pluginmanager.register(plugin, 'aichatonline_sync.testing.pytest_plugin')\n"
    )
    count = 0
    for number, block in enumerate(PYTEST):
        pytester.makepyfile(**{f"test_manual_block_{number}": block.code})
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
            assert command is not None, f"{block.where}: output before any '$ ' command"
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


@pytest.mark.parametrize("block", CONSOLE, ids=lambda b: b.where)
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
            f"$ {step.command}\n--- {block.where} shows:\n{step.expected}\n"
            f"--- the command printed:\n{actual}"
        )


def command_lines() -> list[tuple[str, list[str]]]:
    """Every ``aichatonline ...`` invocation in literal blocks (those of console blocks are run)."""
    found = []
    for block in ALL_BLOCKS:
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
                        found.append((f"{block.page}:{block.line + offset}", command[1:]))
                    command = []
                else:
                    command.append(token)
    return found


def test_every_command_line_parses() -> None:
    commands = command_lines()
    assert commands
    parser = _cli.build_parser()
    for where, args in commands:
        while ">" in args or "<" in args:  # drop redirections and their targets
            at = next(i for i, a in enumerate(args) if a in (">", "<"))
            del args[at : at + 2]
        try:
            parser.parse_args(args)
        except _cli.UsageError as exc:  # pragma: no cover - the message says what rotted
            pytest.fail(f"{where}: aichatonline {shlex.join(args)}: {exc}")
