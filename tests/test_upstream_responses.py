"""What reaches the client of an upstream's response: end-to-end headers pass whatever
their name."""
from __future__ import annotations

import pytest

from harness.client import RawClient
from harness.proxy import upstream

END_TO_END = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"),
              ("X-Forwarded-Host", "app.example"), ("User-Agent", "origin-agent/1"),
              ("Referer", "https://app.example/from"), ("Host", "app.example"),
              ("Expect", "nothing-really")]


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    module_origin.handlers["end_to_end"] = lambda conn, req: conn.respond(200, b"ok", headers=END_TO_END)
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


def test_end_to_end_response_headers_pass(proxy):
    with RawClient(proxy.port) as c:
        r = c.request("GET", "/end_to_end")
    assert r.status == 200, r
    for name, value in END_TO_END:
        assert r.header_all(name) == [value], (name, r.headers)
