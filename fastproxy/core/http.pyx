# Client side: the connection protocol (the httptools callback target) and the
# Exchange, one request/response pair travelling through the route's handler.

from collections import deque

cimport cython

cdef enum:
    # how the response body is framed toward the client
    FRAME_NONE = 0      # no body: HEAD, 1xx, 204, 304
    FRAME_LENGTH = 1    # Content-Length, passed through
    FRAME_CHUNKED = 2   # re-chunked for an HTTP/1.1 client
    FRAME_CLOSE = 3     # an HTTP/1.0 client and no length: the body ends when we close

cdef enum:
    # why reading from the client is paused (a bit each; reading resumes at zero)
    PAUSE_UPSTREAM_FULL = 1   # the upstream's write buffer is full (upload backpressure)
    PAUSE_PIPELINE = 2        # a complete request waits behind the current one (or its upgrade)
    PAUSE_BUFFERED = 4        # body buffered while the upstream connection is being made

cdef enum:
    TIMER_NONE = 0
    TIMER_IDLE = 1      # between requests: close quietly
    TIMER_HEADER = 2    # request head incomplete: 408
    TIMER_BODY = 3      # request body stalled: 408
    TIMER_SEND = 4      # client not reading our response: close
    TIMER_LINGER = 5    # closing after a refusal, dropping what the client still sends: close

# Lingering close (see ClientConnection.close): how long the bytes a client still sends
# after a refused request are read and dropped before the connection is closed anyway.
cdef double LINGER_TIMEOUT = 5.0

cdef enum:
    # the bytes between two requests, where llhttp skips any CR and LF but only empty
    # lines (CRLF) may come (RFC 9112 2.2); see ClientConnection.skip_gap
    GAP_LINE = 0        # at a line start: CR, or the next request
    GAP_CR = 1          # after a CR: LF
    GAP_BAD = 2         # something else came: the next request is refused
    GAP_UNKNOWN = 3     # where the last request ended was lost (a bug): lenient until the next read

cdef enum:
    # where ClientConnection.walk_chunks is in a chunked request body
    CHUNK_SIZE = 0      # in a chunk-size line (size, extensions) up to its LF
    CHUNK_DATA = 1      # in chunk data and the CRLF after it
    CHUNK_TRAILER = 2   # in the trailer section, up to its empty line
    CHUNK_LOST = 3      # where the body began was lost (see GAP_UNKNOWN)

cdef enum:
    ASCII_CR = 13
    ASCII_LF = 10

cdef enum:
    # ClientConnection.msg_start when the request does not begin in the current read
    AT_READ_START = -1  # it began in an earlier one and its bytes go on from offset 0
    UNTRACKED = -2      # not in this read (or lost: see GAP_UNKNOWN)

cdef Py_ssize_t MAX_BUFFERED_BODY = 256 * 1024
# Pipelining: at most this many complete requests wait behind the one being answered; the
# bytes read after the last of them are kept unparsed, up to PIPELINE_HELD, until the queue
# drains. A client past both gets the queued answers, then the connection closes.
cdef Py_ssize_t PIPELINE_DEPTH = 32
cdef Py_ssize_t PIPELINE_HELD = 16 * 1024
cdef Py_ssize_t COALESCE_LIMIT = 4096  # client writes up to this size are joined (see flush)
# A file response (Exchange.send_file): each read is at most FILE_PIECE bytes (the memory a
# response holds), and one loop callback sends at most FILE_BURST before it lets the other
# connections run. A sendfile call asks for the whole burst: the kernel stops at the socket's
# free space, and each call costs a system call and, the socket being TCP_NODELAY, a short
# segment for its last bytes.
cdef Py_ssize_t FILE_PIECE = 256 * 1024
cdef Py_ssize_t FILE_BURST = 4 * 1024 * 1024

cdef bytes CRLF = b"\r\n"
cdef bytes LAST_CHUNK = b"0\r\n\r\n"
cdef bytes CONNECTION_CLOSE = b"Connection: close\r\n"
cdef bytes CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
cdef bytes CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"
cdef frozenset IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
# retried on another server only with retry_non_idempotent (nginx's list: a method RFC 9110
# does not call idempotent, or an extension one, is taken as idempotent)
cdef frozenset NON_IDEMPOTENT = frozenset([b"POST", b"PATCH", b"LOCK"])
# Allow for TRACE on a route open to every method (TRACE needs a route that names it)
cdef bytes ALLOW_WITHOUT_TRACE = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# a 503 for want of a free server (UpstreamPool.queue): come back in a second
cdef tuple RETRY_AFTER_HEADERS = ((b"Content-Type", b"application/json"), (b"Retry-After", b"1"))


class _StopRequest(Exception):
    """Raised from a parser callback to stop parsing a request we have already refused.
    A new instance each time: a raised instance keeps its traceback, which would grow."""


class _PipelineFull(Exception):
    """Raised from on_message_complete when PIPELINE_DEPTH requests are queued: the only way
    to stop httptools at a message boundary (see ClientConnection.hold)."""


@cython.final
cdef class Exchange(UpstreamConsumer):
    cdef ClientConnection client
    cdef CompiledRoute route
    cdef bytes method, url, path, host, request_id, xff, referer, user_agent
    cdef bytes received_url     # the target as the client sent it, when `url` was rewritten
    cdef bytes protocol         # for the logs, when neither HTTP/1.0 nor HTTP/1.1: "HTTP/2.0", "-"
    cdef list fwd_headers       # name, value, name, value, ... in arrival order
    cdef frozenset conn_drop    # header names the Connection header lists
    cdef tuple removed_headers  # lower-case names request_head filters removed (or set)
    cdef bytes added_headers    # header lines request_head filters added
    cdef tuple local_headers    # a local answer's (name, value) pairs, from respond()
    cdef bytes local_body       # its body; None for fastproxy's own error answers
    cdef FileBody local_file    # its body when it comes from a file (respond_file), else None
    cdef list slots             # per-request state of the route's stateful filters, else None
    cdef list up_out            # upstream-bound bytes not yet written
    cdef Py_ssize_t up_out_size
    cdef bytes upstream_head    # kept for a retry on a fresh connection
    # request body pieces (as framed upstream) already sent, kept for a retry on another
    # server while they fit in the upstream's retry_buffer; None when not kept
    cdef list sent_body
    cdef Py_ssize_t sent_size
    cdef bint body_gone         # body bytes went upstream and were not kept: no retry
    cdef bytes allow            # Allow value for a 405
    cdef int filter_state       # FS_*: pause and resume in the request_head filters
    cdef list paused_body       # body pieces read while paused, for the request_body hooks
    cdef Py_ssize_t filter_at   # the index of the filter it is paused in
    cdef double paused_at
    cdef int host_count
    cdef int local_status       # >0: answered locally (respond route or an error)
    cdef int status
    cdef int frame
    cdef bint keep_alive, chunked_in, has_length, expect_continue
    cdef bint has_connection, conn_upgrade
    cdef bint upgrade_websocket, head_done
    cdef bint response_done, close_after
    cdef bint body_hooks        # the response body goes through the route's response_body hooks
    cdef Py_ssize_t content_length, body_received, head_size
    cdef Py_ssize_t bytes_in, bytes_out
    cdef double started_at, upstream_start, upstream_time

    @staticmethod
    cdef Exchange new(ClientConnection client):
        cdef Exchange ex = Exchange.__new__(Exchange)
        ex.client = client
        ex.fwd_headers = []
        ex.content_length = -1
        ex.upstream_time = -1
        ex.started_at = client.core.now
        return ex

    # -- request side -----------------------------------------------------------

    cdef int header(self, bytes name, bytes value) except -1:
        cdef int kind = header_kind(name)
        if kind == H_OTHER or kind == H_USER_AGENT or kind == H_REFERER \
                or kind == H_SERVER or kind == H_DATE:
            # end to end: forwarded as received (the log also keeps two of them)
            self.fwd_headers.append(name)
            self.fwd_headers.append(value)
            if kind == H_USER_AGENT:
                self.user_agent = value
            elif kind == H_REFERER:
                self.referer = value
        elif kind == H_HOST:
            self.host_count += 1
            self.host = value
        elif kind == H_CONTENT_LENGTH:
            self.has_length = True  # llhttp has checked it is one plain number
            self.content_length = int(value)
        elif kind == H_TRANSFER_ENCODING:
            self.chunked_in = True  # llhttp already refused any coding list not ending in chunked
        elif kind == H_CONNECTION:
            self.has_connection = True
            if not plain_connection_value(value):  # rare: upgrade, a list, a header name
                tokens = connection_tokens(value)
                if b"upgrade" in tokens:
                    self.conn_upgrade = True
                self.conn_drop = union(self.conn_drop, hop_by_hop_names(tokens))
        elif kind == H_UPGRADE:
            self.upgrade_websocket = value.strip().lower() == b"websocket"
        elif kind == H_EXPECT:
            if value.strip().lower() == b"100-continue":
                self.expect_continue = True
            else:
                self.local_status = 417
        elif kind == H_X_REQUEST_ID:
            if valid_request_id(value):
                self.request_id = value
        elif kind == H_X_FORWARDED_FOR:
            self.xff = value if self.xff is None else self.xff + b", " + value
        # other hop-by-hop headers, X-Forwarded-Proto/-Host and X-Client-Cert-* are dropped:
        # we set our own
        return 0

    cdef int head_complete(self) except -1:
        """Validate and route a complete request head; answer or start forwarding."""
        cdef ClientConnection client = self.client
        cdef WorkerCore core = client.core
        cdef list allowed
        cdef bytes host
        cdef Router router
        self.head_done = True
        if self.method is None:
            self.method = client.get_method()
        self.keep_alive = client.should_keep_alive()
        self.is_head = self.method == b"HEAD"
        if self.request_id is None:
            self.request_id = core.ids.next()
        self.upgrading = self.conn_upgrade and self.upgrade_websocket
        if self.url is None:
            self.url = b"/"
        if self.chunked_in:
            self.content_length = -1
        elif not self.has_length:
            self.content_length = 0
        if not self.has_connection and self.keep_alive:
            # without a Connection header only HTTP/1.1 keeps the connection alive: the
            # version follows without building get_http_version()'s string
            self.http11 = True
        elif is_http_1x(client.parser, 1):
            self.http11 = True
        elif not is_http_1x(client.parser, 0) \
                and not self.supported_version(client.parser.get_http_version()):
            return 0
        if self.local_status == 417:  # from an Expect we do not know
            self.fail(417, "Expect other than 100-continue")
            return 0
        if self.http11 and self.host_count == 0:
            self.fail(400, "HTTP/1.1 request without Host")
            return 0
        if self.host_count > 1:
            self.fail(400, "more than one Host header")
            return 0
        if self.method == b"CONNECT":
            self.local_status = 405
            self.allow = b""
            self.close_after = True
            return 0
        if self.host is not None and not valid_host(self.host):
            self.fail(400, "empty Host" if not self.host else "invalid Host")
            return 0
        if not self.set_path(core.allow_encoded_slashes):
            self.fail(400, "request target refused: not a path in normal form, nor http://host/path")
            return 0
        host = self.host if self.host is not None else b""  # HTTP/1.0 may send none
        router = client.router
        if router.uses_hosts:
            host = normalize_host(host)
        self.route = router.match(host, self.path, self.method, None)
        if self.route is None:
            allowed = []
            router.match(host, self.path, self.method, allowed)
            if allowed:
                self.local_status = 405
                self.allow = b", ".join(sorted(set(allowed)))
            else:
                self.local_status = 404
            return 0
        if not self.route.methods and self.method == b"TRACE":
            # a request echoed back can leak credentials (cross-site tracing): TRACE is
            # only passed on by a route whose `methods` names it
            self.local_status = 405
            self.allow = ALLOW_WITHOUT_TRACE
            return 0
        if self.head_size > self.route.max_header_size:
            self.fail(431)
            return 0
        if self.route.max_body_size and self.content_length > self.route.max_body_size:
            self.fail(413)
            return 0
        if self.route.slot_count:
            self.slots = [None] * self.route.slot_count
        if self.route.request_head_filters and \
                run_request_head(self.route.request_head_filters, self, 0) != FILTER_CONTINUE:
            return 0  # answered, or paused until resume()
        self.filters_passed()
        return 0

    cdef int filters_passed(self) except -1:
        """The request_head filters have let the request through to its upstream."""
        if self.conn_upgrade and not self.upgrade_websocket and self.content_length != 0:
            # llhttp has skipped the body of an upgrade request: refuse it
            self.fail(400, "upgrade request with a body")
            return 0
        self.upstream_head = self.build_upstream_head(self.client.core)
        if self.route.upstream_filters:
            run_upstream(self.route.upstream_filters, self)
        if self.route.request_body_filters and (self.paused_body is not None or self.request_done):
            self.body_after_pause()
        return 0

    cdef int body_after_pause(self) except -1:
        """The request_body hooks get what was read while the request was paused, in order,
        now that the request_head and upstream hooks have run."""
        cdef list pieces = self.paused_body
        self.paused_body = None
        if pieces is not None:
            for piece in pieces:
                run_request_body(self.route.request_body_filters, self, <bytes>piece, False)
        if self.request_done:
            run_request_body(self.route.request_body_filters, self, b"", True)
        return 0

    cdef bint set_path(self, bint keep_encoded_slashes) except -1:
        """Sets `path` to the normal form of the target's path (path.pyx): the router and the
        upstream both get that one. False when the target is refused. A target that changes
        is rewritten in `url` (the query kept as sent) and kept in `received_url` for the log."""
        cdef Py_ssize_t q = find_byte(self.url, b'?', 0)
        cdef bytes received = self.url if q < 0 else self.url[:q]
        cdef bytes path = received if received.startswith(b"/") else self.absolute_form(received)
        if path is not None:
            path = normalized_path(path, keep_encoded_slashes)
        if path is None:
            return False
        if path is not received:
            self.received_url = self.url
            self.url = path if q < 0 else path + self.url[q:]
        self.path = path
        return True

    cdef bint supported_version(self, str version) except -1:
        """HTTP/1.0 and HTTP/1.1 are served; anything else llhttp accepts (HTTP/0.9 with or
        without a version in the request line, HTTP/2.0) is answered 505 at once."""
        self.http11 = version == "1.1"
        if self.http11 or version == "1.0":
            return True
        if version == "0.0":
            version = "0.9"  # the request line ended without a version: HTTP/0.9
        self.protocol = ("HTTP/" + version).encode()
        self.fail(505, "version HTTP/%s not supported" % version)
        return False

    cdef bytes absolute_form(self, bytes target):
        """The path of an http://host/path target (RFC 9112 3.2.2), whose authority replaces
        Host; None for a target in any other form. `target` ends before the query."""
        cdef bytes lower = target[:8].lower()
        cdef Py_ssize_t start, slash
        if lower.startswith(b"http://"):
            start = 7
        elif lower.startswith(b"https://"):
            start = 8
        else:
            return None
        slash = find_byte(target, b'/', start)
        authority = target[start:] if slash < 0 else target[start:slash]
        if not valid_host(authority):  # empty, or user:password@host, ...
            return None
        self.host = authority
        return b"/" if slash < 0 else target[slash:]

    cdef bytes build_upstream_head(self, WorkerCore core):
        cdef ByteWriter out = core.head_writer
        cdef list headers = self.fwd_headers
        cdef tuple drop = self.removed_headers
        cdef bytes name
        cdef Py_ssize_t i
        if self.conn_drop is not None:
            drop = joined(drop, tuple(self.conn_drop))
        out.clear()
        out.add(self.method)
        out.add(b" ")
        out.add(self.url)
        out.add(b" HTTP/1.1\r\nHost: ")
        out.add(self.host if self.host is not None else self.route.upstream_host)
        out.add(CRLF)
        for i in range(0, len(headers), 2):
            name = <bytes>headers[i]
            if drop is not None and name_listed(name, drop):
                continue  # named in Connection (hop-by-hop for this request), or by a filter
            out.add(name)
            out.add(b": ")
            out.add(<bytes>headers[i + 1])
            out.add(CRLF)
        if self.added_headers is not None:
            out.add(self.added_headers)
        out.add(b"X-Forwarded-For: ")
        if self.xff is not None:
            out.add(self.xff)
            out.add(b", ")
        out.add(self.client.addr)
        if self.client.tls is None:
            out.add(b"\r\nX-Forwarded-Proto: http\r\n")
        else:
            out.add(b"\r\nX-Forwarded-Proto: https\r\n")
            if self.client.cert_lines is not None:
                out.add(self.client.cert_lines)
        if self.host is not None:  # else the client sent none to pass on
            out.add(b"X-Forwarded-Host: ")
            out.add(self.host)
            out.add(CRLF)
        out.add(b"X-Request-ID: ")
        out.add(self.request_id)
        out.add(CRLF)
        if self.upgrading:
            out.add(b"Connection: upgrade\r\nUpgrade: websocket\r\n")
        elif self.chunked_in:
            out.add(CHUNKED_LINE)
        elif self.content_length > 0:
            out.add(b"Content-Length: ")
            out.add_decimal(self.content_length)
            out.add(CRLF)
        out.add(CRLF)
        return out.take()

    cdef int body(self, bytes data) except -1:
        cdef Py_ssize_t n = len(data)
        self.body_received += n
        self.bytes_in += n
        if self.route is not None and self.route.max_body_size \
                and self.body_received > self.route.max_body_size:
            self.fail(413)
            raise _StopRequest()
        if self.local_status or self.route is None or self.route.pool is None:
            return 0  # answered locally: the body is read and dropped
        if self.route.request_body_filters:
            if self.filter_state != FS_PAUSED:
                run_request_body(self.route.request_body_filters, self, data, False)
            elif self.paused_body is None:  # its hooks get it after the filters (filters_passed)
                self.paused_body = [data]
            else:
                self.paused_body.append(data)
        if self.chunked_in:
            self.to_upstream(chunk_header(n))
            self.to_upstream(data)
            self.to_upstream(CRLF)
        else:
            self.to_upstream(data)
        return 0

    cdef int message_complete(self) except -1:
        self.request_done = True
        if not self.local_status and self.route is not None and self.route.request_body_filters \
                and self.filter_state != FS_PAUSED:  # else filters_passed makes this call
            run_request_body(self.route.request_body_filters, self, b"", True)
        if self.chunked_in and not self.local_status and self.route is not None \
                and self.route.pool is not None:
            self.to_upstream(LAST_CHUNK)
        if self.upstream is not None and self.upstream.state == UP_BUSY:
            self.upstream.await_response()
        return 0

    cdef int to_upstream(self, bytes data) except -1:
        if self.up_out is None:
            self.up_out = [data]
        else:
            self.up_out.append(data)
        self.up_out_size += len(data)
        if self.up_out_size > MAX_BUFFERED_BODY and (
                self.upstream is None or self.upstream.state != UP_BUSY):
            self.client.pause_reading(PAUSE_BUFFERED)
        return 0

    cdef int flush_upstream(self) except -1:
        cdef list out = self.up_out
        if out is None or self.upstream is None or self.upstream.state != UP_BUSY:
            return 0
        self.up_out = None
        self.keep_sent(out, self.up_out_size)
        self.up_out_size = 0
        self.upstream.send(out)
        return 0

    cdef int keep_sent(self, list pieces, Py_ssize_t size) except -1:
        """Body pieces (`size` bytes) going upstream now: kept while all that was sent fits
        in retry_buffer, so that a retry sends them again; past that they are let go, and
        the request is no longer retried."""
        if self.sent_body is not None:
            if self.sent_size + size <= self.route.pool.retry_buffer:
                self.sent_body.extend(pieces)
                self.sent_size += size
                return 0
            self.sent_body = None
        self.body_gone = True
        return 0

    cdef bint can_retry(self) noexcept:
        return not self.retried and self.content_length == 0 and not self.chunked_in \
            and self.method in IDEMPOTENT and not self.upgrading

    cdef bint can_resend(self, UpstreamPool pool, bint sent) except -1:
        return not self.body_gone \
            and (not sent or pool.retry_non_idempotent or self.method not in NON_IDEMPOTENT) \
            and (pool.retry_timeout == 0 or pool.core.now - self.upstream_start < pool.retry_timeout)

    # -- what filters may call (docs/extending.md) ------------------------------

    cdef int remove_headers(self, tuple lower_names) except -1:
        """From a request_head hook: do not send upstream the client's headers with one of
        these names (lower-case)."""
        self.removed_headers = joined(self.removed_headers, lower_names)
        return 0

    cdef int add_header_lines(self, bytes lines) except -1:
        """From a request_head hook: send these header lines upstream ("Name: value\r\n"
        each, checked when compiled), after the client's."""
        self.added_headers = joined(self.added_headers, lines)
        return 0

    cdef bytes request_header(self, bytes lower_name):
        """The value of the client's request header `lower_name` (lower-case), the values of
        repeated lines joined with ", "; None when absent. Host included (the authority of
        an absolute-form target when there was one); otherwise only end-to-end headers are
        kept (not the framing, hop-by-hop or X-Forwarded-* ones)."""
        cdef list headers = self.fwd_headers
        cdef tuple names = (lower_name,)
        cdef bytes found = None, value
        cdef Py_ssize_t i
        if lower_name == b"host":
            return self.host
        for i in range(0, len(headers), 2):
            if name_listed(<bytes>headers[i], names):
                value = <bytes>headers[i + 1]
                found = value if found is None else found + b", " + value
        return found

    cdef int respond(self, int status, tuple headers, bytes body) except -1:
        """From a request_head hook, which then returns FILTER_RESPOND, or while paused, from
        the callback that then calls resume(): answer with this status, (name, value) header
        pairs (checked when compiled) and body, without contacting an upstream. fastproxy adds
        Server, Date, X-Request-ID, Content-Length and Connection; the route's response_head
        filters then edit the head. An error found later in the request (413 as its body is
        read, 408) answers instead. A no-op on an exchange past its request_head filters
        (a callback too late: answered, past pause_timeout)."""
        if self.filter_state == FS_NONE:
            return 0
        self.local_status = status
        self.local_headers = headers
        self.local_body = body
        self.local_file = None
        return 0

    cdef int respond_file(self, int status, tuple headers, FileBody body) except -1:
        """From a request_head hook, as respond(), with a body read from a file as the client
        takes it (never whole): `body` says which bytes of the file (and the multipart
        boundaries between ranges). Content-Length is its length, unless a response_head hook
        drops it (the body then goes chunked, or close-delimited to HTTP/1.0). A no-op where
        respond() is one."""
        if self.filter_state == FS_NONE:
            return 0
        self.respond(status, headers, b"")
        self.local_file = body
        return 0

    cdef int set_upstream_target(self, bytes target) except -1:
        """From a request_head hook: the request target sent upstream, path and query (the
        route matched stays). Not checked per request: built from a checked config, or
        checked by the filter (a path starting with "/", no space, CR, LF or NUL)."""
        if self.received_url is None:
            self.received_url = self.url  # the access log keeps what the client sent
        self.url = target
        return 0

    def resume(self):
        """A filter's way back from FILTER_PAUSE: go on with the next request_head filter
        (unless respond() was called meanwhile: answer that), then forward the request or
        answer it. Called from a loop callback (a timer, a future's callback), or by the hook
        itself before it returns PAUSE; a no-op on an exchange no longer paused (answered,
        past pause_timeout, left by its client)."""
        if self.filter_state == FS_RUNNING:
            self.filter_state = FS_RESUMED  # its hook has not returned: run_request_head goes on
            return
        if self.filter_state != FS_PAUSED:
            return
        self.client.core.now = monotonic()
        try:
            self.end_pause()
            # answered while paused (respond() from the callback): the other filters do not run
            if not self.local_status and run_request_head(
                    self.route.request_head_filters, self, self.filter_at + 1) == FILTER_CONTINUE:
                self.filters_passed()
            if self.filter_state != FS_PAUSED:
                self.proceed()
        except Exception as exc:
            self.internal_error(exc)

    # -- pause (FILTER_PAUSE) -----------------------------------------------------

    cdef int pause(self, Py_ssize_t at) except -1:
        """The filter at `at` returned FILTER_PAUSE: nothing is sent upstream until resume()
        (the body is buffered, up to MAX_BUFFERED_BODY), for at most pause_timeout."""
        cdef WorkerCore core = self.client.core
        self.filter_state = FS_PAUSED
        self.filter_at = at
        self.paused_at = core.now
        core.paused.add(self)
        return 0

    cdef int end_pause(self) except -1:
        """Out of the request_head filters, paused or not (a hook that raised): resume() is
        now a no-op."""
        if self.filter_state == FS_PAUSED:
            self.client.core.paused.discard(self)
        self.filter_state = FS_NONE
        return 0

    cdef int pause_over(self, int status) except -1:
        """Answer a paused exchange with fastproxy's error `status` (504 past pause_timeout,
        503 half-way through a drain); its filter's later resume() is a no-op."""
        self.end_pause()
        self.local_status = status
        self.local_body = None
        if not self.request_done:
            self.close_after = True  # answered before its body: the connection cannot be reused
        self.proceed()
        return 0

    cdef int proceed(self) except -1:
        """Out of a pause: what on_headers_complete does after head_complete."""
        cdef ClientConnection client = self.client
        if self.response_started:  # refused by filters_passed
            return 0
        if self.local_status:
            # answered locally: drop what was buffered for an upstream, read the rest to drop it
            self.up_out = None
            self.up_out_size = 0
            self.paused_body = None
            if self is client.parsing:
                client.resume_reading(PAUSE_BUFFERED)
        if self is client.current:
            self.dispatch()
            client.flush()
        # else queued: dispatched in its turn
        return 0

    cdef int internal_error(self, object exc) except -1:
        """A bug while serving it (its upstream connection, a resume, the sweep): a 500 for
        this exchange, which may be one queued behind the current (resumed, or past
        pause_timeout, while it waits for its turn)."""
        cdef ClientConnection client = self.client
        self.end_pause()
        if self is client.current or client.closing:
            client.internal_error(exc)
            return 0
        client.core.report_error(exc)
        self.local_status = 500
        self.local_body = None
        self.close_after = True
        self.up_out = None
        self.up_out_size = 0
        self.paused_body = None
        return 0

    cdef int finished(self) except -1:
        """The exchange is over, however it ended: no pause goes on, and the route's stateful
        filters release what their slots hold."""
        self.end_pause()
        if self.slots is not None:
            run_release(self.route.slot_filters, self)
            self.slots = None
        return 0

    # -- dispatch ---------------------------------------------------------------

    cdef int dispatch(self) except -1:
        """Called when this exchange becomes the one the connection answers."""
        cdef ClientConnection client = self.client
        if self.filter_state == FS_PAUSED:
            return 0  # resume() dispatches it
        if self.local_status:
            if self.request_done or self.expect_continue or self.close_after:
                if not self.request_done:
                    self.close_after = True  # the body will not come: we answered first
                self.respond_local()
            return 0  # else: answered once the body has been read
        if self.expect_continue:
            client.write(CONTINUE_100)
        self.upstream_start = client.core.now
        if self.content_length != 0 and self.route.pool.keep_body and (
                self.route.pool.retry_non_idempotent or self.method not in NON_IDEMPOTENT):
            self.sent_body = []  # a body a retry may have to send again (keep_sent)
        client.core.metrics.upstream_request(self.route.pool.metric_id)
        self.route.pool.acquire(self, False)
        return 0

    cdef int upstream_ready(self, UpstreamConnection conn) except -1:
        cdef list pending = self.up_out
        if pending is not None:
            self.up_out = None
            self.keep_sent(pending, self.up_out_size)
            self.up_out_size = 0
        if self.retries:
            # another server after a failure: the body the failed one got goes again (what
            # was just kept included), and the client is read again if the failed one's full
            # buffer had paused it
            self.client.resume_reading(PAUSE_UPSTREAM_FULL)
            if self.sent_body:
                pending = list(self.sent_body)
        if pending is None:
            conn.write_one(self.upstream_head)
        else:
            pending.insert(0, self.upstream_head)
            conn.send(pending)
        if self.request_done:
            conn.await_response()
        if self.client.write_paused:
            conn.pause()  # the client's buffer is still full from the previous response
        self.client.resume_reading(PAUSE_BUFFERED)
        return 0

    cdef int upstream_failed(self, int status) except -1:
        self.upstream_time = self.client.core.now - self.upstream_start
        if not self.request_done:
            self.close_after = True
        self.local_status = status
        self.respond_local()
        self.client.flush()
        return 0

    cdef int upstream_unavailable(self, str reason) except -1:
        """503 with Retry-After, a local answer whose JSON body says why."""
        self.local_headers = RETRY_AFTER_HEADERS
        self.local_body = error_body(503, self.request_id, reason)
        self.upstream_failed(503)
        return 0

    cdef uint64_t balance_key(self, int kind, bytes name) noexcept:
        cdef bytes url
        cdef Py_ssize_t q
        if kind == KEY_NETWORK:
            return network_hash(self.client.addr)
        if kind == KEY_REMOTE_ADDR:
            return bytes_hash(self.client.addr)
        if kind == KEY_PATH:
            return bytes_hash(self.path)
        if kind == KEY_URI:
            return bytes_hash(self.url)
        if kind == KEY_QUERY:
            url = self.url
            q = find_byte(url, b'?', 0) if url is not None else -1
            return pair_hash(url, q + 1, name, False) if q >= 0 else 0
        try:  # request_header allocates only what it finds
            if kind == KEY_HEADER:
                return bytes_hash(self.request_header(name))
            return pair_hash(self.request_header(b"cookie"), 0, name, True)
        except MemoryError:
            return 0

    # -- the rest of what the upstream connection calls (UpstreamConsumer) ----------------

    cdef int response_cut(self) except -1:
        self.client.abort()  # the client can tell from the connection closing early
        return 0

    cdef int read_done(self) except -1:
        self.client.flush()
        return 0

    cdef str log_context(self):
        return 'client %s, request "%s %s", request id %s' % (
            self.client.addr.decode(), log_text(self.method), log_text(self.url),
            log_text(self.request_id))

    cdef Py_ssize_t send_room(self) except -1:
        return self.client.send_room()

    cdef int pause_source(self) except -1:
        self.client.pause_reading(PAUSE_UPSTREAM_FULL)
        return 0

    cdef int resume_source(self) except -1:
        self.client.resume_reading(PAUSE_UPSTREAM_FULL)
        return 0

    cdef int tunnel_started(self, UpstreamConnection conn, bytes rest) except -1:
        self.client.start_tunnel(conn, rest)
        return 0

    cdef int tunnel_data(self, object data) except -1:
        self.client.tunnel_to_client(data)
        return 0

    cdef int tunnel_closed(self) except -1:
        self.client.close_now()
        return 0

    # -- response side ----------------------------------------------------------

    cdef bytes connection_line(self):
        """Connection header for our response; records whether we close afterwards."""
        cdef ClientConnection client = self.client
        if self.close_after or not self.keep_alive or not self.request_done \
                or client.core.draining or self.frame == FRAME_CLOSE \
                or client.requests + 1 >= client.core.keepalive_requests:
            self.close_after = True
            return CONNECTION_CLOSE
        return b"" if self.http11 else CONNECTION_KEEP_ALIVE

    cdef int respond_local(self) except -1:
        cdef ClientConnection client = self.client
        cdef WorkerCore core = client.core
        cdef ByteWriter out = core.head_writer
        cdef bytes body
        out.clear()
        self.status = self.local_status
        self.frame = FRAME_LENGTH
        if self.local_file is not None:
            body = b""
            self.file_head(core, out)
        elif self.local_body is not None:
            body = self.local_head(core, out)
        else:
            body = error_body(self.status, self.request_id if self.request_id is not None else b"")
            out.add(status_line(self.status))
            out.add(core.server_line)
            out.add(b"Content-Type: application/json\r\nContent-Length: ")
            out.add_decimal(len(body))
            out.add(CRLF)
            if self.status == 405 and self.allow is not None:
                out.add(b"Allow: ")
                out.add(self.allow)
                out.add(CRLF)
        out.add(core.date_line)
        if client.tls is not None:
            out.add(client.tls.hsts_line)
        if self.request_id is not None:
            out.add(b"X-Request-ID: ")
            out.add(self.request_id)
            out.add(CRLF)
        out.add(self.connection_line())
        out.add(CRLF)
        if not self.is_head:
            out.add(body)
        self.response_started = True  # only now: a filter's failure above can still get a 500
        client.write(out.take())
        if self.frame != FRAME_NONE and self.local_file is not None:
            self.start_file()
            return 0
        self.local_file = None
        self.response_complete()
        return 0

    cdef bytes local_head(self, WorkerCore core, ByteWriter out):
        """The head of an answer from respond(), up to its Content-Length; returns the body
        to send. The body hooks get the whole body in one call (end of stream), so its
        length is known whatever the framing decision: it is sent with a Content-Length
        (none for a 304, whose length would be the selected representation's)."""
        cdef bytes body = self.local_body
        self.local_headers_out(core, out, len(body))
        if self.route.response_body_filters and not self.is_head:
            body = run_response_body(self.route.response_body_filters, self, body, True)
        if self.status != 304:
            out.add(b"Content-Length: ")
            out.add_decimal(len(body))
            out.add(CRLF)
        return body

    cdef int file_head(self, WorkerCore core, ByteWriter out) except -1:
        """The head of an answer from respond_file(), up to its framing: the body is the
        file's, streamed after the head, through the body hooks if the route has any."""
        cdef bint length_dropped = self.local_headers_out(core, out, self.local_file.total)
        if self.is_head:
            self.frame = FRAME_NONE
        elif not length_dropped:
            self.frame = FRAME_LENGTH
        elif self.http11:
            self.frame = FRAME_CHUNKED
            out.add(CHUNKED_LINE)
        else:
            self.frame = FRAME_CLOSE
        if not length_dropped:
            out.add(b"Content-Length: ")
            out.add_decimal(self.local_file.total)
            out.add(CRLF)
        self.body_hooks = self.frame != FRAME_NONE and len(self.route.response_body_filters) > 0
        return 0

    cdef bint local_headers_out(self, WorkerCore core, ByteWriter out, Py_ssize_t length) except -1:
        """A local answer's status line and headers, as the response_head hooks edit them
        (`length`: its body's, as they see it); whether a hook dropped the length."""
        cdef ResponseHead edits = None
        cdef tuple removed = None
        cdef bytes name
        out.add(status_line(self.status))
        out.add(core.server_line)
        if self.route.response_head_filters:
            edits = core.head_edits
            edits.start(self.status, None, 0, 0, self.local_headers, length)
            run_response_head(self.route.response_head_filters, self, edits)
            edits.finish()
            removed = edits.removed
        for name, value in self.local_headers:
            if removed is None or not name_listed(name, removed):
                out.add(name)
                out.add(b": ")
                out.add(value)
                out.add(CRLF)
        if edits is not None and edits.added is not None:
            out.add(edits.added)
        return edits is not None and edits.length_dropped

    cdef int start_file(self) except -1:
        """The head of a file response is written: send its body. Without body hooks the
        file goes to the socket by sendfile, which needs the transport's buffer empty (else
        bytes would pass each other): for the length of the body the transport pauses us as
        soon as it buffers anything and resumes us once it is empty."""
        if self.client.tls is not None:
            self.local_file.no_sendfile = True  # sendfile would bypass TLS: read and write
        elif not self.body_hooks:
            self.client.set_file_limits(True)
        self.send_file()
        return 0

    cdef int send_file(self) except -1:
        """Send more of the file response: as much as the client takes now, at most
        FILE_BURST per call; ClientConnection.resume_writing (or the loop, after a burst)
        calls again. Reading stops while the client's buffer is full, so memory stays at
        one piece whatever the file's size."""
        cdef ClientConnection client = self.client
        cdef FileBody body = self.local_file
        cdef Py_ssize_t budget = FILE_BURST, sent, asked
        cdef bytes piece
        while body is not None and not client.write_paused and not client.closing:
            if body.left == 0:
                piece = body.next_part()
                if piece is None:
                    self.finish_file()
                    return 0
                if PyBytes_GET_SIZE(piece):
                    self.file_piece(piece)
                continue
            if budget <= 0:
                client.core.loop.call_soon(client.continue_file)
                return 0
            if not self.body_hooks and not body.no_sendfile:
                client.flush()
                if client.transport.get_write_buffer_size() == 0:
                    asked = budget if budget < body.left else <Py_ssize_t>body.left
                    sent = body.send(client.socket_fd(), asked)
                    if sent == asked:
                        self.bytes_out += sent
                        budget -= sent
                        continue
                    if sent > 0:
                        # short: the socket is full (no need to ask again for EAGAIN), or
                        # the file shrank, which the read below finds
                        self.bytes_out += sent
                        budget -= sent
                    elif sent == -1:
                        self.file_shrunk()
                        return 0
                    elif sent == -2:
                        client.set_file_limits(False)
                        continue
                # the socket is full: this piece waits in the transport, which resumes us
                # once it has written it (the transport's buffer is the only way to learn
                # when the socket takes more)
                piece = body.read(BODY_READ_MIN)
            else:
                piece = body.read(FILE_PIECE)
            if piece is None:
                self.file_shrunk()
                return 0
            budget -= PyBytes_GET_SIZE(piece)
            self.file_piece(piece)
        return 0

    cdef int file_piece(self, bytes piece) except -1:
        if self.body_hooks:
            piece = run_response_body(self.route.response_body_filters, self, piece, False)
            if PyBytes_GET_SIZE(piece) == 0:
                return 0
        self.write_body(piece)
        self.client.flush()
        return 0

    cdef int finish_file(self) except -1:
        cdef bytes tail = self.local_file.tail
        if self.client.file_limits:
            self.client.set_file_limits(False)
        self.local_file = None  # its descriptor may close now
        if PyBytes_GET_SIZE(tail):
            self.file_piece(tail)
        self.response_complete()
        self.client.flush()
        return 0

    cdef int file_shrunk(self) except -1:
        """The file ended before the length its head promised: the client can only learn
        that from the connection closing before it."""
        self.local_file.file.stale = True  # the next request looks at it again
        self.local_file = None
        self.client.core.report_error(RuntimeError("file shrank while it was sent; connection closed"))
        self.client.abort()
        return 0

    cdef int fail(self, int status, str reason=None) except -1:
        """A client error found while reading the request: answer and close. `reason`
        goes to the error log (a default by status when None)."""
        self.end_pause()  # a paused request refused (413, 408) is over
        self.local_status = status
        self.local_body = None  # it replaces an answer from respond() or respond_file()
        self.local_file = None
        self.close_after = True
        self.client.refuse(self, reason)
        return 0

    cdef str log_protocol(self):
        if self.protocol is not None:
            return self.protocol.decode()
        return "HTTP/1.1" if self.http11 else "HTTP/1.0"

    cdef int response_head(self, UpstreamConnection conn, int status, bytes raw,
                           Py_ssize_t first, Py_ssize_t end) except -1:
        """The upstream's response head is raw[:end]; its header lines start at `first`."""
        cdef WorkerCore core = self.client.core
        cdef ByteWriter out = core.head_writer
        cdef ResponseHead edits = None
        cdef bint keep_length = True
        self.upstream_time = core.now - self.upstream_start
        self.sent_body = None  # no retry once the response has begun
        if self.route.response_head_filters:
            edits = core.head_edits
            edits.start(status, raw, first, end, None, -1)
            run_response_head(self.route.response_head_filters, self, edits)
            edits.finish()
            keep_length = not edits.length_dropped
        out.clear()
        self.response_started = True
        self.status = status
        out.add(status_line(status))
        conn.copy_head(raw, first, end, edits.removed if edits is not None else None,
                       keep_length, out)
        if status == 101:
            self.frame = FRAME_NONE
        elif self.is_head or status == 204 or status == 304:
            self.frame = FRAME_NONE
        elif conn.resp_has_length and keep_length:
            self.frame = FRAME_LENGTH
        elif self.http11:
            self.frame = FRAME_CHUNKED
        else:
            self.frame = FRAME_CLOSE
        self.body_hooks = self.frame != FRAME_NONE and len(self.route.response_body_filters) > 0
        if edits is not None and edits.added is not None:
            out.add(edits.added)
        if conn.resp_server is not None:
            out.add(b"Server: ")
            out.add(conn.resp_server)
            out.add(CRLF)
        else:
            out.add(core.server_line)
        if not conn.resp_has_date:
            out.add(core.date_line)
        if self.client.tls is not None:
            out.add(self.client.tls.hsts_line)
        out.add(b"X-Request-ID: ")
        out.add(self.request_id)
        out.add(CRLF)
        if status == 101:
            out.add(b"Connection: upgrade\r\nUpgrade: ")
            out.add(conn.resp_upgrade if conn.resp_upgrade is not None else b"websocket")
            out.add(CRLF)
        else:
            if self.frame == FRAME_CHUNKED:
                out.add(CHUNKED_LINE)
            out.add(self.connection_line())
        out.add(CRLF)
        self.client.write(out.take())
        return 0

    cdef int interim_response(self, UpstreamConnection conn, int status, bytes raw,
                              Py_ssize_t first, Py_ssize_t end) except -1:
        """A 1xx (102, 103, ...) before the response, relayed as received minus its
        hop-by-hop headers; raw[first:end] are its header lines."""
        cdef ByteWriter out = self.client.core.head_writer
        out.clear()
        out.add(status_line(status))
        conn.copy_head(raw, first, end, None, True, out)
        out.add(CRLF)
        self.client.write(out.take())
        return 0

    cdef int response_body(self, bytes data) except -1:
        if self.body_hooks:
            data = run_response_body(self.route.response_body_filters, self, data, False)
            if PyBytes_GET_SIZE(data) == 0:
                return 0  # an empty chunk would end a chunked body
        self.write_body(data)
        return 0

    cdef int write_body(self, bytes data) except -1:
        cdef ClientConnection client = self.client
        if self.frame == FRAME_CHUNKED:
            client.write(chunk_header(len(data)))
            client.write(data)
            client.write(CRLF)
        elif self.frame != FRAME_NONE:
            client.write(data)
        return 0

    cdef int response_complete(self) except -1:
        cdef bytes rest
        if self.body_hooks:
            self.body_hooks = False  # end of stream: a codec's trailer
            rest = run_response_body(self.route.response_body_filters, self, b"", True)
            if PyBytes_GET_SIZE(rest):
                self.write_body(rest)
        if self.frame == FRAME_CHUNKED:
            self.client.write(LAST_CHUNK)
        if self.upstream_time < 0 and self.upstream_start > 0:
            self.upstream_time = self.client.core.now - self.upstream_start
        self.response_done = True
        self.client.exchange_done(self)
        return 0


cdef inline int crlfcrlf_step(int matched, char c) noexcept:
    """One byte of a search for CRLFCRLF: how much of it ends the bytes seen so far."""
    if c == (ASCII_CR if matched % 2 == 0 else ASCII_LF):
        return matched + 1
    return 1 if c == ASCII_CR else 0


cdef inline bint fits(list pieces, Py_ssize_t limit):
    """The pieces add up to at most `limit` bytes (stops counting once over)."""
    cdef Py_ssize_t total = 0
    for piece in pieces:
        total += PyBytes_GET_SIZE(<bytes>piece)
        if total > limit:
            return False
    return True


@cython.final
cdef class ClientConnection:
    cdef WorkerCore core
    cdef object transport
    cdef ClientSocket sock       # the transport, on a plain listener: written to without Python calls
    cdef object parser
    # bound methods looked up once per connection instead of once per call
    cdef object feed, get_method, should_keep_alive, write_one, write_many
    cdef bytes addr
    cdef Exchange current        # the exchange being answered
    cdef Exchange parsing        # the exchange whose request is being read
    cdef object queue            # exchanges read ahead of their turn (pipelining)
    cdef list out                # bytes for the client not yet written
    cdef UpstreamConnection tunnel
    cdef list tunnel_pending     # client bytes that followed a websocket upgrade request
    cdef bytes held              # bytes read past a full pipelining queue, not parsed yet
    cdef int paused
    cdef int requests
    cdef int timer
    cdef double deadline
    cdef Py_ssize_t head_raw
    # where requests begin and end in the read being parsed, to check the gap between
    # them (skip_gap): offsets in `reading`, or AT_READ_START / UNTRACKED
    cdef bytes reading
    cdef Py_ssize_t msg_start, body_start, body_here, chunked_end
    cdef int gap
    cdef int head_crlf           # how much of CRLFCRLF ended the last read inside a head
    cdef int chunk_phase         # walk_chunks' place in a chunked body, kept across reads
    cdef Py_ssize_t chunk_size, chunk_left, trailer_line
    cdef bint chunk_ext
    cdef bint closing, write_paused, parse_failed, upgraded
    cdef bint file_limits        # write-buffer limits 0/0 while sendfile sends a body (start_file)
    cdef int fd                  # the socket's descriptor, once looked up (see send_room)
    cdef int send_capacity       # its kernel send buffer, as last looked up (see send_room)
    cdef Router router           # its listener's routes: the core's, or a redirect_https listener's own
    cdef TlsListener tls         # its TLS listener (core/tls.pyx), None on a plain one
    cdef bytes tls_version, tls_cipher  # for the access log, on TLS
    cdef bytes cert_lines        # X-Client-Cert-* lines for the upstream, from a verified client certificate
    # A field added above must be cleared in forget() too: this object and its parser serve
    # the worker's next connections.

    def __init__(self, WorkerCore core):
        self.core = core
        self.router = core.router
        self.new_parser()

    cdef bint reusable(self) noexcept:
        """At connection_lost: the connection ended between requests, its parser at a message
        boundary with nothing of httptools' own state left over (no error, no upgrade, no
        chunked request, whose trailer httptools may still hold), and nothing outside refers
        to it (every exchange is done)."""
        return (llhttp_reset != NULL and self.current is None and self.parsing is None
                and not self.queue and self.tunnel is None and not self.upgraded
                and not self.parse_failed and self.held is None and self.chunk_phase == CHUNK_SIZE)

    cdef int forget(self) except -1:
        """Back to the state of a new object, keeping the parser (reset) and its bound methods."""
        llhttp_reset(llhttp_state(self.parser))
        self.transport = self.write_one = self.write_many = None
        self.sock = None
        self.addr = None
        self.current = self.parsing = None
        self.queue = self.out = self.tunnel_pending = None
        self.tunnel = None
        self.held = self.reading = None
        self.paused = self.requests = self.timer = 0
        self.deadline = 0
        self.head_raw = self.msg_start = self.body_start = self.body_here = self.chunked_end = 0
        self.gap = GAP_LINE
        self.head_crlf = 0
        self.chunk_phase = CHUNK_SIZE
        self.chunk_size = self.chunk_left = self.trailer_line = 0
        self.chunk_ext = self.closing = self.write_paused = self.parse_failed = self.upgraded = False
        self.fd = self.send_capacity = 0
        self.router = self.core.router
        self.tls = None
        self.tls_version = self.tls_cipher = self.cert_lines = None
        return 0

    cdef int new_parser(self) except -1:
        self.parser = HttpRequestParser(self)
        self.feed = self.parser.feed_data
        self.get_method = self.parser.get_method
        self.should_keep_alive = self.parser.should_keep_alive
        return 0

    # -- asyncio protocol -------------------------------------------------------

    def connection_made(self, transport):
        self.core.now = monotonic()
        self.transport = transport
        self.write_one = transport.write
        self.write_many = transport.writelines
        if type(transport) is ClientSocket:  # core/stream.pyx: made at our limits, its address known
            self.sock = <ClientSocket>transport
            self.addr = self.sock.peer_ip
        else:  # a TLS listener's, on uvloop
            self.tls.made(self, transport)
            peer = transport.get_extra_info("peername")
            self.addr = (<str>peer[0]).encode() if peer else b"-"
        self.core.clients.add(self)
        self.core.metrics.connection_opened()
        self.set_timer(TIMER_IDLE, self.core.client_header_timeout)

    def data_received(self, bytes data):
        self.on_data(data)

    cdef int on_data(self, bytes data) except -1:
        self.core.now = monotonic()
        try:
            self.receive(data)
        except Exception as exc:
            self.internal_error(exc)
        return 0

    cdef int receive(self, bytes data) except -1:
        cdef Exchange ex
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return 0
        if self.upgraded:
            if self.tunnel_pending is not None:
                self.tunnel_pending.append(data)
            return 0
        if self.closing or self.parse_failed:
            return 0
        if not self.begin_read(data):
            return 0
        try:
            self.feed(data)
        except HttpParserUpgrade as exc:
            self.upgrade_requested(data[exc.args[0]:])
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _PipelineFull):
                self.hold(data, stopped_at(self.parser, data))
            else:
                self.parse_error(exc)
        except HttpParserError as exc:
            self.parse_error(exc)
        self.reading = None
        ex = self.parsing
        if ex is not None and not ex.head_done and not self.parse_failed:
            self.head_pending(ex, data)
        ex = self.current
        if ex is not None:
            ex.flush_upstream()
        self.flush()
        return 0

    def eof_received(self):
        self.core.now = monotonic()
        if self.tunnel is not None:
            self.tunnel.close()
            return False
        if self.current is not None and self.current.request_done and not self.current.response_done:
            self.current.close_after = True
            return True  # the client half-closed after its request: answer, then close
        return False

    def connection_lost(self, exc):
        self.core.now = monotonic()
        cdef Exchange ex = self.current
        self.core.clients.discard(self)
        self.core.metrics.connection_closed()
        if self.reusable() and self.core.keep_spare(self):
            self.forget()
            self.core.connection_gone()
            return
        self.closing = True
        # the parser and the transport's bound methods refer back to us: break the cycles
        self.parser = self.feed = self.get_method = self.should_keep_alive = None
        self.write_one = self.write_many = None
        self.sock = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            return
        if ex is not None and not ex.response_done:
            ex.aborted = True
            ex.local_file = None  # a file response cut short: its descriptor may close
            if ex.upstream is not None:
                ex.upstream.close()
                ex.upstream = None
            if ex.head_done:  # a request never fully read is not logged (as nginx)
                ex.status = 499  # nginx's code for "client closed the connection first"
                self.record(ex)
        if self.queue:
            for ex in self.queue:  # never answered, nor logged: their filters let go
                ex.finished()
        self.current = None
        self.parsing = None
        self.queue = None
        self.held = None
        self.core.connection_gone()

    def pause_writing(self):
        self.core.now = monotonic()
        cdef UpstreamConnection source = self.feeding()
        self.write_paused = True
        if source is not None:
            source.pause()
        self.set_timer(TIMER_SEND, self.core.send_timeout)

    def resume_writing(self):
        self.core.now = monotonic()
        cdef UpstreamConnection source = self.feeding()
        self.write_paused = False
        if source is not None:
            source.resume()
        if self.timer == TIMER_SEND:
            self.set_timer(TIMER_NONE, 0)
        if self.current is not None and self.current.local_file is not None \
                and self.current.response_started:
            self.continue_file()

    # -- httptools callbacks ----------------------------------------------------

    def on_message_begin(self):
        self.parsing = self.begin_exchange()
        self.head_raw = 0
        self.head_crlf = 0
        if self.parsing is self.current:
            self.set_timer(TIMER_HEADER, self.core.client_header_timeout)
        if self.gap == GAP_BAD:
            self.parsing.fail(400, "bytes other than empty lines before the request line")
            raise _StopRequest()

    def on_url(self, bytes url):
        cdef Exchange ex = self.parsing
        if ex.url is None:
            ex.url = url
            ex.method = self.get_method()
            # the request line counts toward max_header_size: method SP target SP HTTP/x.y CRLF
            ex.head_size = PyBytes_GET_SIZE(ex.method) + 12
        else:
            ex.url = ex.url + url
        ex.head_size += PyBytes_GET_SIZE(url)
        if len(ex.url) > self.core.max_uri_size:
            ex.protocol = b"-"  # not read yet
            ex.fail(414)
            raise _StopRequest()
        if ex.head_size > self.core.max_header_size:
            ex.protocol = b"-"
            ex.fail(431)
            raise _StopRequest()

    def on_header(self, bytes name, bytes value):
        cdef Exchange ex = self.parsing
        ex.head_size += len(name) + len(value) + 4
        if ex.head_size > self.core.max_header_size:
            ex.fail(431)
            raise _StopRequest()
        ex.header(name, value)

    def on_headers_complete(self):
        cdef Exchange ex = self.parsing
        ex.bytes_in = ex.head_size + 2  # the request line, the header lines and an empty line
        self.body_start = self.head_end()
        self.body_here = 0
        if ex.chunked_in:
            self.chunked_end = self.start_chunks()
        ex.head_complete()
        if self.parse_failed:
            raise _StopRequest()
        if ex is self.current:
            if ex.content_length != 0 and not ex.local_status:
                self.set_timer(TIMER_BODY, self.core.client_body_timeout)
            else:
                self.set_timer(TIMER_NONE, 0)
            ex.dispatch()

    def on_body(self, bytes body):
        cdef Exchange ex = self.parsing
        self.body_here += PyBytes_GET_SIZE(body)
        ex.body(body)
        if self.timer == TIMER_BODY:
            self.deadline = self.core.now + self.core.client_body_timeout

    def on_message_complete(self):
        cdef Exchange ex = self.parsing
        cdef bint queued = ex is not self.current
        self.parsing = None
        ex.message_complete()
        if not queued:
            if self.timer == TIMER_BODY:
                self.set_timer(TIMER_NONE, 0)
            if ex.local_status and not ex.response_started:
                ex.respond_local()
        else:
            self.pause_reading(PAUSE_PIPELINE)
        self.request_ended(ex)
        if queued and len(self.queue) >= PIPELINE_DEPTH:
            raise _PipelineFull()  # a new instance: a shared one would keep every traceback

    # -- flow -------------------------------------------------------------------

    cdef Exchange begin_exchange(self):
        """A new exchange: answered now if none is, else queued behind (pipelining)."""
        cdef Exchange ex = Exchange.new(self)
        if self.current is None:
            self.current = ex
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
        return ex

    cdef UpstreamConnection feeding(self):
        """The upstream connection whose reads become our writes, if any."""
        if self.tunnel is not None:
            return self.tunnel
        return self.current.upstream if self.current is not None else None

    cdef Py_ssize_t send_room(self) except -1:
        """How much more can be written before the client is paused: what its socket takes
        now plus what its write buffer may hold below the high-water mark."""
        cdef Py_ssize_t queued, room
        queued = socket_queued(self.socket_fd())
        if self.send_capacity - queued < BODY_READ_MAX:
            # the kernel may have grown the buffer since we looked: look again (a second
            # system call, only when the room seems short)
            self.send_capacity = socket_send_capacity(self.fd)
        room = self.send_capacity - queued if self.send_capacity > queued else 0
        return room + CLIENT_HIGH_WATER - self.transport.get_write_buffer_size()

    cdef int set_file_limits(self, bint on) except -1:
        """Write-buffer limits 0/0 while sendfile sends a body (it needs the transport's
        buffer empty: pause as soon as it holds anything, resume once it is empty); ours
        again after."""
        self.file_limits = on
        if on:
            self.transport.set_write_buffer_limits(0, 0)
        else:
            self.transport.set_write_buffer_limits(CLIENT_HIGH_WATER, CLIENT_LOW_WATER)
        return 0

    cdef int socket_fd(self) except -1:
        if self.fd == 0:
            if type(self.transport) is ClientSocket:
                self.fd = (<ClientSocket>self.transport).fd
            else:
                self.fd = self.transport.get_extra_info("socket").fileno()
            self.send_capacity = socket_send_capacity(self.fd)
        return self.fd

    def continue_file(self):
        """From the loop, after a burst of a file response (Exchange.send_file)."""
        self.core.now = monotonic()
        cdef Exchange ex = self.current
        if ex is not None and ex.local_file is not None:
            try:
                ex.send_file()
            except Exception as exc:
                self.internal_error(exc)

    cdef int write(self, bytes data) except -1:
        if self.current is not None:
            self.current.bytes_out += len(data)
        if self.out is None:
            self.out = [data]
        else:
            self.out.append(data)
        return 0

    cdef int flush(self) except -1:
        cdef list out = self.out
        cdef ByteWriter joined
        if out is None or self.write_one is None:  # nothing to write, or the connection is gone
            return 0
        self.out = None
        if self.sock is not None:
            self.sock.send_list(out)
        elif len(out) == 1:
            self.write_one(<bytes>out[0])
        elif fits(out, COALESCE_LIMIT):
            # small pieces: one copy costs less than the event loop's writev path
            joined = self.core.head_writer
            joined.clear()
            for piece in out:
                joined.add(<bytes>piece)
            self.write_one(joined.take())
        else:
            self.write_many(out)  # one writev, no copy of the body into a joined buffer
        return 0

    cdef int pause_reading(self, int reason) except -1:
        if self.paused == 0 and not self.closing:
            self.transport.pause_reading()
        self.paused |= reason
        return 0

    cdef int resume_reading(self, int reason) except -1:
        if self.paused & reason:
            self.paused &= ~reason
            if self.paused == 0 and not self.closing:
                self.transport.resume_reading()
        return 0

    cdef int set_timer(self, int kind, double timeout) except -1:
        self.timer = kind
        self.deadline = 0 if kind == TIMER_NONE else self.core.now + timeout
        return 0

    cdef int timed_out(self) except -1:
        cdef int kind = self.timer
        cdef Exchange ex = self.current
        self.set_timer(TIMER_NONE, 0)
        if kind == TIMER_IDLE:
            self.close()
        elif (kind == TIMER_HEADER or kind == TIMER_BODY) and ex is not None \
                and not ex.response_started:
            ex.fail(408)
        else:
            self.abort()
        self.flush()
        return 0

    cdef int record(self, Exchange ex) except -1:
        cdef double total = self.core.now - ex.started_at
        cdef WorkerCore core = self.core
        core.metrics.request_done(ex.route.metric_id if ex.route is not None else -1,
                                  ex.status, total, ex.bytes_in, ex.bytes_out)
        if core.access_log is not None:
            core.access_log.write(ex, self.addr, ex.status, total)
        if ex.route is not None and ex.route.log_filters:
            run_log(ex.route.log_filters, ex)
        if ex.slots is not None or ex.filter_state:
            ex.finished()
        return 0

    cdef int exchange_done(self, Exchange ex) except -1:
        """The response to `ex` is complete: log it, then go on to the next request."""
        cdef Exchange nxt
        self.record(ex)
        self.flush()
        if ex.upstream is not None:  # answered before the upstream did (413, early error)
            ex.upstream.exchange = None  # else its connection_lost completes `ex` a second time
            ex.upstream.close()
            ex.upstream = None
        self.requests += 1
        self.current = None
        if ex.close_after or self.closing:
            self.close()
            return 0
        if self.upgraded:
            # the upstream declined the upgrade: the bytes held after the request are plain
            # HTTP after all, parsed below once this exchange is done with
            self.upgraded = False
            if self.tunnel_pending:
                self.held = b"".join(self.tunnel_pending)
            self.tunnel_pending = None
        if self.queue:
            self.current = <Exchange>self.queue.popleft()
        if not self.queue:
            self.resume_reading(PAUSE_PIPELINE)
        nxt = self.current
        if nxt is None:
            self.set_timer(TIMER_IDLE, self.core.keepalive_timeout)
        elif nxt.head_done:
            self.set_timer(TIMER_NONE if nxt.request_done else TIMER_BODY,
                           self.core.client_body_timeout)
            nxt.dispatch()
        else:
            self.set_timer(TIMER_HEADER, self.core.client_header_timeout)
        if self.held is not None and not self.queue and not self.closing:
            held, self.held = self.held, None
            self.receive(held)  # the requests read past the full queue, in their turn
        return 0

    cdef int hold(self, bytes data, Py_ssize_t stop) except -1:
        """The pipelining queue is full and parsing stopped at data[stop]: keep the rest
        unparsed (a client costs the queue plus PIPELINE_HELD bytes, not all it sent)."""
        cdef Py_ssize_t rest = len(data) - stop
        self.new_parser()  # the stopped one is in its error state; messages start afresh
        if rest > PIPELINE_HELD:
            # more than we keep: answer what is queued, then close; a pipelining client
            # sends unanswered requests again on a new connection (RFC 9112 9.3.2)
            self.parse_failed = True
            (<Exchange>self.queue[len(self.queue) - 1]).close_after = True
        elif rest > 0:
            self.held = data[stop:]
        return 0

    cdef int refuse(self, Exchange ex, str reason) except -1:
        """A request we will not read further: the parser's state can no longer be trusted,
        so nothing after it is read and the connection closes after the answer."""
        cdef str version
        self.parse_failed = True
        if ex.request_id is None:
            ex.request_id = self.core.ids.next()
        if ex.url is None:
            ex.protocol = b"-"  # nothing of its request line was read
        elif not ex.head_done and self.parser is not None and ex.protocol is None:
            # refused while its head was read: log the version the parser has seen, if any
            version = self.parser.get_http_version()
            ex.http11 = version == "1.1"
            if not ex.http11 and version != "1.0":
                ex.protocol = b"-" if version == "0.0" else ("HTTP/" + version).encode()
        if ex.local_status != 500:  # a bug: report_error has logged it
            self.core.log_refused(ex, reason)
        if ex.response_started:
            self.abort()
        elif ex is self.current:
            ex.respond_local()
        else:
            ex.request_done = True
            ex.head_done = True  # answered when its turn comes
        return 0

    cdef int parse_error(self, exc) except -1:
        cdef Exchange ex
        if self.parse_failed or self.closing:
            return 0  # already answered from a callback
        ex = self.parsing if self.parsing is not None else self.begin_exchange()
        if isinstance(exc, HttpParserCallbackError) and not isinstance(exc.__context__, _StopRequest):
            self.core.report_error(exc.__context__)
            ex.fail(500)
        elif self.parser.get_http_version()[0] not in "01":
            ex.supported_version(self.parser.get_http_version())  # HTTP/3.0 ...: 505
        else:
            ex.fail(400, "invalid request: %s" % exc)
        return 0

    cdef int head_pending(self, Exchange ex, bytes data) except -1:
        """A read ended inside the head of `ex`."""
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i
        self.head_raw += n
        if self.head_raw > self.core.max_header_size + self.core.max_uri_size:
            ex.fail(414 if ex.url is not None and len(ex.url) > self.core.max_uri_size else 431)
            return 0
        # how much of the head's final CRLFCRLF the bytes so far end with, for head_end:
        # the last three bytes tell (a shorter read goes on from the previous count)
        i = n - 3 if n > 3 else 0
        if i > 0:
            self.head_crlf = 0
        for i in range(i, n):
            self.head_crlf = crlfcrlf_step(self.head_crlf, p[i])
        if p[n - 1] == b'\n':
            # a line of the head is complete, so llhttp has read the version: answer now
            # what it accepts and we do not serve (an HTTP/0.9 client would wait forever)
            ex.supported_version(self.parser.get_http_version())
        return 0

    cdef bint begin_read(self, bytes data) except -1:
        """Before `data` is parsed: note where requests are in it; between requests,
        check the bytes before the next one (False: refused, nothing to parse)."""
        cdef Exchange ex = self.parsing
        self.reading = data
        self.body_here = 0
        if ex is not None:
            self.msg_start = AT_READ_START
            self.body_start = 0 if ex.head_done else UNTRACKED
            if ex.head_done and ex.chunked_in:
                self.chunked_end = self.walk_chunks(0)
            return True
        if self.gap != GAP_BAD and self.skip_gap(0):
            return True
        self.reading = None
        self.begin_exchange().fail(400, "bytes other than empty lines before the request line")
        self.flush()
        return False

    cdef bint skip_gap(self, Py_ssize_t pos) noexcept:
        """Check reading[pos:] up to the next request: llhttp skips any CR and LF before a
        request line, but only empty lines (CRLF) may come there, or a stray CR could
        make us and another parser on the way see different requests. Sets msg_start;
        False (and GAP_BAD) on anything else."""
        cdef const char *p = PyBytes_AS_STRING(self.reading)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self.reading)
        cdef int gap = self.gap
        while pos < n:
            if p[pos] == b'\r':
                if gap == GAP_CR:
                    break
                gap = GAP_CR
            elif p[pos] == b'\n':
                if gap == GAP_LINE:
                    break
                gap = GAP_LINE
            else:
                if gap == GAP_CR:
                    break
                gap = GAP_LINE  # `pos` is where the next request begins
                self.msg_start = pos
                self.gap = gap
                return True
            pos += 1
        if pos < n:
            self.gap = GAP_BAD
            return False
        self.msg_start = UNTRACKED  # the next request begins in a later read
        self.gap = gap
        return True

    cdef Py_ssize_t head_end(self) noexcept:
        """Offset in `reading` where the head just parsed ends, or UNTRACKED."""
        cdef const char *p = PyBytes_AS_STRING(self.reading)
        cdef Py_ssize_t start = self.msg_start, i, end
        cdef int matched = self.head_crlf
        if start == UNTRACKED:
            return UNTRACKED
        if start == AT_READ_START:
            # the head began in an earlier read: its CRLFCRLF may straddle the two
            for i in range(min(3, PyBytes_GET_SIZE(self.reading))):
                matched = crlfcrlf_step(matched, p[i])
                if matched == 4:
                    return i + 1
            start = 0
        end = find_crlfcrlf(self.reading, start)
        return end + 4 if end >= 0 else UNTRACKED

    cdef Py_ssize_t start_chunks(self) noexcept:
        """A chunked body begins at body_start: walk what this read holds of it."""
        self.chunk_size = 0
        self.chunk_ext = False
        if self.body_start < 0:
            self.chunk_phase = CHUNK_LOST
            return UNTRACKED
        self.chunk_phase = CHUNK_SIZE
        return self.walk_chunks(self.body_start)

    cdef Py_ssize_t walk_chunks(self, Py_ssize_t pos) noexcept:
        """Follow the framing of a chunked body through reading[pos:]: where it ends,
        which llhttp does not tell, or UNTRACKED if it goes on in a later read. llhttp
        checks the framing; this only counts (chunk data is skipped, not scanned)."""
        cdef const char *p = PyBytes_AS_STRING(self.reading)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self.reading), take
        cdef char c
        if self.chunk_phase == CHUNK_LOST:
            return UNTRACKED
        while pos < n:
            if self.chunk_phase == CHUNK_DATA:
                take = min(self.chunk_left, n - pos)
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_phase = CHUNK_SIZE
                    self.chunk_size = 0
                    self.chunk_ext = False
                continue
            c = p[pos]
            pos += 1
            if self.chunk_phase == CHUNK_TRAILER:
                if c != b'\n':
                    self.trailer_line += 1
                elif self.trailer_line == 1:  # just its CR: the empty line that ends the body
                    return pos
                else:
                    self.trailer_line = 0
            elif c == b'\n':
                if self.chunk_size == 0:  # the last chunk
                    self.chunk_phase = CHUNK_TRAILER
                    self.trailer_line = 0
                else:
                    self.chunk_phase = CHUNK_DATA
                    self.chunk_left = self.chunk_size + 2  # and its CRLF
            elif not self.chunk_ext:
                if self.chunk_size >> 56:
                    # a size llhttp refuses (it overflows): stop counting before we do
                    self.chunk_phase = CHUNK_LOST
                    return UNTRACKED
                if b'0' <= c <= b'9':
                    self.chunk_size = self.chunk_size * 16 + (c - ASCII_ZERO)
                elif b'a' <= c <= b'f' or b'A' <= c <= b'F':
                    self.chunk_size = self.chunk_size * 16 + (c | 0x20) - 87  # 'a' is 10
                else:
                    self.chunk_ext = True  # ';' of an extension, or the CR
        return UNTRACKED

    cdef int request_ended(self, Exchange ex) except -1:
        """The request `ex` has been read: find where it ends in this read and check the
        gap after it."""
        cdef Py_ssize_t end
        if ex.conn_upgrade and self.parser.should_upgrade():
            self.gap = GAP_LINE  # httptools stops here; what follows is parsed from here
            return 0
        if ex.chunked_in:
            end = self.chunked_end
        else:
            end = self.body_start + self.body_here if self.body_start >= 0 else UNTRACKED
        if end >= 0:
            self.skip_gap(end)
        else:  # cannot happen: but a lost position must not refuse good requests
            self.msg_start = UNTRACKED
            self.gap = GAP_UNKNOWN
        return 0

    cdef int upgrade_requested(self, bytes rest) except -1:
        """httptools stopped after a request with Connection: upgrade. Only websocket
        becomes a tunnel; for any other protocol the request is answered as plain HTTP
        and the connection closed, so nothing can tunnel past the proxy's rules."""
        cdef Exchange ex = self.queue[len(self.queue) - 1] if self.queue else self.current
        if ex is not None and ex.upgrading and not ex.local_status:
            # hold what follows until the upstream accepts or declines (and read no more
            # meanwhile: a client has no reason to send before the 101)
            self.upgraded = True
            self.tunnel_pending = [rest] if rest else []
            self.pause_reading(PAUSE_PIPELINE)
        elif rest:
            self.receive(rest)  # httptools has resumed: what follows is plain HTTP again
        return 0

    cdef int start_tunnel(self, UpstreamConnection conn, bytes rest) except -1:
        cdef Exchange ex = self.current
        cdef list pending = self.tunnel_pending
        self.tunnel = conn
        self.tunnel_pending = None
        self.resume_reading(PAUSE_PIPELINE)
        self.set_timer(TIMER_NONE, 0)
        ex.response_done = True
        self.record(ex)
        if rest:
            self.write(rest)
        self.flush()
        if pending:
            conn.transport.writelines(pending)
        return 0

    cdef int internal_error(self, exc) except -1:
        """A bug must cost one request, never the worker: 500 if we still can, else close."""
        cdef Exchange ex = self.current
        self.core.report_error(exc)
        if ex is None or ex.response_started or self.closing:
            self.abort()
            return 0
        if ex.upstream is not None:
            ex.upstream.close()
            ex.upstream = None
        ex.local_status = 500
        ex.local_body = None  # it replaces an answer from respond() or respond_file()
        ex.local_file = None
        ex.close_after = True
        self.out = None
        try:
            ex.respond_local()
            self.flush()
        except Exception:
            self.abort()
        return 0

    cdef int tunnel_to_client(self, bytes data) except -1:
        self.transport.write(data)
        return 0

    cdef int drain(self) except -1:
        """The worker is draining: an idle connection is closed at its idle deadline or
        the drain deadline, whichever is first; a busy one closes after its response."""
        if self.current is None and self.tunnel is None and self.timer == TIMER_IDLE:
            self.deadline = min(self.deadline, self.core.drain_deadline)
        return 0

    cdef int close(self) except -1:
        if not self.closing:
            self.closing = True
            self.flush()
            if self.parse_failed and self.tls is None:
                # The client may still be sending what we refused to read. Closing with
                # unread bytes would reset the connection and could destroy our answer on
                # its way, so end our side, then read and drop what comes until the client
                # closes, for at most LINGER_TIMEOUT (nginx's lingering close). uvloop's TLS
                # transport cannot half-close: there the connection closes with close_notify.
                self.transport.write_eof()
                self.paused = 0
                self.transport.resume_reading()
                self.set_timer(TIMER_LINGER, LINGER_TIMEOUT)
            else:
                self.transport.close()
        return 0

    cdef int close_now(self) except -1:
        self.flush()
        self.closing = True
        self.transport.close()
        return 0

    cdef int abort(self) except -1:
        self.closing = True
        self.out = None
        self.transport.abort()
        return 0
