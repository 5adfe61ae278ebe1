"""The systemd notify protocol (sd_notify(3)), so the unit can be Type=notify.

A datagram of "KEY=value" lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET
("@name" is the abstract namespace). Without NOTIFY_SOCKET every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger("fastproxy.master")


class Notifier:
    def __init__(self, address: Optional[str] = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address = None
        self._sock = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            # systemd going away must never take the proxy down with it.
            log.warning("sd_notify to %r failed: %s", self._address, e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def reloading(self, status: str) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
