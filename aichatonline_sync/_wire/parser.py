"""Bytes to pieces: the pure (I/O-free) parser of the upstream's line-delimited JSON reply.

Each line is one JSON object; its text piece is at ``["data"]["message"]``. The parser is tolerant
of what the real service may send: an optional SSE ``data:`` prefix, ``[DONE]``, blank lines,
``\\r\\n``, a last line without a newline, raw U+2028 inside strings, and multi-byte characters
split anywhere between two ``feed()`` calls (lines are split on the byte ``\\n``, which never occurs
inside a UTF-8 sequence, and decoded whole). An error line (``{"code": 401, "message": ...}``, or
``msg``) stops the parse.

Every piece encodes as UTF-8: bytes that are no UTF-8 become U+FFFD, and so do UTF-16 surrogates
that JSON escapes (``\\ud83d``) leave alone, except a pair split across two lines, which is joined
(the high half is held back until the next piece). Each kind is warned about once per reply.

Work grows with the bytes, not with the lines: blank lines are dropped in C, a line skipped once
is skipped again by a lookup, and skipped lines are counted (:attr:`LineParser.skipped`), the
first one logged at debug level.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, NamedTuple, Optional

from . import redact as _redact
from .errors import ProtocolError
from .protocol import OK_CODES, is_number, upstream_code

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
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Skipped lines remembered per reply, and the longest remembered. A bomb repeats its lines
#: (that is how it compresses), so each is parsed once; more short lines than deflate's 32 KiB
#: window can repeat no longer compress well, so a body that defeats this pays in wire bytes.
_SKIP_MEMORY = 16384
_SKIP_MEMORY_LINE = 64


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
    return is_number(code) and code in OK_CODES




def _decode(complete: bytes) -> tuple[str, bool]:
    """``complete`` as text, with U+FFFD in place of bytes that are no UTF-8 (as httpx's
    ``iter_text`` does): a piece with one bad byte keeps the rest of its text, and a line of
    binary garbage is then skipped as not JSON. ``\\n`` never occurs inside a UTF-8 sequence, so
    the lines are the same either way.

    :returns: the text, and whether some of it was no UTF-8.
    """
    try:
        return complete.decode("utf-8"), False
    except UnicodeDecodeError:
        return complete.decode("utf-8", "replace"), True


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

    __slots__ = (
        "_buf",
        "_head",
        "_held",
        "_known",
        "_logged",
        "_lone_surrogate",
        "_not_utf8",
        "_overflow",
        "_parts",
        "_pending",
        "cut_short",
        "error",
        "max_line",
        "pieces",
        "skipped",
    )

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        self._parts: list[bytes] = []  # the rest of the unfinished line, not yet joined to _buf
        self._pending = 0  # bytes of the unfinished line: _buf and _parts
        self._head = b""
        #: How many lines carried a message so far.
        self.pieces = 0
        #: The error line that stopped the parse, if any.
        self.error: Optional[ErrorLine] = None
        self._overflow: Optional[ProtocolError] = None
        self._not_utf8 = False  # a line was no UTF-8 (warned once per reply)
        self._lone_surrogate = False  # a piece had a lone surrogate (warned once per reply)
        self._held = ""  # the high half of a surrogate pair, held for the next piece
        self._known: dict[str, None] = {}  # lines skipped so far (the short ones, up to a bound)
        self._logged = False  # a skipped line was logged (the first of the reply)
        #: How many lines without a message were skipped (blank lines aside).
        self.skipped = 0
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
            if b"\n" not in data and self._pending + len(data) <= self.max_line:
                # A long line arriving in small reads: kept in parts, joined once it ends, so
                # that its cost grows with its length, not with its length times its reads.
                self._parts.append(data)
                self._pending += len(data)
                return []
            data = self._joined() + data
        cut = data.rfind(b"\n") + 1
        complete, self._buf = data[:cut], data[cut:]
        self._pending = len(self._buf)
        limit, overflow = len(complete), None  # bytes of complete lines to parse
        if len(data) > self.max_line:  # only then can a line be too long
            limit, overflow = self._check_lengths(complete)
        pieces = self._parse_lines(complete[:limit]) if limit else []
        if overflow is not None and self.error is None:  # an error line before it wins
            self._buf = b""
            self._overflow = overflow
            if not pieces:
                raise overflow
        return pieces

    def _joined(self) -> bytes:
        """The unfinished line, whole."""
        if self._parts:
            self._buf = self._buf + b"".join(self._parts)
            self._parts.clear()
        return self._buf

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
        known = self._known
        skipped = 0
        text, not_utf8 = _decode(complete)
        if not_utf8 and not self._not_utf8:
            self._not_utf8 = True
            logger.warning("the reply is not UTF-8 in places; its bad bytes became U+FFFD")
        for line in filter(None, text.split("\n")):  # filter drops blank lines in C
            if known and line in known:
                skipped += 1
                continue
            if line[0] == "{":
                try:
                    obj, end = scan(line, 0)
                except Exception:  # not JSON (json.loads would fail the same way): skipped
                    self._log_skipped("a reply line that is not JSON", line)
                    skipped += 1
                    self._remember(line)
                    continue
                try:
                    message = obj["data"]["message"]
                except Exception:
                    message = None
                else:
                    if end != len(line) and line[end:].strip(_JSON_SPACE):
                        message = None  # more after the object: not a plain line
                if message.__class__ is str:
                    append(message)
                    continue
            elif line == "\r":
                continue  # a blank line
            piece = self._careful_line(line)
            if piece is not None:
                append(piece)
                continue
            if self.error is not None:
                break
            if line.strip(_JSON_SPACE):
                skipped += 1
                self._remember(line)
        self.skipped += skipped
        self.pieces += len(out)
        if self._held or "\\ud" in text or "\\uD" in text:  # only escapes make surrogates
            self._mend(out)
        return out

    def _remember(self, line: str) -> None:
        """Keep a skipped line, so that it is skipped again without a parse (see _SKIP_MEMORY)."""
        if len(line) <= _SKIP_MEMORY_LINE and len(self._known) < _SKIP_MEMORY:
            self._known[line] = None

    def _mend(self, pieces: list[str]) -> None:
        """Make every piece encode as UTF-8, in place: join a surrogate pair split between two
        pieces (the high half at the end of one is held for the next), and turn every other
        surrogate into U+FFFD (warned once per reply)."""
        for i, given in enumerate(pieces):
            text, self._held = self._held + given, ""
            if _SURROGATE.search(text) is None:
                pieces[i] = text
                continue
            if "\ud800" <= text[-1] <= "\udbff":
                text, self._held = text[:-1], text[-1]
            pieces[i] = self._replace_lone(
                text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
            )

    def _replace_lone(self, text: str) -> str:
        """``text`` with its surrogates (none of them paired any more) as U+FFFD."""
        if _SURROGATE.search(text) is None:
            return text
        if not self._lone_surrogate:
            self._lone_surrogate = True
            logger.warning(
                "the reply has a lone UTF-16 surrogate (an escape such as \\ud83d without its "
                "other half); it became U+FFFD"
            )
        return _SURROGATE.sub("\ufffd", text)

    def close(self) -> list[str]:
        """Parse the last line (one without a newline) and return its piece, if any.

        A last line that begins a JSON object but stops before its end (the connection closed in
        the middle of it) is no line to skip: it sets :attr:`cut_short` (the body was cut short).

        :raises ProtocolError: a line longer than ``max_line`` was found by the last :meth:`feed`.
        """
        if self._overflow is not None:
            raise self._overflow
        if self.error is not None:
            return []
        line, self._buf = self._joined(), b""
        if line and _cut_short(line):
            self.cut_short = len(line)
            return []
        pieces = self._parse_lines(line + b"\n") if line else []
        if self._held:  # a high half that no piece followed
            pieces.append(self._replace_lone(self._held))
            self._held = ""
        return pieces

    def _too_long(self) -> ProtocolError:
        return ProtocolError(
            f"a reply line is longer than {self.max_line} bytes; not a chat stream "
            "(raise max_line_bytes if the upstream really sends such lines)",
            body=self.head,
        )

    def _careful_line(self, raw: str) -> Optional[str]:
        """Parse one line the careful way: returns its piece, or ``None`` (skipped or error)."""
        line = raw.strip(_JSON_SPACE).lstrip("\ufeff")  # as json.loads of bytes skips a BOM
        if not line:
            return None
        if line.startswith("data:"):
            line = line[5:].strip(_JSON_SPACE)
            if not line:
                return None
        if line == "[DONE]":
            return None
        if not line.startswith("{"):
            self._log_skipped("a reply line that is not a JSON object", line)
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            self._log_skipped("a reply line that is not JSON", line)
            return None
        if not isinstance(obj, dict):
            self._log_skipped("a reply line that is not a JSON object", line)
            return None
        data = obj.get("data")
        message = data.get("message") if isinstance(data, dict) else None
        if isinstance(message, str):
            return message
        code = upstream_code(obj.get("code", obj.get("status")))
        text = obj.get("message", obj.get("msg"))
        error = obj.get("error")
        if isinstance(error, dict):
            code = upstream_code(error.get("code", code))
            text = error.get("message", error.get("msg", text))
        elif isinstance(error, str) and error:
            text = error if text is None else text
        if not _is_ok(code) or error:
            self.error = ErrorLine(
                code=code,
                message="" if text is None else self._replace_lone(str(text)),
                raw=line[:_QUOTE],
            )
            return None
        self._log_skipped("a reply line without data.message", line)
        return None

    def _log_skipped(self, what: str, line: str) -> None:
        """Log the first skipped line of a reply (its start); the stream logs the count at its end."""
        if not self._logged:
            self._logged = True
            # Cut first, then masked: a token cut at the end would pass the filter in part.
            shown = _redact.scrub_quote(line[:80])
            logger.debug("skipped %s (more are counted, not logged): %r", what, shown)
