# `mirror`, runtime half (config half: fastproxy/filters/mirror.py; docs/mirror.md): a copy
# of the selected requests goes to another upstream as a subrequest whose answer is dropped.
# The copy never holds the client's request back: its unsent body is bounded, and past the
# bound the copy is abandoned rather than the client slowed down.

# A mirror copy's request bytes not yet taken by the mirror (connecting, or not reading) are
# held up to this; the upload goes on without the copy past it.
cdef Py_ssize_t MIRROR_MAX_PENDING = 1024 * 1024


@cython.final
cdef class MirrorDone(SubrequestDone):
    """Counts how each copy of one route's mirror ended, and those in progress."""
    cdef MetricsWriter metrics
    cdef int metric_id
    cdef int in_flight

    cdef int done(self, Subrequest sub) except -1:
        self.in_flight -= 1
        if sub.error == SUB_FAILED:
            self.metrics.mirror_result(self.metric_id, MIRROR_FAILED)
        elif sub.error == SUB_ABANDONED:
            self.metrics.mirror_result(self.metric_id, MIRROR_ABANDONED)
        return 0


@cython.final
cdef class Mirror(Filter):
    # its slot (config stateful) holds the copy of the exchange's request while its body streams
    cdef str upstream_name
    cdef int percent, max_in_flight
    cdef int credit  # selection: `percent` added per request, a copy per 100 gathered
    cdef UpstreamPool pool
    cdef MirrorDone on_done

    def __init__(self, config):
        self.upstream_name = config.upstream
        self.percent = config.percent
        self.max_in_flight = config.max_in_flight

    cdef int bind(self, WorkerCore core) except -1:
        self.pool = core.pools_by_name[self.upstream_name]
        self.on_done = MirrorDone.__new__(MirrorDone)
        self.on_done.metrics = core.metrics
        self.on_done.metric_id = self.pool.metric_id
        return 0

    cdef int upstream(self, Exchange ex) except -1:
        cdef Subrequest sub
        self.credit += self.percent
        if self.credit < 100 or ex.upgrading:  # a tunnel is not copied
            return FILTER_CONTINUE
        self.credit -= 100
        if self.on_done.in_flight >= self.max_in_flight:  # a stuck mirror: hold no more of them
            self.on_done.metrics.mirror_result(self.on_done.metric_id, MIRROR_SKIPPED)
            return FILTER_CONTINUE
        sub = Subrequest.new(self.pool, ex.upstream_head, self.on_done, 0, MIRROR_MAX_PENDING)
        self.on_done.metrics.mirror_result(self.on_done.metric_id, MIRROR_SENT)
        self.on_done.in_flight += 1
        if ex.content_length == 0:
            sub.start(b"", True)
        else:
            ex.slots[self.slot] = sub
            sub.start(b"", False)
        return FILTER_CONTINUE

    cdef int request_body(self, Exchange ex, bytes data, bint last) except -1:
        cdef Subrequest sub = <Subrequest>ex.slots[self.slot]
        if sub is None:
            return FILTER_CONTINUE
        if last:
            if ex.chunked_in:
                sub.send_body(LAST_CHUNK)
            sub.end()
        elif ex.chunked_in:  # framed as the upstream gets it: the copy's head says chunked
            sub.send_body(chunk_header(PyBytes_GET_SIZE(data)))
            sub.send_body(data)
            sub.send_body(CRLF)
        else:
            sub.send_body(data)
        return FILTER_CONTINUE

    cdef int log(self, Exchange ex) except -1:
        cdef Subrequest sub
        if ex.slots is None:
            return FILTER_CONTINUE  # refused before its hooks ran (431, 413)
        sub = <Subrequest>ex.slots[self.slot]
        if sub is not None and not sub.request_done:
            sub.abandon()  # the client's upload broke off: the copy's body never ends
        return FILTER_CONTINUE


FILTER_CLASSES["mirror"] = Mirror
