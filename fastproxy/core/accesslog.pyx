# Access log: one line per request, formatted from bytes already at hand and appended
# to a buffer that is written when full or on the worker's periodic tick, so a busy
# worker does not pay one write(2) per request.

cdef enum:
    LOG_COMBINED = 1
    LOG_JSON = 2


cdef inline bint needs_escape(unsigned char c) noexcept:
    return c < 32 or c >= 127 or c == b'"' or c == b'\\'


cdef bint is_plain(bytes value) noexcept:
    """No byte of value needs escaping in either format (the common case: no copy)."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(value)):
        if needs_escape(p[i]):
            return False
    return True


cdef bytes escape_combined(bytes value):
    """Quote-safe for the combined format: '"', '\\' and non-printables as \\xHH."""
    if is_plain(value):
        return value
    out = bytearray()
    for c in value:
        if needs_escape(c):
            out += b"\\x%02X" % c
        else:
            out.append(c)
    return bytes(out)


cdef bytes escape_json(bytes value):
    """A JSON string body; bytes outside printable ASCII become \\u00XX so the line is valid UTF-8."""
    if is_plain(value):
        return value
    out = bytearray()
    for c in value:
        if c == 34 or c == 92:  # '"' and '\\'
            out.append(92)
            out.append(c)
        elif needs_escape(c):
            out += b"\\u%04x" % c
        else:
            out.append(c)
    return bytes(out)


cdef inline bytes seconds3(double value):
    """Seconds with millisecond precision ("0.004"), or "-" for no value."""
    cdef char buf[32]
    cdef uint64_t ms
    cdef int n
    if value < 0:
        return b"-"
    ms = <uint64_t>(value * 1000.0 + 0.5)
    buf[31] = <char>(ASCII_ZERO + ms % 10)
    buf[30] = <char>(ASCII_ZERO + ms // 10 % 10)
    buf[29] = <char>(ASCII_ZERO + ms // 100 % 10)
    buf[28] = b'.'
    n = write_digits(buf + 28, ms // 1000) + 4
    return PyBytes_FromStringAndSize(buf + 32 - n, n)


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
        cdef bytes version = b"1.1" if ex.http11 else b"1.0"
        # a join of pieces: %-formatting re-parses its format on every call
        if self.fmt == LOG_COMBINED:
            self.buf += b"".join([
                client_addr, b" - - [", self.time_local, b'] "', escape_combined(method), b" ",
                escape_combined(url), b" HTTP/", version, b'" ', decimal(status), b" ",
                decimal(ex.bytes_out), b' "',
                escape_combined(ex.referer) if ex.referer is not None else b"-", b'" "',
                escape_combined(ex.user_agent) if ex.user_agent is not None else b"-", b'" "',
                ex.request_id, b'" ', up_addr, b" ", up_time, b" ", seconds3(total), b"\n"])
        else:
            self.buf += b"".join([
                b'{"time":"', self.time_iso, b'","remote_addr":"', client_addr,
                b'","request_id":"', ex.request_id, b'","method":"', escape_json(method),
                b'","uri":"', escape_json(url), b'","protocol":"HTTP/', version,
                b'","status":', decimal(status), b',"bytes_sent":', decimal(ex.bytes_out),
                b',"bytes_received":', decimal(ex.bytes_in), b',"referer":"',
                escape_json(ex.referer) if ex.referer is not None else b"",
                b'","user_agent":"',
                escape_json(ex.user_agent) if ex.user_agent is not None else b"",
                b'","route":"', ex.route.log_name if ex.route is not None else b"",
                b'","upstream_addr":"', up_addr if ex.upstream_addr is not None else b"",
                b'","upstream_time":', up_time if ex.upstream_time >= 0 else b"null",
                b',"request_time":', seconds3(total), b"}\n"])
        if len(self.buf) >= self.limit:
            self.flush()
