"""The ``aichatonline`` command (also ``python -m aichatonline_sync``): ``chat``, ``batch``, ``serve``,
``gateway``.

Exit status:

- ``0``: done.
- ``1``: an upstream or network failure (one ``aichatonline: error: ...`` line on stderr, no
  traceback); for ``batch``: at least one prompt failed, or an input line was malformed.
- ``2``: a usage error (a bad option or environment variable, an empty prompt, no prompt at all).
- ``130``: interrupted by Ctrl-C (``serve`` and ``gateway`` treat Ctrl-C as their normal way to stop
  and exit 0).
- ``141``: stdout was closed early (``aichatonline chat ... | head -c 10``): the command stops
  quietly, and the status is the one a shell shows for a program ended by ``SIGPIPE`` (128 + 13).

Only this module writes to stdout and stderr; the library logs through :mod:`logging`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Optional, Union

import requests
from requests.adapters import HTTPAdapter

from ._api import batch_iter
from ._config import validate_base_url, validate_proxy
from ._errors import AiChatOnlineError, InvalidRequestError
from ._prompt import build_prompt
from ._session import MODELS, Session
from ._version import __version__

if TYPE_CHECKING:
    from .testing import Emulator

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

logger = logging.getLogger("aichatonline_sync")

PROG = "aichatonline"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

PROXY_ENV = "AICHATONLINE_PROXY"
TIMEOUT_ENV = "AICHATONLINE_TIMEOUT"
MAX_RETRIES_ENV = "AICHATONLINE_MAX_RETRIES"

_BATCH_THREAD_PREFIX = "aichatonline-batch"

JsonId = Union[str, int]


class UsageError(Exception):
    """A bad command line, option, environment variable or prompt: exit status 2."""


class _Terminated(Exception):
    """Raised by the SIGTERM handler of ``serve``."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (and an exception, not ``sys.exit``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()


# -- option types --------------------------------------------------------------------------------


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return seconds


def _delay(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value!r}")
    return seconds


def _count(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}, not {value!r}"
            ) from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, not {value!r}")
        return number

    parse.__name__ = f"whole number >= {minimum}"
    return parse


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


def _proxy(value: str) -> str:
    try:
        proxy = validate_proxy(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert proxy is not None
    return proxy


def _model(value: str) -> str:
    if value not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {value!r}: the service offers only {', '.join(MODELS)}"
        )
    return value


# -- the parser ----------------------------------------------------------------------------------

_MAIN_EPILOG = f"""\
examples:
  {PROG} chat "Explain HTTP chunked encoding"
  echo "Hello" | {PROG} chat --system "Be brief."
  {PROG} chat --emulator "Hello"              # offline, against the bundled emulator
  {PROG} batch prompts.txt -o results.jsonl --workers 8
  {PROG} serve --port 8765
  {PROG} gateway --emulator                   # an OpenAI-compatible API on :8000/v1

exit status: 0 done, 1 upstream or network failure, 2 usage error, 130 interrupted,
141 stdout closed early (e.g. piped into head).
Run '{PROG} COMMAND --help' for the options of a command.
"""

_CHAT_EPILOG = f"""\
examples:
  {PROG} chat "Explain HTTP chunked encoding"
  echo "Summarise: $(cat notes.txt)" | {PROG} chat --system "Be brief."
  {PROG} chat - < question.txt
  {PROG} chat --emulator "Hello"              # offline: the bundled emulator answers
  {PROG} chat --timeout 30 --max-retries 5 --proxy http://127.0.0.1:3128 "Hi"

The reply is written to stdout piece by piece as it arrives. A prompt read from stdin
loses one trailing newline. Exit status: 0 done, 1 upstream or network failure (one line
on stderr), 2 usage error (also an empty prompt), 130 interrupted.
"""

_BATCH_EPILOG = f"""\
examples:
  {PROG} batch prompts.txt -o results.jsonl --workers 8
  {PROG} batch prompts.jsonl -o results.jsonl --rate-limit 2     # at most 2 chats a second
  printf 'Hi\\nWhat is HTTP?\\n' | {PROG} batch - --emulator

INPUT has one prompt per line, or JSON lines such as
  {{"id": "q1", "prompt": "What is HTTP?"}}
  {{"id": "q2", "messages": [{{"role": "system", "content": "Be brief."}},
                            {{"role": "user", "content": "Hi"}}]}}
(the id defaults to the line number; blank lines are skipped). Each result is appended
to OUTPUT as one JSON line the moment it is done:
  {{"id": "q1", "text": "...", "elapsed": 1.234}}
  {{"id": "q2", "error": {{"type": "RateLimitError", "message": "..."}}, "elapsed": 0.5}}
Run the same command again to resume: the ids that already have a "text" in OUTPUT are
skipped, the failed ones are run again. Exit status 1 if any prompt failed.
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


_GATEWAY_EPILOG = f"""\
examples:
  {PROG} gateway                                 # http://127.0.0.1:8000/v1
  {PROG} gateway --emulator --port 0             # offline, on any free port (the URL is printed)
  AICHATONLINE_GATEWAY_KEY=s3cret {PROG} gateway --host 0.0.0.0

then, from code written for OpenAI's API:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret").chat.completions.create(...)

Serves GET /v1/models and POST /v1/chat/completions (stream and not) with a threaded server
of the standard library, until Ctrl-C or SIGTERM (then exit status 0). With a key, requests
must carry 'Authorization: Bearer KEY'. In production, run the same app under gunicorn:
  gunicorn -k gthread --threads 32 'aichatonline_sync.gateway:app'
"""


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
        type=_seconds,
        metavar="SECONDS",
        help=f"connect and read timeout (default: ${TIMEOUT_ENV}, else 10 s connect, 60 s read)",
    )
    group.add_argument(
        "--max-retries",
        type=_count(0),
        metavar="N",
        help=f"retries after the first attempt (default: ${MAX_RETRIES_ENV}, else 2)",
    )

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
        parents=[common, connection],
        help="stream the reply to one prompt to stdout",
        description="Send one prompt and stream the reply to stdout as it arrives.",
        epilog=_CHAT_EPILOG,
        formatter_class=formatter,
    )
    chat.add_argument(
        "prompt",
        nargs="?",
        metavar="PROMPT",
        help="the prompt; absent or '-': read it from stdin",
    )
    chat.add_argument(
        "-s", "--system", metavar="TEXT", help="a system message sent before the prompt"
    )
    chat.set_defaults(func=_run_chat)

    batch = commands.add_parser(
        "batch",
        parents=[common, connection],
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
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8765,
        help="the port to listen on; 0 picks a free one (default: 8765)",
    )
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
        parents=[common, connection],
        help="serve an OpenAI-compatible API (/v1/chat/completions) in the foreground",
        description="Serve the service behind OpenAI's API, until Ctrl-C or SIGTERM.",
        epilog=_GATEWAY_EPILOG,
        formatter_class=formatter,
    )
    gateway.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)"
    )
    gateway.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="the port to listen on; 0 picks a free one (default: 8000)",
    )
    gateway.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $AICHATONLINE_GATEWAY_KEY, else none)",
    )
    gateway.set_defaults(func=_run_gateway)
    return parser


# -- shared helpers ------------------------------------------------------------------------------


def _from_env(args: argparse.Namespace, dest: str, env: str, parse: Callable[[str], Any]) -> None:
    """Fill an option that was not given from its environment variable (a bad value: exit 2)."""
    if getattr(args, dest) is not None:
        return
    raw = os.environ.get(env, "").strip()
    if not raw:
        return
    try:
        setattr(args, dest, parse(raw))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"${env}: {exc}") from None


def _session_options(args: argparse.Namespace) -> dict[str, Any]:
    _from_env(args, "proxy", PROXY_ENV, _proxy)
    _from_env(args, "timeout", TIMEOUT_ENV, _seconds)
    _from_env(args, "max_retries", MAX_RETRIES_ENV, _count(0))
    options: dict[str, Any] = {}
    if args.proxy is not None:
        options["proxy"] = args.proxy
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.max_retries is not None:
        options["max_retries"] = args.max_retries
    return options


@contextlib.contextmanager
def _direct_http(workers: int) -> Iterator[requests.Session]:
    """A ``requests.Session`` that ignores the proxy environment variables."""
    with requests.Session() as http:
        http.trust_env = False
        adapter = HTTPAdapter(pool_maxsize=max(10, workers), max_retries=0)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        yield http


@contextlib.contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Session]:
    """A :class:`Session` for the connection options, against the emulator with ``--emulator``."""
    options = _session_options(args)
    with contextlib.ExitStack() as stack:
        base_url: Optional[str] = args.base_url
        if args.emulator:
            from .testing import Emulator

            emulator = stack.enter_context(Emulator())
            base_url = emulator.url
            logger.debug("started the emulator at %s", base_url)
            if "proxy" not in options:
                # The emulator is on the loopback interface: $HTTP_PROXY must not reroute it.
                options["http"] = stack.enter_context(_direct_http(getattr(args, "workers", 1)))
        session = stack.enter_context(Session(base_url, **options))
        yield session


# -- chat ----------------------------------------------------------------------------------------


class _LineTracker:
    """Writes to stdout, flushing each piece, and remembers whether a line is left open."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.open_line = False

    def write(self, text: str) -> None:
        if not text:
            return
        self.stream.write(text)
        self.stream.flush()
        self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            self.write("\n")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt != "-":
        return str(args.prompt)
    stdin = sys.stdin
    if stdin is None or (args.prompt is None and stdin.isatty()):
        raise UsageError(
            "no prompt: give one as an argument, or pipe it into stdin "
            f"(e.g. echo 'Hello' | {PROG} chat), or pass '-' to type it (end with Ctrl-D)"
        )
    text = stdin.read()
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _run_chat(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    if not prompt.strip():
        # Checked here, not left to the library: with --system the prompt would not be empty.
        raise UsageError("the prompt is empty (or only white space)")
    messages: Union[str, list[dict[str, str]]] = prompt
    if args.system is not None:
        messages = [
            {"role": "system", "content": args.system},
            {"role": "user", "content": prompt},
        ]
    out = _LineTracker(sys.stdout)
    with _connect(args) as session:
        try:
            with session.chat(messages, model=args.model) as stream:
                for piece in stream:
                    out.write(piece)
        except (AiChatOnlineError, KeyboardInterrupt):
            out.end_line()
            raise
    out.end_line()
    return EXIT_OK


# -- batch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    line: int
    id: JsonId
    prompt: Union[str, list[Any]]


def _id_key(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _parse_line(number: int, line: str) -> _Item:
    """One line of INPUT as an item. :raises ValueError: a malformed line (the message says why)."""
    if not line.startswith("{"):
        return _Item(number, number, line)
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("a JSON line must be an object with 'prompt' or 'messages'")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise ValueError(
            "a JSON line needs exactly one of 'prompt' (a string) or 'messages' (a list)"
        )
    prompt: Union[str, list[Any]]
    if has_prompt:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"'prompt' must be a string, not {type(record['prompt']).__name__}")
        prompt = record["prompt"]
    else:
        if not isinstance(record["messages"], list):
            raise ValueError(f"'messages' must be a list, not {type(record['messages']).__name__}")
        prompt = record["messages"]
    item_id: Any = record.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, not {item_id!r}")
    try:
        build_prompt(prompt)
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None
    return _Item(number, item_id, prompt)


def _read_input(path: str) -> str:
    if path == "-":
        if sys.stdin is None:
            raise UsageError("INPUT is '-' but there is no stdin")
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read INPUT {path!r}: {exc}") from None


def _parse_input(text: str) -> tuple[list[_Item], int]:
    """The items of INPUT, and the number of malformed lines (each reported on stderr)."""
    items: list[_Item] = []
    seen: dict[str, int] = {}
    malformed = 0
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            item = _parse_line(number, line)
            key = _id_key(item.id)
            if key in seen:
                raise ValueError(f"duplicate id {item.id!r} (first on line {seen[key]})")
        except ValueError as exc:
            malformed += 1
            _error(f"INPUT line {number}: {exc}; not run")
            continue
        seen[key] = number
        items.append(item)
    return items, malformed


def _done_ids(path: str) -> set[str]:
    """The ids that already have a ``text`` in an existing OUTPUT file."""
    done: set[str] = set()
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # e.g. the last line of a killed run, cut short
                if (
                    isinstance(record, dict)
                    and "id" in record
                    and isinstance(record.get("text"), str)
                ):
                    done.add(_id_key(record["id"]))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read OUTPUT {path!r} to resume from it: {exc}") from None
    return done


def _open_output(path: str) -> IO[str]:
    try:
        file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise UsageError(f"cannot open OUTPUT {path!r}: {exc}") from None
    try:
        # A killed run may have left its last line unfinished: start on a fresh line.
        size = file.seek(0, os.SEEK_END)
        if size:
            with open(path, "rb") as raw:
                raw.seek(size - 1)
                if raw.read(1) != b"\n":
                    file.write("\n")
                    file.flush()
    except OSError as exc:
        file.close()
        raise UsageError(f"cannot use OUTPUT {path!r}: {exc}") from None
    return file


def _want_progress() -> bool:
    if not (sys.stderr is not None and sys.stderr.isatty()):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _abandon_workers() -> None:
    """After Ctrl-C: do not wait at exit for the chats still running in worker threads."""
    if any(t.name.startswith(_BATCH_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate()):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _run_batch(args: argparse.Namespace) -> int:
    items, malformed = _parse_input(_read_input(args.input))
    to_stdout = args.output is None or args.output == "-"
    done = set() if to_stdout else _done_ids(args.output)
    todo = [item for item in items if _id_key(item.id) not in done]
    skipped = len(items) - len(todo)
    succeeded = failed = 0

    def summary(interrupted: bool = False) -> None:
        line = (
            f"{succeeded} succeeded, {failed + malformed} failed, {skipped} skipped (already done)"
        )
        if interrupted:
            line += f", {len(todo) - succeeded - failed} not finished (interrupted)"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    chat_options: dict[str, Any] = {}
    if args.model is not None:
        chat_options["model"] = args.model
    with contextlib.ExitStack() as stack:
        out: IO[str] = sys.stdout if to_stdout else stack.enter_context(_open_output(args.output))
        ensure_ascii = (getattr(out, "encoding", None) or "").lower().replace("-", "") != "utf8"
        try:
            if todo:
                session = stack.enter_context(_connect(args))
                results = batch_iter(
                    [item.prompt for item in todo],
                    max_workers=args.workers,
                    rate_limit=args.rate_limit,
                    progress=_want_progress(),
                    session=session,
                    **chat_options,
                )
                # batch_iter is a generator: close it (cancelling what has not started) on exit.
                stack.callback(getattr(results, "close", lambda: None))
                for result in results:
                    item = todo[result.index]
                    record: dict[str, Any] = {"id": item.id}
                    if result.error is None:
                        succeeded += 1
                        record["text"] = result.text
                    else:
                        failed += 1
                        record["error"] = {
                            "type": type(result.error).__name__,
                            "message": str(result.error),
                        }
                        logger.info(
                            "id %r (INPUT line %d) failed: %s", item.id, item.line, result.error
                        )
                    record["elapsed"] = round(result.elapsed, 3)
                    out.write(json.dumps(record, ensure_ascii=ensure_ascii) + "\n")
                    out.flush()
        except KeyboardInterrupt:
            summary(interrupted=True)
            _abandon_workers()
            raise
    summary()
    return EXIT_FAILURE if failed or malformed else EXIT_OK


# -- serve ---------------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    raise _Terminated


def _run_serve(args: argparse.Namespace) -> int:
    from .testing import Emulator

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
    except (KeyboardInterrupt, _Terminated):
        logger.debug("stopping the emulator")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        emulator.stop()
    return EXIT_OK


# -- gateway -------------------------------------------------------------------------------------


def _run_gateway(args: argparse.Namespace) -> int:
    from ._config import redact_url
    from .gateway import GATEWAY_KEY_ENV, make_app, make_server

    _from_env(args, "api_key", GATEWAY_KEY_ENV, str)
    with _connect(args) as session:
        app = make_app(session, api_key=args.api_key)
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
        except (KeyboardInterrupt, _Terminated):
            logger.debug("stopping the gateway")
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            server.server_close()
    return EXIT_OK


# -- main ----------------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Send log records to stderr; returns the function that undoes it."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(level)

    return undo


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``aichatonline`` command and return its exit status.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :returns: 0 done, 1 failure, 2 usage error, 130 interrupted, 141 stdout closed early.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if getattr(args, "func", None) is None:
        parser.print_usage(sys.stderr)
        _error(f"give a command: chat, batch, serve or gateway (see '{PROG} --help')")
        return EXIT_USAGE
    undo_logging = _setup_logging(bool(args.verbose))
    try:
        status: int = args.func(args)
        return status
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except InvalidRequestError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except AiChatOnlineError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        undo_logging()
