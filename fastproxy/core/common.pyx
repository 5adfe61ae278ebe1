# Shared by every part of the core: clock, header classification, status lines,
# request ids, error bodies. Included first by _core.pyx.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcpy

cdef extern from "string.h":
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen) nogil
from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.dlfcn cimport dlopen, dlsym, RTLD_NOW, RTLD_LOCAL

import os
import time
from email.utils import formatdate

from httptools import HttpRequestParser, HttpResponseParser
from httptools import HttpParserError, HttpParserCallbackError, HttpParserUpgrade

cdef extern from "strings.h":
    int strncasecmp(const char *s1, const char *s2, size_t n)


# llhttp's state, read and written through httptools' parser object. httptools raises
# HttpParserCallbackError when a callback raises, but does not say where in the fed bytes
# parsing stopped; llhttp records it (error_pos). And httptools' response parser cannot be
# told that a response has no body (the answer to a HEAD); llhttp can, by its F_SKIPBODY
# flag set in on_headers_complete. httptools keeps that state behind the first field of its
# parser object. The layout is llhttp 9's (httptools 0.6 and later bundle it) and is checked
# once at import (check_parser_layout), so an httptools that laid it out differently fails
# loudly at start instead of reading or writing the wrong memory.
cdef extern from *:
    """
    #include <stdint.h>
    typedef struct {            /* the head of llhttp_t (llhttp.h, llhttp 9) */
        int32_t index_;
        void *span_pos0_;
        void *span_cb0_;
        int32_t error;
        const char *reason;
        const char *error_pos;
        void *data;             /* httptools points it back at its parser object */
        void *current_;
        uint64_t content_length;
        uint8_t type;
        uint8_t method;
        uint8_t http_major;
        uint8_t http_minor;
        uint8_t header_state;
        uint16_t lenient_flags; /* uint8_t before llhttp 9 */
        uint8_t upgrade;
        uint8_t finish;
        uint16_t flags;
        uint16_t status_code;
    } fp_llhttp_head;
    typedef struct {            /* an httptools HttpParser: a Cython object with a vtable */
        PyObject_HEAD
        void *vtab_;
        fp_llhttp_head *cparser;
    } fp_httptools_parser;
    enum {                      /* llhttp_flags, unchanged since llhttp 2 */
        FP_F_CONTENT_LENGTH = 0x20,
        FP_F_SKIPBODY = 0x40
    };
    """
    ctypedef struct fp_llhttp_head:
        const char *error_pos
        void *data
        uint64_t content_length
        uint8_t http_major
        uint8_t http_minor
        uint16_t flags
        uint16_t status_code
    ctypedef struct fp_httptools_parser:
        fp_llhttp_head *cparser
    enum:
        FP_F_CONTENT_LENGTH
        FP_F_SKIPBODY


cdef inline fp_llhttp_head *llhttp_state(object parser) noexcept:
    return (<fp_httptools_parser *><PyObject *>parser).cparser


cdef Py_ssize_t stopped_at(object parser, bytes data) noexcept:
    """Offset in `data` (the bytes last fed to `parser`) where a callback stopped it."""
    return llhttp_state(parser).error_pos - PyBytes_AS_STRING(data)


cdef inline bint is_http_1x(object parser, int minor) noexcept:
    """The message being parsed is HTTP/1.`minor`: read from llhttp's state, not through
    get_http_version(), which builds a string."""
    cdef fp_llhttp_head *state = llhttp_state(parser)
    return state.http_major == 1 and state.http_minor == minor


cdef inline void skip_body(object parser) noexcept:
    """From a response parser's on_headers_complete: the response has no body whatever its
    head says; llhttp completes the message after the head, and the next begins there."""
    llhttp_state(parser).flags |= FP_F_SKIPBODY


class _LayoutProbe:
    """Parses a response that skip_body cuts short, then one that it does not, checking in
    on_headers_complete that llhttp's fields are where llhttp_state reads them."""

    def __init__(self):
        self.parser = HttpResponseParser(self)
        self.seen = []

    def on_headers_complete(self):
        cdef fp_llhttp_head *state = llhttp_state(self.parser)
        first = not self.seen
        self.seen.append(
            state.data == <void *>self.parser
            and state.status_code == self.parser.get_status_code()
            and is_http_1x(self.parser, 1 if first else 0)
            and state.content_length == (7 if first else 2)
            and state.flags & (FP_F_CONTENT_LENGTH | FP_F_SKIPBODY) == FP_F_CONTENT_LENGTH)
        if first:
            skip_body(self.parser)

    def on_body(self, body):
        self.seen.append(body)

    def on_message_complete(self):
        self.seen.append("end")


cdef check_parser_layout():
    probe = _LayoutProbe()
    try:
        probe.parser.feed_data(b"HTTP/1.1 299 X\r\nContent-Length: 7\r\n\r\n"
                               b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except HttpParserError:
        pass  # a flag written at the wrong place: told below
    if probe.seen != [True, "end", True, b"ok", "end"]:
        raise ImportError("fastproxy does not know this httptools version's parser layout")


check_parser_layout()


# llhttp_reset, from the llhttp that httptools' extension bundles (it exports it): a request
# parser is reused for the next connection of a worker (ClientConnection.forget) instead of
# building a new one, which costs a parser object, llhttp's state and settings and one bound
# method per callback. NULL if it cannot be found or does not do what it should
# (check_parser_reset): connections then get new parsers.
ctypedef void (*llhttp_reset_fn)(fp_llhttp_head *parser) noexcept nogil
cdef llhttp_reset_fn llhttp_reset = NULL


class _ResetProbe:
    def __init__(self):
        self.parser = HttpRequestParser(self)
        self.urls = []

    def on_url(self, url):
        self.urls.append(url)


cdef check_parser_reset():
    """Find llhttp_reset and check that a parser left closed by a Connection: close request
    parses a new request after it."""
    global llhttp_reset
    import httptools.parser.parser as module
    cdef void *lib = dlopen(module.__file__.encode(), RTLD_NOW | RTLD_LOCAL)
    cdef llhttp_reset_fn reset = NULL
    if lib != NULL:
        reset = <llhttp_reset_fn>dlsym(lib, b"llhttp_reset")
    if reset == NULL:
        return
    probe = _ResetProbe()
    try:
        probe.parser.feed_data(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
        reset(llhttp_state(probe.parser))
        probe.parser.feed_data(b"GET /b HTTP/1.1\r\n\r\n")
    except HttpParserError:
        return
    if probe.urls == [b"/a", b"/b"] and llhttp_state(probe.parser).data == <void *>probe.parser:
        llhttp_reset = reset


check_parser_reset()


cdef inline double monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Header kinds: the headers the proxy itself acts on. Everything else is H_OTHER
# and forwarded untouched.
cdef enum:
    H_OTHER = 0
    H_HOST
    H_CONTENT_LENGTH
    H_TRANSFER_ENCODING
    H_CONNECTION
    H_KEEP_ALIVE
    H_PROXY_CONNECTION
    H_TE
    H_TRAILER
    H_UPGRADE
    H_EXPECT
    H_X_REQUEST_ID
    H_X_FORWARDED_FOR
    H_X_FORWARDED_PROTO
    H_X_FORWARDED_HOST
    H_SERVER
    H_DATE
    H_USER_AGENT
    H_REFERER
    H_X_CLIENT_CERT  # -Subject and -Fingerprint: only a TLS listener's verification sets them


cdef inline bint name_is(const char *name, Py_ssize_t n, const char *lower, Py_ssize_t m) noexcept:
    """Case-insensitive equality with `lower`, made of lower-case letters and '-'. Setting
    bit 0x20 maps only A-Z onto a-z, and only CR (never inside a parsed header) onto '-'."""
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(m):
        if (name[i] | 0x20) != lower[i]:
            return False
    return True


cdef inline int header_kind(bytes name) noexcept:
    return header_kind_at(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


cdef int header_kind_at(const char *p, Py_ssize_t n) noexcept:
    """Classify a header name without allocating (case-insensitive, by length first)."""
    if n == 2:
        return H_TE if name_is(p, n, b"te", 2) else H_OTHER
    if n == 4:
        if name_is(p, n, b"host", 4):
            return H_HOST
        return H_DATE if name_is(p, n, b"date", 4) else H_OTHER
    if n == 6:
        if name_is(p, n, b"expect", 6):
            return H_EXPECT
        return H_SERVER if name_is(p, n, b"server", 6) else H_OTHER
    if n == 7:
        if name_is(p, n, b"upgrade", 7):
            return H_UPGRADE
        if name_is(p, n, b"trailer", 7):
            return H_TRAILER
        return H_REFERER if name_is(p, n, b"referer", 7) else H_OTHER
    if n == 10:
        if name_is(p, n, b"connection", 10):
            return H_CONNECTION
        if name_is(p, n, b"keep-alive", 10):
            return H_KEEP_ALIVE
        return H_USER_AGENT if name_is(p, n, b"user-agent", 10) else H_OTHER
    if n == 12:
        return H_X_REQUEST_ID if name_is(p, n, b"x-request-id", 12) else H_OTHER
    if n == 14:
        return H_CONTENT_LENGTH if name_is(p, n, b"content-length", 14) else H_OTHER
    if n == 15:
        return H_X_FORWARDED_FOR if name_is(p, n, b"x-forwarded-for", 15) else H_OTHER
    if n == 16:
        if name_is(p, n, b"proxy-connection", 16):
            return H_PROXY_CONNECTION
        return H_X_FORWARDED_HOST if name_is(p, n, b"x-forwarded-host", 16) else H_OTHER
    if n == 17:
        if name_is(p, n, b"transfer-encoding", 17):
            return H_TRANSFER_ENCODING
        return H_X_FORWARDED_PROTO if name_is(p, n, b"x-forwarded-proto", 17) else H_OTHER
    if n == 21:
        return H_X_CLIENT_CERT if name_is(p, n, b"x-client-cert-subject", 21) else H_OTHER
    if n == 25:
        return H_X_CLIENT_CERT if name_is(p, n, b"x-client-cert-fingerprint", 25) else H_OTHER
    return H_OTHER


cdef bint listed(const char *name, Py_ssize_t n, tuple lower_names) noexcept:
    """Whether the n bytes at `name` are one of `lower_names` (lower-case) ignoring case,
    without allocating."""
    cdef Py_ssize_t i
    cdef bytes lower
    for i in range(len(lower_names)):
        lower = <bytes>lower_names[i]
        if PyBytes_GET_SIZE(lower) == n and strncasecmp(name, PyBytes_AS_STRING(lower), n) == 0:
            return True
    return False


cdef inline bint name_listed(bytes name, tuple lower_names) noexcept:
    return listed(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), lower_names)


cdef inline bint ends_with_chunked(const char *p, Py_ssize_t n) noexcept:
    """True when the last transfer coding of a Transfer-Encoding value is chunked."""
    while n > 0 and (p[n - 1] == b' ' or p[n - 1] == b'\t'):
        n -= 1
    return n >= 7 and strncasecmp(p + n - 7, b"chunked", 7) == 0 and (
        n == 7 or p[n - 8] == b',' or p[n - 8] == b' ' or p[n - 8] == b'\t')


cdef inline bint plain_connection(const char *p, Py_ssize_t n) noexcept:
    """A Connection value of just keep-alive or close: the usual one, and it names no header."""
    return name_is(p, n, b"keep-alive", 10) or name_is(p, n, b"close", 5)


cdef bint plain_connection_value(bytes value) noexcept:
    """plain_connection for a whole header value as httptools gives it: llhttp drops the
    whitespace before it, not after."""
    cdef const char *p = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    while n > 0 and (p[0] == b' ' or p[0] == b'\t'):
        p += 1
        n -= 1
    while n > 0 and (p[n - 1] == b' ' or p[n - 1] == b'\t'):
        n -= 1
    return plain_connection(p, n)


cdef list connection_tokens(bytes value):
    """Lower-cased tokens of a Connection header."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


cdef frozenset hop_by_hop_names(list tokens):
    """Header names a Connection header lists (hop-by-hop for this message), or None."""
    names = frozenset(tokens) - CONNECTION_OPTIONS
    return names if names else None


cdef inline frozenset union(frozenset a, frozenset b):
    """a | b where None stands for the empty set (several Connection headers)."""
    if a is None:
        return b
    return a if b is None else a | b


cdef inline object joined(object first, object more):
    """first + more, where None stands for nothing yet (tuples or bytes)."""
    return more if first is None else first + more


cdef frozenset CONNECTION_OPTIONS = frozenset([b"close", b"keep-alive", b"upgrade"])


REASONS = {
    100: "Continue", 101: "Switching Protocols", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information",
    204: "No Content", 205: "Reset Content", 206: "Partial Content",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 421: "Misdirected Request", 422: "Unprocessable Content",
    425: "Too Early", 426: "Upgrade Required", 428: "Precondition Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

# Status lines pre-encoded once at import: index = status code.
cdef list STATUS_LINES = [None] * 600
for _code in range(100, 600):
    STATUS_LINES[_code] = ("HTTP/1.1 %d %s\r\n" % (_code, REASONS.get(_code, "Unknown"))).encode()


cdef inline bytes status_line(int code):
    if 100 <= code < 600:
        return <bytes>STATUS_LINES[code]
    return b"HTTP/1.1 %d Unknown\r\n" % code


# Buffering toward an upstream before the client is paused: one event-loop read is up to
# 256 KiB, so a lower mark would pause and resume the client on every read.
cdef Py_ssize_t WRITE_HIGH_WATER = 256 * 1024
cdef Py_ssize_t WRITE_LOW_WATER = 64 * 1024
# Buffering toward a client: what a client that stops reading holds in the worker, with at
# most one BODY_READ_MAX read on top (see UpstreamConnection.read_body_into_buffer).
cdef Py_ssize_t CLIENT_HIGH_WATER = 64 * 1024
cdef Py_ssize_t CLIENT_LOW_WATER = 16 * 1024
# Reads of a response body that spans several reads: the worker's one read buffer, in pieces
# no larger than what the client's socket and write buffer have room for (at least BODY_READ_MIN).
cdef Py_ssize_t BODY_READ_MAX = 256 * 1024
cdef Py_ssize_t BODY_READ_MIN = 16 * 1024
# A response body longer than one plain read switches to those reads.
cdef Py_ssize_t LONG_BODY = 256 * 1024

from posix.ioctl cimport ioctl
cdef extern from "<sys/ioctl.h>":
    enum: TIOCOUTQ  # bytes in a TCP socket's send queue, not yet acknowledged by the peer
cdef extern from "sys/socket.h":
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void *value, socklen_t *length) nogil
    enum: SOL_SOCKET, SO_SNDBUF


cdef int socket_queued(int fd) noexcept:
    """Bytes in socket `fd`'s kernel send queue (0 when unknown)."""
    cdef int queued = 0
    if ioctl(fd, TIOCOUTQ, &queued) != 0:
        return 0
    return queued


cdef int socket_send_capacity(int fd) noexcept:
    """About how many bytes of data socket `fd`'s kernel send buffer holds (0 when unknown):
    SO_SNDBUF less an eighth for the kernel's own overhead per segment (a full loopback
    socket stops taking data at about 91 % of it). The kernel may grow it as it sends."""
    cdef int size = 0
    cdef socklen_t length = sizeof(size)
    if getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &length) != 0:
        return 0
    return size - (size >> 3)


cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


cdef const char *HEX_DIGITS = b"0123456789abcdef"
cdef const char *HEX_UPPER = b"0123456789ABCDEF"


@cython.final
cdef class RequestIds:
    """32 hex digits: a random per-worker prefix and a counter (unique, no syscall)."""
    cdef char prefix[17]
    cdef uint64_t counter

    def __cinit__(self):
        cdef bytes rnd = os.urandom(8).hex().encode()
        memcpy(self.prefix, PyBytes_AS_STRING(rnd), 16)
        self.prefix[16] = 0
        self.counter = 0

    cdef bytes next(self):
        cdef char buf[32]
        cdef uint64_t value
        cdef int i
        self.counter += 1
        value = self.counter
        memcpy(buf, self.prefix, 16)
        for i in range(31, 15, -1):
            buf[i] = HEX_DIGITS[value & 15]
            value >>= 4
        return PyBytes_FromStringAndSize(buf, 32)


cdef inline Py_ssize_t find_byte(bytes data, char c, Py_ssize_t start) noexcept:
    """Index of c in data[start:], or -1 (bytes.find without the method-call overhead)."""
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef const char *hit = <const char *>memchr(p + start, c, PyBytes_GET_SIZE(data) - start)
    return -1 if hit == NULL else hit - p


cdef inline Py_ssize_t find_crlfcrlf(bytes data, Py_ssize_t start) noexcept:
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef const char *hit = <const char *>memmem(p + start, PyBytes_GET_SIZE(data) - start, b"\r\n\r\n", 4)
    return -1 if hit == NULL else hit - p


cdef inline bytes chunk_header(Py_ssize_t size):
    cdef char buf[24]
    cdef int n = snprintf(buf, sizeof(buf), "%zx\r\n", size)
    return PyBytes_FromStringAndSize(buf, n)


cdef enum:
    ASCII_ZERO = 48  # '0'


cdef inline int write_digits(char *end, uint64_t value) noexcept:
    """Write value's decimal digits so that they end just before `end`; return how many."""
    cdef int n = 0
    while True:
        n += 1
        end[-n] = <char>(ASCII_ZERO + value % 10)
        value //= 10
        if value == 0:
            return n


@cython.final
cdef class ByteWriter:
    """A growable C buffer a message is built in: each piece is copied once and the
    result is one bytes object, with no list of pieces and no join. Single-threaded
    and reused: the worker builds every head in one, the access log buffers in another."""
    cdef char *data
    cdef Py_ssize_t size, capacity

    def __cinit__(self, Py_ssize_t capacity):
        self.data = <char *>PyMem_Malloc(capacity)
        if self.data == NULL:
            raise MemoryError()
        self.capacity = capacity

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef inline void clear(self) noexcept:
        """Start a new message (whatever a failed build left behind is dropped)."""
        self.size = 0

    cdef int grow(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t capacity = max(self.capacity * 2, self.size + need)
        cdef char *data = <char *>PyMem_Realloc(self.data, capacity)
        if data == NULL:
            raise MemoryError()
        self.data = data
        self.capacity = capacity
        return 0

    cdef inline int add_raw(self, const char *p, Py_ssize_t n) except -1:
        if self.size + n > self.capacity:
            self.grow(n)
        memcpy(self.data + self.size, p, n)
        self.size += n
        return 0

    cdef inline int add(self, bytes piece) except -1:
        return self.add_raw(PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))

    cdef inline int add_decimal(self, Py_ssize_t value) except -1:
        cdef char buf[24]
        cdef int n = write_digits(buf + 24, <uint64_t>value if value > 0 else 0)
        return self.add_raw(buf + 24 - n, n)

    cdef bytes take(self):
        """What was built since the last take(); the buffer starts over."""
        cdef bytes out = PyBytes_FromStringAndSize(self.data, self.size)
        self.size = 0
        return out


cdef Py_ssize_t parse_length(const char *p, Py_ssize_t n) noexcept:
    """A Content-Length value llhttp has accepted (digits only); saturates instead of overflowing."""
    cdef Py_ssize_t value = 0, i
    for i in range(n):
        if value > (<Py_ssize_t>1 << 56):
            return value
        value = value * 10 + (p[i] - ASCII_ZERO)
    return value


cdef inline bint valid_request_id(bytes value) noexcept:
    """A client's X-Request-ID is kept only if it is short and plain (it ends up in logs)."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    if n == 0 or n > 200:
        return False
    for i in range(n):
        if p[i] <= 32 or p[i] >= 127 or p[i] == b'"' or p[i] == b'\\':
            return False
    return True


cdef inline bint valid_host(bytes value) noexcept:
    """Not empty, and RFC 3986 host[:port] characters only (no spaces, controls, '/', '@', ...)."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef unsigned char c
    if n == 0:
        return False
    for i in range(n):
        c = p[i]
        if not (b'a' <= c <= b'z' or b'A' <= c <= b'Z' or b'0' <= c <= b'9' or c == b'-'
                or c == b'.' or c == b':' or c == b'[' or c == b']' or c == b'_' or c == b'~'
                or c == b'%' or c == b'!' or c == b'$' or c == b'&' or c == b"'" or c == b'('
                or c == b')' or c == b'*' or c == b'+' or c == b',' or c == b';' or c == b'='):
            return False
    return True


ERROR_NAMES = {
    400: "bad request", 404: "not found", 405: "method not allowed", 408: "request timeout",
    413: "content too large", 414: "uri too long", 417: "expectation failed",
    431: "request header fields too large", 500: "internal server error",
    501: "not implemented", 502: "bad gateway", 503: "service unavailable",
    504: "gateway timeout", 505: "http version not supported",
}


cdef bytes error_body(int status, bytes request_id, str error=None):
    """The JSON body of a local error answer; `error` (plain text, no quote) replaces the
    status's name when the answer says more precisely why."""
    return b'{"status":%d,"error":"%s","request_id":"%s"}\n' % (
        status, (error or ERROR_NAMES.get(status, "error")).encode(), request_id)


def http_date():
    return formatdate(usegmt=True).encode()
