"""The real zone and metrics accessors, callable from tests.

Their hot methods are cdef, so the tests compile fastproxy/core/zones.pyx and
fastproxy/core/metrics.pyx into a scratch module (as _core.pyx includes them) with thin def
wrappers and a few C loops that hammer a zone the way a worker would. Built once per test
session, whichever test asks first.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE_PYX = textwrap.dedent('''
    include "core/zones.pyx"
    include "core/metrics.pyx"

    from libc.stdint cimport uint64_t
    from includes.atomic cimport fp_fetch_add

    # --- metrics writer ---

    def open_metrics_writer(buffer, uint64_t version, geometry, int counter_slot):
        """A worker's writer over `counter_slot` of the metrics zone mapped at `buffer`."""
        return MetricsSlots(ZoneAccess(buffer, version), *geometry).writer(counter_slot)

    def request_done(MetricsWriter w, int route, int status, double seconds,
                     uint64_t bytes_in, uint64_t bytes_out):
        w.request_done(route, status, seconds, bytes_in, bytes_out)

    def upstream_request(MetricsWriter w, int upstream):
        w.upstream_request(upstream)

    def upstream_error(MetricsWriter w, int upstream, int kind):
        w.upstream_error(upstream, kind)

    def connection_opened(MetricsWriter w):
        w.connection_opened()

    def connection_closed(MetricsWriter w):
        w.connection_closed()

    def hammer(MetricsWriter w, long n, int route, int upstream, seconds):
        """n requests on one connection, counted as a worker does; n < 0 runs until killed.

        Request i has status class 1 + i % 5, duration seconds[i % 12], upstream error kind
        i % 3, 100 bytes in and 1000 out.
        """
        cdef double table[12]
        cdef long i = 0
        for i in range(12):
            table[i] = seconds[i]
        i = 0
        w.connection_opened()
        while n < 0 or i < n:
            w.upstream_request(upstream)
            w.request_done(route, 100 * (1 + i % 5), table[i % 12], 100, 1000)
            w.upstream_error(upstream, i % 3)
            i += 1
        w.connection_closed()

    # --- a test zone: words from the end of the header ---
    # GUARDED, GUARDED+1: a record written under the zone lock and read under its seqlock,
    #     complete when word 1 == ~word 0
    # STOP: nonzero tells the hammering loops to return
    # COUNTER: a word many processes fetch_add to
    # TOKENS: a word many processes take from with compare-and-swap, never below zero
    # READS: whole reads of the guarded record, all readers together

    cdef enum:
        GUARDED = 8
        STOP = 16
        COUNTER = 24
        TOKENS = 32
        READS = 40

    cdef inline uint64_t *word(ZoneAccess z, int index) noexcept nogil:
        return <uint64_t *>z.base + index

    def load(ZoneAccess z, int index):
        return fp_load_acquire(word(z, index))

    def store(ZoneAccess z, int index, uint64_t value):
        fp_store_release(word(z, index), value)

    cdef inline void update_guarded(ZoneAccess z, bint complete) noexcept nogil:
        """One writer's update of the guarded record; the caller holds the zone lock."""
        cdef uint64_t count = fp_load_relaxed(word(z, GUARDED)) + 1
        zone_write_begin(z.header)
        fp_store_relaxed(word(z, GUARDED), count)
        if complete:
            fp_store_relaxed(word(z, GUARDED + 1), ~count)
        zone_write_end(z.header)

    def hammer_locked(ZoneAccess z, int pause=0):
        """Update the guarded record under the lock until STOP, pausing `pause` spins between
        updates (readers of a record written without a break would always retry); returns
        how many updates it made."""
        cdef uint64_t pid = getpid()
        cdef long done = 0
        cdef int i
        with nogil:
            while not fp_load_relaxed(word(z, STOP)):
                zone_lock(z.header, pid)
                update_guarded(z, True)
                zone_unlock(z.header)
                done += 1
                for i in range(pause):
                    fp_cpu_relax()
        return done

    def lock_and_tear(ZoneAccess z):
        """Take the lock and leave a write half done, as a worker killed mid-update would."""
        cdef uint64_t pid = getpid()
        with nogil:
            zone_lock(z.header, pid)
            zone_write_begin(z.header)
            fp_store_relaxed(word(z, GUARDED), fp_load_relaxed(word(z, GUARDED)) + 1)

    def read_guarded(ZoneAccess z):
        """One seqlock read of the guarded record: (count, complete)."""
        cdef uint64_t seq, count, check
        while True:
            seq = zone_read_begin(z.header)
            count = fp_load_relaxed(word(z, GUARDED))
            check = fp_load_relaxed(word(z, GUARDED + 1))
            if not zone_read_retry(z.header, seq):
                return count, check == ~count

    def count_torn_reads(ZoneAccess z):
        """Seqlock reads of the guarded record until STOP: (reads, reads that saw it torn)."""
        cdef uint64_t seq, count, check
        cdef long reads = 0, torn = 0
        with nogil:
            while not fp_load_relaxed(word(z, STOP)):
                seq = zone_read_begin(z.header)
                count = fp_load_relaxed(word(z, GUARDED))
                check = fp_load_relaxed(word(z, GUARDED + 1))
                if zone_read_retry(z.header, seq):
                    continue
                reads += 1
                fp_fetch_add(word(z, READS), 1)
                if check != ~count:
                    torn += 1
        return reads, torn

    def hammer_fetch_add(ZoneAccess z, long n):
        cdef long i
        with nogil:
            for i in range(n):
                fp_fetch_add(word(z, COUNTER), 1)

    def take_tokens(ZoneAccess z, long tries):
        """Take one token per try while any is left, by compare-and-swap; returns how many."""
        cdef long i, taken = 0
        cdef uint64_t seen
        with nogil:
            for i in range(tries):
                seen = fp_load_relaxed(word(z, TOKENS))
                while seen > 0 and not fp_compare_exchange(word(z, TOKENS), &seen, seen - 1):
                    pass
                if seen > 0:
                    taken += 1
        return taken
''')

BUILD = textwrap.dedent('''
    import sys
    from Cython.Build import cythonize
    from setuptools import Extension, setup
    sys.argv[1:] = ["build_ext", "--inplace", "--quiet"]
    setup(ext_modules=cythonize(
        [Extension("zone_probe", ["zone_probe.pyx"], extra_compile_args=["-O2"])],
        include_path=[{include!r}],
        compiler_directives={{"language_level": 3, "boundscheck": False, "wraparound": False,
                              "cdivision": True}},
        quiet=True,
    ))
''')

_built = {}


def build(build_dir: Path):
    """Compile the probe in build_dir (first call only) and import it."""
    if "module" not in _built:
        (build_dir / "zone_probe.pyx").write_text(PROBE_PYX)
        script = BUILD.format(include=str(REPO / "fastproxy"))
        result = subprocess.run([sys.executable, "-c", script], cwd=build_dir,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        (so,) = build_dir.glob("zone_probe*.so")
        spec = importlib.util.spec_from_file_location("zone_probe", so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _built["module"] = module
    return _built["module"]
