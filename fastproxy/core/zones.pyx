# Zones, runtime side: the header every zone starts with, its owner-pid lock and seqlock, and
# ZoneAccess, the handle over one mapped zone that every zone accessor is built on. The master
# maps the zones (fastproxy/shm/zones.py) and workers inherit them at fork. Included by _core.pyx.
#
# Concurrency rules of the header (docs/extending.md, "Zones"):
# - magic, version and size are written once, by the master, before the first fork that hands
#   the zone out (magic last, with release order); nobody writes them afterwards.
# - lock_owner is the zone lock: 0 when free, else the pid of the holder, taken by
#   compare-and-swap. A holder that dies keeps it until the master reaps that pid and calls
#   zone_force_unlock; waiters spin, then yield, meanwhile.
# - seq is the zone's seqlock, written only by whoever holds the lock (or by the master, in
#   a zone whose records only the master writes). Odd while a write is in progress; readers
#   retry a read that overlapped a write.

cimport cython
from libc.stdint cimport uint64_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from posix.unistd cimport getpid

from includes.atomic cimport (
    fp_load_relaxed, fp_load_acquire, fp_store_relaxed, fp_store_release, fp_compare_exchange,
    fp_fence_acquire, fp_fence_release, fp_cpu_relax, sched_yield)


ctypedef struct ZoneHeader:
    uint64_t magic  # ZONE_MAGIC once the header is complete
    uint64_t version  # layout version of the records that follow, chosen by the zone's owner
    uint64_t size  # bytes, this header included
    uint64_t lock_owner  # pid holding the zone lock, 0 when free
    uint64_t seq  # seqlock sequence: odd while a write is in progress
    uint64_t reserved[3]  # the header fills one cache line; records start on the next

cdef extern from *:
    """
    #define FP_ZONE_MAGIC 0x656e6f7a74736166ULL  /* "fastzone", little-endian */
    """
    const uint64_t ZONE_MAGIC "FP_ZONE_MAGIC"

cdef enum:
    ZONE_SPINS = 100  # busy-wait this many rounds, then yield the CPU between tries

ZONE_HEADER_SIZE = sizeof(ZoneHeader)


cdef inline void zone_pause(int *spins) noexcept nogil:
    """Wait a little before trying again: the other side is mid-write, descheduled, or dead
    and about to be reaped by the master."""
    if spins[0] < ZONE_SPINS:
        spins[0] += 1
        fp_cpu_relax()
    else:
        sched_yield()


cdef inline void zone_lock(ZoneHeader *h, uint64_t pid) noexcept nogil:
    cdef uint64_t expected
    cdef int spins = 0
    while True:
        expected = 0
        # Read before trying, so waiters spin on a shared cache line instead of bouncing it.
        if fp_load_relaxed(&h.lock_owner) == 0 and fp_compare_exchange(&h.lock_owner, &expected, pid):
            return
        zone_pause(&spins)


cdef inline void zone_unlock(ZoneHeader *h) noexcept nogil:
    fp_store_release(&h.lock_owner, 0)


cdef inline bint zone_force_unlock(ZoneHeader *h, uint64_t pid) noexcept nogil:
    """Free the lock if the reaped process `pid` holds it; True if it did. Ends the write it
    left open first, so readers stop retrying (the record it was writing may be half done)."""
    cdef uint64_t expected = pid
    cdef uint64_t seq
    if pid == 0 or fp_load_relaxed(&h.lock_owner) != pid:
        return False
    seq = fp_load_relaxed(&h.seq)
    if seq & 1:
        fp_store_release(&h.seq, seq + 1)
    return fp_compare_exchange(&h.lock_owner, &expected, 0)


cdef inline void zone_write_begin(ZoneHeader *h) noexcept nogil:
    fp_store_relaxed(&h.seq, fp_load_relaxed(&h.seq) + 1)
    fp_fence_release()  # the odd sequence is visible before any record store that follows


cdef inline void zone_write_end(ZoneHeader *h) noexcept nogil:
    fp_store_release(&h.seq, fp_load_relaxed(&h.seq) + 1)


cdef inline uint64_t zone_read_begin(ZoneHeader *h) noexcept nogil:
    cdef int spins = 0
    cdef uint64_t seq = fp_load_acquire(&h.seq)
    while seq & 1:
        zone_pause(&spins)
        seq = fp_load_acquire(&h.seq)
    return seq


cdef inline bint zone_read_retry(ZoneHeader *h, uint64_t seq) noexcept nogil:
    """True if a write overlapped the reads made since zone_read_begin returned `seq`."""
    fp_fence_acquire()  # those reads complete before the sequence is read again
    return fp_load_relaxed(&h.seq) != seq


def zone_format(buffer, uint64_t version):
    """Write the header of a fresh zone (the master, once, before any fork hands it out)."""
    cdef Py_buffer view
    cdef ZoneHeader *h
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
    try:
        h = <ZoneHeader *>view.buf
        if view.len < <Py_ssize_t>sizeof(ZoneHeader) or (<size_t>view.buf) % 64 != 0:
            raise ValueError("a zone needs a 64-byte aligned buffer larger than its header")
        h.version = version
        h.size = view.len
        h.lock_owner = 0
        h.seq = 0
        fp_store_release(&h.magic, ZONE_MAGIC)
    finally:
        PyBuffer_Release(&view)


@cython.final
cdef class ZoneAccess:
    """One process's handle on a zone: its base address and size, from a buffer export that
    keeps the mapping alive. Feature accessors hold one and use header/base directly; the def
    methods are for the master (seqlock writes, force-unlock), readers on the admin path, and
    tests."""
    cdef Py_buffer _view
    cdef bint _has_view
    cdef ZoneHeader *header
    cdef char *base
    cdef readonly Py_ssize_t size
    cdef readonly uint64_t version

    def __cinit__(self, buffer, uint64_t version):
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        self.base = <char *>self._view.buf
        self.header = <ZoneHeader *>self.base
        self.size = self._view.len
        if (self.size < <Py_ssize_t>sizeof(ZoneHeader) or (<size_t>self.base) % 64 != 0
                or fp_load_acquire(&self.header.magic) != ZONE_MAGIC
                or self.header.version != version or self.header.size != <uint64_t>self.size):
            raise ValueError(f"not a fastproxy zone of layout version {version}")
        self.version = version

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    @property
    def lock_owner(self):
        return fp_load_relaxed(&self.header.lock_owner)

    @property
    def seq(self):
        return fp_load_relaxed(&self.header.seq)

    def lock(self):
        """Take the zone lock for this process (waits while another process holds it)."""
        cdef uint64_t pid = getpid()
        with nogil:
            zone_lock(self.header, pid)

    def unlock(self):
        zone_unlock(self.header)

    def force_unlock(self, uint64_t pid):
        """The master, after reaping `pid`: free the lock if that process died holding it."""
        return zone_force_unlock(self.header, pid)

    def write_begin(self):
        zone_write_begin(self.header)

    def write_end(self):
        zone_write_end(self.header)

    def read_begin(self):
        cdef uint64_t seq
        with nogil:
            seq = zone_read_begin(self.header)
        return seq

    def read_retry(self, uint64_t seq):
        return zone_read_retry(self.header, seq)
