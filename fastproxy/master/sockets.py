"""Listening sockets, bound and owned by the master, kept open across reloads.

Each [[listen]] address gets one SO_REUSEPORT socket per worker slot (the kernel
spreads connections across them), and worker #N of every generation inherits slot N's
socket. Because the master keeps them, a reload never closes a socket: connections
waiting in slot N's accept queue are taken by the next worker #N. A socket is closed
only when no configuration that workers still accept for wants it: an address removed from
the file, or a slot above a lowered `workers`, once the new generation is up.

The admin listener is a single ordinary socket shared by all workers.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from fastproxy.config.runtime import Address, Runtime
from fastproxy.errors import FastproxyError


class BindError(FastproxyError):
    def __init__(self, address: Address, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"cannot listen on {address}: {reason}")


def _resolve(address: Address) -> Tuple[int, tuple]:
    try:
        infos = socket.getaddrinfo(address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(address, e.strerror) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _open(address: Address, backlog: int, reuseport: bool) -> socket.socket:
    family, sockaddr = _resolve(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only; IPv4 is a separate [[listen]] (as in nginx).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # accepted sockets inherit it: no setsockopt per connection (Linux)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError(address, e.strerror or str(e)) from None
    return sock


# Seconds a connection on a `deferred` listener may stay silent before it is handed to a
# worker anyway (nginx's value); its client_header_timeout then runs as for any other.
DEFER_ACCEPT_SECONDS = 1


def _set_deferred(sock: socket.socket, deferred: bool) -> None:
    """TCP_DEFER_ACCEPT on or off: set on every bind, so a reload that changes the key changes
    the live socket (new connections only)."""
    if hasattr(socket, "TCP_DEFER_ACCEPT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS if deferred else 0)


def _check_free(address: Address) -> None:
    """Fail if another process listens on `address`.

    SO_REUSEPORT lets any process of the same user bind next to an existing listener
    and silently take a share of its connections (a second fastproxy started by
    mistake, say). A probe bound without SO_REUSEPORT still gets EADDRINUSE then.
    """
    _open(address, 1, reuseport=False).close()


@dataclass(frozen=True)
class ClosedSocket:
    address: Address
    slot: Optional[int]  # None for the admin listener

    def __str__(self) -> str:
        return f"{self.address} (admin)" if self.slot is None else f"{self.address} (slot {self.slot})"


def migrates_queued_connections() -> bool:
    """Whether the kernel hands the connections queued on a closed SO_REUSEPORT listener to
    the others of its group instead of resetting them (Linux 5.14+, off by default)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class ListenSockets:
    """The master's sockets, keyed by (address, slot) for listeners and by address for admin."""

    def __init__(self) -> None:
        self._listen: Dict[Tuple[Address, int], socket.socket] = {}
        self._admin: Dict[Address, socket.socket] = {}

    def bind(self, runtime: Runtime) -> None:
        """Make sure every socket `runtime` needs is open, binding only the missing ones.

        On a BindError the sockets bound by this call are closed again and the
        existing ones are left as they were, so a failed reload changes nothing.
        """
        added_listen: List[Tuple[Address, int]] = []
        added_admin: List[Address] = []
        try:
            held_ports = {addr.port for addr, _ in self._listen} | {addr.port for addr in self._admin}
            for listener in runtime.listeners:
                addr = listener.address
                if addr.port not in held_ports:
                    _check_free(addr)
                    held_ports.add(addr.port)
                for slot in range(runtime.main.workers):
                    sock = self._listen.get((addr, slot))
                    if sock is None:
                        sock = self._listen[addr, slot] = _open(addr, listener.backlog, reuseport=True)
                        added_listen.append((addr, slot))
                    else:
                        sock.listen(listener.backlog)  # takes effect on a live socket
                    _set_deferred(sock, listener.deferred)
            if runtime.admin is not None and runtime.admin.listen not in self._admin:
                self._admin[runtime.admin.listen] = _open(runtime.admin.listen, 511, reuseport=False)
                added_admin.append(runtime.admin.listen)
        except BindError:
            for key in added_listen:
                self._listen.pop(key).close()
            for addr in added_admin:
                self._admin.pop(addr).close()
            raise

    def for_slot(self, runtime: Runtime, slot: int) -> Tuple[socket.socket, ...]:
        """Slot `slot`'s sockets, parallel to runtime.listeners."""
        return tuple(self._listen[listener.address, slot] for listener in runtime.listeners)

    def admin(self, runtime: Runtime) -> Optional[socket.socket]:
        return None if runtime.admin is None else self._admin[runtime.admin.listen]

    def all(self) -> List[socket.socket]:
        return [*self._listen.values(), *self._admin.values()]

    def listens_on(self, address: Address) -> bool:
        return any(addr == address for addr, _ in self._listen)

    def close_unused(self, runtimes: Iterable[Runtime]) -> List[ClosedSocket]:
        """Close the sockets none of `runtimes` (those accepting workers serve) uses."""
        wanted_listen = set()
        wanted_admin = set()
        for runtime in runtimes:
            wanted_listen.update((l.address, slot) for l in runtime.listeners for slot in range(runtime.main.workers))
            if runtime.admin is not None:
                wanted_admin.add(runtime.admin.listen)
        closed = []
        for key in [k for k in self._listen if k not in wanted_listen]:
            self._listen.pop(key).close()
            closed.append(ClosedSocket(*key))
        for addr in [a for a in self._admin if a not in wanted_admin]:
            self._admin.pop(addr).close()
            closed.append(ClosedSocket(addr, None))
        return closed

    def close_all(self) -> None:
        self.close_unused(())
