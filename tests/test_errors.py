"""Errors keep their attributes through pickling (a batch in other processes hands them back)."""

from __future__ import annotations

import pickle

import pytest

import aichatonline_sync as aco

CASES = [
    aco.InvalidRequestError("bad"),
    aco.APIConnectionError("down", url="http://127.0.0.1:1/x"),
    aco.APITimeoutError("slow", url="http://127.0.0.1:1/x"),
    aco.APIStatusError("err", status_code=500, body="oops", url="u", headers={"A": "b"}),
    aco.AuthenticationError("no", status_code=401, body="", url="u"),
    aco.RateLimitError("later", status_code=429, retry_after=2.5, url="u"),
    aco.TokenError("no token"),
    aco.ProtocolError("html", body="<html>", partial="ab"),
    aco.IncompleteStreamError("cut", partial="abc"),
    aco.UpstreamError("line", code=503, upstream_message="busy", partial="x"),
    aco.BatchError("some", results=["a", None], errors={1: aco.TokenError("t")}),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_attributes(error: aco.AiChatOnlineError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    attributes = {k: v for k, v in vars(error).items() if k != "errors"}
    assert {k: v for k, v in vars(copy).items() if k != "errors"} == attributes
    if isinstance(error, aco.BatchError):
        assert isinstance(copy, aco.BatchError)
        assert str(copy.errors[1]) == "t"
