# Server selection and passive health for one upstream (docs/upstreams.md): which server a
# request goes to (`balance`, weights, slow_start, backup, down, max_conns, the servers a
# request already tried) and what a failure or a success does to the state every worker
# shares about a server (ServerState in the metrics zone, core/metrics.pyx). One Balancer per
# upstream and worker, built once per reload (plain Python in __init__); pick, failure and
# success run per request. Included by _core.pyx after consumer.pyx, before upstream.pyx.

from libc.stdint cimport uint32_t, int64_t
from libc.string cimport memcmp

cdef extern from "arpa/inet.h":
    int inet_pton(int af, const char *src, void *dst) noexcept nogil

cdef extern from "sys/socket.h":
    int AF_INET
    int AF_INET6

import hashlib

cdef enum:
    # Upstream.balance
    BALANCE_ROUND_ROBIN = 0
    BALANCE_LEAST_CONN = 1
    BALANCE_RANDOM_TWO = 2
    BALANCE_IP_HASH = 3
    BALANCE_HASH = 4

cdef enum:
    # what UpstreamConsumer.balance_key hashes (Upstream.hash_key; KEY_NETWORK for ip_hash)
    KEY_REMOTE_ADDR = 0
    KEY_PATH = 1
    KEY_URI = 2
    KEY_HEADER = 3
    KEY_COOKIE = 4
    KEY_QUERY = 5
    KEY_NETWORK = 6  # the client's /24 (IPv4) or /64 (IPv6)

cdef enum:
    # what a server is to one selection pass (Balancer.candidate)
    CAND_NO = 0
    CAND_BUSY = 1  # it could take the request but is at its max_conns
    CAND_YES = 2

cdef enum:
    # a selection pass: which servers it looks at (bits)
    LEVEL_BACKUP = 1  # the backups instead of the primaries
    LEVEL_TRIED = 2   # the servers the request was already sent to as well
    LEVEL_PANIC = 4   # every server not down by config, whatever its health: none is in service

cdef enum:
    PICK_BUSY = -1  # Balancer.pick: every server that could take the request is at max_conns

cdef enum:
    WEIGHT_SCALE = 10  # weights are kept x10 so that slow_start can start at a tenth of 1
    RING_POINTS = 160  # points of the hash ring per server of average weight (ketama's)
    FAILS_COUNT_BITS = 16  # ServerState.fails: the count in its low bits, the window start above

cdef uint64_t FAILS_COUNT_MASK = (<uint64_t>1 << FAILS_COUNT_BITS) - 1

BALANCE_NAMES = ("round_robin", "least_conn", "random_two", "ip_hash", "hash")
HASH_KEY_KINDS = {"remote_addr": KEY_REMOTE_ADDR, "path": KEY_PATH, "uri": KEY_URI,
                  "header": KEY_HEADER, "cookie": KEY_COOKIE, "query": KEY_QUERY}

ctypedef struct Peer:
    int id                  # its index in the metrics zone (ServerState, ServerCounters)
    int64_t weight          # x WEIGHT_SCALE
    int64_t current         # smooth weighted round-robin's running weight (this worker's)
    uint64_t max_conns      # 0: no limit
    uint64_t slow_start_us
    bint backup
    bint down               # by config


cdef inline uint64_t key_hash(const char *p, Py_ssize_t n) noexcept nogil:
    """FNV-1a, then murmur3's finalizer (FNV's high bits alone spread short keys poorly).
    The empty key (and a missing one) is 0."""
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    if n <= 0:
        return 0
    for i in range(n):
        h = (h ^ <unsigned char>p[i]) * 0x100000001b3ULL
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef inline uint64_t bytes_hash(bytes value) noexcept:
    if value is None:
        return 0
    return key_hash(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cdef uint64_t network_hash(bytes addr) noexcept:
    """ip_hash's key: the client's /24 (IPv4, IPv4-mapped IPv6 included) or /64 (IPv6)."""
    cdef unsigned char buf[16]
    cdef const char *text
    cdef int i
    if addr is None:
        return 0
    text = PyBytes_AS_STRING(addr)
    if inet_pton(AF_INET, text, buf) == 1:
        return key_hash(<const char *>buf, 3)
    if inet_pton(AF_INET6, text, buf) != 1:
        return 0
    for i in range(10):
        if buf[i]:
            return key_hash(<const char *>buf, 8)
    if buf[10] == 0xff and buf[11] == 0xff:
        return key_hash(<const char *>buf + 12, 3)
    return key_hash(<const char *>buf, 8)


cdef uint64_t pair_hash(bytes text, Py_ssize_t start, bytes name, bint cookie) noexcept:
    """The hash of the value of `name` in `text` from `start`: a cookie header (pairs split
    by ";" or ",", spaces around them skipped) or a query (pairs split by "&", compared as
    sent, not percent-decoded); 0 (the empty key) when it is not there."""
    cdef const char *p
    cdef const char *want
    cdef Py_ssize_t n, k, end, eq, wn
    if text is None or name is None:
        return 0
    p = PyBytes_AS_STRING(text)
    n = PyBytes_GET_SIZE(text)
    want = PyBytes_AS_STRING(name)
    wn = PyBytes_GET_SIZE(name)
    k = start
    while k < n:
        if cookie:
            while k < n and p[k] == b' ':
                k += 1
        end = k
        while end < n and not (p[end] == b'&' if not cookie else (p[end] == b';' or p[end] == b',')):
            end += 1
        eq = k
        while eq < end and p[eq] != b'=':
            eq += 1
        if eq - k == wn and memcmp(p + k, want, wn) == 0:
            eq = eq + 1 if eq < end else end
            return key_hash(p + eq, end - eq)
        k = end + 1
    return 0


@cython.final
cdef class Balancer:
    """Chooses a server of one upstream for each request and keeps the passive health of its
    servers. Positions (0 .. count-1) are the upstream's servers in config order; each has
    a Peer (its config and this worker's round-robin weight) and a ServerState shared by
    every worker (states[peer.id]).

    Shared words (ServerState), each updated alone by compare-and-swap, so no update needs a
    lock and a worker killed between two leaves each word valid:
    - fails: the failures of the current window in its low FAILS_COUNT_BITS bits and the
      window's start (monotonic ms) above, one word so that a new window and its first count
      are one swap;
    - down_until_us: 0 while in service; else out of service until then, after which one
      request (the one whose swap of probe_until_us wins) probes it;
    - probe_until_us: while a probe runs, no other request is sent;
    - up_since_us: when it last came back (slow_start runs from it)."""
    cdef MetricsWriter metrics
    cdef ServerState *states
    cdef Peer *peers
    cdef int count
    cdef bint single  # one server: no choice and no passive health (as nginx)
    cdef int algorithm
    cdef int key_kind
    cdef bytes key_name
    cdef uint32_t *ring_points  # the hash ring: sorted points, and each one's server position
    cdef int *ring_peers
    cdef int ring_size
    cdef int primaries
    cdef int next_peer          # least_conn's tie order
    cdef uint64_t rng           # random_two's (xorshift64)
    cdef uint64_t max_fails, fail_timeout_us
    cdef uint64_t fail_status[4]  # bit s - 400 for each status of fail_status
    # logging: state changes and, for a server out of service, at most one failure line a
    # second per server and worker (and how many were left out)
    cdef object logger
    cdef str name
    cdef tuple addresses        # str per position
    cdef double *log_next
    cdef int *log_suppressed

    def __init__(self, WorkerCore core, upstream, tuple server_ids):
        cdef int i
        cdef Peer *p
        servers = upstream.servers
        self.metrics = core.metrics
        self.states = core.metrics.states
        self.count = len(servers)
        self.single = self.count == 1
        self.peers = <Peer *>PyMem_Malloc(self.count * sizeof(Peer))
        self.log_next = <double *>PyMem_Malloc(self.count * sizeof(double))
        self.log_suppressed = <int *>PyMem_Malloc(self.count * sizeof(int))
        if self.peers == NULL or self.log_next == NULL or self.log_suppressed == NULL:
            raise MemoryError()
        for i, server in enumerate(servers):
            p = self.peers + i
            p.id = server_ids[i]
            p.weight = server.weight * WEIGHT_SCALE
            p.current = 0
            p.max_conns = server.max_conns
            p.slow_start_us = <uint64_t>(server.slow_start * 1e6)
            p.backup = server.backup
            p.down = server.down
            self.log_next[i] = 0
            self.log_suppressed[i] = 0
        self.algorithm = BALANCE_NAMES.index(upstream.balance)
        kind, _, key_name = upstream.hash_key.partition(":")
        self.key_kind = KEY_NETWORK if self.algorithm == BALANCE_IP_HASH else HASH_KEY_KINDS[kind]
        self.key_name = key_name.encode("latin-1") if key_name else None
        if self.key_kind == KEY_HEADER:
            self.key_name = self.key_name.lower()
        self.max_fails = upstream.max_fails
        self.fail_timeout_us = <uint64_t>(upstream.fail_timeout * 1e6)
        for i in range(4):
            self.fail_status[i] = 0
        for status in upstream.fail_status:
            self.fail_status[(status - 400) // 64] |= <uint64_t>1 << ((status - 400) % 64)
        self.rng = (<uint64_t>os.getpid() << 32) ^ monotonic_us() | 1
        self.logger = core.error_logger
        self.name = upstream.name
        self.addresses = tuple(str(s.address) for s in servers)
        self.primaries = sum(1 for s in servers if not s.backup)
        if self.algorithm == BALANCE_HASH or self.algorithm == BALANCE_IP_HASH:
            self.build_ring([upstream.server_key(s) for s in servers], servers)

    def __dealloc__(self):
        PyMem_Free(self.peers)
        PyMem_Free(self.log_next)
        PyMem_Free(self.log_suppressed)
        PyMem_Free(self.ring_points)
        PyMem_Free(self.ring_peers)

    def build_ring(self, list keys, tuple servers):
        """The consistent ring (ketama): points from the hash of each primary's server key
        only, so every worker, and the next reload, places a server at the same points, and
        removing a server moves only the keys that were its own."""
        cdef int i
        total = sum(s.weight for s in servers if not s.backup)
        points = []
        for i, server in enumerate(servers):
            if server.backup:
                continue
            share = max(1, round(RING_POINTS * self.primaries * server.weight / total))
            for j in range((share + 3) // 4):
                digest = hashlib.md5(f"{keys[i]}-{j}".encode()).digest()
                for k in range(4):
                    points.append((int.from_bytes(digest[k * 4:k * 4 + 4], "little"), i))
        points.sort()
        self.ring_size = len(points)
        self.ring_points = <uint32_t *>PyMem_Malloc(self.ring_size * sizeof(uint32_t))
        self.ring_peers = <int *>PyMem_Malloc(self.ring_size * sizeof(int))
        if self.ring_points == NULL or self.ring_peers == NULL:
            raise MemoryError()
        for i, (point, position) in enumerate(points):
            self.ring_points[i] = point
            self.ring_peers[i] = position

    # -- selection (per request) --------------------------------------------------------------

    cdef inline int pick(self, UpstreamConsumer ex) except -2:
        """A server position for `ex`, its connection counted (server_take), or PICK_BUSY."""
        if self.single:  # no choice: inline, so a one-server upstream pays one take
            if self.metrics.server_take(self.peers[0].id, self.peers[0].max_conns):
                return 0
            return PICK_BUSY
        return self.choose_server(ex)

    cdef int choose_server(self, UpstreamConsumer ex) except -2:
        """Passes from the best to the last resort: primaries in service the request has not
        tried, then backups, then tried ones; when none of those exists (and none is merely
        at max_conns), every server not down by config, whatever its health (as nginx, which
        tries its servers when none is live, rather than failing at once)."""
        cdef uint64_t now, skip = 0, h = 0
        cdef int position = -1, level = 0, attempt
        cdef bint busy
        now = monotonic_us()
        if self.ring_size:
            h = ex.balance_key(self.key_kind, self.key_name)
        for attempt in range(4):  # a lost race for a probe or a last connection: look again
            busy = False
            # 0, LEVEL_BACKUP, LEVEL_TRIED, LEVEL_TRIED | LEVEL_BACKUP: a C loop, not a tuple
            for level in range((LEVEL_TRIED | LEVEL_BACKUP) + 1):
                position = self.choose(level, skip if level & LEVEL_TRIED else ex.tried | skip,
                                       h, now, &busy)
                if position >= 0:
                    break
            if position < 0:
                if busy:
                    return PICK_BUSY
                level = LEVEL_PANIC  # untried ones first here too
                position = self.choose(level, ex.tried | skip, h, now, &busy)
                if position < 0:
                    position = self.choose(level, skip, h, now, &busy)
                if position < 0:
                    return PICK_BUSY
            if self.claim(position, level, now):
                return position
            if position < 64:
                skip |= <uint64_t>1 << position
        return PICK_BUSY

    cdef int choose(self, int level, uint64_t excluded, uint64_t h, uint64_t now,
                    bint *busy) except -2:
        cdef int position
        if self.ring_size and not (level & LEVEL_BACKUP):
            position = self.walk_ring(h, level, excluded, now, busy)
            if position >= 0 or not (level & LEVEL_PANIC):
                return position
        elif self.algorithm == BALANCE_LEAST_CONN:
            return self.least_conn(level, excluded, now, busy)
        elif self.algorithm == BALANCE_RANDOM_TWO:
            return self.random_two(level, excluded, now, busy)
        return self.round_robin(level, excluded, now, busy)

    cdef inline int candidate(self, int i, int level, uint64_t excluded, uint64_t now) noexcept:
        """Whether server `i` may take the request in this pass (CAND_*)."""
        cdef Peer *p = self.peers + i
        cdef ServerState *st = self.states + p.id
        cdef uint64_t down_until
        if p.down:
            return CAND_NO
        if not (level & LEVEL_PANIC):
            if p.backup != ((level & LEVEL_BACKUP) != 0):
                return CAND_NO
            if i < 64 and (excluded >> i) & 1:
                return CAND_NO
            if fp_load_relaxed(&st.flags) & SERVER_REMOVED \
                    or fp_load_relaxed(&st.check_state) == CHECK_DOWN:
                return CAND_NO
            down_until = fp_load_relaxed(&st.down_until_us)
            if down_until and (now < down_until or fp_load_relaxed(&st.probe_until_us) > now):
                return CAND_NO
        elif i < 64 and (excluded >> i) & 1:
            return CAND_NO
        if p.max_conns and self.metrics.server_active(p.id) >= p.max_conns:
            return CAND_BUSY
        return CAND_YES

    cdef inline int64_t usable_weight(self, int i, int level, uint64_t excluded, uint64_t now,
                                      bint *busy) noexcept:
        """Server `i`'s weight now if it may take the request in this pass, else 0 (and
        `busy` set when only its max_conns stops it)."""
        cdef int c = self.candidate(i, level, excluded, now)
        if c == CAND_YES:
            return self.weight(i, now)
        if c == CAND_BUSY:
            busy[0] = True
        return 0

    cdef inline int64_t weight(self, int i, uint64_t now) noexcept:
        """Its weight now: during slow_start after it came back, from a tenth up to full."""
        cdef Peer *p = self.peers + i
        cdef uint64_t since, elapsed
        if p.slow_start_us:
            since = fp_load_relaxed(&self.states[p.id].up_since_us)
            if since and now > since:
                elapsed = now - since
                if elapsed < p.slow_start_us:
                    return max(1, <int64_t>(p.weight * (p.slow_start_us + 9 * elapsed)
                                            // (10 * p.slow_start_us)))
        return p.weight

    cdef int claim(self, int i, int level, uint64_t now) except -1:
        """Take the chosen server: its probe if its down time is over (only one request
        probes it, across workers), and a connection under its max_conns."""
        cdef Peer *p = self.peers + i
        cdef ServerState *st = self.states + p.id
        cdef uint64_t seen
        cdef bint probing = False
        if not (level & LEVEL_PANIC) and fp_load_relaxed(&st.down_until_us):
            seen = fp_load_relaxed(&st.probe_until_us)
            if seen > now or not fp_compare_exchange(&st.probe_until_us, &seen,
                                                     now + self.fail_timeout_us):
                return False
            probing = True
        if not self.metrics.server_take(p.id, p.max_conns):
            if probing:
                fp_store_relaxed(&st.probe_until_us, 0)
            return False
        return True

    cdef int round_robin(self, int level, uint64_t excluded, uint64_t now, bint *busy) except -2:
        """Smooth weighted round-robin (nginx's): each candidate gains its weight, the one
        ahead is chosen and loses the total, so no server comes more than its weight in a row."""
        cdef int i, best = -1
        cdef int64_t total = 0, w
        for i in range(self.count):
            w = self.usable_weight(i, level, excluded, now, busy)
            if w == 0:
                continue
            self.peers[i].current += w
            total += w
            if best < 0 or self.peers[i].current > self.peers[best].current:
                best = i
        if best >= 0:
            self.peers[best].current -= total
        return best

    cdef int least_conn(self, int level, uint64_t excluded, uint64_t now, bint *busy) except -2:
        """Fewest connections in use across workers for its weight; ties go round in turn."""
        cdef int k, i, best = -1
        cdef int64_t w, best_w = 1
        cdef uint64_t active, best_active = 0
        for k in range(self.count):
            i = self.next_peer + k
            if i >= self.count:
                i -= self.count
            w = self.usable_weight(i, level, excluded, now, busy)
            if w == 0:
                continue
            active = self.metrics.server_active(self.peers[i].id)
            if best < 0 or active * <uint64_t>best_w < best_active * <uint64_t>w:
                best, best_w, best_active = i, w, active
        if best >= 0:
            self.next_peer = best + 1 if best + 1 < self.count else 0
        return best

    cdef inline uint64_t random(self) noexcept:
        self.rng ^= self.rng << 13
        self.rng ^= self.rng >> 7
        self.rng ^= self.rng << 17
        return self.rng

    cdef int random_two(self, int level, uint64_t excluded, uint64_t now, bint *busy) except -2:
        """Two random picks by weight; the one with fewer connections in use across workers
        for its weight (the power of two choices)."""
        cdef int i, first = -1, second = -1
        cdef int64_t total = 0, r1, r2, w
        cdef uint64_t a1, a2
        for i in range(self.count):
            total += self.usable_weight(i, level, excluded, now, busy)
        if total == 0:
            return -1
        r1 = <int64_t>(self.random() % <uint64_t>total)
        r2 = <int64_t>(self.random() % <uint64_t>total)
        for i in range(self.count):
            w = self.usable_weight(i, level, excluded, now, busy)
            if w == 0:
                continue
            if first < 0 and r1 < w:
                first = i
            if second < 0 and r2 < w:
                second = i
            r1 -= w
            r2 -= w
        if first < 0 or second < 0:
            return first if first >= 0 else second  # a candidate changed between the scans
        a1 = self.metrics.server_active(self.peers[first].id) * <uint64_t>self.weight(second, now)
        a2 = self.metrics.server_active(self.peers[second].id) * <uint64_t>self.weight(first, now)
        return second if a2 < a1 else first

    cdef int walk_ring(self, uint64_t h, int level, uint64_t excluded, uint64_t now,
                       bint *busy) except -2:
        """The first server on the ring at or after the key's point that may take it: a key
        moves only while its own server cannot."""
        cdef uint32_t point = <uint32_t>(h >> 32)
        cdef int low = 0, high = self.ring_size, mid, k, i, c, at, checked = 0
        cdef uint64_t seen = 0
        while low < high:
            mid = (low + high) >> 1
            if self.ring_points[mid] < point:
                low = mid + 1
            else:
                high = mid
        for k in range(self.ring_size):
            at = low + k
            if at >= self.ring_size:
                at -= self.ring_size
            i = self.ring_peers[at]
            if i < 64:
                if (seen >> i) & 1:
                    continue
                seen |= <uint64_t>1 << i
            c = self.candidate(i, level, excluded, now)
            if c == CAND_YES:
                return i
            if c == CAND_BUSY:
                busy[0] = True
            checked += 1
            if checked >= self.primaries:
                break
        return -1

    # -- passive health (per response or failure) ---------------------------------------------

    cdef inline bint failed_status(self, int status) noexcept:
        return 400 <= status < 600 and (self.fail_status[(status - 400) >> 6] >> ((status - 400) & 63)) & 1

    cdef int failure(self, int i, int kind) except -1:
        """A failure of server `i` (UPSTREAM_* kind): counted, and at max_fails within
        fail_timeout (summed over workers) the server is out of service for fail_timeout;
        a failed probe puts it out again."""
        cdef ServerState *st = self.states + self.peers[i].id
        cdef uint64_t now, now_ms, down_until, word, start, renewed
        self.metrics.server_failure(self.peers[i].id, kind)
        if self.max_fails == 0 or self.single:
            return 0
        now = monotonic_us()
        down_until = fp_load_relaxed(&st.down_until_us)
        if down_until:
            if now >= down_until and fp_compare_exchange(&st.down_until_us, &down_until,
                                                         now + self.fail_timeout_us):
                fp_store_relaxed(&st.probe_until_us, 0)
                self.log_change(i, "still failing after fail_timeout (%s): out of service for "
                                   "another %gs" % (UPSTREAM_ERROR_KIND_NAMES[kind],
                                                    self.fail_timeout_us / 1e6))
            return 0  # else already out: a request sent before it went down
        now_ms = now // 1000
        word = fp_load_relaxed(&st.fails)
        while True:
            start = word >> FAILS_COUNT_BITS
            # (a window another worker opened may start after our clock reading)
            if start == 0 or (now_ms > start and now_ms - start > self.fail_timeout_us // 1000):
                renewed = (now_ms << FAILS_COUNT_BITS) | 1  # this failure opens a new window
            elif word & FAILS_COUNT_MASK < FAILS_COUNT_MASK:
                renewed = word + 1
            else:
                renewed = word
            if fp_compare_exchange(&st.fails, &word, renewed):
                break
        if renewed >> FAILS_COUNT_BITS != start:
            fp_store_relaxed(&st.window_start_us, now)
        if renewed & FAILS_COUNT_MASK == self.max_fails:
            down_until = 0
            if fp_compare_exchange(&st.down_until_us, &down_until, now + self.fail_timeout_us):
                self.log_change(i, "out of service for %gs: %d failure%s within fail_timeout, the "
                                   "last: %s" % (self.fail_timeout_us / 1e6, self.max_fails,
                                                 "" if self.max_fails == 1 else "s",
                                                 UPSTREAM_ERROR_KIND_NAMES[kind]))
        return 0

    cdef inline int success(self, int i) except -1:
        """A complete response from server `i`: if it was a probe (its down time over), the
        server is back in service."""
        if fp_load_relaxed(&self.states[self.peers[i].id].down_until_us) == 0:
            return 0  # in service: nothing to do (inline: the usual case costs one load)
        return self.recovered(i)

    cdef int recovered(self, int i) except -1:
        cdef ServerState *st = self.states + self.peers[i].id
        cdef uint64_t down_until = fp_load_relaxed(&st.down_until_us)
        cdef uint64_t now = monotonic_us()
        if now >= down_until and fp_compare_exchange(&st.down_until_us, &down_until, 0):
            fp_store_relaxed(&st.fails, 0)
            fp_store_relaxed(&st.probe_until_us, 0)
            fp_store_relaxed(&st.up_since_us, now)  # slow_start runs from now
            self.log_change(i, "back in service: a probe request succeeded")
        return 0

    cdef int log_change(self, int i, str what) except -1:
        """One line per state change across workers: the worker whose swap made it logs it."""
        if self.logger is not None:
            self.logger.warning('upstream "%s" server %s: %s', self.name, self.addresses[i], what)
        return 0

    cdef int failure_lines(self, int i, double now) except -2:
        """Whether a failure line of server `i` is logged: always while it is in service;
        out of service, one a second (per worker) and -1 for the others. Returns how many
        were left out before this one."""
        cdef ServerState *st = self.states + self.peers[i].id
        cdef int left_out
        if fp_load_relaxed(&st.down_until_us) == 0 and fp_load_relaxed(&st.check_state) != CHECK_DOWN:
            return 0
        if now < self.log_next[i]:
            self.log_suppressed[i] += 1
            return -1
        self.log_next[i] = now + 1.0
        left_out = self.log_suppressed[i]
        self.log_suppressed[i] = 0
        return left_out

    cdef bint removed(self, int i) noexcept:
        return (fp_load_relaxed(&self.states[self.peers[i].id].flags) & SERVER_REMOVED) != 0
