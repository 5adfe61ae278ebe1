"""The pid file: how `fastproxy -s ...` and init scripts find the running master."""
from __future__ import annotations

import os
import signal
from typing import Optional

from fastproxy.errors import FastproxyError
from fastproxy.master import master_title

SIGNALS = {
    "reload": signal.SIGHUP,
    "quit": signal.SIGQUIT,
    "stop": signal.SIGTERM,
    "reopen": signal.SIGUSR1,
}


class PidFileError(FastproxyError):
    """The pid file is missing, unreadable, or names no running master; str() says which."""


def write_pid_file(path: str, pid: int) -> None:
    """Write atomically, so a reader never sees an empty or half-written file."""
    tmp = f"{path}.{pid}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise PidFileError(f"cannot write pid file {path}: {e.strerror}") from None


def read_pid_file(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise PidFileError(f"no pid file at {path}: is fastproxy running?") from None
    except OSError as e:
        raise PidFileError(f"cannot read pid file {path}: {e.strerror}") from None
    if not text.isdigit() or int(text) <= 0:
        raise PidFileError(f"pid file {path} does not hold a process id: {text[:40]!r}")
    return int(text)


def remove_pid_file(path: str, pid: int) -> None:
    """Remove the pid file if it still names `pid` (never another master's file)."""
    try:
        if read_pid_file(path) == pid:
            os.unlink(path)
    except (PidFileError, OSError):
        pass


def is_running_master(pid: int) -> bool:
    """True if `pid` is a live fastproxy master, not a stale pid reused by another program."""
    if pid == os.getpid():
        return False  # our own pid in a leftover file (a container restarted with the same pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user; the title below decides
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # alive and /proc hides it from us: assume the worst
    return cmdline.startswith(master_title("").encode())


def check_not_running(path: Optional[str]) -> None:
    """Refuse to start a second master on the same pid file."""
    if path is None:
        return
    try:
        pid = read_pid_file(path)
    except PidFileError:
        return  # missing or garbage: nothing to protect
    if is_running_master(pid):
        raise PidFileError(f"fastproxy is already running with pid {pid} (pid file {path})")


def signal_master(pid_file: Optional[str], name: str) -> int:
    """Send the master the signal for `name` (reload|quit|stop|reopen); return its pid."""
    if name not in SIGNALS:
        raise PidFileError(f"unknown signal {name!r}: use one of {', '.join(SIGNALS)}")
    if pid_file is None:
        raise PidFileError("the configuration sets no main.pid_file, so the master cannot be found")
    pid = read_pid_file(pid_file)
    if not is_running_master(pid):
        raise PidFileError(f"pid file {pid_file} names process {pid}, which is not a running fastproxy master "
                           "(stale pid file)")
    try:
        os.kill(pid, SIGNALS[name])
    except ProcessLookupError:
        raise PidFileError(f"process {pid} from {pid_file} exited just now") from None
    except PermissionError:
        raise PidFileError(f"not allowed to signal process {pid} (run as its user or root)") from None
    return pid
