"""A raw-socket HTTP/1.1 client: exact bytes out, a small strict parser in.

Every socket has a timeout, so a proxy that hangs fails the test instead of
blocking it. `RawClient.send` can deliver bytes whole, one at a time, or in random
splits; it stops early once the server has started answering (a server that
rejects a request may close while we are still sending).
"""
from __future__ import annotations

import json
import random
import select
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

from .origin import BLOCK, ws_frame, ws_read_frame


class ServerClosed(Exception):
    """The server closed the connection before a complete response."""


class BadResponse(Exception):
    """The bytes from the server are not a valid HTTP/1.1 response."""


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: List[Tuple[str, str]]
    body: bytes = b""
    framing: str = "none"  # "length", "chunked", "close" or "none"
    interim: List[int] = field(default_factory=list)  # 1xx statuses seen before this one
    trailers: List[Tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> Optional[str]:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> List[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_token(self, name: str, token: str) -> bool:
        return any(token.lower() == t.strip().lower()
                   for v in self.header_all(name) for t in v.split(","))

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (f"<Response {self.status} {self.framing} headers={self.headers!r} "
                f"body={self.body[:200]!r}{'...' if len(self.body) > 200 else ''}>")


def build_request(method: str, target: str, headers=None, body: bytes = b"",
                  version: str = "HTTP/1.1", host: Optional[str] = "test.local") -> bytes:
    """Bytes of a request. A Host is added for HTTP/1.1 unless given; Content-Length
    is added for a non-empty body unless the caller set framing headers itself."""
    headers = list(headers or [])
    names = {k.lower() for k, _ in headers}
    if host is not None and "host" not in names and version == "HTTP/1.1":
        headers.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def chunked(*pieces: bytes, trailers: str = "") -> bytes:
    """A chunked body made of the given pieces."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n" + trailers.encode() + b"\r\n"


def split_points(n: int, rng: random.Random) -> List[int]:
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 12)))) if n > 1 else []
    return [0] + cuts + [n]


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15, source: Optional[str] = None):
        """`source`: the local address to connect from (another loopback address, say)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    # -- sending -----------------------------------------------------------------
    def send(self, data: bytes, mode: str = "whole", rng: Optional[random.Random] = None,
             stop_on_answer: bool = False) -> bool:
        """Send data "whole", "bytewise" or in "random" splits.

        With stop_on_answer, sending stops as soon as the server has answered (a
        server rejecting a request may close while we still send). Returns False if
        not everything was sent."""
        if mode == "whole":
            pieces = [data]
        elif mode == "bytewise":
            pieces = [data[i:i + 1] for i in range(len(data))]
        elif mode == "random":
            pts = split_points(len(data), rng or random.Random(0))
            pieces = [data[a:b] for a, b in zip(pts, pts[1:])]
        else:
            raise ValueError(mode)
        for piece in pieces:
            if stop_on_answer and len(pieces) > 1 and select.select([self.sock], [], [], 0)[0]:
                return False
            try:
                self.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                return False
            if mode == "random":
                time.sleep(0.001)
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- receiving ---------------------------------------------------------------
    def _fill(self, need_data: bool = True) -> bool:
        if self.eof:
            if need_data:
                raise ServerClosed(f"EOF; unparsed: {bytes(self.buf[:200])!r}")
            return False
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError(f"no data from server; buffered: {bytes(self.buf[:200])!r}") from None
        if not data:
            self.eof = True
            if need_data:
                raise ServerClosed(f"EOF; unparsed: {bytes(self.buf[:200])!r}")
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > 256 * 1024:
                raise BadResponse("line too long")
            self._fill()

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self, method: str = "GET", stop_at_interim: bool = False) -> Response:
        """Read a response head (skipping 1xx unless stop_at_interim); the body is left unread."""
        interim = []
        while True:
            line = self._line().decode("latin-1")
            parts = line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise BadResponse(f"bad status line {line!r}")
            status = int(parts[1])
            headers = []
            while True:
                h = self._line().decode("latin-1")
                if not h:
                    break
                if ":" not in h:
                    raise BadResponse(f"bad header line {h!r}")
                k, _, v = h.partition(":")
                if k != k.strip() or not k:
                    raise BadResponse(f"bad header name {k!r}")
                headers.append((k, v.strip(" \t")))
            resp = Response(status, parts[2] if len(parts) > 2 else "", parts[0], headers, interim=interim)
            if 100 <= status < 200 and status != 101 and not stop_at_interim:
                interim.append(status)
                continue
            resp.framing = self._framing(resp, method)
            return resp

    @staticmethod
    def _framing(resp: Response, method: str) -> str:
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return "none"
        te = resp.header_all("transfer-encoding")
        if te:
            if te[-1].split(",")[-1].strip().lower() != "chunked":
                raise BadResponse(f"transfer-encoding {te!r} does not end in chunked")
            if resp.header_all("content-length"):
                raise BadResponse("both Transfer-Encoding and Content-Length in a response")
            return "chunked"
        cls = resp.header_all("content-length")
        if cls:
            if len(set(cls)) != 1 or not cls[0].isdigit():
                raise BadResponse(f"bad Content-Length {cls!r}")
            return "length"
        return "close"

    def iter_body(self, resp: Response) -> Iterator[bytes]:
        """Yield the body in pieces as they arrive (never buffers it whole)."""
        if resp.framing == "length":
            left = int(resp.header("content-length"))
            while left > 0:
                if not self.buf:
                    self._fill()
                piece = bytes(self.buf[:left])
                del self.buf[:len(piece)]
                left -= len(piece)
                yield piece
        elif resp.framing == "chunked":
            while True:
                line = self._line().decode("latin-1")
                size_s = line.split(";")[0].strip()
                try:
                    size = int(size_s, 16)
                except ValueError:
                    raise BadResponse(f"bad chunk size line {line!r}") from None
                if size == 0:
                    while True:
                        t = self._line().decode("latin-1")
                        if not t:
                            return
                        k, _, v = t.partition(":")
                        resp.trailers.append((k, v.strip()))
                while size > 0:
                    if not self.buf:
                        self._fill()
                    piece = bytes(self.buf[:size])
                    del self.buf[:len(piece)]
                    size -= len(piece)
                    yield piece
                if self._exact(2) != b"\r\n":
                    raise BadResponse("chunk not followed by CRLF")
        elif resp.framing == "close":
            while True:
                if self.buf:
                    piece = bytes(self.buf)
                    self.buf.clear()
                    yield piece
                if not self._fill(need_data=False):
                    return

    def read_response(self, method: str = "GET", stop_at_interim: bool = False) -> Response:
        resp = self.read_head(method, stop_at_interim)
        resp.body = b"".join(self.iter_body(resp))
        return resp

    def request(self, method: str, target: str, headers=None, body: bytes = b"", **kw) -> Response:
        self.send(build_request(method, target, headers, body, **kw))
        return self.read_response(method)

    def is_closed(self, timeout: float = 5) -> bool:
        """True if the server closes (FIN or RST) within timeout without sending more bytes."""
        if self.eof:
            return True
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        finally:
            self.sock.settimeout(old)
        if data:
            self.buf += data
            return False
        self.eof = True
        return True

    # -- websocket ---------------------------------------------------------------
    def ws_send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(ws_frame(opcode, payload, mask=True))

    def ws_recv(self) -> Tuple[int, bytes]:
        return ws_read_frame(self._exact)


def fetch(port: int, method: str, target: str, headers=None, body: bytes = b"",
          timeout: float = 15, **kw) -> Response:
    """One request on a fresh connection, closed afterwards."""
    with RawClient(port, timeout=timeout) as c:
        return c.request(method, target, headers, body, **kw)


def get_json(port: int, path: str, timeout: float = 10):
    r = fetch(port, "GET", path, [("Connection", "close")], timeout=timeout)
    if r.status != 200:
        raise AssertionError(f"GET {path} on port {port}: {r!r}")
    return r.json()


def consume_pattern_body(client: RawClient, resp: Response) -> Tuple[int, int]:
    """Read a generated-pattern body; return (length, crc32) without buffering it."""
    n = 0
    crc = 0
    for piece in client.iter_body(resp):
        crc = zlib.crc32(piece, crc)
        n += len(piece)
    return n, crc


def send_pattern(sock: socket.socket, n: int, chunk_framing: bool = False) -> None:
    """Write n generated-pattern bytes (optionally as chunks) in 1 MiB pieces."""
    view = memoryview(BLOCK)
    left = n
    while left > 0:
        take = min(left, len(BLOCK))
        if chunk_framing:
            sock.sendall(b"%x\r\n" % take)
            sock.sendall(view[:take])
            sock.sendall(b"\r\n")
        else:
            sock.sendall(view[:take])
        left -= take
    if chunk_framing:
        sock.sendall(b"0\r\n\r\n")


class TlsClient(RawClient):
    """A RawClient over TLS: `context` a client ssl.SSLContext, `session` one to resume."""

    def __init__(self, port: int, context, server_hostname: Optional[str] = None, session=None,
                 timeout: float = 15):
        super().__init__(port, timeout=timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname, session=session)
