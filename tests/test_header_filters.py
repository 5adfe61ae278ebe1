"""Header transforms (`request_headers`, `response_headers`) through the real proxy: what
the origin receives, what the client receives, what the configuration refuses."""
from __future__ import annotations

import pytest

from harness.client import RawClient, build_request, chunked, fetch
from harness.origin import Origin, OriginConn, Request
from harness.proxy import free_port, respond, upstream

REQUEST_EDITS = {
    "set": {"X-Env": "prod", "user-agent": "fastproxy-test"},
    "add": {"X-Tag": ["a", "b"], "Via": "1.1 edge"},
    "remove": ["Cookie", "x-debug"],
}
RESPONSE_EDITS = {
    "set": {"X-Frame-Options": "DENY"},
    "add": {"Link": ["</a.css>; rel=preload", "</b.js>; rel=preload"]},
    "remove": ["x-powered-by", "ETag"],
}
ORIGIN_HEADERS = [("x-frame-options", "SAMEORIGIN"), ("X-FRAME-OPTIONS", "ALLOW-FROM x"),
                  ("Link", "</origin.css>; rel=preload"), ("X-Powered-By", "php"),
                  ("X-POWERED-BY", "again"), ("ETag", '"v1"'), ("Cache-Control", "no-store")]


def with_headers(conn: OriginConn, req: Request) -> None:
    framing = req.query.get("framing", "length")
    conn.respond(200, b"body\n", headers=ORIGIN_HEADERS, framing=framing)


def hop_named(conn: OriginConn, req: Request) -> None:
    conn.respond(200, b"hop\n", headers=[("Connection", "X-Hop-Named"), ("X-Hop-Named", "1"),
                                         ("X-Powered-By", "php"), ("X-Kept", "yes")])


@pytest.fixture(scope="module")
def origin():
    with Origin("headers-origin") as o:
        o.handlers["with_headers"] = with_headers
        o.handlers["hop_named"] = hop_named
        yield o


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, origin):
    return module_proxy_factory({
        "main": {"workers": 1, "max_body_size": "1k", "client_body_timeout": "1s"},
        "upstreams": {"origin": upstream(origin), "dead": upstream(f"127.0.0.1:{free_port()}")},
        "routes": [
            {"name": "plain", "path_prefix": "/", "upstream": "origin"},
            {"name": "req", "path_prefix": "/req/", "upstream": "origin", "request_headers": REQUEST_EDITS},
            {"name": "resp", "path_prefix": "/resp/", "upstream": "origin", "response_headers": RESPONSE_EDITS},
            {"name": "both", "path_prefix": "/both/", "upstream": "origin",
             "request_headers": {"remove": ["X-Debug"]}, "response_headers": {"remove": ["X-Powered-By"]}},
            {"name": "dead", "path_prefix": "/dead/", "upstream": "dead", "response_headers": RESPONSE_EDITS},
            {"name": "local", "path": "/local", "response_headers": RESPONSE_EDITS,
             "respond": respond(200, "local\n", {"ETag": '"l1"', "X-Frame-Options": "SAMEORIGIN",
                                                 "Link": "</local.css>", "Content-Type": "text/plain"})},
        ],
    })


CLIENT_HEADERS = [("X-ENV", "dev"), ("x-env", "dev2"), ("User-Agent", "curl/8"), ("X-Tag", "c"),
                  ("Cookie", "a=1"), ("cookie", "b=2"), ("X-Debug", "1"), ("X-DEBUG", "2"),
                  ("X-Other", "kept")]


def received(proxy, target: str, headers=CLIENT_HEADERS, method: str = "GET") -> list:
    """The headers the origin's echo saw, as (lower-case name, value) in order."""
    r = fetch(proxy.port, method, target, headers)
    assert r.status == 200, r
    return [(name.lower(), value) for name, value in r.json()["headers"]]


def values(headers, name: str) -> list:
    return [value for key, value in headers if key == name]


def test_request_headers_set_add_remove_as_the_origin_receives_them(proxy):
    seen = received(proxy, "/req/echo")
    assert values(seen, "x-env") == ["prod"], seen  # both client values replaced, whatever their case
    assert values(seen, "user-agent") == ["fastproxy-test"], seen
    assert values(seen, "x-tag") == ["c", "a", "b"], seen  # appended after the client's value
    assert values(seen, "via") == ["1.1 edge"], seen
    assert values(seen, "cookie") == [] and values(seen, "x-debug") == [], seen
    assert values(seen, "x-other") == ["kept"], seen
    # what the proxy itself sends is untouched
    assert values(seen, "host") == ["test.local"] and values(seen, "x-forwarded-proto") == ["http"], seen
    assert len(values(seen, "x-request-id")) == 1 and values(seen, "x-forwarded-for"), seen


def test_request_edits_with_a_body_and_on_a_kept_alive_connection(proxy):
    with RawClient(proxy.port) as c:
        r = c.request("POST", "/req/echo", CLIENT_HEADERS, body=b"hello")
        assert r.status == 200 and r.json()["body"] == "hello", r
        assert values([(k.lower(), v) for k, v in r.json()["headers"]], "x-env") == ["prod"], r
        # the next request on the connection, on a route without filters, gets none of them
        r = c.request("GET", "/echo", CLIENT_HEADERS)
        seen = [(k.lower(), v) for k, v in r.json()["headers"]]
        assert values(seen, "x-env") == ["dev", "dev2"] and values(seen, "cookie") == ["a=1", "b=2"], seen
        assert values(seen, "via") == [] and values(seen, "x-tag") == ["c"], seen


def test_request_removal_and_connection_named_headers_together(proxy):
    seen = received(proxy, "/both/echo", [("Connection", "X-Hop"), ("X-Hop", "1"), ("X-Debug", "1"),
                                          ("X-Other", "kept")])
    assert values(seen, "x-hop") == [] and values(seen, "x-debug") == [], seen
    assert values(seen, "x-other") == ["kept"], seen


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_response_headers_set_add_remove_as_the_client_receives_them(proxy, framing):
    with RawClient(proxy.port) as c:
        r = c.request("GET", f"/resp/with_headers?framing={framing}")
        assert (r.status, r.body, r.framing) == (200, b"body\n", framing), r
        assert r.header_all("x-frame-options") == ["DENY"], r
        assert r.header_all("link") == ["</origin.css>; rel=preload", "</a.css>; rel=preload",
                                        "</b.js>; rel=preload"], r
        assert r.header_all("x-powered-by") == [] and r.header_all("etag") == [], r
        assert r.header_all("cache-control") == ["no-store"], r
        assert r.header("server") == "fastproxy" and r.header("date") and r.header("x-request-id"), r
        # the head edits are not left behind for the next response on the worker
        r = c.request("GET", "/with_headers")
        assert r.header_all("x-frame-options") == ["SAMEORIGIN", "ALLOW-FROM x"], r
        assert r.header_all("x-powered-by") == ["php", "again"] and r.header_all("etag") == ['"v1"'], r


def test_response_headers_on_a_head_request(proxy):
    with RawClient(proxy.port) as c:
        c.send(build_request("HEAD", "/resp/with_headers"))
        r = c.read_response("HEAD")
        assert r.status == 200 and r.body == b"" and r.header("content-length") == "5", r
        assert r.header_all("x-frame-options") == ["DENY"] and r.header_all("x-powered-by") == [], r


def test_response_removal_and_connection_named_headers_together(proxy):
    r = fetch(proxy.port, "GET", "/both/hop_named")
    assert r.status == 200 and r.body == b"hop\n", r
    assert r.header_all("x-hop-named") == [] and r.header_all("x-powered-by") == [], r
    assert r.header_all("x-kept") == ["yes"] and r.header_all("connection") == [], r


def test_response_headers_on_a_respond_route(proxy):
    r = fetch(proxy.port, "GET", "/local")
    assert (r.status, r.body) == (200, b"local\n"), r
    assert r.header_all("x-frame-options") == ["DENY"], r
    assert r.header_all("link") == ["</local.css>", "</a.css>; rel=preload", "</b.js>; rel=preload"], r
    assert r.header_all("etag") == [] and r.header_all("content-type") == ["text/plain"], r
    assert r.header("content-length") == "6" and r.header("x-request-id"), r


def test_fastproxy_own_errors_are_not_edited(proxy):
    r = fetch(proxy.port, "GET", "/dead/echo")
    assert r.status == 502 and r.json()["status"] == 502, r
    assert r.header_all("x-frame-options") == [] and r.header_all("link") == [], r
    # a respond route's answer is replaced by the error found as its body is read, edits and all
    with RawClient(proxy.port) as c:
        c.send(build_request("POST", "/local", [("Transfer-Encoding", "chunked")], chunked(b"x" * 2048)))
        r = c.read_response()
    assert r.status == 413 and r.json()["status"] == 413, r
    assert r.header_all("x-frame-options") == [] and r.header_all("etag") == [], r


def test_routes_without_filters_are_unchanged(proxy):
    seen = received(proxy, "/echo")
    assert values(seen, "x-env") == ["dev", "dev2"] and values(seen, "cookie") == ["a=1", "b=2"], seen
    assert values(seen, "user-agent") == ["curl/8"] and values(seen, "x-debug") == ["1", "2"], seen
    r = fetch(proxy.port, "GET", "/with_headers")
    assert r.header_all("x-frame-options") == ["SAMEORIGIN", "ALLOW-FROM x"], r
    assert r.header_all("link") == ["</origin.css>; rel=preload"], r


# -- configuration -------------------------------------------------------------------------

def check(make_proxy, route_extra: dict):
    p = make_proxy({"upstreams": {"app": upstream("127.0.0.1:9")},
                    "routes": [{"path_prefix": "/", "upstream": "app", **route_extra},
                               {"path": "/r", "respond": respond(200, "r")}]}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    return out.returncode, [line.split(": ", 1)[1] for line in out.stderr.splitlines() if ": routes[" in line]


def test_managed_and_hop_by_hop_names_are_refused(make_proxy):
    code, problems = check(make_proxy, {
        "request_headers": {"set": {"Connection": "close", "Host": "other"}, "add": {"X-Request-ID": "1"},
                            "remove": ["Transfer-Encoding", "x-forwarded-for", "Content-Length"]},
        "response_headers": {"set": {"Server": "x", "keep-alive": "1"}, "add": {"Date": "now"},
                             "remove": ["Upgrade", "X-Request-Id"]},
    })
    assert code == 1
    assert problems[0] == "routes[0].request_headers.set.Connection: hop-by-hop header cannot be set", problems
    assert [p.split(":")[0] for p in problems] == [
        "routes[0].request_headers.set.Connection", "routes[0].request_headers.set.Host",
        "routes[0].request_headers.add.X-Request-ID", "routes[0].request_headers.remove[0]",
        "routes[0].request_headers.remove[1]", "routes[0].request_headers.remove[2]",
        "routes[0].response_headers.set.Server", "routes[0].response_headers.set.keep-alive",
        "routes[0].response_headers.add.Date", "routes[0].response_headers.remove[0]",
        "routes[0].response_headers.remove[1]"], problems
    assert "hop-by-hop header cannot be removed" in problems[3], problems
    assert "main.server_header" in problems[6], problems


def test_bad_values_duplicates_and_misplaced_transforms_are_refused(make_proxy):
    code, problems = check(make_proxy, {
        "request_headers": {"set": {"X-A": "1"}, "add": {"x-a": "2", "X-B": ["ok", "bad\r\nX-Evil: 1"]},
                            "remove": ["X-A", "Bad Name"], "replace": {}},
        "response_headers": {"set": {"X-C": "", "X-D": "nul\u0000"}},
    })
    assert code == 1
    assert problems == [
        "routes[0].request_headers.replace: unknown key",
        "routes[0].request_headers.add.X-B[1]: must not contain control characters other than tab",
        'routes[0].request_headers.remove[1]: "Bad Name" is not a valid header name',
        "routes[0].response_headers.set.X-C: must not be empty",
        "routes[0].response_headers.set.X-D: must not contain control characters other than tab",
    ], problems
    code, problems = check(make_proxy, {
        "request_headers": {"set": {"X-A": "1"}, "add": {"x-a": "2"}, "remove": ["X-A"]}})
    assert code == 1
    assert problems == [
        "routes[0].request_headers.add.x-a: x-a is also in set.X-A: a transform names each header once "
        "(set replaces its values, add appends, remove drops them)",
        "routes[0].request_headers.remove[0]: X-A is also in set.X-A: a transform names each header once "
        "(set replaces its values, add appends, remove drops them)"], problems
    p = make_proxy({"routes": [{"path": "/r", "respond": respond(200, "r"),
                                "request_headers": {"set": {"X-A": "1"}}}]}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode == 1 and ("routes[0].request_headers: has no effect on a route that answers with "
                                    "`respond` (nothing is sent upstream)") in out.stderr, out
