"""The life of a client connection: deferred accept, and connection objects reused by a worker.

A worker keeps the objects of connections that ended between requests and serves its next
connections with them (ClientConnection.forget); nothing of a previous connection may show in
a later one. With `deferred` a listener hands connections over only once the client has sent
something, and a client that stays silent is still closed by the usual rules.
"""
from __future__ import annotations

from harness.client import RawClient, build_request, fetch
from harness.proxy import respond, upstream


def config(origin, **listen):
    return {
        "main": {"workers": 1, "client_header_timeout": "1s", "keepalive_requests": 3},
        "upstreams": {"origin": upstream(origin)},
        "routes": [
            {"name": "hello", "path": "/hello", "respond": respond(200, "hello\n")},
            {"name": "api", "path_prefix": "/", "upstream": "origin"},
        ],
    } | ({"listen": [listen]} if listen else {})


def forwarded_for(r) -> str:
    return dict((k.lower(), v) for k, v in r.json()["headers"])["x-forwarded-for"]


def test_deferred_listener_serves_and_closes_silent_clients(make_proxy, origin):
    p = make_proxy(start=False)
    p.write_config(config(origin, address=f"127.0.0.1:{p.port}", deferred=True))
    p.start()
    assert fetch(p.port, "GET", "/hello").body == b"hello\n"
    r = fetch(p.port, "GET", "/api/echo", [("Connection", "close")])
    assert r.status == 200 and r.json()["target"] == "/api/echo", r
    # connected and silent: handed to the worker after the kernel's wait, then closed
    # quietly after client_header_timeout (docs/http.md), as on any listener
    with RawClient(p.port) as silent:
        assert silent.is_closed(15)
        assert silent.buf == b""
    # a head begun and never finished: 408, then close
    with RawClient(p.port) as half:
        half.send(b"GET /api/echo HTTP/1.1\r\nHost: test.local\r\nX-Half: ")
        assert half.read_response().status == 408
        assert half.is_closed(10)
    assert fetch(p.port, "GET", "/hello").body == b"hello\n"


def test_reused_connection_objects_carry_nothing_over(make_proxy, origin):
    """One worker: each connection below is served by the object of the one before it."""
    p = make_proxy(config(origin))
    # ends with Connection: close: the parser is left closed, 2 requests counted
    with RawClient(p.port, source="127.0.0.2") as first:
        r = first.request("GET", "/api/echo?first")
        assert forwarded_for(r) == "127.0.0.2", r
        r = first.request("GET", "/api/echo?first", [("Connection", "close")])
        assert r.has_token("connection", "close") and first.is_closed(10), r
    # a new parser state, address and request count (keepalive_requests = 3)
    with RawClient(p.port, source="127.0.0.1") as second:
        for i in range(3):
            r = second.request("GET", f"/api/echo?second={i}")
            assert r.status == 200 and forwarded_for(r) == "127.0.0.1", r
            assert r.has_token("connection", "close") == (i == 2), r
        assert second.is_closed(10)
    # a connection left in the middle of a head is not reused; the next one starts clean
    with RawClient(p.port) as third:
        third.send(b"GET /api/echo?third HTTP/1.1\r\nHost: t\r\n")
    for i in range(3):
        with RawClient(p.port) as c:
            c.send(b"\r\n" + build_request("GET", f"/api/echo?after={i}"))
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == f"/api/echo?after={i}", r
