# What an upstream connection serves: the consumer of one request/response pair. The client's
# Exchange (http.pyx) is one, a Subrequest (subrequest.pyx), the proxy's own request, another.
# UpstreamConnection knows only this interface: it never reaches a client connection.

cdef class UpstreamConsumer:
    """The request an upstream connection sends and the response it hands back.

    Its fields are what the connection reads (a field, not a call, so the hot path costs
    what it did when the connection talked to the Exchange directly); its methods are the
    calls the connection makes, each returning int, except -1 (an exception is a bug that
    costs this request, see internal_error)."""
    cdef UpstreamConnection upstream  # the connection serving it now, or None
    cdef bytes upstream_addr     # that server's "host:port" (the access log's)
    cdef bint http11             # interim (1xx) responses are passed to interim_response
    cdef bint is_head            # a HEAD request: its response has no body
    cdef bint upgrading          # may be answered 101, after which the connection is a tunnel
    cdef bint request_done       # the whole request has been given to the connection
    cdef bint response_started   # part of the response went on: a failure can no longer answer
    cdef bint aborted            # its owner is gone: nothing more is delivered to it
    cdef bint retried            # sent again once already on a fresh connection
    cdef int retries             # sent again to another server this many times (retry_on)
    # bit i: server i of the upstream was tried for it, so the next choice prefers another
    # (the retries fill it; servers from the 64th on are never excluded)
    cdef uint64_t tried
    cdef double queued_at        # waiting in its pool's queue since (0: not waiting)

    # -- the response, as the connection reads it ---------------------------------------------

    cdef int upstream_ready(self, UpstreamConnection conn) except -1:
        """`conn` is connected (or taken from the pool) for it: send the request."""
        raise NotImplementedError

    cdef int upstream_failed(self, int status) except -1:
        """No response will come, and none has started: 502, or 504 for a timeout."""
        raise NotImplementedError

    cdef int response_head(self, UpstreamConnection conn, int status, bytes raw,
                           Py_ssize_t first, Py_ssize_t end) except -1:
        """The final response's head is raw[:end], its header lines from `first`; the
        connection has noted what it acts on (conn.resp_has_length, ...)."""
        raise NotImplementedError

    cdef int interim_response(self, UpstreamConnection conn, int status, bytes raw,
                              Py_ssize_t first, Py_ssize_t end) except -1:
        """A 1xx before the response (never 100 or 101); only called when http11."""
        return 0

    cdef int response_body(self, bytes data) except -1:
        raise NotImplementedError

    cdef int response_complete(self) except -1:
        """The response is whole; `upstream` is already None (the connection is pooled or
        closed)."""
        raise NotImplementedError

    cdef int upstream_unavailable(self, str reason) except -1:
        """No server can take it now (every one at max_conns, and no room or time left in the
        queue): 503, `reason` saying why."""
        return self.upstream_failed(503)

    cdef uint64_t balance_key(self, int kind, bytes name) noexcept:
        """The hash of what `balance = "hash"` (or "ip_hash") keys on (KEY_*; `name`: the
        header, cookie or query parameter); 0 for a missing key (as the empty one). A request
        without a client (a subrequest) has no key."""
        return 0

    cdef bint can_retry(self) noexcept:
        """The request may be sent again on a fresh connection when a pooled one turned out
        closed before any response byte."""
        return False

    cdef bint can_resend(self, UpstreamPool pool, bint sent) except -1:
        """The upstream's retry policy allows one more try and a failure says retry: may
        the request go, whole, to another server? `sent`: it may have reached the failed one
        (so a non-idempotent method is only retried with retry_non_idempotent). A subrequest
        is not: it goes to one server (docs/retries.md)."""
        return False

    cdef int response_cut(self) except -1:
        """The connection failed after the response had started: it cannot be completed."""
        raise NotImplementedError

    cdef int read_done(self) except -1:
        """A read from the upstream has been handled: pass on what it produced at once."""
        return 0

    cdef int internal_error(self, object exc) except -1:
        """A bug while serving it (the connection is closed): reported, costs only this."""
        raise NotImplementedError

    cdef str log_context(self):
        """Who asked, for the error log's line about a failed upstream."""
        return ""

    # -- flow control ---------------------------------------------------------------------------

    cdef Py_ssize_t send_room(self) except -1:
        """How much response body it can take now (a long body is read no faster)."""
        return BODY_READ_MAX

    cdef int pause_source(self) except -1:
        """The upstream's write buffer is full: stop producing request bytes."""
        return 0

    cdef int resume_source(self) except -1:
        return 0

    # -- after a 101 (only when upgrading) ------------------------------------------------------

    cdef int tunnel_started(self, UpstreamConnection conn, bytes rest) except -1:
        """The connection is a tunnel from now on; `rest` is what followed the 101."""
        raise NotImplementedError

    cdef int tunnel_data(self, object data) except -1:
        raise NotImplementedError

    cdef int tunnel_closed(self) except -1:
        raise NotImplementedError
