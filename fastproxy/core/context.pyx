# The per-worker core: built once per worker from the compiled Runtime, it owns the
# router, the upstream pools, the metrics writer, the access log and the periodic tick
# that enforces every timeout (one sweep instead of a timer per connection).

from gc import collect as gc_collect, get_referents
import logging
from weakref import WeakValueDictionary

from cpython.ref cimport Py_INCREF, Py_DECREF

cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)

# Giving memory back after a burst of connections (docs/architecture.md): the sweep trims
# the heap once the open connections have fallen by at least TRIM_MIN_DROP from their peak
# and to at most half of it, and have stopped falling; not again within TRIM_MIN_INTERVAL.
cdef Py_ssize_t TRIM_MIN_DROP = 1000
cdef double TRIM_MIN_INTERVAL = 10.0

# Client connection objects kept for reuse once their connection is gone (see
# ClientConnection.forget): enough for a burst of short connections, bounded so a burst of
# thousands does not stay in memory for good.
cdef Py_ssize_t SPARE_CLIENTS = 256

# Refused requests are logged at info, at most this many a second per worker: a flood of
# bad requests must not become a flood of log lines (the rest are counted, see log_refused).
cdef int REFUSALS_LOGGED_PER_SECOND = 10

# Why a request was refused, when the code refusing it gave no more precise reason.
REFUSAL_REASONS = {
    400: "bad request",
    413: "body larger than max_body_size",
    414: "request target longer than max_uri_size",
    431: "request head larger than max_header_size",
}


@cython.final
cdef class NoTransportIndex:
    """Stands in for uvloop's per-loop index of transports by descriptor (a private
    WeakValueDictionary, Loop._transports): registering each accepted transport there runs
    Python-level code and a weak reference with a callback, about an eighth of the worker's
    instructions for a one-request connection (docs/benchmarks.md, "Cost of a connection").
    uvloop only reads the index to refuse add_reader/add_writer on a descriptor a live
    transport owns, a guard against misuse that the worker (which never calls them with a
    client's descriptor) does not need."""

    def __setitem__(self, key, value):
        pass

    def __getitem__(self, key):
        raise KeyError(key)


def skip_transport_index(loop):
    """Put a NoTransportIndex in place of `loop`'s transport index; False (and nothing
    changed) unless exactly one field of the loop object holds it, still empty. uvloop keeps
    it in a private C field, so the field is found by its value: the one WeakValueDictionary
    the loop refers to, looked for among the loop's pointer-sized fields."""
    cdef PyObject **fields = <PyObject **><PyObject *>loop
    cdef Py_ssize_t i, found = -1
    cdef object index
    cdef object replacement = NoTransportIndex()
    held = [o for o in get_referents(loop) if type(o) is WeakValueDictionary]
    if len(held) != 1 or len(held[0]):
        return False
    index = held[0]
    # the object header (refcount, type) comes first: fields start after it
    for i in range(2, type(loop).__basicsize__ // sizeof(PyObject *)):
        if fields[i] == <PyObject *>index:
            if found >= 0:
                return False
            found = i
    if found < 0:
        return False
    Py_INCREF(replacement)
    fields[found] = <PyObject *>replacement
    Py_DECREF(index)  # the loop's reference; `index` still holds one until we return
    return True


@cython.final
cdef class WorkerCore:
    cdef object loop
    cdef Router router
    cdef dict pools_by_name
    cdef MetricsWriter metrics
    cdef AccessLog access_log
    cdef set clients
    cdef list spare_clients  # ClientConnection objects ready for the next connections
    cdef RequestIds ids
    cdef ByteWriter head_writer  # every message head is built in it, then taken as bytes
    cdef ResponseHead head_edits  # what response_head hooks edit: one, reused for every response
    cdef object zones  # the generation's zones by name (a ZoneSet), for the filters' runtime halves
    cdef set paused  # exchanges a filter has paused (FILTER_PAUSE): the sweep bounds their wait
    cdef double pause_timeout
    cdef double drain_pauses_until  # draining: the end of the pauses (see expire_pauses)
    # response bodies that span several reads are read into this one buffer (BodyReader):
    # a read is handled before the next begins, so every connection can share it
    cdef object read_view
    cdef bint draining
    cdef double drain_deadline
    # monotonic time of the event-loop callback being run: every entry point from the
    # loop (protocol callbacks, the sweep) sets it, so per-request code reads a field
    # instead of calling clock_gettime several times per request
    cdef double now
    cdef object on_drained
    cdef object error_logger
    cdef Py_ssize_t max_header_size, max_uri_size
    cdef double client_header_timeout, client_body_timeout, keepalive_timeout, send_timeout
    cdef int keepalive_requests
    cdef bytes server_line
    cdef bytes date_line
    cdef bint pass_server_header
    cdef bint allow_encoded_slashes
    cdef double tick_interval
    cdef double refusals_window_end
    cdef int refusals_logged, refusals_unlogged
    cdef double next_log_flush
    cdef double log_flush_interval
    cdef object tick_handle
    cdef Py_ssize_t clients_peak  # most clients open at once since the last trim
    cdef Py_ssize_t clients_before  # clients open at the previous sweep
    cdef double next_trim         # monotonic time before which the heap is not trimmed
    cdef Py_ssize_t trims
    cdef readonly tuple factories  # the protocol factory of each listener, parallel to runtime.listeners
    cdef Poller poller  # plain client sockets and listeners (core/stream.pyx), made with the first

    def __init__(self, loop, runtime, route_ids, upstream_ids, server_ids, MetricsWriter metrics,
                 zones, on_drained, error_logger):
        main = runtime.main
        self.loop = loop
        self.zones = zones
        self.paused = set()
        self.pause_timeout = main.pause_timeout
        if not skip_transport_index(loop) and error_logger is not None:
            error_logger.debug("uvloop's transport index not found: each connection registers in it")
        self.on_drained = on_drained
        self.error_logger = error_logger
        self.clients = set()
        self.spare_clients = []
        self.ids = RequestIds()
        self.head_writer = ByteWriter(4096)
        self.head_edits = ResponseHead()
        self.read_view = memoryview(bytearray(BODY_READ_MAX))
        self.metrics = metrics
        self.max_uri_size = main.max_uri_size
        self.max_header_size = max([main.max_header_size] + [r.max_header_size for r in runtime.routes])
        self.client_header_timeout = main.client_header_timeout
        self.client_body_timeout = main.client_body_timeout
        self.keepalive_timeout = main.keepalive_timeout
        self.send_timeout = main.send_timeout
        self.keepalive_requests = main.keepalive_requests
        self.server_line = b"Server: " + main.server_header + b"\r\n" if main.server_header else b""
        self.pass_server_header = main.pass_server_header
        self.allow_encoded_slashes = main.allow_encoded_slashes
        self.pools_by_name = {
            u.name: UpstreamPool(self, u, upstream_ids[i], server_ids[i])
            for i, u in enumerate(runtime.upstreams)}
        self.router = Router([self.compile_route(r, route_ids[i]) for i, r in enumerate(runtime.routes)])
        self.factories = self.listener_factories(runtime, route_ids[len(runtime.routes):])
        log = runtime.access_log
        self.access_log = None if log.path == "off" else AccessLog(log.path, log.format, log.buffer_size)
        self.log_flush_interval = log.flush_interval
        timeouts = [main.client_header_timeout, main.client_body_timeout, main.keepalive_timeout,
                    main.send_timeout, main.pause_timeout, log.flush_interval]
        if main.shutdown_timeout:
            timeouts.append(main.shutdown_timeout / 2)  # see expire_pauses
        for u in runtime.upstreams:
            timeouts += [u.connect_timeout, u.read_timeout, u.send_timeout, u.keepalive_timeout]
        # timeouts fire within a quarter of the shortest one, and at least once a second
        self.tick_interval = max(0.01, min(1.0, min(timeouts) / 4))
        self.date_line = b"Date: " + http_date() + b"\r\n"

    cdef CompiledRoute compile_route(self, route, int metric_id):
        cdef CompiledRoute cr = CompiledRoute()
        cdef Filter local
        handler = route.handler
        cr.name = route.name
        cr.log_name = escape_json(route.name.encode())
        cr.metric_id = metric_id
        cr.hosts = tuple(h for h in route.hosts if not h.startswith(b"*."))
        cr.host_suffixes = tuple(h[1:] for h in route.hosts if h.startswith(b"*."))
        cr.path = route.path
        cr.prefix = route.path_prefix
        cr.methods = tuple(route.methods)
        cr.max_body_size = route.max_body_size
        cr.max_header_size = route.max_header_size
        (request_head, cr.request_body_filters, cr.upstream_filters, cr.response_head_filters,
         cr.response_body_filters, cr.log_filters, stateful) = route_hooks(route.phases, self)
        if handler.runtime == "proxy":
            cr.pool = self.pools_by_name[handler.upstream]
            cr.upstream_host = upstream_host(cr.pool)
            cr.request_head_filters = request_head
        else:  # a local handler answers as the route's last request_head filter
            local = HANDLER_CLASSES[handler.runtime](handler)
            local.bind(self)
            if handler.stateful:
                local.slot = len(stateful)
                stateful += (local,)
            cr.request_head_filters = request_head + (local,)
        cr.slot_filters = stateful
        cr.slot_count = len(stateful)
        return cr

    cdef tuple listener_factories(self, runtime, route_ids):
        """protocol_factory for a plain listener, a Listening for the others (TLS, or a
        redirect_https listener with its own route, whose metric ids follow the routes')."""
        factories = []
        ids = iter(route_ids)
        for listener in runtime.listeners:
            if listener.tls is None and listener.route is None:
                factories.append(self.protocol_factory)
                continue
            router = self.router
            if listener.route is not None:
                router = Router([self.compile_route(listener.route, next(ids))])
            tls = None if listener.tls is None else TlsListener(listener.tls, self.metrics)
            factories.append(Listening(self, router, tls))
        return tuple(factories)

    def accept_on(self, sock, factory, int backlog):
        """Serve a plain listener from the worker's own epoll set (core/stream.pyx); the
        Acceptor returned stops it with close()."""
        if self.poller is None:
            self.poller = Poller(self, self.loop)
        return Acceptor(self.poller, sock, factory, backlog)

    cdef int report_accept_rest(self, str reason, double rest) except -1:
        if self.error_logger is not None:
            self.error_logger.error("cannot accept connections: %s; the listener rests %.1f s", reason, rest)
        return 0

    def protocol_factory(self):
        if self.spare_clients:
            return self.spare_clients.pop()
        return ClientConnection(self)

    cdef bint keep_spare(self, ClientConnection client) except -1:
        """Keep `client`, whose connection is gone, for a later one; False if enough are kept."""
        if len(self.spare_clients) >= SPARE_CLIENTS or self.draining:
            return False
        self.spare_clients.append(client)
        return True

    def start(self):
        self.next_log_flush = monotonic() + self.log_flush_interval
        self.tick_handle = self.loop.call_later(self.tick_interval, self.tick)

    def tick(self):
        """Periodic sweep: expired timeouts, the Date header, buffered log lines."""
        cdef double now = monotonic()
        cdef ClientConnection client
        cdef UpstreamPool pool
        self.now = now
        self.date_line = b"Date: " + http_date() + b"\r\n"
        for client in list(self.clients):
            if client.deadline and client.deadline <= now:
                client.timed_out()
        if self.paused:
            self.expire_pauses(now)
        for pool in self.pools_by_name.values():
            pool.expire_busy(now)
            pool.expire_idle(now, now - self.tick_interval)
            if pool.waiting:
                pool.expire_queue(now)
        self.return_memory(now)
        if self.access_log is not None and now >= self.next_log_flush:
            self.access_log.tick()
            self.access_log.flush()
            self.next_log_flush = now + self.log_flush_interval
        if self.draining and now >= self.drain_deadline:
            for client in list(self.clients):
                client.abort()
            self.finish_drain()
            return
        self.tick_handle = self.loop.call_later(self.tick_interval, self.tick)

    cdef int expire_pauses(self, double now) except -1:
        """Answer 504 an exchange paused longer than pause_timeout: a filter that paused it
        without a way back is a bug, which costs that request, logged with the filter. While
        draining, 503 one still paused half-way through shutdown_timeout: it gets an answer
        before the master stops the worker."""
        cdef Exchange ex
        cdef int status
        for ex in list(self.paused):
            if ex.filter_state != FS_PAUSED:
                continue  # answered meanwhile, with another in this loop
            if self.draining and now >= self.drain_pauses_until:
                status = 503
            elif now - ex.paused_at >= self.pause_timeout:
                status = 504
                if self.error_logger is not None:
                    self.error_logger.error(
                        'request paused in filter %s for %.1f s, past pause_timeout: answered 504; '
                        'client %s, request "%s %s", request id %s',
                        type(ex.route.request_head_filters[ex.filter_at]).__name__, now - ex.paused_at,
                        ex.client.addr.decode(), log_text(ex.method), log_text(ex.url),
                        log_text(ex.request_id))
            else:
                continue
            try:
                ex.pause_over(status)
            except Exception as exc:  # a bug must not stop the sweep
                ex.internal_error(exc)
        return 0

    cdef int return_memory(self, double now) except -1:
        """Give memory back when a burst of connections has gone. _tune_malloc makes glibc
        keep freed memory for reuse (relay buffers) instead of returning it, so without this
        a worker keeps the memory of its largest burst for good. Runs from the sweep only,
        and does its work at most once per burst."""
        cdef Py_ssize_t open_now = len(self.clients)
        cdef bint falling = open_now < self.clients_before
        self.clients_before = open_now
        if open_now > self.clients_peak:
            self.clients_peak = open_now
        elif self.clients_peak - open_now >= TRIM_MIN_DROP and open_now * 2 <= self.clients_peak \
                and not falling and now >= self.next_trim:
            gc_collect()  # a full collection also empties the interpreter's free lists
            malloc_trim(0)
            self.trims += 1
            if self.error_logger is not None:
                self.error_logger.debug(
                    "heap trimmed (trim %d) in %.1f ms: open connections fell from %d to %d",
                    self.trims, (monotonic() - now) * 1000, self.clients_peak, open_now)
            self.clients_peak = open_now
            self.next_trim = now + TRIM_MIN_INTERVAL
        return 0

    def drain(self, double timeout):
        """Stop taking new work (the caller has closed the listeners); finish what is in
        flight; answer with Connection: close from now on; exit when no client is left."""
        cdef ClientConnection client
        self.draining = True
        self.now = monotonic()
        self.drain_deadline = self.now + timeout
        self.drain_pauses_until = self.now + timeout / 2
        for client in list(self.clients):
            client.drain()
        # a connection accepted just before the listeners closed has its connection_made
        # already queued: check once the loop has run those callbacks
        self.loop.call_soon(self.check_drained)

    def check_drained(self):
        self.now = monotonic()
        self.connection_gone()

    cdef int connection_gone(self) except -1:
        if self.draining and not self.clients:
            self.finish_drain()
        return 0

    cdef int finish_drain(self) except -1:
        cdef UpstreamPool pool
        if self.on_drained is None:
            return 0
        for pool in self.pools_by_name.values():
            pool.close_all()
        if self.access_log is not None:
            self.access_log.flush()
        callback, self.on_drained = self.on_drained, None
        if self.tick_handle is not None:
            self.tick_handle.cancel()
        callback()
        return 0

    def reopen_logs(self):
        if self.access_log is not None:
            self.access_log.reopen()

    def flush_logs(self):
        if self.access_log is not None:
            self.access_log.flush()

    cdef int log_upstream_error(self, UpstreamConsumer ex, str upstream, str address,
                                str reason) except -1:
        """`ex` is None for a connection idle in its pool."""
        if self.error_logger is None:
            return 0
        if ex is None:
            self.error_logger.error('upstream "%s" %s: %s', upstream, address, reason)
        else:
            self.error_logger.error('upstream "%s" %s: %s; %s', upstream, address, reason,
                                    ex.log_context())
        return 0

    cdef int log_refused(self, Exchange ex, str reason) except -1:
        """An info line for a request refused with a 4xx or 505. At most
        REFUSALS_LOGGED_PER_SECOND lines a second: the count of those left out is logged
        with the first line of the next second that has one."""
        cdef int status = ex.local_status
        logger = self.error_logger
        if logger is None or not logger.isEnabledFor(logging.INFO):
            return 0
        if self.now >= self.refusals_window_end:
            if self.refusals_unlogged:
                logger.info("%d more refused requests were not logged (at most %d a second are)",
                            self.refusals_unlogged, REFUSALS_LOGGED_PER_SECOND)
            self.refusals_window_end = self.now + 1.0
            self.refusals_logged = self.refusals_unlogged = 0
        if self.refusals_logged >= REFUSALS_LOGGED_PER_SECOND:
            self.refusals_unlogged += 1
            return 0
        self.refusals_logged += 1
        if reason is None:
            if status == 408:
                reason = ("request body stalled for client_body_timeout" if ex.head_done
                          else "request head not complete within client_header_timeout")
            else:
                reason = REFUSAL_REASONS.get(status, "refused")
        logger.info('refused request with %d: %s; client %s, request "%s %s %s", request id %s',
                    status, reason, ex.client.addr.decode(), log_text(ex.method), log_text(ex.url),
                    ex.log_protocol(), log_text(ex.request_id))
        return 0

    cdef int report_error(self, exc) except -1:
        if self.error_logger is not None:
            self.error_logger.error("unexpected error while handling a request",
                                    exc_info=(type(exc), exc, exc.__traceback__))
        return 0


def upstream_host(UpstreamPool pool):
    """Host sent upstream for a request that has none (HTTP/1.0), as nginx sends its
    proxy_pass host: the server's "host:port", or for several servers the upstream's name
    (the first server's address when the name is not a valid host)."""
    addresses = pool.addr_bytes
    name = pool.name.encode()
    if len(addresses) == 1 or not valid_host(name):
        return addresses[0]
    return name
