"""What reaches the client of an upstream's response: interim (1xx) responses are relayed
to HTTP/1.1 clients (RFC 9110 15.2), and end-to-end headers pass whatever their name."""
from __future__ import annotations

import zlib

import pytest

from harness.client import RawClient, build_request
from harness.origin import OriginConn, Request, pattern_crc
from harness.proxy import upstream

EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
               b"Connection: X-Hint-Hop\r\nX-Hint-Hop: 1\r\n\r\n")
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"

END_TO_END = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"),
              ("X-Forwarded-Host", "app.example"), ("User-Agent", "origin-agent/1"),
              ("Referer", "https://app.example/from"), ("Host", "app.example"),
              ("Expect", "nothing-really")]


def hints(conn: OriginConn, req: Request) -> None:
    conn.sendall(EARLY_HINTS + PROCESSING)
    # X-Hint-Hop was hop-by-hop for the 103 only: here it is an ordinary header
    conn.respond(200, b"hello", headers=[("X-Hint-Hop", "final")])


def unasked_continue(conn: OriginConn, req: Request) -> None:
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.respond(200, b"hello")


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    module_origin.handlers["hints"] = hints
    module_origin.handlers["unasked_continue"] = unasked_continue
    # a HEAD response without Content-Length: its head is the whole of it all the same
    module_origin.handlers["head_no_length"] = lambda conn, req: conn.respond(200, framing="none")
    module_origin.handlers["end_to_end"] = lambda conn, req: conn.respond(200, b"ok", headers=END_TO_END)
    module_origin.handlers["connection_named"] = lambda conn, req: conn.respond(200, b"ok", headers=[
        ("Connection", "user-agent, X-FORWARDED-FOR, Date, content-length"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        *END_TO_END])
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


def test_interim_responses_are_relayed_to_http11_clients(proxy):
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/hints"))
        early = c.read_response(stop_at_interim=True)
        assert early.status == 103, early
        assert early.header_all("link") == ["</style.css>; rel=preload"], early
        assert not early.header_all("connection") and not early.header_all("x-hint-hop"), early
        assert c.read_response(stop_at_interim=True).status == 102
        final = c.read_response()
        assert (final.status, final.body, final.framing) == (200, b"hello", "length"), final
        assert final.header_all("x-hint-hop") == ["final"] and not final.header_all("link"), final
        assert c.request("GET", "/echo?after-hints").status == 200


def test_interim_responses_are_not_relayed_to_http10_clients(proxy):
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/hints", version="HTTP/1.0"))
        r = c.read_response()
        assert (r.status, r.interim, r.body) == (200, [], b"hello"), r


def test_upstream_100_continue_is_not_relayed(proxy):
    """The proxy answers Expect: 100-continue itself and never asks the upstream for a 100."""
    with RawClient(proxy.port) as c:
        assert c.request("GET", "/unasked_continue").interim == []
        c.send(build_request("POST", "/unasked_continue", [("Expect", "100-continue")], b"data"))
        assert c.read_response().interim == [100]  # ours, once


def test_end_to_end_response_headers_pass(proxy):
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/end_to_end")
    assert r.status == 200, r
    for name, value in END_TO_END:
        assert r.header_all(name) == [value], (name, r.headers)


def test_headers_the_upstreams_connection_names_are_hop_by_hop_whatever_their_name(proxy):
    """All but the framing and Date, which the proxy relies on."""
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/connection_named")
        assert (r.status, r.body) == (200, b"ok") and r.header("content-length") == "2", r
        assert r.header_all("date") == ["Mon, 01 Jan 2024 00:00:00 GMT"], r
        assert r.header_all("user-agent") == [] and r.header_all("x-forwarded-for") == [], r
        assert r.header_all("referer") == ["https://app.example/from"], r
        assert c.request("GET", "/end_to_end").header_all("user-agent") == ["origin-agent/1"]


@pytest.mark.parametrize("target", ["/bytes?n=100&head=length", "/head_no_length?head=none"])
def test_upstream_connection_carries_a_get_after_a_head(proxy, module_origin, target):
    """A response to HEAD ends with its head, whatever its framing headers say, and the
    upstream connection it came on carries the next request, whose body is read in full."""
    after = "/bytes?n=50&after=" + target.rsplit("=", 1)[1]
    with RawClient(proxy.port) as c:
        head = c.request("HEAD", target)
        assert (head.status, head.body) == (200, b""), head
        r = c.request("GET", after)
        assert r.status == 200 and len(r.body) == 50 and zlib.crc32(r.body) == pattern_crc(50), r
    (h,) = module_origin.find_requests(lambda q: q.target == target)
    (g,) = module_origin.find_requests(lambda q: q.target == after)
    assert g.conn_id == h.conn_id, "the GET went on a new upstream connection"
