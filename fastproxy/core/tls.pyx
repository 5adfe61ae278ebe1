# TLS on listeners, runtime half (the config half, and why the contexts are made in the
# master: fastproxy/config/tls.py). uvloop runs the handshake and the record layer; this
# part chooses the certificate by SNI, counts handshakes, and reads once per connection what
# the requests on it need (the version and cipher for the log, the client certificate's
# header lines). Plus the handler of a `redirect_https` listener. Included after http.pyx.

from hashlib import sha256
import ssl

from cryptography.x509 import load_der_x509_certificate

# OpenSSL's reasons for a failed handshake, by the TlsFailure they count under (the rest: other)
TLS_FAILURE_BY_REASON = {
    "CALLBACK_FAILED": TLS_FAIL_UNKNOWN_SNI,  # our SNI callback refuses only unknown names
    "UNSUPPORTED_PROTOCOL": TLS_FAIL_VERSION,
    "VERSION_TOO_LOW": TLS_FAIL_VERSION,
    "NO_SHARED_CIPHER": TLS_FAIL_CIPHER,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": TLS_FAIL_NO_CLIENT_CERT,
    "CERTIFICATE_VERIFY_FAILED": TLS_FAIL_BAD_CLIENT_CERT,
    "HTTP_REQUEST": TLS_FAIL_NOT_TLS,
    "WRONG_VERSION_NUMBER": TLS_FAIL_NOT_TLS,
    "UNEXPECTED_MESSAGE": TLS_FAIL_NOT_TLS,
}

# What a plain HTTP request to a TLS port gets, unencrypted (as nginx answers it): a client
# that reads it learns its mistake instead of seeing the connection drop.
cdef bytes PLAIN_HTTP_BODY = b'{"status":400,"error":"plain HTTP request sent to an HTTPS port"}\n'
cdef bytes PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(PLAIN_HTTP_BODY), PLAIN_HTTP_BODY))

# The worker's metrics writer, for TlsHandshake, which uvloop creates (one per process).
cdef MetricsWriter tls_metrics = None

cdef bytes TLS12 = b"TLSv1.2"  # for the access log
cdef bytes TLS13 = b"TLSv1.3"


class TlsHandshake(ssl.SSLObject):
    """The SSL object of a listener's connections (the front context's sslobject_class): it
    counts the handshakes that fail, by reason, which uvloop drops without telling the
    protocol, and makes sure the client hears why."""
    failed = None  # the error of a failed handshake, once its alert is on its way

    @classmethod
    def _create(cls, incoming, outgoing, *args, **kwargs):
        """What wrap_bio makes. uvloop calls read, write and pending on every record: give it
        the C methods themselves rather than SSLObject's Python wrappers around them (the same
        arguments; 1,700 instructions less per request on a kept connection)."""
        self = super(TlsHandshake, cls)._create(incoming, outgoing, *args, **kwargs)
        self.outgoing = outgoing  # what uvloop sends: an alert, after a failure
        sslobj = self._sslobj
        self.read, self.write, self.pending = sslobj.read, sslobj.write, sslobj.pending
        return self

    def do_handshake(self):
        if self.failed is not None:
            raise self.failed
        try:
            self._sslobj.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as error:
            if tls_metrics is not None:
                tls_metrics.tls_failure(TLS_FAILURE_BY_REASON.get(error.reason, TLS_FAIL_OTHER))
            if error.reason == "HTTP_REQUEST":
                self.outgoing.write(PLAIN_HTTP_ANSWER)
            if not self.outgoing.pending:
                raise  # nothing to send (bytes that are not TLS): closed at once
            # uvloop closes at once on a failure, dropping the alert OpenSSL wrote (the client
            # would see a bare EOF): answered "want read", it sends the alert first, as for a
            # handshake that waits; the client's close, its next bytes (then this error) or
            # the handshake timeout end the connection
            self.failed = error
            raise ssl.SSLWantReadError("handshake failed; sending the alert") from None


cdef bytes rfc4514_header_value(str text):
    """A DN for a header line: control characters (which RFC 4514 leaves as they are) hex-escaped."""
    return "".join([c if " " <= c != "\x7f" else "\\%02x" % ord(c) for c in text]).encode()


@cython.final
cdef class TlsListener:
    """One TLS listener in a worker: its certificate choice, HSTS line and client verification."""
    cdef dict exact, wildcard
    cdef object default
    cdef bytes hsts_line  # the whole header line; b"": none
    cdef bint client_verify
    cdef dict ciphers  # cipher name -> bytes for the log, encoded once per name
    cdef MetricsWriter metrics

    def __init__(self, tls, MetricsWriter metrics):  # a config.runtime.Tls
        global tls_metrics
        tls_metrics = metrics
        self.metrics = metrics
        self.exact = tls.exact
        self.wildcard = tls.wildcard
        self.default = tls.default
        self.hsts_line = b"Strict-Transport-Security: " + tls.hsts + b"\r\n" if tls.hsts else b""
        self.client_verify = tls.client_verify
        self.ciphers = {}
        # The front context was made by the master; what it calls back into is this worker's.
        tls.front.sni_callback = self.select
        tls.front.sslobject_class = TlsHandshake

    def select(self, sslobj, str server_name, context):
        """The SNI callback: switch the connection to the context of the certificate that
        names the server, by exact name, then "*." + all but its first label, then the
        default; refuse the handshake when there is none."""
        cdef str name
        cdef Py_ssize_t dot
        chosen = None
        if server_name is not None:
            name = server_name.lower()
            chosen = self.exact.get(name)
            if chosen is None:
                dot = name.find(".")
                if dot > 0:
                    chosen = self.wildcard.get(name[dot + 1:])
        if chosen is None:
            chosen = self.default
            if chosen is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = chosen
        return None

    cdef int made(self, ClientConnection client, transport) except -1:
        """The handshake is done (uvloop calls connection_made after it): count it and keep
        what the connection's requests need."""
        cdef str version
        sslobj = transport.get_extra_info("ssl_object")
        version = sslobj.version()
        self.metrics.tls_handshake(1 if version == "TLSv1.3" else 0, sslobj.session_reused)
        client.tls_version = TLS13 if version == "TLSv1.3" else TLS12
        cipher = sslobj.cipher()[0]
        client.tls_cipher = self.ciphers.get(cipher)
        if client.tls_cipher is None:
            client.tls_cipher = self.ciphers[cipher] = cipher.encode()
        if self.client_verify:
            der = sslobj.getpeercert(True)
            if der is not None:  # verified, or the handshake would have failed
                client.cert_lines = (
                    b"X-Client-Cert-Subject: "
                    + rfc4514_header_value(load_der_x509_certificate(der).subject.rfc4514_string())
                    + b"\r\nX-Client-Cert-Fingerprint: " + sha256(der).hexdigest().encode() + CRLF)
        # uvloop's SSL transport starts with its own, larger limits
        transport.set_write_buffer_limits(CLIENT_HIGH_WATER, CLIENT_LOW_WATER)
        return 0


@cython.final
cdef class Listening:
    """The protocol factory of a listener that is not plain: TLS, or its own route
    (redirect_https). A plain listener uses WorkerCore.protocol_factory itself."""
    cdef WorkerCore core
    cdef Router router
    cdef TlsListener tls

    def __init__(self, WorkerCore core, Router router, TlsListener tls):
        self.core = core
        self.router = router
        self.tls = tls

    def __call__(self):
        cdef ClientConnection client = self.core.protocol_factory()
        client.router = self.router
        client.tls = self.tls
        return client


@cython.final
cdef class RedirectHttps(Filter):
    """The handler of a redirect_https listener's route: 308 to the same path and query over
    HTTPS (config/tls.py builds the authority's parts)."""
    cdef bytes prefix, suffix
    cdef bint use_host

    def __init__(self, handler):  # a config.runtime.RedirectHttps
        self.prefix = handler.prefix
        self.suffix = handler.suffix
        self.use_host = handler.use_host

    cdef int request_head(self, Exchange ex) except -1:
        cdef bytes location
        if self.use_host:
            if ex.host is None:
                ex.respond(400, (), b"")
                return FILTER_RESPOND
            location = self.prefix + normalize_host(ex.host) + self.suffix + ex.url
        else:
            location = self.prefix + self.suffix + ex.url
        ex.respond(308, ((b"Location", location),), b"")
        return FILTER_RESPOND


HANDLER_CLASSES["redirect_https"] = RedirectHttps
