# C atomics over the GCC/Clang __atomic builtins, for words that several processes share
# through a zone (fastproxy/shm/). Every word is an aligned uint64_t; 64-bit atomics are
# lock-free on the platforms we build for (x86-64, arm64), hence usable across processes.
#
# Relaxed loads and stores compile to plain moves: use them for a word with a single writer.
# Acquire/release order the accesses around them (locks, seqlocks, publishing a record).
# fetch_add and compare_exchange are the read-modify-writes for words with several writers.

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <sched.h>
    static inline uint64_t fp_load_relaxed(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline uint64_t fp_load_acquire(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void fp_store_relaxed(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline void fp_store_release(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline uint64_t fp_fetch_add(uint64_t *p, uint64_t v) {
        return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
    }
    /* On failure *expected gets the value found. */
    static inline int fp_compare_exchange(uint64_t *p, uint64_t *expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void fp_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void fp_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void fp_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    uint64_t fp_load_relaxed(const uint64_t *p) noexcept nogil
    uint64_t fp_load_acquire(const uint64_t *p) noexcept nogil
    void fp_store_relaxed(uint64_t *p, uint64_t v) noexcept nogil
    void fp_store_release(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t fp_fetch_add(uint64_t *p, uint64_t v) noexcept nogil
    bint fp_compare_exchange(uint64_t *p, uint64_t *expected, uint64_t desired) noexcept nogil
    void fp_fence_acquire() noexcept nogil
    void fp_fence_release() noexcept nogil
    void fp_cpu_relax() noexcept nogil
    int sched_yield() noexcept nogil
