"""``aichatonline`` over TLS: an untrusted certificate says what to do on the command line, and
``--verify`` takes a CA bundle, ``false`` (with one warning), or refuses a missing file."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _support_cli import (
    NEEDS_SCRIPT,
    prompts_file,
)
from test_cli import (
    one_error_line,
    run,
)

from aichatonline_sync.testing import Emulator, default_reply

pytestmark = NEEDS_SCRIPT


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_emu(ca: trustme.CA) -> Iterator[Emulator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Emulator(ssl_context=context) as emulator:
        yield emulator


def test_untrusted_certificate_says_what_to_do_on_the_command_line(https_emu: Emulator) -> None:
    result = run("chat", "--base-url", https_emu.url, "--max-retries", "0", "Hi")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "certificate verify failed" in line
    assert "--verify /path/to/ca.pem" in line
    assert "REQUESTS_CA_BUNDLE" in line
    assert "verify='" not in line  # a Python keyword the command line does not have
    assert https_emu.requests == []


def test_verify_a_ca_bundle_trusts_its_certificates(
    https_emu: Emulator, ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    result = run("chat", "--base-url", https_emu.url, "--verify", str(bundle), "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hi") + "\n"
    assert result.stderr == ""
    prompts = prompts_file(tmp_path, "one")
    batch = run("batch", str(prompts), "--base-url", https_emu.url, "--verify", str(bundle))
    assert batch.returncode == 0, batch.stderr


def test_verify_false_warns_once_and_connects(https_emu: Emulator) -> None:
    result = run("chat", "--base-url", https_emu.url, "--verify", "false", "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_reply("Hi") + "\n"
    # One warning of ours, not urllib3's at every request.
    assert result.stderr == (
        "aichatonline: WARNING: TLS certificates are not verified (--verify false)\n"
    )


def test_verify_a_missing_bundle_is_a_usage_error(https_emu: Emulator, tmp_path: Path) -> None:
    result = run("chat", "--base-url", https_emu.url, "--verify", str(tmp_path / "nope.pem"), "Hi")
    assert result.returncode == 2
    assert "--verify" in one_error_line(result.stderr)
    assert https_emu.requests == []
