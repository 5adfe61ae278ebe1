"""Refused requests in the logs.

Values the client chooses are cut at 2 KiB in the access and error logs, with a marker.
"""
from __future__ import annotations

import json

import pytest

from harness.client import fetch
from harness.proxy import upstream, wait_until

CUT = "\u2026"  # the marker of a value cut in the logs


def log_line(path, *needles: str) -> str:
    def find():
        text = path.read_text() if path.exists() else ""
        return next((l for l in text.splitlines() if all(n in l for n in needles)), None)
    return wait_until(find, 10, message=f"a line with {needles} in {path.name}")


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
