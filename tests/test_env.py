"""``aichatonline_sync._client.env``: the ``AICHATONLINE_*`` settings that the CLI, the llm plugin and the
gateway read from the environment."""

from __future__ import annotations

import pytest

from aichatonline_sync import InvalidRequestError, Session, Timeout
from aichatonline_sync._client.env import (
    gateway_key_from_env,
    session_options_from_env,
    setting_from_env,
)


def test_nothing_set_is_no_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AICHATONLINE_PROXY", "AICHATONLINE_TIMEOUT", "AICHATONLINE_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    assert session_options_from_env() == {}
    assert session_options_from_env({"AICHATONLINE_TIMEOUT": "  ", "AICHATONLINE_PROXY": ""}) == {}


def test_values_are_parsed_and_fit_a_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AICHATONLINE_PROXY", " http://user:pw@127.0.0.1:3128 ")
    monkeypatch.setenv("AICHATONLINE_TIMEOUT", "2.5")
    monkeypatch.setenv("AICHATONLINE_MAX_RETRIES", "0")
    options = session_options_from_env()
    assert options == {
        "proxy": "http://user:pw@127.0.0.1:3128",
        "timeout": Timeout(connect=2.5, read=2.5),
        "max_retries": 0,
    }
    with Session("http://127.0.0.1:1", **options) as session:
        assert session.retry.max_retries == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AICHATONLINE_TIMEOUT", "soon", "$AICHATONLINE_TIMEOUT: must be a number of seconds, not 'soon'"),
        ("AICHATONLINE_TIMEOUT", "0", "$AICHATONLINE_TIMEOUT: must be a positive number of seconds, not '0'"),
        ("AICHATONLINE_TIMEOUT", "nan", "$AICHATONLINE_TIMEOUT: must be a positive number of seconds, not 'nan'"),
        ("AICHATONLINE_TIMEOUT", "1,2,3", "$AICHATONLINE_TIMEOUT: must be SECONDS, CONNECT,READ or 'none', not '1,2,3'"),
        ("AICHATONLINE_TIMEOUT", "5,-1", "$AICHATONLINE_TIMEOUT: must be a positive number of seconds, not '-1'"),
        ("AICHATONLINE_MAX_RETRIES", "-1", "$AICHATONLINE_MAX_RETRIES: must be a whole number >= 0, not '-1'"),
        ("AICHATONLINE_MAX_RETRIES", "2.5", "$AICHATONLINE_MAX_RETRIES: must be a whole number >= 0, not '2.5'"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        session_options_from_env({name: value})
    assert str(info.value) == message


def test_a_bad_proxy_keeps_its_password_out_of_the_message() -> None:
    with pytest.raises(InvalidRequestError) as info:
        session_options_from_env({"AICHATONLINE_PROXY": "ftp://user:s3cretpw@127.0.0.1:1"})
    assert str(info.value).startswith("$AICHATONLINE_PROXY: ")
    assert "s3cretpw" not in str(info.value)


def test_one_setting_at_a_time() -> None:
    environ = {"AICHATONLINE_TIMEOUT": "soon", "AICHATONLINE_MAX_RETRIES": "3"}
    assert setting_from_env("max_retries", environ) == 3
    assert setting_from_env("proxy", environ) is None
    with pytest.raises(InvalidRequestError, match=r"^\$AICHATONLINE_TIMEOUT: "):
        setting_from_env("timeout", environ)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", Timeout(connect=30, read=30)),
        ("5, 60", Timeout(connect=5, read=60)),
        ("none", Timeout(connect=None, read=None)),
        ("5,None", Timeout(connect=5, read=None)),
    ],
)
def test_timeout_forms_of_the_command_line(value: str, expected: Timeout) -> None:
    assert setting_from_env("timeout", {"AICHATONLINE_TIMEOUT": value}) == expected


def test_the_base_url_and_the_gateway_key() -> None:
    environ = {"AICHATONLINE_BASE_URL": " http://127.0.0.1:8765/ ", "AICHATONLINE_GATEWAY_KEY": " k3y "}
    assert setting_from_env("base_url", environ) == "http://127.0.0.1:8765"
    assert gateway_key_from_env(environ) == "k3y"
    assert setting_from_env("base_url", {"AICHATONLINE_BASE_URL": " "}) is None
    assert gateway_key_from_env({}) is None
    # Set but blank (``AICHATONLINE_GATEWAY_KEY="$KEY"`` with $KEY unset) served an open gateway.
    for blank in ("", "  "):
        with pytest.raises(InvalidRequestError, match=r"GATEWAY_KEY is set but empty: give it a key"):
            gateway_key_from_env({"AICHATONLINE_GATEWAY_KEY": blank})
    # Neither is a session option of the llm plugin's or the command line's.
    assert session_options_from_env(environ) == {}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AICHATONLINE_BASE_URL", "ftp://example.com", "$AICHATONLINE_BASE_URL: must be an http:// or https:// URL with a host, not 'ftp://example.com'"),
        ("AICHATONLINE_GATEWAY_KEY", "two words", "$AICHATONLINE_GATEWAY_KEY: must be a non-empty string of printable ASCII characters without spaces"),
        ("AICHATONLINE_GATEWAY_KEY", "s\u00e9cret", "$AICHATONLINE_GATEWAY_KEY: must be a non-empty string of printable ASCII characters without spaces"),
    ],
)
def test_a_bad_base_url_or_key_names_its_variable(name: str, value: str, message: str) -> None:
    option = "base_url" if name.endswith("BASE_URL") else "gateway_key"
    with pytest.raises(InvalidRequestError) as info:
        setting_from_env(option, {name: value})
    assert str(info.value) == message
