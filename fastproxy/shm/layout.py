"""Layout of the metrics zone: the only place on the Python side that does offset arithmetic.

The zone starts with the header every zone has (magic, layout version, size, lock, seqlock;
fastproxy/core/zones.pyx). What a counter slot holds is the Cython writer's business
(fastproxy/core/metrics.pyx): this module asks it how big a slot is, places the sections, and
the master passes the placement to the Cython side at worker start, so nothing is mirrored.
Every other field is an 8-byte aligned, native-endian uint64; positions are offsets from the
start of the zone, never pointers.

    offset   section          written by              content
    0        zone header      master, at creation     see fastproxy/core/zones.pyx
    64       master info      master                  start time, pid, generation, high-water marks
    128      config path      master                  length in master info, then the bytes
    640      route names      master, under seqlock   MAX_ROUTES slots: length word (0 = free) + bytes
    66176    upstream names   master, under seqlock   MAX_UPSTREAMS slots
    82560    server names     master, under seqlock   MAX_SERVERS slots: "upstream/ip:port"
    213632   worker table     master                  MAX_WORKERS entries for /status
    221824   slot table       master                  one word per counter slot: 0 free, 1 assigned
    222912   server states    workers, checker        MAX_SERVERS ServerState records (atomics)
    288448   counter slots    the owning worker       COUNTER_SLOTS slots; slot 0 is the master's

Concurrency rule (one per section; docs/metrics.md says it in full):
- Master info, worker table and slot table: one writer, the master, publishing with store order
  (a worker entry's state is stored last on add and first on remove).
- Name tables: one writer, the master, inside a seqlock write of the zone (zone header `seq`),
  since a reclaimed index changes name and counters together; readers read names and sum
  counters inside one seqlock read and retry when it overlapped a write.
- Server states: shared by every worker and the health checker, each word updated by atomic
  read-modify-write or compare-and-swap, never under a lock (fastproxy/core/metrics.pyx,
  ServerState, says who writes which word); the master writes `flags`, and zeroes a record
  when its index is reclaimed.
- Counter slots: one writer per slot, the worker the master gave it to at fork (plain relaxed
  stores, no atomic read-modify-write); slot 0 belongs to the master, which folds the counters
  of reclaimed names into its "_retired" records. See fastproxy/core/metrics.pyx.
"""
from __future__ import annotations

# What the Cython side defines, for the offsets below and the reader's labels.
from fastproxy._core import (  # noqa: F401 (the names' tuples: re-exported for the reader)
    CHECK_FAILURE_NAMES, CHECK_STATE_NAMES, CODING_NAMES, DURATION_BUCKETS, MIRROR_RESULT_NAMES,
    SERVER_STATE_SIZE, TLS_FAILURE_NAMES, TLS_VERSION_NAMES, UNROUTED_ROUTE, UPSTREAM_ERROR_KIND_NAMES,
    ZONE_HEADER_SIZE, metrics_slot_size)

ZONE_NAME = "metrics"
LAYOUT_VERSION = 8  # 1: one fixed region, names append-only; 2: no compression counters; 3: no mirror
# counters; 4: no static-file counters; 5: no TLS counters, no servers; 6: no check_failure;
# 7: no upstream retries
WORD = 8
CACHE_LINE = 64

# Names in use at once, by the running, booting and draining generations together (and the
# reserved ones); names no live generation uses are reclaimed when room is needed.
MAX_ROUTES = 256
MAX_UPSTREAMS = 64
MAX_SERVERS = 512  # an upstream's server per resolved address, "_retired" included
MAX_WORKERS = 128  # alive at once: running plus draining
COUNTER_SLOTS = MAX_WORKERS + 1  # one per worker alive at once, plus the master's
MASTER_SLOT = 0  # holds the "_retired" counts; never given to a worker

# Reserved names, registered at creation: route 0 counts requests that matched no route (the
# writer maps route -1 to it); "_retired" (route 1, upstream 0) holds the counts of names
# that were reclaimed, so totals over all names stay exact.
UNROUTED_NAME = "_unrouted"
RETIRED_NAME = "_retired"
RETIRED_ROUTE = 1
RETIRED_UPSTREAM = 0
RESERVED_ROUTES = {UNROUTED_NAME: UNROUTED_ROUTE, RETIRED_NAME: RETIRED_ROUTE}
RESERVED_UPSTREAMS = {RETIRED_NAME: RETIRED_UPSTREAM}
RETIRED_SERVER = 0
RESERVED_SERVERS = {RETIRED_NAME: RETIRED_SERVER}

UPSTREAM_ERROR_KINDS = UPSTREAM_ERROR_KIND_NAMES
MIRROR_RESULTS = MIRROR_RESULT_NAMES

# --- master info: word indexes from MASTER_OFFSET ---
MASTER_OFFSET = ZONE_HEADER_SIZE
M_START_TIME_US = 0  # unix time, microseconds
M_PID = 1
M_GENERATION = 2
M_CONFIG_PATH_LEN = 3
M_SLOTS_HIGH = 4  # 1 + the highest counter slot ever assigned; readers sum slots below it
M_ROUTES_HIGH = 5  # 1 + the highest route index ever given; readers scan names below it
M_UPSTREAMS_HIGH = 6
M_SERVERS_HIGH = 7
MASTER_SIZE = 64
CONFIG_PATH_OFFSET = MASTER_OFFSET + MASTER_SIZE
CONFIG_PATH_SIZE = 512

# --- name tables: each slot is one length word (0: free) followed by the UTF-8 bytes ---
NAME_SIZE = 256
NAME_MAX_BYTES = NAME_SIZE - WORD
ROUTE_NAMES_OFFSET = CONFIG_PATH_OFFSET + CONFIG_PATH_SIZE
UPSTREAM_NAMES_OFFSET = ROUTE_NAMES_OFFSET + MAX_ROUTES * NAME_SIZE
SERVER_NAMES_OFFSET = UPSTREAM_NAMES_OFFSET + MAX_UPSTREAMS * NAME_SIZE

# --- worker table (for /status) ---
WORKERS_OFFSET = SERVER_NAMES_OFFSET + MAX_SERVERS * NAME_SIZE
WORKER_ENTRY_SIZE = 64
W_STATE = 0  # written last on add, first on remove: a reader skips entries whose state is free
W_PID = 1
W_WORKER_SLOT = 2
W_GENERATION = 3
W_START_TIME_US = 4
W_COUNTER_SLOT = 5
WORKER_FREE = 0
WORKER_RUNNING = 1
WORKER_DRAINING = 2
WORKER_STATE_NAMES = {WORKER_RUNNING: "running", WORKER_DRAINING: "draining"}

# --- slot table: one word per counter slot ---
SLOT_TABLE_OFFSET = WORKERS_OFFSET + MAX_WORKERS * WORKER_ENTRY_SIZE
SLOT_FREE = 0
SLOT_ASSIGNED = 1

# --- server states (their content: fastproxy/core/metrics.pyx, ServerState) ---
SERVER_STATES_OFFSET = -(-(SLOT_TABLE_OFFSET + COUNTER_SLOTS * WORD) // CACHE_LINE) * CACHE_LINE

# --- counter slots (their content: fastproxy/core/metrics.pyx) ---
COUNTERS_OFFSET = SERVER_STATES_OFFSET + MAX_SERVERS * SERVER_STATE_SIZE
COUNTER_SLOT_SIZE = metrics_slot_size(MAX_ROUTES, MAX_UPSTREAMS, MAX_SERVERS)
TOTAL_SIZE = COUNTERS_OFFSET + COUNTER_SLOTS * COUNTER_SLOT_SIZE

assert MASTER_OFFSET % CACHE_LINE == 0 and M_SERVERS_HIGH * WORD < MASTER_SIZE
assert SERVER_STATE_SIZE % CACHE_LINE == 0
assert W_COUNTER_SLOT * WORD < WORKER_ENTRY_SIZE and COUNTER_SLOT_SIZE % CACHE_LINE == 0


def master_word(field: int) -> int:
    return MASTER_OFFSET // WORD + field


def route_name_offset(index: int) -> int:
    """Byte offset of a route name slot (its length word comes first)."""
    return ROUTE_NAMES_OFFSET + index * NAME_SIZE


def upstream_name_offset(index: int) -> int:
    return UPSTREAM_NAMES_OFFSET + index * NAME_SIZE


def server_name_offset(index: int) -> int:
    return SERVER_NAMES_OFFSET + index * NAME_SIZE


def worker_word(entry: int, field: int) -> int:
    return (WORKERS_OFFSET + entry * WORKER_ENTRY_SIZE) // WORD + field


def slot_table_word(slot: int) -> int:
    return SLOT_TABLE_OFFSET // WORD + slot


# Where the counter slots are, as MetricsSlots (fastproxy/core/metrics.pyx) takes it.
COUNTER_SLOTS_GEOMETRY = (COUNTERS_OFFSET, COUNTER_SLOTS, MAX_ROUTES, MAX_UPSTREAMS, MAX_SERVERS,
                          SERVER_STATES_OFFSET)
