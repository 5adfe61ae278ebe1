"""Upgrade: websocket becomes a bidirectional tunnel; other upgrades are never passed on."""
from __future__ import annotations

import base64
import hashlib
import os

import pytest

from harness.client import RawClient, build_request, fetch
from harness.origin import WS_GUID
from harness.proxy import upstream


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


def handshake(c: RawClient, path: str = "/ws"):
    key = base64.b64encode(os.urandom(16)).decode()
    c.send(build_request("GET", path, [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                       ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]))
    r = c.read_head()
    assert r.status == 101, r
    assert r.has_token("connection", "upgrade") and (r.header("upgrade") or "").lower() == "websocket", r.headers
    assert r.header("sec-websocket-accept") == base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    return r


def test_websocket_tunnel_both_directions(proxy, module_origin):
    with RawClient(proxy.port) as c:
        handshake(c)
        assert c.ws_recv() == (0x1, b"hello")  # server -> client before the client said anything
        for size in (0, 5, 125, 126, 65535, 65536, 1_000_000):
            payload = os.urandom(size)
            c.ws_send(0x2, payload)
            assert c.ws_recv() == (0x2, payload), size
        c.ws_send(0x9, b"ping")
        assert c.ws_recv() == (0xA, b"ping")
        c.ws_send(0x8, b"\x03\xe8")
        assert c.ws_recv() == (0x8, b"\x03\xe8")
        assert c.is_closed(), "the tunnel should close when the upstream closes"
    req = module_origin.wait_for_request(lambda r: r.path == "/ws")
    assert (req.header("upgrade") or "").lower() == "websocket", req.headers
    assert fetch(proxy.port, "GET", "/echo").status == 200


def test_many_messages_pipelined_into_the_tunnel(proxy):
    with RawClient(proxy.port) as c:
        handshake(c)
        assert c.ws_recv() == (0x1, b"hello")
        msgs = [b"message %d" % i for i in range(200)]
        for m in msgs:
            c.ws_send(0x1, m)
        assert [c.ws_recv()[1] for _ in msgs] == msgs


def test_h2c_upgrade_is_not_passed_on(proxy, module_origin):
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/echo?h2c", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                           ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")])
        assert r.status == 200, r
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert "upgrade" not in seen, seen
        assert "http2-settings" not in seen, seen
        assert "upgrade" not in seen.get("connection", "").lower(), seen
        r = c.request("GET", "/echo?after-h2c")  # still plain HTTP/1.1 on this connection
        assert r.status == 200 and r.json()["target"] == "/echo?after-h2c"


def test_upgrade_refused_by_upstream_stays_http(proxy):
    """The upstream answers a websocket upgrade with a normal response: no tunnel, keep-alive goes on."""
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/echo?no-ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                             ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                             ("Sec-WebSocket-Version", "13")])
        assert r.status == 200, r
        r = c.request("GET", "/echo?after")
        assert r.status == 200 and r.json()["target"] == "/echo?after", r
