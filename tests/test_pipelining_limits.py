"""Pipelining is bounded: a client that sends many requests at once and does not read the
answers costs the worker a bounded queue, not every request it managed to send."""
from __future__ import annotations

import socket

import pytest

from harness.client import RawClient, ServerClosed, build_request
from harness.proxy import RssSampler, upstream, wait_until

DEPTH = 32  # PIPELINE_DEPTH in core/http.pyx: requests that may wait behind the current one


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "upstreams": {"app": upstream(module_origin)},
        "routes": [{"path_prefix": "/", "upstream": "app"}],
    })


def pipelined(n: int, first: int = 0) -> bytes:
    return b"".join(build_request("GET", f"/p/echo?i={i}") for i in range(first, first + n))


def read_in_order(c: RawClient, start: int, count: int) -> None:
    for i in range(start, start + count):
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["target"] == f"/p/echo?i={i}"


@pytest.mark.parametrize("count", [DEPTH + 1, 3 * DEPTH + 5, 300])
def test_pipelined_requests_past_the_queue_are_all_answered_in_order(proxy, count):
    # 300 small requests (~11 KiB) fit in what the worker keeps unparsed behind a full
    # queue: each is answered, in order, as the queue drains.
    with RawClient(proxy.port) as c:
        c.send(pipelined(count))
        read_in_order(c, 0, count)
        r = c.request("GET", "/after/echo")  # the connection is still usable
        assert r.status == 200


def test_more_than_the_worker_keeps_is_answered_up_to_the_queue_then_closed(proxy):
    # ~360 KiB of requests: the worker answers the current request and the queue, then
    # closes (RFC 9112 9.3.2: the client retries the rest on a new connection).
    data = pipelined(10000)
    with RawClient(proxy.port) as c:
        c.sock.settimeout(10)
        sent = 0
        c.sock.setblocking(False)
        try:
            while sent < len(data):
                sent += c.sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            pass  # the worker stopped reading: what it took is what counts
        c.sock.setblocking(True)
        c.sock.settimeout(10)
        answered = 0
        with pytest.raises(ServerClosed):
            while True:
                r = c.read_response()
                assert r.json()["target"] == f"/p/echo?i={answered}"
                answered += 1
        assert DEPTH + 1 <= answered < 10000
        assert r.header("connection") == "close"


def test_pipelining_clients_that_never_read_cost_a_bounded_amount(proxy, module_origin):
    # Without the bound, one 256 KiB read became ~8,700 queued exchanges (~3 MB a client).
    clients = 100
    request = build_request("GET", "/never-read/echo")
    burst = request * (256 * 1024 // len(request))
    socks = []
    with RssSampler(proxy.worker_pids()) as rss:
        try:
            for _ in range(clients):
                s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                s.setblocking(False)
                try:
                    s.send(burst)
                except BlockingIOError:
                    pass
                socks.append(s)
            # each client's current request and full queue reach the origin, then it closes
            wait_until(lambda: len(module_origin.find_requests(
                lambda r: r.path == "/never-read/echo")) >= clients * (DEPTH + 1), 30,
                message="every queued request at the origin")
        finally:
            for s in socks:
                s.close()
    grown = max(rss.growth().values())
    assert grown < clients * 200, f"worker grew {grown} KiB for {clients} non-reading pipeliners"
