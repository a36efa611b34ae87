"""The ``aichatonline_mock`` fixture: its faults (as the emulator's), loopback pass-through (a
mock and a real emulator in one test), and its strictness about faults never used. Each case runs
in a pytester session, as a user's test suite would use the plugin."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

_PLUGIN_CONFTEST = """
import aichatonline_sync.testing.pytest_plugin as plugin

def pytest_configure(config):
    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "aichatonline_sync.testing.pytest_plugin")
"""


def run(pytester: pytest.Pytester, code: str) -> pytest.RunResult:
    pytester.makeconftest(_PLUGIN_CONFTEST)
    pytester.makepyfile(code)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_faults_raise_the_library_errors(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest

        import aichatonline_sync as aco


        def session(mock, **options):
            if "retry" not in options:
                options.setdefault("max_retries", 0)
            return aco.Session(mock.base_url, **options)


        def test_fail_then_retried(aichatonline_mock):
            aichatonline_mock.set_reply("Hi there")
            aichatonline_mock.fail("chat", 503, headers={"Retry-After": "0"}, times=2)
            with session(aichatonline_mock, max_retries=2) as s:
                assert s.complete("x") == "Hi there"
            assert aichatonline_mock.chat_calls == 3
            assert aichatonline_mock.pending_faults() == 0


        def test_fail_statuses(aichatonline_mock):
            aichatonline_mock.fail("chat", 429, headers={"Retry-After": "7"})
            aichatonline_mock.fail("chat", 400, body={"code": 400, "message": "bad"})
            aichatonline_mock.fail("token", 500, body="down")
            with session(aichatonline_mock) as s:
                with pytest.raises(aco.APIStatusError, match="HTTP 500"):
                    s.grab_token()  # the token fault answers the first token request
                with pytest.raises(aco.RateLimitError) as info:
                    s.complete("x")
                assert info.value.retry_after == 7
                with pytest.raises(aco.APIStatusError) as info:
                    s.complete("x")
                assert info.value.status_code == 400 and '"bad"' in info.value.body


        def test_error_line(aichatonline_mock):
            aichatonline_mock.set_reply(["one ", "two ", "three"])
            aichatonline_mock.error_line(500, "boom", after=2)
            aichatonline_mock.error_line(401, "expired", key="msg")
            with session(aichatonline_mock) as s:
                with pytest.raises(aco.UpstreamError) as info:
                    s.complete("x")
                assert (info.value.code, info.value.message) == (500, "boom")
                assert info.value.partial == "one two "
                # An error line 401 before any text: one fresh token, one more try.
                assert s.complete("x") == "one two three"
            assert aichatonline_mock.token_calls == 2


        def test_html(aichatonline_mock):
            aichatonline_mock.html("chat")
            aichatonline_mock.html("chat", status=403)
            with session(aichatonline_mock) as s:
                with pytest.raises(aco.ProtocolError, match="HTML page"):
                    s.complete("x")
                with pytest.raises(aco.AuthenticationError, match="HTML page titled 'Just a moment...'"):
                    s.complete("x")
            assert aichatonline_mock.chat_calls == 2  # a block page gets no fresh-token retry


        def test_drop_mid_reply(aichatonline_mock):
            aichatonline_mock.set_reply(["one ", "two ", "three"])
            aichatonline_mock.drop("chat", after=2)
            with session(aichatonline_mock) as s:
                with pytest.raises(aco.IncompleteStreamError) as info:
                    s.complete("x")
                assert info.value.partial == "one two "
                assert "reset the connection" in str(info.value)
                assert "before the reply" not in str(info.value)


        def test_drop_before_any_reply_is_retried(aichatonline_mock):
            aichatonline_mock.set_reply("fine")
            aichatonline_mock.drop("token")
            aichatonline_mock.drop("chat")
            with session(aichatonline_mock, retry=aco.RetryPolicy(max_retries=2, initial_delay=0, max_delay=0)) as s:
                assert s.complete("x") == "fine"
            assert aichatonline_mock.token_calls == 2 and aichatonline_mock.chat_calls == 2


        def test_bad_faults(aichatonline_mock):
            for call in (
                lambda: aichatonline_mock.fail("nope", 500),
                lambda: aichatonline_mock.fail("chat", 99),
                lambda: aichatonline_mock.fail("chat", 500, times=0),
                lambda: aichatonline_mock.drop("token", after=1),
                lambda: aichatonline_mock.error_line("500"),
            ):
                with pytest.raises(ValueError):
                    call()
            assert aichatonline_mock.pending_faults() == 0
        """,
    )
    result.assert_outcomes(passed=7)


def test_a_fault_never_used_fails_the_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        def test_unused(aichatonline_mock):
            aichatonline_mock.fail("chat", 500, times=2)
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*2 queued fault replies were never used*"])


def test_the_mock_and_a_real_emulator_in_one_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import aichatonline_sync as aco


        def test_both(aichatonline_mock, aichatonline_emulator):
            aichatonline_mock.set_reply("from the mock")
            aichatonline_emulator.set_reply("from the emulator")
            with aco.Session(aichatonline_mock.base_url) as mocked:
                assert mocked.complete("x") == "from the mock"
            with aco.Session(aichatonline_emulator.url) as real:   # passed through to the socket
                assert real.complete("x") == "from the emulator"
            localhost = aichatonline_emulator.url.replace("127.0.0.1", "localhost")
            assert aco.complete("y", base_url=localhost) == "from the emulator"
            assert len(aichatonline_emulator.chat_requests) == 2
            assert aichatonline_mock.chat_calls == 1
        """,
    )
    result.assert_outcomes(passed=1)


def test_other_hosts_stay_strict_and_the_message_says_it_is_the_mock(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
        import pytest

        import aichatonline_sync as aco


        def test_unmatched(aichatonline_mock):
            with pytest.raises(aco.APIConnectionError) as info:
                aco.complete("x", base_url="https://elsewhere.test", max_retries=0)
            message = str(info.value)
            assert "doesn't match any registered mock" in message
            assert "emulator" not in message


        def test_no_pass_through(aichatonline_mock, aichatonline_emulator):
            aichatonline_mock.rsps.passthru_prefixes = ()   # strict for loopback too
            with pytest.raises(aco.APIConnectionError, match="registered mock"):
                aco.complete("x", base_url=aichatonline_emulator.url, max_retries=0)
        """,
    )
    result.assert_outcomes(passed=2)


def test_faults_are_taken_once_each_by_a_threaded_batch(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import aichatonline_sync as aco


        def test_batch(aichatonline_mock):
            aichatonline_mock.set_reply("ok")
            aichatonline_mock.fail("chat", 400, times=7)
            with aco.Session(aichatonline_mock.base_url, max_retries=0) as s:
                results = s.batch([f"q{i}" for i in range(60)], max_workers=8, return_exceptions=True)
            failed = [r for r in results if isinstance(r, aco.APIStatusError)]
            assert len(failed) == 7
            assert results.count("ok") == 53
            assert aichatonline_mock.pending_faults() == 0
        """,
    )
    result.assert_outcomes(passed=1)


_TWO_TESTS = """
import aichatonline_sync as aco


def test_one(aichatonline_mock, monkeypatch):
    aichatonline_mock.set_reply("first")
    assert aco.complete("Hi", **where(aichatonline_mock, monkeypatch)) == "first"


def test_two(aichatonline_mock, monkeypatch):
    aichatonline_mock.set_reply("second")
    assert aco.complete("Hi", **where(aichatonline_mock, monkeypatch)) == "second"
"""

_BY_ARGUMENT = """
def where(mock, monkeypatch):
    return {"base_url": mock.base_url}
"""

_BY_ENVIRONMENT = """
def where(mock, monkeypatch):
    monkeypatch.setenv("AICHATONLINE_BASE_URL", mock.base_url)
    return {}
"""


@pytest.mark.parametrize("how", [_BY_ARGUMENT, _BY_ENVIRONMENT], ids=["base_url", "environment"])
@pytest.mark.parametrize("order", ["one-two", "two-one"])
def test_module_level_calls_in_two_tests_each_meet_their_own_mock(
    pytester: pytest.Pytester, how: str, order: str
) -> None:
    pytester.makeconftest(_PLUGIN_CONFTEST)
    pytester.makepyfile(how + _TWO_TESTS)
    first, second = order.split("-")
    module = pytester.path / "test_module_level_calls_in_two_tests_each_meet_their_own_mock.py"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-v", f"{module}::test_{first}", f"{module}::test_{second}"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*::test_{first} PASSED*", f"*::test_{second} PASSED*"])


def test_a_session_kept_across_tests_gets_a_401_and_one_fresh_token(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
        import aichatonline_sync as aco
        from aichatonline_sync.testing.pytest_plugin import MOCK_BASE_URL

        KEPT = aco.Session(MOCK_BASE_URL, max_retries=0)   # outlives each test's mock


        def test_one(aichatonline_mock):
            aichatonline_mock.set_reply("first")
            assert KEPT.complete("Hi") == "first"


        def test_two(aichatonline_mock):
            aichatonline_mock.set_reply("second")
            assert KEPT.complete("Hi") == "second"   # its token is the first mock's: 401, refresh
            assert (aichatonline_mock.token_calls, aichatonline_mock.chat_calls) == (1, 2)
        """,
    )
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("fixture", "base_url"),
    [
        ("aichatonline_mock", "aichatonline_mock.base_url"),
        ("aichatonline_emulator", "aichatonline_emulator.url"),
        ("aichatonline_emulator_factory", "aichatonline_emulator_factory().url"),
    ],
)
def test_every_fixture_of_a_double_closes_the_shared_sessions(
    pytester: pytest.Pytester, fixture: str, base_url: str
) -> None:
    result = run(
        pytester,
        f"""
        import aichatonline_sync as aco
        from aichatonline_sync._client.registry import _registry, shared_session


        def test_setup_closes_them():
            kept = shared_session(base_url="http://127.0.0.1:9")   # no request is made
            assert len(_registry) == 1


        def test_uses_a_double({fixture}):
            assert len(_registry) == 0
            assert aco.complete("Hi", base_url={base_url}, max_retries=0)
            assert len(_registry) == 1


        def test_teardown_closed_them():
            assert len(_registry) == 0
        """,
    )
    result.assert_outcomes(passed=3)
