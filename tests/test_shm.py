"""The metrics zone, its Cython writer, the reader and the admin endpoint, with real processes.

The writer under test is the real fastproxy/core/metrics.pyx, compiled into a scratch module
that includes it (as _core.pyx does) plus thin def wrappers, since its methods are cdef
(tests/harness/zone_probe.py).
"""
import asyncio
import json
import math
import mmap
import os
import re
import signal
import socket
import time
from collections import defaultdict

import pytest
import requests

from harness import zone_probe
from harness.proxy import fork_child

from fastproxy.shm import METRICS_ZONE, WORKER_DRAINING, MetricsZone, Zone, ZoneFull, ZoneSpec, layout as L
from fastproxy.shm.reader import render_prometheus, status

# One duration per histogram bucket, the last beyond 10 s.
SECONDS = (0.001, 0.007, 0.02, 0.04, 0.07, 0.2, 0.3, 0.7, 2.0, 3.0, 7.0, 12.0)
N = 200_000
LONG_N = 20_000_000


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    pytest.importorskip("Cython", reason="cython is needed to build the zone accessors")
    return zone_probe.build(tmp_path_factory.mktemp("zone_probe"))


def new_metrics() -> MetricsZone:
    """A metrics zone as the master makes it before its first fork."""
    return MetricsZone.create(Zone(METRICS_ZONE))


def open_writer(probe, metrics, slot):
    return probe.open_metrics_writer(metrics.buffer, L.LAYOUT_VERSION, L.COUNTER_SLOTS_GEOMETRY, slot)


# --- process helpers ---

def wait_ok(pid: int) -> None:
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0


def start_hammer(probe, metrics, n, route, upstream, worker_slot=0, generation=1):
    """Fork a worker the way the master does: counter slot first, then fork, then record it."""
    slot = metrics.assign_counter_slot()

    def work():
        probe.hammer(open_writer(probe, metrics, slot), n, route, upstream, SECONDS)

    pid = fork_child(work)
    metrics.add_worker(pid, worker_slot, generation, slot)
    return pid, slot


def slot_route(metrics, slot, route):
    """(requests, histogram count) one slot has counted for a route."""
    _, routes, _, _ = metrics.slots.totals(slot, slot + 1, route + 1, 0)
    classes, buckets, _ = routes[route]
    return sum(classes), sum(buckets)


def expected_for(n):
    """Per-class, per-bucket counts and the duration sum (µs) of hammer(n)."""
    classes = [n // 5 + (1 if c < n % 5 else 0) for c in range(5)]
    buckets = [n // 12 + (1 if b < n % 12 else 0) for b in range(12)]
    kinds = [n // 3 + (1 if k < n % 3 else 0) for k in range(3)]
    sum_us = sum(count * int(s * 1e6 + 0.5) for count, s in zip(buckets, SECONDS))
    return classes, buckets, kinds, sum_us


# --- a Prometheus text format (0.0.4) checker ---

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)$")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _unescape(value):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_exposition(text: str) -> dict:
    """Check text against the exposition format and return {(name, labels): value}."""
    assert text.endswith("\n")
    types, helps, samples = {}, set(), {}
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE") and re.fullmatch(_NAME, parts[2]), line
            if parts[1] == "TYPE":
                assert parts[3] in _TYPES and parts[2] not in types, line
                assert not any(key[0].startswith(parts[2]) for key in samples), "TYPE after samples"
                types[parts[2]] = parts[3]
            else:
                assert parts[2] not in helps, line
                helps.add(parts[2])
            continue
        match = _SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        name, value = match.group(1), match.group(match.lastindex)
        labels = tuple((k, _unescape(v)) for k, v in re.findall(_LABEL, match.group(2) or ""))
        assert len({k for k, _ in labels}) == len(labels), line
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types and family in helps, f"{name} has no TYPE/HELP"
        number = float(value)
        assert not math.isnan(number) and (types[family] == "gauge" or number >= 0), line
        assert (name, labels) not in samples, f"duplicate series {line!r}"
        samples[(name, labels)] = number
    for family, kind in types.items():
        if kind != "histogram":
            continue
        series = defaultdict(list)
        for (name, labels), value in samples.items():
            if name == family + "_bucket":
                rest = tuple(label for label in labels if label[0] != "le")
                series[rest].append((float(dict(labels)["le"]), value))
        for rest, buckets in series.items():
            les = [le for le, _ in buckets]
            counts = [count for _, count in buckets]
            assert les == sorted(les) and les[-1] == math.inf
            assert counts == sorted(counts), "buckets must be cumulative"
            assert samples[(family + "_count", rest)] == counts[-1]
            assert (family + "_sum", rest) in samples
    return samples


def metric(samples, name, **labels):
    return samples[(name, tuple(labels.items()))]


def requests_by_route(samples):
    totals = defaultdict(int)
    for (name, labels), value in samples.items():
        if name == "fastproxy_requests_total":
            totals[dict(labels)["route"]] += value
    return totals


# --- tests ---

def test_layout_sections_are_ordered_aligned_and_fit(probe):
    sections = [
        (0, L.ZONE_HEADER_SIZE),
        (L.MASTER_OFFSET, L.MASTER_SIZE),
        (L.CONFIG_PATH_OFFSET, L.CONFIG_PATH_SIZE),
        (L.ROUTE_NAMES_OFFSET, L.MAX_ROUTES * L.NAME_SIZE),
        (L.UPSTREAM_NAMES_OFFSET, L.MAX_UPSTREAMS * L.NAME_SIZE),
        (L.WORKERS_OFFSET, L.MAX_WORKERS * L.WORKER_ENTRY_SIZE),
        (L.SLOT_TABLE_OFFSET, L.COUNTER_SLOTS * L.WORD),
        (L.COUNTERS_OFFSET, L.COUNTER_SLOTS * L.COUNTER_SLOT_SIZE),
    ]
    end = 0
    for offset, size in sections:
        assert offset >= end and offset % L.WORD == 0
        end = offset + size
    assert end == L.TOTAL_SIZE == METRICS_ZONE.size
    assert L.COUNTERS_OFFSET % L.CACHE_LINE == 0 and L.COUNTER_SLOT_SIZE % L.CACHE_LINE == 0
    # The writer's own idea of a slot is what the layout reserved.
    metrics = new_metrics()
    assert metrics.slots.slot_size == L.COUNTER_SLOT_SIZE
    assert open_writer(probe, metrics, 3).counter_slot == 3


def test_zone_header_and_reserved_names():
    metrics = new_metrics()
    assert len(metrics.buffer) == L.TOTAL_SIZE
    assert metrics.access.version == L.LAYOUT_VERSION and metrics.access.size == L.TOTAL_SIZE
    assert metrics.route_names() == {0: "_unrouted", 1: "_retired"}
    assert metrics.upstream_names() == {0: "_retired"}
    assert MetricsZone(metrics.zone).route_names() == {0: "_unrouted", 1: "_retired"}
    with pytest.raises(ValueError, match="not a metrics zone"):
        MetricsZone(Zone(ZoneSpec("metrics", L.TOTAL_SIZE, L.LAYOUT_VERSION + 1, "core")))


def test_writer_refuses_foreign_buffer_and_bad_slot(probe):
    metrics = new_metrics()
    with pytest.raises(ValueError, match="not a fastproxy zone of layout version"):
        probe.open_metrics_writer(mmap.mmap(-1, L.TOTAL_SIZE), L.LAYOUT_VERSION,
                                  L.COUNTER_SLOTS_GEOMETRY, 0)
    with pytest.raises(ValueError, match="not a fastproxy zone of layout version"):
        probe.open_metrics_writer(metrics.buffer, L.LAYOUT_VERSION + 1, L.COUNTER_SLOTS_GEOMETRY, 0)
    with pytest.raises(ValueError, match="out of range"):
        open_writer(probe, metrics, L.COUNTER_SLOTS)
    with pytest.raises(ValueError, match="do not fit"):
        probe.open_metrics_writer(metrics.buffer, L.LAYOUT_VERSION,
                                  (L.COUNTERS_OFFSET, L.COUNTER_SLOTS + 1, *L.COUNTER_SLOTS_GEOMETRY[2:]), 0)


def test_forked_workers_count_exactly(probe):
    metrics = new_metrics()
    metrics.set_master_info(os.getpid(), 1, "/etc/fastproxy/fastproxy.toml")
    api, static = metrics.register_routes(["api", "static"])
    (app,) = metrics.register_upstreams(["app"])
    workers = [start_hammer(probe, metrics, N, (api, static)[i % 2], app, worker_slot=i)
               for i in range(4)]
    for pid, _ in workers:
        wait_ok(pid)

    samples = parse_exposition(render_prometheus(metrics).decode())
    classes, buckets, kinds, sum_us = expected_for(N)
    for route in ("api", "static"):
        for c in range(5):
            assert metric(samples, "fastproxy_requests_total", route=route, code=f"{c + 1}xx") \
                == 2 * classes[c]
        cumulative = 0
        for bound, count in zip(L.DURATION_BUCKETS + (None,), buckets):
            cumulative += 2 * count
            le = "+Inf" if bound is None else f"{bound:g}"
            assert metric(samples, "fastproxy_request_duration_seconds_bucket",
                          route=route, le=le) == cumulative
        assert metric(samples, "fastproxy_request_duration_seconds_count", route=route) == 2 * N
        assert metric(samples, "fastproxy_request_duration_seconds_sum", route=route) \
            == 2 * sum_us / 1e6
    assert metric(samples, "fastproxy_requests_total", route="_unrouted", code="2xx") == 0
    assert metric(samples, "fastproxy_requests_total", route="_retired", code="2xx") == 0
    assert metric(samples, "fastproxy_bytes_received_total") == 4 * N * 100
    assert metric(samples, "fastproxy_bytes_sent_total") == 4 * N * 1000
    assert metric(samples, "fastproxy_upstream_requests_total", upstream="app") == 4 * N
    for kind, count in zip(L.UPSTREAM_ERROR_KINDS, kinds):
        assert metric(samples, "fastproxy_upstream_errors_total", upstream="app", kind=kind) \
            == 4 * count
    assert metric(samples, "fastproxy_connections_accepted_total") == 4
    assert metric(samples, "fastproxy_active_connections") == 0
    assert metric(samples, "fastproxy_workers", state="running") == 4
    assert metric(samples, "fastproxy_generation") == 1


def test_sigkilled_worker_wedges_nobody_and_keeps_its_counts(probe):
    metrics = new_metrics()
    (route,) = metrics.register_routes(["api"])
    (app,) = metrics.register_upstreams(["app"])
    # The survivors count long enough (~0.3 s) to be mid-hammering when the victim dies.
    survivors = [start_hammer(probe, metrics, LONG_N, route, app, worker_slot=i) for i in range(2)]
    victim, victim_slot = start_hammer(probe, metrics, -1, route, app, worker_slot=2)

    while slot_route(metrics, victim_slot, route)[0] < 50_000:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    render_prometheus(metrics)  # reading while the others still write, and after a death
    _, code = os.waitpid(victim, 0)
    assert os.WIFSIGNALED(code) and os.WTERMSIG(code) == signal.SIGKILL
    for pid, _ in survivors:
        wait_ok(pid)

    # Killed between two stores of one request at worst: one request off between families.
    killed, killed_histogram = slot_route(metrics, victim_slot, route)
    assert abs(killed_histogram - killed) <= 1
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert metric(samples, "fastproxy_active_connections") == 1  # the victim's open connection

    assert metrics.remove_worker(victim) == victim_slot
    assert [w["pid"] for w in status(metrics)["workers"]] == [pid for pid, _ in survivors]
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert metric(samples, "fastproxy_active_connections") == 0
    assert requests_by_route(samples)["api"] == 2 * LONG_N + killed

    # The master hands the freed slot to the replacement, which keeps adding.
    replacement, slot = start_hammer(probe, metrics, N, route, app, worker_slot=2, generation=2)
    assert slot == victim_slot
    wait_ok(replacement)
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert requests_by_route(samples)["api"] == 2 * LONG_N + N + killed
    assert metric(samples, "fastproxy_connections_accepted_total") == 4


def test_request_done_edge_cases(probe):
    metrics = new_metrics()
    (api,) = metrics.register_routes(["api"])
    (app,) = metrics.register_upstreams(["app"])
    w = open_writer(probe, metrics, metrics.assign_counter_slot())
    probe.request_done(w, -1, 404, 0.005, 1, 2)  # no route; exactly on a bucket bound
    probe.request_done(w, api, 0, float("nan"), 0, 0)  # client left before a status
    probe.request_done(w, api, 999, -1.0, 0, 0)
    probe.request_done(w, L.MAX_ROUTES, 200, 10.0, 0, 0)  # out of range: counted as unrouted
    probe.upstream_request(w, L.MAX_UPSTREAMS)  # ignored
    probe.upstream_error(w, app, 3)  # unknown kind: ignored
    probe.upstream_error(w, app, 2)
    probe.connection_closed(w)  # never below zero
    samples = parse_exposition(render_prometheus(metrics).decode())
    hist = "fastproxy_request_duration_seconds"
    assert metric(samples, "fastproxy_requests_total", route="_unrouted", code="4xx") == 1
    assert metric(samples, "fastproxy_requests_total", route="_unrouted", code="2xx") == 1
    assert metric(samples, hist + "_bucket", route="_unrouted", le="0.005") == 1
    assert metric(samples, hist + "_bucket", route="_unrouted", le="5") == 1
    assert metric(samples, hist + "_bucket", route="_unrouted", le="10") == 2
    assert metric(samples, hist + "_sum", route="_unrouted") == 10.005
    assert metric(samples, "fastproxy_requests_total", route="api", code="5xx") == 2
    assert metric(samples, hist + "_bucket", route="api", le="0.005") == 2
    assert metric(samples, hist + "_sum", route="api") == 0
    assert metric(samples, "fastproxy_upstream_requests_total", upstream="app") == 0
    assert metric(samples, "fastproxy_upstream_errors_total", upstream="app", kind="timeout") == 1
    assert metric(samples, "fastproxy_upstream_errors_total", upstream="app", kind="connect") == 0
    assert metric(samples, "fastproxy_active_connections") == 0


def test_names_keep_their_index_while_in_use_and_are_checked():
    metrics = new_metrics()
    assert metrics.register_routes(["a", "b", "c"]) == (2, 3, 4)
    assert metrics.register_upstreams(["x", "y"]) == (1, 2)
    # A reload with another route set: kept names keep their index, new ones take free ones.
    assert metrics.register_routes(["c", "d", "a", "d"], in_use={2, 3, 4}) == (4, 5, 2, 5)
    assert metrics.register_upstreams(["y", "z"], in_use={1, 2}) == (2, 3)
    assert metrics.route_names() == {0: "_unrouted", 1: "_retired", 2: "a", 3: "b", 4: "c", 5: "d"}

    for reserved in ("_unrouted", "_retired"):
        with pytest.raises(ValueError, match="reserved"):
            metrics.register_routes([reserved])
    with pytest.raises(ValueError, match="reserved"):
        metrics.register_upstreams(["_retired"])
    with pytest.raises(ValueError, match="1 to 248 bytes"):
        metrics.register_routes([""])
    with pytest.raises(ValueError, match="1 to 248 bytes"):
        metrics.register_upstreams(["u" * 249])

    # Full of names the live generations use: a clear error, and nothing changed.
    room = L.MAX_ROUTES - 6
    everything = set(range(L.MAX_ROUTES))
    metrics.register_routes([f"r{i}" for i in range(room)], in_use=everything)
    before = metrics.route_names()
    with pytest.raises(ZoneFull, match="at most 256 route names in use at once"):
        metrics.register_routes(["a", "one-too-many"], in_use=everything)
    assert metrics.route_names() == before
    assert metrics.register_routes(["a", "r0"], in_use=everything) == (2, 6)  # known names resolve


def test_unused_names_are_reclaimed_least_recent_first_and_totals_stay_exact(probe):
    metrics = new_metrics()
    w = open_writer(probe, metrics, metrics.assign_counter_slot())
    old = metrics.register_routes([f"old{i}" for i in range(L.MAX_ROUTES - 2)])
    (up,) = metrics.register_upstreams(["up-old"])
    for n, route in enumerate(old):
        for _ in range(n % 3 + 1):
            probe.request_done(w, route, 200, 0.02, 10, 20)
    probe.upstream_request(w, up)
    probe.upstream_error(w, up, 1)
    counted = sum(n % 3 + 1 for n in range(len(old)))
    # old0 .. old9 were registered again later: they are the most recently used.
    metrics.register_routes([f"old{i}" for i in range(10)], in_use=old[:10])

    # The next generation renames 20 routes while old0..old9 still run: the 20 least recently
    # registered unused names go, their counts into "_retired".
    new = metrics.register_routes([f"new{i}" for i in range(20)], in_use=old[:10])
    reclaimed = set(old[10:30])
    assert set(new) == reclaimed
    names = metrics.route_names()
    assert all(f"old{i}" not in names.values() for i in range(10, 30))
    assert all(f"old{i}" in names.values() for i in list(range(10)) + list(range(30, len(old))))
    samples = parse_exposition(render_prometheus(metrics).decode())
    by_route = requests_by_route(samples)
    assert by_route["_retired"] == sum(n % 3 + 1 for n in range(10, 30))
    assert sum(by_route.values()) == counted
    assert sum(v for (name, labels), v in samples.items()
               if name == "fastproxy_request_duration_seconds_count") == counted
    assert all(by_route[f"new{i}"] == 0 for i in range(20))  # a reclaimed index starts at zero
    probe.request_done(w, new[0], 500, 0.02, 0, 0)
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert metric(samples, "fastproxy_requests_total", route="new0", code="5xx") == 1

    # Upstreams alike: filling the table takes the one unused name's index (the lowest free).
    metrics.register_upstreams([f"up{i}" for i in range(L.MAX_UPSTREAMS - 1)])
    assert metrics.upstream_names()[up] == "up0"
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert metric(samples, "fastproxy_upstream_requests_total", upstream="_retired") == 1
    assert metric(samples, "fastproxy_upstream_errors_total", upstream="_retired", kind="reset") == 1
    assert metric(samples, "fastproxy_upstream_requests_total", upstream="up0") == 0


def test_readers_never_see_a_reclaim_half_done(probe):
    """A scrape overlapping a reclaim would miss the folded requests (or count them twice):
    the seqlock makes each scrape see a reclaim wholly or not at all, so the total over all
    routes, "_retired" included, never goes down."""
    metrics = new_metrics()
    w = open_writer(probe, metrics, metrics.assign_counter_slot())
    batch, cycles = 100, 500
    fillers = set(metrics.register_routes([f"filler{i}" for i in range(L.MAX_ROUTES - 2 - batch)]))
    routes = metrics.register_routes([f"gen0-{i}" for i in range(batch)])
    ready_r, ready_w = os.pipe()

    def scrape():
        os.write(ready_w, b"!")
        last = 0
        while last < batch * cycles:
            names, _, _ = metrics.snapshot()
            total = sum(sum(classes) for _, (classes, _, _) in names)
            assert total >= last, f"a scrape went back from {last} to {total}"
            last = total

    reader = fork_child(scrape)
    assert os.read(ready_r, 1) == b"!"
    for n in range(1, cycles + 1):
        for route in routes:  # the worker of generation n - 1
            probe.request_done(w, route, 200, 0.001, 0, 0)
        # generation n - 1 has drained: the fillers' generation is the only one left
        routes = metrics.register_routes([f"gen{n}-{i}" for i in range(batch)], in_use=fillers)
    wait_ok(reader)
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert requests_by_route(samples)["_retired"] == batch * cycles


def test_label_values_are_escaped(probe):
    metrics = new_metrics()
    weird = 'we"ird\\route\nnext café'
    (route,) = metrics.register_routes([weird])
    metrics.register_upstreams(['up"stream'])
    w = open_writer(probe, metrics, metrics.assign_counter_slot())
    probe.request_done(w, route, 301, 0.2, 0, 0)
    text = render_prometheus(metrics).decode()
    assert 'route="we\\"ird\\\\route\\nnext café"' in text
    samples = parse_exposition(text)
    assert metric(samples, "fastproxy_requests_total", route=weird, code="3xx") == 1
    assert metric(samples, "fastproxy_upstream_requests_total", upstream='up"stream') == 0


def test_counter_slots_and_worker_table(probe):
    metrics = new_metrics()
    metrics.set_master_info(4242, 7, "/etc/fastproxy.toml")
    slots = [metrics.assign_counter_slot() for _ in range(L.COUNTER_SLOTS - 1)]
    assert slots == list(range(1, L.COUNTER_SLOTS))  # slot 0 is the master's
    with pytest.raises(ZoneFull, match="counter slots"):
        metrics.assign_counter_slot()
    metrics.release_counter_slot(5)
    assert metrics.assign_counter_slot() == 5

    metrics.add_worker(1001, 0, 7, 5)
    metrics.add_worker(1002, 1, 7, 9)
    probe.connection_opened(open_writer(probe, metrics, 9))  # as worker 1002 would
    metrics.set_worker_state(1001, WORKER_DRAINING)
    with pytest.raises(KeyError):
        metrics.set_worker_state(999, WORKER_DRAINING)
    doc = status(metrics)
    assert doc["master_pid"] == 4242 and doc["generation"] == 7
    assert doc["config_path"] == "/etc/fastproxy.toml"
    assert 0 <= doc["uptime_seconds"] < 3600
    assert [(w["pid"], w["slot"], w["generation"], w["state"], w["connections"])
            for w in doc["workers"]] == [(1001, 0, 7, "draining", 0), (1002, 1, 7, "running", 1)]
    samples = parse_exposition(render_prometheus(metrics).decode())
    assert metric(samples, "fastproxy_workers", state="running") == 1
    assert metric(samples, "fastproxy_workers", state="draining") == 1
    assert metric(samples, "fastproxy_start_time_seconds") == doc["started"]

    assert metrics.remove_worker(1002) == 9
    assert metrics.remove_worker(1002) is None
    assert metrics.slots.active_connections(9) == 0
    assert metrics.assign_counter_slot() == 9
    assert [w["pid"] for w in status(metrics)["workers"]] == [1001]


# --- the admin endpoint, served by forked workers on one inherited socket ---

def serve_admin(sock, metrics, ready_fd):
    """A worker's admin side: uvloop and start_admin; SIGUSR1 closes the admin server (as a
    draining worker does) and SIGTERM also stops the loop. Writes a byte to ready_fd once the
    signal handlers are in place."""
    import uvloop
    from fastproxy.admin import start_admin

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    admin = loop.run_until_complete(start_admin(loop, sock, metrics))

    def stop():
        admin.close()
        loop.call_soon(loop.stop)

    loop.add_signal_handler(signal.SIGUSR1, admin.close)
    loop.add_signal_handler(signal.SIGTERM, stop)
    os.write(ready_fd, b"!")
    loop.run_forever()


@pytest.fixture
def admin(probe):
    """A metrics zone with known counts and two workers serving it on one admin socket."""
    metrics = new_metrics()
    metrics.set_master_info(os.getpid(), 3, "/etc/fastproxy.toml")
    (api,) = metrics.register_routes(["api"])
    slot = metrics.assign_counter_slot()
    w = open_writer(probe, metrics, slot)
    for status_code in (200, 200, 502):
        probe.request_done(w, api, status_code, 0.01, 10, 20)
    sock = socket.create_server(("127.0.0.1", 0))
    ready_r, ready_w = os.pipe()
    pids = [fork_child(lambda: serve_admin(sock, metrics, ready_w)) for _ in range(2)]
    for _ in pids:
        assert os.read(ready_r, 1) == b"!"
    os.close(ready_r)
    os.close(ready_w)
    for worker_slot, pid in enumerate(pids):
        metrics.add_worker(pid, worker_slot, 3, slot)
    yield sock.getsockname()[1], pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        wait_ok(pid)
    sock.close()


def read_response(f, head=False):
    status_line = f.readline()
    if not status_line:
        return None
    headers = {}
    for line in iter(f.readline, b"\r\n"):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head else f.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def connect(port):
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    return conn, conn.makefile("rb")


def test_admin_metrics_are_the_same_from_every_worker(admin):
    port, _ = admin
    bodies = set()
    for _ in range(20):  # fresh connections land on either worker
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        bodies.add(response.text)
    assert len(bodies) == 1
    samples = parse_exposition(bodies.pop())
    assert metric(samples, "fastproxy_requests_total", route="api", code="2xx") == 2
    assert metric(samples, "fastproxy_requests_total", route="api", code="5xx") == 1
    assert metric(samples, "fastproxy_bytes_sent_total") == 60


def test_admin_status_keep_alive_pipelining_and_errors(admin):
    port, pids = admin
    doc = requests.get(f"http://127.0.0.1:{port}/status", timeout=10).json()
    assert doc["master_pid"] == os.getpid() and doc["generation"] == 3
    assert doc["config_path"] == "/etc/fastproxy.toml"
    assert sorted(w["pid"] for w in doc["workers"]) == sorted(pids)
    assert {w["state"] for w in doc["workers"]} == {"running"}

    conn, f = connect(port)
    conn.sendall(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n")
    code, headers, body = read_response(f)
    assert code == 200 and headers["connection"] == "keep-alive"
    assert json.loads(body)["generation"] == 3
    conn.sendall(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n")
    code, headers, body = read_response(f)
    assert code == 404 and json.loads(body) == {"status": 404, "error": "not found"}
    # pipelined: answered in order on the same connection
    conn.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
                 b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                 b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    code, headers, body = read_response(f, head=True)
    assert code == 200 and int(headers["content-length"]) > 0 and body == b""
    code, headers, _ = read_response(f)
    assert code == 405 and headers["allow"] == "GET, HEAD"
    code, _, body = read_response(f)
    assert code == 200 and b"fastproxy_requests_total" in body
    conn.close()

    conn, f = connect(port)  # HTTP/1.0 without keep-alive: answered, then closed
    conn.sendall(b"GET /status HTTP/1.0\r\n\r\n")
    code, headers, _ = read_response(f)
    assert code == 200 and headers["connection"] == "close"
    assert f.read() == b""
    conn.close()

    conn, f = connect(port)  # malformed: 400 and closed
    conn.sendall(b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n")
    code, headers, body = read_response(f)
    assert code == 400 and headers["connection"] == "close"
    assert json.loads(body)["status"] == 400
    assert f.read() == b""
    conn.close()


def test_admin_close_ends_idle_keepalive_connections(admin):
    port, pids = admin
    idle = []
    for _ in range(6):  # enough connections that both workers are likely to hold some
        conn, f = connect(port)
        conn.sendall(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(f)[0] == 200
        idle.append((conn, f))
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    for conn, f in idle:
        assert f.read() == b""  # closed by the worker, which lives on
        conn.close()
    assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids)
