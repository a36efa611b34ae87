"""The gateway's error answers: an HTTP status with OpenAI's error object, and the one mapping of
the library's errors to them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from .._wire.errors import AiChatOnlineError, InvalidRequestError, RateLimitError, UpstreamError


class Refusal(Exception):
    """An error answer: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = list(headers)

    def error(self) -> dict[str, Any]:
        """The body of the answer: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(
    message: str, *, param: Optional[str] = None, code: Optional[str] = None
) -> Refusal:
    """A 400 ``invalid_request_error`` saying ``message`` (``param``: the parameter at fault)."""
    return Refusal(400, message, param=param, code=code)


def refusal_for(exc: AiChatOnlineError) -> Refusal:
    """The answer for an error of the library: the one mapping of our errors to statuses."""
    message = str(exc)
    if isinstance(exc, InvalidRequestError):
        return bad_request(message)
    if isinstance(exc, RateLimitError) or (isinstance(exc, UpstreamError) and exc.code == 429):
        headers = []
        retry_after = exc.retry_after if isinstance(exc, RateLimitError) else None
        if retry_after:
            headers = [
                ("Retry-After", str(math.ceil(retry_after))),
                ("retry-after-ms", str(math.ceil(retry_after * 1000))),
            ]
        return Refusal(
            429, message, type="rate_limit_error", code="rate_limit_exceeded", headers=headers
        )
    if exc.timed_out:  # also a reply that stalled after its first piece
        return Refusal(504, message, type="timeout_error", code="upstream_timeout")
    return Refusal(502, message, type="upstream_error", code="upstream_error")
