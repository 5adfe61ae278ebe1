# Response compression, runtime half (config half: fastproxy/filters/compress.py; the
# whole picture: docs/compression.md). Accept-Encoding is negotiated when the request head
# is complete (406 there when nothing acceptable is left); the response head decides whether
# this response is compressed (type, length, status, not encoded, no no-transform) and edits
# its headers; each body piece is then compressed and flushed at once, so a stream is never
# held back, and the end of the body writes the codec's trailer. A codec holds its window
# and no more: memory per response does not grow with the body.

import zlib
import zstandard

try:
    import brotli
except ImportError:  # `fastproxy -t` refuses "br" then (filters/compress.py)
    brotli = None

cdef enum:
    # Accept-Encoding's table: the CODING_* values, then these
    ACCEPT_IDENTITY = CODINGS
    ACCEPT_ANY = CODINGS + 1  # "*"
    ACCEPT_ENTRIES = CODINGS + 2
    Q_UNSET = -1              # not listed
    CHOSE_IDENTITY = -1       # negotiate(): send the body as it is
    CHOSE_NOTHING = -2        # negotiate(): nothing acceptable is left (406)

# Reused compression contexts of a route's zstd streams, at most this many idle per route
# and worker: making one costs more than compressing a small body, and each keeps its
# tables (up to a few MiB at high levels) while idle.
cdef Py_ssize_t IDLE_ZSTD_CONTEXTS = 4
# brotli's window, 2**BROTLI_LGWIN bytes (ngx_brotli's default): its memory per response.
cdef int BROTLI_LGWIN = 19

cdef tuple CONTENT_ENCODING_LINES = (b"Content-Encoding: zstd\r\n", b"Content-Encoding: br\r\n",
                                     b"Content-Encoding: gzip\r\n")  # by CODING_*
cdef bytes VARY_LINE = b"Vary: Accept-Encoding\r\n"
cdef tuple VARY_NAME = (b"vary",)
cdef tuple ETAG_NAME = (b"etag",)
cdef tuple NO_TRANSFORM = (b"no-transform",)  # has_token()'s lists
cdef tuple VARY_COVERED = (b"accept-encoding", b"*")  # a Vary already keying on the coding
# A byte range of the compressed body is not one of the body the upstream described
cdef tuple ACCEPT_RANGES_NAME = (b"accept-ranges",)
cdef tuple NOT_ACCEPTABLE_HEADERS = ((b"Content-Type", b"application/json"),)
cdef bytes NOT_ACCEPTABLE_BODY = b'{"status":406,"error":"not acceptable: no content coding the client accepts"}\n'


cdef inline bint separator(char c) noexcept:
    return c == b' ' or c == b'\t' or c == b',' or c == b';' or c == b'='


cdef inline Py_ssize_t skip_space(const char *p, Py_ssize_t n, Py_ssize_t pos, bint commas) noexcept:
    """Where p[pos:n] goes on past spaces and tabs (and commas: between list elements)."""
    while pos < n and (p[pos] == b' ' or p[pos] == b'\t' or (commas and p[pos] == b',')):
        pos += 1
    return pos


cdef inline Py_ssize_t token_end(const char *p, Py_ssize_t n, Py_ssize_t pos) noexcept:
    while pos < n and not separator(p[pos]):
        pos += 1
    return pos


cdef int coding_of(const char *p, Py_ssize_t n) noexcept:
    """The Accept-Encoding entry of a coding name, or -1 for one we do not know."""
    if name_is(p, n, b"gzip", 4) or name_is(p, n, b"x-gzip", 6):
        return CODING_GZIP
    if name_is(p, n, b"br", 2):
        return CODING_BR
    if name_is(p, n, b"zstd", 4):
        return CODING_ZSTD
    if name_is(p, n, b"identity", 8):
        return ACCEPT_IDENTITY
    if n == 1 and p[0] == b'*':
        return ACCEPT_ANY
    return -1


cdef int qvalue(const char *p, Py_ssize_t n) noexcept:
    """An RFC 9110 qvalue in thousandths ("0", "0.5", "1.000"), or -1 when malformed."""
    cdef int q, scale = 100
    cdef Py_ssize_t i
    if n < 1 or n > 5 or (p[0] != b'0' and p[0] != b'1'):
        return -1
    q = 1000 if p[0] == b'1' else 0
    if n == 1:
        return q
    if p[1] != b'.':
        return -1
    for i in range(2, n):
        if not (b'0' <= p[i] <= b'9') or (q == 1000 and p[i] != b'0'):
            return -1
        q += (p[i] - ASCII_ZERO) * scale
        scale //= 10
    return q


cdef void accepted_codings(bytes value, int *q) noexcept:
    """Fill q[ACCEPT_ENTRIES] from an Accept-Encoding value: each known coding's weight in
    thousandths, Q_UNSET when not listed. Unknown codings and malformed entries are ignored;
    a coding listed twice keeps its higher weight."""
    cdef const char *p = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), pos = 0, start
    cdef int entry, weight
    cdef bint is_q
    for entry in range(ACCEPT_ENTRIES):
        q[entry] = Q_UNSET
    while pos < n:
        start = skip_space(p, n, pos, True)
        pos = token_end(p, n, start)
        entry = coding_of(p + start, pos - start)
        weight = 1000
        while pos < n and p[pos] != b',':  # its parameters
            if p[pos] != b';':
                pos += 1
                continue
            start = skip_space(p, n, pos + 1, False)
            pos = token_end(p, n, start)
            is_q = pos - start == 1 and (p[start] == b'q' or p[start] == b'Q')
            pos = skip_space(p, n, pos, False)
            if pos < n and p[pos] == b'=':
                start = skip_space(p, n, pos + 1, False)
                pos = token_end(p, n, start)
                if is_q:
                    weight = qvalue(p + start, pos - start)
            elif is_q:
                weight = -1
        if entry >= 0 and weight > q[entry]:
            q[entry] = weight


cdef inline int weight_of(int *q, int entry) noexcept:
    """A coding not listed takes the weight of "*" if listed, else it is not acceptable."""
    if q[entry] != Q_UNSET:
        return q[entry]
    return q[ACCEPT_ANY] if q[ACCEPT_ANY] != Q_UNSET else 0


cdef inline int identity_weight(int *q) noexcept:
    """identity is acceptable unless excluded (RFC 9110 12.5.3): its own weight, else that of
    "*"; it outweighs a coding only when the client weighs it higher."""
    return q[ACCEPT_IDENTITY] if q[ACCEPT_IDENTITY] != Q_UNSET else q[ACCEPT_ANY]


cdef bint has_token(bytes value, tuple lower_tokens) noexcept:
    """Whether a comma-separated header value lists one of `lower_tokens` (case-insensitive;
    a token's own parameters, after '=' or ';', are not compared)."""
    cdef const char *p = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), pos = 0, start
    while pos < n:
        start = skip_space(p, n, pos, True)
        pos = token_end(p, n, start)
        if pos > start and listed(p + start, pos - start, lower_tokens):
            return True
        while pos < n and p[pos] != b',':
            pos += 1
    return False


@cython.final
cdef class CodecStream:
    """One response's compressor: what its body pieces are fed to, and its counts."""
    cdef int coding
    cdef object feed          # compress(data) -> what it can emit so far
    cdef object sync, done    # flush everything fed so far / finish the stream
    cdef object sync_arg, done_arg  # their argument, None for none
    cdef object zstd_context  # a ZstdCompressor to give back to the route's idle list
    cdef Py_ssize_t bytes_in, bytes_out

    cdef bytes piece(self, bytes data, bint end):
        cdef bytes out = <bytes>self.feed(data) if PyBytes_GET_SIZE(data) else b""
        if end:
            out += <bytes>(self.done(self.done_arg) if self.done_arg is not None else self.done())
        else:
            # flushed at once: an event stream or a long poll is not held back
            out += <bytes>(self.sync(self.sync_arg) if self.sync_arg is not None else self.sync())
        self.bytes_in += PyBytes_GET_SIZE(data)
        self.bytes_out += PyBytes_GET_SIZE(out)
        return out


@cython.final
cdef class Compress(Filter):
    """`compress`: negotiates in request_head, decides and edits the head in response_head,
    compresses in response_body. Its per-request slot holds the coding negotiated (an int,
    CHOSE_IDENTITY, or None when the request rules compression out), then the response's
    CodecStream, or None when it is not compressed."""
    cdef int order[CODINGS]   # the configured codings, in preference order
    cdef int count
    cdef int levels[CODINGS]  # by CODING_*
    cdef Py_ssize_t min_length
    cdef tuple types          # lower-case media types compressed
    cdef tuple type_prefixes  # "text/" for "text/*"
    cdef list idle_zstd       # ZstdCompressor contexts no stream uses now

    def __init__(self, config):
        codings = {name: i for i, name in enumerate(CODING_NAMES)}
        self.count = len(config.encodings)
        for i, name in enumerate(config.encodings):
            self.order[i] = codings[name]
        self.levels[CODING_ZSTD] = config.zstd_level
        self.levels[CODING_BR] = config.br_level
        self.levels[CODING_GZIP] = config.gzip_level
        self.min_length = max(config.min_length, 1)  # an empty body stays empty
        self.types = tuple(t for t in config.types if not t.endswith(b"/*"))
        self.type_prefixes = tuple(t[:len(t) - 1] for t in config.types if t.endswith(b"/*"))
        self.idle_zstd = []

    cdef int negotiate(self, bytes accept) noexcept:
        """The coding to use for a request's Accept-Encoding, CHOSE_IDENTITY, or
        CHOSE_NOTHING: by the client's weights, ties going to the configured order, and to a
        coding over identity."""
        cdef int q[ACCEPT_ENTRIES]
        cdef int best = CHOSE_IDENTITY, best_q = 0, identity, w, i
        accepted_codings(accept, q)
        for i in range(self.count):
            w = weight_of(q, self.order[i])
            if w > best_q:
                best = self.order[i]
                best_q = w
        identity = identity_weight(q)
        if best >= 0 and best_q >= identity:
            return best
        return CHOSE_NOTHING if identity == 0 else CHOSE_IDENTITY

    cdef int request_head(self, Exchange ex) except -1:
        cdef bytes accept
        cdef int chosen
        if ex.request_header(b"range") is not None:
            return FILTER_CONTINUE  # a range of the compressed body is not the one asked for
        accept = ex.request_header(b"accept-encoding")
        chosen = CHOSE_IDENTITY if accept is None else self.negotiate(accept)
        if chosen == CHOSE_NOTHING:
            ex.respond(406, NOT_ACCEPTABLE_HEADERS, NOT_ACCEPTABLE_BODY)
            return FILTER_RESPOND
        ex.slots[self.slot] = chosen  # a small int: no allocation
        return FILTER_CONTINUE

    cdef bint type_listed(self, bytes content_type) noexcept:
        cdef const char *p = PyBytes_AS_STRING(content_type)
        cdef const char *semicolon = <const char *>memchr(p, b';', PyBytes_GET_SIZE(content_type))
        cdef Py_ssize_t n = (semicolon - p) if semicolon != NULL else PyBytes_GET_SIZE(content_type)
        cdef bytes prefix
        while n > 0 and (p[n - 1] == b' ' or p[n - 1] == b'\t'):
            n -= 1
        if listed(p, n, self.types):
            return True
        for prefix in self.type_prefixes:
            if n > PyBytes_GET_SIZE(prefix) and \
                    strncasecmp(p, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) == 0:
                return True
        return False

    cdef int response_head(self, Exchange ex, ResponseHead head) except -1:
        cdef object chosen = ex.slots[self.slot]
        cdef int status = head.status
        cdef Py_ssize_t length
        cdef bytes value
        ex.slots[self.slot] = None
        if chosen is None or status < 200 or status == 204 or status == 206 or status == 304:
            return FILTER_CONTINUE
        if head.header(b"content-encoding") is not None:
            return FILTER_CONTINUE  # already encoded: never twice
        value = head.header(b"content-type")
        if value is None or not self.type_listed(value):
            return FILTER_CONTINUE
        length = head.content_length()
        if 0 <= length < self.min_length:
            return FILTER_CONTINUE
        value = head.header(b"cache-control")
        if value is not None and has_token(value, NO_TRANSFORM):
            return FILTER_CONTINUE
        # compressible: whether it is depends on Accept-Encoding, which caches must key on
        value = head.header(b"vary")
        if value is None:
            head.add_header_lines(VARY_LINE)
        elif not has_token(value, VARY_COVERED):
            head.remove_headers(VARY_NAME)
            head.add_header_lines(b"Vary: " + value + b", Accept-Encoding\r\n")
        if <int>chosen < 0 or ex.is_head:
            return FILTER_CONTINUE
        head.drop_length()
        head.remove_headers(ACCEPT_RANGES_NAME)
        head.add_header_lines(<bytes>CONTENT_ENCODING_LINES[<int>chosen])
        value = head.header(b"etag")
        if value is not None and not value.startswith(b"W/"):
            # the compressed bytes differ from the upstream's: no longer byte-for-byte equal
            head.remove_headers(ETAG_NAME)
            head.add_header_lines(b"ETag: W/" + value + b"\r\n")
        ex.slots[self.slot] = self.stream(<int>chosen, length)
        return FILTER_CONTINUE

    cdef CodecStream stream(self, int coding, Py_ssize_t length):
        """A compressor for a body of `length` bytes (-1: unknown)."""
        cdef CodecStream s = CodecStream.__new__(CodecStream)
        s.coding = coding
        if coding == CODING_GZIP:
            codec = zlib.compressobj(self.levels[coding], zlib.DEFLATED, 31)  # 31: gzip framing
            s.feed = codec.compress
            s.sync = s.done = codec.flush
            s.sync_arg = zlib.Z_SYNC_FLUSH
            s.done_arg = zlib.Z_FINISH
        elif coding == CODING_ZSTD:
            s.zstd_context = self.idle_zstd.pop() if self.idle_zstd else \
                zstandard.ZstdCompressor(level=self.levels[coding])
            # a known length sizes zstd's tables to the body and goes in the frame header
            codec = s.zstd_context.compressobj(size=length)
            s.feed = codec.compress
            s.sync = s.done = codec.flush
            s.sync_arg = zstandard.COMPRESSOBJ_FLUSH_BLOCK
            s.done_arg = zstandard.COMPRESSOBJ_FLUSH_FINISH
        else:
            codec = brotli.Compressor(quality=self.levels[coding], lgwin=BROTLI_LGWIN)
            s.feed = codec.process
            s.sync = codec.flush
            s.done = codec.finish
        return s

    cdef bytes response_body(self, Exchange ex, bytes data, bint end):
        cdef object state = ex.slots[self.slot]
        cdef CodecStream s
        cdef bytes out
        if state is None:
            return data
        s = <CodecStream?>state
        out = s.piece(data, end)
        if end:
            ex.slots[self.slot] = None
            ex.client.core.metrics.compressed(s.coding, s.bytes_in, s.bytes_out)
            if s.zstd_context is not None and len(self.idle_zstd) < IDLE_ZSTD_CONTEXTS:
                self.idle_zstd.append(s.zstd_context)
        return out


FILTER_CLASSES["compress"] = Compress
