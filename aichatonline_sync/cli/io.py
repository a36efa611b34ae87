"""The files and signals of the ``aichatonline`` command (the parser and commands are in ``_cli``).

- Text read from INPUT or stdin must be UTF-8 (one BOM at the start is dropped); anything else is
  a :class:`UsageError` naming the line, raised before anything is sent.
- INPUT is either plain text (every non-blank line one prompt, as written) or JSON lines (every
  non-blank line a JSON object), decided once for the whole file by :func:`is_json_lines`. A line
  that cannot be run is a :class:`BadLine`, written to OUTPUT as an error record, so that the
  output accounts for every input line.
- Each record names the request it answers by ``prompt_sha256`` (:func:`request_hash`); a rerun
  skips an id only when its newest record has a text for the same request (:func:`read_done`).
- OUTPUT is read to resume only when it is a regular file, locked by the run first
  (:func:`lock_output`), and never beyond the size it had when the run began, one bounded line at
  a time. A :class:`RecordWriter` writes one whole record at a
  time: a write that fails is cut back (in a regular file), so OUTPUT holds only whole JSON lines.
- :class:`StopSignals`: SIGINT and SIGTERM raise in the main thread (``KeyboardInterrupt``,
  :class:`Terminated`), but never while a record is being written.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import hashlib
import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, BinaryIO, Callable, Optional, Union

from .._client.config import is_number
from .._wire import redact as _redact
from .._wire.errors import InvalidRequestError
from .._wire.prompt import build_prompt

#: ``flock(fd)``: an exclusive lock on ``fd``, or ``BlockingIOError`` at once; ``None`` where the
#: system has no ``flock`` (Windows).
_flock: Optional[Callable[[int], None]]
try:
    import fcntl

    def _flock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

except ImportError:
    _flock = None

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_RECORD_BYTES",
    "BadLine",
    "Item",
    "OutputError",
    "RecordWriter",
    "StopSignals",
    "Terminated",
    "UsageError",
    "decode_utf8",
    "fileno",
    "is_json_lines",
    "lock_output",
    "open_output",
    "parse_input",
    "read_done",
    "read_input",
    "read_stdin",
    "request_hash",
    "same_file",
    "with_system",
]

logger = _redact.logger("aichatonline_sync")

JsonId = Union[str, int]
Prompt = Union[str, list[Any]]


def _is_item_id(value: object) -> bool:
    """Whether ``value`` can be an item's ``id``: a str or an int, and no ``bool``."""
    return is_number(value, (str, int))


#: The longest OUTPUT line read when resuming; a longer one is skipped (its id is run again).
MAX_RECORD_BYTES = 64 << 20
#: The most of INPUT (or of a prompt on stdin) read: it is read whole, to check every line before
#: anything is sent, so an endless one (``/dev/zero``, ``yes |``) must end somewhere.
MAX_INPUT_BYTES = 256 << 20
#: INPUT file names that are always read as JSON lines.
JSON_SUFFIXES = (".jsonl", ".ndjson")


class UsageError(Exception):
    """A bad command line, option, environment variable, prompt or INPUT: exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like the ``KeyboardInterrupt`` of Ctrl-C."""


class OutputError(Exception):
    """A write to OUTPUT (or stdout) failed: a full disk, a closed pipe, a read-only file.

    :ivar broken_pipe: the reader of a pipe went away (``EPIPE``).
    :ivar stdout: the failed write went to stdout.
    """

    def __init__(self, message: str, *, broken_pipe: bool = False, stdout: bool = False) -> None:
        super().__init__(message)
        self.broken_pipe = broken_pipe
        self.stdout = stdout


# -- reading ------------------------------------------------------------------------------------


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as text: strict UTF-8, one BOM at the start dropped.

    :raises UsageError: naming the line of the first byte that is not UTF-8.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise UsageError(
            f"{where}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte "
            f"{column} of the line); save it as UTF-8. Nothing was sent"
        ) from None


_WHY_WHOLE = (
    ": it is read whole, so that every line is checked before anything is sent; split it (for an "
    "endless source of prompts, use batch_iter() in Python)"
)
#: INPUT is read in blocks of this size: ``read(limit + 1)`` would take all of ``limit`` at once.
_READ_BLOCK = 1 << 20


def read_stdin(what: str, limit: int = MAX_INPUT_BYTES, why: str = "") -> bytes:
    """All of stdin, as bytes (whatever ``PYTHONIOENCODING`` says), at most ``limit`` of them.

    :raises UsageError: there is no stdin, or it holds more than ``limit`` bytes.
    """
    stdin = sys.stdin
    if stdin is None:
        raise UsageError(f"{what} is to be read from stdin, but there is no stdin")
    buffer: Optional[BinaryIO] = getattr(stdin, "buffer", None)
    if buffer is not None:
        fd = fileno(buffer)
        if fd is not None and os.isatty(fd):
            # A terminal's end of file (Ctrl-D at the start of a line) is one read that returns
            # nothing: ``BufferedReader.read(n)`` would take it as the end of one read and wait
            # for a second Ctrl-D to end the next; ``os.read`` returns it as it comes.
            return _bounded_read(functools.partial(os.read, fd), f"{what} on stdin", limit, why)
        return _bounded_read(buffer.read, f"{what} on stdin", limit, why, fd)
    text = stdin.read(limit + 1)  # a text stream without bytes below it (e.g. replaced by a test)
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    _check_size(len(data), f"{what} on stdin", limit, why)
    return data


def read_input(path: str, limit: int = MAX_INPUT_BYTES) -> tuple[str, str]:
    """``(where, text)`` of INPUT (``-``: stdin); ``where`` names it in messages.

    :raises UsageError: it cannot be read, it is larger than ``limit`` bytes, or it is not UTF-8.
    """
    if path == "-":
        return "stdin", decode_utf8(read_stdin("INPUT", limit, _WHY_WHOLE), "stdin")
    where = f"INPUT {path!r}"
    try:
        with open(path, "rb") as file:
            data = _bounded_read(file.read, where, limit, _WHY_WHOLE, file.fileno())
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    return where, decode_utf8(data, where)


def _bounded_read(
    read: Callable[[int], bytes], where: str, limit: int, why: str, fd: Optional[int] = None
) -> bytes:
    """What ``read(n)`` returns up to its first empty block, at most ``limit`` bytes (``fd``,
    when given, is the file below: a regular file's size is checked before anything is read)."""
    try:
        status = os.fstat(fd) if fd is not None else None
    except OSError:
        status = None
    if status is not None and stat.S_ISREG(status.st_mode):
        _check_size(status.st_size, where, limit, why)  # said before anything is read
    blocks: list[bytes] = []
    size = 0
    while size <= limit:
        block = read(min(_READ_BLOCK, limit + 1 - size))
        if not block:
            break
        blocks.append(block)
        size += len(block)
    _check_size(size, where, limit, why)
    return b"".join(blocks)


def _check_size(size: int, where: str, limit: int, why: str) -> None:
    if size > limit:
        most = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
        raise UsageError(f"{where} is larger than {most}{why}. Nothing was sent")


# -- INPUT lines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """An INPUT line to run: its number, its id and its prompt (a str or a list of messages)."""

    line: int
    id: JsonId
    prompt: Prompt


@dataclass(frozen=True)
class BadLine:
    """An INPUT line that cannot be run, and why. ``id`` is ``None`` where it has no usable one."""

    line: int
    id: Optional[JsonId]
    reason: str


_NOT_JSON = object()


def _load(text: str) -> tuple[Any, str]:
    """``(value, "")``, or ``(_NOT_JSON, why)``."""
    try:
        return json.loads(text), ""
    except RecursionError:
        return _NOT_JSON, "nested too deeply"
    except json.JSONDecodeError as exc:
        return _NOT_JSON, f"{exc.msg} at column {exc.colno}"
    except ValueError as exc:
        return _NOT_JSON, str(exc)


def is_json_lines(name: str, lines: Sequence[str]) -> bool:
    """Whether INPUT is JSON lines: its name ends in ``.jsonl`` or ``.ndjson``, or its first
    non-blank line is a JSON object. Otherwise it is plain text, one prompt per line."""
    if name.lower().endswith(JSON_SUFFIXES):
        return True
    first = next((line.strip() for line in lines if line.strip()), "")
    return isinstance(_load(first)[0], dict)


def _json_entry(number: int, line: str, why: str) -> Union[Item, BadLine]:
    record, error = _load(line)
    if record is _NOT_JSON:
        return BadLine(number, None, f"not valid JSON ({error}); {why}")
    if not isinstance(record, dict):
        return BadLine(
            number, None, f"a {type(record).__name__}, not a JSON object with 'prompt'; {why}"
        )
    item_id: Any = record.get("id", number)
    if not _is_item_id(item_id):
        return BadLine(number, None, f"'id' must be a string or an integer, not {item_id!r}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        return BadLine(
            number,
            item_id,
            "a JSON line needs exactly one of 'prompt' (a string) or 'messages' (a list)",
        )
    key = "prompt" if has_prompt else "messages"
    prompt = record[key]
    if not isinstance(prompt, str if has_prompt else list):
        kind = "a string" if has_prompt else "a list"
        return BadLine(number, item_id, f"{key!r} must be {kind}, not {type(prompt).__name__}")
    try:
        build_prompt(prompt)
    except InvalidRequestError as exc:
        return BadLine(number, item_id, str(exc))
    return Item(number, item_id, prompt)


def parse_input(text: str, name: str) -> tuple[list[Item], list[BadLine]]:
    """The lines of INPUT to run, and those that cannot be run (blank lines are neither).

    :param text: INPUT, decoded.
    :param name: its file name (``-`` for stdin), for :func:`is_json_lines`.
    """
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    lines = text.split("\n")
    json_lines = is_json_lines(name, lines)
    why = (
        f"INPUT is JSON lines (its name ends in {os.path.splitext(name)[1]})"
        if name.lower().endswith(JSON_SUFFIXES)
        else "INPUT is JSON lines (its first line is a JSON object)"
    ) + ', so every line must be one, e.g. {"prompt": "..."}'
    items: list[Item] = []
    bad: list[BadLine] = []
    seen: dict[JsonId, int] = {}  # 1 and "1" are different ids, and different keys
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        entry = _json_entry(number, line, why) if json_lines else Item(number, number, line)
        item_id = entry.id
        if item_id is not None:
            if item_id in seen:
                entry = BadLine(
                    number, None, f"duplicate id {item_id!r} (first on line {seen[item_id]})"
                )
            else:
                seen[item_id] = number
        if isinstance(entry, Item):
            items.append(entry)
        else:
            bad.append(entry)
    return items, bad


def with_system(prompt: Prompt, system: Optional[str]) -> Prompt:
    """The messages sent for a prompt: ``system`` (if any) first."""
    if system is None:
        return prompt
    first = {"role": "system", "content": system}
    if isinstance(prompt, str):
        return [first, {"role": "user", "content": prompt}]
    return [first, *prompt]


def request_hash(prompt: Prompt, model: str) -> str:
    """``prompt_sha256`` of a record: the SHA-256 of the prompt as sent (messages formatted, the
    system message included) and the model, as hex."""
    # The keys in sorted order, and json.dumps' default settings (its fast, cached encoder).
    canonical = json.dumps({"model": model, "prompt": build_prompt(prompt)})
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# -- resuming from OUTPUT -----------------------------------------------------------------------


def _bounded_lines(file: BinaryIO, size: int, limit: int) -> Iterator[Optional[bytes]]:
    """The lines of the first ``size`` bytes of ``file``; ``None`` for each line longer than
    ``limit`` (read through, not kept)."""
    left = size
    while left > 0:
        line = file.readline(min(limit + 1, left))
        if not line:
            return  # the file shrank
        left -= len(line)
        if line.endswith(b"\n") or left == 0:
            yield line if len(line) <= limit else None
            continue
        while left > 0:  # too long: skip to the end of the line
            rest = file.readline(min(1 << 20, left))
            if not rest:
                return
            left -= len(rest)
            if rest.endswith(b"\n"):
                break
        yield None


def read_done(
    path: str, wanted: Mapping[JsonId, str], limit: int = MAX_RECORD_BYTES
) -> set[JsonId]:
    """The ids (keys of ``wanted``) whose newest record in OUTPUT has a text for the request
    ``wanted[id]`` (a :func:`request_hash`).

    Only a regular file is read (a device, a pipe or a missing file: nothing is done), and only up
    to the size it has now; a line that is not a JSON object (a line cut short by a killed run) or
    longer than ``limit`` bytes is skipped.

    :raises UsageError: the file is there but cannot be read.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return set()
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise UsageError(f"cannot read OUTPUT {path!r} to resume from it: {exc.strerror}") from None
    newest: dict[JsonId, bool] = {}
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced since the check above
            return set()
        try:
            for number, line in enumerate(_bounded_lines(file, info.st_size, limit)):
                if line is not None:
                    bom = number == 0 and line.startswith(codecs.BOM_UTF8)
                    _note(newest, line[len(codecs.BOM_UTF8) :] if bom else line, wanted)
        except OSError as exc:
            raise UsageError(f"cannot read OUTPUT {path!r} to resume from it: {exc}") from None
    return {key for key, done in newest.items() if done}


def _note(newest: dict[JsonId, bool], line: bytes, wanted: Mapping[JsonId, str]) -> None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return
    if not isinstance(record, dict):
        return
    item_id: Any = record.get("id")
    if not _is_item_id(item_id):
        return
    expected = wanted.get(item_id)
    if expected is not None:
        newest[item_id] = isinstance(record.get("text"), str) and (
            record.get("prompt_sha256") == expected
        )


# -- writing ------------------------------------------------------------------------------------


def fileno(stream: Optional[IO[Any]]) -> Optional[int]:
    """The file descriptor of a stream, or ``None`` (closed, or not a file)."""
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def same_file(path: str, fd: Optional[int]) -> bool:
    """Whether ``path`` names the file that is open as ``fd``."""
    if fd is None:
        return False
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except (OSError, ValueError):
        return False


def open_output(path: str) -> int:
    """OUTPUT opened to append (created if missing) and, when it is a regular file, locked for
    this run (:func:`lock_output`); starting on a fresh line when a killed run left its last line
    unfinished. Returns the file descriptor; closing it releases the lock.

    :raises UsageError: it cannot be opened (a folder, a read-only file or folder, ...), or
        another run holds its lock.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        raise UsageError(f"cannot open OUTPUT {path!r}: {exc.strerror or exc}") from None
    try:
        lock_output(fd, path)  # before the last line is looked at: another run may be writing it
    except BaseException:
        os.close(fd)
        raise
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size:
            with open(path, "rb") as file:
                file.seek(info.st_size - 1)
                unfinished = file.read(1) not in (b"\n", b"")
            if unfinished:
                os.write(fd, b"\n")
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"cannot use OUTPUT {path!r}: {exc.strerror or exc}") from None
    return fd


def lock_output(fd: int, path: str) -> None:
    """Take an exclusive lock (``fcntl.flock``) on OUTPUT, a regular file open as ``fd``, for as
    long as ``fd`` is open, so that two runs never resume from and append to one OUTPUT at once
    (both would run every prompt the other had not finished yet).

    A pipe or a device is not locked (it is never read to resume). Where there is no ``flock``
    (Windows), or the file system refuses it, the run goes on unlocked, saying so in a log record.

    :raises UsageError: another run holds the lock.
    """
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
    except OSError:
        return
    if _flock is None:
        logger.debug("OUTPUT %r is not locked: this system has no flock()", path)
        return
    try:
        _flock(fd)
    except BlockingIOError:
        raise UsageError(
            f"OUTPUT {path!r} is in use by another batch run (it holds a lock on it): wait for "
            "that run to end, or give another OUTPUT. Nothing was sent"
        ) from None
    except OSError as exc:  # e.g. ENOLCK: a file system without locks
        logger.warning(
            "cannot lock OUTPUT %r (%s): another batch run on it at once would not be stopped",
            path,
            _strerror(exc),
        )


def _encode(record: Mapping[str, Any], ascii_only: bool) -> bytes:
    if not ascii_only:
        try:
            return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate in a reply: escaped below
    return (json.dumps(record) + "\n").encode("ascii")


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class RecordWriter:
    """Writes records as JSON lines, each one whole or not at all.

    :param name: the output, as messages name it (``"stdout"``, ``"OUTPUT 'x.jsonl'"``).
    :param fd: the file descriptor written to (unbuffered); or else
    :param stream: a text stream without a file descriptor.
    :param ascii_only: escape every non-ASCII character.
    :param signals: held while a record is written, so that Ctrl-C and SIGTERM wait for its end.
    """

    def __init__(
        self,
        name: str,
        *,
        fd: Optional[int] = None,
        stream: Optional[IO[str]] = None,
        ascii_only: bool = False,
        signals: Optional[StopSignals] = None,
    ) -> None:
        self.name = name
        self.fd = fd
        self.stream = stream
        self.ascii_only = ascii_only
        self.signals = signals
        self.stdout = name == "stdout"
        #: How many records were written whole.
        self.written = 0
        self._regular = False
        if fd is not None:
            with contextlib.suppress(OSError):
                self._regular = stat.S_ISREG(os.fstat(fd).st_mode)

    def write(
        self, record: Mapping[str, Any], *, then: Optional[Callable[[], object]] = None
    ) -> None:
        """Write one record.

        :param then: called once the record is written whole, before a Ctrl-C or SIGTERM that
            came meanwhile is raised: what it counts is exactly what was written.
        :raises OutputError: the write failed; a regular file is cut back to where it was.
        """
        data = _encode(record, self.ascii_only)
        hold = self.signals.hold() if self.signals is not None else contextlib.nullcontext()
        with hold:
            try:
                if self.fd is not None:
                    self._write_fd(self.fd, data)
                else:
                    assert self.stream is not None
                    self.stream.write(data.decode("utf-8"))
                    self.stream.flush()
            except OSError as exc:
                broken = isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE
                what = "the reader of the pipe went away" if broken else _strerror(exc)
                raise OutputError(
                    f"cannot write to {self.name}: {what}", broken_pipe=broken, stdout=self.stdout
                ) from exc
            self.written += 1
            if then is not None:
                then()

    def _write_fd(self, fd: int, data: bytes) -> None:
        start = os.lseek(fd, 0, os.SEEK_END) if self._regular else None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:  # a failed write, or a second Ctrl-C that would not wait
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # no half record is left behind
            raise


# -- signals ------------------------------------------------------------------------------------


class StopSignals:
    """While entered in the main thread: SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises
    :class:`Terminated`, except inside :meth:`hold`, where the first one waits until it ends (a
    second one is raised at once). A signal that was ignored when the command started (``nohup``,
    a background job) stays ignored. (Python ignores SIGXFSZ: a file size limit is a failed write,
    reported like a full disk.)
    """

    def __init__(self) -> None:
        self._held = 0
        self._pending: Optional[KeyboardInterrupt] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if self._held and self._pending is None:
            self._pending = exc
            return
        raise exc  # a second signal does not wait (a write to a pipe nobody reads may never end)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep SIGINT and SIGTERM from raising inside the block; one that came is raised at its
        end (unless the block raised)."""
        self._held += 1
        pending: Optional[KeyboardInterrupt] = None
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                pending, self._pending = self._pending, None
        if pending is not None:
            raise pending
