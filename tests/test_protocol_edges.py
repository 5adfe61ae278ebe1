"""Request-side protocol edges where llhttp is lenient or the Host checks had gaps.

The authority of an absolute-form target and empty Host values get the Host checks; an
HTTP/1.0 request without Host reaches the upstream with the upstream's own; only empty
lines may come before a request line; versions other than 1.0 and 1.1 are answered 505
at once; TRACE needs a route that names it.
"""
from __future__ import annotations

import random
import uuid
import zlib

import pytest

from harness.client import RawClient, build_request, chunked
from harness.proxy import upstream

MODES = ("whole", "bytewise", "random")


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin, origin_b):
    return module_proxy_factory({
        "main": {"workers": 1},  # client_header_timeout stays 60s: nothing here may wait for it
        "upstreams": {"origin": upstream(module_origin), "pair": upstream(module_origin, origin_b)},
        "routes": [
            {"name": "all", "path_prefix": "/", "upstream": "origin"},
            {"name": "pair", "path_prefix": "/pair/", "upstream": "pair"},
            {"name": "traceable", "path_prefix": "/trace/", "methods": ["GET", "TRACE"], "upstream": "origin"},
        ],
    })


def marker() -> str:
    return uuid.uuid4().hex


def assert_closed(c: RawClient) -> None:
    assert c.is_closed(5), "the connection should be closed after a refused request"


def assert_open(c: RawClient) -> None:
    r = c.request("GET", "/echo?still-open")
    assert r.status == 200, r


def exchange(proxy, raw: bytes, mode: str = "whole"):
    with RawClient(proxy.port, timeout=10) as c:
        c.send(raw, mode, random.Random(raw))
        r = c.read_response()
        if r.status < 400:
            assert_open(c)
        return r


def assert_refused(proxy, raw: bytes, status: int, mode: str = "whole") -> None:
    with RawClient(proxy.port, timeout=10) as c:
        c.send(raw, mode, random.Random(raw), stop_on_answer=True)
        r = c.read_response()
        assert r.status == status, r
        assert r.json()["request_id"] == r.header("x-request-id"), r
        assert_closed(c)


def seen_headers(origin, mark: str):
    req = origin.wait_for_request(lambda r: mark in r.target)
    return {k.lower(): v for k, v in req.headers}


# -- Host and absolute-form targets ----------------------------------------------------------
@pytest.mark.parametrize("authority", ["user:pw@evil.example", "user@evil.example", ""])
def test_absolute_form_authority_gets_the_host_checks(proxy, module_origin, authority):
    mark = marker()
    assert_refused(proxy, build_request("GET", f"http://{authority}/echo?{mark}"), 400)
    assert not module_origin.find_requests(lambda r: mark in r.target), "forwarded"


def test_absolute_form_authority_replaces_host(proxy, module_origin):
    mark = marker()
    r = exchange(proxy, build_request("GET", f"http://Front.example:8080/echo?{mark}", host="test.local"))
    assert r.status == 200, r
    headers = seen_headers(module_origin, mark)
    assert headers["host"] == headers["x-forwarded-host"] == "Front.example:8080", headers


@pytest.mark.parametrize("host_line", ["Host:", "Host:   ", "Host:\t"])
@pytest.mark.parametrize("version,target", [("HTTP/1.1", "/echo"), ("HTTP/1.0", "/echo"),
                                            ("HTTP/1.1", "http://front.example/echo")])
def test_empty_or_blank_host_is_400(proxy, module_origin, host_line, version, target):
    mark = marker()
    raw = f"GET {target}?{mark} {version}\r\n{host_line}\r\n\r\n".encode()
    assert_refused(proxy, raw, 400)
    assert not module_origin.find_requests(lambda r: mark in r.target), "forwarded"


def test_http10_without_host_gets_the_upstreams_own(proxy, module_origin):
    mark = marker()
    with RawClient(proxy.port, timeout=10) as c:
        c.send(f"GET /echo?{mark} HTTP/1.0\r\n\r\n".encode())
        assert c.read_response().status == 200
    headers = seen_headers(module_origin, mark)
    assert headers["host"] == module_origin.address, headers
    assert "x-forwarded-host" not in headers, "the client sent no Host to pass on"


def test_http10_without_host_to_several_servers_gets_the_upstream_name(proxy):
    origins = set()
    for _ in range(2):  # round-robin: one request to each server
        with RawClient(proxy.port, timeout=10) as c:
            c.send(b"GET /pair/echo HTTP/1.0\r\n\r\n")
            r = c.read_response()
        assert r.status == 200, r
        assert {k.lower(): v for k, v in r.json()["headers"]}["host"] == "pair", r.json()
        origins.add(r.json()["origin"])
    assert origins == {"module-origin", "origin-b"}


# -- bytes before the request line -----------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix,status", [
    (b"", 200), (b"\r\n", 200), (b"\r\n\r\n\r\n", 200),
    (b"\r", 400), (b"\r\r\r", 400), (b"\n", 400), (b"\r\n\n", 400), (b"\n\r\n", 400), (b"\r\n\r", 400),
])
def test_only_empty_lines_may_precede_a_request(proxy, module_origin, prefix, status, mode):
    mark = marker()
    raw = prefix + build_request("GET", f"/echo?{mark}")
    if status == 400:
        assert_refused(proxy, raw, 400, mode)
        assert not module_origin.find_requests(lambda r: mark in r.target), "forwarded"
    else:
        r = exchange(proxy, raw, mode)
        assert r.status == 200 and r.json()["target"] == f"/echo?{mark}", r


FIRST_REQUESTS = {
    "get": build_request("GET", "/echo?first"),
    # bodies ending in CR or LF: the proxy must know where the body ends, not guess
    "body-cr": build_request("POST", "/echo?first", body=b"ab\r"),
    "body-crlf": build_request("POST", "/echo?first", body=b"ab\r\n"),
    "body-crlfs": build_request("POST", "/echo?first", body=b"\r\n\r\n"),
    "chunked": build_request("POST", "/echo?first", [("Transfer-Encoding", "chunked")], chunked(b"a\r\n")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", list(FIRST_REQUESTS))
@pytest.mark.parametrize("gap,second", [(b"", 200), (b"\r\n", 200), (b"\r", 400), (b"\n", 400),
                                        (b"\r\r\n", 400)])
def test_only_empty_lines_between_pipelined_requests(proxy, first, gap, second, mode):
    raw = FIRST_REQUESTS[first] + gap + build_request("GET", "/echo?second")
    with RawClient(proxy.port, timeout=10) as c:
        c.send(raw, mode, random.Random(raw))
        r1, r2 = c.read_response(), c.read_response()
        assert r1.status == 200 and r1.json()["target"] == "/echo?first", r1
        assert r2.status == second, r2
        assert_closed(c) if second == 400 else assert_open(c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", list(FIRST_REQUESTS))
@pytest.mark.parametrize("gap,second", [(b"\r\n", 200), (b"\r", 400), (b"\r\n\r", 400)])
def test_stray_bytes_at_the_end_of_a_read(proxy, first, gap, second, mode):
    """The bytes after a request are checked even when the next request comes later."""
    with RawClient(proxy.port, timeout=10) as c:
        c.send(FIRST_REQUESTS[first] + gap, mode, random.Random(first))
        r1 = c.read_response()
        assert r1.status == 200 and r1.json()["target"] == "/echo?first", r1
        c.send(build_request("GET", "/echo?second"))
        r2 = c.read_response()
        assert r2.status == second, r2
        assert_closed(c) if second == 400 else assert_open(c)


def random_request(rng: random.Random, i: int):
    """A request whose body (if any) is made of 'a', CR and LF, so that only knowing where
    it ends tells its last bytes from the gap after it; returns (bytes, body)."""
    body = bytes(rng.choice(b"a\r\n") for _ in range(rng.randint(1, 12)))
    kind = rng.choice(["get", "empty", "length", "chunked"])
    if kind == "get":
        return build_request("GET", f"/echo?i={i}"), b""
    if kind == "empty":
        return build_request("POST", f"/echo?i={i}", [("Content-Length", "0")]), b""
    if kind == "length":
        return build_request("POST", f"/echo?i={i}", body=body), body
    cut = sorted(rng.sample(range(1, len(body)), rng.randint(0, len(body) - 1))) if len(body) > 1 else []
    pieces = [body[a:b] for a, b in zip([0] + cut, cut + [len(body)])]
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), rng.choice([b"", b";e=1", b';q="x"']), piece)
                      for piece in pieces)
    framed += b"0" + rng.choice([b"", b";z"]) + b"\r\n" + rng.choice([b"", b"X-T: 1\r\n", b"X-T:\r\n"]) + b"\r\n"
    return build_request("POST", f"/echo?i={i}", [("Transfer-Encoding", "chunked")], framed), body


@pytest.mark.parametrize("seed", range(60))
def test_random_pipelines(proxy, seed):
    """Random pipelined requests, random empty lines between them, random splits: all are
    served; with stray bytes before the last one, it (and only it) is refused."""
    rng = random.Random(seed)
    requests = [random_request(rng, i) for i in range(rng.randint(1, 5))]
    stray = seed % 2 == 1
    raw = b"".join(rng.choice([b"", b"\r\n", b"\r\n\r\n"]) + r for r, _ in requests)
    if stray:
        raw += rng.choice([b"\r", b"\n", b"\r\r\n", b"\r\n\n", b"\n\r\n", b"\r\n\r"])
        raw += build_request("GET", "/echo?last")
    with RawClient(proxy.port, timeout=10) as c:
        c.send(raw, rng.choice(MODES), rng)
        for i, (_, body) in enumerate(requests):
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == f"/echo?i={i}", (i, r, raw)
            assert r.json()["body_crc"] == zlib.crc32(body), (i, r.json(), raw)
        if stray:
            assert c.read_response().status == 400, raw
            assert_closed(c)
        else:
            assert_open(c)


# -- versions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw", [
    b"GET /echo\r\n",                                   # HTTP/0.9 simple request: no blank line follows
    b"GET /echo HTTP/0.9\r\nHost: test.local\r\n\r\n",  # 0.9 with headers
    b"GET /echo HTTP/2.0\r\nHost: test.local\r\n\r\n",
    b"GET /echo HTTP/2.0\r\n",                          # answered before the headers
    b"GET /echo HTTP/3.0\r\nHost: test.local\r\n\r\n",
], ids=["0.9-simple", "0.9-headers", "2.0", "2.0-line-only", "3.0"])
def test_versions_other_than_1x_are_505_at_once(proxy, module_origin, raw, mode):
    """The RawClient times out after 10s, long before the 60s client_header_timeout."""
    before = len(module_origin.requests)
    assert_refused(proxy, raw, 505, mode)
    assert len(module_origin.requests) == before, "forwarded"


# -- TRACE -------------------------------------------------------------------------------------
def test_trace_needs_a_route_that_names_it(proxy, module_origin):
    mark = marker()
    with RawClient(proxy.port, timeout=10) as c:
        r = c.request("TRACE", f"/echo?{mark}")
        assert r.status == 405, r
        assert "TRACE" not in r.header("allow") and "GET" in r.header("allow"), r
        assert_open(c)
    assert not module_origin.find_requests(lambda r: mark in r.target), "forwarded"
    r = exchange(proxy, build_request("TRACE", f"/trace/echo?{mark}"))
    assert r.status == 200 and r.json()["method"] == "TRACE", r
