"""Layout of the shared region: the only place on the Python side that does offset arithmetic.

The region is one anonymous MAP_SHARED mmap created by the master before the first fork and
kept for the master's whole life (reloads included). Every field is an 8-byte aligned,
little-endian uint64 (the gauge is never negative, so no signed field is needed); positions are
offsets from the start of the region, never pointers, so every process reads the same layout
whatever address the mapping has in it.

    offset   section          written by              content
    0        header           master (create)         magic, layout version, sizes, table counts
    128      master info      master                  pid, generation, start time, config path
    704      route names      master, before fork     MAX_ROUTES name slots, append-only
    66240    upstream names   master, before fork     MAX_UPSTREAMS name slots, append-only
    82624    worker table     master                  MAX_WORKERS entries for /status
    90816    slot table       master                  one word per counter slot: 0 free, 1 assigned
    91840    counter slots    the owning worker       MAX_COUNTER_SLOTS blocks of counters

Concurrency rule (one per structure, see docs/metrics.md):
- Header, master info, name tables, worker table and slot table have a single writer, the master.
  Names are append-only: a name's bytes and length are written before the table count that
  publishes it, and an index, once given, names the same thing until the master exits.
- A counter slot has a single writer, the worker the master assigned it to at fork. It adds with
  plain aligned 64-bit loads and stores (no locks, no atomic read-modify-write needed: nobody else
  writes). Readers sum every slot and may see one slot a few increments behind another, never a
  torn value. Counters are cumulative and never reset; when the owner is reaped the master may
  give the slot to a new worker, which keeps adding, so totals stay exact across deaths and
  reloads. The one exception is the active-connections gauge, which the master zeroes when it
  reaps the owner (the owner is dead, so it is still a single writer at any time).

fastproxy/core/metrics.pyx mirrors these constants for the Cython writer; a test compares
``mirrored_constants()`` with the compiled module's ``metrics_layout_constants()``.
"""
from __future__ import annotations

MAGIC = int.from_bytes(b"fastprxy", "little")
LAYOUT_VERSION = 1
WORD = 8
CACHE_LINE = 64

MAX_ROUTES = 256
MAX_UPSTREAMS = 64
MAX_WORKERS = 128
MAX_COUNTER_SLOTS = 128

# Route index 0 is registered at creation for requests that matched no route (404s); the
# writer maps route -1 to it.
UNROUTED_ROUTE = 0
UNROUTED_NAME = "_unrouted"

# --- header: word indexes from offset 0 ---
HEADER_OFFSET = 0
HEADER_SIZE = 128
H_MAGIC = 0
H_VERSION = 1
H_TOTAL_SIZE = 2
H_MAX_ROUTES = 3
H_MAX_UPSTREAMS = 4
H_MAX_WORKERS = 5
H_MAX_COUNTER_SLOTS = 6
H_COUNTER_SLOT_SIZE = 7
H_ROUTE_COUNT = 8  # names registered so far; publishes the name slots below it
H_UPSTREAM_COUNT = 9
H_SLOTS_HIGH = 10  # 1 + the highest counter slot ever assigned; readers sum slots below it

# --- master info ---
MASTER_OFFSET = HEADER_OFFSET + HEADER_SIZE
M_PID = 0
M_GENERATION = 1
M_START_TIME_US = 2  # unix time, microseconds
M_CONFIG_PATH_LEN = 3
MASTER_FIXED_SIZE = 64
CONFIG_PATH_OFFSET = MASTER_OFFSET + MASTER_FIXED_SIZE
CONFIG_PATH_SIZE = 512
MASTER_SIZE = MASTER_FIXED_SIZE + CONFIG_PATH_SIZE

# --- name tables: each slot is one length word followed by the UTF-8 bytes ---
NAME_SIZE = 256
NAME_MAX_BYTES = NAME_SIZE - WORD
ROUTE_NAMES_OFFSET = MASTER_OFFSET + MASTER_SIZE
UPSTREAM_NAMES_OFFSET = ROUTE_NAMES_OFFSET + MAX_ROUTES * NAME_SIZE

# --- worker table (for /status) ---
WORKERS_OFFSET = UPSTREAM_NAMES_OFFSET + MAX_UPSTREAMS * NAME_SIZE
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

# --- counter slots: word indexes relative to the start of a slot ---
COUNTERS_OFFSET = SLOT_TABLE_OFFSET + MAX_COUNTER_SLOTS * WORD
C_BYTES_IN = 0  # bytes received from clients
C_BYTES_OUT = 1  # bytes sent to clients
C_CONNECTIONS_ACCEPTED = 2
C_ACTIVE_CONNECTIONS = 3  # gauge; zeroed by the master when it reaps the owner
SLOT_GLOBAL_WORDS = 8

# Per upstream: requests sent, then one error counter per kind (index = U_ERRORS + kind).
U_REQUESTS = 0
U_ERRORS = 1
UPSTREAM_CONNECT = 0  # connect failed or refused
UPSTREAM_RESET = 1  # connection reset or closed before a full response
UPSTREAM_TIMEOUT = 2
UPSTREAM_ERROR_KINDS = ("connect", "reset", "timeout")
UPSTREAM_WORDS = U_ERRORS + len(UPSTREAM_ERROR_KINDS)
SLOT_UPSTREAMS_WORD = SLOT_GLOBAL_WORDS

# Per route: requests by status class (1xx..5xx), then the duration histogram's buckets, stored
# per bucket (not cumulative: one store per request) and made cumulative when rendered, then the
# duration sum in integer microseconds. The histogram's count is the sum of its buckets, so a
# rendered histogram is always self-consistent.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = 5
R_STATUS = 0
R_BUCKETS = R_STATUS + STATUS_CLASSES
BUCKET_COUNT = len(DURATION_BUCKETS) + 1  # the last one is +Inf
R_DURATION_SUM_US = R_BUCKETS + BUCKET_COUNT
ROUTE_WORDS = R_DURATION_SUM_US + 1
SLOT_ROUTES_WORD = SLOT_UPSTREAMS_WORD + MAX_UPSTREAMS * UPSTREAM_WORDS

SLOT_WORDS = SLOT_ROUTES_WORD + MAX_ROUTES * ROUTE_WORDS
COUNTER_SLOT_SIZE = SLOT_WORDS * WORD
TOTAL_SIZE = COUNTERS_OFFSET + MAX_COUNTER_SLOTS * COUNTER_SLOT_SIZE

# Slots start on their own cache line so two workers never write the same line.
assert COUNTERS_OFFSET % CACHE_LINE == 0 and COUNTER_SLOT_SIZE % CACHE_LINE == 0
assert WORKERS_OFFSET % WORD == 0 and CONFIG_PATH_OFFSET % WORD == 0


def header_word(field: int) -> int:
    return HEADER_OFFSET // WORD + field


def master_word(field: int) -> int:
    return MASTER_OFFSET // WORD + field


def route_name_offset(index: int) -> int:
    """Byte offset of a route name slot (its length word comes first)."""
    return ROUTE_NAMES_OFFSET + index * NAME_SIZE


def upstream_name_offset(index: int) -> int:
    return UPSTREAM_NAMES_OFFSET + index * NAME_SIZE


def worker_word(entry: int, field: int) -> int:
    return (WORKERS_OFFSET + entry * WORKER_ENTRY_SIZE) // WORD + field


def slot_table_word(slot: int) -> int:
    return SLOT_TABLE_OFFSET // WORD + slot


def counter_slot_word(slot: int) -> int:
    """Word index of the first word of a counter slot."""
    return (COUNTERS_OFFSET + slot * COUNTER_SLOT_SIZE) // WORD


def upstream_block_word(upstream: int) -> int:
    """Word index, relative to a slot, of an upstream's counters."""
    return SLOT_UPSTREAMS_WORD + upstream * UPSTREAM_WORDS


def route_block_word(route: int) -> int:
    """Word index, relative to a slot, of a route's counters."""
    return SLOT_ROUTES_WORD + route * ROUTE_WORDS


def mirrored_constants() -> dict:
    """The constants core/metrics.pyx must agree with (compared by a test)."""
    return {
        "magic": MAGIC,
        "version": LAYOUT_VERSION,
        "total_size": TOTAL_SIZE,
        "max_routes": MAX_ROUTES,
        "max_upstreams": MAX_UPSTREAMS,
        "max_counter_slots": MAX_COUNTER_SLOTS,
        "h_magic": H_MAGIC,
        "h_version": H_VERSION,
        "h_total_size": H_TOTAL_SIZE,
        "counters_offset": COUNTERS_OFFSET,
        "counter_slot_size": COUNTER_SLOT_SIZE,
        "c_bytes_in": C_BYTES_IN,
        "c_bytes_out": C_BYTES_OUT,
        "c_connections_accepted": C_CONNECTIONS_ACCEPTED,
        "c_active_connections": C_ACTIVE_CONNECTIONS,
        "slot_upstreams_word": SLOT_UPSTREAMS_WORD,
        "upstream_words": UPSTREAM_WORDS,
        "u_requests": U_REQUESTS,
        "u_errors": U_ERRORS,
        "upstream_connect": UPSTREAM_CONNECT,
        "upstream_reset": UPSTREAM_RESET,
        "upstream_timeout": UPSTREAM_TIMEOUT,
        "slot_routes_word": SLOT_ROUTES_WORD,
        "route_words": ROUTE_WORDS,
        "r_status": R_STATUS,
        "r_buckets": R_BUCKETS,
        "r_duration_sum_us": R_DURATION_SUM_US,
        "unrouted_route": UNROUTED_ROUTE,
        "duration_buckets": DURATION_BUCKETS,
    }
