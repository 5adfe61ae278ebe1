"""The metrics zone: what the master writes there, and the consistent read /metrics renders.

Only the master calls the methods that write, and only from its main loop (never from a signal
handler). Workers inherit the object at fork; they count through the Cython MetricsWriter
(fastproxy/core/metrics.pyx) into the one counter slot the master assigned them, and read
through snapshot() and status() when serving the admin endpoint. The layout and the rule for
each section are in fastproxy/shm/layout.py; docs/metrics.md tells how counters stay exact.

Master call sequence::

    metrics = MetricsZone.create(zones["metrics"])     # once, before the first fork
    route_ids = metrics.register_routes(names, in_use)  # per generation: in_use = the indexes
    upstream_ids = metrics.register_upstreams(names, in_use)  # live generations still use
    server_ids = metrics.register_servers(keys, in_use)  # Upstream.server_key of each server
    metrics.mark_removed_servers(server_ids)           # when a generation becomes the current one
    metrics.clear_check_results(unchecked_ids)          # then, while no health checker runs
    slot = metrics.assign_counter_slot()               # per worker, before its fork
    pid = os.fork()   # worker: metrics.writer(slot), handed to the core
    metrics.add_worker(pid, worker_slot, generation, slot)
    metrics.set_master_info(os.getpid(), generation, config_path)   # when a generation is up
    metrics.set_worker_state(pid, WORKER_DRAINING)     # when it is told to drain
    metrics.remove_worker(pid)                         # when it is reaped: frees its counter slot
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from fastproxy._core import SERVER_REMOVED_FLAG as SERVER_REMOVED, MetricsSlots

from . import layout as L
from .zones import Zone

CHECK_UNKNOWN = L.CHECK_STATE_NAMES.index("unknown")


class ZoneFull(RuntimeError):
    """A fixed-size table of the metrics zone has no room left."""


class _NameTable:
    """Route or upstream names, master side: name <-> index, reclaiming unused indexes.

    An index names one thing until it is reclaimed: only when the table is full, only an index
    that no live generation uses (the caller says which are in use), least recently registered
    first. Its counters are folded into the "_retired" index before it gets its new name.
    """

    def __init__(self, zone: "MetricsZone", kind: str, capacity: int, offset_of: Callable[[int], int],
                 high_field: int, reserved: Dict[str, int], fold: Callable[[int, int, int, int], None]):
        self.zone = zone
        self.kind = kind
        self.capacity = capacity
        self.offset_of = offset_of
        self.high_word = L.master_word(high_field)
        self.reserved = reserved
        self.fold = fold
        self.index: Dict[str, int] = {raw.decode(): i for i, raw in self.raw_entries()}
        self.last_use: Dict[int, int] = {}  # index -> registration counter when last registered
        self.registrations = 0

    def raw_entries(self) -> List[Tuple[int, bytes]]:
        """(index, UTF-8 name) of the used entries, read from the zone: in the master, or in
        any process inside a seqlock read (then decode only once the read is known whole)."""
        zone = self.zone
        entries = []
        for index in range(min(zone.words[self.high_word], self.capacity)):
            offset = self.offset_of(index)
            length = zone.words[offset // L.WORD]
            if 0 < length <= L.NAME_MAX_BYTES:
                entries.append((index, bytes(zone.buffer[offset + L.WORD:offset + L.WORD + length])))
        return entries

    def create_reserved(self) -> None:
        with self.zone.writing():
            for name, index in self.reserved.items():
                self._write(index, name)

    def register(self, names: Iterable[str], in_use: Iterable[int]) -> Tuple[int, ...]:
        names = list(names)
        for name in names:
            if name in self.reserved:
                raise ValueError(f"{self.kind} name {name!r} is reserved")
            if not 0 < len(name.encode()) <= L.NAME_MAX_BYTES:
                raise ValueError(f"{self.kind} name {name!r} must be 1 to {L.NAME_MAX_BYTES} bytes of UTF-8")
        new = [name for name in dict.fromkeys(names) if name not in self.index]
        if new:
            self._add(new, set(in_use) | {self.index[n] for n in names if n in self.index})
        self.registrations += 1
        ids = tuple(self.index[name] for name in names)
        for index in ids:
            self.last_use[index] = self.registrations
        return ids

    def _add(self, new: List[str], keep: set) -> None:
        taken = set(self.index.values())
        free = [i for i in range(self.capacity) if i not in taken]
        reclaim: List[int] = []
        if len(new) > len(free):
            unused = sorted((i for i in taken if i not in keep and i not in self.reserved.values()),
                            key=lambda i: self.last_use.get(i, 0))
            short = len(new) - len(free)
            if len(unused) < short:
                raise ZoneFull(
                    f"the metrics zone holds at most {self.capacity} {self.kind} names in use at "
                    f"once, reserved ones included ({len(taken) - len(unused)} in use by the running "
                    f"and draining generations, {len(new)} new); reload again once the previous "
                    f"generation has drained")
            reclaim = unused[:short]
        by_index = {i: name for name, i in self.index.items()}
        with self.zone.writing():
            for index in reclaim:
                self.fold(self.zone.slots_high(), index, L.MASTER_SLOT, self.reserved[L.RETIRED_NAME])
                self.zone.words[self.offset_of(index) // L.WORD] = 0
                del self.index[by_index[index]]
            for name, index in zip(new, sorted(free + reclaim)):
                self._write(index, name)

    def _write(self, index: int, name: str) -> None:
        """Store one name (inside a seqlock write: readers never see it half written)."""
        raw = name.encode()
        offset = self.offset_of(index)
        self.zone.buffer[offset + L.WORD:offset + L.WORD + len(raw)] = raw
        self.zone.words[offset // L.WORD] = len(raw)
        if index >= self.zone.words[self.high_word]:
            self.zone.words[self.high_word] = index + 1
        self.index[name] = index


class MetricsZone:
    def __init__(self, zone: Zone):
        """Attach to a metrics zone made by create() (workers get it already attached, through fork)."""
        if zone.spec.version != L.LAYOUT_VERSION or zone.spec.size != L.TOTAL_SIZE:
            raise ValueError(f"zone {zone.name!r} is not a metrics zone of layout version {L.LAYOUT_VERSION}")
        self.zone = zone
        self.access = zone.access
        self.buffer = zone.buffer
        self.words = memoryview(zone.buffer).cast("Q")
        self.slots = MetricsSlots(zone.access, *L.COUNTER_SLOTS_GEOMETRY)
        self.routes = _NameTable(self, "route", L.MAX_ROUTES, L.route_name_offset, L.M_ROUTES_HIGH,
                                 L.RESERVED_ROUTES, self.slots.fold_route)
        self.upstreams = _NameTable(self, "upstream", L.MAX_UPSTREAMS, L.upstream_name_offset,
                                    L.M_UPSTREAMS_HIGH, L.RESERVED_UPSTREAMS, self.slots.fold_upstream)
        self.server_names = _NameTable(self, "server", L.MAX_SERVERS, L.server_name_offset,
                                       L.M_SERVERS_HIGH, L.RESERVED_SERVERS, self.slots.fold_server)

    @classmethod
    def create(cls, zone: Zone) -> "MetricsZone":
        """Lay out a freshly created zone; call once in the master before the first fork."""
        metrics = cls(zone)
        metrics.words[L.master_word(L.M_START_TIME_US)] = int(time.time() * 1e6)
        metrics.routes.create_reserved()
        metrics.upstreams.create_reserved()
        metrics.server_names.create_reserved()
        metrics.words[L.slot_table_word(L.MASTER_SLOT)] = L.SLOT_ASSIGNED
        metrics.words[L.master_word(L.M_SLOTS_HIGH)] = L.MASTER_SLOT + 1
        return metrics

    @contextmanager
    def writing(self):
        """A seqlock write of the zone: readers retry a read that overlaps it (master only)."""
        self.access.write_begin()
        try:
            yield
        finally:
            self.access.write_end()

    # --- master info ---

    def set_master_info(self, pid: int, generation: int, config_path: str) -> None:
        path = config_path.encode()
        if len(path) > L.CONFIG_PATH_SIZE:
            # Only shown in /status: keep the tail, which names the file.
            path = path[-L.CONFIG_PATH_SIZE:]
        self.buffer[L.CONFIG_PATH_OFFSET:L.CONFIG_PATH_OFFSET + len(path)] = path
        self.words[L.master_word(L.M_CONFIG_PATH_LEN)] = len(path)
        self.words[L.master_word(L.M_PID)] = pid
        self.words[L.master_word(L.M_GENERATION)] = generation

    # --- names ---

    def register_routes(self, names: Iterable[str], in_use: Iterable[int] = ()) -> Tuple[int, ...]:
        """Indexes for route names, giving new names free or reclaimed indexes. `in_use`: the
        indexes the live generations (running, booting, draining) still count under."""
        return self.routes.register(names, in_use)

    def register_upstreams(self, names: Iterable[str], in_use: Iterable[int] = ()) -> Tuple[int, ...]:
        return self.upstreams.register(names, in_use)

    def register_servers(self, keys: Iterable[str], in_use: Iterable[int] = ()) -> Tuple[int, ...]:
        """Indexes for server keys (Upstream.server_key): a key the zone already has keeps its
        index, so its health, connections and counters carry over a reload."""
        return self.server_names.register(keys, in_use)

    def mark_removed_servers(self, current: Iterable[int]) -> None:
        """Flag every server index outside the current generation's as removed: workers of a
        draining generation stop choosing those at once."""
        current = set(current)
        for index, _ in self.server_names.raw_entries():
            if index not in L.RESERVED_SERVERS.values():
                self.slots.set_server_flags(index, 0 if index in current else SERVER_REMOVED)

    def clear_check_results(self, indexes: Iterable[int]) -> None:
        """Forget the health checker's results for these servers (their upstream has no checks
        now): called only while no checker runs, since the checker writes them otherwise."""
        for index in indexes:
            self.slots.set_check_result(index, CHECK_UNKNOWN, 0, 0)

    def route_names(self) -> Dict[int, str]:
        return {index: raw.decode() for index, raw in self.routes.raw_entries()}

    def upstream_names(self) -> Dict[int, str]:
        return {index: raw.decode() for index, raw in self.upstreams.raw_entries()}

    # --- counter slots ---

    def slots_high(self) -> int:
        return self.words[L.master_word(L.M_SLOTS_HIGH)]

    def assign_counter_slot(self) -> int:
        """Take the lowest free counter slot for a worker about to be forked."""
        for slot in range(L.COUNTER_SLOTS):
            if self.words[L.slot_table_word(slot)] == L.SLOT_FREE:
                self.words[L.slot_table_word(slot)] = L.SLOT_ASSIGNED
                if slot >= self.slots_high():
                    self.words[L.master_word(L.M_SLOTS_HIGH)] = slot + 1
                return slot
        raise ZoneFull(f"all {L.COUNTER_SLOTS - 1} counter slots are held by live workers")

    def release_counter_slot(self, slot: int) -> None:
        """Free the slot of a reaped worker (or of a fork that failed).

        Its counters stay, so totals keep what the worker counted; only the active-connections
        gauges are zeroed, since the dead owner's connections are gone.
        """
        self.slots.clear_active_connections(slot)
        self.slots.release_server_active(slot, self.words[L.master_word(L.M_SERVERS_HIGH)])
        self.words[L.slot_table_word(slot)] = L.SLOT_FREE

    def writer(self, slot: int):
        """The worker's hot-path writer over its counter slot (call in the worker)."""
        return self.slots.writer(slot)

    # --- worker table ---

    def add_worker(self, pid: int, worker_slot: int, generation: int, counter_slot: int) -> None:
        """Record a forked worker as running (call in the master right after fork)."""
        entry = self._worker_entry(None)
        if entry is None:
            raise ZoneFull(f"the worker table holds at most {L.MAX_WORKERS} workers")
        for field, value in (
            (L.W_PID, pid),
            (L.W_WORKER_SLOT, worker_slot),
            (L.W_GENERATION, generation),
            (L.W_START_TIME_US, int(time.time() * 1e6)),
            (L.W_COUNTER_SLOT, counter_slot),
            (L.W_STATE, L.WORKER_RUNNING),  # last: publishes the entry
        ):
            self.words[L.worker_word(entry, field)] = value

    def set_worker_state(self, pid: int, state: int) -> None:
        entry = self._worker_entry(pid)
        if entry is None:
            raise KeyError(f"no worker with pid {pid} in the metrics zone")
        self.words[L.worker_word(entry, L.W_STATE)] = state

    def remove_worker(self, pid: int) -> Optional[int]:
        """Forget a reaped worker and release its counter slot; returns that slot (None if unknown)."""
        entry = self._worker_entry(pid)
        if entry is None:
            return None
        self.words[L.worker_word(entry, L.W_STATE)] = L.WORKER_FREE  # first: unpublishes the entry
        slot = self.words[L.worker_word(entry, L.W_COUNTER_SLOT)]
        self.words[L.worker_word(entry, L.W_PID)] = 0
        self.release_counter_slot(slot)
        return slot

    def _worker_entry(self, pid: Optional[int]) -> Optional[int]:
        """The entry of a live worker by pid, or with pid None the first free entry."""
        for entry in range(L.MAX_WORKERS):
            free = self.words[L.worker_word(entry, L.W_STATE)] == L.WORKER_FREE
            if (free if pid is None else not free and self.words[L.worker_word(entry, L.W_PID)] == pid):
                return entry
        return None

    # --- reading (any process) ---

    def snapshot(self):
        """(routes, upstreams, global) as one consistent read: routes and upstreams are
        (name, counters) lists in index order, counters as MetricsSlots.totals gives them."""
        while True:
            seq = self.access.read_begin()
            routes = self.routes.raw_entries()
            upstreams = self.upstreams.raw_entries()
            route_span = routes[-1][0] + 1 if routes else 0
            upstream_span = upstreams[-1][0] + 1 if upstreams else 0
            totals, route_totals, upstream_totals, _ = self.slots.totals(
                0, min(self.slots_high(), L.COUNTER_SLOTS), route_span, upstream_span)
            if not self.access.read_retry(seq):
                break
        return ([(raw.decode(), route_totals[i]) for i, raw in routes],
                [(raw.decode(), upstream_totals[i]) for i, raw in upstreams],
                totals)

    def servers(self) -> List[Tuple[str, tuple, dict]]:
        """(key, counters, state) of every registered server, "_retired" first: counters as
        MetricsSlots.totals gives a server's (summed over workers, one consistent read), state
        as MetricsSlots.server_state gives it (read as it is now)."""
        while True:
            seq = self.access.read_begin()
            entries = self.server_names.raw_entries()
            span = entries[-1][0] + 1 if entries else 0
            totals = self.slots.totals(0, min(self.slots_high(), L.COUNTER_SLOTS), 0, 0, span)[3]
            if not self.access.read_retry(seq):
                break
        return [(raw.decode(), totals[i], self.slots.server_state(i)) for i, raw in entries]

    def workers(self) -> List[dict]:
        workers = []
        for entry in range(L.MAX_WORKERS):
            state = self.words[L.worker_word(entry, L.W_STATE)]
            pid = self.words[L.worker_word(entry, L.W_PID)]
            if state == L.WORKER_FREE or pid == 0:  # pid 0: caught between the master's stores
                continue
            counter_slot = self.words[L.worker_word(entry, L.W_COUNTER_SLOT)]
            workers.append({
                "pid": pid,
                "slot": self.words[L.worker_word(entry, L.W_WORKER_SLOT)],
                "generation": self.words[L.worker_word(entry, L.W_GENERATION)],
                "state": L.WORKER_STATE_NAMES.get(state, "unknown"),
                "connections": self.slots.active_connections(counter_slot),
                "started": self.words[L.worker_word(entry, L.W_START_TIME_US)] / 1e6,
            })
        workers.sort(key=lambda w: (w["generation"], w["slot"]))
        return workers

    def master_info(self) -> dict:
        path_len = self.words[L.master_word(L.M_CONFIG_PATH_LEN)]
        path = bytes(self.buffer[L.CONFIG_PATH_OFFSET:L.CONFIG_PATH_OFFSET + path_len])
        return {
            "master_pid": self.words[L.master_word(L.M_PID)],
            "generation": self.words[L.master_word(L.M_GENERATION)],
            "config_path": path.decode(errors="replace"),
            "started": self.words[L.master_word(L.M_START_TIME_US)] / 1e6,
        }
