"""The life of a client connection: accepting (in bursts, and when a worker runs out of
descriptors), deferred accept, and connection objects reused by a worker.

A worker keeps the objects of connections that ended between requests and serves its next
connections with them (ClientConnection.forget); nothing of a previous connection may show in
a later one. With `deferred` a listener hands connections over only once the client has sent
something, and a client that stays silent is still closed by the usual rules.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from harness.client import RawClient, build_request, fetch
from harness.proxy import free_port, respond, upstream, wait_until


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


def test_a_burst_of_connections_is_accepted_and_served_in_full(make_proxy, origin):
    """300 clients connect to one worker before any is accepted (the kernel completes the
    handshakes and queues them), then all send: the worker takes them in batches and
    answers each, with its own address, its own request, and a close when asked."""
    p = make_proxy(config(origin))
    sources = [f"127.0.0.{2 + i % 50}" for i in range(300)]
    clients = [RawClient(p.port, source=src) for src in sources]
    try:
        for i, c in enumerate(clients):
            target = "/hello" if i % 3 else f"/api/echo?i={i}"
            c.send(build_request("GET", target, [("Connection", "close")] if i % 2 else None))
        for i, (c, src) in enumerate(zip(clients, sources)):
            r = c.read_response()
            if i % 3:
                assert r.status == 200 and r.body == b"hello\n", (i, r)
            else:
                assert r.json()["target"] == f"/api/echo?i={i}" and forwarded_for(r) == src, (i, r)
            if i % 2:
                assert c.is_closed(10), i
    finally:
        for c in clients:
            c.close()
    assert fetch(p.port, "GET", "/hello").body == b"hello\n"


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_worker_out_of_descriptors_rests_its_listener_and_loses_no_connection(make_proxy, origin):
    """With worker_rlimit_nofile a little above what a worker holds idle, clients beyond it
    wait in the kernel's queue: the worker says once per rest that it cannot accept, keeps
    serving the connections it has, and serves the waiting ones as descriptors free up
    (libuv's answer instead is to accept and close them at once)."""
    p = make_proxy(config(origin))
    idle = open_descriptors(p.worker_pids()[0])
    cfg = config(origin)
    cfg["main"]["worker_rlimit_nofile"] = idle + 6
    p.write_config(cfg)
    p.reload()
    worker = p.worker_pids()[0]
    held = []
    try:
        for _ in range(12):
            c = RawClient(p.port, timeout=20)
            c.send(build_request("GET", "/hello"))
            held.append(c)
        # the first few are answered; the rest wait, connected but not accepted
        assert held[0].read_response().body == b"hello\n"
        wait_until(lambda: "cannot accept connections: Too many open files" in p.error_log.read_text(),
                   10, message="the worker to report running out of descriptors")
        answered = held[1].read_response()
        assert answered.status == 200
        # the clients it holds still get answers
        assert held[0].request("GET", "/hello").body == b"hello\n"
        time.sleep(1.2)  # two rests at least: one line per rest, not a line per try
        rests = p.error_log.read_text().count("cannot accept connections")
        assert 1 <= rests <= 6, rests
        # freeing descriptors lets the waiting clients in, one by one
        for i in range(2, len(held)):
            held[i - 2].close()
            r = held[i].read_response()
            assert r.status == 200 and r.body == b"hello\n", (i, r)
    finally:
        for c in held:
            c.close()
    assert p.worker_pids() == [worker]
    assert fetch(p.port, "GET", "/api/echo").status == 200


def test_ipv6_clients_are_served_with_their_address(make_proxy, origin):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    p = make_proxy(start=False)
    port6 = free_port()
    p.write_config(config(origin) | {"listen": [{"address": f"127.0.0.1:{p.port}"},
                                                 {"address": f"[::1]:{port6}"}]})
    p.start()
    with RawClient(port6, host="::1") as c:
        r = c.request("GET", "/api/echo?v6")
        assert r.status == 200 and forwarded_for(r) == "::1", r
        assert c.request("GET", "/hello").body == b"hello\n"
    wait_until(lambda: any(line.startswith("::1 ") and "/api/echo?v6" in line
                           for line in p.access_log.read_text().splitlines()),
               10, message="the access log line of the IPv6 client")
