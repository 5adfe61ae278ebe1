"""A hostile upstream costs at most its own request: never the worker, never the next request.

Each case of the table makes the origin misbehave in one way, then checks one rule: the client
gets the upstream's response or a 502 (or, when the upstream fails after the response head was
relayed, a cut-off body and a close), the worker's pid is unchanged, and the next request on the
same client connection (pipelined behind the first where that is possible) gets its own answer
from the same upstream pool. Where the proxy must stop trusting an upstream connection, the
origin checks that the proxy closed it. The last tests deliver responses split at every byte.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest

from harness.client import RawClient, ServerClosed, build_request, fetch
from harness.origin import Origin, OriginConn, PeerClosed, Request
from harness.proxy import upstream

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
INJECT = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nINJECT"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


class Closes:
    """Whether the proxy closed the upstream connection a request came on, by request target
    (recorded by the origin, which waits for the close)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.seen: Dict[str, bool] = {}

    def watch(self, conn: OriginConn, req: Request) -> None:
        closed = conn.wait_closed(10)
        with self.cond:
            self.seen[req.target] = closed
            self.cond.notify_all()

    def closed(self, target: str) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: target in self.seen, 15)
            return self.seen.get(target, False)


CLOSES = Closes()


# -- what the origin does ------------------------------------------------------------------
def sends(*pieces: bytes, then: Optional[Callable[[OriginConn], None]] = None, gap: float = 0):
    """Write each piece with its own send (`gap` seconds apart), then `then(conn)`."""
    def run(conn: OriginConn, req: Request) -> None:
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)  # lets the proxy read the earlier pieces first (the rule holds either way)
            conn.sendall(piece)
        if then is not None:
            then(conn)
    return run


def reset(conn: OriginConn) -> None:
    conn.reset()


def close(conn: OriginConn) -> None:
    conn.keep_alive = False


def answers_then_reads_body(conn: OriginConn, req: Request) -> None:
    conn.sendall(OK)
    conn.read_body(req)


def head_of(size: int) -> bytes:
    lines = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 80) for i in range(size // 100 + 1))
    return b"HTTP/1.1 200 OK\r\n" + lines


@dataclass
class Case:
    name: str
    upstream_does: Callable[[OriginConn, Request], None]
    outcome: str                  # "response", "502", or "cut": head relayed, body cut off, close
    status: int = 200
    body: bytes = b"hello"
    method: str = "GET"
    request_body: bytes = b""
    body_sent: bool = True        # False: the client sends only the head of its request
    reads_body: bool = False      # the origin answers before it reads the request body
    closes_upstream: bool = False  # the proxy must close (never reuse) the upstream connection
    keeps_client: Optional[bool] = True  # None: the client connection may or may not stay open
    pipelined: bool = True        # the next request is sent together with this one
    route: str = "/h/"


CASES = [
    # bytes after a complete response (once a SIGSEGV: the parser went on without an exchange)
    Case("extra_response_same_write", sends(OK + INJECT), "response", closes_upstream=True),
    Case("extra_partial_head", sends(OK + b"HTTP/1.1 200 OK\r\nContent-Le"), "response", closes_upstream=True),
    Case("extra_garbage", sends(OK + b"\x00garbage\x7f"), "response", closes_upstream=True),
    Case("extra_after_204", sends(NO_CONTENT + INJECT), "response", status=204, body=b"", closes_upstream=True),
    Case("extra_after_304", sends(b"HTTP/1.1 304 Not Modified\r\nETag: \"v\"\r\n\r\n" + INJECT), "response",
         status=304, body=b"", closes_upstream=True),
    Case("extra_after_100", sends(b"HTTP/1.1 100 Continue\r\n\r\n" + OK + INJECT), "response",
         closes_upstream=True),
    Case("extra_after_103", sends(EARLY_HINTS + OK + INJECT), "response", closes_upstream=True),
    Case("extra_after_chunked", sends(CHUNKED + INJECT), "response", closes_upstream=True),
    Case("extra_after_connection_close",
         sends(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello" + INJECT), "response",
         closes_upstream=True),
    Case("extra_in_later_write", sends(OK, INJECT, gap=0.05), "response", closes_upstream=True,
         pipelined=False),  # pipelined, the next request could take the connection before INJECT came
    Case("empty_line_after_response", sends(OK + b"\r\n"), "response"),  # tolerated between messages
    Case("head_response", sends(HEAD_OK), "response", method="HEAD"),
    Case("head_response_with_body", sends(HEAD_OK + b"hello"), "response", method="HEAD",
         closes_upstream=True),
    Case("head_response_with_body_later", sends(HEAD_OK, b"hello", gap=0.05), "response", method="HEAD",
         closes_upstream=True, pipelined=False),
    # interim responses
    Case("interim_storm", sends(b"HTTP/1.1 102 Processing\r\n\r\n" * 5000 + OK), "502", closes_upstream=True),
    Case("interim_then_reset", sends(EARLY_HINTS, then=reset), "502"),
    Case("switching_protocols_unasked",
         sends(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
         "502", closes_upstream=True),
    # framing
    Case("length_and_chunked",
         sends(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
         "502", closes_upstream=True),
    Case("two_lengths", sends(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
         "502", closes_upstream=True),
    Case("coding_not_chunked", sends(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello", then=close),
         "response"),  # the body ends when the upstream closes
    Case("close_delimited", sends(b"HTTP/1.1 200 OK\r\n\r\nhello", then=close), "response"),
    Case("status_below_100", sends(b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nhello"), "502",
         closes_upstream=True),
    Case("folded_header", sends(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"), "502",
         closes_upstream=True),
    Case("bare_lf", sends(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"), "502", closes_upstream=True),
    Case("not_http", sends(b"hello there\r\n\r\n"), "502", closes_upstream=True),
    # oversized heads
    Case("oversized_head", sends(head_of(80 * 1024) + b"Content-Length: 5\r\n\r\nhello"), "502",
         closes_upstream=True),
    Case("endless_head", sends(head_of(1 << 20)), "502", closes_upstream=True),
    # a reset or close at every stage
    Case("reset_before_response", sends(then=reset), "502"),
    Case("reset_in_status_line", sends(b"HTTP/1.1 2", then=reset), "502"),
    Case("reset_in_head", sends(b"HTTP/1.1 200 OK\r\nContent-Le", then=reset), "502"),
    Case("close_in_head", sends(b"HTTP/1.1 200 OK\r\nContent-Le", then=close), "502"),
    Case("reset_after_head", sends(HEAD_OK, then=reset), "cut"),
    Case("reset_in_body", sends(HEAD_OK + b"hel", then=reset), "cut"),
    Case("close_in_body", sends(HEAD_OK + b"hel", then=close), "cut"),
    Case("reset_in_chunked_body", sends(CHUNKED[:-12], then=reset), "cut"),
    Case("reset_after_response", sends(OK, then=reset), "response"),
    Case("reset_before_reading_body", sends(then=reset), "502", method="POST", request_body=b"b" * 65536,
         reads_body=True, keeps_client=None, pipelined=False),
    # answers before reading
    Case("answers_before_reading_body", answers_then_reads_body, "response", method="POST",
         request_body=b"b" * 1000, reads_body=True),
    Case("answers_before_body_was_sent", answers_then_reads_body, "response", method="POST",
         request_body=b"b" * 10, body_sent=False, reads_body=True, closes_upstream=True, keeps_client=False,
         pipelined=False),
    Case("answers_before_request", sends(INJECT), "response", route="/eager/", closes_upstream=True),
]


@pytest.fixture(scope="module")
def hostile():
    with Origin("hostile") as o:
        for case in CASES:
            o.handlers[case.name] = misbehave(case)
        o.handlers["split"] = split
        yield o


@pytest.fixture(scope="module")
def eager():
    """Sends a whole response as soon as it accepts, before reading any request."""
    with Origin("eager") as o:
        o.on_accept = lambda conn: conn.sendall(OK)
        for case in CASES:
            o.handlers[case.name] = misbehave(case)
        yield o


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, hostile, eager):
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"hostile": upstream(hostile, read_timeout="5s"),
                      "eager": upstream(eager, read_timeout="5s")},
        "routes": [{"name": "hostile", "path_prefix": "/h/", "upstream": "hostile"},
                   {"name": "eager", "path_prefix": "/eager/", "upstream": "eager"}],
    })


def misbehave(case: Case):
    def handler(conn: OriginConn, req: Request) -> None:
        try:
            case.upstream_does(conn, req)
        except (OSError, PeerClosed):
            pass  # the proxy closed while we were still writing (a storm, an endless head)
        if case.closes_upstream:
            CLOSES.watch(conn, req)
    handler.reads_body = case.reads_body
    return handler


def assert_502(r) -> None:
    assert r.status == 502, r
    assert r.json()["request_id"] == r.header("x-request-id"), r


def next_request_works(proxy, c: Optional[RawClient], target: str, sent: bool) -> None:
    """The request after a hostile one gets its own answer: on `c` if it is still open, else
    on a new connection."""
    if c is None:
        r = fetch(proxy.port, "GET", target)
    else:
        if not sent:
            c.send(build_request("GET", target))
        r = c.read_response()
    assert r.status == 200 and r.json()["target"] == target, r


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_upstream(proxy, case):
    pids = proxy.worker_pids()
    target = f"{case.route}{case.name}"
    after = f"/h/echo?after={case.name}"
    request = build_request(case.method, target, body=case.request_body)
    if not case.body_sent:
        request = request[:len(request) - len(case.request_body)]
    with RawClient(proxy.port, timeout=10) as c:
        c.send(request + build_request("GET", after) if case.pipelined else request)
        open_after = False
        if case.outcome == "cut":
            head = c.read_head(case.method)
            assert head.status == case.status, head
            with pytest.raises((ServerClosed, ConnectionResetError)):
                b"".join(c.iter_body(head))
        else:
            r = c.read_response(case.method)
            if case.outcome == "502":
                assert_502(r)
            else:
                assert (r.status, r.body) == (case.status, b"" if case.method == "HEAD" else case.body), r
            open_after = not r.has_token("connection", "close")
            if case.keeps_client is not None:
                assert open_after == case.keeps_client, r
        if case.closes_upstream:
            assert CLOSES.closed(target), "the proxy kept an upstream connection it cannot trust"
        next_request_works(proxy, c if open_after else None, after, case.pipelined)
    assert proxy.worker_pids() == pids, "the worker died"


# -- responses split at every byte ------------------------------------------------------------
SPLIT = {
    "length": (OK, "GET", 200, b"hello", False),
    "chunked": (CHUNKED, "GET", 200, b"hello", False),
    "interim": (EARLY_HINTS + OK, "GET", 200, b"hello", False),
    "no_content": (NO_CONTENT, "GET", 204, b"", False),
    "head": (HEAD_OK, "HEAD", 200, b"", False),
    "extra": (OK + INJECT, "GET", 200, b"hello", True),
    "head_with_body": (HEAD_OK + b"hello", "HEAD", 200, b"", True),
}


def split(conn: OriginConn, req: Request) -> None:
    """Sends SPLIT[r] in two writes, cut before byte k."""
    data, _, _, _, closes = SPLIT[req.query["r"]]
    k = int(req.query["k"])
    sends(data[:k], data[k:], gap=0.002)(conn, req)
    if closes:
        CLOSES.watch(conn, req)


@pytest.mark.parametrize("name", SPLIT)
def test_response_split_at_every_byte(proxy, name):
    data, method, status, body, closes = SPLIT[name]
    pids = proxy.worker_pids()
    with RawClient(proxy.port, timeout=10) as c:
        for k in range(1, len(data)):
            target = f"/h/split?r={name}&k={k}"
            r = c.request(method, target)
            assert (r.status, r.body) == (status, body), (k, r)
            assert not r.has_token("connection", "close"), (k, r)
            if closes:
                assert CLOSES.closed(target), k
            assert proxy.worker_pids() == pids, f"the worker died at split {k}"
        next_request_works(proxy, c, f"/h/echo?after=split-{name}", False)
