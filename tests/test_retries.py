"""Retries (docs/retries.md): a request that fails on one server goes to another, as the
upstream's retry_on, tries, retry_timeout, retry_non_idempotent and retry_buffer say.

Three real origins share the module; each test has its own upstream and route, so round-robin
turns do not cross tests, and passive health is off (max_fails = 0): what is tested is the
retry alone. Origin A misbehaves on the paths below, B and C answer them with their echo
(unknown names fall back to it):

    flaky     A reads the whole request, then resets the connection (no response byte)
    busy      A answers 503 "busy a"; C answers 503 "busy c"
    hang      A never answers (read_timeout fires)
    partial   A sends a head and part of its body, then resets
    early     A sends a 103 (Early Hints), then resets
"""
from __future__ import annotations

import re
import zlib

import pytest

from harness.client import RawClient, ServerClosed, fetch
from harness.origin import Origin, OriginConn, Request, pattern_bytes
from harness.proxy import free_port, upstream

NO_HEALTH = {"max_fails": 0}


def busy(conn: OriginConn, req: Request) -> None:
    conn.respond(503, f"busy {conn.origin.name}\n".encode())


def hang(conn: OriginConn, req: Request) -> None:
    conn.wait_closed(30)


def partial(conn: OriginConn, req: Request) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"p" * 100)
    conn.reset()


def early(conn: OriginConn, req: Request) -> None:
    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    conn.reset()


@pytest.fixture(scope="module")
def origins():
    a, b, c = Origin("a").start(), Origin("b").start(), Origin("c").start()
    a.handlers.update(flaky=a._h_reset, busy=busy, hang=hang, partial=partial, early=early)
    c.handlers["busy"] = busy
    yield a, b, c
    for o in (a, b, c):
        o.stop()


@pytest.fixture(scope="module")
def dead():
    return f"127.0.0.1:{free_port()}"  # nothing listens: connections are refused


UPSTREAMS = {
    # name: (servers by origin letter or "dead", options)
    "refused": ("dead b c", {}),
    "tries1": ("dead b", {"tries": 1}),
    "reset": ("a b", {"retry_on": ["error", "timeout", "reset"]}),
    "reset_post": ("a b", {"retry_on": ["error", "timeout", "reset"], "retry_non_idempotent": True}),
    "s503": ("a b", {"retry_on": ["503"]}),
    "no503": ("a b", {}),
    "all503": ("a c", {"retry_on": ["503"]}),
    "timeout": ("a b", {"retry_on": ["timeout"], "read_timeout": "1s"}),
    "error_only": ("a b", {"retry_on": ["error"], "read_timeout": "1s"}),
    "bounded": ("a b", {"retry_on": ["timeout"], "read_timeout": "1s", "retry_timeout": "0.5s"}),
    "cut": ("a b", {"retry_on": ["error", "timeout", "reset", "502", "503", "504"]}),
}


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, origins, stale_origin, dead):
    by_letter = dict(zip("abc", origins), dead=dead)
    ups = {name: upstream(*(by_letter[s] for s in servers.split()), **NO_HEALTH, **opts)
           for name, (servers, opts) in UPSTREAMS.items()}
    ups["stale"] = upstream(stale_origin, keepalive=8, **NO_HEALTH)
    return module_proxy_factory({
        "main": {"workers": 1, "max_body_size": "1m"},
        "upstreams": ups,
        "routes": [{"name": name, "path_prefix": f"/{name}/", "upstream": name} for name in ups],
    })


def retries(proxy, name: str) -> int:
    match = re.search(rf'^fastproxy_upstream_retries_total{{upstream="{name}"}} (\d+)$', proxy.metrics(), re.M)
    assert match, f"no retries_total for {name}"
    return int(match[1])


def sent_to(origin: Origin, mark: str):
    return origin.find_requests(lambda r: mark in r.target)


def test_refused_server_costs_no_client_error(proxy, origins, dead):
    """One of three servers refuses connections: every GET is answered by another, and each
    retry is counted and logged once with the reason and the server it went to."""
    _, b, c = origins
    answers = [fetch(proxy.port, "GET", f"/refused/echo?i={i}") for i in range(6)]
    assert [r.status for r in answers] == [200] * 6, answers
    log = proxy.error_log.read_text()
    lines = re.findall(rf'upstream "refused" {dead}: connect failed: .*; retried on (\S+) \(try 2 of 2\)', log)
    assert lines and set(lines) <= {b.address, c.address}, log[-3000:]
    assert retries(proxy, "refused") == len(lines)


def test_tries_1_means_no_retry(proxy, origins):
    answers = [fetch(proxy.port, "GET", f"/tries1/echo?i={i}").status for i in range(4)]
    assert 502 in answers and 200 in answers, answers
    assert retries(proxy, "tries1") == 0


def first_try_on_a(proxy, origins, route: str, method: str, body: bytes = b""):
    """Send requests until one went to A first (round-robin alternates A and B): its answer
    and its marker."""
    a = origins[0]
    for i in range(4):
        mark = f"{route}-{method}-{len(body)}-{i}"
        r = fetch(proxy.port, method, f"/{route}/flaky?{mark}", body=body)
        if sent_to(a, mark):
            return r, mark
        assert r.status == 200, r
    raise AssertionError("no request went to A")


def test_reset_retried_for_get_not_for_post_by_default(proxy, origins):
    _, b, _ = origins
    r, mark = first_try_on_a(proxy, origins, "reset", "GET")
    assert r.status == 200 and r.json()["origin"] == "b", r
    r, mark = first_try_on_a(proxy, origins, "reset", "POST", b"x" * 100)
    assert r.status == 502, r
    assert not sent_to(b, mark), "a POST went to a second server without retry_non_idempotent"


def test_post_retried_with_retry_non_idempotent(proxy, origins):
    r, mark = first_try_on_a(proxy, origins, "reset_post", "POST", b"x" * 100)
    assert r.status == 200 and r.json()["origin"] == "b" and r.json()["body_len"] == 100, r


def test_body_replayed_byte_exact_up_to_retry_buffer(proxy, origins):
    """A 64 KiB body (retry_buffer's default) went whole to A, which reset: B gets it again,
    byte for byte. One byte more, and the body is not kept: the request is not retried."""
    a, b, _ = origins
    body = pattern_bytes(64 * 1024)
    r, mark = first_try_on_a(proxy, origins, "reset_post", "POST", body)
    assert sent_to(a, mark)[0].body_len == len(body)
    got = r.json()
    assert r.status == 200 and got["origin"] == "b", r
    assert got["body_len"] == len(body) and got["body_crc"] == zlib.crc32(body), got

    body = pattern_bytes(64 * 1024 + 1)
    r, mark = first_try_on_a(proxy, origins, "reset_post", "POST", body)
    assert sent_to(a, mark)[0].body_len == len(body)
    assert r.status == 502, r
    assert not sent_to(b, mark), "retried a body larger than retry_buffer"


def answers_after_a(proxy, a: Origin, name: str, routes) -> None:
    """For each (route, status): GET /route/name twice (round-robin sends one of them to A
    first): the one that went to A first gets `status`, the other 200."""
    for route, want in routes:
        statuses = set()
        for i in range(2):
            mark = f"{route}-{i}"
            r = fetch(proxy.port, "GET", f"/{route}/{name}?{mark}")
            statuses.add(r.status)
            assert r.status == (want if sent_to(a, mark) else 200), (route, r)
        assert want in statuses, route


def test_503_retried_only_when_listed_and_the_last_answer_relayed(proxy, origins):
    a, _, c = origins
    answers_after_a(proxy, a, "busy", (("s503", 200), ("no503", 503)))
    # both servers answer 503: the second answer reaches the client as it was sent
    r = fetch(proxy.port, "GET", "/all503/busy?both")
    assert r.status == 503 and r.body in (b"busy a\n", b"busy c\n"), r
    assert sent_to(a, "both") and sent_to(c, "both")
    assert r.header("x-origin") == r.body.decode().split()[1]


def test_read_timeout_retried_only_with_timeout(proxy, origins):
    answers_after_a(proxy, origins[0], "hang", (("timeout", 200), ("error_only", 504)))


def test_retry_timeout_bounds_retries(proxy, origins):
    """The first try fails after read_timeout (1 s): with retry_timeout 0.5 s no retry may
    start any more (504); the same upstream without the bound retries."""
    answers_after_a(proxy, origins[0], "hang", (("timeout", 200), ("bounded", 504)))
    assert retries(proxy, "bounded") == 0


def test_never_retried_once_response_bytes_reached_the_client(proxy, origins):
    """A reset before the response is retried; a reset after a 1xx went to the client gets
    502 after it, and a reset after part of the response cuts that response: no other
    server sees those requests."""
    a, b, _ = origins
    r, _ = first_try_on_a(proxy, origins, "cut", "GET")
    assert r.status == 200 and r.json()["origin"] == "b", r
    for i in range(2):
        mark = f"cut-early-{i}"
        r = fetch(proxy.port, "GET", f"/cut/early?{mark}")
        if sent_to(a, mark):
            assert r.status == 502 and r.interim == [103], r
            assert not sent_to(b, mark), "retried after a 103 went to the client"
            break
        assert r.status == 200, r
    else:
        raise AssertionError("no request went to A")
    for i in range(2):
        mark = f"cut-partial-{i}"
        with RawClient(proxy.port, timeout=10) as client:
            client.send(f"GET /cut/partial?{mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                r = client.read_response()
            except (ServerClosed, OSError):
                r = None  # cut short: the head and 100 of its 1000 bytes came
        if sent_to(a, mark):
            assert r is None, r
            assert not sent_to(b, mark), "retried after the response began"
            return
        assert r.status == 200, r
    raise AssertionError("no request went to A")


def test_stale_pooled_connection_retry_is_not_a_try(proxy, stale_origin):
    """The origin closes each kept connection behind the proxy's back: the retry on a fresh
    connection still happens with one server (no other to try), and is not counted as one."""
    with RawClient(proxy.port, timeout=10) as client:
        for i in range(10):
            r = client.request("GET", f"/stale/echo?i={i}")
            assert r.status == 200, r
    assert stale_origin.connections >= 10
    assert retries(proxy, "stale") == 0


def test_core_and_config_name_the_same_conditions():
    """The core's RETRY_* bits are in the order of the config's retry_on values."""
    from fastproxy._core import RETRY_CONDITIONS
    from fastproxy.config.upstreams import RETRY_ON
    assert RETRY_CONDITIONS == RETRY_ON
