"""The clients the benchmarks compare, each reading one chat reply and handing every text piece to
``sink`` (``list.append`` to keep the pieces, or a function that stamps the receive time).

Every client does the same work per line: find the line, ``json.loads`` it, take
``["data"]["message"]``, call ``sink``. A :class:`Client` is set up once (its HTTP session and token
made outside the timed part, as a long-lived program would), then ``run(prompt, sink)`` is timed.

* ``ours``: ``aichatonline_sync.Session().chat()`` (keep_text=True, the default), and a
  ``keep_text=False`` variant.
* four stock ``requests`` reads: ``iter_lines()``, ``iter_lines(65536)``, ``iter_content(None)``
  and ``raw.read1(65536, decode_content=True)``, each splitting on ``b"\\n"``.
* ``aiohttp``: ``async for line in response.content``, the way gpt4free's provider read, inside
  asyncio (one kept-alive ``ClientSession``).
* ``g4f``: gpt4free 6.7.1's own provider (``g4f/Provider/not_working/AiChatOnline.py``, loaded as one
  file), pointed at the local server: a new ``ClientSession``, token and connection per chat.
* ``floor``: a raw socket: de-chunk, (gunzip), decode, split, scan each line: the floor of a Python client.
"""

from __future__ import annotations

import asyncio
import codecs
import http.client
import importlib.util
import json
import os
import re
import socket
import zlib
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import urlsplit

import requests

TOKEN_PATH = "/api/v1/user/getUniqueId"
CHAT_PATH = "/aichatonline/api/chat/gpt"
TIMEOUT = (10.0, 60.0)  # the library's default (connect, read): every requests client gets it

Sink = Callable[[str], Any]


def _body(prompt: str) -> dict[str, str]:
    return {"conversationId": "benchbench0", "prompt": prompt}


class Client:
    """One way of reading a chat reply."""

    name = "?"
    is_async = False

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.token_url = base_url + TOKEN_PATH + "?canvas=-benchbench"
        self.chat_url = base_url + CHAT_PATH

    def run(self, prompt: str, sink: Sink) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --- this library -------------------------------------------------------------------------------


class Ours(Client):
    name = "aichatonline_sync"

    def __init__(self, base_url: str, keep_text: bool = True) -> None:
        super().__init__(base_url)
        import aichatonline_sync

        self.session = aichatonline_sync.Session(base_url)
        self.keep_text = keep_text
        if not keep_text:
            self.name = "aichatonline_sync keep_text=False"

    def warm(self) -> None:
        self.session.grab_token()

    def run(self, prompt: str, sink: Sink) -> None:
        with self.session.chat(prompt, keep_text=self.keep_text) as stream:
            for piece in stream:
                sink(piece)
            if self.keep_text:
                stream.text  # noqa: B018 - what a caller that wants the text reads

    def close(self) -> None:
        self.session.close()


# --- stock requests -----------------------------------------------------------------------------


class _Requests(Client):
    def __init__(self, base_url: str, trust_env: bool = True) -> None:
        super().__init__(base_url)
        self.http = requests.Session()
        self.http.trust_env = trust_env
        response = self.http.get(self.token_url, timeout=TIMEOUT)
        response.raise_for_status()
        self.headers = {"UniqueId": response.json()["data"]}

    def _post(self, prompt: str) -> requests.Response:
        response = self.http.post(
            self.chat_url, json=_body(prompt), headers=self.headers, stream=True, timeout=TIMEOUT
        )
        response.raise_for_status()
        return response

    def close(self) -> None:
        self.http.close()


class IterLines(_Requests):
    def __init__(self, base_url: str, chunk_size: Optional[int] = None) -> None:
        super().__init__(base_url)
        self.chunk_size = chunk_size
        self.name = (
            "requests iter_lines()" if chunk_size is None else f"requests iter_lines({chunk_size})"
        )

    def run(self, prompt: str, sink: Sink) -> None:
        loads = json.loads
        with self._post(prompt) as response:
            lines = (
                response.iter_lines()
                if self.chunk_size is None
                else response.iter_lines(self.chunk_size)
            )
            for line in lines:
                if line:
                    sink(loads(line)["data"]["message"])


class IterContentNone(_Requests):
    name = "requests iter_content(None)"

    def run(self, prompt: str, sink: Sink) -> None:
        loads = json.loads
        rest = b""
        with self._post(prompt) as response:
            for data in response.iter_content(None):
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        sink(loads(line)["data"]["message"])
        if rest.strip():
            sink(loads(rest)["data"]["message"])


class RawRead1(_Requests):
    name = "requests raw.read1(65536)"

    def run(self, prompt: str, sink: Sink) -> None:
        loads = json.loads
        rest = b""
        with self._post(prompt) as response:
            read1 = response.raw.read1
            while True:
                data = read1(65536, decode_content=True)
                if not data:
                    break
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        sink(loads(line)["data"]["message"])
        if rest.strip():
            sink(loads(rest)["data"]["message"])


class BarePost(_Requests):
    """One kept-alive ``requests.Session().post`` (not streamed), its lines parsed."""

    name = "requests.Session().post (kept alive, token once)"

    def run(self, prompt: str, sink: Sink) -> None:
        response = self.http.post(
            self.chat_url, json=_body(prompt), headers=self.headers, timeout=TIMEOUT
        )
        response.raise_for_status()
        loads = json.loads
        for line in response.content.split(b"\n"):
            if line:
                sink(loads(line)["data"]["message"])


class Urllib3Kept(Client):
    """urllib3's own pool, kept alive: requests minus requests."""

    name = "urllib3.PoolManager (kept alive, token once)"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        import urllib3

        self.pool = urllib3.PoolManager()
        token = json.loads(self.pool.request("GET", self.token_url).data)["data"]
        self.headers = {"UniqueId": token, "Content-Type": "application/json"}

    def run(self, prompt: str, sink: Sink) -> None:
        response = self.pool.request(
            "POST", self.chat_url, body=json.dumps(_body(prompt)).encode(), headers=self.headers
        )
        loads = json.loads
        for line in response.data.split(b"\n"):
            if line:
                sink(loads(line)["data"]["message"])

    def close(self) -> None:
        self.pool.clear()


class HttpClientKept(Client):
    """``http.client`` kept alive: what a Python HTTP client cannot beat per call."""

    name = "http.client (kept alive, token once)"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.conn.request("GET", TOKEN_PATH + "?canvas=-benchbench")
        token = json.loads(self.conn.getresponse().read())["data"]
        self.headers = {"UniqueId": token, "Content-Type": "application/json"}

    def run(self, prompt: str, sink: Sink) -> None:
        self.conn.request("POST", CHAT_PATH, body=json.dumps(_body(prompt)), headers=self.headers)
        data = self.conn.getresponse().read()
        loads = json.loads
        for line in data.split(b"\n"):
            if line:
                sink(loads(line)["data"]["message"])

    def close(self) -> None:
        self.conn.close()


# --- asyncio ------------------------------------------------------------------------------------


class _Async(Client):
    is_async = True

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.loop = asyncio.new_event_loop()

    def run(self, prompt: str, sink: Sink) -> None:
        self.loop.run_until_complete(self.arun(prompt, sink))

    async def arun(self, prompt: str, sink: Sink) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.loop.run_until_complete(self.aclose())
        self.loop.close()

    async def aclose(self) -> None:
        pass


class Aiohttp(_Async):
    """gpt4free's read (``async for chunk in response.content``), one kept-alive ClientSession."""

    name = "aiohttp (gpt4free's read)"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.session: Any = None
        self.loop.run_until_complete(self._setup())

    async def _setup(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(self.token_url) as response:
            response.raise_for_status()
            self.headers = {"UniqueId": (await response.json())["data"]}

    async def arun(self, prompt: str, sink: Sink) -> None:
        loads = json.loads
        async with self.session.post(
            self.chat_url, headers=self.headers, json=_body(prompt)
        ) as response:
            response.raise_for_status()
            async for chunk in response.content:
                try:
                    message = loads(chunk)["data"]["message"]
                except Exception:
                    continue
                sink(message)

    async def aclose(self) -> None:
        await self.session.close()


_G4F: Any = None
_G4F_ERROR: Optional[str] = None


def load_g4f() -> tuple[Any, Optional[str]]:
    """gpt4free 6.7.1's ``AiChatOnline`` class, loaded from its one file (the package as a whole does
    not import); ``(None, reason)`` when it cannot be loaded."""
    global _G4F, _G4F_ERROR
    if _G4F is not None or _G4F_ERROR is not None:
        return _G4F, _G4F_ERROR
    try:
        spec_g4f = importlib.util.find_spec("g4f")
        if spec_g4f is None or spec_g4f.origin is None:
            raise ImportError("g4f is not installed (pip install g4f==6.7.1)")
        from importlib.metadata import version

        found = version("g4f")
        if found != "6.7.1":
            raise ImportError(f"g4f {found} is installed, not 6.7.1")
        path = os.path.join(
            os.path.dirname(spec_g4f.origin), "Provider", "not_working", "AiChatOnline.py"
        )
        name = "g4f.Provider.not_working.AiChatOnline"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _G4F = module
    except Exception as exc:  # the column is skipped, and the reason printed
        _G4F_ERROR = f"{type(exc).__name__}: {exc}"
    return _G4F, _G4F_ERROR


class G4F(_Async):
    """gpt4free's provider as shipped; only ``url`` and ``grab_token``'s hard-coded host are changed."""

    name = "g4f 6.7.1 provider"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        module, error = load_g4f()
        if module is None:
            raise RuntimeError(error)
        get_random_string = module.get_random_string

        class Local(module.AiChatOnline):  # type: ignore[misc, name-defined]
            url = base_url

            @classmethod
            async def grab_token(cls, session: Any, proxy: Any) -> Any:
                # The original, with its hard-coded https://aichatonlineorg.erweima.ai replaced.
                async with session.get(
                    f"{cls.url}/api/v1/user/getUniqueId?canvas=-{get_random_string()}", proxy=proxy
                ) as response:
                    response.raise_for_status()
                    return (await response.json())["data"]

        self.provider = Local

    async def arun(self, prompt: str, sink: Sink) -> None:
        messages = [{"role": "user", "content": prompt}]
        async for piece in self.provider.create_async_generator("gpt-4o-mini", messages):
            sink(piece)


# --- the floor ----------------------------------------------------------------------------------


_LENGTH_RE = re.compile(r"^content-length:\s*(\d+)", re.M)


class Floor(Client):
    """A raw socket per chat: de-chunk, gunzip, decode each block, split on ``"\\n"``, scan each line."""

    name = "raw socket floor"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        parts = urlsplit(base_url)
        self.address = (parts.hostname, parts.port)
        conn = http.client.HTTPConnection(*self.address, timeout=60)
        conn.request("GET", TOKEN_PATH + "?canvas=-benchbench")
        self.token = json.loads(conn.getresponse().read())["data"]
        conn.close()

    def run(self, prompt: str, sink: Sink) -> None:
        body = json.dumps(_body(prompt)).encode()
        request = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {self.address[0]}:{self.address[1]}\r\n"
            f"UniqueId: {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        sock = socket.create_connection(self.address)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            _floor_read(sock.recv, sink)
        finally:
            sock.close()


def _floor_read(recv: Callable[[int], bytes], sink: Sink) -> None:
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        more = recv(65536)
        if not more:
            raise ConnectionError("no response head")
        buf += more
    head = buf[:end].decode("latin-1").lower()
    buf = buf[end + 4 :]
    if not head.startswith("http/1.1 200"):
        raise ConnectionError(head.split("\r\n", 1)[0])
    decompress = zlib.decompressobj(31).decompress if "content-encoding: gzip" in head else None
    # The same fast parse as ours: decode each block's text once, split on "\n", and the JSON
    # decoder's C scanner on each line (what raw_decode calls, without its Python frame).
    scan = json.JSONDecoder().scan_once
    text_of = codecs.getincrementaldecoder("utf-8")().decode
    rest = ""
    if "transfer-encoding: chunked" in head:
        pos = 0
        done = False
        while True:
            parts = []
            size_end = len(buf)
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(buf[pos:nl], 16)
                if size == 0:
                    done = True
                    break
                stop = nl + 2 + size
                if stop + 2 > size_end:
                    break
                parts.append(buf[nl + 2 : stop])
                pos = stop + 2
            if parts:
                data = b"".join(parts)
                if decompress is not None:
                    data = decompress(data)
                lines = (rest + text_of(data)).split("\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        sink(scan(line, 0)[0]["data"]["message"])
            if done:
                break
            more = recv(65536)
            if not more:
                raise ConnectionError("chunked body cut short")
            buf = buf[pos:] + more
            pos = 0
    else:
        match = _LENGTH_RE.search(head)
        remaining = int(match.group(1)) if match else None
        data = buf
        while True:
            if data:
                if remaining is not None:
                    remaining -= len(data)
                if decompress is not None:
                    data = decompress(data)
                lines = (rest + text_of(data)).split("\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        sink(scan(line, 0)[0]["data"]["message"])
                if remaining is not None and remaining <= 0:
                    break
            data = recv(65536)
            if not data:
                if remaining:
                    raise ConnectionError("body cut short")
                break
    rest += text_of(b"", True)
    if rest.strip():
        sink(scan(rest.strip(), 0)[0]["data"]["message"])


# --- the registry ---------------------------------------------------------------------------------

#: The readers compared for throughput, latency and memory, by key.
READERS: dict[str, Callable[[str], Client]] = {
    "ours": Ours,
    "ours_nokeep": lambda url: Ours(url, keep_text=False),
    "iter_lines": IterLines,
    "iter_lines_64k": lambda url: IterLines(url, 65536),
    "iter_content_none": IterContentNone,
    "raw_read1": RawRead1,
    "aiohttp": Aiohttp,
    "g4f": G4F,
    "floor": Floor,
}
STOCK = ("iter_lines", "iter_lines_64k", "iter_content_none", "raw_read1")
