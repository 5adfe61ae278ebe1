"""Reading the metrics zone: /metrics as Prometheus text and /status as a dict.

Runs in whichever worker answers an admin request (or anywhere else the zone is mapped) and
never writes. It sums the counter slots of every worker, live or dead, so any worker gives the
same totals, and reads names and counters in one seqlock read (MetricsZone.snapshot), so a
reload that reclaims a name is seen either wholly or not at all. A slot may be read a few
increments behind another (its owner keeps counting while we sum); each value read is whole,
since every field is one aligned 8-byte word.

The exposition is written by hand rather than with prometheus_client: that library keeps its
metrics in per-process registries, while ours are summed from shared slots (docs/metrics.md).

Per-server state needs the configuration too (weights, backup, down, whether checks run): the
worker passes what its runtime says, once, as configured_servers() builds it; the rest (health,
connections, counters) is read from the zone.
"""
from __future__ import annotations

import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

from fastproxy._core import SERVER_REMOVED_FLAG as SERVER_REMOVED

from . import layout as L

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHECK_UP, CHECK_DOWN = (L.CHECK_STATE_NAMES.index(name) for name in ("up", "down"))


class ConfiguredServer(NamedTuple):
    upstream: str
    checked: bool  # the upstream has [upstreams.NAME.health]
    server: object  # config.runtime.Server
    key: str  # its name in the zone (Upstream.server_key)


def configured_servers(runtime) -> Tuple[ConfiguredServer, ...]:
    """The servers of a worker's runtime with their names in the zone, in config order."""
    return tuple(ConfiguredServer(upstream.name, upstream.health is not None, server,
                                  upstream.server_key(server))
                 for upstream in runtime.upstreams for server in upstream.servers)


def server_state(configured: ConfiguredServer, state: dict, now_us: int) -> Tuple[str, str, float]:
    """(state, cause, effective weight) of a configured server: "up", "down" (cause
    "config", "active" or "passive"), "backup", "draining" or "unknown"."""
    server = configured.server
    if state["flags"] & SERVER_REMOVED:
        return "draining", None, 0
    if server.down:
        return "down", "config", 0
    if state["check_state"] == CHECK_DOWN:
        return "down", "active", 0
    if state["down_until_us"] > now_us:
        return "down", "passive", 0
    weight = server.weight
    ramped = now_us - state["up_since_us"]
    if server.slow_start and state["up_since_us"] and ramped < server.slow_start * 1e6:
        # from a tenth to the whole weight over slow_start (the balance code's ramp)
        weight = round(weight * (0.1 + 0.9 * ramped / (server.slow_start * 1e6)), 2)
    if server.backup:
        return "backup", None, weight
    if configured.checked and state["check_state"] != CHECK_UP:
        return "unknown", None, weight
    return "up", None, weight


def _check(checked: bool, state: dict):
    if not checked:
        return None
    probed = state["check_time_us"] != 0
    return {"time": state["check_time_us"] / 1e6 if probed else None,
            "status": state["check_status"] if probed else None,
            "result": L.CHECK_FAILURE_NAMES[state["check_failure"]] if probed else None}


def upstreams_status(zone, servers: Sequence[ConfiguredServer]) -> Dict[str, dict]:
    """/status "upstreams": per upstream, its servers (those of the configuration, then those
    a reload removed while connections to them are still in use, as "draining")."""
    by_key = {key: (counters, state) for key, counters, state in zone.servers()}
    now_us = int(time.monotonic() * 1e6)  # CLOCK_MONOTONIC, ServerState's clock
    out: Dict[str, dict] = {}
    configured = set()
    for c in servers:
        configured.add(c.key)
        if c.key not in by_key:
            continue  # registered after this worker's generation: not ours to show
        counters, state = by_key[c.key]
        name, cause, weight = server_state(c, state, now_us)
        entry = {"address": str(c.server.address), "name": c.server.name, "state": name}
        if cause is not None:
            entry["cause"] = cause
        entry.update(_server_numbers(counters, state))
        entry.update(weight=c.server.weight, effective_weight=weight, backup=c.server.backup,
                     check=_check(c.checked, state))
        out.setdefault(c.upstream, {"servers": []})["servers"].append(entry)
    for key, (counters, state) in by_key.items():
        if key in configured or not state["flags"] & SERVER_REMOVED or not state["active"]:
            continue
        upstream, _, address = key.partition("/")
        entry = {"address": address, "state": "draining", **_server_numbers(counters, state)}
        out.setdefault(upstream, {"servers": []})["servers"].append(entry)
    return out


def _active(state: dict) -> int:
    """Connections in use; a count left "below zero" by a killed worker reads 0 (see
    MetricsWriter.server_active)."""
    active = state["active"]
    return 0 if active > 1 << 63 else active


def _server_numbers(counters: tuple, state: dict) -> dict:
    requests, failures, _, _, _ = counters
    return {"active": _active(state), "requests": requests,
            "failures": dict(zip(L.UPSTREAM_ERROR_KINDS, failures))}


def status(zone, servers: Sequence[ConfiguredServer] = ()) -> dict:
    """The /status document: who is running, since when, with which config, and the state of
    the upstreams' servers."""
    info = zone.master_info()
    info["uptime_seconds"] = round(max(0.0, time.time() - info["started"]), 3)
    info["workers"] = zone.workers()
    info["upstreams"] = upstreams_status(zone, servers)
    return info


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(out: List[str], name: str, labels: str, buckets: tuple, sum_us: int) -> None:
    """One histogram's series from per-bucket counts (made cumulative here)."""
    cumulative = 0
    for count, bound in zip(buckets, L.DURATION_BUCKETS + (None,)):
        cumulative += count
        le = "+Inf" if bound is None else f"{bound:g}"
        out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}\n')
    out.append(f'{name}_sum{{{labels}}} {sum_us / 1e6!r}\n{name}_count{{{labels}}} {cumulative}\n')


def render_prometheus(zone, servers: Sequence[ConfiguredServer] = ()) -> bytes:
    """Every metric in the Prometheus text exposition format 0.0.4."""
    routes, upstreams, totals = zone.snapshot()
    info = zone.master_info()
    info["workers"] = zone.workers()
    out: List[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

    family("fastproxy_requests_total", "counter",
           "Requests answered, by route and status class.")
    for route, (classes, _, _) in routes:
        label = _label(route)
        for cls, count in enumerate(classes):
            out.append(f'fastproxy_requests_total{{route="{label}",code="{cls + 1}xx"}} {count}\n')

    family("fastproxy_request_duration_seconds", "histogram",
           "Time from the first byte of a request to the last byte of its response.")
    for route, (_, buckets, sum_us) in routes:
        _histogram(out, "fastproxy_request_duration_seconds", f'route="{_label(route)}"', buckets, sum_us)

    bytes_in, bytes_out, accepted, active, codings, static_status, handshakes, tls_failures = totals
    for name, value, help_text in (
        ("fastproxy_bytes_received_total", bytes_in, "Bytes received from clients."),
        ("fastproxy_bytes_sent_total", bytes_out, "Bytes sent to clients."),
        ("fastproxy_connections_accepted_total", accepted, "Client connections accepted."),
    ):
        family(name, "counter", help_text)
        out.append(f"{name} {value}\n")

    for name, field, help_text in (
        ("fastproxy_compressed_responses_total", 0, "Responses compressed, by encoding."),
        ("fastproxy_compressed_bytes_in_total", 1, "Body bytes of compressed responses before compression."),
        ("fastproxy_compressed_bytes_out_total", 2, "Body bytes of compressed responses after compression."),
    ):
        family(name, "counter", help_text)
        for coding, counts in zip(L.CODING_NAMES, codings):
            out.append(f'{name}{{encoding="{coding}"}} {counts[field]}\n')

    family("fastproxy_static_responses_total", "counter", "Answers of static file handlers, by status class.")
    for cls, count in enumerate(static_status):
        out.append(f'fastproxy_static_responses_total{{code="{cls + 1}xx"}} {count}\n')

    family("fastproxy_tls_handshakes_total", "counter",
           "TLS handshakes completed on listeners, by protocol version and whether the session was resumed.")
    for version, counts in zip(L.TLS_VERSION_NAMES, handshakes):
        for resumed, count in zip(("false", "true"), counts):
            out.append(f'fastproxy_tls_handshakes_total{{version="{version}",resumed="{resumed}"}} {count}\n')
    family("fastproxy_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed on listeners, by reason (docs/tls.md).")
    for reason, count in zip(L.TLS_FAILURE_NAMES, tls_failures):
        out.append(f'fastproxy_tls_handshake_failures_total{{reason="{reason}"}} {count}\n')

    family("fastproxy_upstream_requests_total", "counter", "Requests sent to an upstream.")
    for upstream, (requests, _, _, _) in upstreams:
        out.append(f'fastproxy_upstream_requests_total{{upstream="{_label(upstream)}"}} {requests}\n')
    family("fastproxy_upstream_errors_total", "counter",
           "Failed upstream exchanges, by kind: connect (failed or refused), reset, timeout.")
    for upstream, (_, errors, _, _) in upstreams:
        for kind, count in zip(L.UPSTREAM_ERROR_KINDS, errors):
            out.append(f'fastproxy_upstream_errors_total{{upstream="{_label(upstream)}",'
                       f'kind="{kind}"}} {count}\n')
    family("fastproxy_upstream_retries_total", "counter",
           "Requests sent again to another server of an upstream (retry_on, docs/retries.md).")
    for upstream, (_, _, _, retries) in upstreams:
        out.append(f'fastproxy_upstream_retries_total{{upstream="{_label(upstream)}"}} {retries}\n')
    family("fastproxy_mirror_requests_total", "counter",
           "Copies of requests sent to an upstream as a mirror, by result: sent (started), "
           "failed, abandoned, skipped (not sent: max_in_flight copies in progress).")
    for upstream, (_, _, mirrored, _) in upstreams:
        for result, count in zip(L.MIRROR_RESULTS, mirrored):
            out.append(f'fastproxy_mirror_requests_total{{upstream="{_label(upstream)}",'
                       f'result="{result}"}} {count}\n')

    _render_servers(out, family, zone, servers)

    family("fastproxy_active_connections", "gauge", "Client connections open now.")
    out.append(f"fastproxy_active_connections {active}\n")
    family("fastproxy_workers", "gauge", "Worker processes, by state.")
    for state in L.WORKER_STATE_NAMES.values():
        count = sum(1 for worker in info["workers"] if worker["state"] == state)
        out.append(f'fastproxy_workers{{state="{state}"}} {count}\n')
    family("fastproxy_generation", "gauge", "Generation of the running configuration; the master raises it on each reload.")
    out.append(f"fastproxy_generation {info['generation']}\n")
    family("fastproxy_start_time_seconds", "gauge", "Start time of the master, unix seconds.")
    out.append(f"fastproxy_start_time_seconds {info['started']!r}\n")
    return "".join(out).encode()


def _render_servers(out: List[str], family, zone, servers: Sequence[ConfiguredServer]) -> None:
    """The per-server families: counters for every server the zone names (a removed one keeps
    its series while its name is not reclaimed, "_retired" holds the reclaimed ones' counts),
    fastproxy_upstream_server_up for the servers of the configuration."""
    entries, states = [], {}
    for key, counters, state in zone.servers():
        upstream, _, address = key.partition("/")
        labels = f'upstream="{_label(upstream)}",server="{_label(address or key)}"'
        entries.append((labels, counters, state))
        states[key] = state
    family("fastproxy_upstream_server_requests_total", "counter",
           "Exchanges started with a server (retries included).")
    for labels, (requests, _, _, _, _), _ in entries:
        out.append(f"fastproxy_upstream_server_requests_total{{{labels}}} {requests}\n")
    family("fastproxy_upstream_server_failures_total", "counter",
           "Failed exchanges with a server, by kind: connect, reset, timeout, "
           "status (a fail_status response).")
    for labels, (_, failures, _, _, _), _ in entries:
        for kind, count in zip(L.UPSTREAM_ERROR_KINDS, failures):
            out.append(f'fastproxy_upstream_server_failures_total{{{labels},kind="{kind}"}} {count}\n')
    family("fastproxy_upstream_server_active", "gauge", "Connections in use to a server, across workers.")
    for labels, _, state in entries:
        if labels.startswith(f'upstream="{L.RETIRED_NAME}"'):
            continue  # counts folded from reclaimed names; no connections
        out.append(f"fastproxy_upstream_server_active{{{labels}}} {_active(state)}\n")
    family("fastproxy_upstream_server_response_seconds", "histogram",
           "Time from a request sent to a server to the end of its response.")
    for labels, (_, _, _, buckets, sum_us), _ in entries:
        _histogram(out, "fastproxy_upstream_server_response_seconds", labels, buckets, sum_us)
    family("fastproxy_upstream_server_up", "gauge",
           "1 while a configured server may take requests (up, backup or unknown), 0 while it is down.")
    now_us = int(time.monotonic() * 1e6)
    for c in servers:
        state = states.get(c.key)
        if state is not None:
            up = server_state(c, state, now_us)[0] not in ("down", "draining")
            out.append(f'fastproxy_upstream_server_up{{upstream="{_label(c.upstream)}",'
                       f'server="{c.server.address}"}} {int(up)}\n')
