"""/metrics totals are exact across workers and across a reload; /status describes the workers."""
from __future__ import annotations

import os

from harness.client import RawClient, fetch, get_json
from harness.proxy import respond, summed_metric, upstream, wait_until


def config(origin):
    return {
        "main": {"workers": 2},
        "upstreams": {"origin": upstream(origin)},
        "routes": [
            {"name": "hello", "path": "/hello", "respond": respond(200, "hi\n")},
            {"name": "api", "path_prefix": "/api/", "upstream": "origin"},
        ],
    }


def send(proxy, n, tag):
    """n requests, each on a fresh connection so that both workers serve some."""
    for i in range(n):
        target = "/hello" if i % 2 else f"/api/echo?{tag}={i}"
        r = fetch(proxy.port, "GET", target, [("Connection", "close")])
        assert r.status == 200, r


def requests_total(text, route):
    return summed_metric(text, "fastproxy_requests_total", route=route)


def test_request_totals_exact_across_workers_and_reload(make_proxy, origin):
    p = make_proxy(config(origin))
    n, m = 120, 80
    send(p, n, "before")
    gen = p.generation()
    p.reload()
    send(p, m, "after")
    # a 404 is counted too, under a label other than our routes
    assert fetch(p.port, "GET", "/no-route").status == 404

    want = {"hello": (n + m) // 2, "api": (n + m) - (n + m) // 2}

    def settled():
        text = p.metrics()
        return text if all(requests_total(text, r) >= c for r, c in want.items()) else None
    text = wait_until(settled, 10, message="request counters to reach the number of requests sent")
    for route, count in want.items():
        assert requests_total(text, route) == count, (route, text)
        assert summed_metric(text, "fastproxy_requests_total", route=route, code="2xx") == count, text
    assert summed_metric(text, "fastproxy_request_duration_seconds_count") >= n + m, text
    assert summed_metric(text, "fastproxy_bytes_received_total") > 0, text
    assert summed_metric(text, "fastproxy_bytes_sent_total") > 0, text
    assert "fastproxy_active_connections" in text and "fastproxy_upstream_errors_total" in text, text
    assert "# TYPE fastproxy_request_duration_seconds histogram" in text, text

    st = p.status()
    assert st["generation"] == gen + 1
    assert st["master_pid"] == p.pid
    assert len(st["workers"]) == 2, st
    assert all(w["generation"] == gen + 1 for w in st["workers"]), st
    assert all(os.path.exists(f"/proc/{w['pid']}") for w in st["workers"]), st
    assert {"pid", "slot", "generation", "state", "connections"} <= set(st["workers"][0]), st
    assert st.get("uptime", st.get("uptime_seconds")) >= 0, st


def test_upstream_errors_counted(make_proxy, origin):
    p = make_proxy(config(origin))
    for _ in range(3):
        assert fetch(p.port, "GET", "/api/reset").status == 502

    def counted():
        return summed_metric(p.metrics(), "fastproxy_upstream_errors_total", upstream="origin") >= 3
    wait_until(counted, 10, message="fastproxy_upstream_errors_total{upstream=\"origin\"} >= 3")


def test_status_json(make_proxy, origin):
    p = make_proxy(config(origin))
    st = get_json(p.admin_port, "/status")
    assert st["master_pid"] == p.pid and isinstance(st["generation"], int), st
    assert len(st["workers"]) == 2 and all(w["generation"] == st["generation"] for w in st["workers"]), st
    assert sorted(w["slot"] for w in st["workers"]) == sorted({w["slot"] for w in st["workers"]})
    assert all(w["state"] for w in st["workers"]), st


def test_status_classes_counted_exactly(make_proxy, origin):
    p = make_proxy(config(origin))
    before = p.metrics()
    for _ in range(3):
        assert fetch(p.port, "GET", "/no-route").status == 404
    for _ in range(2):
        assert fetch(p.port, "GET", "/api/reset").status == 502
    assert fetch(p.port, "GET", "/api/status?code=503").status == 503

    def delta(text, **labels):
        return (summed_metric(text, "fastproxy_requests_total", **labels)
                - summed_metric(before, "fastproxy_requests_total", **labels))
    def counted():
        t = p.metrics()
        return t if delta(t, code="5xx") >= 3 and delta(t, code="4xx") >= 3 else None
    text = wait_until(counted, 10, message="4xx and 5xx counters")
    assert delta(text, code="4xx") == 3, text
    assert delta(text, route="api", code="5xx") == 3, text
    assert delta(text, code="2xx") == 0, text


def test_active_connections_gauge(make_proxy, origin):
    p = make_proxy(config(origin))
    # the harness's readiness probe may still be closing: start from a settled gauge
    base = 0
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_active_connections") == base, 10,
               message="no active connection before the test")
    clients = [RawClient(p.port) for _ in range(6)]
    try:
        for c in clients:
            assert c.request("GET", "/hello").status == 200  # now idle, kept alive
        wait_until(lambda: summed_metric(p.metrics(), "fastproxy_active_connections") >= base + 6, 10,
                   message="active connections to include 6 idle keep-alive clients")
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_active_connections") <= base, 10,
               message="active connections back to the baseline")
