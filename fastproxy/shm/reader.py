"""Reading the metrics zone: /metrics as Prometheus text and /status as a dict.

Runs in whichever worker answers an admin request (or anywhere else the zone is mapped) and
never writes. It sums the counter slots of every worker, live or dead, so any worker gives the
same totals, and reads names and counters in one seqlock read (MetricsZone.snapshot), so a
reload that reclaims a name is seen either wholly or not at all. A slot may be read a few
increments behind another (its owner keeps counting while we sum); each value read is whole,
since every field is one aligned 8-byte word.

The exposition is written by hand rather than with prometheus_client: that library keeps its
metrics in per-process registries, while ours are summed from shared slots (docs/metrics.md).
"""
from __future__ import annotations

import time
from typing import List

from . import layout as L

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def status(zone) -> dict:
    """The /status document: who is running, since when, with which config."""
    info = zone.master_info()
    info["uptime_seconds"] = round(max(0.0, time.time() - info["started"]), 3)
    info["workers"] = zone.workers()
    return info


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(zone) -> bytes:
    """Every metric in the Prometheus text exposition format 0.0.4."""
    routes, upstreams, totals = zone.snapshot()
    info = status(zone)
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
        label = _label(route)
        cumulative = 0
        for count, bound in zip(buckets, L.DURATION_BUCKETS + (None,)):
            cumulative += count
            le = "+Inf" if bound is None else f"{bound:g}"
            out.append(f'fastproxy_request_duration_seconds_bucket{{route="{label}",le="{le}"}} '
                       f"{cumulative}\n")
        out.append(f'fastproxy_request_duration_seconds_sum{{route="{label}"}} {sum_us / 1e6!r}\n'
                   f'fastproxy_request_duration_seconds_count{{route="{label}"}} {cumulative}\n')

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
    for upstream, (requests, _, _) in upstreams:
        out.append(f'fastproxy_upstream_requests_total{{upstream="{_label(upstream)}"}} {requests}\n')
    family("fastproxy_upstream_errors_total", "counter",
           "Failed upstream exchanges, by kind: connect (failed or refused), reset, timeout.")
    for upstream, (_, errors, _) in upstreams:
        for kind, count in zip(L.UPSTREAM_ERROR_KINDS, errors):
            out.append(f'fastproxy_upstream_errors_total{{upstream="{_label(upstream)}",'
                       f'kind="{kind}"}} {count}\n')
    family("fastproxy_mirror_requests_total", "counter",
           "Copies of requests sent to an upstream as a mirror, by result: sent (started), "
           "failed, abandoned, skipped (not sent: max_in_flight copies in progress).")
    for upstream, (_, _, mirrored) in upstreams:
        for result, count in zip(L.MIRROR_RESULTS, mirrored):
            out.append(f'fastproxy_mirror_requests_total{{upstream="{_label(upstream)}",'
                       f'result="{result}"}} {count}\n')

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
