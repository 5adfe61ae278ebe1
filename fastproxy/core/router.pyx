# Route matching. Routes are ranked once per reload (Router.__init__); matching is a
# short scan in rank order where the first full match wins.

@cython.final
cdef class CompiledRoute:
    cdef readonly str name
    cdef bytes log_name       # name, JSON-escaped, for the access log
    cdef int metric_id
    cdef readonly tuple hosts          # exact lower-case hosts
    cdef readonly tuple host_suffixes  # ".example.com" for "*.example.com"
    cdef readonly bytes path
    cdef readonly bytes prefix
    cdef readonly tuple methods
    cdef bytes allow_value    # "GET, HEAD" for 405 answers
    cdef UpstreamPool pool    # None for a `respond` route (its last request_head filter answers)
    cdef bytes upstream_host  # Host for a request without one (see upstream_host())
    cdef Py_ssize_t max_body_size
    cdef Py_ssize_t max_header_size
    # its filters per hook, in run order (core/filters.pyx); empty tuples for most routes
    cdef tuple request_head_filters, request_body_filters, upstream_filters
    cdef tuple response_head_filters, response_body_filters, log_filters
    # those of its filters that keep per-request state, in slot order (Filter.slot): an
    # exchange on this route carries a list of slot_count slots (ex.slots); 0 for most routes
    cdef tuple slot_filters
    cdef Py_ssize_t slot_count

    cdef bint host_matches(self, bytes host) except -1:
        cdef bytes suffix
        if not self.hosts and not self.host_suffixes:
            return True
        if host in self.hosts:
            return True
        for suffix in self.host_suffixes:
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        return False

    cdef bint path_matches(self, bytes path) except -1:
        if self.path is not None:
            return path == self.path
        if self.prefix is not None:
            return path.startswith(self.prefix)
        return True


def _rank(route):
    """Sort key: host first, then exact path, then prefix length, then methods."""
    compiled, index = route
    return (
        -(1 if (compiled.hosts or compiled.host_suffixes) else 0),
        -(1 if compiled.path is not None else 0),
        -(len(compiled.prefix) if compiled.prefix is not None else 0),
        -(1 if compiled.methods else 0),
        index,
    )


@cython.final
cdef class Router:
    cdef tuple ranked
    cdef bint uses_hosts

    def __init__(self, routes):
        self.ranked = tuple(r for r, _ in sorted(((r, i) for i, r in enumerate(routes)), key=_rank))
        self.uses_hosts = any(r.hosts or r.host_suffixes for r in routes)

    cdef CompiledRoute match(self, bytes host, bytes path, bytes method, list allowed):
        """The best route, or None. Given a list, the methods of routes that matched all
        but the method are added to it (to answer 405 with Allow)."""
        cdef CompiledRoute route
        for route in self.ranked:
            if self.uses_hosts and not route.host_matches(host):
                continue
            if not route.path_matches(path):
                continue
            if route.methods and method not in route.methods:
                if allowed is not None:
                    allowed.extend(route.methods)
                continue
            return route
        return None


cdef bytes normalize_host(bytes host):
    """Host header value → lower case without port (once per request, only when routes use hosts)."""
    cdef Py_ssize_t i
    if host.startswith(b"["):
        i = host.find(b"]")
        return host[:i + 1].lower() if i > 0 else host.lower()
    i = host.rfind(b":")
    if i >= 0:
        host = host[:i]
    return host.lower()

