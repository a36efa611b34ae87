"""Configuration objects and option validation: Timeout, RetryPolicy, base URL, proxy, Session(...)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import responses

import aichatonline_sync as aco
from aichatonline_sync import InvalidRequestError, RetryPolicy, Session, Timeout
from aichatonline_sync._client.config import MAX_SECONDS, validate_base_url, validate_proxy
from aichatonline_sync._wire.redact import redact_url

DEFAULT_BASE_URL = "https://aichatonlineorg.erweima.ai"
ENV = "AICHATONLINE_BASE_URL"


@pytest.fixture(autouse=True)
def _no_base_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


# -- Timeout ----------------------------------------------------------------------------------


def test_timeout_defaults() -> None:
    timeout = Timeout()
    assert (timeout.connect, timeout.read, timeout.total) == (10.0, 60.0, None)
    assert Timeout.coerce(None) == timeout


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, Timeout(connect=5.0, read=5.0, total=None)),
        (2.5, Timeout(connect=2.5, read=2.5)),
        ((3, 20), Timeout(connect=3.0, read=20.0)),
        ((None, 20), Timeout(connect=None, read=20.0)),
        ((3, None), Timeout(connect=3.0, read=None)),
        (Timeout(1, 2, 3), Timeout(connect=1.0, read=2.0, total=3.0)),
        (None, Timeout(10.0, 60.0, None)),
    ],
)
def test_timeout_coerce(value: Any, expected: Timeout) -> None:
    coerced = Timeout.coerce(value)
    assert isinstance(coerced, Timeout)
    assert coerced == expected


def test_timeout_values_are_floats() -> None:
    timeout = Timeout(connect=5, read=30, total=90)
    assert all(isinstance(v, float) for v in (timeout.connect, timeout.read, timeout.total))


@pytest.mark.parametrize(
    "value",
    [
        -1,
        0,
        0.0,
        -0.5,
        float("nan"),
        "5",
        "",
        True,
        False,
        (1, 2, 3),
        (1,),
        (),
        [3, 20],
        (-1, 5),
        (5, 0),
        ("1", 2),
        {"connect": 1},
    ],
)
def test_timeout_coerce_rejects(value: Any) -> None:
    with pytest.raises(InvalidRequestError):
        Timeout.coerce(value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connect": -1},
        {"read": 0},
        {"total": -5},
        {"total": float("nan")},
        {"read": "60"},
        {"connect": True},
    ],
)
def test_timeout_constructor_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        Timeout(**kwargs)


@pytest.mark.parametrize(
    "value", [float("inf"), (None, float("inf")), (5, 1e12), 1e300, 10**400, MAX_SECONDS + 1]
)
def test_a_timeout_too_long_for_the_socket_layer_is_refused(value: Any) -> None:
    # Accepted before, and then every chat failed with "timestamp out of range for platform time_t".
    with pytest.raises(InvalidRequestError, match=r"must be at most 31536000 seconds \(a year\)"):
        Session("http://127.0.0.1:9", timeout=value)


@pytest.mark.parametrize("name", ["initial_delay", "max_delay", "max_retry_after"])
@pytest.mark.parametrize("value", [float("inf"), 1e300, 10**400])
def test_a_retry_wait_too_long_to_sleep_is_refused(name: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=rf"^{name} must be at most 31536000 seconds"):
        RetryPolicy(**{name: value})


def test_the_longest_timeout_works_on_a_real_socket(emulator: Any) -> None:
    emu = emulator(reply=["Hi"])
    longest = Timeout(connect=MAX_SECONDS, read=MAX_SECONDS, total=MAX_SECONDS)
    with Session(emu.url, timeout=longest, retry=RetryPolicy(max_delay=MAX_SECONDS)) as session:
        assert session.complete("hello") == "Hi"


def test_timeout_repr_and_eq() -> None:
    assert repr(Timeout(connect=5, read=30)) == "Timeout(connect=5.0, read=30.0, total=None)"
    assert Timeout(5, 30) == Timeout(5.0, 30.0)
    assert Timeout(5, 30) != Timeout(5, 31)
    assert Timeout(5, 30, 100) != Timeout(5, 30)
    assert hash(Timeout(5, 30)) == hash(Timeout(5.0, 30.0))
    assert Timeout.coerce((3, 20)) == Timeout(3, 20)


def test_timeout_is_frozen() -> None:
    timeout = Timeout()
    with pytest.raises(AttributeError):
        timeout.read = 5  # type: ignore[misc]



@pytest.mark.parametrize(
    "value",
    [Timeout(3, 20, 90), Timeout(None, None), RetryPolicy(max_retries=5, initial_delay=0.25)],
    ids=repr,
)
def test_value_objects_pickle_copy_and_replace(value: Any) -> None:
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.copy(value) == value
    assert copy.deepcopy(value) == value
    changed = value.replace()
    assert changed == value
    assert changed is not value
    with pytest.raises(AttributeError):
        delattr(value, "max_retries" if isinstance(value, RetryPolicy) else "read")
    with pytest.raises(TypeError, match="no field 'nope'"):
        value.replace(nope=1)


def test_replace_validates_like_the_constructor() -> None:
    assert Timeout(3, 20).replace(total=60) == Timeout(3, 20, 60)
    assert RetryPolicy().replace(max_retries=7).max_retries == 7
    with pytest.raises(InvalidRequestError):
        Timeout().replace(read=-1)
    with pytest.raises(InvalidRequestError):
        RetryPolicy().replace(max_delay=0.1)  # below initial_delay
    if sys.version_info >= (3, 13):
        import copy

        assert copy.replace(Timeout(), read=5) == Timeout(read=5)  # type: ignore[attr-defined]


def test_retry_policy_pickles_its_sleep_and_hides_it() -> None:
    import pickle

    policy = RetryPolicy(max_retries=1, sleep=print)
    assert pickle.loads(pickle.dumps(policy)).sleep is print
    assert "sleep" not in repr(policy)
    assert hash(policy) == hash(RetryPolicy(max_retries=1))


#: Pickles written by 0.1.0's development versions, when these were dataclasses (protocols 0 and 4).
OLD_PICKLES = [
    (
        b"ccopy_reg\n_reconstructor\np0\n(caichatonline_sync._config\nTimeout\np1\nc__builtin__\n"
        b"object\np2\nNtp3\nRp4\n(dp5\nVconnect\np6\nF3.0\nsVread\np7\nF20.0\nsVtotal\np8\n"
        b"F90.0\nsb.",
        Timeout(3, 20, 90),
    ),
    (
        b"\x80\x04\x95\xa7\x00\x00\x00\x00\x00\x00\x00\x8c\x19aichatonline_sync._config\x94"
        b"\x8c\x0bRetryPolicy\x94\x93\x94)\x81\x94}\x94(\x8c\x0bmax_retries\x94K\x05\x8c\r"
        b"initial_delay\x94G?\xd0\x00\x00\x00\x00\x00\x00\x8c\tmax_delay\x94G@ \x00\x00\x00"
        b"\x00\x00\x00\x8c\x0fmax_retry_after\x94G@N\x00\x00\x00\x00\x00\x00\x8c\x05sleep\x94"
        b"\x8c\x04time\x94\x8c\x05sleep\x94\x93\x94ub.",
        RetryPolicy(max_retries=5, initial_delay=0.25),
    ),
]


@pytest.mark.parametrize(("data", "expected"), OLD_PICKLES, ids=["Timeout-0", "RetryPolicy-4"])
def test_pickles_from_the_dataclass_versions_still_load(data: bytes, expected: Any) -> None:
    import pickle

    assert pickle.loads(data) == expected


def test_value_objects_take_weak_references() -> None:
    import weakref

    timeout = Timeout(5, 30)
    assert weakref.ref(timeout)() is timeout


def test_module_level_option_names_are_the_session_signatures() -> None:
    import inspect

    from aichatonline_sync._client.api import CHAT_OPTIONS, SESSION_OPTIONS

    init = inspect.signature(Session.__init__).parameters
    assert frozenset(init) - {"self"} == SESSION_OPTIONS
    chat = inspect.signature(Session.chat).parameters
    keyword_only = {
        name
        for name, parameter in chat.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not name.startswith("_")
    }
    assert keyword_only == CHAT_OPTIONS


def test_import_loads_no_retry_machinery_or_optional_packages() -> None:
    # What the import costs is measured by benchmarks/run.py (--only import); this checks that the
    # packages needed only at the first request, or only by an extra, are not loaded by it.
    import subprocess

    code = (
        "import sys; import aichatonline_sync; "
        "print(sorted(m for m in ('tenacity', 'g4f', 'tqdm', 'aichatonline_sync.testing',"
        " 'aichatonline_sync.cli.commands') if m in sys.modules))"
    )
    import os

    # -S: no .pth files (an editable install's finder imports inspect itself, at start-up).
    path = [os.path.dirname(os.path.dirname(os.path.abspath(aco.__file__))), *sys.path]
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {path!r}; {code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


# -- RetryPolicy ------------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_retries == 2
    assert policy.initial_delay == 0.5
    assert policy.max_delay == 8.0
    assert policy.max_retry_after == 60.0
    assert frozenset({408, 409, 425, 429, 500, 502, 503, 504}) == policy.RETRY_STATUSES


def test_retry_policy_repr_and_eq() -> None:
    assert repr(RetryPolicy(max_retries=3)) == (
        "RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=8.0, max_retry_after=60.0)"
    )
    assert RetryPolicy(max_retries=3) == RetryPolicy(max_retries=3, sleep=lambda s: None)
    assert RetryPolicy(max_retries=3) != RetryPolicy(max_retries=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": "2"},
        {"max_retries": 2.0},
        {"max_retries": True},
        {"max_retries": None},
        {"initial_delay": -0.1},
        {"initial_delay": float("nan")},
        {"initial_delay": "1"},
        {"max_delay": -1},
        {"initial_delay": 2.0, "max_delay": 1.0},
        {"max_retry_after": -1},
        {"sleep": "not callable"},
    ],
)
def test_retry_policy_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        RetryPolicy(**kwargs)


def test_retry_policy_accepts_zero() -> None:
    policy = RetryPolicy(max_retries=0, initial_delay=0, max_delay=0, max_retry_after=0)
    assert (policy.max_retries, policy.initial_delay, policy.max_delay) == (0, 0.0, 0.0)


# -- base URL ---------------------------------------------------------------------------------


def test_base_url_default() -> None:
    assert validate_base_url(None) == DEFAULT_BASE_URL


def test_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "http://127.0.0.1:8080/")
    assert validate_base_url(None) == "http://127.0.0.1:8080"
    assert validate_base_url("https://example.com") == "https://example.com"  # an argument wins


def test_empty_environment_variable_means_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "")
    assert validate_base_url(None) == DEFAULT_BASE_URL


def test_bad_base_url_in_the_environment_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "ftp://example.com")
    with pytest.raises(InvalidRequestError, match=ENV):
        validate_base_url(None)


def test_session_reads_the_environment_when_created(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "http://127.0.0.1:8080/")
    with Session() as session:
        assert session.base_url == "http://127.0.0.1:8080"
    monkeypatch.delenv(ENV)
    with Session() as session:
        assert session.base_url == DEFAULT_BASE_URL


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/", "https://example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://localhost:1/prefix/", "http://localhost:1/prefix"),
        ("https://example.com///", "https://example.com"),
    ],
)
def test_base_url_trailing_slash_stripped(url: str, expected: str) -> None:
    assert validate_base_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com",
        "http://",
        "https:///path",
        "not a url",
        "example.com",
        "",
        "//host",
        "http://host:bad",
        42,
    ],
)
def test_base_url_rejects(url: Any) -> None:
    with pytest.raises(InvalidRequestError):
        validate_base_url(url)


# -- proxy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proxy",
    ["http://127.0.0.1:3128", "https://proxy.example:443", "http://user:pass@proxy.example:8080"],
)
def test_http_proxies_accepted(proxy: str) -> None:
    assert validate_proxy(proxy) == proxy


def test_no_proxy() -> None:
    assert validate_proxy(None) is None


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "socks5h://u:p@127.0.0.1:1080"])
def test_socks_proxy_accepted_with_pysocks(proxy: str) -> None:
    pytest.importorskip("socks")
    assert validate_proxy(proxy) == proxy


@pytest.mark.parametrize(
    "proxy", ["socks5://127.0.0.1:1080", "socks5h://user:s3cret@127.0.0.1:1080"]
)
def test_socks_proxy_without_pysocks_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, proxy: str
) -> None:
    monkeypatch.setitem(sys.modules, "socks", None)  # import socks -> ImportError
    with pytest.raises(InvalidRequestError) as info:
        validate_proxy(proxy)
    assert "aichatonline-sync[socks]" in str(info.value)
    assert "s3cret" not in str(info.value)
    with pytest.raises(InvalidRequestError, match=r"aichatonline-sync\[socks\]"):
        Session(proxy=proxy)


@pytest.mark.parametrize(
    "proxy",
    [
        "not a url",
        "ftp://host:21",
        "127.0.0.1:3128",
        "localhost:3128",
        "",
        "   ",
        "http://",
        "http://host:bad",
        "http://host:99999",
        3128,
        b"http://h:1",
    ],
)
def test_garbage_proxies_rejected(proxy: Any) -> None:
    with pytest.raises(InvalidRequestError):
        validate_proxy(proxy)


@pytest.mark.parametrize(
    "proxy",
    [
        "http://user:s3cret@host:bad",
        "http://user:s3cret@host:99999",
        "ftp://user:s3cret@host:21",
        "socks9://user:s3cret@host:1080",
        "http://user:s3cret@",
        "http://user:s3cret@:3128",
    ],
)
def test_password_never_in_proxy_errors(proxy: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_proxy(proxy)
    assert "s3cret" not in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        Session(proxy=proxy)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("separator", ["/", "#", "?"])
def test_password_with_a_reserved_character_never_in_proxy_errors(separator: str) -> None:
    """An unescaped "/", "#" or "?" in the password makes the URL unparsable, but the password
    must still not be echoed back."""
    proxy = f"http://user:Q7{separator}Xk9vW2@proxy.example:3128"
    with pytest.raises(InvalidRequestError) as info:
        validate_proxy(proxy)
    message = str(info.value)
    assert f"Q7{separator}Xk9vW2" not in message
    assert "Xk9vW2" not in message


# -- redact_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:secret@proxy:3128", "http://user:***@proxy:3128"),
        ("socks5h://u:p%40ss@127.0.0.1:1080", "socks5h://u:***@127.0.0.1:1080"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("https://example.com/path?q=1", "https://example.com/path?q=1"),
        ("http://:secret@proxy:3128", "http://***@proxy:3128"),
        ("http://user:pa@ss@proxy:3128", "http://user:***@proxy:3128"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_with_user_only_keeps_the_host() -> None:
    redacted = redact_url("http://someuser@proxy:3128")
    assert redacted.endswith("@proxy:3128")
    assert redacted.startswith("http://")


# -- Session(...) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "ftp://example.com"},
        {"base_url": "not a url"},
        {"proxy": "garbage"},
        {"proxy": "ftp://proxy:21"},
        {"timeout": -1},
        {"timeout": "30"},
        {"timeout": (1, 2, 3)},
        {"max_retries": -1},
        {"max_retries": "2"},
        {"retry": "fast"},
        {"headers": {"X-Test": "a\nb"}},
        {"headers": {"X-Test": "a\r\nInjected: 1"}},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"X-Test": 1}},
        {"headers": [("X-Test", "x")]},
        {"verify": 1},
        {"reuse_token": "yes"},
        {"http": object()},
    ],
)
def test_session_rejects_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        Session(**kwargs)


def test_session_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Session(unknown_option=1)  # type: ignore[call-arg]


def test_session_keeps_valid_options() -> None:
    with Session(
        "http://127.0.0.1:9/", timeout=(2, 30), max_retries=4, headers={"X-Test": "1"}
    ) as session:
        assert session.base_url == "http://127.0.0.1:9"
        assert session.timeout == Timeout(2, 30)
        assert session.retry.max_retries == 4


@pytest.mark.parametrize("function", [aco.chat, aco.complete])
@pytest.mark.parametrize(
    "options",
    [
        {"unknown_option": 1},
        {"max_retries": -1},
        {"timeout": -1},
        {"proxy": "garbage"},
        {"base_url": "ftp://example.com"},
        {"model": "gpt-5"},
        {"conversation_id": "has space"},
    ],
)
def test_module_level_rejects_bad_options_before_any_network_io(
    function: Any, options: dict[str, Any]
) -> None:
    options.setdefault("base_url", "http://127.0.0.1:9")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        with pytest.raises(InvalidRequestError):
            function("Hi", **options)
        assert len(mock.calls) == 0


def test_module_level_unknown_option_is_named() -> None:
    with pytest.raises(InvalidRequestError, match="unknown_option"):
        aco.chat("Hi", unknown_option=1)


def test_session_repr_hides_the_proxy_password() -> None:
    with Session(proxy="http://u:s3cret@127.0.0.1:3128") as session:
        assert "s3cret" not in repr(session)
        assert "s3cret" not in str(session)
        assert "127.0.0.1:3128" in repr(session)
    assert "s3cret" not in repr(session)
