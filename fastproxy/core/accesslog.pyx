# Access log: one line per request, written from bytes already at hand straight into a
# buffer that is written out when full or on the worker's periodic tick, so a busy
# worker does not pay one write(2) per request, nor a list and a join per line.

from posix.unistd cimport write as c_write
from libc.errno cimport errno, EINTR

cdef enum:
    LOG_COMBINED = 1
    LOG_JSON = 2


# A value the client chose (target, Referer, User-Agent) is logged up to this many bytes,
# then cut and marked with "…" (U+2026). Escaping turns every byte >= 0x80 into \\xHH or
# \\u00hh, so the marker cannot come from the client: a cut value is never mistaken for a
# whole one, and a 64 KiB target cannot make a 64 KiB line.
cdef Py_ssize_t LOG_FIELD_CAP = 2048
cdef bytes CUT_COMBINED = "\u2026".encode()   # the line is UTF-8: the marker as such
cdef bytes CUT_JSON = b"\\u2026"


cdef inline bint needs_escape(unsigned char c) noexcept:
    return c < 32 or c >= 127 or c == b'"' or c == b'\\'


cdef int add_field(ByteWriter out, bytes value, int fmt) except -1:
    """A client's value, escaped, cut at LOG_FIELD_CAP bytes (see there)."""
    if PyBytes_GET_SIZE(value) <= LOG_FIELD_CAP:
        return add_escaped(out, value, PyBytes_GET_SIZE(value), fmt)
    add_escaped(out, value, LOG_FIELD_CAP, fmt)
    return out.add(CUT_JSON if fmt == LOG_JSON else CUT_COMBINED)


cdef str log_text(bytes value):
    """A client's value for an error-log line: escaped and cut as in the combined format."""
    cdef ByteWriter out
    if value is None:
        return "-"
    out = ByteWriter(min(PyBytes_GET_SIZE(value), LOG_FIELD_CAP) * 4 + 8)
    add_field(out, value, LOG_COMBINED)
    return out.take().decode()


cdef int add_escaped(ByteWriter out, bytes value, Py_ssize_t n, int fmt) except -1:
    """Append value[:n] with '"', '\\' and non-printable bytes escaped: as \\xHH in the
    combined format; as \\" \\\\ and \\u00hh in JSON, so the line is valid UTF-8 either way."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t i, plain_from = 0
    cdef unsigned char c
    cdef char esc[6]
    cdef int k
    for i in range(n):
        c = p[i]
        if not needs_escape(c):
            continue
        out.add_raw(<const char *>p + plain_from, i - plain_from)
        plain_from = i + 1
        esc[0] = b'\\'
        if fmt == LOG_COMBINED:
            esc[1] = b'x'
            esc[2] = HEX_UPPER[c >> 4]
            esc[3] = HEX_UPPER[c & 15]
            k = 4
        elif c == b'"' or c == b'\\':
            esc[1] = <char>c
            k = 2
        else:
            esc[1] = b'u'
            esc[2] = esc[3] = ASCII_ZERO
            esc[4] = HEX_DIGITS[c >> 4]
            esc[5] = HEX_DIGITS[c & 15]
            k = 6
        out.add_raw(esc, k)
    return out.add_raw(<const char *>p + plain_from, n - plain_from)


def escape_json(bytes value):
    """A JSON string body for value (route names in the log, once per reload)."""
    cdef ByteWriter out = ByteWriter(max(16, len(value) * 6))
    add_escaped(out, value, len(value), LOG_JSON)
    return out.take()


cdef inline bytes request_target(Exchange ex):
    """The target as the client sent it (`url` may hold the normalised one sent upstream)."""
    if ex.received_url is not None:
        return ex.received_url
    return ex.url if ex.url is not None else b"-"


cdef int add_seconds3(ByteWriter out, double value, bytes absent) except -1:
    """Seconds with millisecond precision ("0.004"); `absent` for a negative value (none)."""
    cdef char buf[32]
    cdef uint64_t ms
    cdef int n
    if value < 0:
        return out.add(absent)
    ms = <uint64_t>(value * 1000.0 + 0.5)
    buf[31] = <char>(ASCII_ZERO + ms % 10)
    buf[30] = <char>(ASCII_ZERO + ms // 10 % 10)
    buf[29] = <char>(ASCII_ZERO + ms // 100 % 10)
    buf[28] = b'.'
    n = write_digits(buf + 28, ms // 1000) + 4
    return out.add_raw(buf + 32 - n, n)


@cython.final
cdef class AccessLog:
    cdef int fd
    cdef str path
    cdef int fmt
    cdef ByteWriter buf
    cdef Py_ssize_t limit
    cdef bytes time_local   # "26/Nov/2026:19:55:00 +0000", refreshed by tick()
    cdef bytes time_iso     # "2026-11-26T19:55:00+00:00"

    def __init__(self, str path, str fmt, Py_ssize_t buffer_size):
        self.path = path
        self.fmt = LOG_JSON if fmt == "json" else LOG_COMBINED
        self.buf = ByteWriter(buffer_size + 4096)
        self.limit = buffer_size
        self.fd = -1
        self.reopen()
        self.tick()

    def reopen(self):
        """Called at start and on USR1 (logrotate): write what is buffered, then reopen by name."""
        self.flush()
        if self.path == "stdout":
            self.fd = 1
            return
        new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self.fd > 2:
            os.close(self.fd)
        self.fd = new_fd

    def tick(self):
        now = time.time()
        self.time_local = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now)).encode()
        self.time_iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)).encode()

    def flush(self):
        cdef ByteWriter buf = self.buf
        cdef Py_ssize_t done = 0, n
        if self.fd >= 0:
            while done < buf.size:
                n = c_write(self.fd, buf.data + done, buf.size - done)
                if n < 0:
                    if errno == EINTR:
                        continue
                    break  # a full disk or closed stdout must not take the worker down
                done += n
        buf.clear()

    cdef int write(self, Exchange ex, bytes client_addr, int status, double total) except -1:
        cdef ByteWriter out = self.buf
        if self.fmt == LOG_COMBINED:
            out.add(client_addr)
            out.add(b" - - [")
            out.add(self.time_local)
            out.add(b'] "')
            add_field(out, ex.method if ex.method is not None else b"-", LOG_COMBINED)
            out.add(b" ")
            add_field(out, request_target(ex), LOG_COMBINED)
            if ex.protocol is not None:
                out.add(b" ")
                out.add(ex.protocol)
                out.add(b'" ')
            else:
                out.add(b" HTTP/1.1\" " if ex.http11 else b" HTTP/1.0\" ")
            out.add_decimal(status)
            out.add(b" ")
            out.add_decimal(ex.bytes_out)
            out.add(b' "')
            add_field(out, ex.referer if ex.referer is not None else b"-", LOG_COMBINED)
            out.add(b'" "')
            add_field(out, ex.user_agent if ex.user_agent is not None else b"-", LOG_COMBINED)
            out.add(b'" "')
            out.add(ex.request_id)
            out.add(b'" ')
            out.add(ex.upstream_addr if ex.upstream_addr is not None else b"-")
            out.add(b" ")
            add_seconds3(out, ex.upstream_time, b"-")
            out.add(b" ")
            add_seconds3(out, total, b"-")
            out.add(b"\n")
        else:
            out.add(b'{"time":"')
            out.add(self.time_iso)
            out.add(b'","remote_addr":"')
            out.add(client_addr)
            out.add(b'","request_id":"')
            out.add(ex.request_id)
            out.add(b'","method":"')
            add_field(out, ex.method if ex.method is not None else b"-", LOG_JSON)
            out.add(b'","uri":"')
            add_field(out, request_target(ex), LOG_JSON)
            if ex.protocol is not None:
                out.add(b'","protocol":"')
                out.add(ex.protocol)
                out.add(b'","status":')
            else:
                out.add(b'","protocol":"HTTP/1.1","status":' if ex.http11
                        else b'","protocol":"HTTP/1.0","status":')
            out.add_decimal(status)
            out.add(b',"bytes_sent":')
            out.add_decimal(ex.bytes_out)
            out.add(b',"bytes_received":')
            out.add_decimal(ex.bytes_in)
            out.add(b',"referer":"')
            if ex.referer is not None:
                add_field(out, ex.referer, LOG_JSON)
            out.add(b'","user_agent":"')
            if ex.user_agent is not None:
                add_field(out, ex.user_agent, LOG_JSON)
            out.add(b'","route":"')
            if ex.route is not None:
                out.add(ex.route.log_name)
            out.add(b'","upstream_addr":"')
            if ex.upstream_addr is not None:
                out.add(ex.upstream_addr)
            out.add(b'","upstream_time":')
            add_seconds3(out, ex.upstream_time, b"null")
            out.add(b',"request_time":')
            add_seconds3(out, total, b"-")
            if ex.client.tls_version is not None:
                out.add(b',"tls_protocol":"')
                out.add(ex.client.tls_version)
                out.add(b'","tls_cipher":"')
                out.add(ex.client.tls_cipher)
                out.add(b'"}\n')
            else:
                out.add(b"}\n")
        if out.size >= self.limit:
            self.flush()
        return 0
