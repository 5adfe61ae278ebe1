# Plain-TCP client connections, served from an epoll set of the worker's own
# (docs/architecture.md, "Accepting and client sockets"): each listener is accepted from
# until its queue is empty (at most ACCEPT_BATCH per wake-up), and each client socket is read
# and written here with recv/send/writev, its ClientConnection called directly. uvloop runs
# everything else (upstreams, TLS listeners, the admin, timers); this set is one reader in
# its loop. Why: libuv accepts one connection per wake-up of a listening socket, which makes
# new connections queue behind busy loop turns, and an accepted uvloop transport costs about
# 10k instructions and three system calls (TCP_NODELAY, getsockname, getpeername) before its
# first byte (docs/benchmarks.md, "Cost of a connection").

from libc.errno cimport errno, EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM
from libc.errno cimport EBADF, EINVAL, ENOTSOCK
from libc.string cimport strerror
from libc.stdlib cimport malloc, free
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLERR
        EPOLLHUP
        EPOLLET
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockname(int fd, sockaddr *addr, socklen_t *addrlen)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        SHUT_WR

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        pass
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in:
        uint16_t sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        uint16_t sin6_port
        in6_addr sin6_addr
    uint16_t ntohs(uint16_t)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

from posix.unistd cimport close as c_close

cdef enum:
    EVENTS_PER_POLL = 512
    # Connections accepted per wake-up of a listener: a burst is taken at once (nginx's
    # multi_accept), yet a listener never holds the loop for long; the rest wait one turn.
    ACCEPT_BATCH = 64
    SOCKET_READ_SIZE = 256 * 1024  # as uvloop's reads: a large upload comes in few reads
    READS_PER_TURN = 4
    IOV_BATCH = 64
    SPARE_SOCKETS = 256
    CLIENT_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLET

# Seconds a listener rests when the worker is out of descriptors (EMFILE): nginx's
# accept_mutex_delay. Accepting at once again would spin on the same error.
cdef double ACCEPT_REST = 0.5


cdef class Pollable:
    """Something registered in the Poller's epoll set."""

    cdef int on_events(self, uint32_t events) except -1:
        return 0


@cython.final
cdef class Poller:
    """The worker's epoll set of plain client sockets and listeners, polled from one
    uvloop reader. A closed socket's reference is dropped only after the batch of events
    that may still name it."""
    cdef WorkerCore core
    cdef object loop
    cdef int epfd
    cdef epoll_event *events
    cdef char *read_buffer
    cdef list lost          # (ClientSocket, exc) whose connection_lost is due
    cdef list spare         # closed ClientSockets ready for the next connections
    cdef bint in_batch, lost_scheduled

    def __cinit__(self):
        self.epfd = -1

    def __init__(self, WorkerCore core, loop):
        self.core = core
        self.loop = loop
        self.lost = []
        self.spare = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        self.events = <epoll_event *>malloc(EVENTS_PER_POLL * sizeof(epoll_event))
        self.read_buffer = <char *>malloc(SOCKET_READ_SIZE)
        if self.events == NULL or self.read_buffer == NULL:
            raise MemoryError()
        loop.add_reader(self.epfd, self.poll)

    def __dealloc__(self):
        free(self.events)
        free(self.read_buffer)
        if self.epfd >= 0:
            c_close(self.epfd)

    cdef int add(self, int fd, uint32_t events, Pollable owner) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.ptr = <void *>owner
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            return errno
        Py_INCREF(owner)  # the set's reference, given up in remove or socket_closed
        return 0

    cdef int watch_writes(self, ClientSocket sock) except -1:
        cdef epoll_event ev
        ev.events = CLIENT_EVENTS | EPOLLOUT
        ev.data.ptr = <void *>sock
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, sock.fd, &ev) < 0:
            sock.fail(errno)
        return 0

    cdef int remove(self, int fd, Pollable owner) except -1:
        cdef epoll_event ev
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
        self.lost.append((owner, None))  # released with the batch; not a ClientSocket: no callback
        Py_DECREF(owner)
        self.schedule_lost()
        return 0

    def poll(self):
        cdef int n, i
        cdef Pollable owner
        n = epoll_wait(self.epfd, self.events, EVENTS_PER_POLL, 0)
        self.in_batch = True
        for i in range(n):
            owner = <Pollable>self.events[i].data.ptr
            try:
                owner.on_events(self.events[i].events)
            except Exception as exc:  # a bug: it costs this connection, never the worker
                self.core.report_error(exc)
                if isinstance(owner, ClientSocket):
                    (<ClientSocket>owner).abort()
        self.in_batch = False
        if self.lost:
            self.run_lost()

    cdef int socket_closed(self, ClientSocket sock, exc) except -1:
        self.lost.append((sock, exc))
        if sock.registered:
            sock.registered = False
            Py_DECREF(sock)  # the set's reference: the list holds it until connection_lost
        self.schedule_lost()
        return 0

    cdef int schedule_lost(self) except -1:
        if not self.in_batch and not self.lost_scheduled:
            self.lost_scheduled = True
            self.loop.call_soon(self.run_lost)
        return 0

    def run_lost(self):
        """connection_lost for the sockets closed since the last call, as uvloop does it: in
        a later callback, never inside the protocol call that closed the socket."""
        cdef ClientSocket sock
        cdef list lost = self.lost
        self.lost = []
        self.lost_scheduled = False
        for owner, exc in lost:
            if not isinstance(owner, ClientSocket):
                continue
            sock = <ClientSocket>owner
            protocol = sock.protocol
            sock.protocol = None
            try:
                protocol.connection_lost(exc)
            except Exception as error:
                self.core.report_error(error)
            if PyList_GET_SIZE(self.spare) < SPARE_SOCKETS:
                self.spare.append(sock)

    cdef int open_client(self, int fd, sockaddr_storage *peer, factory) except -1:
        cdef ClientSocket sock
        cdef int err
        try:
            protocol = factory()
        except Exception as exc:
            c_close(fd)
            self.core.report_error(exc)
            return 0
        if self.spare:
            sock = <ClientSocket>self.spare.pop()
        else:
            sock = ClientSocket(self)
        sock.reset(fd, peer)
        sock.protocol = protocol
        try:
            protocol.connection_made(sock)
            # The request is usually in already: read it now, and register only then, so
            # the set does not report bytes already read (edge-triggered, it reports what
            # is there when a socket is added) and no loop turn is spent on the way.
            sock.read(False)
        except Exception as exc:
            self.core.report_error(exc)
            sock.abort()
        if sock.fd < 0:
            return 0
        # EPOLLOUT only once the socket refuses bytes: a new socket is writable, and the set
        # would report it so at once, to no use
        sock.watch_out = sock.pending_size != 0
        err = self.add(fd, CLIENT_EVENTS | (EPOLLOUT if sock.watch_out else 0), sock)
        if err:
            self.core.report_error(OSError(err, "epoll_ctl: " + strerror(err).decode()))
            sock.abort()
        else:
            sock.registered = True
        return 0


@cython.final
cdef class Acceptor(Pollable):
    """A plain listener of this worker: accepts from the listening socket the master opened
    (level-triggered, so a queue left over from a batch wakes the next turn)."""
    cdef Poller poller
    cdef object sock     # this worker's copy of the listening socket
    cdef object factory  # returns the ClientConnection of a new connection
    cdef int fd
    cdef bint registered
    cdef object rest_handle

    def __init__(self, Poller poller, sock, factory, int backlog):
        self.poller = poller
        self.sock = sock
        self.factory = factory
        sock.listen(backlog)
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.register()

    cdef int register(self) except -1:
        cdef int err = self.poller.add(self.fd, EPOLLIN, self)
        if err:
            raise OSError(err, strerror(err).decode())
        self.registered = True
        return 0

    cdef int on_events(self, uint32_t events) except -1:
        cdef sockaddr_storage peer
        cdef socklen_t size
        cdef int i, fd
        # Until the queue is empty: one accept4 answered EAGAIN per wake-up is the price
        # (docs/benchmarks.md, "Accepting and client sockets of our own")
        for i in range(ACCEPT_BATCH):
            size = sizeof(peer)
            fd = accept4(self.fd, <sockaddr *>&peer, &size, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd >= 0:
                self.poller.open_client(fd, &peer, self.factory)
            elif errno == EAGAIN:
                return 0
            elif errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                self.rest(errno)
                return 0
            elif errno == EBADF or errno == EINVAL or errno == ENOTSOCK:
                self.close()
                raise OSError(errno, "accept on a listener: " + strerror(errno).decode())
            # else the connection failed before we took it (ECONNABORTED...): the next one may not
        return 0

    cdef int rest(self, int err) except -1:
        """Out of descriptors or memory: stop accepting for ACCEPT_REST (the queue waits in
        the kernel meanwhile), and say so."""
        self.poller.core.report_accept_rest(strerror(err).decode(), ACCEPT_REST)
        self.unregister()
        self.rest_handle = self.poller.loop.call_later(ACCEPT_REST, self.wake)
        return 0

    def wake(self):
        self.rest_handle = None
        if self.sock is not None:
            self.register()

    cdef int unregister(self) except -1:
        if self.registered:
            self.registered = False
            self.poller.remove(self.fd, self)
        return 0

    def close(self):
        """Stop accepting (drain); the master keeps its own copy of the socket."""
        if self.sock is None:
            return
        self.unregister()
        if self.rest_handle is not None:
            self.rest_handle.cancel()
            self.rest_handle = None
        self.sock.close()
        self.sock = None


@cython.final
cdef class ClientSocket(Pollable):
    """The transport of a plain client connection: what ClientConnection asks of an asyncio
    transport (write, writelines, write_eof, pause/resume_reading, close, abort, the write
    buffer's limits and size, peername), over a non-blocking socket in the Poller's set,
    edge-triggered as nginx's. Writes go to the socket at once; what it does not take waits
    here, in order, for the next EPOLLOUT."""
    cdef Poller poller
    cdef int fd                  # -1 once closed
    cdef bint registered         # in the Poller's set, which then holds a reference to it
    cdef bint watch_out          # EPOLLOUT asked for (from the first refused write on)
    cdef object protocol         # its ClientConnection
    cdef sockaddr_storage peer
    cdef bytes peer_ip
    cdef list pending            # bytes the socket has not taken yet, oldest first
    cdef Py_ssize_t pending_size, first_offset
    cdef Py_ssize_t high, low
    cdef bint reading            # not paused
    cdef bint read_ready         # readiness seen while paused: read at resume
    cdef bint read_scheduled     # read_later is queued in the loop
    cdef bint closing            # close() called: closes once the pending bytes are written
    cdef bint eof_pending, eof_sent, protocol_paused

    def __init__(self, Poller poller):
        self.poller = poller
        self.fd = -1
        self.pending = []

    cdef int reset(self, int fd, sockaddr_storage *peer) except -1:
        cdef char text[48]
        cdef const void *address
        self.fd = fd
        self.peer = peer[0]
        if peer.ss_family == AF_INET:
            address = &(<sockaddr_in *>peer).sin_addr
        else:
            address = &(<sockaddr_in6 *>peer).sin6_addr
        if inet_ntop(peer.ss_family, address, text, sizeof(text)) == NULL:
            self.peer_ip = b"-"
        else:
            self.peer_ip = text
        self.pending_size = self.first_offset = 0
        self.high = CLIENT_HIGH_WATER
        self.low = CLIENT_LOW_WATER
        self.reading = True
        self.read_ready = self.read_scheduled = self.closing = self.eof_pending = self.eof_sent = False
        self.watch_out = False
        self.protocol_paused = False
        return 0

    # -- from the Poller --------------------------------------------------------

    cdef int on_events(self, uint32_t events) except -1:
        if self.fd < 0:
            return 0
        if events & EPOLLOUT and self.pending_size:
            self.send_pending()
            if self.fd < 0:
                return 0
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            if self.reading:
                self.read(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR) != 0)
            else:
                self.read_ready = True
        return 0

    cdef int read(self, bint until_empty) except -1:
        """Read while reading is on and the socket has bytes. A short read means the socket
        was emptied: the next bytes raise a new edge (nginx's reasoning), unless the peer
        has closed, whose end is then read to the last. A client that keeps the socket full
        gets READS_PER_TURN reads, then waits for a later loop turn behind the others."""
        cdef ssize_t n
        cdef bytes data
        cdef int reads = 0
        self.read_ready = False
        while True:
            if not self.reading or self.fd < 0:
                if self.fd >= 0:
                    self.read_ready = True
                return 0
            if reads == READS_PER_TURN:
                self.read_ready = True
                return self.read_soon()
            reads += 1
            n = recv(self.fd, self.poller.read_buffer, SOCKET_READ_SIZE, 0)
            if n > 0:
                data = PyBytes_FromStringAndSize(self.poller.read_buffer, n)
                (<ClientConnection>self.protocol).on_data(data)
                if n < SOCKET_READ_SIZE and not until_empty:
                    return 0
            elif n == 0:
                self.peer_closed()
                return 0
            elif errno == EAGAIN:
                return 0
            elif errno != EINTR:
                self.fail(errno)
                return 0

    cdef int peer_closed(self) except -1:
        self.reading = False
        if not self.protocol.eof_received():
            self.close()
        return 0

    cdef int read_soon(self) except -1:
        if not self.read_scheduled:
            self.read_scheduled = True
            self.poller.loop.call_soon(self.read_later)
        return 0

    def read_later(self):
        """Readiness left unread (seen while paused, or after READS_PER_TURN reads): read
        it from the loop, unless paused again meanwhile (resume_reading comes back here)."""
        self.read_scheduled = False
        if self.fd >= 0 and self.reading and self.read_ready:
            self.read(True)

    cdef int send_pending(self) except -1:
        cdef iovec iov[IOV_BATCH]
        cdef int count, i
        cdef ssize_t n
        cdef bytes piece
        while self.pending_size:
            count = PyList_GET_SIZE(self.pending)
            if count > IOV_BATCH:
                count = IOV_BATCH
            for i in range(count):
                piece = <bytes>PyList_GET_ITEM(self.pending, i)
                iov[i].iov_base = PyBytes_AS_STRING(piece)
                iov[i].iov_len = PyBytes_GET_SIZE(piece)
            iov[0].iov_base = <char *>iov[0].iov_base + self.first_offset
            iov[0].iov_len -= self.first_offset
            n = writev(self.fd, iov, count)
            if n < 0:
                if errno == EAGAIN:
                    return self.wait_writable()
                if errno != EINTR:
                    self.fail(errno)
                    return 0
                continue
            self.consume(n)
        if self.protocol_paused and self.pending_size <= self.low:
            self.protocol_paused = False
            self.protocol.resume_writing()
        if self.pending_size == 0 and self.fd >= 0:
            if self.closing:
                self.closed(None)
            elif self.eof_pending:
                self.send_eof()
        return 0

    cdef int consume(self, Py_ssize_t sent) except -1:
        """Drop `sent` bytes from the front of the pending ones."""
        cdef Py_ssize_t left, taken = 0
        self.pending_size -= sent
        while sent:
            left = PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(self.pending, taken)) - self.first_offset
            if sent < left:
                self.first_offset += sent
                break
            sent -= left
            self.first_offset = 0
            taken += 1
        if taken:
            del self.pending[:taken]
        return 0

    # -- the transport ----------------------------------------------------------

    def write(self, data):
        self.send_bytes(data if type(data) is bytes else bytes(data))

    def writelines(self, lines):
        self.send_list([p if type(p) is bytes else bytes(p) for p in lines])

    cdef int send_list(self, list pieces) except -1:
        """Write bytes objects in order, with one writev: ClientConnection.flush calls it
        directly, with no Python-level call and no copy into one buffer."""
        cdef iovec iov[IOV_BATCH]
        cdef int count = PyList_GET_SIZE(pieces), i
        cdef Py_ssize_t total = 0
        cdef ssize_t n
        cdef bytes piece
        if self.fd < 0 or self.eof_sent or self.eof_pending or count == 0:
            return 0
        if self.pending_size:
            return self.queue(pieces, 0)
        if count > IOV_BATCH:  # written IOV_BATCH at a time, as pending bytes are
            self.pending.extend(pieces)
            for piece in pieces:
                self.pending_size += PyBytes_GET_SIZE(piece)
            self.send_pending()
            return self.maybe_pause_protocol()
        for i in range(count):
            piece = <bytes>PyList_GET_ITEM(pieces, i)
            iov[i].iov_base = PyBytes_AS_STRING(piece)
            iov[i].iov_len = PyBytes_GET_SIZE(piece)
            total += iov[i].iov_len
        n = writev(self.fd, iov, count)
        if n == total:
            return 0
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                return self.fail(errno)
            n = 0
        return self.queue(pieces, n)

    cdef int send_bytes(self, bytes data) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef ssize_t n
        if self.fd < 0 or self.eof_sent or self.eof_pending or size == 0:
            return 0
        if self.pending_size:
            self.queue([data], 0)
            return 0
        n = send(self.fd, PyBytes_AS_STRING(data), size, MSG_NOSIGNAL)
        if n == size:
            return 0
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                self.fail(errno)
                return 0
            n = 0
        self.queue([data], n)
        return 0

    cdef int queue(self, list pieces, Py_ssize_t sent) except -1:
        """Keep what the socket did not take (`pieces` less their first `sent` bytes) for
        EPOLLOUT, and pause the protocol above the high-water mark. Bytes are pending only
        once the socket has refused some: EPOLLOUT is then sure to come."""
        cdef Py_ssize_t total = 0
        for piece in pieces:
            total += PyBytes_GET_SIZE(<bytes>piece)
        if self.pending_size == 0:
            self.first_offset = 0
        self.pending.extend(pieces)
        self.pending_size += total
        if sent:
            self.consume(sent)
        self.wait_writable()
        self.maybe_pause_protocol()
        return 0

    cdef int wait_writable(self) except -1:
        if not self.watch_out and self.registered:
            self.watch_out = True
            self.poller.watch_writes(self)
        return 0

    cdef int maybe_pause_protocol(self) except -1:
        if not self.protocol_paused and self.pending_size > self.high and self.fd >= 0:
            self.protocol_paused = True
            self.protocol.pause_writing()
        return 0

    def write_eof(self):
        if self.fd < 0 or self.eof_sent or self.eof_pending:
            return
        if self.pending_size:
            self.eof_pending = True
        else:
            self.send_eof()

    cdef int send_eof(self) except -1:
        self.eof_pending = False
        self.eof_sent = True
        shutdown(self.fd, SHUT_WR)
        return 0

    def can_write_eof(self):
        return True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        if self.reading or self.closing or self.fd < 0:
            return
        self.reading = True
        if self.read_ready:
            self.read_soon()

    def is_reading(self):
        return self.reading and self.fd >= 0

    def close(self):
        if self.closing or self.fd < 0:
            return
        self.closing = True
        self.reading = False
        if self.pending_size == 0:
            self.closed(None)

    def abort(self):
        if self.fd >= 0:
            self.closing = True
            self.closed(None)

    def is_closing(self):
        return self.closing or self.fd < 0

    cdef int fail(self, int err) except -1:
        self.closing = True
        self.closed(OSError(err, strerror(err).decode()))
        return 0

    cdef int closed(self, exc) except -1:
        """Close the descriptor (which takes it out of the epoll set: no other descriptor
        refers to the socket); connection_lost follows from the loop."""
        c_close(self.fd)
        self.fd = -1
        self.reading = False
        del self.pending[:]
        self.pending_size = self.first_offset = 0
        self.poller.socket_closed(self, exc)
        return 0

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high}) must be >= low ({low}) must be >= 0")
        self.high = high
        self.low = low
        self.maybe_pause_protocol()

    def get_write_buffer_limits(self):
        return (self.low, self.high)

    def get_write_buffer_size(self):
        return self.pending_size

    def get_protocol(self):
        return self.protocol

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self.address(&self.peer)
        if name == "sockname" and self.fd >= 0:
            return self.local_address()
        return default

    cdef object local_address(self):
        cdef sockaddr_storage local
        cdef socklen_t size = sizeof(local)
        if getsockname(self.fd, <sockaddr *>&local, &size) < 0:
            return None
        return self.address(&local)

    cdef object address(self, sockaddr_storage *addr):
        cdef char text[48]
        if addr.ss_family == AF_INET:
            inet_ntop(AF_INET, &(<sockaddr_in *>addr).sin_addr, text, sizeof(text))
            return ((<char *>text).decode("ascii"), ntohs((<sockaddr_in *>addr).sin_port))
        inet_ntop(AF_INET6, &(<sockaddr_in6 *>addr).sin6_addr, text, sizeof(text))
        return ((<char *>text).decode("ascii"), ntohs((<sockaddr_in6 *>addr).sin6_port), 0, 0)
