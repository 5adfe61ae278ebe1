"""The error log: one line per event, nginx-like, from the master and every worker.

    2026/11/26 19:55:00 [error] 12345#0: worker #0 exited with code 1
                               pid   label (the worker's slot, or "master")

Every process writes to the same file through its own O_APPEND descriptor with one
write() per line, so lines from different processes never interleave. The error log
is low volume; it is not the access log (which the workers buffer themselves).
Use it through the standard logging module: logging.getLogger("fastproxy.<part>").
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Optional

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LEVEL_NAMES = {
    logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
    logging.ERROR: "error", logging.CRITICAL: "crit",
}
_STDERR = "stderr"

logger = logging.getLogger("fastproxy")


class _ErrorLogHandler(logging.Handler):
    def __init__(self, path: str, label: str):
        super().__init__()
        self.path = path
        self.label = label
        self.fd = 2 if path == _STDERR else self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        level = _LEVEL_NAMES.get(record.levelno, record.levelname.lower())
        line = f"{stamp} [{level}] {os.getpid()}#{self.label}: {record.getMessage()}\n"
        if record.exc_info:
            line += "".join(traceback.format_exception(*record.exc_info))
        return line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, self.format(record).encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def reopen(self) -> None:
        """Point our descriptor at a fresh open of the path (after logrotate moved the file).

        dup2 keeps the descriptor number, so there is no moment without a log.
        """
        if self.fd == 2:
            return
        fresh = self._open()
        os.dup2(fresh, self.fd)
        os.close(fresh)

    def close(self) -> None:
        if self.fd != 2:
            os.close(self.fd)
            self.fd = 2
        super().close()


def _handler() -> Optional[_ErrorLogHandler]:
    for handler in logger.handlers:
        if isinstance(handler, _ErrorLogHandler):
            return handler
    return None


def setup_error_log(path: str, level: str, process_label: str) -> None:
    """(Re)direct the "fastproxy" logger to `path` ("stderr" or a file) at `level`.

    Raises OSError when the file cannot be opened; the previous setup then stays.
    """
    new = _ErrorLogHandler(path, process_label)
    old = _handler()
    logger.addHandler(new)
    if old is not None:
        logger.removeHandler(old)
        old.close()
    logger.setLevel(LEVELS[level])
    logger.propagate = False


def reopen_error_log() -> None:
    """Reopen the error log file (USR1, after logrotate renamed it)."""
    handler = _handler()
    if handler is not None:
        handler.reopen()


def set_process_label(label: str) -> None:
    """Relabel this process's lines, e.g. a worker after fork: set_process_label(str(slot))."""
    handler = _handler()
    if handler is not None:
        handler.label = label
