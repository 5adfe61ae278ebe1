# Upstream side: a pool of kept-alive connections per upstream (per worker) and the
# protocol that parses an upstream's response and relays it to the client.

from collections import deque

cdef enum:
    UP_CONNECTING = 1
    UP_BUSY = 2
    UP_IDLE = 3
    UP_CLOSED = 4
    UP_TUNNEL = 5

cdef enum:
    # what a busy connection's deadline is waiting for (named in the log when it expires)
    WAIT_NONE = 0
    WAIT_CONNECT = 1
    WAIT_SEND = 2       # the upstream to take more of the request (its buffer is full)
    WAIT_READ = 3       # a response byte, once the request is sent

cdef enum:
    # retry_on conditions, a bit each (UpstreamPool.retry_on), in RETRY_CONDITIONS order
    RETRY_ERROR = 1     # connect failed
    RETRY_TIMEOUT = 2   # connect, send or read timeout before the response head
    RETRY_RESET = 4     # closed, reset or an invalid response before the response head
    RETRY_502 = 8
    RETRY_503 = 16
    RETRY_504 = 32

# the names of the RETRY_* bits, lowest first: the values config's retry_on takes
RETRY_CONDITIONS = ("error", "timeout", "reset", "502", "503", "504")

# The response head, counting the interim (1xx) heads before it, must fit in this: an
# upstream cannot make us buffer, or relay 1xx responses, without end.
cdef Py_ssize_t MAX_RESPONSE_HEAD = 64 * 1024


class _BadResponse(Exception):
    """Raised from a parser callback when the upstream breaks the protocol in a way
    llhttp accepts; the message says how."""


class _RetryStatus(Exception):
    """Raised from on_headers_complete to stop parsing a response head whose status
    (args[0]) retry_on lists, when the request is to be retried: the only way to stop
    httptools before the body (a rare path: the server answered 502, 503 or 504)."""


@cython.final
cdef class BodyReader:
    """An upstream connection's protocol once it carried a long response body (LONG_BODY) or
    its client fell behind, for the rest of its life (switching back would restart uvloop's
    reading again on every long response). uvloop then reads into the buffer get_buffer
    returns, so each read lands in the worker's one read buffer and is no larger than the
    client can take (its socket's free space plus its write buffer's room): a client that
    stops reading holds its high-water mark and what was read before it fell behind, not one
    more 256 KiB read per resume; and the body is not copied into a bytes object before
    httptools slices it. Connections that only carry short responses to clients that keep
    up never switch: the plain protocol costs fewer calls per read."""
    cdef UpstreamConnection conn

    def get_buffer(self, Py_ssize_t size_hint):
        return self.conn.body_buffer()

    def buffer_updated(self, Py_ssize_t nbytes):
        self.conn.data_received(self.conn.pool.core.read_view[:nbytes])

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.conn.connection_lost(exc)

    def pause_writing(self):
        self.conn.pause_writing()

    def resume_writing(self):
        self.conn.resume_writing()


def idle_since(UpstreamConnection conn):
    return conn.idle_at


cdef inline void list_busy(UpstreamPool pool, UpstreamConnection conn) noexcept:
    """Into the pool's busy list (inline: no call per request). Its server has counted the
    connection as in use (Balancer.pick); unlist_busy gives it back."""
    if conn.listed:
        return
    conn.listed = True
    conn.busy_next = pool.busy
    if pool.busy is not None:
        pool.busy.busy_prev = conn
    pool.busy = conn


cdef inline void unlist_busy(UpstreamPool pool, UpstreamConnection conn) noexcept:
    if not conn.listed:
        return
    conn.listed = False
    if conn.busy_prev is None:
        pool.busy = conn.busy_next
    else:
        conn.busy_prev.busy_next = conn.busy_next
    if conn.busy_next is not None:
        conn.busy_next.busy_prev = conn.busy_prev
    conn.busy_prev = conn.busy_next = None
    pool.core.metrics.server_put(pool.server_ids[conn.server])
    if pool.waiting is not None and not pool.wake_scheduled and len(pool.waiting):
        pool.wake_scheduled = True  # a connection of this upstream is free: after this callback
        pool.core.loop.call_soon(pool.wake)


cdef inline bint no_longer_waits(UpstreamConsumer ex) noexcept:
    """A request in the queue whose owner is gone (a client that left) or that was answered
    meanwhile (413 or 408 as its body was read): it must not get a connection."""
    return ex.aborted or ex.response_started


@cython.final
cdef class UpstreamPool:
    cdef WorkerCore core
    cdef readonly str name
    cdef int metric_id
    # per server: its index in the metrics zone's server tables (ServerCounters, ServerState),
    # the same in every worker and kept across reloads
    cdef int *server_ids
    cdef tuple hosts        # str per server
    cdef tuple ports        # int per server
    cdef tuple addr_bytes   # b"host:port" per server, for logs
    # per server: create_connection's TLS arguments (the master's context, the name to verify
    # and send as SNI); empty dicts for a plain upstream
    cdef tuple connect_options
    cdef list idle          # per server: list of idle UpstreamConnection (LIFO)
    cdef Balancer balancer  # which server a request goes to; passive health
    # requests waiting while every server is at max_conns (None without a queue): FIFO, each
    # one's UpstreamConsumer.queued_at says since when
    cdef object waiting
    cdef int queue_size
    cdef double queue_timeout
    cdef bint wake_scheduled
    cdef int keepalive
    cdef int idle_count
    # the connections serving a request (connecting, busy or a tunnel), whoever asked: the
    # sweep checks their deadlines here. An intrusive list: no allocation per request
    cdef UpstreamConnection busy
    cdef double keepalive_timeout, connect_timeout, read_timeout, send_timeout
    # the retry policy (docs/retries.md)
    cdef int retry_on            # RETRY_* bits
    cdef int tries               # servers one request may be sent to, the first included
    cdef double retry_timeout    # 0: no bound
    cdef bint retry_non_idempotent
    cdef bint keep_body          # a retry may follow a body sent: keep it, up to retry_buffer
    cdef Py_ssize_t retry_buffer
    cdef uint64_t all_tried      # `tried` bits of every server (all ones past 64 servers)

    def __init__(self, WorkerCore core, upstream, int metric_id, tuple server_ids):
        cdef int i
        self.core = core
        self.name = upstream.name
        self.metric_id = metric_id
        if len(server_ids) != len(upstream.servers) or not all(
                0 <= i < core.metrics.max_servers for i in server_ids):
            raise ValueError(f"upstream {upstream.name}: bad server indexes {server_ids}")
        self.server_ids = <int *>PyMem_Malloc(len(server_ids) * sizeof(int))
        if self.server_ids == NULL:
            raise MemoryError()
        for i in range(len(server_ids)):
            self.server_ids[i] = server_ids[i]
        self.hosts = tuple(s.address.host for s in upstream.servers)
        self.ports = tuple(s.address.port for s in upstream.servers)
        self.addr_bytes = tuple(str(s.address).encode() for s in upstream.servers)
        # the handshake is part of connecting: connect_timeout bounds both (the sweep cancels
        # the connection's task), uvloop's own handshake timeout never comes first
        self.connect_options = tuple(
            {} if upstream.tls is None else {"ssl": upstream.tls, "server_hostname": s.tls_name,
                                             "ssl_handshake_timeout": upstream.connect_timeout + 1}
            for s in upstream.servers)
        self.idle = [[] for _ in upstream.servers]
        self.balancer = Balancer(core, upstream, server_ids)
        self.queue_size = upstream.queue.size
        self.queue_timeout = upstream.queue.timeout
        if self.queue_size:
            self.waiting = deque()
        self.keepalive = upstream.keepalive
        self.idle_count = 0
        self.keepalive_timeout = upstream.keepalive_timeout
        self.connect_timeout = upstream.connect_timeout
        self.read_timeout = upstream.read_timeout
        self.send_timeout = upstream.send_timeout
        self.retry_on = sum(1 << RETRY_CONDITIONS.index(c) for c in set(upstream.retry_on))
        self.tries = upstream.tries
        self.retry_timeout = upstream.retry_timeout
        self.retry_non_idempotent = upstream.retry_non_idempotent
        self.retry_buffer = upstream.retry_buffer
        n = len(upstream.servers)
        # only these failures can follow a body going out ("error" is before the connection)
        self.keep_body = self.tries > 1 and n > 1 and self.retry_buffer > 0 \
            and bool(self.retry_on & ~RETRY_ERROR)
        self.all_tried = (<uint64_t>1 << n) - 1 if n < 64 else <uint64_t>0 - 1

    def __dealloc__(self):
        PyMem_Free(self.server_ids)

    cdef int acquire(self, UpstreamConsumer ex, bint fresh) except -1:
        """Attach a connection to `ex`: the balancer's choice of server, an idle connection
        to it if there is one (unless `fresh`), else a new connection; or, when every server
        is at max_conns, the queue."""
        cdef int server = self.balancer.pick(ex)
        if server < 0:
            self.queue(ex)
        elif fresh:
            self.connect(ex, server)
        else:
            self.attach_taken(ex, server)
        return 0

    # -- the queue (max_conns) ----------------------------------------------------------------

    cdef int queue(self, UpstreamConsumer ex) except -1:
        """Every server that could take `ex` is at max_conns: it waits its turn, or, without
        room in the queue, gets 503."""
        if self.waiting is None:
            ex.upstream_unavailable("every server is at max_conns and the upstream has no queue")
            return 0
        if len(self.waiting) >= self.queue_size:
            self.drop_left()
        if len(self.waiting) >= self.queue_size:
            ex.upstream_unavailable("every server is at max_conns and the queue is full")
            return 0
        ex.queued_at = self.core.now
        self.waiting.append(ex)
        return 0

    cdef int drop_left(self) except -1:
        """Forget the waiting requests that no longer wait (no_longer_waits)."""
        cdef UpstreamConsumer ex
        for ex in [ex for ex in self.waiting if no_longer_waits(ex)]:
            self.waiting.remove(ex)
            ex.queued_at = 0
        return 0

    def wake(self):
        """A connection of this upstream was freed (here, or in another worker: the sweep
        calls this too): the waiting requests, oldest first, take what is free now."""
        cdef UpstreamConsumer ex
        cdef int server
        self.wake_scheduled = False
        self.core.now = monotonic()
        while self.waiting:
            ex = <UpstreamConsumer>self.waiting[0]
            if no_longer_waits(ex):
                self.waiting.popleft()
                ex.queued_at = 0
                continue
            server = self.balancer.pick(ex)
            if server < 0:
                return
            self.waiting.popleft()
            ex.queued_at = 0
            try:
                self.attach_taken(ex, server)
            except Exception as exc:
                ex.internal_error(exc)

    cdef inline int attach_taken(self, UpstreamConsumer ex, int server) except -1:
        """`server` is taken for `ex` (Balancer.pick): an idle connection to it, else a new one."""
        cdef list idle = <list>self.idle[server]
        cdef UpstreamConnection conn
        while idle:
            conn = <UpstreamConnection>idle.pop()
            self.idle_count -= 1
            if conn.state == UP_IDLE:
                conn.attach(ex)
                ex.upstream_ready(conn)
                return 0
        self.connect(ex, server)
        return 0

    cdef int expire_queue(self, double now) except -1:
        """The sweep: 503 for the requests that waited queue.timeout, then a wake for the
        connections other workers freed."""
        cdef UpstreamConsumer ex
        while self.waiting:
            ex = <UpstreamConsumer>self.waiting[0]
            if not no_longer_waits(ex) and now - ex.queued_at < self.queue_timeout:
                break
            self.waiting.popleft()
            ex.queued_at = 0
            if not no_longer_waits(ex):
                try:
                    ex.upstream_unavailable("every server was at max_conns for queue.timeout (%gs)"
                                            % self.queue_timeout)
                except Exception as exc:
                    ex.internal_error(exc)
        if self.waiting:
            self.wake()
        return 0

    # -- passive health: the connection's outcomes (one line at each call site) --------------

    cdef int note_failure(self, int server, int kind) except -1:
        """Server `server` (a position) failed a request (UPSTREAM_* kind): counted in its
        metrics and its passive health."""
        return self.balancer.failure(server, kind)

    cdef inline int response_done(self, int server, int status, double seconds) except -1:
        """A complete response of `status` from `server`, `seconds` after its exchange was
        attached: its response time, and a success, or a failure for a fail_status status."""
        self.core.metrics.server_response_time(self.server_ids[server], seconds)
        return self.note_status(server, status)

    cdef inline int note_status(self, int server, int status) except -1:
        """A response of `status` from `server` (whole, or dropped for a retry): a failure
        if fail_status lists it, else a success."""
        if self.balancer.failed_status(status):
            return self.balancer.failure(server, UPSTREAM_STATUS)
        return self.balancer.success(server)

    cdef int log_failure(self, UpstreamConsumer ex, int server, str reason) except -1:
        """The error line of a failure; rate-limited for a server out of service."""
        cdef int left_out = self.balancer.failure_lines(server, self.core.now)
        if left_out < 0:
            return 0
        if left_out:
            reason += "; %d more failures of this server while out of service were not logged" % left_out
        self.core.log_upstream_error(ex, self.name, (<bytes>self.addr_bytes[server]).decode(), reason)
        return 0

    cdef int connect(self, UpstreamConsumer ex, int server) except -1:
        cdef UpstreamConnection conn = UpstreamConnection(self, server)
        conn.attach(ex)
        conn.state = UP_CONNECTING
        conn.connect_task = self.core.loop.create_task(self.core.loop.create_connection(
            conn._protocol, self.hosts[server], self.ports[server], **<dict>self.connect_options[server]))
        conn.connect_task.add_done_callback(conn._connect_done)
        conn.wait_for(WAIT_CONNECT, self.connect_timeout)
        return 0

    cdef int release(self, UpstreamConnection conn) except -1:
        """Back to the idle list after a complete exchange. The surplus over `keepalive`
        is closed by a later sweep rather than at once: under load, responses finish in
        bursts and a connection closed now would be reopened a moment later."""
        conn.exchange = None
        unlist_busy(self, conn)
        if self.keepalive == 0 or self.core.draining:
            conn.close()
            return 0
        conn.state = UP_IDLE
        conn.idle_at = self.core.now
        conn.deadline = conn.idle_at + self.keepalive_timeout
        (<list>self.idle[conn.server]).append(conn)
        self.idle_count += 1
        return 0

    cdef int expire_busy(self, double now) except -1:
        """Time out the busy connections whose deadline has passed."""
        cdef list expired = None
        cdef UpstreamConnection conn = self.busy
        while conn is not None:
            if conn.deadline and conn.deadline <= now:
                if expired is None:
                    expired = []
                expired.append(conn)
            conn = conn.busy_next
        for conn in expired or ():
            if conn.listed and conn.deadline and conn.deadline <= now:
                conn.timed_out()  # an earlier one's failure may have closed it: looked at again
        return 0

    cdef int forget_idle(self, UpstreamConnection conn) except -1:
        cdef list idle = <list>self.idle[conn.server]
        if conn in idle:
            idle.remove(conn)
            self.idle_count -= 1
        return 0

    cdef int expire_idle(self, double now, double unused_since) except -1:
        """Close idle connections past keepalive_timeout, then, least recently used first,
        those beyond `keepalive` that nobody took since `unused_since` (the previous
        sweep): a surplus still in use under load is kept."""
        cdef list idle
        cdef UpstreamConnection conn
        cdef int server
        for server, idle in enumerate(self.idle):
            for conn in list(idle):
                # a server the newest config dropped gets no new request: its idle ones go
                if conn.deadline <= now or self.core.draining or self.balancer.removed(server):
                    conn.close()
        while self.idle_count > self.keepalive:
            conn = min([<UpstreamConnection>idle[0] for idle in self.idle if idle],
                       key=idle_since)
            if conn.idle_at > unused_since:
                break
            conn.close()
        return 0

    cdef int close_all(self) except -1:
        cdef list idle
        cdef UpstreamConnection conn
        for idle in self.idle:
            for conn in list(idle):
                conn.close()
        return 0


cdef inline bint passes_to_client(int kind) noexcept:
    """Response headers are end to end, so relayed as received, except the hop-by-hop
    ones and the two the proxy sets itself (Server, X-Request-ID)."""
    return not (kind == H_CONNECTION or kind == H_KEEP_ALIVE or kind == H_PROXY_CONNECTION
                or kind == H_TE or kind == H_TRAILER or kind == H_UPGRADE
                or kind == H_TRANSFER_ENCODING or kind == H_SERVER or kind == H_X_REQUEST_ID)


@cython.final
cdef class UpstreamConnection:
    cdef UpstreamPool pool
    cdef int server
    cdef int state
    cdef object transport
    cdef object parser
    # bound methods looked up once per parser / transport instead of once per call
    cdef object feed, status_code, keep_alive, write_one, write_many
    cdef object connect_task
    cdef UpstreamConsumer exchange  # what it serves now (named for the client's Exchange)
    cdef double deadline         # 0: none; idle in the pool: when it is closed
    cdef int waiting             # WAIT_*: what the deadline of a busy connection is for
    cdef double wait_since       # when that wait began (the last sign of progress)
    cdef Py_ssize_t blocked_size # request bytes not taken by the upstream when last looked
    cdef double idle_at          # when it last went back to the pool
    cdef bint listed             # in its pool's busy list, between these two
    cdef UpstreamConnection busy_prev, busy_next
    cdef int requests            # exchanges completed on this connection
    cdef double started          # when the current exchange was attached (response time)
    cdef int resp_status         # the current final response's status
    cdef bint got_bytes          # any response byte for the current exchange
    cdef bint informational      # parsing a 1xx response
    cdef bint relayed_interim    # a 1xx of the current exchange went to its client: no retry
    cdef bint switching          # a 101: the connection becomes a tunnel
    cdef bint response_head_seen # the current response's head has been read
    cdef bint response_done      # the whole response is parsed; anything after it is an error
    cdef bint resp_keep_alive
    cdef bint read_paused
    cdef bint write_blocked      # our request bytes fill the transport's buffer
    cdef BodyReader body_reader  # the transport's protocol while a long body streams, else None
    # the response being parsed
    cdef bytes head_buf          # bytes read since the response head began
    cdef Py_ssize_t head_start   # where it begins in head_buf (after the 1xx heads before it)
    cdef bytes resp_server       # only kept with pass_server_header
    cdef frozenset resp_conn_drop  # header names its Connection header lists
    cdef bytes resp_upgrade
    cdef bint resp_has_length
    cdef bint resp_has_date
    cdef bint resp_chunked
    cdef Py_ssize_t resp_length   # its Content-Length, or -1
    cdef Py_ssize_t body_relayed  # body bytes of it passed on so far

    def __init__(self, UpstreamPool pool, int server):
        self.pool = pool
        self.server = server
        self.new_parser()

    def _protocol(self):
        return self

    def _connect_done(self, task):
        self.pool.core.now = monotonic()
        try:
            self.connect_done(task)
        except Exception as exc:
            self.internal_error(exc)

    cdef int connect_done(self, object task) except -1:
        self.connect_task = None
        if self.state == UP_CLOSED:
            return 0  # closed on purpose (its client left) while connecting
        if task.cancelled():
            self.connect_failed(UPSTREAM_TIMEOUT, "connect_timeout (%gs) expired after %.1fs" % (
                self.pool.connect_timeout, self.pool.core.now - self.wait_since))
        elif task.exception() is not None:
            self.connect_failed(UPSTREAM_CONNECT, "connect failed: %s" % task.exception())
        return 0

    cdef int connect_failed(self, int kind, str reason) except -1:
        cdef UpstreamConsumer ex = self.exchange
        self.state = UP_CLOSED
        unlist_busy(self.pool, self)
        self.drop_references()
        self.exchange = None
        self.fail_exchange(ex, kind, reason)
        return 0

    cdef int fail_exchange(self, UpstreamConsumer ex, int kind, str reason) except -1:
        """Count a failure of this connection; retry `ex` on another server if the policy
        says so, else log it and tell `ex`: 502/504 while no response byte was relayed, else
        that its response is cut off."""
        self.pool.note_failure(self.server, kind)
        self.pool.core.metrics.upstream_error(self.pool.metric_id, kind)
        if ex is None or ex.aborted:
            return 0
        ex.upstream = None
        if self.retry(ex, RETRY_ERROR if kind == UPSTREAM_CONNECT else
                      RETRY_TIMEOUT if kind == UPSTREAM_TIMEOUT else RETRY_RESET,
                      self.transport is not None, reason):  # connected: it may have been sent
            return 0
        self.pool.log_failure(ex, self.server, reason)
        if ex.response_started:
            ex.response_cut()
        else:
            ex.upstream_failed(504 if kind == UPSTREAM_TIMEOUT else 502)
        return 0

    cdef bint may_retry(self, UpstreamConsumer ex, int condition, bint sent) except -1:
        """Whether `ex`, which this connection failed, goes to another server (the
        upstream's policy, docs/retries.md): `condition` is in retry_on, a try is left, a
        server is left untried, nothing of the response reached the client, and the
        consumer can send the request again (`sent`: it may have reached this server)."""
        cdef UpstreamPool pool = self.pool
        return (pool.retry_on & condition) != 0 and ex.retries + 1 < pool.tries \
            and (ex.tried | (<uint64_t>1 << self.server if self.server < 64 else 0)) != pool.all_tried \
            and not ex.response_started and not self.relayed_interim and ex.can_resend(pool, sent)

    cdef bint retry(self, UpstreamConsumer ex, int condition, bint sent, str reason) except -1:
        """Send `ex` again, to another server, if may_retry. False: nothing done."""
        if not self.may_retry(ex, condition, sent):
            return False
        self.send_again(ex, reason)
        return True

    cdef int send_again(self, UpstreamConsumer ex, str reason) except -1:
        """The retry of `ex`, which this connection failed for `reason`: counted and logged
        once, with the reason and the server it goes to next."""
        cdef UpstreamPool pool = self.pool
        ex.retries += 1
        if self.server < 64:
            ex.tried |= <uint64_t>1 << self.server
        pool.core.metrics.upstream_retry(pool.metric_id)
        ex.upstream = None
        pool.acquire(ex, True)
        pool.log_failure(ex, self.server, "%s; retried on %s (try %d of %d)" % (
            reason, ex.upstream.address() if ex.upstream is not None else "the next free server",
            ex.retries + 1, pool.tries))
        return 0

    cdef str address(self):
        return (<bytes>self.pool.addr_bytes[self.server]).decode()

    cdef int attach(self, UpstreamConsumer ex) except -1:
        self.exchange = ex
        list_busy(self.pool, self)
        self.pool.core.metrics.server_request(self.pool.server_ids[self.server])
        self.started = self.pool.core.now
        ex.upstream = self
        ex.upstream_addr = <bytes>self.pool.addr_bytes[self.server]
        self.got_bytes = False
        self.relayed_interim = False
        self.head_buf = None
        self.head_start = 0
        self.response_head_seen = False
        self.response_done = False
        self.forget_response_headers()
        self.stop_waiting()  # a pooled connection's idle deadline is not this exchange's
        if self.state == UP_IDLE:
            self.state = UP_BUSY
        return 0

    cdef void forget_response_headers(self) noexcept:
        self.resp_server = None
        self.resp_conn_drop = None
        self.resp_upgrade = None
        self.resp_has_length = False
        self.resp_has_date = False
        self.resp_chunked = False
        self.resp_length = -1
        self.body_relayed = 0

    # -- deadlines --------------------------------------------------------------

    cdef inline void wait_for(self, int what, double timeout) noexcept:
        self.waiting = what
        self.wait_since = self.pool.core.now
        self.deadline = self.wait_since + timeout

    cdef inline void stop_waiting(self) noexcept:
        self.waiting = WAIT_NONE
        self.deadline = 0

    cdef void await_response(self) noexcept:
        """The request is sent, or a response byte came after it: read_timeout runs from
        now. While either direction is paused, that pause's own timeout applies instead
        (send_timeout here, the client's send_timeout when it is not reading)."""
        if not self.write_blocked and not self.read_paused:
            self.wait_for(WAIT_READ, self.pool.read_timeout)

    # -- asyncio protocol -------------------------------------------------------

    cdef int internal_error(self, exc) except -1:
        cdef UpstreamConsumer ex = self.exchange
        self.close()
        if ex is not None:
            ex.internal_error(exc)
        else:
            self.pool.core.report_error(exc)
        return 0

    def connection_made(self, transport):
        self.pool.core.now = monotonic()
        try:
            self.made(transport)
        except Exception as exc:
            self.internal_error(exc)

    cdef int made(self, object transport) except -1:
        self.transport = transport
        self.write_one = transport.write
        self.write_many = transport.writelines
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.state = UP_BUSY
        self.stop_waiting()
        if self.exchange is None or self.exchange.aborted:
            self.exchange = None
            self.pool.release(self)  # connected for a client that left: keep it for the next
            return 0
        self.exchange.upstream_ready(self)
        return 0

    def data_received(self, data):
        self.pool.core.now = monotonic()
        try:
            self.receive(data)
        except Exception as exc:
            self.internal_error(exc)

    cdef int receive(self, object data) except -1:
        """One read: bytes, or a view of the worker's read buffer while a body streams."""
        cdef UpstreamConsumer ex = self.exchange
        if ex is None or self.state != UP_BUSY:
            if self.state == UP_TUNNEL and ex is not None:
                ex.tunnel_data(data)
                return 0
            self.unsolicited(data)
            return 0
        if not self.response_head_seen:
            if self.body_reader is not None:
                data = bytes(data)  # the head is kept across reads: not a view of the buffer
            self.head_buf = <bytes>data if self.head_buf is None else self.head_buf + data
        self.got_bytes = True
        if ex.request_done:
            self.await_response()
        try:
            self.feed(data)
        except HttpParserUpgrade as exc:
            self.upgraded(data[exc.args[0]:])
        except HttpParserCallbackError as exc:
            self.callback_failed(exc.__context__)
        except HttpParserError as exc:
            self.protocol_error("invalid response: %s" % exc)
        else:
            # completed only now, with the whole read parsed: bytes after the response
            # have made on_message_begin fail instead of reaching a pooled connection
            if self.response_done:
                self.response_complete()
            elif not self.response_head_seen and PyBytes_GET_SIZE(self.head_buf) > MAX_RESPONSE_HEAD:
                self.protocol_error("response head over %d bytes" % MAX_RESPONSE_HEAD)
            elif self.body_reader is None and self.state == UP_BUSY and self.response_head_seen \
                    and (self.resp_length > LONG_BODY or self.body_relayed > LONG_BODY):
                self.read_body_into_buffer(True)
        ex.read_done()  # one write for everything this read produced
        return 0

    cdef int callback_failed(self, object cause) except -1:
        if isinstance(cause, _BadResponse):
            self.protocol_error(cause.args[0])
        elif isinstance(cause, _RetryStatus):
            self.status_retry(cause.args[0])
        else:
            self.internal_error(cause)
        return 0

    cdef int status_retry(self, int status) except -1:
        """The server answered `status` (502, 503 or 504) and on_headers_complete found the
        request may be retried (may_retry): its response is dropped unread and the
        connection closed (a server in that state is not worth waiting on for the body),
        and the request goes to another server. The last try's response is relayed as it
        is, whatever its status."""
        cdef UpstreamConsumer ex = self.exchange
        self.exchange = None
        self.close()
        self.pool.note_status(self.server, status)
        self.send_again(ex, "answered %d" % status)
        return 0

    cdef int unsolicited(self, object data) except -1:
        """Bytes while no request is outstanding: the connection cannot be trusted."""
        if self.state == UP_IDLE:
            self.pool.core.metrics.upstream_error(self.pool.metric_id, UPSTREAM_RESET)
            self.pool.core.metrics.server_failure(self.pool.server_ids[self.server], UPSTREAM_RESET)
            self.pool.core.log_upstream_error(None, self.pool.name, self.address(),
                                              "sent %d bytes while idle; connection closed" % len(data))
        self.close()
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.pool.core.now = monotonic()
        try:
            self.lost(exc)
        except Exception as error:
            self.internal_error(error)

    cdef int lost(self, object exc) except -1:
        cdef UpstreamConsumer ex = self.exchange
        cdef int previous = self.state
        self.state = UP_CLOSED
        unlist_busy(self.pool, self)
        self.drop_references()
        if previous == UP_IDLE:
            self.pool.forget_idle(self)
            return 0
        self.exchange = None
        if ex is None or ex.aborted:
            return 0
        if previous == UP_TUNNEL:
            ex.tunnel_closed()
            return 0
        if ex.response_started and not self.resp_has_length and not self.resp_chunked:
            # a body with neither length nor chunking ends when the upstream closes
            ex.upstream = None
            ex.response_complete()
            return 0
        if not self.got_bytes and self.requests > 0 and ex.can_retry():
            # a kept-alive connection the upstream closed as we reused it: the request
            # never reached it, so send it again on a new connection
            self.pool.core.metrics.upstream_error(self.pool.metric_id, UPSTREAM_RESET)
            ex.upstream = None
            ex.retried = True
            self.pool.acquire(ex, True)
            return 0
        self.fail_exchange(ex, UPSTREAM_RESET,
                           "connection lost: %s" % exc if exc is not None else
                           "closed the connection before the response was complete")
        return 0

    def pause_writing(self):
        self.pool.core.now = monotonic()
        self.write_blocked = True
        if self.exchange is not None:
            self.exchange.pause_source()
            self.blocked_size = self.untaken()
            self.wait_for(WAIT_SEND, self.pool.send_timeout)

    def resume_writing(self):
        self.pool.core.now = monotonic()
        self.write_blocked = False
        if self.exchange is not None:
            self.exchange.resume_source()
            if self.state == UP_BUSY and self.exchange.request_done:
                self.await_response()
            else:
                self.stop_waiting()  # the client's body timeout guards the rest of the upload

    # -- httptools callbacks ----------------------------------------------------

    # No on_header callback: httptools validates and frames the response, and the
    # head is read straight from the received bytes (copy_head), copying runs of
    # untouched header lines into the head for the client instead of a Python call and
    # two bytes objects per header.

    def on_message_begin(self):
        if self.response_done:
            raise _BadResponse("sent bytes after a complete response; connection closed")

    def on_headers_complete(self):
        cdef UpstreamConsumer ex = self.exchange
        cdef int status = self.status_code()
        cdef bytes raw = self.head_buf
        cdef const char *p = PyBytes_AS_STRING(raw)
        cdef Py_ssize_t start = self.head_start, first, end
        while p[start] == b'\r' or p[start] == b'\n':
            start += 1  # llhttp skips empty lines before a message
        end = find_crlfcrlf(raw, start) + 2
        first = find_byte(raw, b'\n', start) + 1  # after the status line
        if end + 2 > MAX_RESPONSE_HEAD:
            raise _BadResponse("response head over %d bytes" % MAX_RESPONSE_HEAD)
        if status < 100:
            raise _BadResponse("invalid status %d" % status)
        if status < 200 and status != 101:
            self.head_start = end + 2
            self.informational = True
            # RFC 9110 15.2: relay 1xx to HTTP/1.1 clients, except the 100 Continue we
            # answer ourselves (we never send Expect upstream)
            if status != 100 and ex.http11:
                ex.interim_response(self, status, raw, first, end)
                self.relayed_interim = True
                self.forget_response_headers()  # they belonged to the 1xx
            return
        if status == 101 and not (ex.upgrading and self.parser.should_upgrade()):
            raise _BadResponse("101 to a request that asked for no upgrade")
        if 502 <= status <= 504 and self.may_retry(ex, RETRY_502 << (status - 502), True):
            raise _RetryStatus(status)  # not relayed: see status_retry
        self.head_buf = None
        self.response_head_seen = True
        if ex.is_head:
            # no body, whatever the head says (RFC 9110 9.3.2): llhttp completes the message
            # now, a length or not, so bytes after it fail on_message_begin
            skip_body(self.parser)
        self.resp_keep_alive = self.keep_alive()
        self.resp_status = status
        self.switching = status == 101
        ex.response_head(self, status, raw, first, end)

    def on_body(self, bytes body):
        self.body_relayed += PyBytes_GET_SIZE(body)
        self.exchange.response_body(body)

    def on_message_complete(self):
        if self.switching:
            return  # httptools raises HttpParserUpgrade next: see upgraded()
        if self.informational:
            self.informational = False
            return
        self.response_done = True  # completed once the whole read is parsed: see receive()

    # -- helpers ----------------------------------------------------------------

    cdef int new_parser(self) except -1:
        self.parser = HttpResponseParser(self)
        self.feed = self.parser.feed_data
        self.status_code = self.parser.get_status_code
        self.keep_alive = self.parser.should_keep_alive
        return 0

    cdef int drop_references(self) except -1:
        """The parser, the transport's bound methods and a BodyReader refer back to us:
        break the cycles."""
        self.parser = self.feed = self.status_code = self.keep_alive = None
        self.write_one = self.write_many = None
        if self.body_reader is not None:
            self.body_reader.conn = None
            self.body_reader = None
        return 0

    cdef int copy_head(self, bytes raw, Py_ssize_t pos, Py_ssize_t end, tuple removed,
                       bint keep_length, ByteWriter out) except -1:
        """Note the header lines in raw[pos:end] the proxy acts on and copy the others,
        verbatim, to `out`, but those with a name in `removed` (lower-case, or None), and
        Content-Length unless `keep_length` (the framing decision: ResponseHead.drop_length)."""
        cdef Py_ssize_t mark = out.size
        self.scan_head(raw, pos, end, removed, keep_length, out)
        if self.resp_conn_drop is not None:
            # Connection names other headers: they are hop-by-hop too (rare: rescan)
            out.size = mark
            self.scan_head(raw, pos, end, joined(removed, tuple(self.resp_conn_drop)),
                           keep_length, out)
        return 0

    cdef int scan_head(self, bytes raw, Py_ssize_t pos, Py_ssize_t end,
                       tuple drop, bint keep_length, ByteWriter out) except -1:
        cdef const char *p = PyBytes_AS_STRING(raw)
        cdef const char *colon
        cdef const char *nl
        cdef Py_ssize_t run = -1, value_start, value_end, eol
        cdef int kind
        cdef bint keep
        while pos < end:
            nl = <const char *>memchr(p + pos, b'\n', end - pos)
            # llhttp accepted this head: every line is "name:value" ending in CRLF (no obs-fold)
            eol = nl - p
            colon = <const char *>memchr(p + pos, b':', eol - pos)
            kind = header_kind_at(p + pos, colon - (p + pos))
            keep = passes_to_client(kind) and (keep_length or kind != H_CONTENT_LENGTH)
            if kind != H_OTHER:
                value_start = colon + 1 - p
                value_end = eol - 1
                while value_start < value_end and (p[value_start] == b' ' or p[value_start] == b'\t'):
                    value_start += 1
                while value_end > value_start and (p[value_end - 1] == b' ' or p[value_end - 1] == b'\t'):
                    value_end -= 1
                self.note_header(kind, p + value_start, value_end - value_start)
            if keep and drop is not None and kind != H_CONTENT_LENGTH and kind != H_DATE \
                    and listed(p + pos, colon - (p + pos), drop):
                keep = False  # named in Connection or by a filter (never the framing or Date)
            if keep and run < 0:
                run = pos
            elif not keep and run >= 0:
                out.add_raw(p + run, pos - run)
                run = -1
            pos = eol + 1
        if run >= 0:
            out.add_raw(p + run, end - run)
        return 0

    cdef int note_header(self, int kind, const char *value, Py_ssize_t n) except -1:
        if kind == H_CONTENT_LENGTH:
            self.resp_has_length = True
            self.resp_length = parse_length(value, n)
        elif kind == H_DATE:
            self.resp_has_date = True
        elif kind == H_SERVER:
            if self.pool.core.pass_server_header:
                self.resp_server = PyBytes_FromStringAndSize(value, n)
        elif kind == H_CONNECTION:
            if not plain_connection(value, n):
                self.resp_conn_drop = union(self.resp_conn_drop, hop_by_hop_names(
                    connection_tokens(PyBytes_FromStringAndSize(value, n))))
        elif kind == H_UPGRADE:
            self.resp_upgrade = PyBytes_FromStringAndSize(value, n)
        elif kind == H_TRANSFER_ENCODING:
            self.resp_chunked = ends_with_chunked(value, n)
        return 0

    cdef int read_body_into_buffer(self, bint on) except -1:
        """Switch the transport to (on) or back from BodyReader; see its docstring."""
        if on:
            self.body_reader = BodyReader.__new__(BodyReader)
            self.body_reader.conn = self
            self.transport.set_protocol(self.body_reader)
        else:
            self.body_reader.conn = None
            self.body_reader = None
            self.transport.set_protocol(self)
        return 0

    cdef object body_buffer(self):
        """Where BodyReader's next read goes: as much of the worker's read buffer as the
        client can take without going over its high-water mark."""
        cdef UpstreamConsumer ex = self.exchange
        cdef Py_ssize_t room = BODY_READ_MAX
        if ex is not None:
            room = ex.send_room()
        if room >= BODY_READ_MAX:
            return self.pool.core.read_view
        return self.pool.core.read_view[:max(room, BODY_READ_MIN)]

    cdef int response_complete(self) except -1:
        cdef UpstreamConsumer ex = self.exchange
        # with request bytes still buffered, the upstream answered before reading them all:
        # sent later, they would be read as the next request
        cdef bint reusable = self.resp_keep_alive and ex.request_done and not ex.upgrading \
            and not self.write_blocked
        self.requests += 1
        self.stop_waiting()
        self.pool.response_done(self.server, self.resp_status, self.pool.core.now - self.started)
        if reusable:
            self.pool.release(self)
        else:
            self.exchange = None
            self.close()
        ex.upstream = None
        ex.response_complete()
        return 0

    cdef int protocol_error(self, str reason) except -1:
        """The upstream broke HTTP: the connection is closed, never reused. A response
        already complete still reaches the client; otherwise 502 (or a cut-off body)."""
        cdef UpstreamConsumer ex = self.exchange
        self.exchange = None
        self.close()
        if not self.response_done:
            self.fail_exchange(ex, UPSTREAM_RESET, reason)
            return 0
        self.pool.core.metrics.upstream_error(self.pool.metric_id, UPSTREAM_RESET)
        self.pool.core.metrics.server_failure(self.pool.server_ids[self.server], UPSTREAM_RESET)
        self.pool.core.log_upstream_error(ex, self.pool.name, self.address(), reason)
        ex.upstream = None
        ex.response_complete()
        return 0

    cdef int upgraded(self, bytes rest) except -1:
        """The upstream answered 101: from here on both sides are an opaque tunnel."""
        cdef UpstreamConsumer ex = self.exchange
        self.state = UP_TUNNEL
        self.stop_waiting()
        if self.body_reader is not None:
            self.read_body_into_buffer(False)  # tunnel bytes are written on, not parsed
        ex.tunnel_started(self, rest)
        return 0

    cdef int send(self, list out) except -1:
        if len(out) == 1:
            self.write_one(<bytes>out[0])
        else:
            self.write_many(out)  # one writev, no copy into a joined buffer
        return 0

    cdef int pause(self) except -1:
        """The client's write buffer is over its high-water mark: stop reading (its
        send_timeout applies, not our read_timeout); from now on until this response ends,
        read no more than the client has room for (BodyReader)."""
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            if not self.write_blocked:
                self.stop_waiting()
            self.transport.pause_reading()
            if self.body_reader is None and self.state == UP_BUSY:
                self.read_body_into_buffer(True)
        return 0

    cdef int resume(self) except -1:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            if self.state == UP_BUSY and self.exchange is not None and self.exchange.request_done:
                self.await_response()
            self.transport.resume_reading()
        return 0

    cdef int timed_out(self) except -1:
        cdef UpstreamConsumer ex = self.exchange
        cdef double waited = self.pool.core.now - self.wait_since
        cdef Py_ssize_t untaken
        cdef str reason
        if self.state == UP_CONNECTING:
            if self.connect_task is not None:
                self.connect_task.cancel()  # _connect_done reports the timeout
            return 0
        if self.waiting == WAIT_SEND:
            untaken = self.untaken()
            if untaken < self.blocked_size:
                # the upstream took part of the request since we last looked: slow, not stuck
                self.blocked_size = untaken
                self.wait_for(WAIT_SEND, self.pool.send_timeout)
                return 0
            reason = "send_timeout (%gs) expired: the upstream took none of the request for %.1fs" % (
                self.pool.send_timeout, waited)
        elif self.got_bytes:
            reason = "read_timeout (%gs) expired: nothing from the upstream for %.1fs after its last byte" % (
                self.pool.read_timeout, waited)
        else:
            reason = "read_timeout (%gs) expired: no response %.1fs after the request was sent" % (
                self.pool.read_timeout, waited)
        self.exchange = None
        self.close()
        self.fail_exchange(ex, UPSTREAM_TIMEOUT, reason)
        return 0

    cdef Py_ssize_t untaken(self) except -1:
        """Request bytes the upstream has not acknowledged: in our write buffer and in the
        kernel's send queue (which hides megabytes of progress on a fast link). Only
        looked at while writing is paused, so the system call is rare."""
        sock = self.transport.get_extra_info("socket")
        return self.transport.get_write_buffer_size() + (
            socket_queued(sock.fileno()) if sock is not None else 0)

    cdef int close(self) except -1:
        if self.state == UP_IDLE:
            self.pool.forget_idle(self)
        self.state = UP_CLOSED
        unlist_busy(self.pool, self)
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.transport is not None:
            self.transport.abort()
        return 0
