# Access log: one line per request, formatted from bytes already at hand and appended
# to a buffer that is written when full or on the worker's periodic tick, so a busy
# worker does not pay one write(2) per request.

cdef enum:
    LOG_COMBINED = 1
    LOG_JSON = 2


cdef bytes escape_combined(bytes value):
    """Quote-safe for the combined format: '"', '\\' and non-printables as \\xHH."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c < 32 or c >= 127 or c == b'"' or c == b'\\':
            break
    else:
        return value
    out = bytearray()
    for i in range(n):
        c = p[i]
        if c < 32 or c >= 127 or c == b'"' or c == b'\\':
            out += b"\\x%02X" % c
        else:
            out.append(c)
    return bytes(out)


cdef bytes escape_json(bytes value):
    """A JSON string body; bytes outside printable ASCII become \\u00XX so the line is valid UTF-8."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c < 32 or c >= 127 or c == b'"' or c == b'\\':
            break
    else:
        return value
    out = bytearray()
    for i in range(n):
        c = p[i]
        if c == b'"' or c == b'\\':
            out.append(b'\\')
            out.append(c)
        elif c < 32 or c >= 127:
            out += b"\\u%04x" % c
        else:
            out.append(c)
    return bytes(out)


cdef inline bytes seconds3(double value):
    cdef char buf[32]
    cdef int n
    if value < 0:
        return b"-"
    n = snprintf(buf, sizeof(buf), "%.3f", value)
    return PyBytes_FromStringAndSize(buf, n)


cdef class AccessLog:
    cdef int fd
    cdef str path
    cdef int fmt
    cdef bytearray buf
    cdef Py_ssize_t limit
    cdef bytes time_local   # "26/Nov/2026:19:55:00 +0000", refreshed by tick()
    cdef bytes time_iso     # "2026-11-26T19:55:00+00:00"

    def __init__(self, str path, str fmt, Py_ssize_t buffer_size):
        self.path = path
        self.fmt = LOG_JSON if fmt == "json" else LOG_COMBINED
        self.buf = bytearray()
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
        cdef Py_ssize_t done = 0, n = len(self.buf)
        if n == 0 or self.fd < 0:
            return
        view = memoryview(self.buf)
        try:
            while done < n:
                done += os.write(self.fd, view[done:])
        except OSError:
            pass  # a full disk or closed stdout must not take the worker down
        finally:
            view.release()
            del self.buf[:]

    cdef void write(self, Exchange ex, bytes client_addr, int status, double total) except *:
        cdef bytes up_addr = ex.upstream_addr if ex.upstream_addr is not None else b"-"
        cdef bytes up_time = seconds3(ex.upstream_time)
        cdef bytes method = ex.method if ex.method is not None else b"-"
        cdef bytes url = ex.url if ex.url is not None else b"-"
        if self.fmt == LOG_COMBINED:
            self.buf += b'%s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s" "%s" %s %s %s\n' % (
                client_addr, self.time_local, escape_combined(method), escape_combined(url),
                b"1.1" if ex.http11 else b"1.0", status, ex.bytes_out,
                escape_combined(ex.referer) if ex.referer is not None else b"-",
                escape_combined(ex.user_agent) if ex.user_agent is not None else b"-",
                ex.request_id, up_addr, up_time, seconds3(total))
        else:
            self.buf += (
                b'{"time":"%s","remote_addr":"%s","request_id":"%s","method":"%s","uri":"%s",'
                b'"protocol":"HTTP/%s","status":%d,"bytes_sent":%d,"bytes_received":%d,'
                b'"referer":"%s","user_agent":"%s","route":"%s","upstream_addr":"%s",'
                b'"upstream_time":%s,"request_time":%s}\n') % (
                self.time_iso, client_addr, ex.request_id, escape_json(method),
                escape_json(url), b"1.1" if ex.http11 else b"1.0", status, ex.bytes_out,
                ex.bytes_in, escape_json(ex.referer) if ex.referer is not None else b"",
                escape_json(ex.user_agent) if ex.user_agent is not None else b"",
                ex.route.name.encode() if ex.route is not None else b"",
                up_addr if ex.upstream_addr is not None else b"",
                up_time if ex.upstream_time >= 0 else b"null", seconds3(total))
        if len(self.buf) >= self.limit:
            self.flush()
