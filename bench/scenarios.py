"""The benchmark scenarios, as data.

A scenario says what wrk sends (path, Lua script, extra headers, connections), which
targets the default run measures it on, and what it adds to their configurations. The
runner knows nothing else about them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

ALL_TARGETS = ("direct", "fastproxy-1w", "fastproxy-2w", "nginx-1w", "nginx-2w",
               "haproxy-1t", "haproxy-2t")
# The floor is judged on one worker each, so most scenarios run on these alone to keep the
# default set under ten minutes; get-100b also shows what a second worker brings.
ONE_WORKER = ("direct", "fastproxy-1w", "nginx-1w", "haproxy-1t")
PROXIES = ("fastproxy-1w", "nginx-1w", "haproxy-1t")  # for what the origin cannot do (TLS)
RELOADABLE = ("fastproxy-1w", "nginx-1w", "haproxy-1t")
# balancing over several servers, where workers that share what they learn should differ
BALANCERS = ("fastproxy-1w", "fastproxy-2w", "nginx-1w", "nginx-2w", "haproxy-1t", "haproxy-2t")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: str
    connections: int = 64
    script: Optional[str] = None  # file in bench/lua/ defining the request
    headers: Tuple[str, ...] = ()  # extra "Name: value" headers on every request
    unit: str = "req/s"  # headline figure: "req/s", or "MB/s" for large bodies
    targets: Tuple[str, ...] = ONE_WORKER  # measured by default
    reload_every: float = 0.0  # seconds between reloads of the target during the run
    # a directory of bench/configs/ holding a snippet per target's config file, inserted where
    # that file says {{snippet}}: the targets of this scenario run with it
    snippets: Optional[str] = None
    response_headers: Tuple[str, ...] = ()  # "name: value" each proxy must answer with (checked)
    # requests a client connection carries before the client closes it (its last one sends
    # Connection: close); 0: kept for the whole run. Read by bench.callgrind and bench.syscalls,
    # wrk gets it from the scenario's headers or script
    per_connection: int = 0
    # clients connect over TLS (1.3; an ECDSA P-256 certificate the run makes, the same for
    # every proxy): the proxies' listeners terminate it
    tls: bool = False
    upstreams: int = 1  # servers each proxy balances over: the origin on that many ports
    # with several upstreams: the last one is killed (SIGKILL) this far into each measured run
    # (a fraction of its duration), and started again once the run is over; 0: never
    kill_one_at: float = 0.0


def compressed(coding: str, size: str) -> Scenario:
    """GET `size` of JSON that each proxy compresses with `coding` (gzip 5, or zstd 3 where only
    fastproxy can)."""
    gzip = coding == "gzip"
    who = "each proxy compresses it with gzip level 5" if gzip else \
        "fastproxy compresses it with zstd level 3 (nginx and HAProxy: not applicable)"
    return Scenario(f"{coding}-{size}-json", f"GET {size[:-1]} KiB of JSON with Accept-Encoding: {coding}, "
                    f"keep-alive, 64 connections; {who}", f"/{size}.json",
                    headers=(f"Accept-Encoding: {coding}",),
                    targets=ONE_WORKER if gzip else ("direct", "fastproxy-1w"),
                    snippets=f"{coding}-16k-json", response_headers=(f"Content-Encoding: {coding}",))


SCENARIOS = (
    Scenario("get-100b", "GET 100 B, keep-alive, 64 connections", "/100b",
             targets=ALL_TARGETS),
    # wrk sends no Connection header; browsers and most HTTP/1.1 clients send this one
    Scenario("get-100b-ka", "GET 100 B, keep-alive, 64 connections; the client sends "
             "Connection: keep-alive", "/100b", headers=("Connection: keep-alive",)),
    Scenario("get-16k", "GET 16 KiB, keep-alive, 64 connections", "/16k"),
    Scenario("get-1m", "GET 1 MiB, keep-alive, 64 connections", "/1m",
             unit="MB/s"),
    Scenario("post-64k", "POST 64 KiB body, keep-alive, 64 connections", "/post",
             script="post.lua"),
    Scenario("new-conn", "GET 100 B, a new connection per request, 64 connections", "/100b",
             headers=("Connection: close",), per_connection=1),
    Scenario("conn-10", "GET 100 B, a new connection per 10 requests (the 10th sends Connection: "
             "close), 64 connections", "/100b", script="conn-10.lua", per_connection=10),
    Scenario("c2000", "GET 100 B, 2000 concurrent keep-alive connections", "/100b",
             connections=2000),
    Scenario("chunked", "GET ~16 KiB sent chunked by the origin, keep-alive, 64 connections",
             "/chunked"),
    Scenario("headers-transform", "GET 100 B, keep-alive, 64 connections; each proxy sets 2 request "
             "headers, removes 1 and sets 2 response headers", "/100b", headers=("X-Debug: 1",),
             snippets="headers-transform",
             response_headers=("X-Frame-Options: DENY", "X-Content-Type-Options: nosniff")),
    # nginx and HAProxy have no zstd: fastproxy alone there (compare its CPU and bytes with the
    # gzip scenario's nginx figures); the 64k scenarios use the 16k ones' snippets (same levels)
    *(compressed(coding, size) for size in ("16k", "64k") for coding in ("gzip", "zstd")),
    # files served by the proxy itself from the origin's directory (direct: the origin nginx
    # serving them); HAProxy serves no files: not applicable
    Scenario("static-16k", "GET a 16 KiB file the proxy serves itself, keep-alive, 64 connections",
             "/static/16k", targets=("direct", "fastproxy-1w", "nginx-1w"), snippets="static"),
    Scenario("static-1m", "GET a 1 MiB file the proxy serves itself, keep-alive, 64 connections",
             "/static/1m", unit="MB/s", targets=("direct", "fastproxy-1w", "nginx-1w"), snippets="static"),
    Scenario("tls-keepalive", "GET 100 B over TLS 1.3, keep-alive, 64 connections", "/100b",
             targets=PROXIES, tls=True),
    Scenario("tls-handshake", "GET 100 B over TLS 1.3, a new connection (a full handshake) per "
             "request, 64 connections", "/100b", headers=("Connection: close",), per_connection=1,
             targets=PROXIES, tls=True),
    # failed requests (the errors column) and req/s while one of 4 servers dies: fastproxy with
    # shared passive health, active checks and retries, nginx with max_fails, HAProxy with check
    Scenario("lb-failover", "GET 100 B, keep-alive, 64 connections, balanced over 4 upstream servers; "
             "one is killed half-way through each run", "/100b", targets=BALANCERS,
             snippets="lb-failover", upstreams=4, kill_one_at=0.5),
    Scenario("reload", "GET 100 B, keep-alive, 64 connections, target reloaded every second",
             "/100b", targets=RELOADABLE, reload_every=1.0),
)

BY_NAME = {s.name: s for s in SCENARIOS}
