# Request paths in normal form (RFC 3986 6.2.2) before routing, so the route that decides
# and the upstream that serves agree: "/x/%2e%2e/small/y" and "//small/y" are both
# "/small/y", to the router and to the upstream. A path already in normal form costs one
# scan and is returned as it is; only one that changes is copied.

cdef inline int hex_value(unsigned char c) noexcept:
    if b'0' <= c <= b'9':
        return c - c'0'
    if b'A' <= c <= b'F':
        return c - c'A' + 10
    if b'a' <= c <= b'f':
        return c - c'a' + 10
    return -1


cdef inline bint is_unreserved(int c) noexcept:
    """RFC 3986 2.3: escaping these changes nothing, so their escapes are decoded."""
    return (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9') \
        or c == b'-' or c == b'.' or c == b'_' or c == b'~'


cdef inline int escaped_byte(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The byte the escape "%XX" at p[i] stands for; -1 when it is malformed."""
    cdef int high, low
    if i + 2 >= n:
        return -1
    high = hex_value(p[i + 1])
    low = hex_value(p[i + 2])
    if high < 0 or low < 0:
        return -1
    return high * 16 + low


cdef inline bint is_separator(int c) noexcept:
    """'/' and '\\': an upstream that decodes %2F or %5C, or treats '\\' as '/' (WHATWG URL
    parsers do), would see segments the router did not."""
    return c == b'/' or c == b'\\'


cdef inline bint escape_refused(int c, bint keep_encoded_slashes) noexcept:
    return c <= 0 or (is_separator(c) and not keep_encoded_slashes)  # malformed, %00, %2F, %5C


cdef inline bint dot_segment_at(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """p[i:] starts with the segment "." or ".." spelt with literal dots (an escaped dot is
    decoded, so the path is rewritten anyway)."""
    if p[i] != b'.':
        return False
    if i + 1 == n or p[i + 1] == b'/':
        return True
    return p[i + 1] == b'.' and (i + 2 == n or p[i + 2] == b'/')


cdef bytes normalized_path(bytes path, bint keep_encoded_slashes):
    """`path` (starting with "/") in normal form: the same object when it already is, a
    new one when not, None when it is refused (400): a malformed escape, %00, a '\\' or
    %2F or %5C (unless keep_encoded_slashes), or ".." above the root."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path), i = 0
    cdef int c
    while i < n:
        c = p[i]
        if c == b'%':
            c = escaped_byte(p, i, n)
            if escape_refused(c, keep_encoded_slashes):
                return None
            if is_unreserved(c) or p[i + 1] >= b'a' or p[i + 2] >= b'a':
                break  # to decode, or hex digits to upper-case
            i += 3
            continue
        if c == b'/':
            if i + 1 < n and (p[i + 1] == b'/' or dot_segment_at(p, i + 1, n)):
                break
        elif c == b'\\' and not keep_encoded_slashes:
            return None
        i += 1
    if i == n:
        return path
    return rewritten_path(p, n, keep_encoded_slashes)


cdef bytes rewritten_path(const unsigned char *p, Py_ssize_t n, bint keep_encoded_slashes):
    """normalized_path's copy, for a path that changes (or is refused on the way)."""
    cdef unsigned char *out = <unsigned char *>PyMem_Malloc(n)  # the path can only shrink
    cdef Py_ssize_t size
    if out == NULL:
        raise MemoryError()
    try:
        size = write_normal_form(p, n, out, keep_encoded_slashes)
        return None if size < 0 else PyBytes_FromStringAndSize(<char *>out, size)
    finally:
        PyMem_Free(out)


cdef Py_ssize_t write_normal_form(const unsigned char *p, Py_ssize_t n, unsigned char *out,
                                  bint keep_encoded_slashes) noexcept:
    """Writes p[:n] in normal form to out and returns its length, or -1 when refused.
    Segment by segment: a run of slashes becomes one, unreserved escapes are decoded and
    the others upper-cased, then the segment is dropped if it is "." or drops its parent
    if it is ".." (RFC 3986 5.2.4, seen after decoding, so "%2e%2e" counts)."""
    cdef Py_ssize_t i = 0, o = 0, segment
    cdef int c
    while i < n:
        while i < n and p[i] == b'/':
            i += 1
        if o == 0 or out[o - 1] != b'/':  # after a removed dot segment it already does
            out[o] = b'/'
            o += 1
        segment = o
        while i < n and p[i] != b'/':
            c = p[i]
            if c == b'%':
                c = escaped_byte(p, i, n)
                if escape_refused(c, keep_encoded_slashes):
                    return -1
                i += 3
                if is_unreserved(c):
                    out[o] = <unsigned char>c
                    o += 1
                else:
                    out[o] = b'%'
                    out[o + 1] = HEX_UPPER[c >> 4]
                    out[o + 2] = HEX_UPPER[c & 15]
                    o += 3
            else:
                if c == b'\\' and not keep_encoded_slashes:
                    return -1
                out[o] = <unsigned char>c
                o += 1
                i += 1
        if o - segment == 1 and out[segment] == b'.':
            o = segment  # "/a/./b" → "/a/b", "/a/." → "/a/"
        elif o - segment == 2 and out[segment] == b'.' and out[segment + 1] == b'.':
            if segment == 1:
                return -1  # no parent: above the root
            o = segment - 1  # back over "/..", then over the parent segment
            while out[o - 1] != b'/':
                o -= 1
    return o

