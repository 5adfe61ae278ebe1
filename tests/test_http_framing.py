"""HTTP/1.1 message framing through the proxy, over raw sockets.

The request corpus (tests/requests/{valid,invalid}) is fed whole, byte by byte and
in random splits; the rest checks keep-alive, HTTP/1.0, pipelining, re-framing of
Content-Length / chunked / close-delimited bodies, bodiless responses and
`Expect: 100-continue`.
"""
from __future__ import annotations

import random
import zlib

import pytest

from harness import corpus
from harness.client import RawClient, ServerClosed, build_request, chunked, fetch
from harness.origin import pattern_bytes, pattern_crc
from harness.proxy import upstream

MODES = ("whole", "bytewise", "random")


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "main": {"workers": 1, "max_body_size": "16m", "max_header_size": "8k"},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


def assert_usable(client: RawClient) -> None:
    """The connection still carries a normal request."""
    r = client.request("GET", "/echo?still-open")
    assert r.status == 200, r
    assert r.json()["target"] == "/echo?still-open"


def assert_error_body(r, status: int) -> None:
    assert r.status == status, r
    body = r.json()
    assert body["status"] == status, body
    assert body["request_id"] and body["request_id"] == r.header("x-request-id"), (body, r.headers)


# -- corpus ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", corpus.load("valid"), ids=lambda c: c.name)
def test_valid_corpus(proxy, case, mode):
    with RawClient(proxy.port) as c:
        assert c.send(case.raw, mode, random.Random(case.name)), "connection closed while sending"
        for i, want in enumerate(case.responses):
            r = c.read_response()
            assert r.status == want["status"], (case.expect["description"], i, r)
            echo = r.json()
            for key in ("method", "target", "body"):
                if key in want:
                    assert echo[key] == want[key], (case.expect["description"], i, key, echo)
        if case.expect["close"]:
            assert c.is_closed(), "connection should be closed after the response"
        else:
            assert_usable(c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", corpus.load("invalid"), ids=lambda c: c.name)
def test_invalid_corpus(proxy, case, mode):
    with RawClient(proxy.port) as c:
        # with requests before the bad one, answers to those may come while we still send
        c.send(case.raw, mode, random.Random(case.name), stop_on_answer=len(case.responses) == 1)
        for want in case.responses:
            r = c.read_response()
            assert r.status == want["status"], (case.expect["description"], r)
        assert_error_body(r, r.status)
        assert c.is_closed(), "connection should be closed after a 400 (and nothing after it answered)"
    # the worker lives on
    assert fetch(proxy.port, "GET", "/echo").status == 200


# -- keep-alive and HTTP/1.0 -------------------------------------------------------------
def test_keepalive_reuses_connections(proxy, module_origin):
    before = module_origin.connections
    with RawClient(proxy.port) as c:
        for i in range(30):
            r = c.request("GET", f"/echo?i={i}")
            assert r.status == 200 and r.json()["target"] == f"/echo?i={i}", r
            assert not r.has_token("connection", "close"), r
    opened = module_origin.connections - before
    assert opened < 30, f"upstream saw {opened} new connections for 30 requests: no upstream keep-alive"


def test_http10_without_keepalive_is_closed(proxy):
    with RawClient(proxy.port) as c:
        c.send(b"GET /echo HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.json()["method"] == "GET", r
        assert r.framing != "chunked", "chunked sent to an HTTP/1.0 client"
        assert c.is_closed()


def test_http10_keepalive(proxy):
    with RawClient(proxy.port) as c:
        for i in range(3):
            c.send(build_request("GET", f"/echo?i={i}", [("Connection", "keep-alive")], version="HTTP/1.0"))
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == f"/echo?i={i}", r
            assert r.framing == "length", f"an HTTP/1.0 keep-alive response needs Content-Length: {r!r}"
            assert r.has_token("connection", "keep-alive"), r


def test_http10_client_gets_chunked_upstream_body_unchunked(proxy):
    n = 200_000
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", f"/bytes?n={n}&te=chunked&chunk=7000", version="HTTP/1.0"))
        r = c.read_response()
        assert r.status == 200
        assert r.framing != "chunked", "chunked sent to an HTTP/1.0 client"
        assert len(r.body) == n and zlib.crc32(r.body) == pattern_crc(n)


# -- pipelining --------------------------------------------------------------------------
def test_pipelined_requests_answered_in_order(proxy):
    reqs = [build_request("GET", "/slow?delay=1&i=0"),
            build_request("GET", "/echo?i=1"),
            build_request("POST", "/echo?i=2", body=b"x" * 5000),
            build_request("HEAD", "/bytes?n=10&i=3"),
            build_request("GET", "/bytes?n=100000&te=chunked&i=4"),
            build_request("GET", "/echo?i=5")]
    methods = ["GET", "GET", "POST", "HEAD", "GET", "GET"]
    with RawClient(proxy.port) as c:
        c.send(b"".join(reqs))
        got = [c.read_response(m) for m in methods]
    assert [r.status for r in got] == [200] * 6, got
    assert got[0].json()["target"] == "/slow?delay=1&i=0"
    assert got[1].json()["target"] == "/echo?i=1"
    assert got[2].json()["target"] == "/echo?i=2" and got[2].json()["body_len"] == 5000
    assert got[3].body == b""
    assert got[4].body == pattern_bytes(100000)
    assert got[5].json()["target"] == "/echo?i=5"


# -- bodies both ways --------------------------------------------------------------------
def test_request_content_length_body(proxy):
    body = pattern_bytes(3_000_000)
    with RawClient(proxy.port) as c:
        r = c.request("POST", "/echo", body=body)
    echo = r.json()
    assert echo["body_len"] == len(body) and echo["body_crc"] == zlib.crc32(body), echo


def test_request_chunked_body(proxy):
    rng = random.Random(7)
    data = pattern_bytes(700_000)
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, 40_000)
        pieces.append(data[i:i + n])
        i += n
    with RawClient(proxy.port) as c:
        c.send(build_request("POST", "/echo", [("Transfer-Encoding", "chunked")], chunked(*pieces)), "random", rng)
        r = c.read_response()
        echo = r.json()
        assert echo["body_len"] == len(data) and echo["body_crc"] == zlib.crc32(data), echo
        assert_usable(c)


@pytest.mark.parametrize("te", ["length", "chunked", "close"])
def test_response_body_framings(proxy, te):
    n = 1_500_003
    with RawClient(proxy.port) as c:
        r = c.request("GET", f"/bytes?n={n}&te={te}&chunk=65536")
        assert r.status == 200
        assert len(r.body) == n and zlib.crc32(r.body) == pattern_crc(n), (te, len(r.body))
        if r.framing != "close":
            assert_usable(c)


def test_head_response_has_no_body(proxy):
    with RawClient(proxy.port) as c:
        c.send(build_request("HEAD", "/bytes?n=12345") + build_request("GET", "/echo?after-head"))
        head = c.read_response("HEAD")
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") in (None, "12345"), head
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?after-head", r


@pytest.mark.parametrize("code,extra", [(204, ""), (304, ""), (304, "&cl=50")])
def test_bodiless_statuses(proxy, code, extra):
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", f"/status?code={code}{extra}") + build_request("GET", "/echo?after"))
        r = c.read_response()
        assert r.status == code and r.body == b"", r
        assert not r.header_all("transfer-encoding"), r
        nxt = c.read_response()
        assert nxt.status == 200 and nxt.json()["target"] == "/echo?after", nxt


def test_expect_100_continue(proxy):
    body = b"payload after 100"
    with RawClient(proxy.port) as c:
        c.send(build_request("POST", "/echo", [("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
        interim = c.read_head(stop_at_interim=True)
        assert interim.status == 100, interim
        c.send(body)
        r = c.read_response()
        assert r.status == 200 and r.json()["body"] == body.decode(), r
        assert_usable(c)


# -- unusual upstream responses ------------------------------------------------------------
def test_upstream_informational_response_does_not_break_the_exchange(proxy, module_origin):
    def early_hints(conn, req):
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        conn.respond(200, b"final\n")
    module_origin.handlers["hints"] = early_hints
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/hints")
        assert r.status == 200 and r.body == b"final\n", r
        assert set(r.interim) <= {103}, r.interim
        assert_usable(c)


def test_upstream_response_with_both_length_and_chunked(proxy, module_origin):
    """Transfer-Encoding wins over Content-Length (RFC 9112 6.3); the client never gets both."""
    def both(conn, req):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        conn.keep_alive = False
    module_origin.handlers["both"] = both
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/both")  # the client parser rejects a response carrying both
        assert (r.status, r.body) == (200, b"hello") or r.status == 502, r


def test_upstream_body_shorter_than_content_length_is_not_passed_as_complete(proxy, module_origin):
    def short(conn, req):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        conn.keep_alive = False
    module_origin.handlers["short"] = short
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/short"))
        head = c.read_head()
        if head.status == 502:
            return
        assert head.status == 200, head
        with pytest.raises((ServerClosed, ConnectionResetError)):
            b"".join(c.iter_body(head))


@pytest.mark.parametrize("seed", range(3))
def test_many_pipelined_requests_in_random_splits(proxy, seed):
    rng = random.Random(seed)
    reqs, expect = [], []
    for i in range(60):
        kind = rng.choice(["get", "post", "chunked", "head", "bytes"])
        if kind == "get":
            reqs.append(build_request("GET", f"/echo?i={i}"))
        elif kind == "post":
            reqs.append(build_request("POST", f"/echo?i={i}", body=bytes([65 + i % 26]) * rng.randint(1, 3000)))
        elif kind == "chunked":
            reqs.append(build_request("POST", f"/echo?i={i}", [("Transfer-Encoding", "chunked")],
                                      chunked(b"a" * rng.randint(1, 500), b"b" * rng.randint(1, 500))))
        elif kind == "head":
            reqs.append(build_request("HEAD", f"/bytes?n=77&i={i}"))
        else:
            reqs.append(build_request("GET", f"/bytes?n={rng.randint(0, 20000)}&te=chunked&chunk=999&i={i}"))
        expect.append(kind)
    with RawClient(proxy.port) as c:
        c.send(b"".join(reqs), "random", rng)
        for i, kind in enumerate(expect):
            r = c.read_response("HEAD" if kind == "head" else "GET")
            assert r.status == 200, (i, kind, r)
            if kind in ("get", "post", "chunked"):
                assert r.json()["target"] == f"/echo?i={i}", (i, r)
            elif kind == "head":
                assert r.body == b""
