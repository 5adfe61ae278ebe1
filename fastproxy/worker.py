"""A worker process, from fork to exit: signals, event loop, servers, drain.

Runs once per worker; the per-request work happens in fastproxy._core.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import resource
import signal
import sys

# Imported here, in the master, not after fork: loading uvloop's extension costs each new
# worker 7-9 ms of CPU on every reload, next to the old workers still serving.
import uvloop
from setproctitle import setproctitle

from fastproxy import _core
from fastproxy.admin import start_admin
from fastproxy.shm.reader import configured_servers
from fastproxy.master import WORKER_BOOT_ERROR, WORKER_SIGNALS, WorkerContext, worker_title

log = logging.getLogger("fastproxy.worker")

_PR_SET_PDEATHSIG = 1


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Keep relayed buffers (up to 256 KiB per read) on a heap that is reused: by default
    glibc returns that memory with brk() after every large free and takes it back on the
    next read, paying page faults on every buffer (13 brk calls per 1 MiB response).
    The memory of a burst of connections is given back by the sweep instead
    (WorkerCore.return_memory), once the burst is over."""
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 8 << 20)


def limit_descriptors(limit) -> None:
    """[main] worker_rlimit_nofile: the soft limit, and the hard one when it must rise (which
    takes root); without root a worker keeps the hard limit and says so."""
    if limit is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.warning("worker_rlimit_nofile %d is above this process's hard limit %d: using %d",
                    limit, hard, hard)


def exit_with_master(master_pid: int) -> None:
    """Ask the kernel for SIGQUIT when the master dies, so no worker outlives it holding
    the port (nor the health checker it); a master that died before this call is caught by
    the ppid check."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
    if os.getppid() != master_pid:
        sys.exit(0)


class Worker:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.loop = None
        self.core = None
        self.servers = []
        self.admin = None
        self.draining = False

    def boot(self) -> None:
        ctx = self.ctx
        runtime = ctx.runtime
        setproctitle(worker_title(ctx.slot, ctx.generation))
        exit_with_master(ctx.master_pid)
        _tune_malloc()
        limit_descriptors(runtime.main.worker_rlimit_nofile)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.core = _core.WorkerCore(
            self.loop, runtime, ctx.route_ids, ctx.upstream_ids, ctx.server_ids,
            ctx.metrics.writer(ctx.counter_slot), ctx.zones, self.loop.stop, log)
        for listener, sock, factory in zip(runtime.listeners, ctx.listen_sockets, self.core.factories):
            if listener.tls is None:
                self.servers.append(self.core.accept_on(sock, factory, listener.backlog))
                continue
            # a TLS handshake is bounded like the request head that follows it
            self.servers.append(self.loop.run_until_complete(self.loop.create_server(
                factory, sock=sock, backlog=listener.backlog, ssl=listener.tls.front,
                ssl_handshake_timeout=runtime.main.client_header_timeout)))
        if ctx.admin_socket is not None:
            self.admin = self.loop.run_until_complete(
                start_admin(self.loop, ctx.admin_socket, ctx.metrics,
                            configured_servers(runtime)))
        self.loop.add_signal_handler(signal.SIGQUIT, self.drain)
        self.loop.add_signal_handler(signal.SIGTERM, self.stop)
        self.loop.add_signal_handler(signal.SIGINT, self.stop)
        self.loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # only the master reloads
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        self.core.start()
        # Everything built so far lives as long as the worker: keep the cycle
        # collector from walking it again on every collection.
        gc.freeze()

    def announce_ready(self) -> None:
        if self.ctx.ready_fd >= 0:
            os.write(self.ctx.ready_fd, b"1")
            os.close(self.ctx.ready_fd)

    def drain(self) -> None:
        """QUIT: stop accepting at once, finish in-flight work, then exit."""
        if self.draining:
            return
        self.draining = True
        setproctitle(worker_title(self.ctx.slot, self.ctx.generation, draining=True))
        for server in self.servers:
            server.close()  # closes this process's copy only: the master keeps the socket
        if self.admin is not None:
            self.admin.close()
        self.core.drain(self.ctx.runtime.main.shutdown_timeout)

    def stop(self) -> None:
        """TERM/INT: exit now."""
        self.core.flush_logs()
        self.loop.stop()

    def reopen_logs(self) -> None:
        from fastproxy.log import reopen_error_log

        reopen_error_log()
        try:
            self.core.reopen_logs()
        except OSError as e:
            log.error("cannot reopen the access log: %s", e)


def run(ctx: WorkerContext) -> None:
    """Serve until told to stop; leaves through SystemExit (the master's fork wrapper
    turns its code into the process exit status)."""
    worker = Worker(ctx)
    try:
        worker.boot()
    except Exception:
        log.exception("worker #%d failed to start", ctx.slot)
        sys.exit(WORKER_BOOT_ERROR)
    worker.announce_ready()
    worker.loop.run_forever()
    worker.core.flush_logs()
    sys.exit(0)
