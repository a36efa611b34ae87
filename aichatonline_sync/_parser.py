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

from . import _redact
from ._errors import ProtocolError
from ._protocol import OK_CODES

__all__ = ["DEFAULT_MAX_LINE", "ErrorLine", "LineParser"]

logger = _redact.logger("aichatonline_sync")

#: The longest line accepted, in bytes; a longer one is a :class:`ProtocolError`.
DEFAULT_MAX_LINE = 1 << 20
_QUOTE = 200  # bytes of the body quoted in a ProtocolError
_JSON_SPACE = " \t\r\n\x0b\x0c"  # what bytes.strip() strips: JSON's white space and two more
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


def _decode_lines(complete: bytes, warn: bool = True) -> tuple[list[str], bool]:
    """The lines of ``complete`` (which ends with a newline) as text, without their newlines.

    The whole block is decoded at once (strict UTF-8). When that fails, each line that is no
    UTF-8 is decoded with U+FFFD in place of its bad bytes (as httpx's ``iter_text`` does): a
    piece with one bad byte keeps the rest of its text, and a line of binary garbage is then
    skipped as not JSON. The first such line is logged as a warning (when ``warn``), the others at
    debug level. ``\\n`` never occurs inside a UTF-8 sequence, so the lines are the same either way.

    :returns: the lines, and whether a line was no UTF-8.
    """
    try:
        return complete.decode("utf-8").split("\n")[:-1], False
    except UnicodeDecodeError:
        pass
    lines = []
    for raw in complete.split(b"\n")[:-1]:
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            level = logging.WARNING if warn else logging.DEBUG
            warn = False
            logger.log(level, "a reply line (%d bytes) is not UTF-8; its bad bytes became U+FFFD", len(raw))
            lines.append(raw.decode("utf-8", "replace"))
    return lines, True


def _cut_short(raw: bytes) -> bool:
    """Is ``raw`` (a last line, without its newline) a JSON object that stops before its end?"""
    line = raw.decode("utf-8", "replace").strip(_JSON_SPACE).lstrip("\ufeff")
    if line.startswith("data:"):
        line = line[5:].strip(_JSON_SPACE)
    if not line.startswith("{"):
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        # A line that begins a JSON object and is no JSON is taken as one cut short, wherever
        # the cut fell (in a string, a ``\u`` escape, a number, a word, between two members);
        # only a whole object followed by more is something else.
        return not exc.msg.startswith("Extra data")
    except (ValueError, RecursionError):
        return False
    return False


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

    __slots__ = ("_buf", "_head", "_not_utf8", "_overflow", "cut_short", "error", "max_line", "pieces")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        self._head = b""
        #: How many lines carried a message so far.
        self.pieces = 0
        #: The error line that stopped the parse, if any.
        self.error: Optional[ErrorLine] = None
        self._overflow: Optional[ProtocolError] = None
        self._not_utf8 = False  # a line was no UTF-8 (warned once per reply)
        #: Set by :meth:`close` (to the length of the line, in bytes) when the last line is the
        #: start of a JSON object cut short: the body ended in the middle of a line.
        self.cut_short = 0

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

        :raises ProtocolError: a line longer than ``max_line`` (the pieces before it are returned
            first, and the error raised at the next call).
        """
        if self._overflow is not None:
            raise self._overflow
        if not data or self.stopped:
            return []
        if len(self._head) < _QUOTE:
            self._head += data[: _QUOTE - len(self._head)]
        if self._buf:
            data = self._buf + data
        cut = data.rfind(b"\n") + 1
        complete, self._buf = data[:cut], data[cut:]
        limit, overflow = len(complete), None  # bytes of complete lines to parse
        if len(data) > self.max_line:  # only then can a line be too long
            limit, overflow = self._check_lengths(complete)
        pieces = self._parse_lines(complete[:limit]) if limit else []
        if overflow is not None and self.error is None:  # (an error line before it wins)
            self._buf = b""
            self._overflow = overflow
            if not pieces:
                raise overflow
        return pieces

    def _check_lengths(self, complete: bytes) -> tuple[int, Optional[ProtocolError]]:
        """Find the first line longer than ``max_line`` (the unfinished one included): how many
        bytes of ``complete`` come before it, and the error for it (``None``: no such line)."""
        start = 0
        for line in complete.split(b"\n")[:-1]:
            if len(line) > self.max_line:
                break
            start += len(line) + 1
        else:
            if len(self._buf) <= self.max_line:
                return len(complete), None
        return start, self._too_long()

    def _parse_lines(self, complete: bytes) -> list[str]:
        """The pieces of ``complete`` (whole lines, each ending with a newline): the one line loop.

        A plain message line (one JSON object whose ``data.message`` is a str) is taken at once by
        the JSON decoder's C scanner; any other line goes to :meth:`_careful_line`, with the same
        outcome as ``json.loads``.
        """
        out: list[str] = []
        append = out.append
        scan = _SCAN
        lines, not_utf8 = _decode_lines(complete, warn=not self._not_utf8)
        self._not_utf8 = self._not_utf8 or not_utf8
        for line in lines:
            try:
                obj, end = scan(line, 0)
                message = obj["data"]["message"]
            except Exception:
                message = None
            else:
                if end != len(line) and line[end:].strip(_JSON_SPACE):
                    message = None  # more after the object: not a plain line
            if message.__class__ is str:
                append(message)
                continue
            if not line or line == "\r":
                continue  # a blank line
            piece = self._careful_line(line)
            if piece is not None:
                append(piece)
            elif self.error is not None:
                break
        self.pieces += len(out)
        return out

    def close(self) -> list[str]:
        """Parse the last line (one without a newline) and return its piece, if any.

        A last line that begins a JSON object but stops before its end (the connection closed in
        the middle of it) is no line to skip: it sets :attr:`cut_short` (the body was cut short).

        :raises ProtocolError: a line longer than ``max_line`` was found by the last :meth:`feed`.
        """
        if self._overflow is not None:
            raise self._overflow
        if self.error is not None or not self._buf:
            return []
        line, self._buf = self._buf, b""
        if _cut_short(line):
            self.cut_short = len(line)
            return []
        return self._parse_lines(line + b"\n")

    def _too_long(self) -> ProtocolError:
        return ProtocolError(
            f"a reply line is longer than {self.max_line} bytes; not a chat stream "
            "(raise max_line_bytes if the upstream really sends such lines)",
            body=self.head,
        )

    def _careful_line(self, raw: str) -> Optional[str]:
        """Parse one line the careful way: returns its piece, or ``None`` (skipped or error)."""
        line = raw.strip(_JSON_SPACE).lstrip("\ufeff")  # (json.loads of bytes skipped a BOM too)
        if not line:
            return None
        if line.startswith("data:"):
            line = line[5:].strip(_JSON_SPACE)
            if not line:
                return None
        if line == "[DONE]":
            logger.debug("skipped the end marker [DONE]")
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
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
                raw=line[:_QUOTE],
            )
            return None
        logger.debug("skipped a reply line without data.message: %.200r", line)
        return None
