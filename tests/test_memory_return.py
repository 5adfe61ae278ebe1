"""A worker gives memory back to the system once a burst of connections has gone, and
never while it serves large responses (whose buffers it keeps on purpose for reuse).

Trims are counted from the error log, where each one writes a debug line.
"""
from __future__ import annotations

import resource
import socket

import pytest

from harness.client import RawClient, build_request, consume_pattern_body, fetch
from harness.proxy import respond, rss_kib, upstream, wait_until

# Idle client connections opened at once, then closed. About 2.7 KiB of worker memory each:
# without a trim about 70 % of the burst's memory stays, with one about 20 % (pymalloc arenas
# pinned by a few survivors), so "back under half" separates the two with a wide margin.
BURST = 8000
TRIM_LINE = "heap trimmed"


@pytest.fixture
def nofile():
    """Enough descriptors for the burst, here and in the proxy (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = BURST + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start(make_proxy, origin):
    p = make_proxy({
        "main": {"workers": 1, "log_level": "debug"},
        "upstreams": {"origin": upstream(origin)},
        "routes": [{"name": "hello", "path": "/hello", "respond": respond(200, "hi\n")},
                   {"name": "big", "path_prefix": "/big/", "upstream": "origin"}],
    })
    p.worker_pid = p.worker_pids()[0]
    return p


def trims(p) -> int:
    return p.error_log.read_text().count(TRIM_LINE)


def open_connections(p) -> int:
    return p.status()["workers"][0]["connections"]


def test_memory_returned_after_a_burst_of_connections(make_proxy, origin, nofile):
    p = start(make_proxy, origin)
    for _ in range(50):
        assert fetch(p.port, "GET", "/hello").status == 200
    base = rss_kib(p.worker_pid)
    socks = []
    try:
        for _ in range(BURST):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            socks.append(s)
        for s in socks:  # each connection has been served and stays open, idle
            assert s.recv(4096).startswith(b"HTTP/1.1 200 "), "no answer on a burst connection"
        wait_until(lambda: open_connections(p) >= BURST, 30, message=f"{BURST} open connections")
        peak = rss_kib(p.worker_pid)
    finally:
        for s in socks:
            s.close()
    assert trims(p) == 0
    bound = base + (peak - base) // 2
    wait_until(lambda: rss_kib(p.worker_pid) <= bound, 30,
               message=f"worker RSS back to <= {bound} KiB (baseline {base}, peak {peak}, "
                       f"now {rss_kib(p.worker_pid)})")
    wait_until(lambda: trims(p) >= 1, 5, message="the trim's log line")
    assert fetch(p.port, "GET", "/hello").status == 200


def test_large_responses_do_not_trim(make_proxy, origin):
    p = start(make_proxy, origin)
    with RawClient(p.port) as c:
        for _ in range(200):
            c.send(build_request("GET", "/big/bytes?n=1048576"))
            r = c.read_head()
            assert r.status == 200, r
            assert consume_pattern_body(c, r) == (1 << 20, int(r.header("x-body-crc")))
        last_date = r.header("date")
    # the Date header changes at a sweep: wait for one to have run after the loop
    wait_until(lambda: fetch(p.port, "GET", "/hello").header("date") != last_date, 10,
               message="a sweep after the last response")
    assert trims(p) == 0
