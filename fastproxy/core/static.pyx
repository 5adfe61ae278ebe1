# Static files, runtime half (config half: fastproxy/config/static.py; the whole picture:
# docs/static.md). The `static` handler maps the request path under its root, finds the file
# through a small per-worker cache of open descriptors and stat results (revalidated at most
# once a second), evaluates the conditional and range headers, and answers with
# ex.respond_file(): the body is streamed from the descriptor by the exchange (http.pyx),
# never read whole.

import os
import stat as stat_mode
from email.utils import formatdate

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t
from libc.string cimport memcmp
from posix.unistd cimport pread, close as close_fd
from posix.types cimport off_t

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

# Open files each Static handler keeps per worker; past it the oldest entry is dropped (its
# descriptor closes once no response is sending from it).
cdef Py_ssize_t FILE_CACHE_ENTRIES = 1024
# How long a cached lookup (found or not) is trusted before the path is looked at again.
cdef double FILE_CACHE_VALID = 1.0
cdef enum:
    # More ranges than this in one request are ignored (the whole file is sent): each costs
    # a part header, and many small ranges are a known way to make a server work for nothing.
    MAX_RANGES = 16

cdef tuple ALLOW_GET_HEAD = ((b"Allow", b"GET, HEAD"), (b"Content-Type", b"application/json"))
cdef bytes METHOD_NOT_ALLOWED_BODY = b'{"status":405,"error":"method not allowed: static files take GET and HEAD"}\n'
cdef tuple JSON_TYPE = ((b"Content-Type", b"application/json"),)
cdef bytes NOT_FOUND_BODY = b'{"status":404,"error":"not found"}\n'
cdef bytes PRECONDITION_FAILED_BODY = b'{"status":412,"error":"precondition failed"}\n'
cdef bytes ACCEPT_RANGES = b"bytes"
cdef bytes VARY_ACCEPT_ENCODING = b"Accept-Encoding"
cdef dict SIBLING_CODINGS = {"zst": CODING_ZSTD, "br": CODING_BR, "gz": CODING_GZIP}
cdef tuple ENCODING_NAMES = (b"zstd", b"br", b"gzip")  # by CODING_*


@cython.final
cdef class OpenFile:
    """A regular file, open, with what its responses say about it; the descriptor closes when
    the cache has dropped it and no response is sending from it."""
    cdef int fd
    cdef int64_t size
    cdef int64_t mtime        # seconds
    cdef bytes etag           # strong: "mtime-size" in hex
    cdef bytes last_modified
    cdef bytes content_type
    cdef tuple variants       # (coding, OpenFile) of its precompressed siblings, in preference order
    cdef tuple key            # (device, inode, size, mtime_ns): what revalidation compares
    cdef bint stale           # found shorter than its size while sent: look at it again

    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close_fd(self.fd)


cdef object DIRECTORY = object()  # a cache value: the path is a directory


@cython.final
cdef class FileBody:
    """What a file response sends: parts, each some bytes (a multipart boundary and part
    head, or nothing) then `count` bytes of the file from `offset`; then `tail`. The exchange
    walks it (Exchange.send_file) as the client takes it."""
    cdef OpenFile file
    cdef list parts           # prefix, offset, count, prefix, offset, count, ...
    cdef bytes tail
    cdef Py_ssize_t index     # the next part's place in `parts`
    cdef int64_t offset, left  # the file bytes of the current part still to send
    cdef int64_t total        # every byte the body has: its Content-Length
    cdef bint no_sendfile     # sendfile failed on this file (not EAGAIN): read it instead

    @staticmethod
    cdef FileBody new(OpenFile file, list parts, bytes tail):
        cdef FileBody body = FileBody.__new__(FileBody)
        cdef Py_ssize_t i
        body.file = file
        body.parts = parts
        body.tail = tail
        body.total = PyBytes_GET_SIZE(tail)
        for i in range(0, len(parts), 3):
            body.total += PyBytes_GET_SIZE(<bytes>parts[i]) + <int64_t>parts[i + 2]
        return body

    cdef bytes next_part(self):
        """The prefix of the next part, which becomes the current one; None when none is left."""
        cdef bytes prefix
        if self.index >= len(self.parts):
            return None
        prefix = <bytes>self.parts[self.index]
        self.offset = <int64_t>self.parts[self.index + 1]
        self.left = <int64_t>self.parts[self.index + 2]
        self.index += 3
        return prefix

    cdef bytes read(self, Py_ssize_t size):
        """Up to `size` bytes of the current part, read from the file; None when the file
        ended before them (it shrank since it was looked at: the length was promised)."""
        cdef bytes piece
        cdef ssize_t got
        if size > self.left:
            size = <Py_ssize_t>self.left
        piece = PyBytes_FromStringAndSize(NULL, size)
        while True:
            got = pread(self.file.fd, PyBytes_AS_STRING(piece), size, self.offset)
            if got >= 0 or errno != EINTR:
                break
        if got <= 0:
            return None
        self.offset += got
        self.left -= got
        return piece if got == size else piece[:got]

    cdef Py_ssize_t send(self, int socket_fd, Py_ssize_t size) noexcept:
        """Up to `size` bytes of the current part from the file straight to the socket: how
        many went, 0 when the socket is full, -1 when the file ended before them (shrank),
        -2 when sendfile cannot be used on it (then `no_sendfile`)."""
        cdef off_t offset = self.offset
        cdef ssize_t sent
        if size > self.left:
            size = <Py_ssize_t>self.left
        with nogil:
            sent = sendfile(socket_fd, self.file.fd, &offset, size)
        if sent > 0:
            self.offset += sent
            self.left -= sent
            return sent
        if sent == 0:
            return -1
        if errno == EAGAIN or errno == EINTR:
            return 0
        self.no_sendfile = True
        return -2


cdef inline int64_t days_from_civil(int64_t y, int m, int d) noexcept:
    """Days since 1970-01-01 of a Gregorian date (Howard Hinnant's algorithm)."""
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (9 if m <= 2 else -3)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline int digits(const char *p, int n) noexcept:
    cdef int value = 0, i
    for i in range(n):
        if not (b'0' <= p[i] <= b'9'):
            return -1
        value = value * 10 + p[i] - ASCII_ZERO
    return value


cdef const char *MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"


cdef int64_t http_date_seconds(bytes value) noexcept:
    """Seconds since the epoch of an IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"), -1 when
    the value is not one (the header is then ignored, as RFC 9110 13.1.3 allows for invalid
    dates; the obsolete formats count as invalid here)."""
    cdef const char *p = PyBytes_AS_STRING(value)
    cdef int day, month = -1, year, hour, minute, second, i
    if PyBytes_GET_SIZE(value) != 29 or p[3] != b',' or p[4] != b' ' or p[7] != b' ' \
            or p[11] != b' ' or p[16] != b' ' or p[19] != b':' or p[22] != b':' \
            or memcmp(p + 25, b" GMT", 4) != 0:
        return -1
    for i in range(12):
        if memcmp(p + 8, MONTHS + 3 * i, 3) == 0:
            month = i + 1
    day = digits(p + 5, 2)
    year = digits(p + 12, 4)
    hour = digits(p + 17, 2)
    minute = digits(p + 20, 2)
    second = digits(p + 23, 2)
    if month < 0 or day < 1 or day > 31 or year < 0 or hour > 23 or minute > 59 or second > 60 \
            or hour < 0 or minute < 0 or second < 0:
        return -1
    return days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second


cdef bint etag_matches(bytes header, bytes etag, bint weak) noexcept:
    """Whether the entity-tag list `header` (If-Match, If-None-Match, If-Range) names `etag`
    (strong, ours) or is "*": weak comparison ignores a W/ prefix, strong refuses it."""
    cdef const char *p = PyBytes_AS_STRING(header)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(header), pos = 0, start
    cdef Py_ssize_t m = PyBytes_GET_SIZE(etag)
    cdef const char *end
    cdef bint is_weak
    while pos < n:
        pos = skip_space(p, n, pos, True)
        if pos >= n:
            break
        if p[pos] == b'*':
            return True
        is_weak = pos + 1 < n and p[pos] == b'W' and p[pos + 1] == b'/'
        if is_weak:
            pos += 2
        start = pos
        if pos < n and p[pos] == b'"':
            end = <const char *>memchr(p + pos + 1, b'"', n - pos - 1)
            pos = (end - p + 1) if end != NULL else n
        else:
            while pos < n and p[pos] != b',':
                pos += 1
        if (weak or not is_weak) and pos - start == m and memcmp(p + start, PyBytes_AS_STRING(etag), m) == 0:
            return True
        while pos < n and p[pos] != b',':
            pos += 1
    return False


cdef inline int64_t range_number(const char *p, Py_ssize_t start, Py_ssize_t end) noexcept:
    """The decimal number p[start:end]; -1 when empty, not digits or too large."""
    cdef int64_t value = 0
    cdef Py_ssize_t i
    if start >= end or end - start > 18:
        return -1
    for i in range(start, end):
        if not (b'0' <= p[i] <= b'9'):
            return -1
        value = value * 10 + p[i] - ASCII_ZERO
    return value


cdef enum:
    RANGES_IGNORED = -1       # no valid Range: the whole file (200)
    RANGES_UNSATISFIABLE = -2  # valid, but none overlaps the file (416)


cdef Py_ssize_t parse_ranges(bytes header, int64_t size, int64_t *starts, int64_t *ends) noexcept:
    """The satisfiable ranges of a "bytes=..." Range value, clipped to the file, into
    starts/ends (end exclusive, at most MAX_RANGES): their count, or RANGES_IGNORED /
    RANGES_UNSATISFIABLE."""
    cdef const char *p = PyBytes_AS_STRING(header)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(header), pos, start, end, dash, count = 0, seen = 0
    cdef int64_t first, last
    if n < 6 or strncasecmp(p, b"bytes=", 6) != 0:
        return RANGES_IGNORED
    pos = 6
    while pos < n:
        pos = skip_space(p, n, pos, True)
        if pos >= n:
            break
        start = pos
        while pos < n and p[pos] != b',':
            pos += 1
        end = pos
        while end > start and (p[end - 1] == b' ' or p[end - 1] == b'\t'):
            end -= 1
        dash = start
        while dash < end and p[dash] != b'-':
            dash += 1
        if dash == end:
            return RANGES_IGNORED
        seen += 1
        if seen > MAX_RANGES:
            return RANGES_IGNORED
        if dash == start:  # "-N": the last N bytes
            last = range_number(p, dash + 1, end)
            if last < 0:
                return RANGES_IGNORED
            if last == 0 or size == 0:
                continue
            first = size - last if last < size else 0
            last = size
        else:
            first = range_number(p, start, dash)
            if first < 0:
                return RANGES_IGNORED
            if dash + 1 == end:
                last = size
            else:
                last = range_number(p, dash + 1, end)
                if last < first:
                    return RANGES_IGNORED
                last = last + 1 if last < size else size
            if first >= size:
                continue
        starts[count] = first
        ends[count] = last
        count += 1
    if seen == 0:
        return RANGES_IGNORED
    return count if count else RANGES_UNSATISFIABLE


@cython.final
cdef class Static(Filter):
    """A `static` route's handler: the route's last request_head filter; it always answers."""
    cdef bytes root               # no trailing "/"
    cdef bytes strip_prefix
    cdef tuple index
    cdef tuple try_files          # bytes entries, and an int for a last "=CODE"
    cdef tuple codings            # CODING_* of the precompressed suffixes, in preference order
    cdef tuple suffixes           # their file suffixes (b".zst", ...)
    cdef bytes cache_control
    cdef bint hidden
    cdef str follow_symlinks
    cdef dict mime_types
    cdef bytes default_type
    cdef bytes boundary_line      # "--<boundary>\r\n" of multipart/byteranges, random per worker
    cdef bytes multipart_type     # its Content-Type
    cdef bytes multipart_end      # and its closing boundary
    cdef ByteWriter writer        # builds range headers and part heads
    cdef dict cache               # path under root -> (OpenFile, DIRECTORY or None; when looked at)

    def __init__(self, handler):  # a config.runtime.Static
        self.root = handler.root
        self.strip_prefix = handler.strip_prefix
        self.index = handler.index
        self.try_files = tuple(int(e[1:]) if e.startswith(b"=") else e for e in handler.try_files)
        self.codings = tuple(SIBLING_CODINGS[s] for s in handler.precompressed)
        self.suffixes = tuple(b"." + s.encode() for s in handler.precompressed)
        self.cache_control = handler.cache_control
        self.hidden = handler.hidden
        self.follow_symlinks = handler.follow_symlinks
        self.mime_types = dict(handler.mime_types)
        self.default_type = handler.default_type
        boundary = os.urandom(12).hex().encode()
        self.boundary_line = b"--" + boundary + b"\r\n"
        self.multipart_type = b"multipart/byteranges; boundary=" + boundary
        self.multipart_end = b"\r\n--" + boundary + b"--\r\n"
        self.writer = ByteWriter(256)
        self.cache = {}

    cdef int request_head(self, Exchange ex) except -1:
        self.answer(ex)
        ex.client.core.metrics.static_response(ex.local_status)
        return FILTER_RESPOND

    cdef int answer(self, Exchange ex) except -1:
        """Answer the request (ex.respond or ex.respond_file)."""
        cdef bytes path
        if ex.method != b"GET" and not ex.is_head:
            ex.respond(405, ALLOW_GET_HEAD, METHOD_NOT_ALLOWED_BODY)
            return FILTER_RESPOND
        path = self.file_path(ex.path)
        if path is None:
            ex.respond(404, JSON_TYPE, NOT_FOUND_BODY)
            return FILTER_RESPOND
        if not self.try_files:
            return self.serve_path(ex, path, True)
        for entry in self.try_files:
            if type(entry) is int:
                ex.respond(<int>entry, JSON_TYPE, error_body(<int>entry, ex.request_id))
                return FILTER_RESPOND
            if (<bytes>entry).startswith(b"$uri"):
                entry = path + (<bytes>entry)[4:]
            if self.serve_path(ex, <bytes>entry, False) == FILTER_RESPOND:
                return FILTER_RESPOND
        ex.respond(404, JSON_TYPE, NOT_FOUND_BODY)
        return FILTER_RESPOND

    cdef bytes file_path(self, bytes path):
        """The request's path (normal form) as a path under root: the prefix stripped, its
        escapes decoded once. None when refused: an escape that decodes to "/", "\\" or NUL
        (a segment the router did not see), or a hidden name unless allowed."""
        cdef const unsigned char *p
        cdef Py_ssize_t n, i
        cdef int c
        cdef char byte
        cdef ByteWriter out = None
        if self.strip_prefix:
            path = path[PyBytes_GET_SIZE(self.strip_prefix):]
            if not path:
                path = b"/"
            elif not path.startswith(b"/"):
                return None  # "/filesx" on a route for "/files" is not under it
        p = <const unsigned char *>PyBytes_AS_STRING(path)
        n = PyBytes_GET_SIZE(path)
        i = 0
        while i < n:
            c = p[i]
            if c == b'%':
                c = escaped_byte(p, i, n)
                if c <= 0 or is_separator(c):
                    return None
                if out is None:
                    out = ByteWriter(n)
                    out.add_raw(<const char *>p, i)
                byte = <char>c
                out.add_raw(&byte, 1)
                i += 3
                continue
            if c == b'\\' or c == 0:
                return None
            if c == b'/' and i + 1 < n and p[i + 1] == b'.' and not self.hidden:
                return None  # ".git", ".env"; "." and ".." segments are gone already
            if out is not None:
                out.add_raw(<const char *>p + i, 1)
            i += 1
        if out is not None:
            path = out.take()
            if not self.hidden and b"/." in path:
                return None  # an escaped dot starting a name
        return path

    cdef int serve_path(self, Exchange ex, bytes path, bint last) except -1:
        """Answer with the file at `path` (under root), a directory's index file, or a
        redirect to the directory; FILTER_CONTINUE when there is nothing there and `last`
        is false (try_files goes on), else 404."""
        cdef double now = ex.client.core.now
        cdef object found = self.lookup(path, now)
        cdef bytes name
        cdef bytes location
        if found is DIRECTORY:
            if not path.endswith(b"/"):
                if not last:
                    return FILTER_CONTINUE  # "$uri/" tries it as a directory
                location = ex.path + b"/"
                ex.respond(301, ((b"Location", location),) + JSON_TYPE, error_body(301, ex.request_id))
                return FILTER_RESPOND
            for name in self.index:
                found = self.lookup(path + name, now)
                if found is not None and found is not DIRECTORY:
                    return self.serve(ex, <OpenFile>found)
            found = None
        elif found is not None and path.endswith(b"/"):
            found = None  # "file/" is not the file
        if found is not None:
            return self.serve(ex, <OpenFile>found)
        if not last:
            return FILTER_CONTINUE
        ex.respond(404, JSON_TYPE, NOT_FOUND_BODY)
        return FILTER_RESPOND

    cdef object lookup(self, bytes path, double now):
        """The OpenFile at `path` under root, DIRECTORY, or None: from the cache while its
        entry is less than FILE_CACHE_VALID old, else looked at again."""
        cdef tuple cached = self.cache.get(path)
        if cached is not None and now - <double>cached[1] < FILE_CACHE_VALID and not (
                isinstance(cached[0], OpenFile) and (<OpenFile>cached[0]).stale):
            return cached[0]
        found = self.open(path, cached[0] if cached is not None else None)
        if cached is None and len(self.cache) >= FILE_CACHE_ENTRIES:
            del self.cache[next(iter(self.cache))]  # the oldest entry
        self.cache[path] = (found, now)
        return found

    def open(self, bytes path, previous):
        """Look at the file again (once a second at most per path): the previous OpenFile
        when it is still the same file, a new one, DIRECTORY or None."""
        cdef OpenFile made
        full = self.root + path
        try:
            st = os.stat(full)
        except (OSError, ValueError):
            return None
        if not self.allowed(full):
            return None
        if stat_mode.S_ISDIR(st.st_mode):
            return DIRECTORY
        if not stat_mode.S_ISREG(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if isinstance(previous, OpenFile) and (<OpenFile>previous).key == key \
                and not (<OpenFile>previous).stale:
            (<OpenFile>previous).variants = self.siblings(full, st)
            return previous
        made = self.open_file(full, key, st)
        if made is None:
            return None
        made.content_type = self.media_type(path)
        made.variants = self.siblings(full, st)
        return made

    def allowed(self, full):
        """Symbolic links on the way to `full` as follow_symlinks says."""
        if self.follow_symlinks == "always":
            return True
        real = os.path.realpath(full)
        if self.follow_symlinks == "never":
            return real == os.path.normpath(full)
        return real == self.root or real.startswith(self.root + b"/")

    def open_file(self, full, key, st):
        cdef OpenFile made = OpenFile()
        try:
            made.fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            st = os.fstat(made.fd)
        except OSError:
            return None
        if not stat_mode.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key[:2]:
            return None  # replaced between the stat and the open: looked at again next time
        made.key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        made.size = st.st_size
        made.mtime = int(st.st_mtime)
        made.etag = b'"%x-%x"' % (made.mtime, made.size)
        made.last_modified = formatdate(made.mtime, usegmt=True).encode()
        return made

    def siblings(self, full, st):
        """The precompressed siblings of the file at `full`, not older than it."""
        found = []
        for coding, suffix in zip(self.codings, self.suffixes):
            try:
                sibling = os.stat(full + suffix)
            except (OSError, ValueError):
                continue
            if not stat_mode.S_ISREG(sibling.st_mode) or sibling.st_mtime_ns < st.st_mtime_ns \
                    or not self.allowed(full + suffix):
                continue
            made = self.open_file(full + suffix, (sibling.st_dev, sibling.st_ino), sibling)
            if made is not None:
                found.append((coding, made))
        return tuple(found)

    def media_type(self, bytes path):
        dot = path.rfind(b".")
        if dot <= path.rfind(b"/") + 1:  # no extension (a leading dot is not one)
            return self.default_type
        return self.mime_types.get(path[dot + 1:].lower(), self.default_type)

    cdef int serve(self, Exchange ex, OpenFile file) except -1:
        """The response for a file: conditionals (RFC 9110 13.2.2), then ranges."""
        cdef OpenFile sent = file
        cdef list headers
        cdef bytes value
        cdef int64_t since
        cdef int64_t starts[MAX_RANGES]
        cdef int64_t ends[MAX_RANGES]
        cdef Py_ssize_t count = RANGES_IGNORED, i
        cdef list parts
        cdef bytes prefix
        cdef int coding = -1
        cdef int q[ACCEPT_ENTRIES]
        cdef int best_q = 0, w
        if file.variants:
            value = ex.request_header(b"accept-encoding")
            if value is not None:
                accepted_codings(value, q)
                for entry in file.variants:
                    w = weight_of(q, <int>entry[0])
                    if w > best_q:
                        best_q = w
                        coding = <int>entry[0]
                        sent = <OpenFile>entry[1]
                # as compress negotiates: identity wins only when the client weighs it higher
                if coding >= 0 and identity_weight(q) > best_q:
                    coding = -1
                    sent = file
        headers = [(b"Content-Type", file.content_type), (b"Last-Modified", sent.last_modified),
                   (b"ETag", sent.etag)]
        if self.cache_control:
            headers.append((b"Cache-Control", self.cache_control))
        if file.variants:
            headers.append((b"Vary", VARY_ACCEPT_ENCODING))
        if coding >= 0:
            headers.append((b"Content-Encoding", <bytes>ENCODING_NAMES[coding]))
        value = ex.request_header(b"if-match")
        if value is not None:
            if not etag_matches(value, sent.etag, False):
                return self.precondition_failed(ex)
        else:
            value = ex.request_header(b"if-unmodified-since")
            if value is not None:
                since = http_date_seconds(value)
                if since >= 0 and sent.mtime > since:
                    return self.precondition_failed(ex)
        value = ex.request_header(b"if-none-match")
        if value is not None:
            if etag_matches(value, sent.etag, True):
                ex.respond(304, tuple(headers[1:]), b"")
                return FILTER_RESPOND
        else:
            value = ex.request_header(b"if-modified-since")
            if value is not None:
                since = http_date_seconds(value)
                if since >= 0 and sent.mtime <= since:
                    ex.respond(304, tuple(headers[1:]), b"")
                    return FILTER_RESPOND
        headers.append((b"Accept-Ranges", ACCEPT_RANGES))
        value = ex.request_header(b"range")
        if value is not None and not ex.is_head and self.range_applies(ex, sent):
            count = parse_ranges(value, sent.size, starts, ends)
        if count == RANGES_UNSATISFIABLE:
            headers.append((b"Content-Range", self.content_range(-1, 0, sent.size)))
            ex.respond(416, tuple(headers[1:]), b"")
            return FILTER_RESPOND
        if count == 1:
            headers.append((b"Content-Range", self.content_range(starts[0], ends[0], sent.size)))
            ex.respond_file(206, tuple(headers), FileBody.new(sent, [b"", starts[0], ends[0] - starts[0]], b""))
        elif count > 1:
            parts = []
            for i in range(count):
                prefix = self.part_head(i == 0, file.content_type,
                                        self.content_range(starts[i], ends[i], sent.size))
                parts += [prefix, starts[i], ends[i] - starts[i]]
            headers[0] = (b"Content-Type", self.multipart_type)
            ex.respond_file(206, tuple(headers), FileBody.new(sent, parts, self.multipart_end))
        else:
            ex.respond_file(200, tuple(headers), FileBody.new(sent, [b"", 0, sent.size], b""))
        return FILTER_RESPOND

    cdef bytes content_range(self, int64_t first, int64_t end, int64_t size):
        """A Content-Range value: "bytes first-(end-1)/size", or "bytes */size" when first < 0."""
        cdef ByteWriter out = self.writer
        out.clear()
        out.add(b"bytes ")
        if first < 0:
            out.add(b"*")
        else:
            out.add_decimal(first)
            out.add(b"-")
            out.add_decimal(end - 1)
        out.add(b"/")
        out.add_decimal(size)
        return out.take()

    cdef bytes part_head(self, bint first, bytes content_type, bytes content_range):
        """What goes before a part of a multipart/byteranges body: its boundary and head."""
        cdef ByteWriter out = self.writer
        out.clear()
        out.add(self.boundary_line if first else b"\r\n" + self.boundary_line)
        out.add(b"Content-Type: ")
        out.add(content_type)
        out.add(b"\r\nContent-Range: ")
        out.add(content_range)
        out.add(b"\r\n\r\n")
        return out.take()

    cdef bint range_applies(self, Exchange ex, OpenFile sent):
        """If-Range: the Range is for this representation (a strong ETag equal to ours, or
        our Last-Modified date exactly); without it, always."""
        cdef bytes value = ex.request_header(b"if-range")
        if value is None:
            return True
        if value.startswith(b'"'):
            return value == sent.etag
        return http_date_seconds(value) == sent.mtime

    cdef int precondition_failed(self, Exchange ex) except -1:
        ex.respond(412, JSON_TYPE, PRECONDITION_FAILED_BODY)
        return FILTER_RESPOND


HANDLER_CLASSES["static"] = Static
