"""The shared region, master side: create it once, register names, hand out counter slots.

Only the master calls the methods that write here, and only from its main loop (never from a
signal handler). Workers inherit the region at fork and never write through this class: they
count through the Cython MetricsWriter (fastproxy/core/metrics.pyx) into the one counter slot the
master assigned them, and read through fastproxy/shm/reader.py when serving the admin endpoint.

Writes go through a memoryview cast to 'Q', so each is a single aligned 8-byte store; nothing
here reads, modifies and writes a counter (the counters belong to the workers). The concurrency
rule for each section is in fastproxy/shm/layout.py and docs/metrics.md.

Master call sequence::

    region = SharedRegion.create()                  # once, before the first fork
    region.set_master_info(os.getpid(), generation, config_path)   # at start and each reload
    route_idx = region.register_routes([r.name for r in runtime.routes])
    upstream_idx = region.register_upstreams([u.name for u in runtime.upstreams])
    slot = region.assign_counter_slot()             # per worker, before its fork
    pid = os.fork()   # child: MetricsWriter over region.buffer and `slot`
    region.add_worker(pid, worker_slot, generation, slot)
    region.set_worker_state(pid, WORKER_DRAINING)   # when it is told to drain
    region.remove_worker(pid)                       # when it is reaped: frees its counter slot
"""
from __future__ import annotations

import mmap
import time
from typing import Iterable, Optional, Tuple

from . import layout as L


class RegionFull(RuntimeError):
    """A fixed-size table of the region has no room left."""


class SharedRegion:
    def __init__(self, buffer: mmap.mmap):
        """Wrap a region made by create() (workers get it already wrapped, through fork)."""
        self.buffer = buffer
        self.words = memoryview(buffer).cast("Q")
        if (len(buffer) < L.TOTAL_SIZE
                or self.words[L.header_word(L.H_MAGIC)] != L.MAGIC
                or self.words[L.header_word(L.H_VERSION)] != L.LAYOUT_VERSION
                or self.words[L.header_word(L.H_TOTAL_SIZE)] != L.TOTAL_SIZE):
            raise ValueError(f"not a fastproxy shared region of layout version {L.LAYOUT_VERSION}")

    @classmethod
    def create(cls) -> "SharedRegion":
        """Map a fresh zeroed region; call once in the master before the first fork."""
        buffer = mmap.mmap(-1, L.TOTAL_SIZE, flags=mmap.MAP_SHARED)
        words = memoryview(buffer).cast("Q")
        for field, value in (
            (L.H_VERSION, L.LAYOUT_VERSION),
            (L.H_TOTAL_SIZE, L.TOTAL_SIZE),
            (L.H_MAX_ROUTES, L.MAX_ROUTES),
            (L.H_MAX_UPSTREAMS, L.MAX_UPSTREAMS),
            (L.H_MAX_WORKERS, L.MAX_WORKERS),
            (L.H_MAX_COUNTER_SLOTS, L.MAX_COUNTER_SLOTS),
            (L.H_COUNTER_SLOT_SIZE, L.COUNTER_SLOT_SIZE),
            (L.H_MAGIC, L.MAGIC),  # last: the region is valid from here on
        ):
            words[L.header_word(field)] = value
        words[L.master_word(L.M_START_TIME_US)] = int(time.time() * 1e6)
        words.release()
        region = cls(buffer)
        region.register_routes([L.UNROUTED_NAME], _reserved_ok=True)
        return region

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

    # --- name tables ---

    def register_routes(self, names: Iterable[str], *, _reserved_ok: bool = False) -> Tuple[int, ...]:
        """Indexes for route names, registering new ones; a name keeps its index for good.

        Route index 0 is the reserved "_unrouted" route (requests that matched no route).
        """
        names = list(names)
        if not _reserved_ok and L.UNROUTED_NAME in names:
            raise ValueError(f"route name {L.UNROUTED_NAME!r} is reserved for unmatched requests")
        return self._register(names, L.H_ROUTE_COUNT, L.MAX_ROUTES, L.route_name_offset, "route")

    def register_upstreams(self, names: Iterable[str]) -> Tuple[int, ...]:
        """Indexes for upstream names, registering new ones; a name keeps its index for good."""
        return self._register(list(names), L.H_UPSTREAM_COUNT, L.MAX_UPSTREAMS,
                              L.upstream_name_offset, "upstream")

    def route_names(self) -> Tuple[str, ...]:
        return self._names(L.H_ROUTE_COUNT, L.route_name_offset)

    def upstream_names(self) -> Tuple[str, ...]:
        return self._names(L.H_UPSTREAM_COUNT, L.upstream_name_offset)

    def _names(self, count_field: int, offset_of) -> Tuple[str, ...]:
        count = self.words[L.header_word(count_field)]
        names = []
        for index in range(count):
            offset = offset_of(index)
            length = self.words[offset // L.WORD]
            names.append(bytes(self.buffer[offset + L.WORD:offset + L.WORD + length]).decode())
        return tuple(names)

    def _register(self, names, count_field, capacity, offset_of, kind) -> Tuple[int, ...]:
        for name in names:
            if not 0 < len(name.encode()) <= L.NAME_MAX_BYTES:
                raise ValueError(f"{kind} name {name!r} must be 1 to {L.NAME_MAX_BYTES} bytes of UTF-8")
        known = {name: index for index, name in enumerate(self._names(count_field, offset_of))}
        new = [name for name in dict.fromkeys(names) if name not in known]
        if len(known) + len(new) > capacity:
            raise RegionFull(
                f"the shared region holds at most {capacity} {kind} names since the master started "
                f"({len(known)} registered, {len(new)} new); restart the master to start afresh"
            )
        for name in new:
            index = len(known)
            raw = name.encode()
            offset = offset_of(index)
            self.buffer[offset + L.WORD:offset + L.WORD + len(raw)] = raw
            self.words[offset // L.WORD] = len(raw)
            self.words[L.header_word(count_field)] = index + 1  # publishes the name
            known[name] = index
        return tuple(known[name] for name in names)

    # --- counter slots ---

    def assign_counter_slot(self) -> int:
        """Take the lowest free counter slot for a worker about to be forked."""
        for slot in range(L.MAX_COUNTER_SLOTS):
            if self.words[L.slot_table_word(slot)] == L.SLOT_FREE:
                self.words[L.slot_table_word(slot)] = L.SLOT_ASSIGNED
                high = L.header_word(L.H_SLOTS_HIGH)
                if slot >= self.words[high]:
                    self.words[high] = slot + 1
                return slot
        raise RegionFull(f"all {L.MAX_COUNTER_SLOTS} counter slots are held by live workers")

    def release_counter_slot(self, slot: int) -> None:
        """Free the slot of a reaped worker (or of a fork that failed).

        Its counters stay, so totals keep what the worker counted; only the active-connections
        gauge is zeroed, since the dead owner's connections are gone.
        """
        self.words[L.counter_slot_word(slot) + L.C_ACTIVE_CONNECTIONS] = 0
        self.words[L.slot_table_word(slot)] = L.SLOT_FREE

    # --- worker table ---

    def add_worker(self, pid: int, worker_slot: int, generation: int, counter_slot: int) -> None:
        """Record a forked worker as running (call in the master right after fork)."""
        entry = self._free_worker_entry()
        if entry is None:
            raise RegionFull(f"the worker table holds at most {L.MAX_WORKERS} workers")
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
            raise KeyError(f"no worker with pid {pid} in the shared region")
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

    def _worker_entry(self, pid: int) -> Optional[int]:
        for entry in range(L.MAX_WORKERS):
            if (self.words[L.worker_word(entry, L.W_STATE)] != L.WORKER_FREE
                    and self.words[L.worker_word(entry, L.W_PID)] == pid):
                return entry
        return None

    def _free_worker_entry(self) -> Optional[int]:
        for entry in range(L.MAX_WORKERS):
            if self.words[L.worker_word(entry, L.W_STATE)] == L.WORKER_FREE:
                return entry
        return None
