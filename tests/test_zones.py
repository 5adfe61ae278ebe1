"""Shared zones: the registry the master keeps, the C atomics, the owner-pid lock and the
seqlock, hammered by forked processes through the real Cython accessors (compiled from
fastproxy/core/zones.pyx, tests/harness/zone_probe.py); and route/upstream names renamed far
past the metrics zone's capacity on a real proxy, with /metrics totals still exact."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import pytest

from harness import zone_probe
from harness.client import RawClient
from harness.proxy import fork_child, respond, summed_metric, to_toml, upstream, wait_until

from fastproxy.config import load_runtime
from fastproxy.filters.base import Filter, Phase, compile_phases
from fastproxy.master.arbiter import Generation, Master, WorkerProcess
from fastproxy.shm import ZoneSet, ZoneSpec, layout

# Word indexes of the probe's test records (see zone_probe.PROBE_PYX).
GUARDED, STOP, COUNTER, TOKENS, READS = 8, 16, 24, 32, 40
TEST_ZONE = ZoneSpec("test.lock", 4096, 1, "test")


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    pytest.importorskip("Cython", reason="cython is needed to build the zone accessors")
    return zone_probe.build(tmp_path_factory.mktemp("zone_probe"))


@pytest.fixture
def children():
    """Forks fn() in a child (exit 0 if it returns, 1 if it raises); kills leftovers at teardown."""
    pids = []

    def fork(fn) -> int:
        pids.append(fork_child(fn))
        return pids[-1]
    yield fork
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def wait_ok(pid: int) -> None:
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0


class ZoneUser(Filter):
    """A test-only feature: declares zones the way a filter's config half does."""
    name = "test.zone-user"
    phases = frozenset({Phase.REQUEST_HEADERS})

    def __init__(self, *zones: ZoneSpec):
        self.zones = zones


def runtime_using(tmp_path, *zones: ZoneSpec):
    path = tmp_path / "fastproxy.toml"
    path.write_text(to_toml({"main": {"workers": 1}, "listen": [{"address": "127.0.0.1:1"}],
                             "routes": [{"path": "/", "respond": respond(200)}]}))
    runtime = load_runtime(str(path))
    route = dataclasses.replace(runtime.routes[0], phases=compile_phases([ZoneUser(*zones)]))
    return dataclasses.replace(runtime, routes=(route,))


# --- the registry -------------------------------------------------------------------------

def test_master_reuses_matching_zones_across_reloads_and_recreates_changed_ones(probe, tmp_path, caplog):
    caplog.set_level(logging.INFO, "fastproxy.zones")
    master = Master(str(tmp_path / "fastproxy.toml"), runtime_using(tmp_path))
    same, grown = ZoneSpec("same", 4096, 1, "test"), ZoneSpec("grows", 4096, 1, "test")
    first = master.open_zones(runtime_using(tmp_path, same, grown, same))
    assert sorted(first) == ["grows", layout.ZONE_NAME, "same"]
    for zone in first.values():
        probe.store(probe.ZoneAccess(zone.buffer, zone.spec.version), COUNTER, 7)
    master.current = Generation(1, master.runtime, first, (), ())

    bigger = ZoneSpec("grows", 8192, 1, "test")
    second = master.open_zones(runtime_using(tmp_path, same, bigger, ZoneSpec("new", 4096, 3, "test")))
    assert second["same"] is first["same"] and second[layout.ZONE_NAME] is first[layout.ZONE_NAME]
    assert probe.load(probe.ZoneAccess(second["same"].buffer, 1), COUNTER) == 7
    assert second["grows"] is not first["grows"] and len(second["grows"].buffer) == 8192
    assert probe.load(probe.ZoneAccess(second["grows"].buffer, 1), COUNTER) == 0
    # The old generation's workers keep the zone they were given until they exit.
    assert probe.load(probe.ZoneAccess(first["grows"].buffer, 1), COUNTER) == 7
    assert ("zone 'grows' of test recreated empty: 8192 bytes, layout version 1 (was 4096 bytes, "
            "version 1, of test)") in caplog.text
    assert "zone 'new' of test created: 4096 bytes, layout version 3" in caplog.text

    master.current = Generation(2, master.runtime, second, (), ())
    third = master.open_zones(runtime_using(tmp_path, ZoneSpec("same", 4096, 2, "test")))  # new layout
    assert third["same"] is not second["same"] and "grows" not in third
    assert "zone 'same' of test recreated empty: 4096 bytes, layout version 2" in caplog.text

    for clash in (ZoneSpec("same", 8192, 1, "test"), ZoneSpec("same", 4096, 1, "another")):
        with pytest.raises(ValueError, match="declared twice, differently"):
            ZoneSet.open([same, clash])
    with pytest.raises(ValueError, match="bad zone spec"):
        ZoneSpec("tiny", 32, 1, "test")
    with pytest.raises(ValueError, match="not a fastproxy zone of layout version 2"):
        probe.ZoneAccess(first["same"].buffer, 2)


# --- atomics, lock and seqlock under forked processes ---------------------------------------

def test_fetch_add_and_compare_and_swap_are_exact_across_processes(probe, children):
    zones = ZoneSet.open([TEST_ZONE])
    access = probe.ZoneAccess(zones[TEST_ZONE.name].buffer, TEST_ZONE.version)
    tokens, tries, n = 150_000, 100_000, 200_000
    probe.store(access, TOKENS, tokens)
    taken_r, taken_w = os.pipe()

    def work():
        probe.hammer_fetch_add(access, n)
        os.write(taken_w, probe.take_tokens(access, tries).to_bytes(8, "little"))

    pids = [children(work) for _ in range(3)]
    taken = [int.from_bytes(os.read(taken_r, 8), "little") for _ in pids]
    for pid in pids:
        wait_ok(pid)
    assert probe.load(access, COUNTER) == 3 * n
    assert sum(taken) == tokens and probe.load(access, TOKENS) == 0  # none lost, none twice


def test_seqlock_readers_never_see_a_record_half_written(probe, children):
    zones = ZoneSet.open([TEST_ZONE])
    access = probe.ZoneAccess(zones[TEST_ZONE.name].buffer, TEST_ZONE.version)
    done_r, done_w = os.pipe()

    def write():
        os.write(done_w, probe.hammer_locked(access, 100).to_bytes(8, "little"))

    def read():
        reads, torn = probe.count_torn_reads(access)
        assert torn == 0, f"{torn} of {reads} reads saw a half-written record"

    writers = [children(write) for _ in range(2)]
    readers = [children(read) for _ in range(2)]
    wait_until(lambda: probe.load(access, GUARDED) >= 100_000 and probe.load(access, READS) >= 100_000,
               30, 0.01, "writers and readers to make progress")
    probe.store(access, STOP, 1)
    updates = sum(int.from_bytes(os.read(done_r, 8), "little") for _ in writers)
    for pid in writers + readers:
        wait_ok(pid)
    assert probe.read_guarded(access) == (updates, True)
    assert access.lock_owner == 0 and access.seq == 2 * updates


def test_zone_lock_of_a_worker_killed_holding_it_is_released_by_the_master(probe, children,
                                                                             tmp_path, caplog):
    """Workers hammer a zone under its lock; one is SIGKILLed holding it, mid-write. The
    real master's reap path (Master.reap -> on_worker_exit) frees it and the others carry on."""
    caplog.set_level(logging.WARNING, "fastproxy.master")
    runtime = runtime_using(tmp_path, TEST_ZONE)
    master = Master(str(tmp_path / "fastproxy.toml"), runtime)
    gen = master.current = Generation(1, runtime, master.open_zones(runtime), (), ())
    zone = gen.zones[TEST_ZONE.name]
    access = probe.ZoneAccess(zone.buffer, TEST_ZONE.version)

    def spawn(slot, work):
        """As Master.spawn does, with `work` for the worker's life."""
        counter_slot = master.metrics.assign_counter_slot()
        pid = children(lambda: work(probe.ZoneAccess(zone.buffer, TEST_ZONE.version)))
        master.workers[pid] = WorkerProcess(pid, slot, gen, ready_fd=-1, started=time.monotonic())
        master.metrics.add_worker(pid, slot, gen.number, counter_slot)
        return pid

    done_r, done_w = os.pipe()
    held_r, held_w = os.pipe()

    def hammer(own):
        os.write(done_w, probe.hammer_locked(own).to_bytes(8, "little"))

    def die_holding_the_lock(own):
        probe.lock_and_tear(own)
        os.write(held_w, b"!")
        signal.pause()

    hammers = [spawn(slot, hammer) for slot in range(3)]
    wait_until(lambda: probe.load(access, GUARDED) >= 10_000, 30, 0.01, "the workers to hammer")
    victim = spawn(3, die_holding_the_lock)
    assert os.read(held_r, 1) == b"!"
    os.kill(victim, signal.SIGKILL)
    os.waitid(os.P_PID, victim, os.WEXITED | os.WNOWAIT)  # dead, left for the master to reap
    assert access.lock_owner == victim and access.seq % 2 == 1
    stuck_at = probe.load(access, GUARDED)

    master.reap()
    assert victim not in master.workers
    wait_until(lambda: probe.load(access, GUARDED) >= stuck_at + 10_000, 10, 0.01,
               "the other workers to carry on after the master reaped the lock holder")
    assert f"pid {victim} died holding the lock of zone 'test.lock'; released it" in caplog.text
    probe.store(access, STOP, 1)
    updates = sum(int.from_bytes(os.read(done_r, 8), "little") for _ in hammers)
    for pid in hammers:
        wait_ok(pid)
    # Every update counted once, the dead worker's half one included; the next writer
    # completed the record it tore.
    assert probe.read_guarded(access) == (updates + 1, True)
    assert access.lock_owner == 0 and access.seq % 2 == 0


# --- names far past the metrics zone's capacity, on a real proxy -----------------------------

ROUTES_PER_GENERATION = 100
UPSTREAMS_PER_GENERATION = 10
RELOADS = 10


def generation_config(origin, gen):
    """100 routes named for this generation (10 of them through 10 upstreams also named for it)."""
    routes = [{"name": f"g{gen}-r{i}", "path": f"/g{gen}/r{i}", "respond": respond(200, "ok")}
              for i in range(ROUTES_PER_GENERATION - UPSTREAMS_PER_GENERATION)]
    routes += [{"name": f"g{gen}-p{i}", "path_prefix": f"/g{gen}/p{i}/", "upstream": f"g{gen}-u{i}"}
               for i in range(UPSTREAMS_PER_GENERATION)]
    return {"upstreams": {f"g{gen}-u{i}": upstream(origin) for i in range(UPSTREAMS_PER_GENERATION)},
            "routes": routes}


def request_every_route(proxy, gen):
    with RawClient(proxy.port) as client:
        for i in range(ROUTES_PER_GENERATION - UPSTREAMS_PER_GENERATION):
            assert client.request("GET", f"/g{gen}/r{i}").status == 200
        for i in range(UPSTREAMS_PER_GENERATION):
            assert client.request("GET", f"/g{gen}/p{i}/echo").status == 200


def series(text, name, label):
    """{label value: summed value} of a metric family."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            value = line[line.index(f'{label}="') + len(label) + 2:].split('"', 1)[0]
            values[value] = values.get(value, 0) + float(line.rsplit(" ", 1)[1])
    return values


def test_1000_routes_renamed_across_10_reloads_keep_metrics_totals_exact(make_proxy, origin):
    proxy = make_proxy(generation_config(origin, 0))
    for gen in range(RELOADS + 1):
        if gen:
            proxy.write_config(generation_config(origin, gen))
            proxy.reload()
        request_every_route(proxy, gen)
        sent = (gen + 1) * ROUTES_PER_GENERATION
        proxied = (gen + 1) * UPSTREAMS_PER_GENERATION

        def counted():
            text = proxy.metrics()
            routes = series(text, "fastproxy_requests_total", "route")
            return text if sum(routes.values()) - routes.get("_unrouted", 0) >= sent else None
        text = wait_until(counted, 10, message=f"{sent} requests counted")
        routes = series(text, "fastproxy_requests_total", "route")
        assert sum(routes.values()) - routes.get("_unrouted", 0) == sent, routes
        assert summed_metric(text, "fastproxy_requests_total", code="2xx") == sent
        histograms = series(text, "fastproxy_request_duration_seconds_count", "route")
        assert sum(histograms.values()) - histograms.get("_unrouted", 0) == sent
        upstreams = series(text, "fastproxy_upstream_requests_total", "upstream")
        assert sum(upstreams.values()) == proxied, upstreams
        # This generation's names each count their one request, whatever happened before.
        assert all(routes[f"g{gen}-r{i}"] == 1 for i in range(ROUTES_PER_GENERATION - UPSTREAMS_PER_GENERATION))
        assert all(upstreams[f"g{gen}-u{i}"] == 1 for i in range(UPSTREAMS_PER_GENERATION))
        assert len(routes) <= layout.MAX_ROUTES and len(upstreams) <= layout.MAX_UPSTREAMS

    # 1,100 route and 110 upstream names in all: the first generations' were reclaimed, and
    # what they counted is in "_retired".
    assert "g0-r0" not in routes and "g0-u0" not in upstreams
    assert routes["_retired"] >= ROUTES_PER_GENERATION and upstreams["_retired"] >= UPSTREAMS_PER_GENERATION
    assert proxy.generation() == RELOADS + 1
