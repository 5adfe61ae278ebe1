"""Reading the shared region: /metrics as Prometheus text and /status as a dict.

Runs in whichever worker answers an admin request (or anywhere else the region is mapped) and
never writes. It sums the counter slots of every worker, live or dead, so any worker gives the
same totals. A slot may be read a few increments behind another (its owner keeps counting while
we sum); each value read is whole, since every field is one aligned 8-byte word.

The exposition is written by hand rather than with prometheus_client: that library keeps its
metrics in per-process registries, while ours are summed from shared slots (docs/metrics.md).
"""
from __future__ import annotations

import operator
import time
from typing import List, Tuple

from . import layout as L

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _summed_slots(region) -> Tuple[Tuple[str, ...], Tuple[str, ...], List[int]]:
    """Route names, upstream names, and the counter words of all slots summed element-wise.

    Only the prefix of a slot that registered routes can have touched is summed, and only the
    slots ever assigned.
    """
    routes = region.route_names()
    upstreams = region.upstream_names()
    words = region.words
    span = L.route_block_word(len(routes))
    totals = [0] * span
    for slot in range(words[L.header_word(L.H_SLOTS_HIGH)]):
        base = L.counter_slot_word(slot)
        totals = list(map(operator.add, totals, words[base:base + span].tolist()))
    return routes, upstreams, totals


def _workers(region) -> List[dict]:
    words = region.words
    workers = []
    for entry in range(L.MAX_WORKERS):
        state = words[L.worker_word(entry, L.W_STATE)]
        pid = words[L.worker_word(entry, L.W_PID)]
        if state == L.WORKER_FREE or pid == 0:  # pid 0: caught between the master's stores
            continue
        counter_slot = words[L.worker_word(entry, L.W_COUNTER_SLOT)]
        workers.append({
            "pid": pid,
            "slot": words[L.worker_word(entry, L.W_WORKER_SLOT)],
            "generation": words[L.worker_word(entry, L.W_GENERATION)],
            "state": L.WORKER_STATE_NAMES.get(state, "unknown"),
            "connections": words[L.counter_slot_word(counter_slot) + L.C_ACTIVE_CONNECTIONS],
            "started": words[L.worker_word(entry, L.W_START_TIME_US)] / 1e6,
        })
    workers.sort(key=lambda w: (w["generation"], w["slot"]))
    return workers


def status(region) -> dict:
    """The /status document: who is running, since when, with which config."""
    words = region.words
    path_len = words[L.master_word(L.M_CONFIG_PATH_LEN)]
    path = bytes(region.buffer[L.CONFIG_PATH_OFFSET:L.CONFIG_PATH_OFFSET + path_len])
    started = words[L.master_word(L.M_START_TIME_US)] / 1e6
    return {
        "master_pid": words[L.master_word(L.M_PID)],
        "generation": words[L.master_word(L.M_GENERATION)],
        "config_path": path.decode(errors="replace"),
        "started": started,
        "uptime_seconds": round(max(0.0, time.time() - started), 3),
        "workers": _workers(region),
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(region) -> bytes:
    """Every metric in the Prometheus text exposition format 0.0.4."""
    routes, upstreams, totals = _summed_slots(region)
    info = status(region)
    out: List[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

    family("fastproxy_requests_total", "counter",
           "Requests answered, by route and status class.")
    for index, route in enumerate(routes):
        block = L.route_block_word(index)
        label = _label(route)
        for cls in range(L.STATUS_CLASSES):
            out.append(f'fastproxy_requests_total{{route="{label}",code="{cls + 1}xx"}} '
                       f"{totals[block + L.R_STATUS + cls]}\n")

    family("fastproxy_request_duration_seconds", "histogram",
           "Time from the first byte of a request to the last byte of its response.")
    for index, route in enumerate(routes):
        block = L.route_block_word(index)
        label = _label(route)
        cumulative = 0
        for bucket, bound in enumerate(L.DURATION_BUCKETS + (None,)):
            cumulative += totals[block + L.R_BUCKETS + bucket]
            le = "+Inf" if bound is None else f"{bound:g}"
            out.append(f'fastproxy_request_duration_seconds_bucket{{route="{label}",le="{le}"}} '
                       f"{cumulative}\n")
        seconds = totals[block + L.R_DURATION_SUM_US] / 1e6
        out.append(f'fastproxy_request_duration_seconds_sum{{route="{label}"}} {seconds!r}\n'
                   f'fastproxy_request_duration_seconds_count{{route="{label}"}} {cumulative}\n')

    for name, word, help_text in (
        ("fastproxy_bytes_received_total", L.C_BYTES_IN, "Bytes received from clients."),
        ("fastproxy_bytes_sent_total", L.C_BYTES_OUT, "Bytes sent to clients."),
        ("fastproxy_connections_accepted_total", L.C_CONNECTIONS_ACCEPTED,
         "Client connections accepted."),
    ):
        family(name, "counter", help_text)
        out.append(f"{name} {totals[word]}\n")

    family("fastproxy_upstream_requests_total", "counter", "Requests sent to an upstream.")
    for index, upstream in enumerate(upstreams):
        out.append(f'fastproxy_upstream_requests_total{{upstream="{_label(upstream)}"}} '
                   f"{totals[L.upstream_block_word(index) + L.U_REQUESTS]}\n")
    family("fastproxy_upstream_errors_total", "counter",
           "Failed upstream exchanges, by kind: connect (failed or refused), reset, timeout.")
    for index, upstream in enumerate(upstreams):
        for kind_index, kind in enumerate(L.UPSTREAM_ERROR_KINDS):
            word = L.upstream_block_word(index) + L.U_ERRORS + kind_index
            out.append(f'fastproxy_upstream_errors_total{{upstream="{_label(upstream)}",'
                       f'kind="{kind}"}} {totals[word]}\n')

    family("fastproxy_active_connections", "gauge", "Client connections open now.")
    out.append(f"fastproxy_active_connections {totals[L.C_ACTIVE_CONNECTIONS]}\n")
    family("fastproxy_workers", "gauge", "Worker processes, by state.")
    for state in L.WORKER_STATE_NAMES.values():
        count = sum(1 for worker in info["workers"] if worker["state"] == state)
        out.append(f'fastproxy_workers{{state="{state}"}} {count}\n')
    family("fastproxy_generation", "gauge", "Generation of the running configuration; the master raises it on each reload.")
    out.append(f"fastproxy_generation {info['generation']}\n")
    family("fastproxy_start_time_seconds", "gauge", "Start time of the master, unix seconds.")
    out.append(f"fastproxy_start_time_seconds {info['started']!r}\n")
    return "".join(out).encode()
