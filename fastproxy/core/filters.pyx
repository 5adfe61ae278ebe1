# The filter contract, runtime half (the config half and the phases are in fastproxy/filters/;
# docs/extending.md has the whole picture). A filter's runtime half derives from Filter: one
# instance per route that uses it, built from its compiled config once per reload and shared
# by every request on that route, so it keeps no per-request state. A route keeps one tuple
# of filters per hook, in run order; a route without filters has empty tuples, which the hot
# path tests by size and never enters. What a filter must remember about one request lives in
# the exchange's slot array (Filter.slot).

from fastproxy.filters.base import Phase

cdef enum:
    # what a hook answers
    FILTER_CONTINUE = 0  # go on: the next filter, then the route's handler
    FILTER_RESPOND = 1   # the hook called ex.respond(): answer that, contact no upstream
    FILTER_PAUSE = 2     # the hook arranged for ex.resume() to be called later: wait for it

cdef enum:
    # Exchange.filter_state: where its request_head filters are, for pause and resume
    FS_NONE = 0      # not in them: resume() is a no-op
    FS_RUNNING = 1   # a hook is running
    FS_RESUMED = 2   # that hook called resume() before returning: a PAUSE it returns goes on
    FS_PAUSED = 3    # a hook returned PAUSE: resume() goes on with the next filter


cdef class Filter:
    """Base of a filter's runtime half: every hook continues. A subclass overrides the hooks
    of the phases its config half declares (base.Filter.phases)."""
    # index of its per-request slot in ex.slots when its config is `stateful`, else -1;
    # given by the route's compile (route_hooks, WorkerCore.compile_route: one object per
    # route), which calls release() for each such filter when an exchange ends
    cdef Py_ssize_t slot

    def __init__(self, config):
        pass

    cdef int bind(self, WorkerCore core) except -1:
        """Once per reload, after __init__, in the worker: take what it uses of the core
        (upstream pools, the metrics writer, its zones in core.zones, the event loop for
        timers)."""
        return 0

    cdef int request_head(self, Exchange ex) except -1:
        """The request head is complete, within its limits and routed; nothing was sent
        upstream. May edit the headers sent upstream or answer (ex.respond(), then
        FILTER_RESPOND)."""
        return FILTER_CONTINUE

    cdef int request_body(self, Exchange ex, bytes data, bint last) except -1:
        """A chunk of the request body on its way upstream (its content, without the chunked
        framing), then once more with last=True and data b"" when the body is complete. It
        may only pass it on for now (editing or collecting the body comes later)."""
        return FILTER_CONTINUE

    cdef int upstream(self, Exchange ex) except -1:
        """The request head to send upstream is final (ex.upstream_head); the route's
        upstream is contacted next, once the exchange's turn comes (pipelining)."""
        return FILTER_CONTINUE

    cdef int response_head(self, Exchange ex, ResponseHead head) except -1:
        """The head of a response that goes to the client is being built (the upstream's,
        or a local answer from ex.respond()): may edit its headers through `head`."""
        return FILTER_CONTINUE

    cdef bytes response_body(self, Exchange ex, bytes data, bint end):
        """A piece of the body going to the client (`end`: the last call, after the body's
        last piece, so a codec can flush its trailer; `data` may then be empty). Returns what
        to pass on, possibly b"". For the upstream's responses that have a body and for
        local answers from ex.respond(), which get one call with their whole body."""
        return data

    cdef int log(self, Exchange ex) except -1:
        """The exchange is over (ex.status is what the client got; 499 if it left first)."""
        return FILTER_CONTINUE

    cdef int release(self, Exchange ex) except -1:
        """Only for a filter with a slot: the exchange is over, however it ended (answered,
        left by its client, or dropped unanswered behind one that was), after its log hooks.
        Cancel what ex.slots[self.slot] holds (a timer, a pending call)."""
        return 0


@cython.final
cdef class ResponseHead:
    """The response head being built, as response_head hooks see it and edit it. One per
    worker, reused: the hooks of one head run one after the other and must not keep it."""
    cdef int status
    cdef tuple removed  # lower-case names of the headers left out
    cdef bytes added    # header lines appended
    cdef bint length_dropped  # drop_length() was called
    # what the headers are read from: the upstream's head (its header lines are
    # raw[first:end]) or a local answer's pairs and body length
    cdef bytes raw
    cdef Py_ssize_t first, end
    cdef tuple pairs
    cdef Py_ssize_t local_length

    cdef void start(self, int status, bytes raw, Py_ssize_t first, Py_ssize_t end,
                    tuple pairs, Py_ssize_t local_length) noexcept:
        self.status = status
        self.removed = None
        self.added = None
        self.length_dropped = False
        self.raw = raw
        self.first = first
        self.end = end
        self.pairs = pairs
        self.local_length = local_length

    cdef void finish(self) noexcept:
        """The head is built: let go of what it was read from."""
        self.raw = None
        self.pairs = None

    cdef bytes header(self, bytes lower_name):
        """The value of the response's header `lower_name` (lower-case) as received, the
        values of repeated lines joined with ", "; None when absent. Edits made by earlier
        hooks are not reflected."""
        cdef const char *p
        cdef const char *colon
        cdef const char *nl
        cdef Py_ssize_t pos, eol, start, stop
        cdef bytes found = None, value
        cdef tuple names = (lower_name,)
        if self.pairs is not None:
            for name, value in self.pairs:
                if name_listed(<bytes>name, names):
                    found = value if found is None else found + b", " + value
            return found
        if self.raw is None:
            return None
        p = PyBytes_AS_STRING(self.raw)
        pos = self.first
        while pos < self.end:
            nl = <const char *>memchr(p + pos, b'\n', self.end - pos)
            eol = nl - p
            colon = <const char *>memchr(p + pos, b':', eol - pos)
            if colon != NULL and listed(p + pos, colon - (p + pos), names):
                start = colon + 1 - p
                stop = eol - 1  # before the CR
                while start < stop and (p[start] == b' ' or p[start] == b'\t'):
                    start += 1
                while stop > start and (p[stop - 1] == b' ' or p[stop - 1] == b'\t'):
                    stop -= 1
                value = PyBytes_FromStringAndSize(p + start, stop - start)
                found = value if found is None else found + b", " + value
            pos = eol + 1
        return found

    cdef Py_ssize_t content_length(self) except -2:
        """The body's length as the response declares it (a local answer's body, the
        upstream's Content-Length); -1 when unknown (chunked, or until the upstream closes)."""
        cdef bytes value
        cdef const char *p
        cdef Py_ssize_t i
        if self.pairs is not None:
            return self.local_length
        value = self.header(b"content-length")
        if value is None:
            return -1
        p = PyBytes_AS_STRING(value)
        for i in range(PyBytes_GET_SIZE(value)):
            if not (b'0' <= p[i] <= b'9'):
                return -1  # several lines joined: llhttp refuses that, but do not trust it here
        return parse_length(p, PyBytes_GET_SIZE(value))

    cdef int drop_length(self) except -1:
        """The framing decision: the body's length becomes unknown (a body hook changes
        it), so Content-Length is not sent and the body goes chunked to an HTTP/1.1 client,
        close-delimited to an HTTP/1.0 one. A local answer's body is whole: it gets the
        Content-Length of what the body hooks return instead."""
        self.length_dropped = True
        return 0

    cdef int remove_headers(self, tuple lower_names) except -1:
        """Leave out every header with one of these names (lower-case): the response's own,
        and the lines earlier hooks added."""
        self.removed = joined(self.removed, lower_names)
        if self.added is not None:
            self.added = without_lines(self.added, lower_names)
        return 0

    cdef int add_header_lines(self, bytes lines) except -1:
        """Append these header lines ("Name: value\\r\\n" each, checked when compiled)."""
        self.added = joined(self.added, lines)
        return 0


cdef bytes without_lines(bytes lines, tuple lower_names):
    """Header lines ("Name: value\r\n" each) but those with one of these names."""
    cdef const char *p = PyBytes_AS_STRING(lines)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(lines), pos = 0, eol
    cdef const char *colon
    cdef ByteWriter out = None
    while pos < n:
        eol = <const char *>memchr(p + pos, b'\n', n - pos) - p + 1
        colon = <const char *>memchr(p + pos, b':', eol - pos)
        if listed(p + pos, colon - (p + pos), lower_names):
            if out is None:
                out = ByteWriter(n)
                out.add_raw(p, pos)
        elif out is not None:
            out.add_raw(p + pos, eol - pos)
        pos = eol
    return lines if out is None else out.take()


cdef int run_request_head(tuple filters, Exchange ex, Py_ssize_t start) except -1:
    """The request_head hooks from filters[start] on, until one answers or pauses:
    FILTER_CONTINUE; FILTER_RESPOND once a hook has called ex.respond(); FILTER_PAUSE, the
    exchange paused at that hook (ex.resume() goes on with the next one)."""
    cdef Py_ssize_t i
    cdef int status
    for i in range(start, len(filters)):
        ex.filter_state = FS_RUNNING
        status = (<Filter>filters[i]).request_head(ex)
        if status == FILTER_CONTINUE:
            continue
        if status == FILTER_RESPOND and ex.local_status:
            ex.filter_state = FS_NONE
            return FILTER_RESPOND
        if status == FILTER_PAUSE and not ex.local_status:
            if ex.filter_state == FS_RESUMED:
                continue  # resumed before its hook returned
            ex.pause(i)
            return FILTER_PAUSE
        ex.filter_state = FS_NONE
        raise RuntimeError("%s.request_head returned %d %s" % (
            type(filters[i]).__name__, status, "after calling respond()" if ex.local_status
            else "without calling respond()"))
    ex.filter_state = FS_NONE
    return FILTER_CONTINUE


cdef inline int continued(int status, object hooked, str hook) except -1:
    """Only request_head may answer yet: another status from another hook is a bug."""
    if status != FILTER_CONTINUE:
        raise RuntimeError("%s.%s did not continue (only request_head may answer yet)"
                           % (type(hooked).__name__, hook))
    return 0


cdef int run_request_body(tuple filters, Exchange ex, bytes data, bint last) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        continued((<Filter>filters[i]).request_body(ex, data, last), filters[i], "request_body")
    return 0


cdef int run_upstream(tuple filters, Exchange ex) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        continued((<Filter>filters[i]).upstream(ex), filters[i], "upstream")
    return 0


cdef int run_response_head(tuple filters, Exchange ex, ResponseHead head) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        continued((<Filter>filters[i]).response_head(ex, head), filters[i], "response_head")
    return 0


cdef bytes run_response_body(tuple filters, Exchange ex, bytes data, bint end):
    """The response_body hooks in order, each given what the previous one returned; a piece
    that became empty goes no further (but the end call always reaches every hook)."""
    cdef Py_ssize_t i
    for i in range(len(filters)):
        data = (<Filter>filters[i]).response_body(ex, data, end)
        if data is None:
            raise RuntimeError("%s.response_body returned None" % type(filters[i]).__name__)
        if not end and PyBytes_GET_SIZE(data) == 0:
            return data
    return data


cdef int run_log(tuple filters, Exchange ex) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        (<Filter>filters[i]).log(ex)
    return 0


cdef int run_release(tuple filters, Exchange ex) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        (<Filter>filters[i]).release(ex)
    return 0


# -- the built-in filters -------------------------------------------------------------------

cdef class HeaderTransform(Filter):
    """request_headers / response_headers (config half: fastproxy/filters/headers.py): the
    names it removes or sets, and the lines of the values it sets and adds, ready to copy."""
    cdef tuple removed  # lower-case
    cdef bytes added

    def __init__(self, config):
        self.removed = tuple(name.lower() for name in config.remove + tuple(n for n, _ in config.set))
        self.added = b"".join(name + b": " + value + b"\r\n" for name, value in config.set + config.add)


@cython.final
cdef class RequestHeaders(HeaderTransform):
    cdef int request_head(self, Exchange ex) except -1:
        if self.removed:
            ex.remove_headers(self.removed)
        if self.added:
            ex.add_header_lines(self.added)
        return FILTER_CONTINUE


@cython.final
cdef class ResponseHeaders(HeaderTransform):
    cdef int response_head(self, Exchange ex, ResponseHead head) except -1:
        if self.removed:
            head.remove_headers(self.removed)
        if self.added:
            head.add_header_lines(self.added)
        return FILTER_CONTINUE


@cython.final
cdef class Respond(Filter):
    """A `respond` route's handler, which is the route's last request_head filter: it always
    answers, after the route's other filters have had their say. With a delay it pauses on
    a loop timer, whose handle is its per-request state (its slot: the handler is stateful),
    cancelled if the exchange ends first, and answers from the timer."""
    cdef int status
    cdef tuple headers
    cdef bytes body
    cdef double delay
    cdef object call_later

    def __init__(self, handler):  # a config.runtime.Respond
        self.status = handler.status
        self.headers = handler.headers
        self.body = handler.body
        self.delay = handler.delay

    cdef int bind(self, WorkerCore core) except -1:
        self.call_later = core.loop.call_later
        return 0

    cdef int request_head(self, Exchange ex) except -1:
        if self.delay:
            ex.slots[self.slot] = self.call_later(self.delay, self.delayed, ex)
            return FILTER_PAUSE
        ex.respond(self.status, self.headers, self.body)
        return FILTER_RESPOND

    def delayed(self, Exchange ex):
        """The delay is over: answer. Both calls are no-ops on an exchange no longer paused
        (answered 504 past pause_timeout, or refused meanwhile)."""
        ex.respond(self.status, self.headers, self.body)
        ex.resume()

    cdef int release(self, Exchange ex) except -1:
        timer = ex.slots[self.slot]
        if timer is not None:
            timer.cancel()  # nothing once it has run
        return 0


# The runtime class of each compiled config, by its `runtime` key (base.Filter.runtime).
FILTER_CLASSES = {"request_headers": RequestHeaders, "response_headers": ResponseHeaders}
# The runtime class of each local handler, by its `runtime` key (config/runtime.py): one
# request_head filter that always answers, run after the route's other filters.
HANDLER_CLASSES = {"respond": Respond}


# The phases with a hook, in the order of route_hooks' tuples.
HOOK_PHASES = (Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.UPSTREAM, Phase.RESPONSE_HEADERS,
               Phase.RESPONSE_BODY, Phase.LOG)


def route_hooks(phases, WorkerCore core):
    """The runtime filters of a route's compiled phases, one tuple per HOOK_PHASES entry in
    run order, then those that keep per-request state, in slot order (each is given its
    index in ex.slots). A filter with several hooks is one object in each tuple, bound to
    the core (Filter.bind) once."""
    cdef Filter made
    stateful = []
    by_config = {}
    for phase in phases:
        for config in phase:
            if id(config) not in by_config:
                made = FILTER_CLASSES[config.runtime](config)
                made.bind(core)
                made.slot = -1
                if config.stateful:
                    made.slot = len(stateful)
                    stateful.append(made)
                by_config[id(config)] = made
    return tuple(tuple(by_config[id(config)] for config in phases[phase])
                 for phase in HOOK_PHASES) + (tuple(stateful),)
