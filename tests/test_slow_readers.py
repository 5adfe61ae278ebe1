"""A client that reads a large response slowly, or not at all, holds a bounded amount of
worker memory, and a slow reader still gets every byte in order."""
from __future__ import annotations

import socket
import time
import zlib

import pytest

from harness.client import RawClient
from harness.origin import pattern_crc
from harness.proxy import RssSampler, rss_kib, upstream, wait_until

LARGE = 64 << 20


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "main": {"send_timeout": "60s"},
        "upstreams": {"app": upstream(module_origin)},
        "routes": [{"path_prefix": "/", "upstream": "app"}],
    })


def small_window_client(port: int) -> socket.socket:
    """A client whose kernel holds little of the response for it (16 KiB receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def settled(pid: int) -> None:
    last = [rss_kib(pid), time.monotonic()]

    def still():
        now = rss_kib(pid)
        if abs(now - last[0]) > 256:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] > 1.0
    wait_until(still, 20, interval=0.1, message="worker memory to settle")


def test_clients_that_stop_reading_hold_a_bounded_amount(proxy, module_origin):
    # Before: each held ~500 KiB (a 256 KiB write buffer plus one 256 KiB read on top).
    clients = 60
    socks = []
    with RssSampler(proxy.worker_pids()) as rss:
        try:
            for i in range(clients):
                s = small_window_client(proxy.port)
                s.sendall(b"GET /stop-%d/bytes?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (i, LARGE))
                s.recv(4096)  # the response has started: the worker is relaying it
                socks.append(s)
            # the worker pauses each upstream once its client is full: wait until its memory
            # has stopped moving (sampled all along)
            settled(proxy.worker_pids()[0])
        finally:
            for s in socks:
                s.close()
    grown = max(rss.growth().values())
    assert grown < clients * 200, f"worker grew {grown} KiB for {clients} stalled readers"


def test_a_slow_reader_gets_every_byte(proxy):
    # Reads in small pieces with pauses, so the worker keeps falling behind and catching up
    # (reads sized to what the client can take); the body must arrive whole and in order.
    n = 6 << 20
    with RawClient(proxy.port, timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        c.send(b"GET /slow-reader/bytes?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        resp = c.read_head()
        assert resp.status == 200
        crc, got = 0, 0
        for piece in c.iter_body(resp):
            crc = zlib.crc32(piece, crc)
            got += len(piece)
            if got < n // 2:
                time.sleep(0.002)  # slower than the origin: the worker must wait for us
        assert got == n and crc == pattern_crc(n)
        # the connection is still good for another request
        assert c.request("GET", "/after/echo").status == 200
