"""Tests of the emulator itself, over real sockets (raw sockets, http.client, requests)."""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from aichatonline_sync.testing import (
    CHAT_PATH,
    TOKEN_PATH,
    Emulator,
    RecordedRequest,
    default_reply,
    split_pieces,
)

pytest_plugins = ["pytester"]

TOKEN_TARGET = f"{TOKEN_PATH}?canvas=-abc123xyz0"
FRAMINGS = ["chunked", "length", "close"]
WAIT = 10.0  # generous bound for anything that should happen "at once"


# --------------------------------------------------------------------------- helpers


def read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = rfile.read(size - len(data))
        if not more:
            raise EOFError("connection closed inside a chunk")
        data += more
    return data


def read_until_closed(rfile: BinaryIO) -> bytes:
    data = b""
    try:
        while more := rfile.read(65536):
            data += more
    except ConnectionResetError:
        pass
    return data


def nothing_readable(client: RawClient, within: float) -> bool:
    """True if no byte arrives on an unbuffered client's socket within ``within`` seconds."""
    readable, _, _ = select.select([client.sock], [], [], within)
    return not readable


class BodyReader:
    """Reads a response body incrementally, undoing the framing and gzip by hand."""

    def __init__(self, rfile: BinaryIO, headers: dict[str, str]) -> None:
        self.rfile = rfile
        if "chunked" in headers.get("transfer-encoding", ""):
            self.framing = "chunked"
        elif "content-length" in headers:
            self.framing = "length"
            self.remaining = int(headers["content-length"])
        else:
            self.framing = "close"
        self.gz = (
            zlib.decompressobj(wbits=31) if headers.get("content-encoding") == "gzip" else None
        )
        self.chunks: list[bytes] = []  # raw HTTP chunks, for "chunked"
        self.buf = b""
        self.ended = False

    def _raw_next(self) -> bytes | None:
        if self.framing == "chunked":
            size_line = self.rfile.readline()
            if not size_line:
                raise EOFError("connection closed before the last chunk")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                assert self.rfile.readline() == b"\r\n"
                return None
            data = read_exact(self.rfile, size)
            assert read_exact(self.rfile, 2) == b"\r\n"
            self.chunks.append(data)
            return data
        if self.framing == "length":
            if self.remaining == 0:
                return None
            data = self._read_some(min(self.remaining, 65536))
            if not data:
                raise EOFError("connection closed before Content-Length bytes")
            self.remaining -= len(data)
            return bytes(data)
        return self._read_some(65536) or None

    def _read_some(self, size: int) -> bytes:
        read1 = getattr(self.rfile, "read1", None)
        data = read1(size) if read1 is not None else self.rfile.read(size)
        return bytes(data or b"")

    def _decoded_next(self) -> bytes | None:
        raw = self._raw_next()
        if self.gz is None:
            return raw
        if raw is None:
            assert self.gz.eof, "the gzip stream was not finished"
            return None
        return self.gz.decompress(raw)

    def next_line(self) -> bytes | None:
        while b"\n" not in self.buf:
            data = None if self.ended else self._decoded_next()
            if data is None:
                self.ended = True
                line, self.buf = self.buf, b""
                return line or None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def lines(self) -> list[bytes]:
        out = []
        while (line := self.next_line()) is not None:
            out.append(line)
        return out


class RawClient:
    """A hand-written HTTP/1.1 client on one TCP connection."""

    def __init__(self, emu: Emulator, timeout: float = WAIT, *, buffered: bool = True) -> None:
        self.sock = socket.create_connection((emu.host, emu.port), timeout=timeout)
        # unbuffered: nothing is read from the socket beyond what the test consumed
        self.rfile = cast(BinaryIO, self.sock.makefile("rb", buffering=-1 if buffered else 0))

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def send(
        self,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        version: str = "HTTP/1.1",
    ) -> None:
        lines = [f"{method} {target} {version}", "Host: emulator.test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def read_head(self) -> tuple[int, dict[str, str]]:
        status_line = self.rfile.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def body(self, headers: dict[str, str]) -> BodyReader:
        return BodyReader(self.rfile, headers)

    def token(self) -> str:
        self.send("GET", TOKEN_TARGET)
        status, headers = self.read_head()
        assert status == 200
        data = json.loads(b"".join(self.body(headers).lines()))
        return str(data["data"])

    def chat(self, prompt: str, token: str | None, **extra: str) -> None:
        headers = {"Content-Type": "application/json", **extra}
        if token is not None:
            headers["UniqueId"] = token
        body = json.dumps({"conversationId": "abcdefghij", "prompt": prompt}).encode()
        self.send("POST", CHAT_PATH, headers=headers, body=body)


@pytest.fixture
def client_factory() -> Iterator[Any]:
    made: list[RawClient] = []

    def make(emu: Emulator, timeout: float = WAIT, *, buffered: bool = True) -> RawClient:
        client = RawClient(emu, timeout, buffered=buffered)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as emulator:
        yield emulator


def messages(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["data"]["message"] for line in lines]


def http_token(emu: Emulator) -> str:
    conn = http.client.HTTPConnection(emu.host, emu.port, timeout=WAIT)
    try:
        conn.request("GET", TOKEN_TARGET)
        return str(json.loads(conn.getresponse().read())["data"])
    finally:
        conn.close()


def chat_body(prompt: str = "hi") -> bytes:
    return json.dumps({"conversationId": "abcdefghij", "prompt": prompt}).encode()


# --------------------------------------------------------------------------- token


def test_token_format_and_recording(emu: Emulator) -> None:
    conn = http.client.HTTPConnection(emu.host, emu.port, timeout=WAIT)
    try:
        conn.request("GET", TOKEN_TARGET, headers={"X-Probe": "1"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert body["code"] == 200
    assert body["msg"] == "success"
    assert re.fullmatch(r"[0-9a-f]{32}", body["data"])
    assert emu.tokens_issued == 1
    assert emu.issued_tokens == [body["data"]]
    [recorded] = emu.requests
    assert emu.token_requests == [recorded]
    assert emu.chat_requests == []
    assert recorded.endpoint == "token"
    assert recorded.method == "GET"
    assert recorded.path == TOKEN_PATH
    assert recorded.query == {"canvas": "-abc123xyz0"}
    assert recorded.headers["x-probe"] == "1"
    assert recorded.header("X-PROBE") == "1"
    assert recorded.body == b""
    assert recorded.json is None


def test_tokens_are_distinct(emu: Emulator) -> None:
    tokens = {http_token(emu) for _ in range(5)}
    assert len(tokens) == 5
    assert emu.tokens_issued == 5


# --------------------------------------------------------------------------- replies


@given(st.text())
def test_split_pieces_round_trip(text: str) -> None:
    pieces = split_pieces(text)
    assert "".join(pieces) == text
    assert all(pieces)


def test_split_pieces_words() -> None:
    assert split_pieces("  Hello big\nworld ") == ["  ", "Hello ", "big\n", "world "]
    assert split_pieces("") == []


def test_default_reply_is_deterministic(emu: Emulator, client_factory: Any) -> None:
    expected = emu.pieces_for("What is 2+2?")
    assert expected == emu.pieces_for("What is 2+2?")
    assert "".join(expected) == default_reply("What is 2+2?")
    assert "What is 2+2?" in default_reply("What is 2+2?")
    assert len(expected) > 5
    client = client_factory(emu)
    token = client.token()
    for _ in range(2):
        client.chat("What is 2+2?", token)
        status, headers = client.read_head()
        assert status == 200
        assert headers["content-type"] == "text/event-stream;charset=UTF-8"
        lines = client.body(headers).lines()
        assert messages(lines) == expected
        for line in lines:
            assert json.loads(line) == {
                "code": 200,
                "msg": "success",
                "data": {"message": json.loads(line)["data"]["message"]},
            }


def test_reply_kinds() -> None:
    assert Emulator(reply="Hi there  you").pieces_for("x") == ["Hi ", "there  ", "you"]
    assert Emulator(reply=lambda p: p.upper()).pieces_for("a b") == ["A ", "B"]
    assert Emulator(reply=["a b", "", "c"]).pieces_for("x") == ["a b", "", "c"]
    one_shot = Emulator(reply=iter(["x", "y"]))
    assert one_shot.pieces_for("1") == ["x", "y"]
    assert one_shot.pieces_for("2") == ["x", "y"]
    assert Emulator(reply="").pieces_for("x") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"framing": "pigeon"}, "framing"),
        ({"chunk_delay": -1}, "chunk_delay"),
        ({"chunk_delay": float("nan")}, "chunk_delay"),
        ({"chunk_delay": True}, "chunk_delay must be a number of seconds"),
        ({"chunk_delay": 10**400}, "chunk_delay must be a finite number >= 0"),
        ({"reply": b"bytes"}, "reply"),
        ({"reply": 42}, "reply"),
        ({"reply": ["ok", 1]}, "piece"),
        ({"reply": {"a": "b"}}, "reply"),
        ({"port": 70000}, "port"),
        ({"before_piece": "nope"}, "before_piece"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Emulator(**kwargs)


def test_unicode_reply(client_factory: Any) -> None:
    with Emulator(reply=["Grüße ", "→ 世界 ", "🙂"], gzip=True) as emu:
        client = client_factory(emu)
        client.chat("x", client.token())
        _, headers = client.read_head()
        lines = client.body(headers).lines()
    assert "→".encode() in lines[1]  # ensure_ascii=False
    assert messages(lines) == ["Grüße ", "→ 世界 ", "🙂"]


# --------------------------------------------------------------------------- framings


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_framings_give_the_same_lines(framing: str, gzip: bool, client_factory: Any) -> None:
    with Emulator(framing=framing, gzip=gzip) as emu:
        client = client_factory(emu)
        token = client.token()
        client.chat("framing test", token)
        status, headers = client.read_head()
        assert status == 200
        assert (headers.get("content-encoding") == "gzip") is gzip
        if framing == "chunked":
            assert headers["transfer-encoding"] == "chunked"
            assert "content-length" not in headers
        elif framing == "length":
            assert "transfer-encoding" not in headers
            assert int(headers["content-length"]) > 0
        else:
            assert "transfer-encoding" not in headers
            assert "content-length" not in headers
            assert headers["connection"] == "close"
        reader = client.body(headers)
        lines = reader.lines()
        expected = emu.pieces_for("framing test")
        assert messages(lines) == expected
        if framing == "chunked":
            # one HTTP chunk per line, each decodable on its own
            assert len(reader.chunks) == len(expected)
            check = zlib.decompressobj(wbits=31) if gzip else None
            for chunk, line in zip(reader.chunks, lines):
                assert (check.decompress(chunk) if check else chunk) == line
        if framing == "close":
            assert client.rfile.read() == b""  # the connection was closed
        else:  # keep-alive: a second request on the same connection
            client.chat("again", token)
            status, headers = client.read_head()
            assert status == 200
            assert messages(client.body(headers).lines()) == emu.pieces_for("again")
            assert emu.connections == 1


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_keep_alive_with_http_client(framing: str) -> None:
    with Emulator(framing=framing, gzip=True) as emu:
        conn = http.client.HTTPConnection(emu.host, emu.port, timeout=WAIT)
        try:
            conn.request("GET", TOKEN_TARGET)
            token = json.loads(conn.getresponse().read())["data"]
            for prompt in ("one", "two"):
                conn.request("POST", CHAT_PATH, body=chat_body(prompt), headers={"UniqueId": token})
                resp = conn.getresponse()
                assert resp.status == 200
                text = zlib.decompress(resp.read(), wbits=31).decode()
                assert messages(text.encode().splitlines()) == emu.pieces_for(prompt)
        finally:
            conn.close()
        assert emu.connections == 1
        assert len(emu.chat_requests) == 2


def test_close_framing_reconnects_with_http_client() -> None:
    with Emulator(framing="close") as emu:
        conn = http.client.HTTPConnection(emu.host, emu.port, timeout=WAIT)
        try:
            conn.request("GET", TOKEN_TARGET)
            token = json.loads(conn.getresponse().read())["data"]
            for _ in range(2):
                conn.request("POST", CHAT_PATH, body=chat_body(), headers={"UniqueId": token})
                resp = conn.getresponse()
                assert resp.getheader("Connection") == "close"
                assert messages(resp.read().splitlines()) == emu.pieces_for("hi")
        finally:
            conn.close()
        assert emu.connections == 2  # the token connection is reused for the first chat


def test_http_1_0_gets_a_close_delimited_body(client_factory: Any) -> None:
    with Emulator(require_token=False) as emu:
        client = client_factory(emu)
        client.send("POST", CHAT_PATH, body=chat_body(), version="HTTP/1.0")
        _, headers = client.read_head()
        assert "transfer-encoding" not in headers
        assert messages(client.body(headers).lines()) == emu.pieces_for("hi")


def test_requests_reads_a_long_reply() -> None:
    pieces = [f"w{i} " for i in range(20000)]
    with Emulator(reply=pieces) as emu, requests.Session() as session:
        token = session.get(emu.url + TOKEN_TARGET, timeout=WAIT).json()["data"]
        with session.post(
            emu.url + CHAT_PATH,
            json={"conversationId": "abcdefghij", "prompt": "x"},
            headers={"UniqueId": token},
            stream=True,
            timeout=WAIT,
        ) as resp:
            got = messages(list(resp.iter_lines()))
    assert got == pieces


def test_concurrent_chats() -> None:
    with Emulator(reply=lambda p: f"echo {p}", chunk_delay=0.001) as emu:
        token = http_token(emu)
        results: dict[int, str] = {}

        def worker(n: int) -> None:
            with requests.post(
                emu.url + CHAT_PATH,
                json={"conversationId": "abcdefghij", "prompt": f"n{n}"},
                headers={"UniqueId": token},
                timeout=WAIT,
            ) as resp:
                results[n] = "".join(messages(resp.content.splitlines()))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    assert results == {n: f"echo n{n}" for n in range(8)}


# --------------------------------------------------------------------------- validation


def _exchange(client: RawClient, method: str, target: str, **kwargs: Any) -> tuple[int, Any]:
    client.send(method, target, **kwargs)
    status, headers = client.read_head()
    body = b"".join(client.body(headers).lines())
    return status, (json.loads(body) if body else None)


def test_chat_requires_a_valid_token(emu: Emulator, client_factory: Any) -> None:
    client = client_factory(emu)
    unauthorized = {"code": 401, "message": "invalid UniqueId", "data": None}
    assert _exchange(client, "POST", CHAT_PATH, body=chat_body()) == (401, unauthorized)
    status, body = _exchange(
        client, "POST", CHAT_PATH, body=chat_body(), headers={"UniqueId": "0" * 32}
    )
    assert (status, body) == (401, unauthorized)
    token = client.token()
    client.chat("hi", token)
    status, headers = client.read_head()
    assert status == 200
    assert messages(client.body(headers).lines()) == emu.pieces_for("hi")
    emu.revoke_tokens()
    status, body = _exchange(
        client, "POST", CHAT_PATH, body=chat_body(), headers={"UniqueId": token}
    )
    assert (status, body) == (401, unauthorized)
    assert emu.connections == 1
    [*_, last] = emu.chat_requests
    assert last.unique_id == token
    assert last.prompt == "hi"
    assert last.json == {"conversationId": "abcdefghij", "prompt": "hi"}


def test_require_token_false(client_factory: Any) -> None:
    with Emulator(require_token=False) as emu:
        client = client_factory(emu)
        client.chat("hi", None)
        status, headers = client.read_head()
        assert status == 200
        assert messages(client.body(headers).lines()) == emu.pieces_for("hi")


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"conversationId": "x"}', b'{"prompt": 3}', b""]
)
def test_bad_chat_body(emu: Emulator, client_factory: Any, body: bytes) -> None:
    client = client_factory(emu)
    token = client.token()
    status, data = _exchange(client, "POST", CHAT_PATH, body=body, headers={"UniqueId": token})
    assert status == 400
    assert data["code"] == 400
    assert data["data"] is None
    assert isinstance(data["message"], str)
    assert emu.chat_requests[-1].body == body


def test_unknown_path_and_wrong_method(emu: Emulator, client_factory: Any) -> None:
    client = client_factory(emu)
    status, data = _exchange(client, "GET", "/nowhere")
    assert (status, data["code"]) == (404, 404)
    client.send("GET", CHAT_PATH)
    status, headers = client.read_head()
    assert (status, headers["allow"]) == (405, "POST")
    client.body(headers).lines()
    status, _ = _exchange(client, "POST", TOKEN_TARGET)
    assert status == 405
    assert [r.endpoint for r in emu.requests] == ["other", "other", "other"]
    assert emu.connections == 1


# --------------------------------------------------------------------------- faults


def test_fail_with_headers_times_and_fifo(emu: Emulator, client_factory: Any) -> None:
    emu.fail("chat", 429, headers={"Retry-After": "2"}, times=2)
    emu.fail("chat", 503, headers={"retry-after-ms": "150"}, body={"code": 503, "x": 1})
    emu.fail("token", 500, body="boom")
    assert emu.pending_faults() == 4
    assert emu.pending_faults("chat") == 3
    client = client_factory(emu)

    client.send("GET", TOKEN_TARGET)
    status, headers = client.read_head()
    assert (status, headers["content-type"]) == (500, "text/plain; charset=utf-8")
    assert b"".join(client.body(headers).lines()) == b"boom"
    token = client.token()

    for _ in range(2):
        client.chat("hi", token)
        status, headers = client.read_head()
        assert (status, headers["retry-after"]) == (429, "2")
        body = json.loads(b"".join(client.body(headers).lines()))
        assert body == {"code": 429, "message": "Too Many Requests", "data": None}
    client.chat("hi", token)
    status, headers = client.read_head()
    assert (status, headers["retry-after-ms"]) == (503, "150")
    assert json.loads(b"".join(client.body(headers).lines())) == {"code": 503, "x": 1}
    client.chat("hi", token)
    status, headers = client.read_head()
    assert status == 200
    assert messages(client.body(headers).lines()) == emu.pieces_for("hi")
    assert emu.pending_faults() == 0
    assert emu.connections == 1  # error replies keep the connection


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_error_line_after_pieces(framing: str, gzip: bool, client_factory: Any) -> None:
    with Emulator(framing=framing, gzip=gzip, reply=["a ", "b ", "c ", "d"]) as emu:
        emu.error_line(429, "slow down", after=2, key="msg")
        client = client_factory(emu)
        client.chat("hi", client.token())
        status, headers = client.read_head()
        assert status == 200
        lines = client.body(headers).lines()  # ends normally (no exception)
    assert messages(lines[:2]) == ["a ", "b "]
    assert json.loads(lines[2]) == {"code": 429, "msg": "slow down", "data": None}
    assert len(lines) == 3


def test_error_line_first_and_after_beyond_reply(client_factory: Any) -> None:
    with Emulator(reply=["a"]) as emu:
        emu.error_line(500)
        emu.error_line(401, after=5)
        client = client_factory(emu)
        token = client.token()
        client.chat("hi", token)
        _, headers = client.read_head()
        assert [json.loads(x) for x in client.body(headers).lines()] == [
            {"code": 500, "message": "upstream error", "data": None}
        ]
        client.chat("hi", token)
        _, headers = client.read_head()
        lines = client.body(headers).lines()
        assert messages(lines[:1]) == ["a"]
        assert json.loads(lines[1])["code"] == 401


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_drop_chat_after_pieces(framing: str, gzip: bool, client_factory: Any) -> None:
    with Emulator(framing=framing, gzip=gzip, reply=["a ", "b ", "c ", "d"]) as emu:
        emu.drop(after=2)
        client = client_factory(emu, buffered=False)
        client.chat("hi", client.token())
        status, headers = client.read_head()
        assert status == 200
        reader = client.body(headers)
        got = [reader.next_line(), reader.next_line()]
        assert messages([line for line in got if line]) == ["a ", "b "]
        with pytest.raises((ConnectionResetError, EOFError)):
            reader.lines()
        if framing == "length":
            assert reader.remaining > 0


def test_drop_with_requests(client_factory: Any) -> None:
    with Emulator(reply=["a ", "b ", "c "]) as emu, requests.Session() as session:
        token = session.get(emu.url + TOKEN_TARGET, timeout=WAIT).json()["data"]
        emu.drop(after=1)
        got: list[bytes] = []
        with session.post(
            emu.url + CHAT_PATH,
            data=chat_body(),
            headers={"UniqueId": token},
            stream=True,
            timeout=WAIT,
        ) as resp:
            lines = resp.iter_lines(chunk_size=1)
            got.append(next(lines))
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                next(lines)
        assert messages(got) == ["a "]


def test_drop_token(emu: Emulator) -> None:
    emu.drop("token")
    conn = http.client.HTTPConnection(emu.host, emu.port, timeout=WAIT)
    try:
        conn.request("GET", TOKEN_TARGET)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()
    finally:
        conn.close()
    assert emu.tokens_issued == 0
    assert len(emu.token_requests) == 1
    http_token(emu)  # the fault was used up
    assert emu.tokens_issued == 1


@pytest.mark.parametrize("framing", FRAMINGS)
def test_stall_with_seconds(framing: str, client_factory: Any) -> None:
    with Emulator(framing=framing, reply=["a ", "b ", "c"]) as emu:
        emu.stall(after=1, seconds=0.6)
        client = client_factory(emu, buffered=False)
        client.chat("hi", client.token())
        started = time.monotonic()
        status, headers = client.read_head()
        assert status == 200
        reader = client.body(headers)
        assert messages([reader.next_line() or b""]) == ["a "]
        assert not reader.buf
        assert nothing_readable(client, 0.2)  # nothing comes during the stall
        rest = reader.lines()  # then the reply goes on and ends normally
        assert time.monotonic() - started >= 0.55
    assert messages(rest) == ["b ", "c"]


def test_stall_token_then_reply(emu: Emulator) -> None:
    emu.stall("token", seconds=0.3)
    started = time.monotonic()
    token = http_token(emu)
    assert time.monotonic() - started >= 0.25
    assert re.fullmatch(r"[0-9a-f]{32}", token)


def test_stop_is_prompt_with_a_stalled_handler(client_factory: Any) -> None:
    emu = Emulator(reply=["a ", "b"]).start()
    gate = threading.Event()
    try:
        token = http_token(emu)
        emu.stall(after=1)  # until stop()
        emu.stall("token")
        stalled_chat = client_factory(emu)
        stalled_chat.chat("hi", token)
        stalled_token = client_factory(emu)
        stalled_token.send("GET", TOKEN_TARGET)
        status, headers = stalled_chat.read_head()
        assert status == 200
        reader = stalled_chat.body(headers)
        assert reader.next_line() is not None
        # and a handler blocked in before_piece
        entered = threading.Event()

        def blocked(index: int) -> None:
            entered.set()
            gate.wait(WAIT)

        emu.before_piece = blocked
        blocked_client = client_factory(emu)
        blocked_client.chat("hi", token)
        assert entered.wait(WAIT)

        started = time.monotonic()
        emu.stop()
        assert time.monotonic() - started < 5
        with pytest.raises((ConnectionResetError, EOFError)):
            reader.lines()
        assert read_until_closed(stalled_token.rfile) == b""
    finally:
        gate.set()
        emu.stop()
    emu.stop()  # idempotent


@pytest.mark.parametrize("endpoint", ["chat", "token"])
def test_html(emu: Emulator, client_factory: Any, endpoint: str) -> None:
    emu.html(endpoint, status=403 if endpoint == "token" else 200)
    client = client_factory(emu)
    if endpoint == "chat":
        client.chat("hi", None)  # the fault comes before the token check
    else:
        client.send("GET", TOKEN_TARGET)
    status, headers = client.read_head()
    assert status == (403 if endpoint == "token" else 200)
    assert headers["content-type"].startswith("text/html")
    assert b"Just a moment..." in b"".join(client.body(headers).lines())


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"code": 200, "data": None}, b'{"code": 200, "data": null}'),
        (None, b"null"),
        ("not json", b"not json"),
        (b"\xff\xfe", b"\xff\xfe"),
        ({"data": "x" * 5000}, json.dumps({"data": "x" * 5000}).encode()),
    ],
)
def test_token_reply(emu: Emulator, client_factory: Any, body: Any, expected: bytes) -> None:
    emu.token_reply(body, content_type="text/plain")
    client = client_factory(emu)
    client.send("GET", TOKEN_TARGET)
    status, headers = client.read_head()
    assert (status, headers["content-type"]) == (200, "text/plain")
    assert b"".join(client.body(headers).lines()) == expected
    assert emu.tokens_issued == 0


def test_raw_reply(emu: Emulator, client_factory: Any) -> None:
    garbage = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk"
    emu.raw_reply("chat", garbage)
    client = client_factory(emu)
    client.chat("hi", None)
    assert client.rfile.read() == garbage  # then closed

    emu.raw_reply("token", b"HTTP/1.1 204 No Content\r\n\r\n", close=False)
    client = client_factory(emu)
    client.send("GET", TOKEN_TARGET)
    assert client.read_head() == (204, {})
    assert client.token()  # the same connection goes on


def test_faults_do_not_leak_after_reset(emu: Emulator, client_factory: Any) -> None:
    emu.fail("chat", 500, times=3)
    emu.drop("token")
    emu.reset()
    assert emu.pending_faults() == 0
    assert (emu.requests, emu.connections, emu.tokens_issued) == ([], 0, 0)
    client = client_factory(emu)
    token = client.token()
    client.chat("hi", token)
    assert client.read_head()[0] == 200
    assert emu.connections == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.fail("nowhere", 500), "endpoint"),
        (lambda e: e.fail("chat", 99), "status"),
        (lambda e: e.fail("chat", 500, times=0), "times"),
        (lambda e: e.fail("chat", 500, headers={"X": "a\r\nb"}), "header"),
        (lambda e: e.drop("token", after=1), "after"),
        (lambda e: e.stall(seconds=-1), "seconds"),
        (lambda e: e.error_line(500, after=-1), "after"),
        (lambda e: e.raw_reply("chat", "text"), "bytes"),
        (lambda e: e.token_reply(object()), "JSON"),
    ],
)
def test_fault_validation(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(Emulator())


# --------------------------------------------------------------------------- promptness


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_before_piece_gates_each_piece(framing: str, gzip: bool, client_factory: Any) -> None:
    pieces = ["one ", "two ", "three ", "four"]
    entered = [threading.Event() for _ in pieces]
    gates = [threading.Event() for _ in pieces]
    calls: list[int] = []

    def before_piece(index: int) -> None:
        calls.append(index)
        entered[index].set()
        assert gates[index].wait(WAIT)

    gates[0].set()
    with Emulator(reply=pieces, framing=framing, gzip=gzip, before_piece=before_piece) as emu:
        client = client_factory(emu, buffered=False)
        client.chat("hi", client.token())
        status, headers = client.read_head()
        assert status == 200
        reader = client.body(headers)
        for index, piece in enumerate(pieces):
            # piece `index` arrives while the server is held before piece index + 1
            line = reader.next_line()
            assert line is not None
            assert messages([line]) == [piece]
            if index + 1 < len(pieces):
                assert entered[index + 1].wait(WAIT)
                # nothing of the next piece was sent (nor the end of the body)
                assert not reader.buf
                assert nothing_readable(client, 0.05)
                gates[index + 1].set()
        assert reader.next_line() is None
    assert calls == [0, 1, 2, 3]


def test_chunk_delay_spaces_pieces(client_factory: Any) -> None:
    with Emulator(reply=["a ", "b ", "c"], chunk_delay=0.15) as emu:
        client = client_factory(emu)
        client.chat("hi", client.token())
        started = time.monotonic()
        _, headers = client.read_head()
        lines = client.body(headers).lines()
        assert time.monotonic() - started >= 0.25
    assert messages(lines) == ["a ", "b ", "c"]


# --------------------------------------------------------------------------- life cycle


def test_life_cycle() -> None:
    emu = Emulator()
    with pytest.raises(RuntimeError):
        _ = emu.url
    emu.stop()  # before start: nothing to do
    with emu as same:
        assert same is emu
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", emu.url)
        assert emu.port > 0
        assert emu.host == "127.0.0.1"
        with pytest.raises(RuntimeError):
            emu.start()
    with pytest.raises(OSError):  # noqa: PT011 - refused
        socket.create_connection((emu.host, emu.port), timeout=WAIT).close()
    emu.stop()


def test_set_reply_and_before_piece_attribute(emu: Emulator, client_factory: Any) -> None:
    emu.set_reply(["x"])
    seen: list[int] = []
    emu.before_piece = seen.append
    client = client_factory(emu)
    client.chat("hi", client.token())
    _, headers = client.read_head()
    assert messages(client.body(headers).lines()) == ["x"]
    assert seen == [0]
    assert isinstance(emu.requests[0], RecordedRequest)


def test_https_with_trustme() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with Emulator(ssl_context=server_context, gzip=True) as emu:
        assert emu.url.startswith("https://127.0.0.1:")
        conn = http.client.HTTPSConnection(emu.host, emu.port, context=client_context, timeout=WAIT)
        try:
            conn.request("GET", TOKEN_TARGET)
            token = json.loads(conn.getresponse().read())["data"]
            conn.request("POST", CHAT_PATH, body=chat_body(), headers={"UniqueId": token})
            raw = conn.getresponse().read()
        finally:
            conn.close()
        assert messages(zlib.decompress(raw, wbits=31).splitlines()) == emu.pieces_for("hi")
        assert emu.connections == 1
    # a close-delimited body over TLS ends cleanly too
    with Emulator(ssl_context=server_context, framing="close") as emu:
        conn = http.client.HTTPSConnection(emu.host, emu.port, context=client_context, timeout=WAIT)
        try:
            conn.request("GET", TOKEN_TARGET)
            token = json.loads(conn.getresponse().read())["data"]
            conn.request("POST", CHAT_PATH, body=chat_body(), headers={"UniqueId": token})
            assert messages(conn.getresponse().read().splitlines()) == emu.pieces_for("hi")
        finally:
            conn.close()


# --------------------------------------------------------------------------- pytest plugin

_PLUGIN_CONFTEST = """
import aichatonline_sync.testing.pytest_plugin as plugin

def pytest_configure(config):
    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "aichatonline_sync.testing.pytest_plugin")
"""


def test_plugin_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(_PLUGIN_CONFTEST)
    pytester.makepyfile(
        """
        import json

        import pytest
        import requests

        TOKEN = "/api/v1/user/getUniqueId?canvas=-abcdefghij"
        CHAT = "/aichatonline/api/chat/gpt"

        @pytest.mark.aichatonline_emulator(framing="length", reply="a b")
        def test_emulator(aichatonline_emulator):
            emu = aichatonline_emulator
            assert emu.framing == "length"
            token = requests.get(emu.url + TOKEN, timeout=10).json()["data"]
            r = requests.post(emu.url + CHAT, json={"prompt": "x"},
                              headers={"UniqueId": token}, timeout=10)
            assert [json.loads(l)["data"]["message"] for l in r.text.splitlines()] == ["a ", "b"]

        def test_factory(aichatonline_emulator_factory):
            a = aichatonline_emulator_factory(gzip=True)
            b = aichatonline_emulator_factory()
            assert a.url != b.url and a.gzip and not b.gzip

        def test_mock_chat(aichatonline_mock):
            pieces = aichatonline_mock.set_reply("Hi there")
            base = aichatonline_mock.base_url
            token = requests.get(base + TOKEN).json()["data"]
            assert token == aichatonline_mock.token
            r = requests.post(base + CHAT, json={"conversationId": "c", "prompt": "p"},
                              headers={"UniqueId": token})
            assert [json.loads(l)["data"]["message"] for l in r.text.splitlines()] == pieces
            r = requests.post(base + CHAT, json={"conversationId": "c", "prompt": "p"},
                              headers={"UniqueId": "nope"})
            assert (r.status_code, r.json()) == (
                401, {"code": 401, "message": "invalid UniqueId", "data": None}
            )
            r = requests.post(base + CHAT, json={"conversationId": "c"}, headers={"UniqueId": token})
            assert (r.status_code, r.json()["message"]) == (400, "prompt must be a string")
            assert aichatonline_mock.chat_calls == 3

        def test_mock_token_only(aichatonline_mock):
            requests.get(aichatonline_mock.base_url + TOKEN)

        def test_mock_nothing(aichatonline_mock):
            pass

        def test_mock_reply_set_but_no_chat(aichatonline_mock):
            aichatonline_mock.set_reply(["x"])
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_mock_reply_set_but_no_chat*", "*Not all requests*chat/gpt*"]
    )


def test_plugin_mock_without_responses(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(_PLUGIN_CONFTEST + "\nimport sys\nsys.modules['responses'] = None\n")
    pytester.makepyfile(
        """
        def test_mock(aichatonline_mock):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pip install responses*"])


def test_recorded_request_repr_masks_the_token(emu: Emulator, client_factory: Any) -> None:
    client = client_factory(emu)
    token = client.token()
    client.chat("hi", token)
    assert client.read_head()[0] == 200
    [*_, chat] = emu.chat_requests
    assert chat.unique_id == token
    shown = repr(chat)
    assert token not in shown
    assert "uniqueid" in shown
    assert "***" in shown
    assert "'prompt': 'hi'" in shown


def test_malformed_request_line_gets_a_json_400_with_a_status_line(
    emu: Emulator, client_factory: Any
) -> None:
    client = client_factory(emu)
    client.sock.sendall(b"GET / HTTP/1.1 extra\r\n\r\n")
    status, headers = client.read_head()
    assert status == 400
    assert headers["connection"] == "close"
    body = json.loads(b"".join(client.body(headers).lines()))
    assert (body["code"], body["data"]) == (400, None)
    assert client.rfile.read() == b""  # then closed
