"""The master process: one loop that reacts to signals and to its workers.

Signal handlers only append to a queue; the loop wakes on the self-pipe
(signal.set_wakeup_fd) or on a worker's ready pipe, and dispatches:

    HUP   reload: new config -> new generation -> once all ready, old generation drains
    QUIT  graceful stop: every worker drains, then the master exits 0
    TERM  fast stop (INT too): workers exit at once
    USR1  reopen the error log, and tell the workers to reopen theirs
    CHLD  reap; a worker of the current generation that died is replaced

A generation is one configuration and the set of workers forked for it. Workers of a
generation that is not current are draining (or failed to boot) and are never
replaced; the master SIGKILLs any still alive after their shutdown_timeout.

When the current generation has upstreams with health checks, the master also runs one
health checker process (fastproxy/master/checker.py), as nginx runs its cache manager:
started once the generation is current, replaced (the old one stopped first: never two at
once) when another becomes current, restarted with backoff if it dies, stopped with the
workers.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass
from typing import Deque, Dict, Optional, Tuple

from setproctitle import setproctitle

from fastproxy import worker
from fastproxy.config import load_runtime
from fastproxy.config.runtime import Runtime
from fastproxy.config.tls import expiry_warnings
from fastproxy.errors import ConfigError
from fastproxy.log import reopen_error_log, set_process_label, setup_error_log
from fastproxy.master import WORKER_BOOT_ERROR, WORKER_SIGNALS, WorkerContext, checker, master_title
from fastproxy.master.pidfile import PidFileError, check_not_running, remove_pid_file, write_pid_file
from fastproxy.master.sockets import BindError, ListenSockets, migrates_queued_connections
from fastproxy.master.systemd import Notifier
from fastproxy.shm import WORKER_DRAINING, MetricsZone, ZoneFull, ZoneSet, declared_zones
from fastproxy.shm.layout import MAX_WORKERS, ZONE_NAME as METRICS_ZONE_NAME

log = logging.getLogger("fastproxy.master")

READY_TIMEOUT = 10.0  # a new worker that has not signalled readiness by then failed to boot
FAST_STOP_TIMEOUT = 2.0  # after TERM, workers still alive this long are killed
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start makes its slot back off
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
MAX_WAIT = 1.0  # the loop re-checks its timers at least this often


@dataclass(eq=False)
class Generation:
    number: int
    runtime: Runtime
    zones: ZoneSet
    route_ids: Tuple[int, ...]
    upstream_ids: Tuple[int, ...]
    server_ids: Tuple[Tuple[int, ...], ...] = ()  # per upstream, per server

    def all_server_ids(self):
        return [i for ids in self.server_ids for i in ids]


@dataclass(eq=False)
class WorkerProcess:
    """The master's record of one worker process."""
    pid: int
    slot: int
    generation: Generation
    ready_fd: int  # read end of the ready pipe; -1 once closed
    started: float
    ready: bool = False
    draining: bool = False
    kill_at: Optional[float] = None  # SIGKILL if still alive then


@dataclass(eq=False)
class CheckerProcess:
    """The master's record of the health checker."""
    pid: int
    started: float
    stopping: bool = False  # told to stop: for a newer generation, or the master's stop
    kill_at: Optional[float] = None  # SIGKILL if still alive then


class SpawnError(Exception):
    """A worker could not be forked (no counter slot, no fd, fork failed); str() says why."""


@dataclass
class SlotBackoff:
    """Respawn pacing for one slot (or the health checker): at once, then 0.1s doubling to 10s
    while it keeps dying young."""
    delay: float = 0.0  # wait before the next respawn if this slot's worker dies young again
    respawn_at: Optional[float] = None

    def schedule(self, now: float, died_young: bool) -> float:
        if not died_young:
            self.delay = 0.0
        wait, self.delay = self.delay, min(max(self.delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
        self.respawn_at = now + wait
        return wait


class Master:
    def __init__(self, config_path: str, runtime: Runtime):
        self.config_path = config_path
        self.runtime = runtime  # of the current generation, or the one booting at startup
        self.pid = os.getpid()
        self.pid_file: Optional[str] = None  # the pid file this master wrote and owns
        self.sockets = ListenSockets()
        self.notifier = Notifier()
        self.metrics: Optional[MetricsZone] = None  # created with the first generation's zones
        self.current: Optional[Generation] = None
        self.pending: Optional[Generation] = None  # booting; becomes current once all its workers are ready
        self.pending_deadline = 0.0
        self.reload_again = False  # a HUP arrived while a generation was booting
        self.workers: Dict[int, WorkerProcess] = {}  # by pid
        self.backoff: Dict[int, SlotBackoff] = collections.defaultdict(SlotBackoff)  # by slot, current generation
        self.checker: Optional[CheckerProcess] = None
        self.checker_backoff = SlotBackoff()
        self.stopping = False
        self.exit_code = 0
        self.signals: Deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.wake_r = self.wake_w = -1

    # ---- startup and shutdown ------------------------------------------------------------------

    def run(self) -> int:
        setproctitle(master_title(self.config_path))
        main = self.runtime.main
        try:
            setup_error_log(main.error_log, main.log_level, "master")
        except OSError as e:
            print(f"fastproxy: cannot open error log {main.error_log}: {e.strerror}", file=sys.stderr)
            return 1
        try:
            try:
                check_not_running(main.pid_file)
                self.sockets.bind(self.runtime)
                if main.pid_file is not None:
                    write_pid_file(main.pid_file, self.pid)
                    self.pid_file = main.pid_file
            except (PidFileError, BindError) as e:
                self.fatal(str(e))
                return 1
            except OSError as e:
                self.fatal(f"cannot start: {e}")
                return 1
            self.install_signals()
            log.info("fastproxy master started, pid %d, config %s", self.pid, self.config_path)
            self.start_generation(self.runtime, 1)
            return self.loop()
        finally:
            if self.pid_file is not None:
                remove_pid_file(self.pid_file, self.pid)
            self.sockets.close_all()
            self.notifier.close()

    def fatal(self, message: str) -> None:
        """A startup failure: to the error log, and to the terminal if the log is a file."""
        log.error("%s", message)
        if self.runtime.main.error_log != "stderr":
            print(f"fastproxy: {message}", file=sys.stderr)

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        for signum in WORKER_SIGNALS:
            signal.signal(signum, self.enqueue_signal)

    def enqueue_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    def loop(self) -> int:
        while True:
            for key, _ in self.selector.select(self.next_timeout()):
                if key.fd == self.wake_r:
                    self.drain_wakeup_pipe()
                else:
                    self.on_ready_pipe(key.data)
            while self.signals:
                self.dispatch(self.signals.popleft())
            self.run_timers()
            if self.stopping and not self.workers and self.checker is None:
                log.info("all workers exited, master exiting")
                return self.exit_code

    def drain_wakeup_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def dispatch(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum == signal.SIGHUP:
            self.handle_hup()
        elif signum == signal.SIGQUIT:
            self.handle_quit()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.handle_term()
        elif signum == signal.SIGUSR1:
            self.handle_usr1()

    # ---- signals -----------------------------------------------------------------------------

    def handle_hup(self) -> None:
        if self.stopping:
            return
        if self.pending is not None:
            self.reload_again = True  # one more reload once this generation has booted
            return
        log.info("reloading configuration %s", self.config_path)
        self.notifier.reloading("reloading configuration")
        try:
            runtime = load_runtime(self.config_path)
        except ConfigError as e:
            for problem in str(e).splitlines():
                log.error("invalid configuration: %s", problem)
            return self.reload_failed("the configuration is invalid")
        except Exception:
            # The master must survive anything a reload throws and keep serving.
            log.exception("unexpected error while loading %s", self.config_path)
            return self.reload_failed("the configuration could not be loaded")
        if runtime.main.pid_file not in (None, self.pid_file):
            try:
                check_not_running(runtime.main.pid_file)
            except PidFileError as e:
                return self.reload_failed(str(e))
        try:
            self.sockets.bind(runtime)
        except BindError as e:
            return self.reload_failed(str(e))
        if (runtime.main.error_log, runtime.main.log_level) != (self.runtime.main.error_log,
                                                                self.runtime.main.log_level):
            try:
                setup_error_log(runtime.main.error_log, runtime.main.log_level, "master")
            except OSError as e:
                log.error("cannot open error log %s: %s; keeping the current one",
                          runtime.main.error_log, e.strerror)
        self.start_generation(runtime, self.current.number + 1)

    def reload_failed(self, reason: str) -> None:
        log.error("reload failed: %s; still serving generation %d", reason, self.current.number)
        self.close_unused_sockets()  # those bound for the failed configuration
        self.reload_done(f"{self.serving_status()} (last reload failed)")

    def reload_done(self, status: str) -> None:
        self.notifier.ready(status)
        if self.reload_again:
            self.reload_again = False
            self.signals.append(signal.SIGHUP)

    def handle_quit(self) -> None:
        if self.stopping:
            return
        log.info("graceful stop: draining all workers")
        self.notifier.stopping("stopping: draining workers")
        self.begin_stop()
        for w in list(self.workers.values()):
            self.drain(w)
        self.stop_checker()

    def handle_term(self) -> None:
        log.info("fast stop")
        self.notifier.stopping("stopping")
        self.begin_stop()
        deadline = time.monotonic() + FAST_STOP_TIMEOUT
        for w in self.workers.values():
            self.kill(w.pid, signal.SIGTERM)
            w.kill_at = min(w.kill_at or deadline, deadline)
        self.stop_checker()

    def begin_stop(self) -> None:
        """From now on nothing starts: no reload, no respawn; the loop ends when the last worker is reaped."""
        self.stopping = True
        self.pending = None
        self.reload_again = False
        self.backoff.clear()
        self.checker_backoff = SlotBackoff()

    def handle_usr1(self) -> None:
        try:
            reopen_error_log()
        except OSError as e:
            log.error("cannot reopen the error log: %s", e)
        log.info("reopened log files")
        for w in self.workers.values():
            self.kill(w.pid, signal.SIGUSR1)
        if self.checker is not None:
            self.kill(self.checker.pid, signal.SIGUSR1)

    # ---- generations ---------------------------------------------------------------------------

    def start_generation(self, runtime: Runtime, number: int) -> None:
        """Fork one worker per slot for `runtime`; it becomes current once all are ready."""
        for warning in expiry_warnings(runtime):
            log.warning("%s", warning)
        if len(self.workers) + runtime.main.workers > MAX_WORKERS:
            return self.abandon_pending(
                f"cannot start {runtime.main.workers} workers while {len(self.workers)} are alive "
                f"(at most {MAX_WORKERS} at a time); wait for the previous generation to drain")
        try:
            zones = self.open_zones(runtime)
            live = self.live_generations()
            route_ids = self.metrics.register_routes(
                [r.name for r in runtime.all_routes], {i for gen in live for i in gen.route_ids})
            upstream_ids = self.metrics.register_upstreams(
                [u.name for u in runtime.upstreams], {i for gen in live for i in gen.upstream_ids})
            flat = iter(self.metrics.register_servers(
                [u.server_key(s) for u in runtime.upstreams for s in u.servers],
                {i for gen in live for i in gen.all_server_ids()}))
            server_ids = tuple(tuple(next(flat) for _ in u.servers) for u in runtime.upstreams)
        except (ZoneFull, ValueError) as e:
            return self.abandon_pending(str(e))
        except OSError as e:
            return self.abandon_pending(f"cannot map the shared zones: {e}")
        self.pending = Generation(number, runtime, zones, route_ids, upstream_ids, server_ids)
        self.pending_deadline = time.monotonic() + READY_TIMEOUT
        for slot in range(runtime.main.workers):
            try:
                self.spawn(self.pending, slot)
            except SpawnError as e:
                return self.abandon_pending(str(e))

    def open_zones(self, runtime: Runtime) -> ZoneSet:
        """The zones `runtime` declares, those of the current generation reused where their
        spec is unchanged; the metrics zone is made with the first generation and kept."""
        zones = ZoneSet.open(declared_zones(runtime), self.current.zones if self.current else None)
        if self.metrics is None:
            self.metrics = MetricsZone.create(zones[METRICS_ZONE_NAME])
        return zones

    def live_generations(self):
        """Generations that may still count: the current one and any with a worker alive."""
        live = {id(w.generation): w.generation for w in self.workers.values()}
        if self.current is not None:
            live[id(self.current)] = self.current
        return live.values()

    def on_ready_pipe(self, w: WorkerProcess) -> None:
        try:
            byte = os.read(w.ready_fd, 1)
        except OSError:
            byte = b""
        self.close_ready_pipe(w)
        if not byte:
            return  # closed without a word: it exited (CHLD follows) or never will be ready
        w.ready = True
        log.debug("worker #%d pid %d (generation %d) is ready", w.slot, w.pid, w.generation.number)
        if w.generation is self.pending and all(x.ready for x in self.workers.values()
                                                if x.generation is self.pending):
            self.commit_pending()

    def commit_pending(self) -> None:
        """The booting generation is fully up: make it current and drain every older worker."""
        gen, self.pending = self.pending, None
        first = self.current is None
        self.current, self.runtime = gen, gen.runtime
        self.backoff.clear()  # the new generation covers every slot; scheduled respawns are moot
        self.metrics.set_master_info(self.pid, gen.number, self.config_path)
        self.metrics.mark_removed_servers(gen.all_server_ids())
        for w in list(self.workers.values()):
            if w.generation is not gen:
                self.drain(w)
        self.replace_checker()
        if gen.runtime.main.pid_file != self.pid_file:
            self.move_pid_file(gen.runtime.main.pid_file)
        # Draining workers have stopped accepting: a listener only they used (the slots above
        # a lowered `workers`, a removed address) must go now, or the kernel keeps queueing
        # new connections on it that nobody accepts for the whole drain.
        self.close_unused_sockets()
        if first:
            log.info("generation 1 ready: %d workers", gen.runtime.main.workers)
        else:
            log.info("generation %d ready: %d workers; draining the previous generation",
                     gen.number, gen.runtime.main.workers)
        self.reload_done(self.serving_status())

    def move_pid_file(self, path: Optional[str]) -> None:
        """main.pid_file changed in a reload that took effect: write the new file, then
        remove ours (as nginx does), so `fastproxy -s` with the new config finds us."""
        if path is not None:
            try:
                write_pid_file(path, self.pid)
            except PidFileError as e:
                log.error("%s; the pid file stays %s", e, self.pid_file)
                return
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, self.pid)
        self.pid_file = path

    def abandon_pending(self, reason: str) -> None:
        """A new generation could not start: stop the master at startup, keep the current one on reload."""
        gen, self.pending = self.pending, None
        for w in list(self.workers.values()):
            if gen is not None and w.generation is gen:
                if w.ready:
                    self.drain(w)  # it may hold accepted connections: let it finish them
                else:
                    self.kill(w.pid, signal.SIGKILL)
        if self.current is None:
            self.fatal(f"{reason}; stopping")
            self.begin_stop()
            self.exit_code = 1
        else:
            self.reload_failed(reason)

    def serving_status(self) -> str:
        return f"serving, generation {self.current.number}, {self.current.runtime.main.workers} workers"

    # ---- workers -------------------------------------------------------------------------------

    def spawn(self, gen: Generation, slot: int) -> None:
        """Fork worker #slot of `gen`. Raises SpawnError (with nothing left behind) if it cannot."""
        try:
            counter_slot = self.metrics.assign_counter_slot()
        except ZoneFull as e:
            raise SpawnError(f"cannot start worker #{slot}: {e}") from None
        try:
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            self.metrics.release_counter_slot(counter_slot)
            raise SpawnError(f"cannot start worker #{slot}: {e}") from None
        runtime = gen.runtime
        ctx = WorkerContext(
            runtime=runtime,
            slot=slot,
            generation=gen.number,
            listen_sockets=self.sockets.for_slot(runtime, slot),
            admin_socket=self.sockets.admin(runtime),
            metrics=self.metrics,
            counter_slot=counter_slot,
            zones=gen.zones,
            route_ids=gen.route_ids,
            upstream_ids=gen.upstream_ids,
            server_ids=gen.server_ids,
            master_pid=self.pid,
            ready_fd=ready_w,
        )
        # Blocked across fork: the child must not run our handlers, and keeps them blocked
        # until worker.run() has installed its own (see WORKER_SIGNALS).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(ready_r)
            os.close(ready_w)
            self.metrics.release_counter_slot(counter_slot)
            raise SpawnError(f"cannot fork worker #{slot}: {e}") from None
        if pid == 0:
            self.become_worker(ctx, ready_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        w = WorkerProcess(pid=pid, slot=slot, generation=gen, ready_fd=ready_r, started=time.monotonic())
        self.workers[pid] = w
        self.selector.register(ready_r, selectors.EVENT_READ, w)
        self.metrics.add_worker(pid, slot, gen.number, counter_slot)
        log.info("started worker #%d pid %d (generation %d)", slot, pid, gen.number)

    def become_worker(self, ctx: WorkerContext, own_ready_r: int) -> None:
        """In the child: shed the master's state, then run the worker; never returns."""
        keep = {s.fileno() for s in ctx.listen_sockets}
        if ctx.admin_socket is not None:
            keep.add(ctx.admin_socket.fileno())
        self.run_child(str(ctx.slot), f"worker #{ctx.slot}", keep, (own_ready_r,), lambda: worker.run(ctx))

    def run_child(self, label: str, what: str, keep_sockets: set, close_fds: tuple, run) -> None:
        """In a forked child (a worker, the checker): shed the master's state, then `run()`
        and exit with its SystemExit code; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in WORKER_SIGNALS:
                signal.signal(signum, signal.SIG_IGN if signum == signal.SIGHUP else signal.SIG_DFL)
            # Close what belongs to the master or to other workers: a worker holding another
            # slot's listener would keep it open (and its queued connections unanswered)
            # after the master closes it.
            for sock in self.sockets.all():
                if sock.fileno() not in keep_sockets:
                    sock.close()
            self.selector.close()  # closes the epoll fd only; the master's registrations stay
            for fd in (self.wake_r, self.wake_w, *close_fds,
                       *(w.ready_fd for w in self.workers.values() if w.ready_fd >= 0)):
                os.close(fd)
            self.notifier.close()
            set_process_label(label)
            run()
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("%s crashed", what)
        finally:
            os._exit(code)

    def drain(self, w: WorkerProcess) -> None:
        """Tell a worker to finish its work and exit; kill it after its shutdown_timeout."""
        if w.draining:
            return
        w.draining = True
        w.kill_at = time.monotonic() + w.generation.runtime.main.shutdown_timeout
        self.kill(w.pid, signal.SIGQUIT)
        self.metrics.set_worker_state(w.pid, WORKER_DRAINING)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # already exited; its CHLD is on the way

    def close_ready_pipe(self, w: WorkerProcess) -> None:
        if w.ready_fd >= 0:
            self.selector.unregister(w.ready_fd)
            os.close(w.ready_fd)
            w.ready_fd = -1

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is not None:
                self.on_worker_exit(w, status)
            elif self.checker is not None and pid == self.checker.pid:
                self.on_checker_exit(status)

    def on_worker_exit(self, w: WorkerProcess, status: int) -> None:
        self.close_ready_pipe(w)
        self.metrics.remove_worker(w.pid)  # also frees its counter slot
        how = describe_exit(status)
        gen = w.generation
        for zone in gen.zones.release_locks_of(w.pid):
            log.warning("worker #%d pid %d died holding the lock of zone %r; released it",
                        w.slot, w.pid, zone)
        expected = w.draining or self.stopping
        (log.info if expected else log.error)("worker #%d pid %d (generation %d) %s",
                                              w.slot, w.pid, gen.number, how)
        if not expected and gen is self.pending:
            self.abandon_pending(f"worker #{w.slot} {how} before generation {gen.number} was ready")
        elif not expected and gen is self.current:
            self.schedule_respawn(w)
        self.close_unused_sockets()

    def schedule_respawn(self, w: WorkerProcess) -> None:
        now = time.monotonic()
        wait = self.backoff[w.slot].schedule(now, died_young=now - w.started < QUICK_DEATH)
        if wait:
            log.warning("worker #%d keeps dying; respawning it in %.1fs", w.slot, wait)

    def close_unused_sockets(self) -> None:
        """Close the sockets that no accepting worker's configuration uses."""
        runtimes = {id(w.generation.runtime): w.generation.runtime
                    for w in self.workers.values() if not w.draining}
        for gen in (self.current, self.pending):
            if gen is not None:
                runtimes[id(gen.runtime)] = gen.runtime
        closed = self.sockets.close_unused(runtimes.values())
        for sock in closed:
            log.info("closed listener %s, no longer configured", sock)
        if any(s.slot is not None and self.sockets.listens_on(s.address) for s in closed) \
                and not migrates_queued_connections():
            # fewer slots for an address still served: the kernel resets what was queued on
            # the removed ones unless it may move them to the remaining sockets of the group
            log.warning("connections queued on the closed slots, if any, were reset; "
                        "sysctl net.ipv4.tcp_migrate_req=1 hands them to the remaining slots")

    # ---- the health checker ----------------------------------------------------------------------

    def replace_checker(self) -> None:
        """A generation became current: stop the checker of the previous one, if any (its
        successor starts once it is reaped, so two never write at once), or start one now."""
        if self.checker is None:
            self.checker_backoff = SlotBackoff()
            self.start_checker()
        else:
            self.stop_checker()

    def start_checker(self) -> None:
        """Fork the checker for the current generation, if it has checks. Servers whose
        upstream has none lose any result a previous configuration's checks left."""
        gen = self.current
        if self.stopping or gen is None or self.checker is not None:
            return
        checks = checker.targets(gen.runtime, gen.server_ids)
        checked = {t.index for t in checks}
        self.metrics.clear_check_results(i for i in gen.all_server_ids() if i not in checked)
        if not checks:
            return
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.error("cannot fork the health checker: %s; retrying in %.1fs", e,
                      self.checker_backoff.schedule(time.monotonic(), died_young=True))
            return
        if pid == 0:
            self.run_child("checker", "health checker", set(), (),
                           lambda: checker.run(checks, self.metrics.slots, self.pid))
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.checker = CheckerProcess(pid=pid, started=time.monotonic())
        log.info("started health checker pid %d (generation %d, %d servers)", pid, gen.number, len(checks))

    def stop_checker(self) -> None:
        c = self.checker
        if c is not None and not c.stopping:
            c.stopping = True
            c.kill_at = time.monotonic() + FAST_STOP_TIMEOUT
            self.kill(c.pid, signal.SIGTERM)

    def on_checker_exit(self, status: int) -> None:
        c, self.checker = self.checker, None
        expected = c.stopping or self.stopping
        (log.info if expected else log.error)("health checker pid %d %s", c.pid, describe_exit(status))
        if self.stopping:
            return
        if expected:
            self.start_checker()  # for the generation that replaced its own
            return
        now = time.monotonic()
        wait = self.checker_backoff.schedule(now, died_young=now - c.started < QUICK_DEATH)
        if wait:
            log.warning("the health checker keeps dying; restarting it in %.1fs", wait)

    # ---- timers --------------------------------------------------------------------------------

    def next_timeout(self) -> float:
        if self.signals:
            return 0
        now = time.monotonic()
        times = [w.kill_at for w in self.workers.values() if w.kill_at is not None]
        times += [b.respawn_at for b in self.backoff.values() if b.respawn_at is not None]
        if self.checker_backoff.respawn_at is not None:
            times.append(self.checker_backoff.respawn_at)
        if self.checker is not None and self.checker.kill_at is not None:
            times.append(self.checker.kill_at)
        if self.pending is not None:
            times.append(self.pending_deadline)
        return max(0.0, min([now + MAX_WAIT, *times]) - now)

    def run_timers(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.kill_at is not None and w.kill_at <= now:
                log.warning("worker #%d pid %d (generation %d) still alive after its timeout, killing it",
                            w.slot, w.pid, w.generation.number)
                self.kill(w.pid, signal.SIGKILL)
                w.kill_at = None
        if self.pending is not None and now >= self.pending_deadline:
            self.abandon_pending(f"generation {self.pending.number} not ready after {READY_TIMEOUT:.0f}s")
        if self.checker is not None and self.checker.kill_at is not None and self.checker.kill_at <= now:
            log.warning("health checker pid %d still alive after its timeout, killing it", self.checker.pid)
            self.kill(self.checker.pid, signal.SIGKILL)
            self.checker.kill_at = None
        if self.checker_backoff.respawn_at is not None and self.checker_backoff.respawn_at <= now:
            self.checker_backoff.respawn_at = None
            self.start_checker()
        for slot, b in list(self.backoff.items()):
            if b.respawn_at is not None and b.respawn_at <= now:
                b.respawn_at = None
                try:
                    self.spawn(self.current, slot)
                except SpawnError as e:
                    log.error("%s; retrying in %.1fs", e, b.schedule(now, died_young=True))


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    if code == WORKER_BOOT_ERROR:
        return f"failed to boot (exit code {code})"
    return f"exited with code {code}"


def run_master(config_path: str) -> int:
    """Run the master in the foreground until it is stopped; return the process exit code."""
    try:
        runtime = load_runtime(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    return Master(config_path, runtime).run()
