"""Request-side protocol edges where llhttp is lenient or the Host checks had gaps.

The authority of an absolute-form target and empty Host values get the Host checks; an
HTTP/1.0 request without Host reaches the upstream with the upstream's own; versions
other than 1.0 and 1.1 are answered 505 at once; TRACE needs a route that names it.
"""
from __future__ import annotations

import random
import uuid

import pytest

from harness.client import RawClient, build_request
from harness.origin import Origin
from harness.proxy import upstream

MODES = ("whole", "bytewise", "random")


@pytest.fixture(scope="module")
def origin_b():
    with Origin("origin-b") as o:
        yield o


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
