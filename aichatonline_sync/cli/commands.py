"""The ``aichatonline`` command (also ``python -m aichatonline_sync``): ``chat``, ``batch``, ``serve``,
``gateway``, ``cache``.

Exit status:

- ``0``: done.
- ``1``: an upstream or network failure, or a write that failed (a full disk, a read-only file):
  one ``aichatonline: error: ...`` line on stderr, no traceback; for ``batch``: also at least one
  prompt failed, or an input line was malformed.
- ``2``: a usage error (a bad option or environment variable, an empty prompt, no prompt at all,
  input that is not UTF-8, an OUTPUT that cannot be opened, is the INPUT or is in use by
  another ``batch`` run).
- ``130``: interrupted by Ctrl-C; ``143``: stopped by SIGTERM (``timeout``, systemd, ``docker
  stop``), handled the same way. ``serve`` and ``gateway`` treat both as their normal way to stop
  and exit 0 (``gateway`` lets the replies in progress finish on SIGTERM first).
- ``141``: stdout was closed early (``aichatonline chat ... | head -c 10``): ``chat`` stops quietly,
  ``batch`` says how far it got; the status is the one a shell shows for a program ended by
  ``SIGPIPE`` (128 + 13).

Only this module writes to stderr, and only it and :mod:`._cli_io` (the files and signals of the
command) write to stdout; the library logs through :mod:`logging`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Optional, Union

import requests
from requests.adapters import HTTPAdapter

from .. import Session, batch_iter
from .._client.config import validate_base_url, validate_verify
from .._client.env import (
    CACHE_ENV,
    MAX_RETRIES_ENV,
    PROXY_ENV,
    TIMEOUT_ENV,
    gateway_key_from_env,
    parse_cache_path,
    parse_count,
    parse_gateway_key,
    parse_proxy,
    parse_timeout,
    setting_from_env,
)
from .._version import __version__
from .._wire import redact as _redact
from .._wire.errors import AiChatOnlineError, APIConnectionError, InvalidRequestError
from .._wire.protocol import MODELS
from .io import (
    BadLine,
    Item,
    OutputError,
    RecordWriter,
    StopSignals,
    Terminated,
    UsageError,
    decode_utf8,
    fileno,
    open_output,
    parse_input,
    read_done,
    read_input,
    read_stdin,
    request_hash,
    same_file,
    with_system,
)

if TYPE_CHECKING:
    from ..gateway.server import GatewayServer
    from ..testing import Emulator

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
]

logger = _redact.logger("aichatonline_sync")

PROG = "aichatonline"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143


_BATCH_THREAD_PREFIX = "aichatonline-batch"
#: The library's advice for an untrusted certificate, and the command line's words for it.
_VERIFY_HINT = ("pass verify='/path/to/ca.pem'", "pass --verify /path/to/ca.pem")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (and an exception, not ``sys.exit``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _error(message: str) -> None:
    _say(f"{PROG}: error: {_one_line(message)}")


def _say(line: str) -> None:
    """Write one line to stderr. When stderr cannot take it (``2>/dev/full``, a closed pipe, none),
    there is nobody left to tell: the exit status still says what happened, and stderr is pointed
    at devnull so that the flush at exit does not fail again (Python would exit with 120)."""
    stderr = sys.stderr
    if stderr is None:  # started with stderr closed: ``2>&-``
        return
    try:
        stderr.write(line + "\n")
        stderr.flush()
    except (OSError, ValueError):
        _silence(stderr)


def _status_of(interrupt: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


# -- option types --------------------------------------------------------------------------------


def _argument(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An ``argparse`` type from a parser of :mod:`._env` (its ``ValueError`` says what is wrong)."""

    def argument(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    argument.__name__ = name
    return argument


_timeout = _argument(parse_timeout, "timeout")
_proxy = _argument(parse_proxy, "proxy")
_api_key = _argument(parse_gateway_key, "API key")
_cache_path = _argument(parse_cache_path, "cache path")

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(value: str) -> float:
    """A duration: seconds, or a number with ``s``, ``m``, ``h`` or ``d`` (``30d``)."""
    text = value.strip().lower()
    unit = _AGE_UNITS.get(text[-1:], 0)
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"must be a duration such as 3600, 90m, 12h or 30d, not {value!r}"
        )
    return seconds


def _count(minimum: int) -> Callable[[str], int]:
    return _argument(lambda value: parse_count(value, minimum), f"whole number >= {minimum}")


class _OneLine(logging.Formatter):
    """One line a record, without tracebacks (``-v`` shows them): a warning of a library below
    us (urllib3's "Failed to parse headers") is one line on stderr, not a page."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _verify(value: str) -> Union[bool, str]:
    """``false`` (no TLS verification), ``true`` (the default), or the path of a CA bundle."""
    if value.strip().lower() in ("false", "no", "off"):
        return False
    if value.strip().lower() in ("true", "yes", "on"):
        return True
    try:
        return validate_verify(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'false' to turn verification off)") from None


def _delay(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value!r}")
    return seconds


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of requests per second, not {value!r}"
        ) from None
    if not math.isfinite(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive number of requests per second, not {value!r}"
        )
    return rate


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {value!r}")
    return port


def _base_url(value: str) -> str:
    try:
        return validate_base_url(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("base_url ", "", 1)) from None


def _model(value: str) -> str:
    if value not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {value!r}: the service offers only {', '.join(MODELS)}"
        )
    return value


# -- the parser ----------------------------------------------------------------------------------

_MAIN_EPILOG = f"""\
examples:
  {PROG} chat Explain HTTP chunked encoding
  echo "Hello" | {PROG} chat --system "Be brief."
  {PROG} chat --emulator "Hello"              # offline, against the bundled emulator
  {PROG} batch prompts.txt -o results.jsonl --workers 8
  {PROG} serve --port 8765
  {PROG} gateway --emulator                   # an OpenAI-compatible API on :8000/v1
  {PROG} chat --cache replies.sqlite "Hello"  # asked again: replayed, nothing sent

exit status: 0 done, 1 upstream or network failure (or a failed write), 2 usage error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout closed early (e.g. piped
into head); serve and gateway stop on Ctrl-C or SIGTERM with 0. Run '{PROG} COMMAND --help'
for the options of a command.
"""

_CHAT_EPILOG = f"""\
examples:
  {PROG} chat Explain HTTP chunked encoding   # the words are joined by spaces, like echo
  echo "Summarise: $(cat notes.txt)" | {PROG} chat --system "Be brief."
  {PROG} chat - < question.txt
  {PROG} chat --emulator "Hello"              # offline: the bundled emulator answers
  {PROG} chat --timeout 5,120 --max-retries 5 --proxy http://127.0.0.1:3128 "Hi"
  {PROG} chat --verify /etc/ssl/my-ca.pem --base-url https://chat.internal "Hi"
  {PROG} chat -- -5 degrees is cold            # a prompt that starts with '-'
  {PROG} chat --cache ~/.cache/aco.sqlite "Hi" # the same prompt again: replayed from the file

The reply is written to stdout piece by piece as it arrives. A prompt read from stdin
(UTF-8; a BOM is dropped) loses one trailing newline. Exit status: 0 done, 1 upstream or
network failure (one line on stderr), 2 usage error (also an empty prompt, or stdin that
is not UTF-8), 130 interrupted, 143 terminated (SIGTERM).
"""

_BATCH_EPILOG = f"""\
examples:
  {PROG} batch prompts.txt -o results.jsonl --workers 8
  {PROG} batch prompts.jsonl -o results.jsonl --rate-limit 2     # at most 2 chats a second
  {PROG} batch prompts.txt -o results.jsonl --system "Answer in one sentence."
  printf 'Hi\\nWhat is HTTP?\\n' | {PROG} batch - --emulator
  {PROG} batch prompts.txt -o results.jsonl --cache replies.sqlite  # asked before: no request

INPUT (UTF-8; a BOM is dropped) is plain text, one prompt per line, or JSON lines:
  {{"id": "q1", "prompt": "What is HTTP?"}}
  {{"id": "q2", "messages": [{{"role": "system", "content": "Be brief."}},
                            {{"role": "user", "content": "Hi"}}]}}
It is JSON lines when its name ends in .jsonl or .ndjson, or when its first non-blank
line is a JSON object; then every non-blank line must be a JSON object with "prompt" or
"messages" (and an optional "id"; default: the line number). Otherwise every line is a
prompt as it is written, even one that starts with '{{'. Blank lines are skipped.
INPUT is read whole (up to 256 MiB) and checked before anything is sent.

Each result is appended to OUTPUT as one JSON line the moment it is done:
  {{"id": "q1", "text": "...", "elapsed": 1.234, "line": 1, "prompt_sha256": "..."}}
  {{"id": "q2", "error": {{"type": "RateLimitError", "message": "..."}}, "elapsed": 0.5, ...}}
An input line that cannot be run is reported on stderr and written as an error record
too ({{"id": ..., "error": {{"type": "InvalidInputLine", ...}}, "line": 7}}), so OUTPUT
accounts for every input line. "prompt_sha256" is the SHA-256 of the prompt as sent (the
system message included) and the model.

Run the same command again to resume: an id is skipped when its newest record in OUTPUT
has a "text" for the same prompt_sha256; failed ids and changed prompts run again (the old
records stay, as history). Only a regular file is read to resume: with OUTPUT '-' (or
/dev/stdout, a pipe, a device) every prompt runs. OUTPUT must not be the INPUT file.
A run locks its OUTPUT file (flock): a second run on it meanwhile exits 2 at once,
sending nothing.
Ctrl-C or SIGTERM stops the batch with a summary; no record is left half-written (a
second Ctrl-C does not wait for a write that cannot end).
Exit status 1 if any prompt failed or an input line was malformed, or a write failed.
"""

_SERVE_EPILOG = f"""\
examples:
  {PROG} serve                                   # http://127.0.0.1:8765
  {PROG} serve --port 0                          # any free port (the URL is printed)
  {PROG} serve --chunk-delay 0.05 --framing close --gzip

then, in another terminal:
  AICHATONLINE_BASE_URL=http://127.0.0.1:8765 {PROG} chat "Hello"

Runs until Ctrl-C or SIGTERM, then stops cleanly with exit status 0.
"""


_CACHE_EPILOG = f"""\
examples:
  {PROG} cache info replies.sqlite              # entries, size on disk, oldest and newest
  {PROG} cache clear replies.sqlite --older-than 30d
  {PROG} cache clear                             # every entry of ${CACHE_ENV}

A reply cache (--cache PATH on chat and batch, ${CACHE_ENV} for every command, the
gateway and the llm plugin) keeps every reply read to its end, keyed by the model and the
prompt as sent; a prompt found there is answered from the file, nothing sent. Entries never
expire on their own: clear them when the file grows, or when the service's answers should
be asked afresh. Exit status: 0 done, 2 usage error (also a file that is not a reply cache).
"""


_GATEWAY_EPILOG = f"""\
examples:
  {PROG} gateway                                 # http://127.0.0.1:8000/v1
  {PROG} gateway --emulator --port 0             # offline, on any free port (the URL is printed)
  AICHATONLINE_GATEWAY_KEY=s3cret {PROG} gateway --host 0.0.0.0

then, from code written for OpenAI's API:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret").chat.completions.create(...)

Serves GET /v1/models and POST /v1/chat/completions (stream and not) with a threaded server
of the standard library. Ctrl-C stops it at once; SIGTERM (systemd, docker stop) stops taking
requests and lets the replies in progress finish, up to --graceful-timeout seconds; either
way the exit status is 0. With a key, requests must carry 'Authorization: Bearer KEY'. In
production, run the same app under gunicorn, behind nginx (docs/deploy/ in the source):
  gunicorn -k gthread --threads 32 'aichatonline_sync.gateway:app'
"""


def _connection_options(*, model: bool = True) -> _Parser:
    """The options of the service's connection (with ``--model`` unless the requests name it)."""
    connection = _Parser(add_help=False)
    group = connection.add_argument_group("connection options")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--base-url",
        type=_base_url,
        metavar="URL",
        help="the service's base URL (default: $AICHATONLINE_BASE_URL, else the real service)",
    )
    where.add_argument(
        "--emulator",
        action="store_true",
        help="start the bundled emulator in-process and talk to it (no network needed)",
    )
    if model:
        group.add_argument(
            "--model", type=_model, metavar="MODEL", help=f"the model (default: {MODELS[0]})"
        )
    group.add_argument(
        "--proxy",
        type=_proxy,
        metavar="URL",
        help=f"an http://, https:// or socks5:// proxy (default: ${PROXY_ENV})",
    )
    group.add_argument(
        "--timeout",
        type=_timeout,
        metavar="SECONDS|CONNECT,READ|none",
        help="seconds to wait to connect and between two bytes of the reply; 'none': no limit "
        f"(default: ${TIMEOUT_ENV}, else 10 s connect, 60 s read)",
    )
    group.add_argument(
        "--max-retries",
        type=_count(0),
        metavar="N",
        help=f"retries after the first attempt (default: ${MAX_RETRIES_ENV}, else 2)",
    )
    group.add_argument(
        "--verify",
        type=_verify,
        metavar="PATH|false",
        help="TLS: a CA bundle (PEM) to trust, or 'false' to not verify certificates "
        "(default: the system's CAs, or $REQUESTS_CA_BUNDLE)",
    )
    group.add_argument(
        "--max-line-bytes",
        type=_count(1),
        metavar="N",
        help="the longest reply line accepted, in bytes (default: 1048576)",
    )
    return connection


def _cache_options() -> _Parser:
    """``--cache PATH``, for the commands that chat."""
    cache = _Parser(add_help=False)
    cache.add_argument(
        "--cache",
        type=_cache_path,
        metavar="PATH",
        help="a reply cache file (SQLite; made when missing): a prompt asked before is "
        f"replayed from it, nothing sent; a reply read to its end is stored (default: ${CACHE_ENV})",
    )
    return cache


def _add_listen_options(command: _Parser, *, port: int) -> None:
    """``--host`` (default 127.0.0.1) and ``--port`` (default ``port``), for the commands that
    serve."""
    command.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)"
    )
    command.add_argument(
        "--port",
        type=_port,
        default=port,
        help=f"the port to listen on; 0 picks a free one (default: {port})",
    )


def _add_cache_command(commands: Any, common: _Parser) -> None:
    """``cache info|clear [PATH]``."""
    cache = commands.add_parser(
        "cache",
        parents=[common],
        help="show or clear a reply cache file",
        description="Show or clear a reply cache file (made by --cache or $AICHATONLINE_CACHE).",
        epilog=_CACHE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("action", choices=("info", "clear"), help="what to do")
    cache.add_argument(
        "path", nargs="?", type=_cache_path, metavar="PATH", help=f"the file (default: ${CACHE_ENV})"
    )
    cache.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="clear only the entries older than AGE: seconds, or 90m, 12h, 30d (default: all)",
    )
    cache.set_defaults(func=_run_cache)


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of the ``aichatonline`` command."""
    formatter = argparse.RawDescriptionHelpFormatter

    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debug messages (requests, retries) to stderr",
    )
    connection = _connection_options()
    cached = _cache_options()

    parser = _Parser(
        prog=PROG,
        description="Chat with the AiChatOnline service from the command line.",
        epilog=_MAIN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    chat = commands.add_parser(
        "chat",
        parents=[common, connection, cached],
        help="stream the reply to one prompt to stdout",
        description="Send one prompt and stream the reply to stdout as it arrives.",
        epilog=_CHAT_EPILOG,
        formatter_class=formatter,
    )
    chat.add_argument(
        "prompt",
        nargs="*",
        metavar="PROMPT",
        help="the prompt (several words are joined by spaces); absent or '-': read it from stdin",
    )
    chat.add_argument(
        "-s", "--system", metavar="TEXT", help="a system message sent before the prompt"
    )
    chat.set_defaults(func=_run_chat)

    batch = commands.add_parser(
        "batch",
        parents=[common, connection, cached],
        help="run many prompts concurrently, results as JSON lines",
        description="Run every prompt of INPUT concurrently; append each result to OUTPUT.",
        epilog=_BATCH_EPILOG,
        formatter_class=formatter,
    )
    batch.add_argument("input", metavar="INPUT", help="the prompts file, or '-' for stdin")
    batch.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        help="the JSON lines file to append to, and to resume from (default: stdout)",
    )
    batch.add_argument(
        "-s",
        "--system",
        metavar="TEXT",
        help="a system message sent before every prompt (before the messages of a "
        "'messages' line too)",
    )
    batch.add_argument(
        "-w",
        "--workers",
        type=_count(1),
        default=8,
        metavar="N",
        help="chats at the same time (default: 8)",
    )
    batch.add_argument(
        "--rate-limit",
        type=_rate,
        metavar="R",
        help="at most R chats a second, across all workers (default: no limit)",
    )
    batch.set_defaults(func=_run_batch)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the bundled emulator in the foreground",
        description="Run the bundled AiChatOnline emulator until Ctrl-C or SIGTERM.",
        epilog=_SERVE_EPILOG,
        formatter_class=formatter,
    )
    _add_listen_options(serve, port=8765)
    serve.add_argument(
        "--chunk-delay",
        type=_delay,
        default=0.0,
        metavar="S",
        help="seconds to wait before every reply piece but the first (default: 0)",
    )
    serve.add_argument(
        "--framing",
        choices=("chunked", "length", "close"),
        default="chunked",
        help="the HTTP framing of replies (default: chunked)",
    )
    serve.add_argument("--gzip", action="store_true", help="gzip-compress the replies")
    serve.set_defaults(func=_run_serve)

    gateway = commands.add_parser(
        "gateway",
        parents=[common, _connection_options(model=False)],  # each request names its model
        help="serve an OpenAI-compatible API (/v1/chat/completions) in the foreground",
        description="Serve the service behind OpenAI's API, until Ctrl-C or SIGTERM.",
        epilog=_GATEWAY_EPILOG,
        formatter_class=formatter,
    )
    _add_listen_options(gateway, port=8000)
    gateway.add_argument(
        "--api-key",
        type=_api_key,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $AICHATONLINE_GATEWAY_KEY, else none)",
    )
    gateway.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="answer browsers of this origin (e.g. https://app.example.com) with CORS headers; "
        "repeat it for more (default: no CORS headers)",
    )
    gateway.add_argument(
        "--graceful-timeout",
        type=_delay,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for the replies in progress (streams too) to end, as "
        "gunicorn does; Ctrl-C stops at once (default: 30)",
    )
    gateway.set_defaults(func=_run_gateway)
    _add_cache_command(commands, common)
    return parser


# -- shared helpers ------------------------------------------------------------------------------


def _session_options(args: argparse.Namespace) -> dict[str, Any]:
    for option in ("proxy", "timeout", "max_retries", "cache"):  # the gateway reads cache from the variable only
        if getattr(args, option, None) is None:  # a given option wins over its variable, bad or not
            try:
                setattr(args, option, setting_from_env(option))
            except InvalidRequestError as exc:
                raise UsageError(str(exc)) from None
    if args.base_url is None and not args.emulator:
        try:
            args.base_url = setting_from_env("base_url")
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
    options: dict[str, Any] = {}
    for name in ("proxy", "timeout", "max_retries", "verify", "max_line_bytes", "cache"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


#: The connections to the emulator that ``gateway --emulator`` keeps. Its server has a thread per
#: client, and the pool of a given ``http`` does not grow (as a Session's own does, by
#: ``ensure_pool``): up to this many streams at a time, each connection is used again (above it,
#: urllib3 warns "Connection pool is full"). An unused place in the pool costs nothing.
_GATEWAY_POOL = 256


@contextlib.contextmanager
def _direct_http(pool: int) -> Iterator[requests.Session]:
    """A ``requests.Session`` that ignores the proxy environment variables (a Session's own
    ``http`` reads them, once), keeping ``pool`` connections (at least 10)."""
    with requests.Session() as http:
        http.trust_env = False
        adapter = HTTPAdapter(pool_maxsize=max(10, pool), max_retries=0)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        yield http


@contextlib.contextmanager
def _connect(args: argparse.Namespace, **extra: Any) -> Iterator[Session]:
    """A :class:`Session` for the connection options (and the Session options ``extra``), against
    the emulator with ``--emulator``."""
    options = {**_session_options(args), **extra}
    with contextlib.ExitStack() as stack:
        base_url: Optional[str] = args.base_url
        if args.emulator:
            from ..testing import Emulator

            emulator = stack.enter_context(Emulator())
            base_url = emulator.url
            logger.debug("started the emulator at %s", base_url)
            if "proxy" not in options:
                # The emulator is on the loopback interface: $HTTP_PROXY must not reroute it.
                pool = _GATEWAY_POOL if args.command == "gateway" else getattr(args, "workers", 1)
                options["http"] = stack.enter_context(_direct_http(pool))
        if options.get("verify") is False:
            # Asked for: urllib3's warning at every request would only bury the output.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Unverified HTTPS request")
            logger.warning("TLS certificates are not verified (--verify false)")
        session = stack.enter_context(Session(base_url, **options))
        yield session


def _checked_text(value: Optional[str], what: str) -> Optional[str]:
    """A command-line argument that must be text (the shell hands over bytes that may not be)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text; nothing was sent") from None
    return value


def _cli_words(exc: AiChatOnlineError) -> str:
    """A library error in the words of the command line (its options, not Python keywords)."""
    message = str(exc)
    if isinstance(exc, APIConnectionError):
        message = message.replace(*_VERIFY_HINT)
    return message


# -- chat ----------------------------------------------------------------------------------------


class _LineTracker:
    """Writes to stdout, flushing each piece, and remembers whether a line is left open."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.open_line = False

    def write(self, text: str) -> None:
        """:raises OutputError: stdout failed (a closed pipe stays a ``BrokenPipeError``)."""
        if not text:
            return
        # Set first: a Ctrl-C or SIGTERM right after the text is out must still end the line.
        self.open_line = not text.endswith("\n")
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:  # e.g. PYTHONIOENCODING=ascii:strict, or a lone surrogate
                encoding = getattr(self.stream, "encoding", None) or "utf-8"
                self.stream.write(text.encode(encoding, "replace").decode(encoding))
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(
                f"cannot write to stdout: {exc.strerror or exc}", stdout=True
            ) from exc

    def end_line(self) -> None:
        if self.open_line:
            self.write("\n")


def _read_prompt(args: argparse.Namespace) -> str:
    words: list[str] = args.prompt
    if words and words != ["-"]:
        text = _checked_text(" ".join(words), "PROMPT")
        assert text is not None
        return text
    stdin = sys.stdin
    if stdin is None or (not words and stdin.isatty()):
        raise UsageError(
            "no prompt: give one as arguments, or pipe it into stdin "
            f"(e.g. echo 'Hello' | {PROG} chat), or pass '-' to type it (end with Ctrl-D)"
        )
    text = decode_utf8(read_stdin("the prompt"), "stdin")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _run_chat(args: argparse.Namespace) -> int:
    with StopSignals():
        prompt = _read_prompt(args)
        system = _checked_text(args.system, "--system")
        if not prompt.strip():
            # Checked here, not left to the library: with --system the prompt would not be empty.
            raise UsageError("the prompt is empty (or only white space)")
        if sys.stdout is None:
            raise UsageError("there is no stdout to write the reply to")
        out = _LineTracker(sys.stdout)
        with _connect(args) as session:
            try:
                with session.chat(with_system(prompt, system), model=args.model) as stream:
                    for piece in stream:
                        out.write(piece)
            except (AiChatOnlineError, KeyboardInterrupt):
                with contextlib.suppress(OSError, OutputError):
                    out.end_line()
                raise
        out.end_line()
    return EXIT_OK


# -- batch ---------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What a batch did, for its summary line."""

    todo: int
    skipped: int
    malformed: int
    succeeded: int = 0
    failed: int = 0

    def count(self, *, ok: bool) -> None:
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1

    def line(self, interrupt: Optional[KeyboardInterrupt] = None) -> str:
        text = (
            f"{self.succeeded} succeeded, {self.failed + self.malformed} failed, "
            f"{self.skipped} skipped (already done)"
        )
        if interrupt is not None:
            how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
            text += f", {self.todo - self.succeeded - self.failed} not finished ({how})"
        return text


def _output_path(args: argparse.Namespace) -> Optional[str]:
    """The OUTPUT file to append to, or ``None`` for stdout (``-``, ``/dev/stdout``, ...).

    :raises UsageError: OUTPUT is the INPUT file.
    """
    path: Optional[str] = args.output
    if path is None or path == "-" or same_file(path, fileno(sys.stdout)):
        return None
    if args.input == "-":
        same = same_file(path, fileno(sys.stdin))
    else:
        try:
            same = os.path.samefile(path, args.input)
        except (OSError, ValueError):
            same = False
    if same:
        raise UsageError(
            f"OUTPUT {path!r} is the INPUT file: the results are appended to OUTPUT, so give "
            "another file"
        )
    return path


def _writer(path: Optional[str], fd: Optional[int], signals: StopSignals) -> RecordWriter:
    """The writer of OUTPUT ``path`` open as ``fd``, or of stdout when ``path`` is ``None``."""
    if path is not None:
        return RecordWriter(f"OUTPUT {path!r}", fd=fd, signals=signals)
    stdout = sys.stdout
    if stdout is None:
        raise UsageError("there is no stdout to write the results to: give -o OUTPUT")
    encoding = (getattr(stdout, "encoding", None) or "").lower().replace("-", "")
    ascii_only = encoding not in ("utf8", "utf_8")
    out_fd = fileno(stdout)
    if out_fd is None:  # a text stream without a file below it (e.g. replaced by a test)
        return RecordWriter("stdout", stream=stdout, ascii_only=ascii_only, signals=signals)
    stdout.flush()
    return RecordWriter("stdout", fd=out_fd, ascii_only=ascii_only, signals=signals)


def _want_progress() -> bool:
    if not (sys.stderr is not None and sys.stderr.isatty()):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _abandon_workers(status: int) -> None:
    """After Ctrl-C, SIGTERM or a failed write: do not wait at exit for the chats still running in
    worker threads."""
    if any(t.name.startswith(_BATCH_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate()):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(status)


def _bad_record(bad: BadLine) -> dict[str, Any]:
    return {
        "id": bad.id,
        "error": {"type": "InvalidInputLine", "message": bad.reason},
        "line": bad.line,
    }


def _run_chats(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    todo: list[tuple[Item, Any, str]],
    writer: RecordWriter,
    tally: _Tally,
) -> None:
    """Run ``(item, messages, hash)`` of ``todo`` and write a record for each as it ends."""
    chat_options: dict[str, Any] = {}
    if args.model is not None:
        chat_options["model"] = args.model
    session = stack.enter_context(_connect(args))
    results = batch_iter(
        [messages for _, messages, _ in todo],
        max_workers=args.workers,
        rate_limit=args.rate_limit,
        progress=_want_progress(),
        session=session,
        **chat_options,
    )
    # batch_iter is a generator: close it (cancelling what has not started) on exit.
    stack.callback(getattr(results, "close", lambda: None))
    for result in results:
        item, _, digest = todo[result.index]
        record: dict[str, Any] = {"id": item.id}
        if result.error is None:
            record["text"] = result.text
        else:
            record["error"] = {"type": type(result.error).__name__, "message": str(result.error)}
            logger.info("id %r (INPUT line %d) failed: %s", item.id, item.line, result.error)
        record["elapsed"] = round(result.elapsed, 3)
        record["line"] = item.line
        record["prompt_sha256"] = digest
        # Counted only once written: the summary counts exactly the records OUTPUT holds.
        writer.write(record, then=functools.partial(tally.count, ok=result.error is None))


def _run_batch(args: argparse.Namespace) -> int:
    where, text = read_input(args.input)
    items, bad = parse_input(text, args.input)
    system = _checked_text(args.system, "--system")
    model = args.model or MODELS[0]
    requests_ = [with_system(item.prompt, system) for item in items]
    hashes = [request_hash(messages, model) for messages in requests_]
    path = _output_path(args)
    with StopSignals() as signals, contextlib.ExitStack() as stack:
        fd: Optional[int] = None
        done = set()
        if path is not None:
            # Opened (and locked) before it is read: what it holds is then this run's to resume.
            fd = open_output(path)
            stack.callback(os.close, fd)
            done = read_done(path, {item.id: digest for item, digest in zip(items, hashes)})
        todo = [
            (item, messages, digest)
            for item, messages, digest in zip(items, requests_, hashes)
            if item.id not in done
        ]
        tally = _Tally(todo=len(todo), skipped=len(items) - len(todo), malformed=len(bad))
        try:
            writer = _writer(path, fd, signals)
            for line in bad:
                _error(f"{where} line {line.line}: {line.reason}; not run")
                writer.write(_bad_record(line))
            if todo:
                _run_chats(args, stack, todo, writer, tally)
        except KeyboardInterrupt as interrupt:
            _say(tally.line(interrupt))
            _abandon_workers(_status_of(interrupt))
            raise
        except OutputError as exc:
            written = writer.written
            _error(f"{exc}; stopped after {written} record{'' if written == 1 else 's'}")
            if exc.stdout:
                _silence_stdout()
            status = EXIT_BROKEN_PIPE if exc.broken_pipe else EXIT_FAILURE
            _abandon_workers(status)
            return status
    _say(tally.line())
    return EXIT_FAILURE if tally.failed or tally.malformed else EXIT_OK


# -- serve ---------------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    # A KeyboardInterrupt like Ctrl-C's, not an Exception: the signal can land in code that
    # catches Exception and goes on, such as socketserver's hand-over of a new connection to its
    # thread (BaseServer._handle_request_noblock), where the server would keep serving.
    raise Terminated


def _run_serve(args: argparse.Namespace) -> int:
    from ..testing import Emulator

    try:
        emulator: Emulator = Emulator(
            host=args.host,
            port=args.port,
            chunk_delay=args.chunk_delay,
            framing=args.framing,
            gzip=args.gzip,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        emulator.start()
    except OSError as exc:
        _error(f"cannot listen on {args.host}:{args.port}: {exc}")
        return EXIT_FAILURE
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous: Any = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        sys.stdout.write(f"Emulator listening on {emulator.url} (Ctrl-C to stop)\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
        logger.debug("stopping the emulator")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        emulator.stop()
    return EXIT_OK


# -- gateway -------------------------------------------------------------------------------------


def _gateway_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``make_app`` given on the command line, beyond the session and the key."""
    options: dict[str, Any] = {}
    if args.cors_origins:
        options["cors_origins"] = list(args.cors_origins)
    return options


def _stop_gateway(server: GatewayServer, stop: KeyboardInterrupt, grace: float) -> None:
    """After Ctrl-C: stop at once (the replies in progress are cut). After SIGTERM: let them end,
    up to ``grace`` seconds (a second Ctrl-C or SIGTERM cuts them at once)."""
    if not isinstance(stop, Terminated) or not grace:
        logger.debug("stopping the gateway")
        return
    logger.info(
        "SIGTERM: waiting up to %g s for %d replies in progress",
        grace,
        server.replies_in_progress,
    )
    try:
        left = server.drain(grace)
    except KeyboardInterrupt:
        left = server.replies_in_progress
        if left:
            logger.warning("stopped at once: %d replies in progress were cut", left)
        return
    if left:
        logger.warning(
            "the graceful timeout (%g s) ran out: %d replies in progress were cut", grace, left
        )


def _run_gateway(args: argparse.Namespace) -> int:
    # The server is checked first: without waitress the command says what to install and exits
    # before it starts the emulator or a session.
    try:
        from ..gateway import server as _server  # noqa: F401
    except ImportError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    from .._wire.redact import redact_url
    from ..gateway import make_app, make_server, metrics_hooks

    if args.api_key is None:  # a given --api-key wins over the variable, bad or not
        args.api_key = gateway_key_from_env()
    options = _gateway_options(args)
    with _connect(args, event_hooks=metrics_hooks()) as session:
        app = make_app(session, api_key=args.api_key, **options)
        try:
            server = make_server(app, args.host, args.port)
        except OSError as exc:
            _error(f"cannot listen on {args.host}:{args.port}: {exc}")
            return EXIT_FAILURE
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous: Any = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
        try:
            upstream = "the bundled emulator" if args.emulator else redact_url(session.base_url)
            sys.stdout.write(
                f"Gateway listening on {server.url}/v1, answered by {upstream} (Ctrl-C to stop)\n"
            )
            sys.stdout.flush()
            server.serve_forever()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
            _stop_gateway(server, stop, args.graceful_timeout)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            server.server_close()
    return EXIT_OK


# -- cache ---------------------------------------------------------------------------------------


def _run_cache(args: argparse.Namespace) -> int:
    from .. import ReplyCache

    path = args.path
    if path is None:
        try:
            path = setting_from_env("cache")
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
    if path is None:
        raise UsageError(f"give the cache file: {PROG} cache {args.action} PATH (or set ${CACHE_ENV})")
    if not os.path.exists(path):  # opening it would make an empty cache
        raise UsageError(f"no reply cache at {path!r} (no such file)")
    if args.action == "info" and args.older_than is not None:
        raise UsageError("--older-than goes with 'clear', not 'info'")
    with ReplyCache(path) as cache:
        if args.action == "clear":
            removed = cache.clear(older_than=args.older_than)
            left = len(cache)
            sys.stdout.write(f"{path}: removed {removed} entries, {left} left\n")
            return EXIT_OK
        stats = cache.stats()
    when = (
        f", from {_local_time(stats.oldest)} to {_local_time(stats.newest)}"
        if stats.oldest is not None and stats.newest is not None
        else ""
    )
    sys.stdout.write(f"{path}: {stats.entries} entries, {stats.size} bytes on disk{when}\n")
    return EXIT_OK


def _local_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


# -- main ----------------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Send log records to stderr; returns the function that undoes it."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    # On the handler, not only on our loggers: urllib3's and gunicorn's records pass here too.
    handler.addFilter(_redact.RedactingFilter())
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    else:
        handler.setFormatter(_OneLine(f"{PROG}: %(levelname)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(level)

    return undo


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull so that the flush at exit cannot fail again."""
    _silence(sys.stdout)


def _silence(stream: Optional[IO[str]]) -> None:
    """Point ``stream``'s file descriptor at devnull (what it still buffers is dropped there)."""
    if stream is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _take_extras(args: argparse.Namespace, extras: list[str]) -> None:
    """What argparse left: more words of a ``chat`` prompt, else a usage error that points to the
    command's own ``--help``."""
    command = getattr(args, "command", None)
    where = f"{PROG} {command}" if command else PROG
    options = [extra for extra in extras if extra.startswith("-") and extra != "-"]
    if command == "chat" and not options:
        args.prompt.extend(extras)  # ``chat Hello -s S world``: the prompt is "Hello world"
        return
    if options:
        hint = (
            "; to send a prompt that starts with '-', put '--' before it"
            if command == "chat"
            else ""
        )
        raise UsageError(f"unknown option {options[0]!r} (see '{where} --help'{hint})")
    raise UsageError(f"unexpected argument {extras[0]!r} (see '{where} --help')")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``aichatonline`` command and return its exit status.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :returns: 0 done, 1 failure, 2 usage error, 130 interrupted, 141 stdout closed early,
        143 terminated (SIGTERM).
    """
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            _take_extras(args, extras)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if getattr(args, "func", None) is None:
        _say(parser.format_usage().rstrip("\n"))
        _error(f"give a command: chat, batch, serve, gateway or cache (see '{PROG} --help')")
        return EXIT_USAGE
    undo_logging = _setup_logging(bool(args.verbose))
    try:
        status: int = args.func(args)
        return status
    except (UsageError, InvalidRequestError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except AiChatOnlineError as exc:
        _error(_cli_words(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt as interrupt:
        return _status_of(interrupt)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OutputError as exc:
        _error(str(exc))
        if exc.stdout:
            _silence_stdout()
        return EXIT_BROKEN_PIPE if exc.broken_pipe else EXIT_FAILURE
    finally:
        undo_logging()
