"""Bounded, seeded fuzzing of both parsers through the real proxy: mutated requests from
clients, mutated responses from an upstream.

Each case runs on its own connection against one proxy process with two workers. Any
well-formed answer is accepted, and so is a close; what fails a case is a malformed answer,
an answer that never comes, or a worker that dies. A failure names the seed, the case and
its exact bytes, so it can be replayed alone.
"""
from __future__ import annotations

import functools
import random
import re
import socket
import time
from typing import Callable, Dict, List

import pytest

from harness import corpus
from harness.client import BadResponse, RawClient, ServerClosed, build_request, chunked, fetch
from harness.proxy import pid_alive, upstream

SEED = 20260107
REQUEST_CASES = 3000
LEFT_OPEN_CASES = 192  # requests whose connection stays open: ended by the proxy's timeouts
LEFT_OPEN_BATCH = 64  # run side by side, since each waits for a 1 s timeout
RESPONSE_CASES = 2000
CASE_TIMEOUT = 5.0  # seconds without a byte from the proxy: a hang (its own timeouts are 1 s)
PIECE_PAUSE = 0.0003  # between split writes, so pieces tend to arrive in separate reads


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    module_origin.handlers["fuzzed"] = send_fuzzed_response
    p = module_proxy_factory({
        "main": {"workers": 2, "client_header_timeout": "1s", "client_body_timeout": "1s",
                 "keepalive_timeout": "1s", "send_timeout": "1s", "max_body_size": "1m"},
        "upstreams": {"origin": upstream(module_origin, read_timeout="1s", connect_timeout="1s")},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })
    assert len(p.worker_pids()) == 2
    return p


# -- mutations --------------------------------------------------------------------------
TOKENS = [b"\r\n", b"\n", b"\r", b"\0", b" ", b"\t", b":", b";", b",", b"0", b"9", b"f", b"-",
          b"\x7f", b"\xff", b"\r\n\r\n", b"chunked", b"Content-Length: 5\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Upgrade: h2c\r\n",
          b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"0\r\n\r\n"]
NUMBERS = [b"0", b"1", b"-1", b"+5", b" 7", b"0x10", b"ffffffffffffffff", b"99999999999999999999",
           b"1 2", b"", b"00000000000000000000000000003"]
_NUMBER = re.compile(rb"[0-9a-fA-F]+")


def _flip(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]


def _insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    token = rng.choice(TOKENS) if rng.random() < 0.8 else bytes(rng.randrange(256) for _ in range(3))
    return data[:i] + token + data[i:]


def _delete(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 8):]


def _lines(data: bytes) -> List[bytes]:
    return data.split(b"\r\n")


def _duplicate_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    i = rng.randrange(len(lines))
    return b"\r\n".join(lines[:i + 1] + lines[i:])


def _drop_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    i = rng.randrange(len(lines))
    return b"\r\n".join(lines[:i] + lines[i + 1:])


def _change_number(data: bytes, rng: random.Random) -> bytes:
    """Lengths, chunk sizes, status codes, versions: replace one run of (hex) digits by a
    strange number or by one near its value."""
    found = list(_NUMBER.finditer(data))
    if not found:
        return _insert(data, rng)
    m = rng.choice(found)
    if rng.random() < 0.5:
        value = rng.choice(NUMBERS)
    else:
        base = 10 if m.group().isdigit() else 16
        near = max(0, int(m.group()[:12], base) + rng.randint(-3, 3))
        value = (b"%d" if base == 10 else b"%x") % near
    return data[:m.start()] + value + data[m.end():]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


MUTATIONS = (_flip, _insert, _delete, _duplicate_line, _drop_line, _change_number, _truncate)


def mutate(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        data = rng.choice(MUTATIONS)(data, rng)
    return data


def split(data: bytes, rng: random.Random) -> List[bytes]:
    """Whole in half the cases, else in up to 8 random pieces."""
    if len(data) < 2 or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 7))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def send_pieces(sock: socket.socket, pieces: List[bytes]) -> None:
    for n, piece in enumerate(pieces):
        if n:
            time.sleep(PIECE_PAUSE)
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return  # the proxy refused what it had and closed


# -- checking -----------------------------------------------------------------------------
class Finding(AssertionError):
    pass


def read_answers(client: RawClient, method: str, truncated_ok: bool) -> list:
    """Every response until the proxy closes. A close (or reset) between responses is fine;
    inside a body only when truncated_ok (how the proxy signals an upstream that failed
    mid-body); inside a head never."""
    responses = []
    while True:
        try:
            if not client.buf and not client._fill(need_data=False):
                return responses
            r = client.read_head(method, stop_at_interim=True)
        except ConnectionResetError:
            return responses
        except ServerClosed:
            raise Finding("the proxy closed in the middle of a response head") from None
        except (BadResponse, TimeoutError) as e:
            raise Finding(f"{type(e).__name__}: {e}") from None
        responses.append(r)
        if r.status == 101:
            return responses  # a tunnel follows
        if r.status < 200:
            continue  # an interim response: complete, the final one may follow or not
        try:
            r.body = b"".join(client.iter_body(r))
        except (ServerClosed, ConnectionResetError):
            if truncated_ok:
                return responses
            raise Finding(f"the proxy closed in the middle of a response body: {r!r}") from None
        except (BadResponse, TimeoutError) as e:
            raise Finding(f"{type(e).__name__}: {e}") from None


def run_cases(proxy, seed: int, cases: Dict[int, tuple], run: Callable) -> None:
    """run(n, data, pieces) for each case n: (label, data, pieces); stop at the first
    finding, with a reproducer."""
    workers = proxy.worker_pids()
    for n, (label, data, pieces) in cases.items():
        try:
            run(n, data, pieces)
        except Finding as e:
            raise AssertionError(f"case {n} ({label}, seed {seed}): {e}\nbytes: {data!r}\n"
                                 f"pieces: {[len(p) for p in pieces]}") from None
        dead = [pid for pid in workers if not pid_alive(pid)]
        if dead:
            raise AssertionError(f"worker {dead} died after case {n} ({label}, seed {seed})\n"
                                 f"bytes: {data!r}\npieces: {[len(p) for p in pieces]}\n"
                                 f"{proxy.diagnostics()}")
    r = fetch(proxy.port, "GET", "/echo?after-fuzz")
    assert r.status == 200 and r.json()["target"] == "/echo?after-fuzz", r
    assert proxy.worker_pids() == workers


# -- requests -----------------------------------------------------------------------------
def request_seeds() -> List[bytes]:
    seeds = [case.raw for case in corpus.load("valid")]
    seeds += [
        build_request("PUT", "/echo?expect", [("Expect", "100-continue")], b"x" * 300),
        build_request("POST", "/echo", [("Transfer-Encoding", "chunked")], chunked(b"a" * 40, b"b")),
        build_request("GET", "/echo", [("X-Forwarded-For", "10.0.0.1"), ("X-Request-ID", "abc"),
                                       ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1")]),
        build_request("GET", "/echo", [("Connection", "upgrade"), ("Upgrade", "websocket")]),
        build_request("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                     ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                     ("Sec-WebSocket-Version", "13")]),
        build_request("GET", "/echo", [("Connection", "upgrade"), ("Upgrade", "h2c")]),
        build_request("POST", "/echo", [("Content-Length", "5")], b"hello")
        + build_request("POST", "/echo", [("Transfer-Encoding", "chunked")], chunked(b"xyz")),
    ]
    return seeds


def test_fuzz_requests(proxy):
    rng = random.Random(SEED)
    seeds = request_seeds()
    cases = {}
    for n in range(REQUEST_CASES):
        data = mutate(rng.choice(seeds), rng)
        cases[n] = ("request", data, split(data, rng))

    def run(n, data, pieces):
        with RawClient(proxy.port, timeout=CASE_TIMEOUT) as c:
            send_pieces(c.sock, pieces)
            try:
                c.sock.shutdown(socket.SHUT_WR)  # the proxy answers what it has, then closes
            except OSError:
                pass
            read_answers(c, "GET", truncated_ok=False)
    run_cases(proxy, SEED, cases, run)


@functools.lru_cache(maxsize=None)
def left_open_cases() -> List[bytes]:
    rng = random.Random(SEED + 2)
    seeds = request_seeds()
    return [mutate(rng.choice(seeds), rng) for _ in range(LEFT_OPEN_CASES)]


def test_fuzz_requests_left_open(proxy):
    """The client neither closes nor sends more: the proxy's own timeouts must end each case."""
    cases = left_open_cases()
    workers = proxy.worker_pids()
    for start in range(0, len(cases), LEFT_OPEN_BATCH):
        batch = cases[start:start + LEFT_OPEN_BATCH]
        clients = [RawClient(proxy.port, timeout=CASE_TIMEOUT) for _ in batch]
        try:
            for c, data in zip(clients, batch):
                send_pieces(c.sock, [data])
            for c, data in zip(clients, batch):
                try:
                    read_answers(c, "GET", truncated_ok=False)
                except Finding as e:
                    raise AssertionError(f"left-open case (seed {SEED + 2}): {e}\n"
                                         f"bytes: {data!r}") from None
        finally:
            for c in clients:
                c.close()
        dead = [pid for pid in workers if not pid_alive(pid)]
        assert not dead, f"worker {dead} died in a left-open batch (seed {SEED + 2}): {batch!r}"
    r = fetch(proxy.port, "GET", "/echo?after-fuzz")
    assert r.status == 200 and r.json()["target"] == "/echo?after-fuzz", r


# -- responses ----------------------------------------------------------------------------
RESPONSE_SEEDS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n00006\r\n world\r\n"
    b"0\r\nX-Trailer: t\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 40\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the connection closes\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n"
    b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTrailer: X-T\r\n"
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 4\r\n\r\nbody",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found" + b"HTTP/1.1 200 OK\r\n\r\n",
]


@functools.lru_cache(maxsize=None)
def response_cases() -> List[tuple]:
    """(label, response bytes, pieces); "HEAD" labels are answers to a HEAD request."""
    rng = random.Random(SEED + 1)
    cases = []
    for _ in range(RESPONSE_CASES):
        data = mutate(rng.choice(RESPONSE_SEEDS), rng)
        label = "HEAD response" if rng.random() < 0.1 else "response"
        cases.append((label, data, split(data, rng)))
    return cases


def send_fuzzed_response(conn, req) -> None:
    """Origin handler: write case N's response pieces, then close the connection."""
    conn.keep_alive = False
    send_pieces(conn.sock, response_cases()[int(req.query["case"])][2])


def test_fuzz_responses(proxy):
    cases = dict(enumerate(response_cases()))

    def run(n, data, pieces):
        method = "HEAD" if cases[n][0].startswith("HEAD") else "GET"
        with RawClient(proxy.port, timeout=CASE_TIMEOUT) as c:
            c.send(build_request(method, f"/fuzzed?case={n}", [("Connection", "close")]))
            read_answers(c, method, truncated_ok=True)
    run_cases(proxy, SEED + 1, cases, run)
