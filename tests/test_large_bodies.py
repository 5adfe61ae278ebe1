"""1 GiB downloads and uploads stream through with flat worker memory.

Bodies are generated on the fly and checked by length and CRC-32; neither the
test nor the origin ever holds more than a few MiB. Worker RSS is sampled from
/proc/<pid>/status while the transfer runs.
"""
from __future__ import annotations

import socket
import time

import pytest

from harness.client import RawClient, build_request, consume_pattern_body, send_pattern
from harness.origin import pattern_crc
from harness.proxy import RssSampler, upstream

GIB = 1 << 30
MAX_GROWTH_KIB = 50 * 1024


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "main": {"workers": 2, "max_body_size": "0"},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


@pytest.fixture(scope="module")
def gib_crc():
    return pattern_crc(GIB)


def warm_up(proxy):
    """Let every worker serve a few proxied requests first, so imports and pools are in the baseline."""
    for _ in range(20):
        with RawClient(proxy.port) as c:
            assert c.request("GET", "/bytes?n=4000000").status == 200
            assert c.request("POST", "/echo", body=b"w" * 4_000_000).status == 200


@pytest.mark.slow
def test_1gib_download_flat_memory(proxy, gib_crc):
    warm_up(proxy)
    with RssSampler(proxy.worker_pids()) as rss, RawClient(proxy.port, timeout=30) as c:
        c.send(build_request("GET", f"/bytes?n={GIB}"))
        r = c.read_head()
        assert r.status == 200, r
        n, crc = consume_pattern_body(c, r)
    assert n == GIB and crc == gib_crc, (n, crc)
    print(f"download: worker RSS growth KiB {rss.growth()}")
    assert all(g < MAX_GROWTH_KIB for g in rss.growth().values()), f"worker RSS growth KiB: {rss.growth()}"


@pytest.mark.slow
def test_1gib_upload_flat_memory(proxy, gib_crc):
    warm_up(proxy)
    with RssSampler(proxy.worker_pids()) as rss, RawClient(proxy.port, timeout=30) as c:
        c.send(build_request("POST", "/echo?upload", [("Content-Length", str(GIB))]))
        send_pattern(c.sock, GIB)
        r = c.read_response()
    assert r.status == 200, r
    echo = r.json()
    assert echo["body_len"] == GIB and echo["body_crc"] == gib_crc, echo
    print(f"upload: worker RSS growth KiB {rss.growth()}")
    assert all(g < MAX_GROWTH_KIB for g in rss.growth().values()), f"worker RSS growth KiB: {rss.growth()}"


@pytest.mark.slow
def test_chunked_upload_to_slow_reader_flat_memory(proxy, module_origin):
    """Backpressure: the origin reads slowly, so the proxy must stop reading the client."""
    def slow_reader(conn, req):
        total = 0
        # read the chunked body slowly: 256 KiB every 10 ms
        while True:
            line = conn.read_until(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                conn.read_until(b"\r\n")
                break
            left = size
            while left:
                piece = conn.read_some(min(left, 256 * 1024))
                left -= len(piece)
                total += len(piece)
                time.sleep(0.01)
            conn.read_exact(2)
        conn.respond_json({"body_len": total})
    slow_reader.reads_body = True
    module_origin.handlers["slowread"] = slow_reader
    size = 128 << 20
    warm_up(proxy)
    with RssSampler(proxy.worker_pids()) as rss, RawClient(proxy.port, timeout=60) as c:
        c.send(build_request("POST", "/slowread", [("Transfer-Encoding", "chunked")]))
        send_pattern(c.sock, size, chunk_framing=True)
        r = c.read_response()
    assert r.status == 200 and r.json()["body_len"] == size, r
    assert all(g < MAX_GROWTH_KIB for g in rss.growth().values()), f"worker RSS growth KiB: {rss.growth()}"


@pytest.mark.slow
def test_slow_reading_client_flat_memory(proxy):
    """Backpressure the other way: the client reads slowly, so the proxy must stop reading the origin."""
    size = 128 << 20
    warm_up(proxy)
    with RssSampler(proxy.worker_pids()) as rss, RawClient(proxy.port, timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        c.send(build_request("GET", f"/bytes?n={size}"))
        r = c.read_head()
        assert r.status == 200, r
        n = 0
        for piece in c.iter_body(r):
            n += len(piece)
            time.sleep(0.005)
    assert n == size
    assert all(g < MAX_GROWTH_KIB for g in rss.growth().values()), f"worker RSS growth KiB: {rss.growth()}"
