"""Proxying basics: forwarding, header rewriting, routing and local responses."""
from __future__ import annotations

import json

import pytest

from harness.client import RawClient, build_request, fetch
from harness.proxy import respond, upstream, wait_until


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin, origin_b):
    text = {"Content-Type": "text/plain"}
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"a": upstream(module_origin), "b": upstream(origin_b)},
        "routes": [
            {"name": "api", "path_prefix": "/api/", "upstream": "a"},
            {"name": "api_v2", "path_prefix": "/api/v2/", "upstream": "b"},
            {"name": "exact", "path": "/api/exact", "respond": respond(200, "exact\n", text)},
            {"name": "hosted", "host": "example.test", "path_prefix": "/api/", "respond": respond(200, "host\n", text)},
            {"name": "only_post", "path": "/only-post", "methods": ["POST", "PUT"],
             "respond": respond(201, "posted\n", text)},
            {"name": "m_get", "path_prefix": "/m/", "methods": ["GET"], "respond": respond(200, "m-get\n", text)},
            {"name": "m_any", "path_prefix": "/m/", "respond": respond(200, "m-any\n", text)},
            {"name": "teapot", "path": "/teapot",
             "respond": respond(418, "short and stout\n", {"Content-Type": "text/plain", "X-Local": "yes"})},
        ],
    })


def echo(proxy, target="/api/echo", headers=(), method="GET", body=b"", host="test.local"):
    r = fetch(proxy.port, method, target, list(headers), body, host=host)
    assert r.status == 200, r
    return r, r.json()


# -- forwarding ----------------------------------------------------------------------------
def test_get_is_forwarded(proxy, module_origin):
    r, e = echo(proxy, "/api/echo?q=1", [("X-Custom", "v")])
    assert e["origin"] == "module-origin"
    assert e["method"] == "GET" and e["target"] == "/api/echo?q=1"
    assert ["X-Custom", "v"] in e["headers"]
    assert r.header("x-origin") == "module-origin"


def test_post_is_forwarded(proxy):
    body = b"field=value&other=" + b"z" * 20000
    _, e = echo(proxy, "/api/echo", [("Content-Type", "application/x-www-form-urlencoded")], "POST", body)
    assert e["method"] == "POST" and e["body_len"] == len(body) and e["body"] == body.decode()


# -- headers -----------------------------------------------------------------------------
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")


def test_large_heads_pass_intact_both_ways(proxy, module_origin):
    """Heads larger than the 4 KiB the worker's head buffer starts with, in both directions,
    arrive header by header, in order."""
    sent = [(f"X-Req-{i}", f"{i:03d}" + "r" * 97) for i in range(60)]  # ~7 KiB
    _, e = echo(proxy, headers=sent)
    assert [(k, v) for k, v in e["headers"] if k.startswith("X-Req-")] == sent

    returned = [(f"X-Resp-{i}", f"{i:03d}" + "s" * 97) for i in range(60)]
    module_origin.handlers["bighead"] = lambda conn, req: conn.respond(200, b"big head\n", returned)
    r = fetch(proxy.port, "GET", "/api/bighead")
    assert r.status == 200 and r.body == b"big head\n", r
    assert [(k, v) for k, v in r.headers if k.startswith("X-Resp-")] == returned


def test_hop_by_hop_request_headers_removed(proxy):
    _, e = echo(proxy, headers=[
        ("Connection", "keep-alive, X-Named-Hop"), ("X-Named-Hop", "secret"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "foo/2"),
        ("X-End-To-End", "kept")])
    seen = {k.lower(): v for k, v in e["headers"]}
    assert "x-named-hop" not in seen, e["headers"]
    for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
        assert name not in seen, (name, e["headers"])
    assert "x-named-hop" not in seen.get("connection", "").lower()
    assert seen.get("x-end-to-end") == "kept"


def test_every_connection_header_names_hop_by_hop_headers(proxy):
    _, e = echo(proxy, headers=[("Connection", "X-First"), ("X-First", "1"),
                                ("Connection", "keep-alive, X-Second"), ("X-Second", "2"),
                                ("X-Third", "3")])
    seen = {k.lower() for k, _ in e["headers"]}
    assert "x-first" not in seen and "x-second" not in seen, e["headers"]
    assert "x-third" in seen, e["headers"]


@pytest.mark.parametrize("value,named,closes", [
    ("keep-alive", False, False), ("Keep-Alive \t", False, False), ("CLOSE", False, True),
    ("close ", False, True), ("Keep-Alive , X-Named-Hop", True, False), ("close,X-Named-Hop", True, True),
    ("X-Named-Hop, keep-alive", True, False), ("keep-alive, close, X-NAMED-HOP ", True, True),
    ("x-named-hop\t", True, False)])
def test_connection_header_values(proxy, value, named, closes):
    """The plain values (keep-alive, close: any case, whitespace around) name no header and
    keep their meaning; a list naming a header, a plain value in it or not, drops that header."""
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/api/echo?connection", [("Connection", value), ("X-Named-Hop", "secret")])
        assert r.status == 200, r
        seen = {k.lower() for k, _ in r.json()["headers"]}
        assert ("x-named-hop" not in seen) == named, (value, r.json()["headers"])
        assert r.has_token("connection", "close") == closes, (value, r.headers)
        if closes:
            assert c.is_closed(5), value
        else:
            assert c.request("GET", "/api/echo?again").status == 200, value


def test_hop_by_hop_response_headers_removed(proxy):
    r = fetch(proxy.port, "GET", "/api/hop")
    assert r.status == 200 and r.body == b"hop\n", r
    names = {k.lower() for k, _ in r.headers}
    assert "x-hop-named" not in names, r.headers
    for name in ("keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert name not in names, (name, r.headers)
    assert all("x-hop-named" not in v.lower() for v in r.header_all("connection")), r.headers
    assert r.header("x-end-to-end") == "kept"


def test_x_forwarded_headers_added(proxy):
    _, e = echo(proxy, host="front.example:8080")
    seen = {k.lower(): v for k, v in e["headers"]}
    assert seen.get("x-forwarded-for") == "127.0.0.1", e["headers"]
    assert seen.get("x-forwarded-proto") == "http", e["headers"]
    assert seen.get("x-forwarded-host") == "front.example:8080", e["headers"]


def test_x_forwarded_for_is_appended(proxy):
    _, e = echo(proxy, headers=[("X-Forwarded-For", "203.0.113.7")])
    xff = [v for k, v in e["headers"] if k.lower() == "x-forwarded-for"]
    assert ", ".join(xff).replace(" ", "") == "203.0.113.7,127.0.0.1", e["headers"]


def test_request_id_kept_when_sent(proxy):
    r, e = echo(proxy, headers=[("X-Request-ID", "client-chosen-42")])
    assert [v for k, v in e["headers"] if k.lower() == "x-request-id"] == ["client-chosen-42"]
    assert r.header_all("x-request-id") == ["client-chosen-42"], r.headers


def test_request_id_generated_and_returned(proxy):
    ids = set()
    for _ in range(3):
        r, e = echo(proxy)
        upstream_ids = [v for k, v in e["headers"] if k.lower() == "x-request-id"]
        assert len(upstream_ids) == 1 and upstream_ids[0], e["headers"]
        assert r.header_all("x-request-id") == upstream_ids, (r.headers, upstream_ids)
        ids.add(upstream_ids[0])
    assert len(ids) == 3, f"request ids repeat: {ids}"


def test_upstream_server_header_replaced(proxy):
    r, _ = echo(proxy)
    assert r.header_all("server") == ["fastproxy"], r.headers


def test_local_response_has_server_and_request_id(proxy):
    r = fetch(proxy.port, "GET", "/teapot")
    assert r.header_all("server") == ["fastproxy"], r.headers
    assert r.header("x-request-id"), r.headers


# -- routing -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,target,host,want", [
    ("GET", "/api/x", "test.local", "origin:module-origin"),
    ("GET", "/api/v2/x", "test.local", "origin:origin-b"),        # longer prefix wins
    ("GET", "/api/v2", "test.local", "origin:module-origin"),     # "/api/v2" does not start with "/api/v2/"
    ("GET", "/api/exact", "test.local", "exact\n"),               # exact path beats prefix
    ("GET", "/api/exact?q=1", "test.local", "exact\n"),           # the query is not part of the path
    ("GET", "/api/exact/more", "test.local", "origin:module-origin"),
    ("GET", "/api/exact", "example.test", "host\n"),              # a route with a host beats one without
    ("GET", "/api/v2/x", "EXAMPLE.test:8080", "host\n"),          # host match ignores case and port
    ("GET", "/m/x", "test.local", "m-get\n"),                     # with methods beats without
    ("DELETE", "/m/x", "test.local", "m-any\n"),
    ("POST", "/only-post", "test.local", "posted\n"),
    ("PUT", "/only-post", "test.local", "posted\n"),
])
def test_routing_specificity(proxy, method, target, host, want):
    r = fetch(proxy.port, method, target, host=host)
    assert r.status in (200, 201), r
    got = f"origin:{r.json()['origin']}" if want.startswith("origin:") else r.body.decode()
    assert got == want, r


def test_method_mismatch_is_405_with_allow(proxy):
    r = fetch(proxy.port, "GET", "/only-post")
    assert r.status == 405, r
    allowed = {m.strip() for v in r.header_all("allow") for m in v.split(",")}
    assert allowed == {"POST", "PUT"}, r.headers
    assert r.json()["status"] == 405


def test_no_route_is_404_json(proxy):
    r = fetch(proxy.port, "GET", "/nothing/here")
    assert r.status == 404, r
    body = r.json()
    assert body["status"] == 404 and body["request_id"] == r.header("x-request-id"), (body, r.headers)
    assert (r.header("content-type") or "").startswith("application/json"), r.headers


def test_respond_route(proxy):
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/teapot")
        assert r.status == 418 and r.body == b"short and stout\n", r
        assert r.header("content-type") == "text/plain" and r.header("x-local") == "yes", r.headers
        head = c.request("HEAD", "/teapot")
        assert head.status == 418 and head.body == b"", head
        r = c.request("GET", "/teapot")  # the connection is intact after HEAD
        assert r.status == 418 and r.body == b"short and stout\n", r


def test_respond_route_drains_request_body(proxy):
    """A local response to a request with a body must not treat the body as the next request."""
    with RawClient(proxy.port) as c:
        c.send(build_request("POST", "/teapot", body=b"GET /evil HTTP/1.1\r\nHost: x\r\n\r\n")
               + build_request("GET", "/api/echo?next"))
        first = c.read_response()
        assert first.status == 418, first
        second = c.read_response()
        assert second.status == 200 and second.json()["target"] == "/api/echo?next", second


# -- settings that need their own proxy -----------------------------------------------------
def test_pass_server_header(make_proxy, origin):
    p = make_proxy({"main": {"pass_server_header": True}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"name": "all", "path_prefix": "/", "upstream": "o"}]})
    r = fetch(p.port, "GET", "/echo")
    assert r.header_all("server") == ["origin/1.0"], r.headers


def test_custom_server_header(make_proxy, origin):
    p = make_proxy({"main": {"server_header": "edge/7"}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"name": "all", "path_prefix": "/", "upstream": "o"}]})
    assert fetch(p.port, "GET", "/echo").header_all("server") == ["edge/7"]
    assert fetch(p.port, "GET", "/echo?x").header_all("server") == ["edge/7"]


def test_keepalive_requests_limit(make_proxy, origin):
    p = make_proxy({"main": {"keepalive_requests": 5}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"name": "all", "path_prefix": "/", "upstream": "o"}]})
    with RawClient(p.port) as c:
        for i in range(4):
            r = c.request("GET", f"/echo?{i}")
            assert r.status == 200 and not r.has_token("connection", "close"), r
        r = c.request("GET", "/echo?last")
        assert r.status == 200 and r.has_token("connection", "close"), r
        assert c.is_closed()


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_access_log_lines(make_proxy, origin, fmt):
    p = make_proxy({"access_log": {"format": fmt, "flush": "100ms"}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"name": "all", "path_prefix": "/", "upstream": "o"}]})
    # quotes and a backslash must not break either format's quoting
    fetch(p.port, "GET", "/echo?logged", [("X-Request-ID", "log-me-123"), ("User-Agent", 'agent/1 "q" \\')])
    fetch(p.port, "GET", "/reset", [("X-Request-ID", "log-me-502")])

    def lines():
        text = p.access_log.read_text() if p.access_log.exists() else ""
        found = [l for l in text.splitlines() if "log-me-" in l]
        return found if len(found) == 2 else None
    ok_line, bad_line = sorted(wait_until(
        lines, 10, message="two access-log lines"), key=lambda l: "log-me-502" in l)
    if fmt == "json":
        rec = json.loads(ok_line)
        values = {str(v) for v in rec.values()}
        assert "log-me-123" in values and "200" in values and origin.address in values, rec
        assert any("/echo?logged" in v for v in values), rec
        assert rec["user_agent"] == 'agent/1 "q" \\', rec
        assert "502" in {str(v) for v in json.loads(bad_line).values()}, bad_line
    else:
        assert '"GET /echo?logged HTTP/1.1" 200 ' in ok_line, ok_line
        assert '"agent/1 \\x22q\\x22 \\x5C"' in ok_line, ok_line
        assert "log-me-123" in ok_line and origin.address in ok_line, ok_line
        assert '"GET /reset HTTP/1.1" 502 ' in bad_line, bad_line


def test_upstream_failure_in_error_log_with_pid_and_request_id(make_proxy, origin):
    p = make_proxy({"upstreams": {"o": upstream(origin)},
                    "routes": [{"name": "all", "path_prefix": "/", "upstream": "o"}]})
    pid = p.worker_pids()[0]
    assert fetch(p.port, "GET", "/reset", [("X-Request-ID", "trace-me-77")]).status == 502

    def line():
        return next((l for l in p.error_log.read_text().splitlines() if "trace-me-77" in l), None)
    found = wait_until(
        line, 10, message="an error-log line with the request id")
    assert str(pid) in found, found
