"""Request paths are normalised before routing (RFC 3986 6.2.2), and the upstream gets the
same normal form, so an encoded or doubled path cannot take another route than the one
the upstream serves (issue 7 item 4). See docs/http.md, "Request paths"."""
from __future__ import annotations

import json

import pytest

from harness.client import RawClient, build_request
from harness.origin import Origin
from harness.proxy import upstream, wait_until

ROUTES = [
    {"name": "all", "path_prefix": "/", "upstream": "origin"},
    {"name": "small", "path_prefix": "/small/", "upstream": "small", "max_body_size": "1k"},
]


@pytest.fixture(scope="module")
def small_origin():
    with Origin("small") as o:
        yield o


def path_proxy(factory, origin, small_origin, **main):
    return factory({"main": {"workers": 1, **main}, "access_log": {"format": "json", "flush": "100ms"},
                    "upstreams": {"origin": upstream(origin), "small": upstream(small_origin)},
                    "routes": ROUTES})


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin, small_origin):
    return path_proxy(module_proxy_factory, module_origin, small_origin)


@pytest.fixture(scope="module")
def slashes_proxy(module_proxy_factory, module_origin, small_origin):
    return path_proxy(module_proxy_factory, module_origin, small_origin, allow_encoded_slashes=True)


def send(proxy, target: str, body: bytes = b"", method: str = "GET"):
    with RawClient(proxy.port) as c:
        c.send(build_request(method, target, body=body))
        return c.read_response(method)


def target_seen(proxy, target: str) -> str:
    """The request target the upstream received for `target`."""
    r = send(proxy, target)
    assert r.status == 200, (target, r)
    return r.json()["target"]


BYPASSES = ["/x/%2e%2e/small/y", "/x/%2E%2E/small/y", "/x/.%2e/small/y", "//small/y"]


@pytest.mark.parametrize("target", BYPASSES)
def test_encoded_paths_take_the_route_the_upstream_serves(proxy, small_origin, target):
    r = send(proxy, target, body=b"b" * 2048, method="POST")
    assert r.status == 413, r  # /small/'s 1k limit, not /'s
    r = send(proxy, target)
    assert r.status == 200 and r.header("x-origin") == "small", r
    assert r.json()["target"] == "/small/y", r


NORMAL_FORMS = [
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/.", "/"),
    ("/a//b///c//", "/a/b/c/"),
    ("/a/b/%2E%2E/%2e%2E/c", "/c"),
    ("/a/..%2e/b", "/a/.../b"),
    ("/%7Euser/%41%62c%2d%5F%2E", "/~user/Abc-_."),
    ("/sp%20ace/%c3%a9", "/sp%20ace/%C3%A9"),  # other escapes stay, in upper case
    ("/%25%32%65", "/%252e"),  # one decoding pass: "%25" stays, so nothing turns into a dot
    ("/a/%2e/b?q=/../%2e%2e//x", "/a/b?q=/../%2e%2e//x"),  # the query is not touched
    ("http://test.local/a/%2e%2e/b?q", "/b?q"),  # absolute form: normalised the same way
    ("http://test.local?q=1", "/?q=1"),
]


@pytest.mark.parametrize("target,seen", NORMAL_FORMS)
def test_upstream_gets_the_normal_form(proxy, target, seen):
    assert target_seen(proxy, target) == seen


def test_absolute_form_routes_on_its_normal_form(proxy):
    r = send(proxy, "http://test.local/x/%2e%2e/small/y", body=b"b" * 2048, method="POST")
    assert r.status == 413, r


@pytest.mark.parametrize("target", [
    "/a/b.c/-_~!$&'()*+,;=:@/%20%C3%A9/.../..a/a../x%2F?q=%2e%2e//../%zz",
    "/", "/a/", "/a%2Fb?x",
])
def test_path_in_normal_form_arrives_byte_identical(proxy, slashes_proxy, target):
    p = slashes_proxy if "%2F" in target.split("?")[0] else proxy
    assert target_seen(p, target) == target


REFUSED = [
    "/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/a\\b",  # separators an upstream may decode
    "/a%00b", "/a/%00",  # NUL
    "/a%zz", "/a%4", "/a%", "/a%g0/b", "/a%0",  # malformed escapes
    "/..", "/../x", "/a/../../x", "/%2e%2e/x", "/a/.%2E/./..",  # above the root
]


@pytest.mark.parametrize("target", REFUSED)
def test_refused_paths_get_400(proxy, module_origin, small_origin, target):
    marked = target + "?refused"
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", marked))
        r = c.read_response()
        assert r.status == 400, r
        assert r.json()["request_id"] == r.header("x-request-id"), r
        assert c.is_closed()
    for o in (module_origin, small_origin):
        assert not o.find_requests(lambda q: q.target == marked), "a refused path was forwarded"


@pytest.mark.parametrize("target,seen", [
    ("/a%2Fb/c", "/a%2Fb/c"),
    ("/a%2fb", "/a%2Fb"),
    ("/a%5cb/%2e/c", "/a%5Cb/c"),
    ("/a\\b", "/a\\b"),
])
def test_allow_encoded_slashes_passes_them_encoded(slashes_proxy, target, seen):
    assert target_seen(slashes_proxy, target) == seen


@pytest.mark.parametrize("target", ["/a%00b", "/a%2", "/../x"])
def test_allow_encoded_slashes_still_refuses_the_rest(slashes_proxy, target):
    assert send(slashes_proxy, target).status == 400


def test_access_log_keeps_the_target_as_received(proxy):
    sent = {"/x/%2e%2e/small/y?log=1", "http://test.local//small/y?log=2", "/small/y?log=3"}
    for target in sent:
        assert send(proxy, target).status == 200

    def logged():
        uris = {json.loads(line)["uri"] for line in proxy.access_log.read_text().splitlines()}
        return sent <= uris
    wait_until(logged, 10, message="access-log lines with the targets as received")



def test_route_paths_that_can_never_match_are_config_errors(make_proxy, origin):
    paths = {"/%7euser/": "%7e (decoded to '~')", "/a//b": "'//' (slashes are merged)",
             "/a/./b": "a '.' or '..' segment (they are resolved)", "/a%2fb": "%2f (written %2F)",
             "/a%zz": "%zz (requests with it are refused)", "/a%00": "%00 (requests with it are refused)"}
    p = make_proxy({"upstreams": {"o": upstream(origin)},
                    "routes": [{"path_prefix": path, "upstream": "o"} for path in paths]}, start=False)
    p.write_config()
    result = p.run_cli("-t", "-c", str(p.config_path))
    assert result.returncode != 0, result
    for index, (path, problem) in enumerate(paths.items()):
        assert (f'routes[{index}].path_prefix: "{path}" can never match: request paths are matched in '
                f"normal form (docs/http.md, Request paths), and this has {problem}") in result.stderr, result.stderr
