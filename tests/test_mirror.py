"""Request mirroring (`mirror = { upstream, percent }`) through the real proxy: what the
mirror receives, that a dead, silent, late or held mirror never holds the client's request
back, the deterministic percentage, the metrics, and the configuration errors."""
from __future__ import annotations

import threading
import time
import zlib

import pytest

from harness.client import RawClient, build_request, chunked, fetch
from harness.origin import Origin, OriginConn, Request, pattern_bytes
from harness.proxy import free_port, respond, summed_metric, upstream, wait_until

CONNECTIONS, PER_CONNECTION = 10, 20  # 200 requests under load


def request_id(req: Request) -> str:
    return req.header("x-request-id") or ""


def mirrored(origin: Origin, rid: str) -> Request:
    return origin.wait_for_request(lambda r: request_id(r) == rid)


# -- a fast mirror -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mirror_origin():
    with Origin("mirror") as o:
        yield o


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin, mirror_origin):
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"main": upstream(module_origin), "mirror": upstream(mirror_origin)},
        "routes": [
            {"name": "all", "path_prefix": "/all/", "upstream": "main", "mirror": {"upstream": "mirror"}},
            {"name": "half", "path_prefix": "/half/", "upstream": "main",
             "mirror": {"upstream": "mirror", "percent": 50}},
            {"name": "plain", "path_prefix": "/", "upstream": "main"},
        ],
    })


def send(port: int, method: str, target: str, headers=(), body: bytes = b"") -> str:
    """One request; asserts the main origin answered it; returns its request id."""
    r = fetch(port, method, target, list(headers), body)
    assert r.status == 200 and r.json()["origin"] == "module-origin", r
    return r.header("x-request-id")


def test_fast_mirror_receives_every_request_as_sent_upstream(proxy, module_origin, mirror_origin):
    big = pattern_bytes(1024 * 1024)
    sent = [
        send(proxy.port, "GET", "/all/echo?q=1", [("X-Trace", "a")]),
        send(proxy.port, "DELETE", "/all/echo"),
        send(proxy.port, "POST", "/all/echo", [("Content-Type", "text/plain")], b"small body"),
        send(proxy.port, "PUT", "/all/echo", [], big),
        send(proxy.port, "POST", "/all/echo", [("Transfer-Encoding", "chunked")],
             chunked(b"first ", b"second ", big[:300000], b"last")),
        send(proxy.port, "POST", "/all/echo", [("Transfer-Encoding", "chunked")], chunked(big, big)),
    ]
    for rid in sent:
        main, copy = mirrored(module_origin, rid), mirrored(mirror_origin, rid)
        assert (copy.method, copy.target, copy.headers) == (main.method, main.target, main.headers)
        assert (copy.body_len, copy.body_crc, copy.chunked) == (main.body_len, main.body_crc, main.chunked)
    lengths = [mirrored(mirror_origin, rid).body_len for rid in sent]
    assert lengths == [0, 0, 10, len(big), 300017, 2 * len(big)]
    assert zlib.crc32(big) == mirrored(mirror_origin, sent[3]).body_crc
    assert len(mirror_origin.find_requests(lambda r: request_id(r) in sent)) == len(sent)  # once each
    head = fetch(proxy.port, "HEAD", "/all/bytes?n=100")  # the copy's answer has no body either
    assert head.status == 200 and mirrored(mirror_origin, head.header("x-request-id")).method == "HEAD"
    wait_until(lambda: copies(proxy) == len(sent) + 1, 10, message="every copy counted")  # the first test here
    assert copies(proxy, "failed") == copies(proxy, "abandoned") == 0


def copies(proxy, result: str = "sent") -> float:
    return summed_metric(proxy.metrics(), "fastproxy_mirror_requests_total", upstream="mirror", result=result)


def test_a_route_without_mirror_sends_no_copy(proxy, mirror_origin):
    before = copies(proxy)
    send(proxy.port, "POST", "/plain/echo", [], b"body")
    assert copies(proxy) == before  # counted as the copy starts, before the client's answer
    send(proxy.port, "POST", "/all/echo", [], b"body")
    assert copies(proxy) == before + 1


def test_percent_50_mirrors_exactly_every_second_request(proxy, mirror_origin):
    rids = [send(proxy.port, "GET", f"/half/echo?n={i}") for i in range(100)]
    wait_until(lambda: len(mirror_origin.find_requests(lambda r: request_id(r) in rids)) >= 50, 10,
               message="50 mirrored requests")
    copied = {request_id(r) for r in mirror_origin.find_requests(lambda r: request_id(r) in rids)}
    # the credit reaches 100 on every second request, wherever the route's count starts
    assert copied in ({rid for rid in rids[1::2]}, {rid for rid in rids[0::2]}), copied
    assert len(copied) == 50


# -- mirrors that fail or stall ---------------------------------------------------------------

def load(port: int, prefix: str):
    """CONNECTIONS keep-alive connections, PER_CONNECTION requests each (GETs, and POSTs with a
    body, some chunked); returns the responses, which must all come from the main origin."""
    results, errors = [], []

    def worker(n: int) -> None:
        try:
            with RawClient(port, timeout=20) as c:
                for i in range(PER_CONNECTION):
                    body = b"payload %d %d" % (n, i)
                    if i % 3 == 0:
                        r = c.request("GET", f"{prefix}echo?c={n}&i={i}")
                    elif i % 3 == 1:
                        r = c.request("POST", f"{prefix}echo", [], body)
                    else:
                        r = c.request("POST", f"{prefix}echo", [("Transfer-Encoding", "chunked")], chunked(body))
                    results.append(r)
        except Exception as exc:  # reported below, with the others
            errors.append(repr(exc))
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == CONNECTIONS * PER_CONNECTION
    assert all(r.status == 200 and r.json()["origin"] == "main" for r in results), \
        [r for r in results if r.status != 200][:3]
    return results


def bad_mirror_proxy(make_proxy, main, mirror_address: str):
    return make_proxy({
        "main": {"workers": 1},
        "upstreams": {"main": upstream(main), "mirror": upstream(mirror_address, read_timeout="30s")},
        "routes": [{"path_prefix": "/", "upstream": "main", "mirror": {"upstream": "mirror"}}],
    })


@pytest.fixture
def main_origin(make_origin):
    return make_origin("main")


def test_dead_mirror_costs_nothing_and_its_failures_are_counted(make_proxy, main_origin):
    p = bad_mirror_proxy(make_proxy, main_origin, f"127.0.0.1:{free_port()}")
    (pid,) = p.worker_pids()
    wait_until(lambda: copies(p) == 1, 10, message="the harness's probe copied")  # one before
    load(p.port, "/")
    total = CONNECTIONS * PER_CONNECTION + 1
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_mirror_requests_total",
                                     upstream="mirror", result="failed") == total, 10, message="failures counted")
    text = p.metrics()
    assert summed_metric(text, "fastproxy_mirror_requests_total", upstream="mirror", result="sent") == total
    assert summed_metric(text, "fastproxy_mirror_requests_total", upstream="mirror", result="abandoned") == 0
    assert summed_metric(text, "fastproxy_upstream_errors_total", upstream="mirror", kind="connect") == total
    assert summed_metric(text, "fastproxy_upstream_requests_total", upstream="mirror") == total
    assert summed_metric(text, "fastproxy_upstream_errors_total", upstream="main") == 0
    assert 'Connection refused; subrequest "GET /echo?c=0&i=0 HTTP/1.1", request id ' \
        in p.error_log.read_text()
    assert p.worker_pids() == [pid]


@pytest.fixture
def held(make_origin):
    """A mirror that holds every request to .../echo until the test sets `held.release` (its
    teardown does at the latest)."""
    origin = make_origin("held")
    origin.release = threading.Event()

    def hold(conn: OriginConn, req: Request) -> None:
        origin.release.wait(60)
        conn.respond_json({"origin": "held"})
    origin.handlers["echo"] = hold
    yield origin
    origin.release.set()


def test_silent_and_late_mirrors_cost_nothing(make_proxy, make_origin, main_origin, held):
    late = make_origin("late")

    def after_2s(conn: OriginConn, req: Request) -> None:
        time.sleep(2)
        late._h_echo(conn, req)
    late.handlers["echo"] = after_2s
    for mirror in (held, late):
        p = bad_mirror_proxy(make_proxy, main_origin, mirror.address)
        (pid,) = p.worker_pids()
        load(p.port, "/")
        assert p.worker_pids() == [pid]
        # the copies were made and reached this mirror: a route whose copies were never
        # sent would cost nothing too
        assert copies(p) == CONNECTIONS * PER_CONNECTION + 1  # and the ready probe's
        wait_until(lambda: mirror.requests, 10, message=f"a copy at the {mirror.name} mirror")


def test_held_mirror_does_not_delay_any_client_response(make_proxy, main_origin, held):
    """Every copy is held by the mirror until the test lets go: all the clients' responses
    complete while the mirror holds every one of their copies."""
    p = bad_mirror_proxy(make_proxy, main_origin, held.address)
    total = CONNECTIONS * PER_CONNECTION + 1  # and the copy of the harness's ready probe
    load(p.port, "/")  # completes while nothing was answered by the mirror
    wait_until(lambda: len(held.requests) == total, 20, message="every copy at the held mirror")
    held.release.set()
    # once released, the copies complete, and copying goes on
    r = fetch(p.port, "GET", "/after")
    assert r.status == 200 and r.json()["origin"] == "main"
    wait_until(lambda: len(held.requests) == total + 1, 10, message="the next copy")
    assert copies(p) == total + 1 and copies(p, "failed") == copies(p, "abandoned") == 0


def test_a_silent_mirror_is_timed_out_by_the_sweep(make_proxy, main_origin, held):
    """A copy belongs to no client connection: the sweep still finds its upstream connection
    and times it out (read_timeout), counted as the mirror's failure and a timeout."""
    p = make_proxy({
        "main": {"workers": 1},
        "upstreams": {"main": upstream(main_origin), "mirror": upstream(held, read_timeout="1s")},
        "routes": [{"path_prefix": "/", "upstream": "main", "mirror": {"upstream": "mirror"}}],
    })
    assert fetch(p.port, "POST", "/echo", [], b"body").status == 200
    wait_until(lambda: copies(p, "failed") == 1, 15, message="the copy timed out")
    assert copies(p) == 2  # and the harness's probe's, which the mirror answers at once
    assert summed_metric(p.metrics(), "fastproxy_upstream_errors_total", upstream="mirror", kind="timeout") == 1
    assert 'read_timeout (1s) expired: no response' in p.error_log.read_text()


def test_a_copys_answer_is_read_and_dropped_and_its_connection_reused(make_proxy, make_origin, main_origin):
    """The mirror answers each copy with 3 MiB: read to its end and dropped, the connection
    goes back to the pool and carries the next copies."""
    big = make_origin("big")
    answered = []

    def three_mib(conn: OriginConn, req: Request) -> None:
        big._h_bytes(conn, Request(req.conn_id, req.method, "/bytes?n=3145728", req.version, req.headers))
        answered.append(req)
    big.handlers["echo"] = three_mib
    p = bad_mirror_proxy(make_proxy, main_origin, big.address)
    for i in range(5):
        r = fetch(p.port, "GET", f"/echo?i={i}")
        assert r.status == 200 and r.json()["origin"] == "main" and len(r.body) < 10000, r
        wait_until(lambda: len(answered) == i + 1, 10, message="the copy answered")
    assert copies(p) == 6 and copies(p, "failed") == copies(p, "abandoned") == 0  # and the probe's
    assert big.connections < 6  # the copies' connections were pooled and reused


def test_a_stuck_mirror_holds_at_most_max_in_flight_copies(make_proxy, main_origin, held):
    """While max_in_flight copies wait for a mirror that holds them, selected requests are
    not copied (skipped); once the mirror answers, copying resumes."""
    p = make_proxy({
        "main": {"workers": 1},
        "upstreams": {"main": upstream(main_origin), "mirror": upstream(held)},
        "routes": [{"path_prefix": "/m/", "upstream": "main", "mirror": {"upstream": "mirror", "max_in_flight": 5}},
                   {"path_prefix": "/", "upstream": "main"}],
    })
    for i in range(20):
        assert fetch(p.port, "GET", f"/m/echo?i={i}").json()["origin"] == "main"
    assert (copies(p), copies(p, "skipped")) == (5, 15)
    wait_until(lambda: len(held.requests) == 5, 10, message="the 5 copies at the mirror")
    held.release.set()
    # the held copies complete: the next selected requests are copied again (bounded retries)
    wait_until(lambda: fetch(p.port, "GET", "/m/echo").status == 200 and copies(p) > 5, 10,
               message="copying again")
    assert copies(p, "failed") == copies(p, "abandoned") == 0


def test_mirror_that_does_not_read_is_abandoned_and_the_upload_goes_on(make_proxy, make_origin, main_origin):
    """A mirror that never reads: its copy's unsent body is bounded, past the bound the copy
    is abandoned (and counted), and the client's 8 MiB upload completes meanwhile."""
    stuck = make_origin("stuck")
    release = threading.Event()
    stuck.on_accept = lambda conn: release.wait(60)
    try:
        p = bad_mirror_proxy(make_proxy, main_origin, stuck.address)
        body = pattern_bytes(8 * 1024 * 1024)
        r = fetch(p.port, "POST", "/upload", [], body, timeout=30)
        assert r.status == 200 and r.json()["origin"] == "main", r
        assert (r.json()["body_len"], r.json()["body_crc"]) == (len(body), zlib.crc32(body))
        assert copies(p, "abandoned") == 1
        assert copies(p) == 2  # and the harness's ready probe's, without a body: never abandoned
    finally:
        release.set()


def test_client_leaving_mid_upload_abandons_the_copy(make_proxy, make_origin, main_origin):
    mirror = make_origin("mirror")
    p = bad_mirror_proxy(make_proxy, main_origin, mirror.address)
    (pid,) = p.worker_pids()
    with RawClient(p.port) as c:
        c.send(build_request("POST", "/echo", [("Content-Length", "100000")], b"x" * 1000))
        wait_until(lambda: copies(p) == 2, 10, message="the copy started")  # after the probe's
    wait_until(lambda: copies(p, "abandoned") == 1, 10, message="the copy abandoned")
    assert fetch(p.port, "GET", "/echo").status == 200
    assert p.worker_pids() == [pid]


def test_a_request_refused_before_the_hooks_is_not_copied(make_proxy, make_origin, main_origin):
    """A 413 by Content-Length and a 431 come before the route's hooks: no copy, and the
    mirror's log hook finds no per-request state to clean up."""
    mirror = make_origin("mirror")
    p = make_proxy({
        "main": {"workers": 1},
        "upstreams": {"main": upstream(main_origin), "mirror": upstream(mirror)},
        "routes": [{"path_prefix": "/", "upstream": "main", "max_body_size": "1k", "max_header_size": "2k",
                    "mirror": {"upstream": "mirror"}}],
    })
    before = copies(p)
    assert fetch(p.port, "POST", "/echo", [], b"x" * 2000).status == 413
    assert fetch(p.port, "GET", "/echo", [("X-Big", "y" * 3000)]).status == 431
    assert copies(p) == before
    assert fetch(p.port, "POST", "/echo", [], b"x" * 1000).status == 200
    assert copies(p) == before + 1
    assert "unexpected error" not in p.error_log.read_text()


# -- configuration -------------------------------------------------------------------------

def test_configuration_errors_are_reported_with_their_key_paths(make_proxy):
    p = make_proxy({"upstreams": {"app": upstream("127.0.0.1:9"), "shadow": upstream("127.0.0.1:10")},
                    "routes": [
                        {"path_prefix": "/a/", "upstream": "app", "mirror": {"upstream": "shadwo"}},
                        {"path_prefix": "/b/", "upstream": "app", "mirror": {"upstream": "shadow", "percent": 101}},
                        {"path_prefix": "/c/", "upstream": "app", "mirror": {"upstream": "shadow", "percent": -1}},
                        {"path": "/r", "respond": respond(200, "r"), "mirror": {"upstream": "shadow"}},
                        {"path_prefix": "/d/", "upstream": "app", "mirror": {"percent": 5, "max_in_flight": 0}},
                        {"path_prefix": "/", "upstream": "app", "mirror": {"upstream": "shadow", "percent": 10}},
                    ]}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode == 1
    problems = [line.split(": ", 1)[1] for line in out.stderr.splitlines() if ": routes[" in line]
    # each key's own problems first, then those against the rest of the config
    assert [problem.split(": ")[0] for problem in problems] == [
        "routes[1].mirror.percent", "routes[2].mirror.percent", "routes[4].mirror.upstream",
        "routes[4].mirror.max_in_flight", "routes[0].mirror.upstream", "routes[3].mirror"], problems
    assert "must be an integer 0..100, got 101" in problems[0], problems
    assert "required key is missing" in problems[2], problems
    assert "got 0" in problems[3], problems
    assert "unknown upstream 'shadwo' (did you mean 'shadow'?)" in problems[4], problems
    assert "nothing is sent upstream" in problems[5], problems
