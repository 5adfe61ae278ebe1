# The filter contract, runtime half (the config half and the phases are in fastproxy/filters/;
# docs/extending.md has the whole picture). A filter's runtime half derives from Filter: one
# instance per route that uses it, built from its compiled config once per reload and shared
# by every request on that route, so it keeps no per-request state. A route keeps one tuple
# of filters per hook, in run order; a route without filters has empty tuples, which the hot
# path tests by size and never enters.

from fastproxy.filters.base import Phase

cdef enum:
    # what a hook answers
    FILTER_CONTINUE = 0  # go on: the next filter, then the route's handler
    FILTER_RESPOND = 1   # the hook called ex.respond(): answer that, contact no upstream
    FILTER_PAUSE = 2     # reserved: suspending an exchange until a filter resumes it comes next


cdef class Filter:
    """Base of a filter's runtime half: every hook continues. A subclass overrides the hooks
    of the phases its config half declares (base.Filter.phases)."""

    def __init__(self, config):
        pass

    cdef int request_head(self, Exchange ex) except -1:
        """The request head is complete, within its limits and routed; nothing was sent
        upstream. May edit the headers sent upstream or answer (ex.respond(), then
        FILTER_RESPOND)."""
        return FILTER_CONTINUE

    cdef int response_head(self, Exchange ex, ResponseHead head) except -1:
        """The head of a response that goes to the client is being built (the upstream's,
        or a local answer from ex.respond()): may edit its headers through `head`."""
        return FILTER_CONTINUE

    cdef int log(self, Exchange ex) except -1:
        """The exchange is over (ex.status is what the client got; 499 if it left first)."""
        return FILTER_CONTINUE


@cython.final
cdef class ResponseHead:
    """The response head being built, as response_head hooks see it and edit it. One per
    worker, reused: the hooks of one head run one after the other and must not keep it."""
    cdef int status
    cdef tuple removed  # lower-case names of the headers left out
    cdef bytes added    # header lines appended

    cdef void start(self, int status) noexcept:
        self.status = status
        self.removed = None
        self.added = None

    cdef int remove_headers(self, tuple lower_names) except -1:
        """Leave out every header with one of these names (lower-case)."""
        self.removed = joined(self.removed, lower_names)
        return 0

    cdef int add_header_lines(self, bytes lines) except -1:
        """Append these header lines ("Name: value\\r\\n" each, checked when compiled)."""
        self.added = joined(self.added, lines)
        return 0


cdef int run_request_head(tuple filters, Exchange ex) except -1:
    """The request_head hooks in order, until one answers: FILTER_CONTINUE, or FILTER_RESPOND
    once a hook has called ex.respond()."""
    cdef Py_ssize_t i
    cdef int status
    for i in range(len(filters)):
        status = (<Filter>filters[i]).request_head(ex)
        if status != FILTER_CONTINUE:
            if status == FILTER_RESPOND and ex.local_status:
                return FILTER_RESPOND
            raise RuntimeError("%s.request_head returned %d without calling respond() (PAUSE is not "
                               "supported yet)" % (type(filters[i]).__name__, status))
    return FILTER_CONTINUE


cdef int run_response_head(tuple filters, Exchange ex, ResponseHead head) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        if (<Filter>filters[i]).response_head(ex, head) != FILTER_CONTINUE:
            raise RuntimeError("%s.response_head did not continue (only request_head may answer yet)"
                               % type(filters[i]).__name__)
    return 0


cdef int run_log(tuple filters, Exchange ex) except -1:
    cdef Py_ssize_t i
    for i in range(len(filters)):
        (<Filter>filters[i]).log(ex)
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
    answers, after the route's other filters have had their say."""
    cdef int status
    cdef tuple headers
    cdef bytes body

    def __init__(self, handler):  # a config.runtime.Respond
        self.status = handler.status
        self.headers = handler.headers
        self.body = handler.body

    cdef int request_head(self, Exchange ex) except -1:
        ex.respond(self.status, self.headers, self.body)
        return FILTER_RESPOND


# The runtime class of each compiled config, by its `runtime` key (base.Filter.runtime).
FILTER_CLASSES = {"request_headers": RequestHeaders, "response_headers": ResponseHeaders}
# The runtime class of each local handler, by its `runtime` key (config/runtime.py): one
# request_head filter that always answers, run after the route's other filters.
HANDLER_CLASSES = {"respond": Respond}


def route_hooks(phases):
    """(request_head, response_head, log): the runtime filters of a route's compiled phases,
    each tuple in run order. A filter with several hooks is one object in each tuple."""
    made = {}

    def runtime(config):
        if id(config) not in made:
            made[id(config)] = FILTER_CLASSES[config.runtime](config)
        return made[id(config)]
    return tuple(tuple(runtime(config) for config in phases[phase])
                 for phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS, Phase.LOG))
