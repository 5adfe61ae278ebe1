# Subrequests: requests the proxy makes on its own behalf (mirroring today; auth lookups,
# aggregation, cache revalidation next), through the same pools, timeouts, retries and
# metrics as the clients' requests, and never touching a client connection. docs/extending.md
# ("Subrequests") documents the API.

cdef enum:
    # Subrequest.error
    SUB_OK = 0
    SUB_FAILED = 1      # no complete response: connect, reset, timeout, a broken response
    SUB_ABANDONED = 2   # given up by its owner, or its unsent body went over max_pending


cdef class SubrequestDone:
    """Told once how a subrequest ended; a feature overrides done()."""

    cdef int done(self, Subrequest sub) except -1:
        return 0


@cython.final
cdef class Subrequest(UpstreamConsumer):
    """One request to an upstream pool: `head` (request line and headers, framing the body
    by Content-Length or Transfer-Encoding: chunked) and body bytes sent as given. Its outcome
    goes to `on_done`: `status` and up to `max_body` bytes of the response body in `body()`
    (the rest is read and dropped), or `error`."""
    cdef UpstreamPool pool
    cdef SubrequestDone on_done
    cdef bytes head
    cdef bytes whole_body     # the body given at start, complete: kept for a retry
    cdef list pending         # request bytes the connection has not been given yet
    cdef Py_ssize_t pending_size, max_pending
    cdef bint blocked         # the upstream's write buffer is full
    cdef bint idempotent
    cdef bint finished
    cdef readonly int status  # the response's, or 502/504 when it failed before one; 0: none
    cdef readonly int error   # SUB_OK, SUB_FAILED or SUB_ABANDONED
    cdef list body_parts
    cdef readonly Py_ssize_t body_size  # the whole response body, kept or not
    cdef Py_ssize_t body_kept, max_body

    @staticmethod
    cdef Subrequest new(UpstreamPool pool, bytes head, SubrequestDone on_done,
                        Py_ssize_t max_body, Py_ssize_t max_pending):
        cdef Subrequest sub = Subrequest.__new__(Subrequest)
        cdef Py_ssize_t space = find_byte(head, b' ', 0)
        sub.pool = pool
        sub.head = head
        sub.on_done = on_done
        sub.max_body = max_body
        sub.max_pending = max_pending
        sub.is_head = space == 4 and head.startswith(b"HEAD")
        sub.idempotent = space > 0 and head[:space] in IDEMPOTENT
        return sub

    cdef int start(self, bytes body, bint last) except -1:
        """Send the head and `body`; `last`: that is the whole request, else send_body()
        streams the rest and end() completes it."""
        self.request_done = last
        if last:
            self.whole_body = body
        else:
            self.pending = [self.head, body] if body else [self.head]
            self.pending_size = PyBytes_GET_SIZE(body)
        self.pool.core.metrics.upstream_request(self.pool.metric_id)
        self.pool.acquire(self, False)
        return 0

    cdef int send_body(self, bytes data) except -1:
        """More request body. Held while connecting or while the upstream is not reading,
        up to max_pending bytes; past that the subrequest is abandoned."""
        if self.finished or not PyBytes_GET_SIZE(data):
            return 0
        if self.pending is None and not self.blocked and self.upstream is not None \
                and self.upstream.state == UP_BUSY:
            self.upstream.write_one(data)
            return 0
        if self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)
        self.pending_size += PyBytes_GET_SIZE(data)
        if self.pending_size > self.max_pending:
            self.abandon()
        return 0

    cdef int end(self) except -1:
        """The request body is complete."""
        if self.finished:
            return 0
        self.request_done = True
        if self.upstream is not None and self.upstream.state == UP_BUSY and self.pending is None:
            self.upstream.await_response()
        return 0

    cdef int abandon(self) except -1:
        """Give it up: its connection is closed, on_done told SUB_ABANDONED."""
        cdef UpstreamConnection conn = self.upstream
        if self.finished:
            return 0
        self.aborted = True
        self.upstream = None
        if conn is not None:
            conn.exchange = None
            conn.close()
        self.finish(SUB_ABANDONED)
        return 0

    def body(self):
        """The response body kept (at most max_body bytes)."""
        return b"".join(self.body_parts) if self.body_parts else b""

    cdef int finish(self, int error) except -1:
        self.finished = True
        self.error = error
        self.pending = None
        self.on_done.done(self)
        self.on_done = None  # it may hold this subrequest's owner
        return 0

    # -- UpstreamConsumer -------------------------------------------------------------------

    cdef int upstream_ready(self, UpstreamConnection conn) except -1:
        cdef list out
        if self.whole_body is not None:
            out = [self.head, self.whole_body] if self.whole_body else [self.head]
        else:
            out = self.pending
            self.pending = None
            self.pending_size = 0
        conn.send(out)
        if self.request_done:
            conn.await_response()
        return 0

    cdef int upstream_failed(self, int status) except -1:
        self.status = status
        self.finish(SUB_FAILED)
        return 0

    cdef int response_cut(self) except -1:
        self.finish(SUB_FAILED)
        return 0

    cdef int response_head(self, UpstreamConnection conn, int status, bytes raw,
                           Py_ssize_t first, Py_ssize_t end) except -1:
        self.response_started = True
        self.status = status
        return 0

    cdef int response_body(self, bytes data) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), take
        self.body_size += n
        take = min(n, self.max_body - self.body_kept)
        if take > 0:
            if self.body_parts is None:
                self.body_parts = []
            self.body_parts.append(data if take == n else data[:take])
            self.body_kept += take
        return 0

    cdef int response_complete(self) except -1:
        if not self.finished:
            self.finish(SUB_OK)
        return 0

    cdef bint can_retry(self) noexcept:
        return not self.retried and self.whole_body is not None and self.idempotent

    cdef int internal_error(self, object exc) except -1:
        self.pool.core.report_error(exc)
        if not self.finished:
            self.finish(SUB_FAILED)
        return 0

    cdef str log_context(self):
        """Its request line, and its request id when the head carries one (a mirror's does)."""
        cdef bytes head = self.head
        cdef Py_ssize_t eol = find_byte(head, b'\r', 0)
        cdef Py_ssize_t rid = head.find(b"\r\nX-Request-ID: ")
        text = 'subrequest "%s"' % log_text(head[:eol] if eol >= 0 else head)
        if rid >= 0:
            rid += 16
            text += ", request id %s" % log_text(head[rid:find_byte(head, b'\r', rid)])
        return text

    cdef int pause_source(self) except -1:
        self.blocked = True
        return 0

    cdef int resume_source(self) except -1:
        cdef list out = self.pending
        self.blocked = False
        if out is not None and self.upstream is not None and self.upstream.state == UP_BUSY:
            self.pending = None
            self.pending_size = 0
            self.upstream.send(out)
            if self.request_done:
                self.upstream.await_response()
        return 0
