# Request metrics, hot-path side: MetricsWriter adds to this worker's counter slot of the
# shared region that the master mapped before forking (fastproxy/shm/). Included by _core.pyx.
#
# Concurrency rule: the master assigns each worker one counter slot at fork, and that worker is
# the slot's only writer while it lives, so an increment is a relaxed load, an add and a relaxed
# store: exact without locks or atomic read-modify-write, and never torn for a reader in another
# process (aligned 64-bit stores). Readers (fastproxy/shm/reader.py) sum every slot. Counters are
# cumulative; the master zeroes only the active-connections gauge, after it has reaped the owner.
#
# The layout constants below mirror fastproxy/shm/layout.py, the one place that defines them;
# metrics_layout_constants() exposes them so a test can compare the two.

cimport cython
from libc.stdint cimport uint64_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE

cdef extern from *:
    """
    static const uint64_t fp_shm_magic = 0x7978727074736166ULL;  /* "fastprxy" little-endian */
    static const double fp_shm_duration_bounds[11] = {
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
    /* Relaxed atomics compile to plain aligned moves on x86-64 and arm64; they make the
       single-writer load/add/store well defined while other processes read the word. */
    static inline uint64_t fp_shm_load(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void fp_shm_store(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    """
    const uint64_t fp_shm_magic
    const double fp_shm_duration_bounds[11]
    uint64_t fp_shm_load(const uint64_t *p) nogil
    void fp_shm_store(uint64_t *p, uint64_t v) nogil

cdef enum:
    SHM_LAYOUT_VERSION = 1
    SHM_TOTAL_SIZE = 5080768
    SHM_MAX_ROUTES = 256
    SHM_MAX_UPSTREAMS = 64
    SHM_MAX_COUNTER_SLOTS = 128
    SHM_H_MAGIC = 0
    SHM_H_VERSION = 1
    SHM_H_TOTAL_SIZE = 2
    SHM_COUNTERS_OFFSET = 91840
    SHM_COUNTER_SLOT_SIZE = 38976
    # word indexes inside a counter slot
    SHM_C_BYTES_IN = 0
    SHM_C_BYTES_OUT = 1
    SHM_C_CONNECTIONS_ACCEPTED = 2
    SHM_C_ACTIVE_CONNECTIONS = 3
    SHM_SLOT_UPSTREAMS_WORD = 8
    SHM_U_REQUESTS = 0
    SHM_U_ERRORS = 1
    SHM_UPSTREAM_WORDS = 4
    SHM_SLOT_ROUTES_WORD = SHM_SLOT_UPSTREAMS_WORD + SHM_MAX_UPSTREAMS * SHM_UPSTREAM_WORDS
    SHM_R_STATUS = 0
    SHM_R_BUCKETS = 5
    SHM_FINITE_BUCKETS = 11
    SHM_R_DURATION_SUM_US = SHM_R_BUCKETS + SHM_FINITE_BUCKETS + 1
    SHM_ROUTE_WORDS = SHM_R_DURATION_SUM_US + 1
    SHM_UNROUTED_ROUTE = 0

cdef enum UpstreamErrorKind:
    UPSTREAM_CONNECT = 0  # connect failed or refused
    UPSTREAM_RESET = 1  # reset or closed before a full response
    UPSTREAM_TIMEOUT = 2


cdef inline void _shm_add(uint64_t *word, uint64_t n) noexcept nogil:
    fp_shm_store(word, fp_shm_load(word) + n)


@cython.final
cdef class MetricsWriter:
    """Adds to one counter slot of the shared region; one per worker, made once at its start.

    Holds a buffer export of the region, so the mapping cannot be closed under it.
    """
    cdef Py_buffer _view
    cdef bint _has_view
    cdef uint64_t *_slot
    cdef readonly int counter_slot

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    @staticmethod
    cdef MetricsWriter new(object buffer, int counter_slot):
        cdef MetricsWriter self = MetricsWriter.__new__(MetricsWriter)
        cdef uint64_t *words
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        words = <uint64_t *>self._view.buf
        if (self._view.len < SHM_TOTAL_SIZE or (<size_t>words) % 8 != 0
                or words[SHM_H_MAGIC] != fp_shm_magic
                or words[SHM_H_VERSION] != SHM_LAYOUT_VERSION
                or words[SHM_H_TOTAL_SIZE] != SHM_TOTAL_SIZE):
            raise ValueError(
                f"buffer is not a fastproxy shared region of layout version {SHM_LAYOUT_VERSION}")
        if not 0 <= counter_slot < SHM_MAX_COUNTER_SLOTS:
            raise ValueError(f"counter slot {counter_slot} out of range 0..{SHM_MAX_COUNTER_SLOTS - 1}")
        self.counter_slot = counter_slot
        self._slot = words + (SHM_COUNTERS_OFFSET + counter_slot * SHM_COUNTER_SLOT_SIZE) // 8
        return self

    cdef void request_done(self, int route, int status, double seconds,
                           uint64_t bytes_in, uint64_t bytes_out) noexcept nogil:
        """Count one finished request. route -1 (no route matched) counts under "_unrouted";
        a status outside 100..599 (e.g. 0 for a client that left) counts as 5xx."""
        cdef int status_class = status // 100
        cdef int bucket = 0
        cdef uint64_t *block
        if route < 0 or route >= SHM_MAX_ROUTES:
            route = SHM_UNROUTED_ROUTE
        if status_class < 1 or status_class > 5:
            status_class = 5
        if not seconds > 0.0:  # also catches NaN
            seconds = 0.0
        elif seconds > 1e9:  # keeps the microsecond conversion in range
            seconds = 1e9
        while bucket < SHM_FINITE_BUCKETS and seconds > fp_shm_duration_bounds[bucket]:
            bucket += 1
        block = self._slot + SHM_SLOT_ROUTES_WORD + route * SHM_ROUTE_WORDS
        _shm_add(block + SHM_R_STATUS + status_class - 1, 1)
        _shm_add(block + SHM_R_BUCKETS + bucket, 1)
        _shm_add(block + SHM_R_DURATION_SUM_US, <uint64_t>(seconds * 1e6 + 0.5))
        _shm_add(self._slot + SHM_C_BYTES_IN, bytes_in)
        _shm_add(self._slot + SHM_C_BYTES_OUT, bytes_out)

    cdef void upstream_request(self, int upstream) noexcept nogil:
        if 0 <= upstream < SHM_MAX_UPSTREAMS:
            _shm_add(self._slot + SHM_SLOT_UPSTREAMS_WORD + upstream * SHM_UPSTREAM_WORDS
                     + SHM_U_REQUESTS, 1)

    cdef void upstream_error(self, int upstream, int kind) noexcept nogil:
        if 0 <= upstream < SHM_MAX_UPSTREAMS and UPSTREAM_CONNECT <= kind <= UPSTREAM_TIMEOUT:
            _shm_add(self._slot + SHM_SLOT_UPSTREAMS_WORD + upstream * SHM_UPSTREAM_WORDS
                     + SHM_U_ERRORS + kind, 1)

    cdef void connection_opened(self) noexcept nogil:
        _shm_add(self._slot + SHM_C_CONNECTIONS_ACCEPTED, 1)
        _shm_add(self._slot + SHM_C_ACTIVE_CONNECTIONS, 1)

    cdef void connection_closed(self) noexcept nogil:
        cdef uint64_t *active = self._slot + SHM_C_ACTIVE_CONNECTIONS
        cdef uint64_t n = fp_shm_load(active)
        if n > 0:
            fp_shm_store(active, n - 1)


def metrics_layout_constants():
    """The layout constants compiled into the writer, keyed as layout.mirrored_constants()."""
    cdef int i
    return {
        "magic": fp_shm_magic,
        "version": SHM_LAYOUT_VERSION,
        "total_size": SHM_TOTAL_SIZE,
        "max_routes": SHM_MAX_ROUTES,
        "max_upstreams": SHM_MAX_UPSTREAMS,
        "max_counter_slots": SHM_MAX_COUNTER_SLOTS,
        "h_magic": SHM_H_MAGIC,
        "h_version": SHM_H_VERSION,
        "h_total_size": SHM_H_TOTAL_SIZE,
        "counters_offset": SHM_COUNTERS_OFFSET,
        "counter_slot_size": SHM_COUNTER_SLOT_SIZE,
        "c_bytes_in": SHM_C_BYTES_IN,
        "c_bytes_out": SHM_C_BYTES_OUT,
        "c_connections_accepted": SHM_C_CONNECTIONS_ACCEPTED,
        "c_active_connections": SHM_C_ACTIVE_CONNECTIONS,
        "slot_upstreams_word": SHM_SLOT_UPSTREAMS_WORD,
        "upstream_words": SHM_UPSTREAM_WORDS,
        "u_requests": SHM_U_REQUESTS,
        "u_errors": SHM_U_ERRORS,
        "upstream_connect": UPSTREAM_CONNECT,
        "upstream_reset": UPSTREAM_RESET,
        "upstream_timeout": UPSTREAM_TIMEOUT,
        "slot_routes_word": SHM_SLOT_ROUTES_WORD,
        "route_words": SHM_ROUTE_WORDS,
        "r_status": SHM_R_STATUS,
        "r_buckets": SHM_R_BUCKETS,
        "r_duration_sum_us": SHM_R_DURATION_SUM_US,
        "unrouted_route": SHM_UNROUTED_ROUTE,
        "duration_buckets": tuple([fp_shm_duration_bounds[i] for i in range(SHM_FINITE_BUCKETS)]),
    }
