# Request metrics, runtime side: the counter slots of the metrics zone. The zone's other
# sections (names, worker table, master info) and the master's side are in
# fastproxy/shm/metrics.py; where the slots sit in the zone, and for how many routes and
# upstreams, the master computes (fastproxy/shm/layout.py) and passes in. Included by _core.pyx
# after zones.pyx.
#
# A counter slot is GlobalCounters (compression counters included), then UpstreamCounters
# for every upstream index, then RouteCounters for every route index, then ServerCounters for
# every server index, padded to a cache line.
#
# Besides the slots, the zone holds one ServerState per server index: the state all workers
# share about a server (connections in use across workers, passive and active health). Its
# words have several writers, so every update is an atomic read-modify-write or a
# compare-and-swap, and no update depends on a lock: a worker killed in the middle of one
# leaves a word either updated or not (see ServerState for who writes what).
#
# Concurrency rule: the master gives each worker one counter slot at fork, and that worker is
# the only writer of the slot's records while the indexes they belong to are in use, so an
# increment is a relaxed load, an add and a relaxed store: exact without locks or atomic
# read-modify-write, and never torn for a reader in another process (aligned 64-bit words).
# Readers sum every slot under the zone's seqlock. The master writes a slot's words in two cases
# only, each when no worker writes them: it zeroes the active-connections gauge of a slot whose
# owner it reaped, and it folds the records of a route or upstream index that no live
# generation uses into the "_retired" records of its own slot, under the seqlock, before giving
# the index to another name.

cimport cython
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from includes.atomic cimport (
    fp_load_relaxed, fp_store_relaxed, fp_store_release, fp_fetch_add, fp_compare_exchange)

cdef extern from *:
    """
    static const double fp_duration_bounds[11] = {
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
    """
    const double fp_duration_bounds[11]

cdef enum:
    METRICS_STATUS_CLASSES = 5  # 1xx .. 5xx
    METRICS_FINITE_BUCKETS = 11  # entries of fp_duration_bounds
    METRICS_BUCKETS = METRICS_FINITE_BUCKETS + 1  # and +Inf
    METRICS_UNROUTED_ROUTE = 0  # the route index of requests that matched no route
    METRICS_SLOT_ALIGN = 64  # a cache line: two workers never write the same line

cdef enum UpstreamErrorKind:
    UPSTREAM_CONNECT = 0  # connect failed or refused
    UPSTREAM_RESET = 1  # reset or closed before a full response
    UPSTREAM_TIMEOUT = 2
    UPSTREAM_STATUS = 3  # answered with a status listed in the upstream's fail_status

cdef enum:
    UPSTREAM_ERROR_KINDS = UPSTREAM_STATUS + 1

cdef enum:
    # the content codings fastproxy compresses responses with (core/compress.pyx)
    CODING_ZSTD = 0
    CODING_BR = 1
    CODING_GZIP = 2
    CODINGS = 3

ctypedef struct CodingCounters:
    uint64_t responses  # responses compressed with it, counted when their body ends
    uint64_t bytes_in  # body bytes before compression
    uint64_t bytes_out  # and after

cdef enum MirrorResult:
    # copies of requests sent to an upstream as a mirror (core/f_mirror.pyx)
    MIRROR_SENT = 0  # started
    MIRROR_FAILED = 1  # no complete response (connect, reset, timeout, broken)
    MIRROR_ABANDONED = 2  # its unsent body went over the bound, or its client's upload broke off
    MIRROR_SKIPPED = 3  # selected but not sent: the mirror's max_in_flight copies were in progress

cdef enum:
    MIRROR_RESULTS = MIRROR_SKIPPED + 1

cdef enum:
    TLS_VERSIONS = 2  # TLS 1.2, TLS 1.3 (TLS_VERSION_NAMES)

cdef enum TlsFailure:
    # why a TLS handshake failed (core/tls.pyx)
    TLS_FAIL_UNKNOWN_SNI = 0  # refused by unknown_sni = "reject"
    TLS_FAIL_VERSION = 1  # the client offered no version we accept
    TLS_FAIL_CIPHER = 2  # no cipher suite in common
    TLS_FAIL_NO_CLIENT_CERT = 3  # client_verify = "required" and the client sent none
    TLS_FAIL_BAD_CLIENT_CERT = 4  # a client certificate that did not verify
    TLS_FAIL_NOT_TLS = 5  # plain HTTP or other bytes that are not TLS
    TLS_FAIL_OTHER = 6

cdef enum:
    TLS_FAILURES = TLS_FAIL_OTHER + 1

ctypedef struct GlobalCounters:
    uint64_t bytes_in  # received from clients
    uint64_t bytes_out  # sent to clients
    uint64_t connections_accepted
    uint64_t active_connections  # a gauge: zeroed by the master when it reaps the owner
    CodingCounters codings[CODINGS]  # by CODING_*
    uint64_t static_status[METRICS_STATUS_CLASSES]  # static handler answers, 1xx .. 5xx
    uint64_t tls_handshakes[TLS_VERSIONS][2]  # by version, then full (0) or resumed (1)
    uint64_t tls_failures[TLS_FAILURES]  # by TlsFailure
    uint64_t reserved[3]  # to 256 bytes

ctypedef struct UpstreamCounters:
    uint64_t requests
    uint64_t errors[UPSTREAM_ERROR_KINDS]  # by UpstreamErrorKind
    uint64_t mirrored[MIRROR_RESULTS]  # by MirrorResult, when this upstream is a mirror
    uint64_t retries  # requests sent again to another server (retry_on)

ctypedef struct RouteCounters:
    uint64_t status[METRICS_STATUS_CLASSES]
    # One count per bucket, not cumulative (one store per request); the reader accumulates.
    uint64_t buckets[METRICS_BUCKETS]
    uint64_t duration_sum_us

ctypedef struct ServerCounters:
    uint64_t requests  # exchanges started with it (retries included)
    uint64_t failures[UPSTREAM_ERROR_KINDS]  # by UpstreamErrorKind
    uint64_t active  # a gauge: this worker's connections in use to it (see ServerState.active)
    uint64_t buckets[METRICS_BUCKETS]  # response times, from the request sent to the response's end
    uint64_t duration_sum_us
    uint64_t reserved[1]  # to 160 bytes

cdef enum ServerCheckState:
    # what the health checker last concluded (ServerState.check_state)
    CHECK_UNKNOWN = 0  # not checked yet, or no checks configured
    CHECK_UP = 1
    CHECK_DOWN = 2

cdef enum CheckFailure:
    # why the health checker's last probe of a server failed (ServerState.check_failure)
    CHECK_PASSED = 0
    CHECK_FAIL_CONNECT = 1  # refused or failed to connect
    CHECK_FAIL_TIMEOUT = 2  # no complete response within the check's timeout
    CHECK_FAIL_CLOSED = 3  # reset or closed before a full response head
    CHECK_FAIL_INVALID = 4  # not a valid HTTP response
    CHECK_FAIL_STATUS = 5  # a status outside expect_status
    CHECK_FAIL_BODY = 6  # the body lacks expect_body

cdef enum:
    SERVER_REMOVED = 1  # ServerState.flags: not in the newest generation's config

ctypedef struct ServerState:
    # Times are CLOCK_MONOTONIC microseconds (the same clock in every process), except
    # check_time_us (unix time, for /status).
    uint64_t active  # connections in use across workers: each worker adds and subtracts its
    # own (fetch_add) and mirrors them in its slot's ServerCounters.active, which the
    # master subtracts from here when it reaps that worker
    # passive health, written by workers with compare-and-swap
    uint64_t fails  # the current window's failures in the low 16 bits, its start (monotonic
    # ms) above: one word, so a new window and its first failure are one swap (core/balance.pyx)
    uint64_t window_start_us  # that start in µs, for readers (written after the swap)
    uint64_t down_until_us  # out of service until then; 0: in service
    uint64_t probe_until_us  # once down_until_us passed: a worker sends one probe request until then
    uint64_t up_since_us  # when it last came back into service (slow_start runs from it)
    # active health, written by the health checker only (or by the master while no checker
    # runs: it clears the results of servers whose upstream has no checks any more)
    uint64_t check_state  # ServerCheckState
    uint64_t check_time_us  # when the last probe ended
    uint64_t check_status  # its response status; 0: no response (see the checker's log)
    uint64_t check_failure  # CheckFailure: why the last probe failed; CHECK_PASSED: it passed
    # written by the master only
    uint64_t flags  # SERVER_*
    uint64_t reserved[5]  # to two cache lines

# For the reader's labels: what the bucket bounds and error kinds are.
DURATION_BUCKETS = tuple([fp_duration_bounds[i] for i in range(METRICS_FINITE_BUCKETS)])
UPSTREAM_ERROR_KIND_NAMES = ("connect", "reset", "timeout", "status")  # by UpstreamErrorKind
CHECK_STATE_NAMES = ("unknown", "up", "down")  # by ServerCheckState
# by CheckFailure
CHECK_FAILURE_NAMES = ("passed", "connect", "timeout", "closed", "invalid", "status", "body")
SERVER_STATE_SIZE = sizeof(ServerState)
# ServerState's words in order, as server_state() names them
SERVER_STATE_FIELDS = ("active", "fails", "window_start_us", "down_until_us", "probe_until_us",
                       "up_since_us", "check_state", "check_time_us", "check_status", "check_failure",
                       "flags")
SERVER_REMOVED_FLAG = SERVER_REMOVED
CODING_NAMES = ("zstd", "br", "gzip")  # by CODING_*
MIRROR_RESULT_NAMES = ("sent", "failed", "abandoned", "skipped")  # by MirrorResult
TLS_VERSION_NAMES = ("TLSv1.2", "TLSv1.3")
TLS_FAILURE_NAMES = ("unknown_sni", "protocol_version", "no_shared_cipher", "no_client_certificate",
                     "bad_client_certificate", "not_tls", "other")  # by TlsFailure
UNROUTED_ROUTE = METRICS_UNROUTED_ROUTE


cdef inline uint64_t monotonic_us() noexcept nogil:
    """The clock of ServerState's times: CLOCK_MONOTONIC, the same in every process."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000 + <uint64_t>ts.tv_nsec // 1000


cdef inline void _counter_add(uint64_t *word, uint64_t n) noexcept nogil:
    fp_store_relaxed(word, fp_load_relaxed(word) + n)


cdef inline void _sum_words(uint64_t *into, uint64_t *words, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        into[k] += fp_load_relaxed(words + k)


cdef inline void _move_words(uint64_t *into, uint64_t *words, Py_ssize_t n) noexcept nogil:
    """Add `words` to `into` and zero them (single writer of both, see the rule above)."""
    cdef Py_ssize_t k
    cdef uint64_t v
    for k in range(n):
        v = fp_load_relaxed(words + k)
        if v:
            fp_store_relaxed(into + k, fp_load_relaxed(into + k) + v)
            fp_store_relaxed(words + k, 0)


cdef inline Py_ssize_t _slot_size(int max_routes, int max_upstreams, int max_servers) noexcept nogil:
    cdef Py_ssize_t size = (sizeof(GlobalCounters) + max_upstreams * sizeof(UpstreamCounters)
                            + max_routes * sizeof(RouteCounters) + max_servers * sizeof(ServerCounters))
    return (size + METRICS_SLOT_ALIGN - 1) // METRICS_SLOT_ALIGN * METRICS_SLOT_ALIGN


def metrics_slot_size(int max_routes, int max_upstreams, int max_servers):
    """Bytes of one counter slot for that many route, upstream and server indexes."""
    return _slot_size(max_routes, max_upstreams, max_servers)


@cython.final
cdef class MetricsSlots:
    """The counter slots of the metrics zone: `count` slots from byte `offset` of the zone,
    each for `max_routes` route, `max_upstreams` upstream and `max_servers` server indexes;
    and the `max_servers` ServerState records from byte `states_offset`."""
    cdef ZoneAccess zone  # keeps the mapping alive
    cdef char *first
    cdef ServerState *states
    cdef readonly Py_ssize_t slot_size
    cdef readonly int count, max_routes, max_upstreams, max_servers

    def __cinit__(self, ZoneAccess zone, Py_ssize_t offset, int count, int max_routes,
                  int max_upstreams, int max_servers, Py_ssize_t states_offset):
        if (count < 1 or max_routes < 1 or max_upstreams < 1 or max_servers < 1
                or offset % METRICS_SLOT_ALIGN or states_offset % METRICS_SLOT_ALIGN):
            raise ValueError("counter slots need positive capacities and 64-byte aligned offsets")
        self.slot_size = _slot_size(max_routes, max_upstreams, max_servers)
        if offset < <Py_ssize_t>sizeof(ZoneHeader) or offset + count * self.slot_size > zone.size:
            raise ValueError(f"{count} counter slots of {self.slot_size} bytes from offset {offset} "
                             f"do not fit in a zone of {zone.size} bytes")
        if (states_offset < <Py_ssize_t>sizeof(ZoneHeader)
                or states_offset + max_servers * <Py_ssize_t>sizeof(ServerState) > offset):
            raise ValueError("the server states must lie between the zone header and the counter slots")
        self.zone = zone
        self.first = zone.base + offset
        self.states = <ServerState *>(zone.base + states_offset)
        self.count = count
        self.max_routes = max_routes
        self.max_upstreams = max_upstreams
        self.max_servers = max_servers

    cdef inline GlobalCounters *global_counters(self, int slot) noexcept nogil:
        return <GlobalCounters *>(self.first + slot * self.slot_size)

    cdef inline UpstreamCounters *upstream_counters(self, int slot) noexcept nogil:
        return <UpstreamCounters *>(self.global_counters(slot) + 1)

    cdef inline RouteCounters *route_counters(self, int slot) noexcept nogil:
        return <RouteCounters *>(self.upstream_counters(slot) + self.max_upstreams)

    cdef inline ServerCounters *server_counters(self, int slot) noexcept nogil:
        return <ServerCounters *>(self.route_counters(slot) + self.max_routes)

    cdef int check_slot(self, int slot) except -1:
        if not 0 <= slot < self.count:
            raise ValueError(f"counter slot {slot} out of range 0..{self.count - 1}")
        return 0

    def writer(self, int slot):
        """The hot-path writer over one slot, for the worker the master gave it to."""
        self.check_slot(slot)
        return MetricsWriter.new(self, slot)

    def active_connections(self, int slot):
        self.check_slot(slot)
        return fp_load_relaxed(&self.global_counters(slot).active_connections)

    def clear_active_connections(self, int slot):
        """The master, after reaping the slot's owner: its connections died with it."""
        self.check_slot(slot)
        fp_store_relaxed(&self.global_counters(slot).active_connections, 0)

    def totals(self, int first, int stop, int routes, int upstreams, int servers=0):
        """Counters summed over slots [first, stop), for route indexes [0, routes) and upstream
        indexes [0, upstreams): (global, per route, per upstream), where global is
        (bytes_in, bytes_out, connections_accepted, active_connections, codings,
        static_status, tls_handshakes, tls_failures), codings being (responses, bytes before,
        bytes after) per CODING_*, static_status the static handler's answers by class 1xx ..
        5xx, tls_handshakes (full, resumed) per TLS_VERSION_NAMES, tls_failures by
        TLS_FAILURE_NAMES, a route is (status classes, buckets, duration sum in µs), an
        upstream (requests, errors by kind, mirror copies by result, retries), and for server indexes
        [0, servers), a server (requests, failures by kind, connections in use, buckets,
        duration sum in µs). Call it between the zone's read_begin and read_retry."""
        cdef GlobalCounters g
        cdef UpstreamCounters *u
        cdef RouteCounters *r
        cdef ServerCounters *sc
        cdef int slot
        if not (0 <= first <= stop <= self.count and 0 <= routes <= self.max_routes
                and 0 <= upstreams <= self.max_upstreams and 0 <= servers <= self.max_servers):
            raise ValueError("totals asked beyond the zone's capacities")
        memset(&g, 0, sizeof(g))
        u = <UpstreamCounters *>calloc(upstreams + 1, sizeof(UpstreamCounters))
        r = <RouteCounters *>calloc(routes + 1, sizeof(RouteCounters))
        sc = <ServerCounters *>calloc(servers + 1, sizeof(ServerCounters))
        try:
            if u == NULL or r == NULL or sc == NULL:
                raise MemoryError()
            with nogil:
                for slot in range(first, stop):
                    _sum_words(<uint64_t *>&g, <uint64_t *>self.global_counters(slot),
                               sizeof(GlobalCounters) // sizeof(uint64_t))
                    _sum_words(<uint64_t *>u, <uint64_t *>self.upstream_counters(slot),
                               upstreams * sizeof(UpstreamCounters) // sizeof(uint64_t))
                    _sum_words(<uint64_t *>r, <uint64_t *>self.route_counters(slot),
                               routes * sizeof(RouteCounters) // sizeof(uint64_t))
                    _sum_words(<uint64_t *>sc, <uint64_t *>self.server_counters(slot),
                               servers * sizeof(ServerCounters) // sizeof(uint64_t))
            return (
                (g.bytes_in, g.bytes_out, g.connections_accepted, g.active_connections,
                 tuple([(g.codings[i].responses, g.codings[i].bytes_in, g.codings[i].bytes_out)
                        for i in range(CODINGS)]), tuple(g.static_status),
                 tuple([(g.tls_handshakes[i][0], g.tls_handshakes[i][1]) for i in range(TLS_VERSIONS)]),
                 tuple(g.tls_failures)),
                [(tuple(r[i].status), tuple(r[i].buckets), r[i].duration_sum_us)
                 for i in range(routes)],
                [(u[i].requests, tuple(u[i].errors), tuple(u[i].mirrored), u[i].retries)
                 for i in range(upstreams)],
                [(sc[i].requests, tuple(sc[i].failures), sc[i].active, tuple(sc[i].buckets),
                  sc[i].duration_sum_us) for i in range(servers)],
            )
        finally:
            free(u)
            free(r)
            free(sc)

    def server_state(self, int index):
        """One server's shared state as a dict of its words (a relaxed read of each: /status
        and tests; the words are independent, so no seqlock is needed)."""
        cdef uint64_t *words
        cdef Py_ssize_t i
        cdef dict state = {}
        if not 0 <= index < self.max_servers:
            raise ValueError(f"server index {index} out of range")
        words = <uint64_t *>(self.states + index)
        for i in range(len(SERVER_STATE_FIELDS)):
            state[SERVER_STATE_FIELDS[i]] = fp_load_relaxed(words + i)
        return state

    def set_server_flags(self, int index, uint64_t flags):
        """The master: flags of a server (SERVER_REMOVED when the newest generation dropped it)."""
        if not 0 <= index < self.max_servers:
            raise ValueError(f"server index {index} out of range")
        fp_store_relaxed(&self.states[index].flags, flags)

    def set_check_result(self, int index, int state, uint64_t status, uint64_t unix_us,
                         int failure=CHECK_PASSED):
        """The health checker: the outcome of a server's probes (state a ServerCheckState),
        the last probe's status and why it failed (a CheckFailure)."""
        cdef ServerState *st
        if not (0 <= index < self.max_servers and CHECK_UNKNOWN <= state <= CHECK_DOWN
                and CHECK_PASSED <= failure <= CHECK_FAIL_BODY):
            raise ValueError("check result out of range")
        st = self.states + index
        fp_store_relaxed(&st.check_status, status)
        fp_store_relaxed(&st.check_failure, failure)
        fp_store_relaxed(&st.check_time_us, unix_us)
        if state != <int>fp_load_relaxed(&st.check_state):
            if state == CHECK_UP:
                fp_store_relaxed(&st.up_since_us, monotonic_us())  # slow_start runs from now
            fp_store_release(&st.check_state, state)

    def release_server_active(self, int slot, int servers):
        """The master, after reaping the owner of `slot`: its connections in use died with it,
        so take its share out of every server's total (server indexes [0, servers))."""
        cdef ServerCounters *counters
        cdef uint64_t n
        cdef int i
        self.check_slot(slot)
        counters = self.server_counters(slot)
        for i in range(min(servers, self.max_servers)):
            n = fp_load_relaxed(&counters[i].active)
            if n:
                fp_fetch_add(&self.states[i].active, <uint64_t>0 - n)
                fp_store_relaxed(&counters[i].active, 0)

    def fold_route(self, int slots, int index, int into_slot, int into_index):
        """Move route `index`'s counts in slots [0, slots) to route `into_index` of slot
        `into_slot`. Only the master calls it, inside a seqlock write of the zone, for an
        index no live worker writes."""
        self._fold(slots, index, into_slot, into_index, self.max_routes,
                   <char *>self.route_counters(0) - <char *>self.global_counters(0), sizeof(RouteCounters))

    def fold_upstream(self, int slots, int index, int into_slot, int into_index):
        """fold_route for an upstream index."""
        self._fold(slots, index, into_slot, into_index, self.max_upstreams,
                   <char *>self.upstream_counters(0) - <char *>self.global_counters(0),
                   sizeof(UpstreamCounters))

    def fold_server(self, int slots, int index, int into_slot, int into_index):
        """fold_route for a server index; its shared state starts afresh for the next name."""
        self._fold(slots, index, into_slot, into_index, self.max_servers,
                   <char *>self.server_counters(0) - <char *>self.global_counters(0), sizeof(ServerCounters))
        memset(self.states + index, 0, sizeof(ServerState))

    cdef int _fold(self, int slots, int index, int into_slot, int into_index, int capacity,
                   Py_ssize_t section, Py_ssize_t record_size) except -1:
        """Move record `index` to `into_index` of `into_slot`, over slots [0, slots), for the
        records of `record_size` bytes starting `section` bytes into every slot."""
        cdef int slot
        cdef char *into
        self._check_fold(slots, index, into_slot, into_index, capacity)
        into = <char *>self.global_counters(into_slot) + section + into_index * record_size
        for slot in range(slots):
            _move_words(<uint64_t *>into,
                        <uint64_t *>(<char *>self.global_counters(slot) + section + index * record_size),
                        record_size // sizeof(uint64_t))
        return 0

    cdef int _check_fold(self, int slots, int index, int into_slot, int into_index,
                         int capacity) except -1:
        self.check_slot(into_slot)
        if not (0 <= slots <= self.count and 0 <= index < capacity
                and 0 <= into_index < capacity and index != into_index):
            raise ValueError("fold asked beyond the zone's capacities, or onto itself")
        return 0


@cython.final
cdef class MetricsWriter:
    """Adds to one counter slot; one per worker, made once at its start (MetricsSlots.writer)."""
    cdef MetricsSlots slots  # keeps the zone mapped
    cdef GlobalCounters *_global
    cdef UpstreamCounters *_upstreams
    cdef RouteCounters *_routes
    cdef ServerCounters *_servers
    cdef ServerState *states  # shared by every worker: see ServerState
    cdef int _max_routes, _max_upstreams
    cdef readonly int max_servers
    cdef readonly int counter_slot

    @staticmethod
    cdef MetricsWriter new(MetricsSlots slots, int counter_slot):
        cdef MetricsWriter self = MetricsWriter.__new__(MetricsWriter)
        self.slots = slots
        self.counter_slot = counter_slot
        self._global = slots.global_counters(counter_slot)
        self._upstreams = slots.upstream_counters(counter_slot)
        self._routes = slots.route_counters(counter_slot)
        self._servers = slots.server_counters(counter_slot)
        self.states = slots.states
        self._max_routes = slots.max_routes
        self._max_upstreams = slots.max_upstreams
        self.max_servers = slots.max_servers
        return self

    cdef void request_done(self, int route, int status, double seconds,
                           uint64_t bytes_in, uint64_t bytes_out) noexcept nogil:
        """Count one finished request. route -1 (no route matched) counts under "_unrouted";
        a status outside 100..599 (e.g. 0 for a client that left) counts as 5xx."""
        cdef int status_class = status // 100
        cdef int bucket = 0
        cdef RouteCounters *counters
        if route < 0 or route >= self._max_routes:
            route = METRICS_UNROUTED_ROUTE
        if status_class < 1 or status_class > METRICS_STATUS_CLASSES:
            status_class = METRICS_STATUS_CLASSES
        if not seconds > 0.0:  # also catches NaN
            seconds = 0.0
        elif seconds > 1e9:  # keeps the microsecond conversion in range
            seconds = 1e9
        while bucket < METRICS_FINITE_BUCKETS and seconds > fp_duration_bounds[bucket]:
            bucket += 1
        counters = self._routes + route
        _counter_add(&counters.status[status_class - 1], 1)
        _counter_add(&counters.buckets[bucket], 1)
        _counter_add(&counters.duration_sum_us, <uint64_t>(seconds * 1e6 + 0.5))
        _counter_add(&self._global.bytes_in, bytes_in)
        _counter_add(&self._global.bytes_out, bytes_out)

    cdef void upstream_request(self, int upstream) noexcept nogil:
        if 0 <= upstream < self._max_upstreams:
            _counter_add(&self._upstreams[upstream].requests, 1)

    cdef void upstream_retry(self, int upstream) noexcept nogil:
        if 0 <= upstream < self._max_upstreams:
            _counter_add(&self._upstreams[upstream].retries, 1)

    cdef void upstream_error(self, int upstream, int kind) noexcept nogil:
        if 0 <= upstream < self._max_upstreams and UPSTREAM_CONNECT <= kind < UPSTREAM_ERROR_KINDS:
            _counter_add(&self._upstreams[upstream].errors[kind], 1)

    # -- servers: `server` is a server index the master registered (0 <= server < max_servers:
    # the caller's pool only holds such indexes, so these do not check it again) ----------

    cdef void server_request(self, int server) noexcept nogil:
        _counter_add(&self._servers[server].requests, 1)

    cdef void server_failure(self, int server, int kind) noexcept nogil:
        if UPSTREAM_CONNECT <= kind < UPSTREAM_ERROR_KINDS:
            _counter_add(&self._servers[server].failures[kind], 1)

    cdef void server_response_time(self, int server, double seconds) noexcept nogil:
        cdef int bucket = 0
        if not seconds > 0.0:
            seconds = 0.0
        elif seconds > 1e9:
            seconds = 1e9
        while bucket < METRICS_FINITE_BUCKETS and seconds > fp_duration_bounds[bucket]:
            bucket += 1
        _counter_add(&self._servers[server].buckets[bucket], 1)
        _counter_add(&self._servers[server].duration_sum_us, <uint64_t>(seconds * 1e6 + 0.5))

    # The worker's own share (its slot) and the shared total are two words: a worker killed
    # between the two updates leaves the total one too low once the master has taken the
    # share out (never too high, so a server at max_conns is never held by the dead). Hence
    # take counts the share first, put the total first; a total "below zero" reads as 0.

    cdef bint server_take(self, int server, uint64_t max_conns) noexcept nogil:
        """Count one more connection in use to `server`, across workers; with max_conns (not
        0), only if fewer than that are: False (and nothing counted) at the limit."""
        cdef uint64_t *active = &self.states[server].active
        cdef uint64_t *share = &self._servers[server].active
        cdef uint64_t seen
        fp_store_relaxed(share, fp_load_relaxed(share) + 1)
        if max_conns == 0:
            fp_fetch_add(active, 1)
            return True
        seen = fp_load_relaxed(active)
        while seen < max_conns or seen > (<uint64_t>1 << 63):
            if fp_compare_exchange(active, &seen, seen + 1):
                return True
        fp_store_relaxed(share, fp_load_relaxed(share) - 1)
        return False

    cdef void server_put(self, int server) noexcept nogil:
        """A connection server_take counted is no longer in use."""
        cdef uint64_t *share = &self._servers[server].active
        cdef uint64_t n = fp_load_relaxed(share)
        if n > 0:
            fp_fetch_add(&self.states[server].active, <uint64_t>0 - 1)
            fp_store_relaxed(share, n - 1)

    cdef inline uint64_t server_active(self, int server) noexcept nogil:
        """Connections in use to `server` across all workers."""
        cdef uint64_t n = fp_load_relaxed(&self.states[server].active)
        return 0 if n > (<uint64_t>1 << 63) else n

    cdef void compressed(self, int coding, uint64_t before, uint64_t after) noexcept nogil:
        """One response compressed with `coding`: its body's bytes before and after."""
        if 0 <= coding < CODINGS:
            _counter_add(&self._global.codings[coding].responses, 1)
            _counter_add(&self._global.codings[coding].bytes_in, before)
            _counter_add(&self._global.codings[coding].bytes_out, after)

    cdef void mirror_result(self, int upstream, int result) noexcept nogil:
        if 0 <= upstream < self._max_upstreams and MIRROR_SENT <= result <= MIRROR_SKIPPED:
            _counter_add(&self._upstreams[upstream].mirrored[result], 1)

    cdef void static_response(self, int status) noexcept nogil:
        """One answer of a static handler (core/static.pyx), by its status."""
        if 100 <= status < 600:
            _counter_add(&self._global.static_status[status // 100 - 1], 1)

    cdef void tls_handshake(self, int version, bint resumed) noexcept nogil:
        """A completed handshake; version: 0 for TLS 1.2, 1 for TLS 1.3."""
        if 0 <= version < TLS_VERSIONS:
            _counter_add(&self._global.tls_handshakes[version][1 if resumed else 0], 1)

    cdef void tls_failure(self, int reason) noexcept nogil:
        if 0 <= reason < TLS_FAILURES:
            _counter_add(&self._global.tls_failures[reason], 1)

    cdef void connection_opened(self) noexcept nogil:
        _counter_add(&self._global.connections_accepted, 1)
        _counter_add(&self._global.active_connections, 1)

    cdef void connection_closed(self) noexcept nogil:
        cdef uint64_t n = fp_load_relaxed(&self._global.active_connections)
        if n > 0:
            fp_store_relaxed(&self._global.active_connections, n - 1)
