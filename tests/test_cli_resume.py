"""``aichatonline batch -o OUTPUT`` resumes from OUTPUT and cannot be fooled: a record counts only
for the same prompt (and system message), the newest record of an id wins, and a record line over
the bound is skipped rather than held in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support_cli import (
    NEEDS_SCRIPT,
    prompts_file,
)
from test_cli import (
    prompt_sha256,
    records,
    reply_of,
    run,
)

import aichatonline_sync as aco
from aichatonline_sync.cli.io import read_done
from aichatonline_sync.testing import Emulator

pytestmark = NEEDS_SCRIPT


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


def test_resume_reads_no_line_beyond_the_bound(tmp_path: Path) -> None:
    """A record line longer than the bound is skipped, not held in memory; its id runs again."""
    digest = prompt_sha256("one")
    long_record = json.dumps({"id": 1, "text": "x" * 5000, "prompt_sha256": digest})
    short_record = json.dumps({"id": 2, "text": "y", "prompt_sha256": prompt_sha256("two")})
    output = tmp_path / "results.jsonl"
    output.write_text(f"{long_record}\n{short_record}\n", encoding="utf-8")
    wanted = {1: digest, 2: prompt_sha256("two"), "2": prompt_sha256("two")}
    assert read_done(str(output), wanted, limit=1000) == {2}  # (the id 2, not "2")
    assert read_done(str(output), wanted, limit=10_000) == {1, 2}
    assert read_done(str(tmp_path / "missing.jsonl"), wanted) == set()


def test_a_changed_prompt_runs_again(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(prompts), "-o", str(out), "--base-url", emu.url]
    assert run(*args).returncode == 0

    prompts_file(tmp_path, "one", "TWO")  # line 2 edited: the same id, another prompt
    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert second.stderr == "1 succeeded, 0 failed, 1 skipped (already done)\n"
    assert emu.chat_requests[-1].json["prompt"] == "TWO"
    got = records(out.read_text(encoding="utf-8"))
    assert [(r["id"], r["prompt_sha256"]) for r in got[-1:]] == [(2, prompt_sha256("TWO"))]
    # The old answer stays, as history; the newest record of an id is the one that counts.
    assert [r["text"] for r in got if r["id"] == 2] == [reply_of(emu, "two"), reply_of(emu, "TWO")]

    third = run(*args)
    assert third.stderr == "0 succeeded, 0 failed, 2 skipped (already done)\n"
    assert len(emu.chat_requests) == 3


def test_a_changed_system_message_runs_everything_again(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(prompts), "-o", str(out), "--base-url", emu.url]
    assert run(*args).returncode == 0
    assert run(*args, "--system", "Be brief.").stderr == (
        "2 succeeded, 0 failed, 0 skipped (already done)\n"
    )
    expected = aco.format_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    )
    assert expected in {r.json["prompt"] for r in emu.chat_requests}
    assert run(*args, "--system", "Be brief.").stderr == (
        "0 succeeded, 0 failed, 2 skipped (already done)\n"
    )


def test_the_newest_record_of_an_id_wins(emu: Emulator, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, "one", "two")
    out = tmp_path / "results.jsonl"
    history = [
        {"id": 1, "text": "old answer", "prompt_sha256": prompt_sha256("one")},
        {"id": 1, "error": {"type": "RateLimitError", "message": "429"}},  # newer: failed
        {"id": 2, "error": {"type": "RateLimitError", "message": "429"}},
        {"id": 2, "text": "answer", "prompt_sha256": prompt_sha256("two")},  # newer: done
        {"id": 3, "text": "no hash: from before records had one"},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    result = run("batch", str(prompts), "-o", str(out), "--base-url", emu.url)
    assert result.stderr == "1 succeeded, 0 failed, 1 skipped (already done)\n"
    assert [r.json["prompt"] for r in emu.chat_requests] == ["one"]
