"""The shared region, its Cython writer, the reader and the admin endpoint, with real processes.

The writer under test is the real fastproxy/core/metrics.pyx, compiled into a scratch module
that includes it (as _core.pyx does) plus thin def wrappers, since its methods are cdef.
"""
import asyncio
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections import defaultdict
from pathlib import Path

import pytest
import requests

from fastproxy.shm import RegionFull, SharedRegion, WORKER_DRAINING, layout as L
from fastproxy.shm.reader import render_prometheus, status

REPO = Path(__file__).resolve().parents[1]

PROBE_PYX = textwrap.dedent('''
    include "core/metrics.pyx"

    def open_metrics_writer(buffer, int counter_slot):
        return MetricsWriter.new(buffer, counter_slot)

    def request_done(MetricsWriter w, int route, int status, double seconds,
                     uint64_t bytes_in, uint64_t bytes_out):
        w.request_done(route, status, seconds, bytes_in, bytes_out)

    def upstream_request(MetricsWriter w, int upstream):
        w.upstream_request(upstream)

    def upstream_error(MetricsWriter w, int upstream, int kind):
        w.upstream_error(upstream, kind)

    def connection_opened(MetricsWriter w):
        w.connection_opened()

    def connection_closed(MetricsWriter w):
        w.connection_closed()

    def hammer(MetricsWriter w, long n, int route, int upstream, seconds):
        """n requests on one connection, counted as a worker does; n < 0 runs until killed.

        Request i has status class 1 + i % 5, duration seconds[i % 12], upstream error kind
        i % 3, 100 bytes in and 1000 out.
        """
        cdef double table[12]
        cdef long i = 0
        for i in range(12):
            table[i] = seconds[i]
        i = 0
        w.connection_opened()
        while n < 0 or i < n:
            w.upstream_request(upstream)
            w.request_done(route, 100 * (1 + i % 5), table[i % 12], 100, 1000)
            w.upstream_error(upstream, i % 3)
            i += 1
        w.connection_closed()
''')

BUILD = textwrap.dedent('''
    import sys
    from Cython.Build import cythonize
    from setuptools import Extension, setup
    sys.argv[1:] = ["build_ext", "--inplace", "--quiet"]
    setup(ext_modules=cythonize(
        [Extension("metrics_probe", ["metrics_probe.pyx"], extra_compile_args=["-O2"])],
        include_path=[{include!r}],
        compiler_directives={{"language_level": 3, "boundscheck": False, "wraparound": False,
                              "cdivision": True}},
        quiet=True,
    ))
''')

# One duration per histogram bucket, the last beyond 10 s.
SECONDS = (0.001, 0.007, 0.02, 0.04, 0.07, 0.2, 0.3, 0.7, 2.0, 3.0, 7.0, 12.0)
N = 200_000
LONG_N = 20_000_000


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    pytest.importorskip("Cython", reason="cython is needed to build fastproxy/core/metrics.pyx")
    build_dir = tmp_path_factory.mktemp("metrics_probe")
    (build_dir / "metrics_probe.pyx").write_text(PROBE_PYX)
    script = BUILD.format(include=str(REPO / "fastproxy"))
    result = subprocess.run([sys.executable, "-c", script], cwd=build_dir,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (so,) = build_dir.glob("metrics_probe*.so")
    spec = importlib.util.spec_from_file_location("metrics_probe", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- process helpers ---

def fork(fn) -> int:
    """Run fn in a forked child that exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_ok(pid: int) -> None:
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0


def start_hammer(probe, region, n, route, upstream, worker_slot=0, generation=1):
    """Fork a worker the way the master does: counter slot first, then fork, then record it."""
    slot = region.assign_counter_slot()

    def work():
        probe.hammer(probe.open_metrics_writer(region.buffer, slot), n, route, upstream, SECONDS)

    pid = fork(work)
    region.add_worker(pid, worker_slot, generation, slot)
    return pid, slot


def slot_requests(region, slot, route):
    """Requests one slot has counted for a route (sum of its status classes)."""
    base = L.counter_slot_word(slot) + L.route_block_word(route) + L.R_STATUS
    return sum(region.words[base:base + L.STATUS_CLASSES])


def slot_histogram_count(region, slot, route):
    base = L.counter_slot_word(slot) + L.route_block_word(route) + L.R_BUCKETS
    return sum(region.words[base:base + L.BUCKET_COUNT])


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


# --- tests ---

def test_cython_constants_match_layout(probe):
    assert probe.metrics_layout_constants() == L.mirrored_constants()


def test_layout_sections_are_ordered_aligned_and_fit():
    sections = [
        (L.HEADER_OFFSET, L.HEADER_SIZE),
        (L.MASTER_OFFSET, L.MASTER_SIZE),
        (L.ROUTE_NAMES_OFFSET, L.MAX_ROUTES * L.NAME_SIZE),
        (L.UPSTREAM_NAMES_OFFSET, L.MAX_UPSTREAMS * L.NAME_SIZE),
        (L.WORKERS_OFFSET, L.MAX_WORKERS * L.WORKER_ENTRY_SIZE),
        (L.SLOT_TABLE_OFFSET, L.MAX_COUNTER_SLOTS * L.WORD),
        (L.COUNTERS_OFFSET, L.MAX_COUNTER_SLOTS * L.COUNTER_SLOT_SIZE),
    ]
    end = 0
    for offset, size in sections:
        assert offset == end and offset % L.WORD == 0
        end = offset + size
    assert end == L.TOTAL_SIZE
    assert L.H_SLOTS_HIGH * L.WORD < L.HEADER_SIZE
    assert L.W_COUNTER_SLOT * L.WORD < L.WORKER_ENTRY_SIZE
    assert L.route_block_word(L.MAX_ROUTES) == L.SLOT_WORDS
    assert L.COUNTER_SLOT_SIZE % L.CACHE_LINE == 0


def test_region_header_and_reserved_route():
    region = SharedRegion.create()
    assert len(region.buffer) == L.TOTAL_SIZE
    assert region.words[L.header_word(L.H_MAGIC)] == L.MAGIC
    assert region.words[L.header_word(L.H_VERSION)] == L.LAYOUT_VERSION
    assert region.route_names() == (L.UNROUTED_NAME,)
    assert SharedRegion(region.buffer).route_names() == (L.UNROUTED_NAME,)
    import mmap
    with pytest.raises(ValueError, match="not a fastproxy shared region"):
        SharedRegion(mmap.mmap(-1, L.TOTAL_SIZE))


def test_writer_refuses_foreign_buffer_and_bad_slot(probe):
    region = SharedRegion.create()
    with pytest.raises(ValueError, match="not a fastproxy shared region"):
        probe.open_metrics_writer(bytearray(L.TOTAL_SIZE), 0)
    with pytest.raises(ValueError, match="out of range"):
        probe.open_metrics_writer(region.buffer, L.MAX_COUNTER_SLOTS)
    assert probe.open_metrics_writer(region.buffer, 3).counter_slot == 3


def test_forked_workers_count_exactly(probe):
    region = SharedRegion.create()
    region.set_master_info(os.getpid(), 1, "/etc/fastproxy/fastproxy.toml")
    api, static = region.register_routes(["api", "static"])
    (app,) = region.register_upstreams(["app"])
    workers = [start_hammer(probe, region, N, (api, static)[i % 2], app, worker_slot=i)
               for i in range(4)]
    for pid, _ in workers:
        wait_ok(pid)

    samples = parse_exposition(render_prometheus(region).decode())
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
    region = SharedRegion.create()
    (route,) = region.register_routes(["api"])
    (app,) = region.register_upstreams(["app"])
    # The survivors count long enough (~0.3 s) to be mid-hammering when the victim dies.
    survivors = [start_hammer(probe, region, LONG_N, route, app, worker_slot=i) for i in range(2)]
    victim, victim_slot = start_hammer(probe, region, -1, route, app, worker_slot=2)

    while slot_requests(region, victim_slot, route) < 50_000:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    render_prometheus(region)  # reading while the others still write, and after a death
    _, code = os.waitpid(victim, 0)
    assert os.WIFSIGNALED(code) and os.WTERMSIG(code) == signal.SIGKILL
    for pid, _ in survivors:
        wait_ok(pid)

    # Killed between two stores of one request at worst: one request off between families.
    killed = slot_requests(region, victim_slot, route)
    assert abs(slot_histogram_count(region, victim_slot, route) - killed) <= 1
    samples = parse_exposition(render_prometheus(region).decode())
    assert metric(samples, "fastproxy_active_connections") == 1  # the victim's open connection

    assert region.remove_worker(victim) == victim_slot
    assert [w["pid"] for w in status(region)["workers"]] == [pid for pid, _ in survivors]
    samples = parse_exposition(render_prometheus(region).decode())
    assert metric(samples, "fastproxy_active_connections") == 0
    total = sum(metric(samples, "fastproxy_requests_total", route="api", code=f"{c}xx")
                for c in range(1, 6))
    assert total == 2 * LONG_N + killed

    # The master hands the freed slot to the replacement, which keeps adding.
    replacement, slot = start_hammer(probe, region, N, route, app, worker_slot=2, generation=2)
    assert slot == victim_slot
    wait_ok(replacement)
    samples = parse_exposition(render_prometheus(region).decode())
    total = sum(metric(samples, "fastproxy_requests_total", route="api", code=f"{c}xx")
                for c in range(1, 6))
    assert total == 2 * LONG_N + N + killed
    assert metric(samples, "fastproxy_connections_accepted_total") == 4


def test_request_done_edge_cases(probe):
    region = SharedRegion.create()
    (api,) = region.register_routes(["api"])
    (app,) = region.register_upstreams(["app"])
    w = probe.open_metrics_writer(region.buffer, region.assign_counter_slot())
    probe.request_done(w, -1, 404, 0.005, 1, 2)  # no route; exactly on a bucket bound
    probe.request_done(w, api, 0, float("nan"), 0, 0)  # client left before a status
    probe.request_done(w, api, 999, -1.0, 0, 0)
    probe.request_done(w, L.MAX_ROUTES, 200, 10.0, 0, 0)  # out of range: counted as unrouted
    probe.upstream_request(w, L.MAX_UPSTREAMS)  # ignored
    probe.upstream_error(w, app, 3)  # unknown kind: ignored
    probe.upstream_error(w, app, 2)
    probe.connection_closed(w)  # never below zero
    samples = parse_exposition(render_prometheus(region).decode())
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


def test_names_keep_their_index_across_reregistration(probe):
    region = SharedRegion.create()
    assert region.register_routes(["a", "b", "c"]) == (1, 2, 3)
    assert region.register_upstreams(["x", "y"]) == (0, 1)
    w = probe.open_metrics_writer(region.buffer, region.assign_counter_slot())
    probe.request_done(w, 2, 200, 0.001, 0, 0)  # route "b"

    # A reload with another route set: kept names keep their index, new ones append.
    assert region.register_routes(["c", "d", "a", "d"]) == (3, 4, 1, 4)
    assert region.register_upstreams(["y", "z"]) == (1, 2)
    assert region.route_names() == ("_unrouted", "a", "b", "c", "d")
    samples = parse_exposition(render_prometheus(region).decode())
    assert metric(samples, "fastproxy_requests_total", route="b", code="2xx") == 1

    with pytest.raises(ValueError, match="reserved"):
        region.register_routes(["_unrouted"])
    with pytest.raises(ValueError, match="1 to 248 bytes"):
        region.register_routes([""])
    with pytest.raises(ValueError, match="1 to 248 bytes"):
        region.register_upstreams(["u" * 249])
    room = L.MAX_ROUTES - len(region.route_names())
    region.register_routes([f"r{i}" for i in range(room)])
    with pytest.raises(RegionFull, match="at most 256 route names"):
        region.register_routes(["a", "one-too-many"])
    assert region.register_routes(["a", "r0"]) == (1, 5)  # known names still resolve
    assert region.route_names()[-1] == f"r{room - 1}"


def test_label_values_are_escaped(probe):
    region = SharedRegion.create()
    weird = 'we"ird\\route\nnext café'
    (route,) = region.register_routes([weird])
    region.register_upstreams(['up"stream'])
    w = probe.open_metrics_writer(region.buffer, region.assign_counter_slot())
    probe.request_done(w, route, 301, 0.2, 0, 0)
    text = render_prometheus(region).decode()
    assert 'route="we\\"ird\\\\route\\nnext café"' in text
    samples = parse_exposition(text)
    assert metric(samples, "fastproxy_requests_total", route=weird, code="3xx") == 1
    assert metric(samples, "fastproxy_upstream_requests_total", upstream='up"stream') == 0


def test_counter_slots_and_worker_table():
    region = SharedRegion.create()
    region.set_master_info(4242, 7, "/etc/fastproxy.toml")
    slots = [region.assign_counter_slot() for _ in range(L.MAX_COUNTER_SLOTS)]
    assert slots == list(range(L.MAX_COUNTER_SLOTS))
    with pytest.raises(RegionFull, match="counter slots"):
        region.assign_counter_slot()
    region.release_counter_slot(5)
    assert region.assign_counter_slot() == 5

    region.add_worker(1001, 0, 7, 5)
    region.add_worker(1002, 1, 7, 9)
    region.words[L.counter_slot_word(9) + L.C_ACTIVE_CONNECTIONS] = 3  # as worker 1002 would
    region.set_worker_state(1001, WORKER_DRAINING)
    with pytest.raises(KeyError):
        region.set_worker_state(999, WORKER_DRAINING)
    doc = status(region)
    assert doc["master_pid"] == 4242 and doc["generation"] == 7
    assert doc["config_path"] == "/etc/fastproxy.toml"
    assert 0 <= doc["uptime_seconds"] < 3600
    assert [(w["pid"], w["slot"], w["generation"], w["state"], w["connections"])
            for w in doc["workers"]] == [(1001, 0, 7, "draining", 0), (1002, 1, 7, "running", 3)]
    samples = parse_exposition(render_prometheus(region).decode())
    assert metric(samples, "fastproxy_workers", state="running") == 1
    assert metric(samples, "fastproxy_workers", state="draining") == 1
    assert metric(samples, "fastproxy_start_time_seconds") == doc["started"]

    assert region.remove_worker(1002) == 9
    assert region.remove_worker(1002) is None
    assert region.words[L.counter_slot_word(9) + L.C_ACTIVE_CONNECTIONS] == 0
    assert region.assign_counter_slot() == 9
    assert [w["pid"] for w in status(region)["workers"]] == [1001]


# --- the admin endpoint, served by forked workers on one inherited socket ---

def serve_admin(sock, region, ready_fd):
    """A worker's admin side: uvloop and start_admin; SIGUSR1 closes the admin server (as a
    draining worker does) and SIGTERM also stops the loop. Writes a byte to ready_fd once the
    signal handlers are in place."""
    import uvloop
    from fastproxy.admin import start_admin

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    admin = loop.run_until_complete(start_admin(loop, sock, region))

    def stop():
        admin.close()
        loop.call_soon(loop.stop)

    loop.add_signal_handler(signal.SIGUSR1, admin.close)
    loop.add_signal_handler(signal.SIGTERM, stop)
    os.write(ready_fd, b"!")
    loop.run_forever()


@pytest.fixture
def admin(probe):
    """A region with known counts and two workers serving it on one admin socket."""
    region = SharedRegion.create()
    region.set_master_info(os.getpid(), 3, "/etc/fastproxy.toml")
    (api,) = region.register_routes(["api"])
    slot = region.assign_counter_slot()
    w = probe.open_metrics_writer(region.buffer, slot)
    for status_code in (200, 200, 502):
        probe.request_done(w, api, status_code, 0.01, 10, 20)
    sock = socket.create_server(("127.0.0.1", 0))
    ready_r, ready_w = os.pipe()
    pids = [fork(lambda: serve_admin(sock, region, ready_w)) for _ in range(2)]
    for _ in pids:
        assert os.read(ready_r, 1) == b"!"
    os.close(ready_r)
    os.close(ready_w)
    for worker_slot, pid in enumerate(pids):
        region.add_worker(pid, worker_slot, 3, slot)
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
