"""Refused requests in the logs.

Each refusal (400/408/413/414/417/431/505) leaves one info line in the error log, at
most 10 a second per worker; the access log shows the method and version the client
sent; values the client chooses are cut at 2 KiB in both logs, with a marker.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from harness.client import RawClient, build_request, fetch
from harness.proxy import upstream, wait_until

LIMITS = {"max_header_size": "4k", "max_uri_size": "2k", "max_body_size": "1k",
          "client_header_timeout": "1s", "client_body_timeout": "1s"}
CUT = "\u2026"  # the marker of a value cut in the logs


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "main": {"workers": 1, **LIMITS},
        "access_log": {"flush": "100ms"},
        "upstreams": {"origin": upstream(module_origin)},
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "origin"}],
    })


def refused(proxy, raw: bytes, status: int) -> str:
    """Send raw, expect `status` and a close; returns the response's request id."""
    with RawClient(proxy.port, timeout=10) as c:
        c.send(raw, stop_on_answer=True)
        r = c.read_response()
        assert r.status == status, r
        assert c.is_closed(5)
    return r.header("x-request-id")


def log_line(path, *needles: str) -> str:
    def find():
        text = path.read_text() if path.exists() else ""
        return next((l for l in text.splitlines() if all(n in l for n in needles)), None)
    return wait_until(find, 10, message=f"a line with {needles} in {path.name}")


CASES = {
    "bad header": (b"GET /x HTTP/1.1\r\nHost: t\r\nBad\x01Name: v\r\n\r\n", 400, "invalid request: "),
    "no host": (b"GET /x HTTP/1.1\r\n\r\n", 400, "HTTP/1.1 request without Host"),
    "empty host": (b"GET /x HTTP/1.1\r\nHost: \r\n\r\n", 400, "empty Host"),
    "stray CR": (b"\rGET /x HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bytes other than empty lines"),
    "long target": (build_request("GET", "/x?" + "a" * 3000), 414, "request target longer than max_uri_size"),
    "big head": (build_request("GET", "/x", [("X-Big", "b" * 5000)]), 431,
                 "request head larger than max_header_size"),
    "big body": (build_request("POST", "/x", [("Content-Length", "2000")]), 413,
                 "body larger than max_body_size"),
    "expect": (build_request("GET", "/x", [("Expect", "magic")]), 417, "Expect other than 100-continue"),
    "HTTP/2.0": (b"GET /x HTTP/2.0\r\nHost: t\r\n\r\n", 505, "HTTP/2.0"),
    "head timeout": (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Half: ", 408,
                     "request head not complete within client_header_timeout"),
    "body timeout": (build_request("POST", "/x", [("Content-Length", "100")]) + b"ten bytes!", 408,
                     "request body stalled for client_body_timeout"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_request_leaves_an_info_line(proxy, case):
    raw, status, reason = CASES[case]
    request_id = refused(proxy, raw, status)
    line = log_line(proxy.error_log, request_id)
    assert re.search(r"\[info\] \d+#0: refused request with %d: " % status, line), line
    assert reason in line and "client 127.0.0.1" in line, line


def test_refusals_in_the_access_log_show_what_the_client_sent(proxy):
    ids = {
        '"GET /x HTTP/1.1" 400': refused(proxy, CASES["bad header"][0], 400),
        '"GET /x HTTP/1.1" 431': refused(proxy, CASES["big head"][0], 431),
        '"GET /x HTTP/2.0" 505': refused(proxy, CASES["HTTP/2.0"][0], 505),
        '"GET /x HTTP/1.1" 408': refused(proxy, CASES["head timeout"][0], 408),
        '"- - -" 400': refused(proxy, CASES["stray CR"][0], 400),  # nothing of it was read
    }
    for expected, request_id in ids.items():
        assert expected in log_line(proxy.access_log, request_id)


def test_a_request_timed_out_mid_body_is_logged_once(proxy):
    request_id = refused(proxy, CASES["body timeout"][0], 408)
    assert fetch(proxy.port, "GET", "/echo", [("X-Request-ID", "after-the-408")]).status == 200
    log_line(proxy.access_log, "after-the-408")  # every line about the 408 is written by now
    lines = [l for l in proxy.access_log.read_text().splitlines() if request_id in l]
    assert len(lines) == 1, lines


def test_refusal_lines_are_rate_limited(make_proxy, origin):
    p = make_proxy({"upstreams": {"o": upstream(origin)}, "routes": [{"path_prefix": "/", "upstream": "o"}]})
    burst = 60
    for _ in range(burst):
        refused(p, b"GET /x HTTP/1.1\r\n\r\n", 400)
    time.sleep(1.1)  # a new second of the worker's rate window: the count of those left out is logged
    refused(p, b"GET /x HTTP/1.1\r\n\r\n", 400)
    unlogged = log_line(p.error_log, "more refused requests were not logged")
    text = p.error_log.read_text()
    logged = text.count("refused request with 400")
    left_out = sum(int(n) for n in re.findall(r"(\d+) more refused requests were not logged", text))
    assert 10 <= logged < burst and left_out > 0, (logged, left_out, unlogged)
    assert logged + left_out == burst + 1


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_long_values_are_cut_in_both_logs(make_proxy, origin, fmt):
    p = make_proxy({"main": {"max_uri_size": "128k", "max_header_size": "256k"},
                    "access_log": {"format": fmt, "flush": "100ms"},
                    "upstreams": {"o": upstream(origin)}, "routes": [{"path_prefix": "/", "upstream": "o"}]})
    target = "/echo?" + "t" * (64 * 1024)
    agent = "a" * 5000
    assert fetch(p.port, "GET", target, [("X-Request-ID", "long-one"), ("User-Agent", agent)]).status == 200
    line = log_line(p.access_log, "long-one")
    assert len(line) < 3 * 2048 + 1024, len(line)
    if fmt == "json":
        rec = json.loads(line)
        assert rec["uri"] == target[:2048] + CUT and rec["user_agent"] == agent[:2048] + CUT, rec
    else:
        assert f'"GET {target[:2048]}{CUT} HTTP/1.1" 200 ' in line
        assert f'"{agent[:2048]}{CUT}"' in line
    # an upstream error names the request in the error log: cut the same way
    assert fetch(p.port, "GET", "/reset?" + "r" * 10000, [("X-Request-ID", "long-two")]).status == 502
    line = log_line(p.error_log, "long-two")
    assert f'"GET /reset?{"r" * 2041}{CUT}"' in line, line[:300]


def test_max_header_size_counts_the_request_line(proxy):
    """max_header_size (4k here) covers the request line too, as docs/config.md says."""
    headers = [("X-Fill", "f" * 2500)]
    target = "/echo?" + "u" * 1800  # within max_uri_size (2k)
    assert fetch(proxy.port, "GET", "/echo", headers).status == 200
    assert fetch(proxy.port, "GET", target).status == 200
    refused(proxy, build_request("GET", target, headers), 431)
