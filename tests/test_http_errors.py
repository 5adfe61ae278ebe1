"""Bad input and failing upstreams get a clear answer, and the worker lives on.

Limits (431/414/413), upstream failures (502/504 with a JSON body), client
timeouts, and the stale pooled upstream connection race.
"""
from __future__ import annotations

import time

import pytest

from harness.client import RawClient, ServerClosed, build_request, chunked, fetch
from harness.origin import Blackhole
from harness.proxy import free_port, upstream

# Route "/small/" overrides the limits of [main].
MAIN_LIMITS = {"max_header_size": "8k", "max_uri_size": "2k", "max_body_size": "64k",
               "client_header_timeout": "1s", "client_body_timeout": "1s", "send_timeout": "1s",
               "keepalive_timeout": "2s"}


@pytest.fixture(scope="module")
def blackhole():
    b = Blackhole()
    yield b
    b.close()


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin, stale_origin, blackhole):
    o = module_origin
    p = module_proxy_factory({
        "main": {"workers": 1, **MAIN_LIMITS},
        "upstreams": {
            "origin": upstream(o),
            "slow": upstream(o, read_timeout="1s"),
            "dead": upstream(f"127.0.0.1:{free_port()}", connect_timeout="2s"),
            "blackhole": upstream(blackhole, connect_timeout="1s"),
            "stale": upstream(stale_origin, keepalive=8),
        },
        "routes": [
            {"name": "all", "path_prefix": "/", "upstream": "origin"},
            {"name": "slow", "path_prefix": "/slowup/", "upstream": "slow"},
            {"name": "dead", "path_prefix": "/dead/", "upstream": "dead"},
            {"name": "blackhole", "path_prefix": "/bh/", "upstream": "blackhole"},
            {"name": "stale", "path_prefix": "/stale/", "upstream": "stale"},
            {"name": "small", "path_prefix": "/small/", "upstream": "origin",
             "max_body_size": "1k", "max_header_size": "2k"},
        ],
    })
    p.initial_pids = p.worker_pids()
    return p


def assert_error(r, status: int, error: str = None) -> None:
    assert r.status == status, r
    body = r.json()
    assert body["status"] == status, body
    if error:
        assert body["error"] == error, body
    assert body["request_id"] and body["request_id"] == r.header("x-request-id"), (body, r.headers)
    assert len(r.body) < 512, "error bodies are small"


def assert_alive(proxy) -> None:
    r = fetch(proxy.port, "GET", "/echo?alive")
    assert r.status == 200 and r.json()["target"] == "/echo?alive", r


def send_and_read(proxy, raw: bytes, method: str = "GET"):
    with RawClient(proxy.port) as c:
        c.send(raw)
        return c.read_response(method)


# -- limits --------------------------------------------------------------------------------
def test_header_section_over_limit_is_431(proxy):
    big = [("X-Big-%d" % i, "v" * 100) for i in range(120)]  # ~12 KiB > 8k
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/echo", big))
        assert_error(c.read_response(), 431)
        assert c.is_closed()
    ok = [("X-Big-%d" % i, "v" * 100) for i in range(60)]  # ~6.5 KiB < 8k
    assert send_and_read(proxy, build_request("GET", "/echo", ok)).status == 200
    assert_alive(proxy)


def test_route_max_header_size_override(proxy):
    hdrs = [("X-Big-%d" % i, "v" * 100) for i in range(30)]  # ~3.3 KiB: over the route's 2k, under main's 8k
    assert_error(send_and_read(proxy, build_request("GET", "/small/echo", hdrs)), 431)
    assert send_and_read(proxy, build_request("GET", "/echo", hdrs)).status == 200
    assert_alive(proxy)


def test_target_over_limit_is_414(proxy):
    assert_error(send_and_read(proxy, build_request("GET", "/echo?" + "a" * 3000)), 414)
    r = send_and_read(proxy, build_request("GET", "/echo?" + "a" * 1500))
    assert r.status == 200 and len(r.json()["target"]) == 1506
    assert_alive(proxy)


def test_body_over_limit_by_content_length_is_413(proxy, module_origin):
    with RawClient(proxy.port) as c:  # only the head is sent: the answer must not wait for the body
        c.send(build_request("POST", "/echo?cl-413", [("Content-Length", str(100 * 1024))]))
        assert_error(c.read_response(), 413)
    assert not module_origin.find_requests(lambda r: r.target == "/echo?cl-413"), "oversized body was forwarded"
    assert_alive(proxy)


def test_body_at_limit_passes(proxy):
    r = send_and_read(proxy, build_request("POST", "/echo", body=b"b" * 64 * 1024))
    assert r.status == 200 and r.json()["body_len"] == 64 * 1024, r


def test_body_over_limit_by_chunked_total_is_413(proxy):
    body = chunked(*[b"c" * 10_000] * 10)  # 100 000 bytes > 64k
    with RawClient(proxy.port) as c:
        c.send(build_request("POST", "/echo", [("Transfer-Encoding", "chunked")], body))
        assert_error(c.read_response(), 413)
    assert_alive(proxy)


def test_route_max_body_size_override(proxy):
    assert_error(send_and_read(proxy, build_request("POST", "/small/echo", body=b"x" * 2000)), 413)
    assert send_and_read(proxy, build_request("POST", "/small/echo", body=b"x" * 1000)).status == 200
    body = chunked(*[b"y" * 500] * 4)
    assert_error(send_and_read(proxy, build_request("POST", "/small/echo", [("Transfer-Encoding", "chunked")],
                                                    body)), 413)
    assert_alive(proxy)


# -- upstream failures ---------------------------------------------------------------------
def test_upstream_refused_is_502(proxy):
    r = fetch(proxy.port, "GET", "/dead/x")
    assert_error(r, 502, "bad gateway")
    assert_alive(proxy)


@pytest.mark.parametrize("path", ["/reset", "/close"])
def test_upstream_reset_or_close_before_response_is_502(proxy, path):
    assert_error(fetch(proxy.port, "GET", path), 502, "bad gateway")
    assert_error(fetch(proxy.port, "POST", path, body=b"data"), 502, "bad gateway")
    assert_alive(proxy)


def test_upstream_invalid_response_is_502(proxy, module_origin):
    def garbage(conn, req):
        conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        conn.keep_alive = False
    module_origin.handlers["garbage"] = garbage
    assert_error(fetch(proxy.port, "GET", "/garbage"), 502, "bad gateway")
    assert_alive(proxy)


def test_upstream_read_timeout_is_504(proxy):
    assert_error(fetch(proxy.port, "GET", "/slowup/slow?delay=4"), 504)
    assert_alive(proxy)


def test_upstream_stall_mid_body_truncates_instead_of_completing(proxy):
    """Once the head is sent a 504 is impossible; the client must see an incomplete body, not a short one."""
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/slowup/slowbody?delay=4"))
        head = c.read_head()
        assert head.status == 200, head
        with pytest.raises((ServerClosed, ConnectionResetError)):
            b"".join(c.iter_body(head))
    assert_alive(proxy)


def test_upstream_connect_timeout_is_504(proxy, blackhole):
    if not blackhole.usable:
        pytest.skip("cannot make a loopback connect() hang on this machine (accept queue overflow not dropped)")
    assert_error(fetch(proxy.port, "GET", "/bh/x"), 504)
    assert_alive(proxy)


# -- client timeouts -----------------------------------------------------------------------
def answered_408_and_closed(c: RawClient) -> None:
    """The proxy gives up on a stalled client as docs/http.md says: 408, then close."""
    assert_error(c.read_response(), 408, "request timeout")
    assert c.is_closed(10)


def test_client_header_timeout(proxy):
    with RawClient(proxy.port, timeout=15) as c:
        c.send(b"GET /echo HTTP/1.1\r\nHost: test.local\r\nX-Half: ")
        answered_408_and_closed(c)
    assert_alive(proxy)


def test_client_body_timeout(proxy):
    with RawClient(proxy.port, timeout=15) as c:
        c.send(build_request("POST", "/echo?stalled", [("Content-Length", "100")]) + b"only-ten!!")
        answered_408_and_closed(c)
    assert_alive(proxy)


def test_idle_connection_is_not_a_worker(proxy):
    """Idle and half-sent connections hold sockets, never the worker."""
    idle = [RawClient(proxy.port) for _ in range(20)]
    # a client that asks for a large body and never reads it
    not_reading = RawClient(proxy.port)
    try:
        for i, c in enumerate(idle):
            c.send(b"GET /echo HTTP/1.1\r\n" if i % 2 else b"")
        not_reading.send(build_request("GET", "/bytes?n=%d" % (256 << 20)))
        time.sleep(0.5)
        for _ in range(10):
            assert_alive(proxy)
    finally:
        for c in idle + [not_reading]:
            c.close()


def test_client_send_timeout(proxy):
    """A client that stops reading a large response is cut off after send_timeout."""
    with RawClient(proxy.port, timeout=20) as c:
        c.send(build_request("GET", "/bytes?n=%d" % (512 << 20)))
        time.sleep(4)  # send_timeout is 1s; the socket buffers hold only a few MiB
        head = c.read_head()
        assert head.status == 200, head
        with pytest.raises((ServerClosed, ConnectionResetError)):
            for _ in c.iter_body(head):
                pass
    assert_alive(proxy)


def test_idle_keepalive_connection_closed(proxy):
    with RawClient(proxy.port, timeout=20) as c:
        assert c.request("GET", "/echo").status == 200
        assert c.is_closed(15), "idle kept-alive connection still open well after keepalive_timeout"


# -- stale pooled upstream connections -----------------------------------------------------
def test_stale_pooled_upstream_connection_is_retried(proxy, stale_origin):
    failures = []
    with RawClient(proxy.port) as c:
        for i in range(60):
            r = c.request("GET", f"/stale/echo?i={i}")
            if r.status != 200:
                failures.append((i, r))
            time.sleep((0, 0.001, 0.01, 0.05)[i % 4])
    for i in range(20):  # fresh client connections reuse the same pool
        r = fetch(proxy.port, "GET", f"/stale/echo?fresh={i}")
        if r.status != 200:
            failures.append((f"fresh {i}", r))
    assert not failures, failures
    assert stale_origin.connections >= 60


def test_zz_worker_survived_everything(proxy):
    """Runs last in this module: every error above was handled without losing the worker."""
    assert proxy.worker_pids() == proxy.initial_pids
