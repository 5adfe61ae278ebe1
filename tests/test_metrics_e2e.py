"""/metrics totals are exact across workers and across a reload; /status describes the workers."""
from __future__ import annotations

import os

from harness.client import fetch, get_json
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
