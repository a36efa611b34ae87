"""Bytes to pieces: the pure (I/O-free) parser of the upstream's line-delimited JSON reply.

Each line is one JSON object; its text piece is at ``["data"]["message"]``. The parser is tolerant
of what the real service may send: an optional SSE ``data:`` prefix, ``[DONE]``, blank lines,
``\\r\\n``, a last line without a newline, raw U+2028 inside strings, and multi-byte characters
split anywhere between two ``feed()`` calls (lines are split on the byte ``\\n``, which never occurs
inside a UTF-8 sequence, and decoded whole). An error line (``{"code": 401, "message": ...}``, or
``msg``) stops the parse; nothing is skipped without a debug log.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, NamedTuple, Optional

from ._errors import ProtocolError
from ._protocol import OK_CODES

__all__ = ["DEFAULT_MAX_LINE", "ErrorLine", "LineParser"]

logger = logging.getLogger("aichatonline_sync")

#: The longest line accepted, in bytes; a longer one is a :class:`ProtocolError`.
DEFAULT_MAX_LINE = 1 << 20
_QUOTE = 200  # bytes of the body quoted in a ProtocolError
_DECODER = json.JSONDecoder()
#: The C scanner behind ``JSONDecoder.raw_decode`` (which only wraps it, in a Python frame per
#: call): ``(value, end)`` for the JSON value at an index, ``StopIteration`` where there is none.
_SCAN: Callable[[str, int], tuple[Any, int]] = (
    getattr(_DECODER, "scan_once", None) or _DECODER.raw_decode
)


class ErrorLine(NamedTuple):
    """An error line of the upstream: ``code`` (an int when numeric) and ``message``."""

    code: Any
    message: str
    raw: str


def _is_ok(code: Any) -> bool:
    """Does a line's ``code``/``status`` say success (``200``, ``0``, ``"ok"``, ``"success"``...)?"""
    if code is None:
        return True
    if isinstance(code, str):
        return code.strip().lower() in OK_CODES
    return not isinstance(code, bool) and code in OK_CODES


def _as_code(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


class LineParser:
    """Incremental parser: :meth:`feed` bytes as they come, :meth:`close` at the end of the body.

    >>> p = LineParser()
    >>> p.feed(b'{"data": {"message": "Hel')
    []
    >>> p.feed(b'lo"}}\\n{"data": {"message": "!"}}')
    ['Hello']
    >>> p.close()
    ['!']

    :param max_line: the longest line accepted, in bytes.
    """

    __slots__ = ("_buf", "_head", "_loads", "_overflow", "error", "max_line", "pieces")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        self._head = b""
        self._loads = json.loads
        #: How many lines carried a message so far.
        self.pieces = 0
        #: The error line that stopped the parse, if any.
        self.error: Optional[ErrorLine] = None
        self._overflow: Optional[ProtocolError] = None

    @property
    def stopped(self) -> bool:
        """``True`` once an error line was found: later input is ignored."""
        return self.error is not None

    @property
    def head(self) -> str:
        """The first bytes of the body, decoded leniently (for error messages)."""
        return self._head.decode("utf-8", "replace")

    def feed(self, data: bytes) -> list[str]:
        """Parse ``data`` and return the pieces of every line it completes.

        After an error line, :attr:`error` is set, the pieces before it are returned, and every
        later call returns nothing.

        :raises ProtocolError: a line longer than ``max_line``.
        """
        if self._overflow is not None:
            raise self._overflow
        if not data or self.stopped:
            return []
        if len(self._head) < _QUOTE:
            self._head += data[: _QUOTE - len(self._head)]
        if self._buf:
            data = self._buf + data
        if b"\n" not in data:
            self._buf = data
            if len(data) > self.max_line:
                self._buf = b""
                raise self._too_long()
            return []
        check = len(data) > self.max_line  # only then can a line be too long
        if not check:
            # The fast path: decode every complete line of this read at once (strict UTF-8), and
            # parse each with raw_decode: about 2x faster than json.loads per bytes line, which
            # detects the encoding and decodes line by line. A line it does not take as a plain
            # message line goes to the careful path below, with the same outcome as json.loads.
            cut = data.rfind(b"\n") + 1
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                pass  # the careful path, line by line
            else:
                self._buf = data[cut:]
                return self._feed_text(text)
        lines = data.split(b"\n")
        rest = lines.pop()
        self._buf = rest
        out: list[str] = []
        loads = self._loads
        for line in lines:
            if check and len(line) > self.max_line:
                self._buf = b""
                self._overflow = self._too_long()
                if out:  # hand out what came before; raise at the next call
                    break
                raise self._overflow
            if not line or line == b"\r":
                continue  # a blank line (cheaper than a failed json.loads)
            # Fast path: a plain JSON line with data.message (json.loads ignores "\r").
            try:
                message = loads(line)["data"]["message"]
            except Exception:
                message = None
            if message.__class__ is str:
                out.append(message)
                continue
            piece = self._slow_line(line)
            if piece is not None:
                out.append(piece)
            elif self.error is not None:
                break
        else:
            if check and len(rest) > self.max_line and self.error is None:
                self._buf = b""
                self._overflow = self._too_long()
                if not out:
                    raise self._overflow
        self.pieces += len(out)
        return out

    def _feed_text(self, text: str) -> list[str]:
        lines = text.split("\n")
        lines.pop()  # "" after the last newline
        out: list[str] = []
        append = out.append
        scan = _SCAN
        for line in lines:
            try:
                obj, end = scan(line, 0)
                message = obj["data"]["message"]
            except Exception:
                if not line or line == "\r":
                    continue  # a blank line
                message = None
            else:
                if end != len(line) and line[end:].strip(" \t\r"):
                    message = None  # more after the object: not a plain line
            if message.__class__ is str:
                append(message)
                continue
            piece = self._slow_line(line.encode("utf-8"))
            if piece is not None:
                out.append(piece)
            elif self.error is not None:
                break
        self.pieces += len(out)
        return out

    def close(self) -> list[str]:
        """Parse the last line (one without a newline) and return its piece, if any.

        :raises ProtocolError: a line longer than ``max_line`` was found by the last :meth:`feed`.
        """
        if self._overflow is not None:
            raise self._overflow
        if self.error is not None or not self._buf:
            return []
        line, self._buf = self._buf, b""
        piece = self._slow_line(line)
        if piece is None:
            return []
        self.pieces += 1
        return [piece]

    def _too_long(self) -> ProtocolError:
        return ProtocolError(
            f"a reply line is longer than {self.max_line} bytes; not a chat stream "
            "(raise max_line_bytes if the upstream really sends such lines)",
            body=self.head,
        )

    def _slow_line(self, raw: bytes) -> Optional[str]:
        """Parse one line the careful way: returns its piece, or ``None`` (skipped or error)."""
        line = raw.strip()
        if not line:
            return None
        if line.startswith(b"data:"):
            line = line[5:].strip()
            if not line:
                return None
        if line == b"[DONE]":
            logger.debug("skipped the end marker [DONE]")
            return None
        try:
            obj = self._loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            logger.debug("skipped a reply line that is not JSON: %.200r", line)
            return None
        if not isinstance(obj, dict):
            logger.debug("skipped a reply line that is not a JSON object: %.200r", line)
            return None
        data = obj.get("data")
        message = data.get("message") if isinstance(data, dict) else None
        if isinstance(message, str):
            return message
        code = _as_code(obj.get("code", obj.get("status")))
        text = obj.get("message", obj.get("msg"))
        error = obj.get("error")
        if isinstance(error, dict):
            code = _as_code(error.get("code", code))
            text = error.get("message", error.get("msg", text))
        elif isinstance(error, str) and error:
            text = error if text is None else text
        if not _is_ok(code) or error:
            self.error = ErrorLine(
                code=code,
                message="" if text is None else str(text),
                raw=line[:_QUOTE].decode("utf-8", "replace"),
            )
            return None
        logger.debug("skipped a reply line without data.message: %.200r", line)
        return None
