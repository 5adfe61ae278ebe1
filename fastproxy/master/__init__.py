"""The master process: binds listeners, forks and reaps workers, reloads, stops.

This package file holds only what a worker needs from the master (the context it is
handed at fork, its exit-code contract and its process title), so that
fastproxy.worker can import it without pulling in the arbiter.
"""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

from fastproxy.config.runtime import Runtime

if TYPE_CHECKING:
    from fastproxy.shm import MetricsZone, ZoneSet

# A worker exits with this code when it could not start serving (bad privileges,
# a failing import, ...). The master then stops at startup, or abandons a reload,
# instead of respawning it in a loop.
WORKER_BOOT_ERROR = 3

# Signals the master has blocked when it forks. worker.run() is entered with these
# still blocked (and default dispositions, HUP ignored) so that none is lost or acted
# on before the worker has installed its own handlers; it must then unblock them:
#     signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
# Anything that arrived in between is delivered at that moment.
WORKER_SIGNALS = frozenset({
    signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD,
})


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker receives from the master at fork; it never reads the config file.

    ready_fd: the write end of a pipe; the worker writes one byte to it (then closes it)
    once its servers accept connections. The master starts draining the previous
    generation only when every new worker has done so. -1 when there is none.
    """
    runtime: Runtime
    slot: int  # 0 .. runtime.main.workers - 1
    generation: int  # 1 at startup, +1 per successful reload
    listen_sockets: Tuple[socket.socket, ...]  # parallel to runtime.listeners; this slot's sockets
    admin_socket: Optional[socket.socket]  # shared by all workers; None without [admin]
    metrics: "MetricsZone"
    counter_slot: int  # the worker's own slot in the metrics zone
    zones: "ZoneSet"  # every zone of its generation, by name, the metrics zone included
    route_ids: Tuple[int, ...]  # parallel to runtime.all_routes
    upstream_ids: Tuple[int, ...]  # parallel to runtime.upstreams
    server_ids: Tuple[Tuple[int, ...], ...]  # parallel to runtime.upstreams, then to its servers
    master_pid: int
    ready_fd: int = -1


def worker_title(slot: int, generation: int, draining: bool = False) -> str:
    """The process title a worker shows in ps/top."""
    title = f"fastproxy: worker process #{slot} (generation {generation})"
    return title + " shutting down" if draining else title


def master_title(config_path: str) -> str:
    return f"fastproxy: master process {config_path}"
