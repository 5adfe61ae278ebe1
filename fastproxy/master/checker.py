"""The health checker: one process for the whole instance that probes every server of every
upstream with `[upstreams.NAME.health]` and writes its verdict into the metrics zone, where
every worker reads it (docs/health-checks.md).

The master forks it once a generation is current (Master.start_checker), with that
generation's runtime and server indexes, and replaces it on every reload; it inherits the
zones through the fork and never reads the config. It runs its own small event loop: the work
is a few probes per interval, never per request, so it is plain Python.

Per server, the checker keeps only consecutive pass and failure counts, in memory; the state
it starts from is the zone's (a reload or a restart keeps a down server down until it passes
`healthy_threshold` probes). A server not checked yet is CHECK_UNKNOWN and takes traffic; its
first probe decides (up or down), after which the thresholds apply.

Master call sequence (in the forked child)::

    checker.run(targets(runtime, server_ids), metrics.slots, master_pid)   # never returns
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import httptools
import uvloop
from setproctitle import setproctitle

from fastproxy.config.runtime import Address, HealthCheck, Runtime
from fastproxy.log import reopen_error_log
from fastproxy.master import WORKER_SIGNALS
from fastproxy.shm.layout import CHECK_FAILURE_NAMES, CHECK_STATE_NAMES

log = logging.getLogger("fastproxy.checker")

TITLE = "fastproxy: health checker"
BODY_LIMIT = 64 * 1024  # body bytes read for expect_body; the rest of a longer body is not read
HEAD_LIMIT = 16 * 1024  # a response head larger than this fails the probe
USER_AGENT = b"fastproxy-health-check"

UNKNOWN, UP, DOWN = (CHECK_STATE_NAMES.index(name) for name in ("unknown", "up", "down"))
(PASSED, FAIL_CONNECT, FAIL_TIMEOUT, FAIL_CLOSED, FAIL_INVALID, FAIL_STATUS,
 FAIL_BODY) = range(len(CHECK_FAILURE_NAMES))


@dataclass(frozen=True)
class Target:
    """One server to probe: where, how, and where its verdict goes."""
    upstream: str
    address: Address
    index: int  # its server index in the metrics zone
    check: HealthCheck
    request: bytes  # the probe request, built once
    tls: Optional[ssl.SSLContext]  # the upstream's (Upstream.tls): probes use TLS as requests do
    tls_name: Optional[str]  # the name verified and sent as SNI (Server.tls_name)

    @property
    def what(self) -> str:
        return f"{self.check.method.decode()} {self.check.path.decode('latin-1')}"


def targets(runtime: Runtime, server_ids: Sequence[Sequence[int]]) -> Tuple[Target, ...]:
    """The servers to probe for a generation (`server_ids` parallel to runtime.upstreams);
    empty when no upstream has checks (then no checker runs)."""
    found: List[Target] = []
    for upstream, ids in zip(runtime.upstreams, server_ids):
        check = upstream.health
        if check is None:
            continue
        for server, index in zip(upstream.servers, ids):
            host = check.host if check.host is not None else str(server.address).encode()
            request = (check.method + b" " + check.path + b" HTTP/1.1\r\nHost: " + host
                       + b"\r\nUser-Agent: " + USER_AGENT + b"\r\nConnection: close\r\n\r\n")
            found.append(Target(upstream.name, server.address, index, check, request, upstream.tls,
                                server.tls_name))
    return tuple(found)


class Result(NamedTuple):
    failure: int  # PASSED or FAIL_*
    status: int  # the response's status; 0: none came
    reason: str  # for the error log: "GET /healthz: status 500", "timeout after 2s"


class _Response:
    """httptools callbacks: the status, and the body up to BODY_LIMIT."""

    def __init__(self):
        self.head_done = False
        self.complete = False
        self.body = bytearray()

    def on_headers_complete(self):
        self.head_done = True

    def on_body(self, data: bytes):
        self.body += data[:BODY_LIMIT - len(self.body)]

    def on_message_complete(self):
        self.complete = True


async def probe(target: Target) -> Result:
    """One probe: connect, send, read the response (bounded), judge it."""
    check = target.check
    try:
        async with asyncio.timeout(check.timeout):
            try:
                reader, writer = await asyncio.open_connection(
                    target.address.host, target.address.port, ssl=target.tls, server_hostname=target.tls_name,
                    ssl_handshake_timeout=None if target.tls is None else check.timeout + 1)
            except ConnectionRefusedError:
                return Result(FAIL_CONNECT, 0, "connect refused")
            except ssl.SSLError as e:
                return Result(FAIL_CONNECT, 0, f"TLS handshake failed: {e.reason or e}")
            except OSError as e:
                return Result(FAIL_CONNECT, 0, f"connect failed: {e.strerror or e}")
            try:
                writer.write(target.request)
                return await _read(target, reader)
            finally:
                writer.transport.abort()  # nothing more to say; no lingering close
    except TimeoutError:
        return Result(FAIL_TIMEOUT, 0, f"timeout after {check.timeout:g}s")


async def _read(target: Target, reader: asyncio.StreamReader) -> Result:
    response = _Response()
    parser = httptools.HttpResponseParser(response)
    head_only = target.check.method == b"HEAD"
    received = 0
    while not (response.complete or response.head_done and (head_only or len(response.body) >= BODY_LIMIT)):
        try:
            data = await reader.read(65536)
        except OSError:
            return Result(FAIL_CLOSED, 0, "connection reset before a full response")
        if not data:
            if response.head_done:
                break  # the end of a body delimited by the close
            return Result(FAIL_CLOSED, 0, "closed before a full response")
        received += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            break
        except httptools.HttpParserError:
            return Result(FAIL_INVALID, 0, "invalid response")
        if not response.head_done and received > HEAD_LIMIT:
            return Result(FAIL_INVALID, 0, f"response head over {HEAD_LIMIT // 1024} KiB")
    status = parser.get_status_code()
    check = target.check
    if not any(low <= status <= high for low, high in check.expect_status):
        return Result(FAIL_STATUS, status, f"{target.what}: status {status}")
    if check.expect_body is not None and check.expect_body not in response.body:
        return Result(FAIL_BODY, status, f"body lacks '{check.expect_body.decode(errors='replace')}'")
    return Result(PASSED, status, f"{target.what}: status {status}")


class Tally:
    """A server's consecutive passes and failures, and the state they lead to."""

    def __init__(self, state: int, check: HealthCheck):
        self.state = state
        self.check = check
        self.passes = self.failures = 0

    def add(self, passed: bool) -> bool:
        """Count one probe; True when the state changed. From UNKNOWN the first probe decides."""
        if passed:
            self.passes, self.failures = self.passes + 1, 0
        else:
            self.passes, self.failures = 0, self.failures + 1
        if self.state == UNKNOWN:
            new = UP if passed else DOWN
        elif self.state == DOWN and self.passes >= self.check.healthy_threshold:
            new = UP
        elif self.state == UP and self.failures >= self.check.unhealthy_threshold:
            new = DOWN
        else:
            return False
        self.state = new
        return True


async def watch(target: Target, slots) -> None:
    """Probe one server every `interval` (start to start), for ever."""
    loop = asyncio.get_running_loop()
    tally = Tally(slots.server_state(target.index)["check_state"], target.check)
    while True:
        started = loop.time()
        result = await probe(target)
        passed = result.failure == PASSED
        if tally.add(passed):
            count = "" if tally.passes + tally.failures == 1 else \
                f" ({tally.passes if passed else tally.failures} probes in a row)"
            (log.info if passed else log.warning)(
                "upstream %s server %s is %s: %s%s", target.upstream, target.address,
                CHECK_STATE_NAMES[tally.state], result.reason, count)
        slots.set_check_result(target.index, tally.state, result.status, int(time.time() * 1e6),
                               result.failure)
        await asyncio.sleep(max(0.0, started + target.check.interval - loop.time()))


def run(checks: Sequence[Target], slots, master_pid: int) -> None:
    """The checker process, entered with WORKER_SIGNALS blocked (as a worker is); QUIT, TERM
    and INT stop it at once (it holds nothing that needs draining). Leaves through
    SystemExit: 0 when stopped, 1 when a probe loop failed (a bug: the master restarts it)."""
    from fastproxy.worker import exit_with_master

    setproctitle(TITLE)
    exit_with_master(master_pid)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    failed: List[BaseException] = []

    def on_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())
            log.error("health checker failed", exc_info=task.exception())
            loop.stop()

    for signum in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    loop.add_signal_handler(signal.SIGUSR1, reopen_error_log)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    for target in checks:
        loop.create_task(watch(target, slots)).add_done_callback(on_done)
    log.info("health checker started: %d servers", len(checks))
    loop.run_forever()
    sys.exit(1 if failed else 0)

