"""[upstreams.NAME]: the keys of an upstream and of its servers, health checks and queue, the
checks that span them (host names resolved here, at load and on every reload), and the build
of runtime.Upstream. Load balancing, health and retries at run time: docs/upstreams.md.
"""
from __future__ import annotations

import json
import os
import re
import socket
from typing import Dict, List, Tuple

from . import upstream_tls
from .runtime import Address, HealthCheck, Queue, Server, Upstream
from .schema import (
    NAMED, OFF, REQUIRED, SOURCE, Boolean, Choice, Duration, HostPort, Integer, Invalid, Key, Kind, ListOf,
    TABLE, Method, Report, Section, Size, String, Table, check_table)

BALANCE = ("round_robin", "least_conn", "random_two", "ip_hash", "hash")
RETRY_ON = ("error", "timeout", "reset", "502", "503", "504")
# hash_key: what a request is hashed on with balance = "hash"
_HASH_KEY = re.compile(r"remote_addr|path|uri|(header|cookie|query):([!#$%&'*+.^_`|~0-9A-Za-z-]+)")


class HashKey(Kind):
    name = '"remote_addr", "path", "uri", "header:NAME", "cookie:NAME" or "query:NAME"'
    types = (str,)

    def convert(self, value):
        match = _HASH_KEY.fullmatch(value)
        if not match:
            raise Invalid(f"{json.dumps(value)} is not one of {self.name}")
        # header names compare case-insensitively; cookie and query names as written
        return value if match[1] != "header" else "header:" + match[2].lower()


class StatusRanges(Kind):
    """Statuses as "200-399", "200,204,300-399": a tuple of inclusive (low, high) pairs."""
    name = 'status ranges ("200-399", "200,204")'
    types = (str,)

    def convert(self, value):
        ranges = []
        for part in value.split(","):
            low, dash, high = part.strip().partition("-")
            if not (low.isdigit() and (high.isdigit() if dash else True)):
                raise Invalid(f"{json.dumps(value)} is not a list of statuses or status ranges")
            pair = (int(low), int(high) if dash else int(low))
            if not 100 <= pair[0] <= pair[1] <= 599:
                raise Invalid(f"{json.dumps(part.strip())} is not a range of statuses 100..599")
            ranges.append(pair)
        return tuple(ranges)


_SCHEMES = {"https": 443, "http": 80}  # a server's scheme, and its port when the address has none


class ServerAddress(Kind):
    """A server's address: "host:port", or "https://host[:port]" (TLS) and "http://host[:port]",
    as a (scheme, Address) pair, scheme "" when none was written."""
    name = '"host:port" or "https://host[:port]"'
    types = (str,)

    def convert(self, value):
        scheme, separator, rest = value.partition("://")
        if not separator:
            return "", HostPort(listen=False)(value)
        if scheme.lower() not in _SCHEMES:
            raise Invalid(f'{json.dumps(scheme + separator)} is not "https://" or "http://"')
        if "/" in rest:
            raise Invalid(f"{json.dumps(value)}: a server is an address, without a path")
        if rest.endswith("]") or ":" not in rest.rpartition("]")[2]:
            rest = f"{rest}:{_SCHEMES[scheme.lower()]}"
        return scheme.lower(), HostPort(listen=False)(rest)


SERVER = Section("server", "[upstreams.NAME] servers = [{ ... }]", TABLE, OFF, (
    Key("address", ServerAddress(), REQUIRED, '`"host:port"`, or `"https://host[:port]"` for TLS (port '
        "443 when none is written; `\"http://host[:port]\"`, port 80, is plain); a host name is resolved "
        "when the configuration loads (and on every reload), one server per address it resolves to."),
    Key("weight", Integer(1, 1000), 1, "Share of the requests relative to the other servers."),
    Key("max_conns", Integer(0), 0, "Most connections in use to it at once, counted across all workers "
        "(idle pooled ones not included); 0: no limit. A server at its limit is skipped; when all are, "
        "the request waits in the upstream's `queue`."),
    Key("backup", Boolean(), False, "Used only while no other server can take the request."),
    Key("down", Boolean(), False, "Taken out of service (kept in `/status` as down, cause `config`)."),
    Key("slow_start", Duration(zero=True), "0s", "After coming back up, its weight rises from a tenth to the "
        "full weight over this long; 0: at once."),
), "A server given as a table instead of a `\"host:port\"` string.")


class ServerEntry(Kind):
    """A `servers` item: "host:port" or a table of SERVER's keys, as a dict of them."""
    name = '"host:port" or server table'
    types = (str, dict)
    section = SERVER  # documented as a nested table

    def convert(self, value):
        if isinstance(value, str):
            ServerAddress()(value)  # a bad string is reported at the item, not at ".address"
            value = {"address": value}
        problems: List[Tuple[str, str]] = []
        values = check_table(SERVER.keys, value, "", lambda path, reason: problems.append(("." + path, reason)))
        if problems:
            raise Invalid(problems=problems)
        values["scheme"], values["address"] = values["address"]
        return values


QUEUE = Section("queue", "[upstreams.NAME] queue", TABLE, OFF, (
    Key("size", Integer(0), 0, "Requests that may wait, per worker, while every server is at `max_conns`; "
        "0: none wait (503 with `Retry-After`)."),
    Key("timeout", Duration(), "5s", "Longest a request waits in the queue (then 503 with `Retry-After`)."),
), "Requests waiting for a server below its `max_conns`.")

HEALTH = Section("health", "[upstreams.NAME.health]", TABLE, OFF, (
    Key("path", String(), REQUIRED, "Path (and query) each server is probed at, e.g. `\"/healthz\"`."),
    Key("method", Method(), "GET", "Method of the probe."),
    Key("host", String(), None, "Host header of the probe.", "the server's address"),
    Key("interval", Duration(), "5s", "Time between two probes of one server (start to start)."),
    Key("timeout", Duration(), "2s", "A probe with no complete response within this (connect included) "
        "fails."),
    Key("healthy_threshold", Integer(1), 2, "Consecutive passed probes that bring a down server up."),
    Key("unhealthy_threshold", Integer(1), 3, "Consecutive failed probes that take an up server down."),
    Key("expect_status", StatusRanges(), "200-399", "Statuses that pass."),
    Key("expect_body", String(), None, "A substring the response body must contain to pass (looked for "
        "in its first 64 KiB).", "any body"),
), "Active health checks: one checker process probes every server for the whole instance and all "
   "workers follow its verdict. A server not probed yet takes requests; its first probe decides "
   "whether it is up or down, then the thresholds apply (docs/health-checks.md).")

UPSTREAMS = Section("upstreams", "[upstreams.NAME]", NAMED, OFF, (
    Key("servers", ListOf(ServerEntry(), 'array of "host:port" or server tables'), REQUIRED,
        "The servers requests go to; see the server table below."),
    Key("balance", Choice(*BALANCE), "round_robin", "How a server is chosen: `\"round_robin\"` (smooth "
        "weighted, never more than a server's weight in a row), `\"least_conn\"` (fewest connections in use "
        "across all workers, relative to weight), `\"random_two\"` (the less busy of two random servers), "
        "`\"ip_hash\"` (the client's /24 IPv4 or /64 IPv6 network), `\"hash\"` (`hash_key` on a consistent "
        "ring: every worker maps a key to the same server, and removing one of N servers remaps about 1/N "
        "of the keys)."),
    Key("hash_key", HashKey(), "remote_addr", 'What `balance = "hash"` hashes: `"remote_addr"`, `"path"`, '
        '`"uri"` (path and query), `"header:NAME"`, `"cookie:NAME"` or `"query:NAME"` (the value as sent, '
        "not percent-decoded); a request without it hashes as the empty key."),
    Key("queue", Table(QUEUE), {}, "`{ size = 0, timeout = \"5s\" }`: see the queue table below."),
    Key("max_fails", Integer(0), 1, "Failures within `fail_timeout`, summed over all workers, that take a "
        "server out of service for `fail_timeout`; 0: never (no passive health). An upstream of one server "
        "never takes it out (as nginx); when no server is in service, requests are tried on them anyway."),
    Key("fail_timeout", Duration(), "10s", "The window failures are counted in, and how long a server stays "
        "out after `max_fails` of them; then one request probes it before it takes traffic again."),
    Key("fail_status", ListOf(Integer(400, 599), "array of statuses", empty=True), [], "Response statuses "
        "that count as a failure of the server, e.g. `[500, 503]`."),
    Key("retry_on", ListOf(Choice(*RETRY_ON), "array of conditions", empty=True), ["error", "timeout"],
        'When a request is tried again on another server, as long as no byte of the response has reached '
        'the client: `"error"` (connect failed), `"timeout"` (connect, send or read timeout before the '
        'response head), `"reset"` (connection closed or reset, or an invalid response, before the response '
        'head), `"502"`, `"503"`, `"504"` (that status from the server: not relayed, the connection is '
        'closed; the last try\'s answer is relayed whatever it is); `[]`: never. See docs/retries.md.'),
    Key("tries", Integer(1), 2, "Most servers one request is sent to, the first included; 1: no retry. A "
        "stale kept-alive connection found closed is retried on a fresh one without counting as a try."),
    Key("retry_timeout", Duration(zero=True), "0s", "No retry starts this long after the first try "
        "began; 0: no bound."),
    Key("retry_non_idempotent", Boolean(), False, "Also retry POST, PATCH and LOCK requests once they may "
        "have reached a server (they may have taken effect); a failed connect is retried for any method."),
    Key("retry_buffer", Size(zero=True), "64k", "A request body is kept, while what was sent of it fits in "
        "this, so that a retry can send it again; once more has gone to a server, a failure is not "
        "retried. 0: bodies are not kept."),
    Key("keepalive", Integer(0), 32, "Idle connections each worker keeps open to this upstream for reuse; "
        "0: none."),
    Key("keepalive_timeout", Duration(), "60s", "An idle kept connection is closed after this."),
    Key("connect_timeout", Duration(), "60s", "Time allowed to connect to a server (504 after it)."),
    Key("read_timeout", Duration(), "60s", "Longest a server may stay silent while answering (504 "
        "after it)."),
    Key("send_timeout", Duration(), "60s", "Longest a server may go without reading while a request "
        "is sent to it."),
    Key("health", Table(HEALTH), None, "Active health checks: see the health table below.", "none"),
    Key("tls", Table(upstream_tls.TLS), None, "TLS to the servers: see the tls table below. With it, or "
        "with an `https://` server, every server of the upstream uses TLS (a plain one is refused).",
        "plain, unless a server is `https://`"),
), "A named group of servers that routes send requests to. NAME is letters, digits, `_`, `-` and `.`.")

def resolve(address: Address) -> Tuple[Address, ...]:
    """The addresses a server's host stands for, in the resolver's order, without repeats;
    raises Invalid with the resolver's reason."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise Invalid(f"cannot resolve {json.dumps(address.host)}: {error.strerror}") from None
    return tuple(dict.fromkeys(Address(info[4][0], address.port) for info in infos))


def check(tree: dict, report: Report) -> None:
    """Resolve every server's host (kept in the tree for build) and check what spans keys."""
    for name, upstream in (tree.get("upstreams") or {}).items():
        if upstream is None or upstream.get("servers") is None:
            continue
        where = f"upstreams.{name}"
        seen: Dict[Address, int] = {}
        for index, server in enumerate(upstream["servers"]):
            try:
                server["resolved"] = resolve(server["address"])
            except Invalid as error:
                report(f"{where}.servers[{index}].address", str(error))
                continue
            for address in server["resolved"]:
                if address in seen:
                    report(f"{where}.servers[{index}].address",
                           f"{address} is already servers[{seen[address]}]")
                    break
                seen[address] = index
        if upstream["servers"] and all(server["backup"] or server["down"] for server in upstream["servers"]):
            report(f"{where}.servers", "needs at least one server that is neither backup nor down")
        _check_tls(upstream, where, os.path.dirname(tree[SOURCE]), report)


_CONTEXT = "__context__"  # a checked upstream's client SSL context, or None (no key has that name)


def _check_tls(upstream: dict, where: str, base: str, report: Report) -> None:
    """Whether the upstream's servers use TLS (a `tls` table or an https:// server: then all of
    them do), and its SSL context, kept in the tree for build."""
    upstream[_CONTEXT] = None
    if "tls" not in upstream:
        return  # a bad table, already reported
    schemes = [server["scheme"] for server in upstream["servers"]]
    if upstream["tls"] is None and "https" not in schemes:
        return
    cause = "its tls table" if upstream["tls"] is not None else f"servers[{schemes.index('https')}] (https://)"
    for index, scheme in enumerate(schemes):
        if scheme == "http" or (scheme == "" and upstream["tls"] is None):
            report(f"{where}.servers[{index}].address", f"a plain server, while {cause} makes the upstream "
                                                        f"TLS: its servers all use TLS or none does")
    upstream[_CONTEXT] = upstream_tls.build(upstream["tls"], where, base, report)


def build(name: str, upstream: dict) -> Upstream:
    context = upstream[_CONTEXT]
    # TLS: the name each server is verified against and sends as SNI (never the IP it resolved to)
    server_name = (upstream["tls"] or {}).get("server_name")
    servers = tuple(
        Server(address=address, name=str(server["address"]), weight=server["weight"],
               max_conns=server["max_conns"], backup=server["backup"], down=server["down"],
               slow_start=server["slow_start"],
               tls_name=None if context is None else server_name or server["address"].host)
        for server in upstream["servers"] for address in server["resolved"])
    health = upstream["health"]
    return Upstream(
        name=name,
        servers=servers,
        **{key: value for key, value in upstream.items()
           if key not in ("servers", "queue", "health", "tls", _CONTEXT)},
        tls=context,
        queue=Queue(**upstream["queue"]),
        health=None if health is None else HealthCheck(
            **{**health, "path": health["path"].encode("latin-1"), "method": health["method"].encode(),
               "host": None if health["host"] is None else health["host"].encode("latin-1"),
               "expect_body": None if health["expect_body"] is None else health["expect_body"].encode()}),
    )
