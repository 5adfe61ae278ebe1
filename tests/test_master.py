"""The master process on its own: real fork, real signals, real sockets on free loopback ports.

The master is run with `python -c` and a stand-in worker (`standin_run` below) in place of
fastproxy.worker, injected into sys.modules of that child process only. The stand-in keeps the
worker's contract (signals blocked on entry, one ready byte, QUIT drains, TERM exits, USR1
reopens the log) and answers every request with JSON naming its pid, slot, generation and the
inode of the listening socket it accepted on, so tests can see which process and which socket
served them. End-to-end tests of the real worker live in the lifecycle tests.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from harness.client import ServerClosed, fetch
from harness.proxy import REPO, cmdline, free_port, pid_alive, to_toml, wait_until

from fastproxy.master.pidfile import PidFileError, is_running_master, signal_master, write_pid_file
from fastproxy.master.systemd import Notifier

TESTS = Path(__file__).resolve().parent

# The stand-in's behaviour is switched by files named in these variables, so a test can change
# it between generations without restarting the master.
FAIL_BOOT = "STANDIN_FAIL_BOOT"  # exists: exit WORKER_BOOT_ERROR before ready
CRASH_AFTER_READY = "STANDIN_CRASH"  # exists: exit 1 right after signalling ready
IGNORE_QUIT = "STANDIN_IGNORE_QUIT"  # exists: QUIT is ignored (so the master must kill)
SLOW_SEEN = "STANDIN_SLOW_SEEN"  # written by the stand-in when a /slow request reaches it


def _flag(name: str) -> bool:
    path = os.environ.get(name)
    return bool(path) and os.path.exists(path)


def standin_run(ctx) -> None:
    """A minimal worker: serve a fixed JSON response on the inherited sockets."""
    import asyncio
    import ctypes
    import logging

    from setproctitle import setproctitle

    from fastproxy.log import reopen_error_log
    from fastproxy.master import WORKER_BOOT_ERROR, WORKER_SIGNALS, worker_title

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    setproctitle(worker_title(ctx.slot, ctx.generation))
    log = logging.getLogger("fastproxy.worker")
    if _flag(FAIL_BOOT):
        log.error("stand-in: refusing to boot")
        os._exit(WORKER_BOOT_ERROR)

    loop = asyncio.new_event_loop()
    inflight = set()  # one task per accepted connection, added in the same callback as accept()

    async def handle(conn, inode):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode()
            if path.startswith("/slow"):
                with open(os.environ[SLOW_SEEN], "a") as seen:
                    seen.write(f"{os.getpid()}\n")
                await asyncio.sleep(1.0)
            body = json.dumps({"pid": os.getpid(), "slot": ctx.slot, "generation": ctx.generation,
                               "inode": inode, "path": path}).encode()
            await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                    % (len(body), body))
        except ConnectionError:
            pass
        finally:
            conn.close()

    def accept(sock, inode):
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        task = loop.create_task(handle(conn, inode))
        inflight.add(task)
        task.add_done_callback(inflight.discard)

    async def drain():
        setproctitle(worker_title(ctx.slot, ctx.generation, draining=True))
        for sock in ctx.listen_sockets:
            loop.remove_reader(sock.fileno())  # stop accepting at once
            sock.close()  # our copy only: the master keeps the socket
        while inflight:
            await asyncio.sleep(0.01)
        os._exit(0)

    def on_quit():
        if not _flag(IGNORE_QUIT):
            loop.create_task(drain())

    def on_usr1():
        reopen_error_log()
        log.info("stand-in worker reopened its log")

    async def main():
        for sock in ctx.listen_sockets:
            loop.add_reader(sock.fileno(), accept, sock, os.fstat(sock.fileno()).st_ino)
        loop.add_signal_handler(signal.SIGQUIT, on_quit)
        loop.add_signal_handler(signal.SIGTERM, os._exit, 0)
        loop.add_signal_handler(signal.SIGINT, os._exit, 0)
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        os.write(ctx.ready_fd, b"1")
        os.close(ctx.ready_fd)
        if _flag(CRASH_AFTER_READY):
            os._exit(1)
        await asyncio.Event().wait()

    loop.run_until_complete(main())


BOOT = """
import sys, types
import fastproxy, test_master
stand_in = types.ModuleType("fastproxy.worker")
stand_in.run = test_master.standin_run
sys.modules["fastproxy.worker"] = fastproxy.worker = stand_in
from fastproxy.master.arbiter import run_master
sys.exit(run_master(sys.argv[1]))
"""


def unused_pid() -> int:
    """A pid no process can have (an exited child's pid could be reused by anyone meanwhile)."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


def children(pid: int):
    """Live child processes of pid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


class Master:
    """One master process running stand-in workers, in its own directory and process group."""

    def __init__(self, workdir: Path, workers: int = 2, notify_socket: str = None, **main):
        self.dir = workdir
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = workdir / "fastproxy.toml"
        self.pid_file = workdir / "fastproxy.pid"
        self.error_log = workdir / "error.log"
        self.flags = {name: workdir / name.lower()
                      for name in (FAIL_BOOT, CRASH_AFTER_READY, IGNORE_QUIT, SLOW_SEEN)}
        self.main = {"workers": workers, "pid_file": str(self.pid_file), "shutdown_timeout": "10s",
                     "error_log": str(self.error_log), "log_level": "info", **main}
        self.listen = [f"127.0.0.1:{self.port}"]
        self.notify_socket = notify_socket
        self.proc = None
        self.write_config()

    def write_config(self, text: str = None) -> None:
        if text is None:
            text = to_toml({
                "main": self.main,
                "access_log": {"path": "off", "format": "combined"},
                "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
                "listen": [{"address": a} for a in self.listen],
                "routes": [{"path_prefix": "/", "respond": {"status": 200, "body": "ok"}}],
            })
        self.config_path.write_text(text)

    def start(self, wait: bool = True) -> "Master":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
        env.pop("NOTIFY_SOCKET", None)
        if self.notify_socket:
            env["NOTIFY_SOCKET"] = self.notify_socket
        env.update({name: str(path) for name, path in self.flags.items()})
        self.proc = subprocess.Popen([sys.executable, "-c", BOOT, str(self.config_path)], cwd=self.dir,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, text=True)
        if wait:
            wait_until(lambda: self.proc.poll() is not None or len(self.workers(generation=1)) == self.workers_n,
                       20, message="first generation")
            assert self.proc.poll() is None, self.diagnostics()
            wait_until(lambda: self.get(), 10, message="an answer")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def workers_n(self) -> int:
        return self.main["workers"]

    def set_flag(self, name: str, on: bool = True) -> None:
        path = self.flags[name]
        if on:
            path.touch()
        elif path.exists():
            path.unlink()

    def workers(self, generation: int = None, draining: bool = False):
        """{pid: title} of the master's live workers, by title (which the stand-in sets)."""
        out = {}
        for pid in children(self.pid):
            title = cmdline(pid)
            m = re.fullmatch(r"fastproxy: worker process #(\d+) \(generation (\d+)\)( shutting down)?", title)
            if m and (generation is None or int(m.group(2)) == generation) and bool(m.group(3)) == draining:
                out[pid] = title
        return out

    def get(self, path: str = "/", port: int = None) -> dict:
        r = fetch(port or self.port, "GET", path, [("Connection", "close")], timeout=10)
        assert r.status == 200, r
        return r.json()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def log_text(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 20) -> str:
        try:
            return wait_until(lambda: re.search(pattern, self.log_text()), timeout,
                              message=f"{pattern!r} in the error log").group(0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.diagnostics()}") from None

    def reload(self) -> int:
        """HUP, then wait for a new settled generation; return its number."""
        before = {int(re.search(r"generation (\d+)", t).group(1)) for t in self.workers().values()}
        self.signal(signal.SIGHUP)

        def settled():
            gens = {int(re.search(r"generation (\d+)", t).group(1)) for t in self.workers().values()}
            return (len(gens) == 1 and not gens & before and len(self.workers()) == self.workers_n
                    and not self.workers(draining=True) and gens.pop())
        return wait_until(settled, 20, message="a new settled generation")

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"master did not exit\n{self.diagnostics()}")
        return self.proc.returncode

    def diagnostics(self) -> str:
        out = err = ""
        if self.proc.poll() is not None:
            out, err = self.proc.communicate()
        return f"--- stderr ---\n{err}\n--- error log ---\n{self.log_text()[-4000:]}"

    def kill_all(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def make_master(tmp_path):
    made = []

    def make(start=True, **kw):
        workdir = tmp_path / f"m{len(made)}"
        workdir.mkdir()
        m = Master(workdir, **kw)
        made.append(m)
        return m.start() if start else m
    yield make
    for m in made:
        m.kill_all()


def slot_inodes(m: Master, generation: int) -> dict:
    """{slot: listening socket inode} as reported by `generation`'s workers."""
    seen = {}

    def all_slots():
        r = m.get()
        if r["generation"] == generation:
            seen[r["slot"]] = r["inode"]
        return len(seen) == m.workers_n
    wait_until(all_slots, 20, interval=0.01, message=f"answers from every slot of generation {generation}")
    return seen


class Load:
    """Fresh connections in a loop on a thread; records every failure."""

    def __init__(self, m: Master):
        self.m = m
        self.ok = 0
        self.failures = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                self.m.get()
                self.ok += 1
            except (OSError, ServerClosed, AssertionError) as e:
                self.failures.append(repr(e))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(20)


# ---- startup, titles, logs, stop -----------------------------------------------------------------

def test_startup_titles_pid_file_log_format_and_graceful_quit(make_master):
    m = make_master(workers=2)
    assert cmdline(m.pid) == f"fastproxy: master process {m.config_path}"
    workers = m.workers(generation=1)
    assert sorted(workers.values()) == ["fastproxy: worker process #0 (generation 1)",
                                        "fastproxy: worker process #1 (generation 1)"]
    assert m.get()["pid"] in workers
    assert m.pid_file.read_text() == f"{m.pid}\n"
    assert is_running_master(m.pid)

    m.wait_log(r"generation 1 ready")
    line = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(debug|info|warn|error|crit)\] (\d+)#(master|\d+): .+")
    pids = set()
    for text in m.log_text().splitlines():
        match = line.fullmatch(text)
        assert match, text
        pids.add(int(match.group(2)))
    assert m.pid in pids

    m.signal(signal.SIGQUIT)
    assert m.wait_exit() == 0
    assert not m.pid_file.exists()
    assert not any(pid_alive(p) for p in workers)
    m.wait_log(r"graceful stop")


def test_graceful_quit_finishes_inflight_request(make_master):
    m = make_master(workers=1)
    result = {}
    t = threading.Thread(target=lambda: result.update(m.get("/slow")))
    t.start()
    wait_until(lambda: m.flags[SLOW_SEEN].exists(), 10, message="the slow request at the worker")
    m.signal(signal.SIGQUIT)
    t.join(20)
    assert result.get("path") == "/slow"
    assert m.wait_exit() == 0


def test_fast_stop_with_term_and_int(make_master):
    for sig in (signal.SIGTERM, signal.SIGINT):
        m = make_master(workers=2)
        workers = m.workers()
        m.signal(sig)
        assert m.wait_exit() == 0
        assert not any(pid_alive(p) for p in workers)
        assert not m.pid_file.exists()


def test_workers_that_ignore_quit_are_killed_after_shutdown_timeout(make_master):
    m = make_master(workers=1, shutdown_timeout="1s")
    m.set_flag(IGNORE_QUIT)
    worker = next(iter(m.workers()))
    m.signal(signal.SIGQUIT)
    assert m.wait_exit() == 0
    assert not pid_alive(worker)
    m.wait_log(r"still alive after its timeout, killing it")


# ---- reload --------------------------------------------------------------------------------------

def test_reload_keeps_each_slots_socket_and_drains_the_old_generation(make_master):
    m = make_master(workers=2)
    old_workers = m.workers(generation=1)
    inodes = slot_inodes(m, 1)
    slow = {}
    with Load(m) as load:
        t = threading.Thread(target=lambda: slow.update(m.get("/slow")))
        t.start()
        wait_until(lambda: m.flags[SLOW_SEEN].exists(), 10, message="the slow request at a worker")
        assert m.reload() == 2
        t.join(20)
        wait_until(lambda: load.ok > 20, 20)
    assert not load.failures, load.failures[:5]
    assert slow["generation"] == 1 and slow["path"] == "/slow"
    assert slot_inodes(m, 2) == inodes  # the same listening socket per slot, kept by the master
    assert not any(pid_alive(p) for p in old_workers)
    assert cmdline(m.pid) == f"fastproxy: master process {m.config_path}"
    # Through the pid file, as `fastproxy -s reload` does.
    assert signal_master(str(m.pid_file), "reload") == m.pid
    wait_until(lambda: m.workers(generation=3) and len(m.workers()) == 2 and not m.workers(generation=2), 20)


def test_invalid_config_on_reload_keeps_the_old_workers(make_master):
    m = make_master(workers=2)
    workers = m.workers()
    good = m.config_path.read_text()
    m.write_config(good.replace("workers = 2", 'workers = "many"') + "\nunknown_key = 1\n")
    m.signal(signal.SIGHUP)
    m.wait_log(r"reload failed: the configuration is invalid; still serving generation 1")
    assert re.search(r"\[error\] \d+#master: invalid configuration: .*fastproxy\.toml: main\.workers", m.log_text())
    assert m.workers() == workers and m.get()["generation"] == 1
    m.write_config(good)
    assert m.reload() == 2


def test_new_generation_that_fails_to_boot_is_abandoned(make_master):
    m = make_master(workers=2)
    workers = m.workers()
    m.set_flag(FAIL_BOOT)
    m.signal(signal.SIGHUP)
    m.wait_log(r"reload failed: worker #\d failed to boot \(exit code 3\) before generation 2 was ready")
    wait_until(lambda: m.workers() == workers, 10, message="only the old workers")
    assert m.get()["generation"] == 1
    m.set_flag(FAIL_BOOT, False)
    assert m.reload() == 2


def test_reload_to_another_address_closes_the_old_one_after_drain(make_master):
    m = make_master(workers=1)
    old_port = m.port
    m.port = free_port()
    m.listen = [f"127.0.0.1:{m.port}"]
    m.write_config()
    assert m.reload() == 2
    assert m.get()["generation"] == 2
    m.wait_log(rf"closed listener 127\.0\.0\.1:{old_port} \(slot 0\), no longer configured")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", old_port), timeout=5).close()


def test_reload_moves_the_pid_file(make_master):
    m = make_master(workers=1)
    old = m.pid_file
    m.pid_file = m.dir / "run" / "moved.pid"
    m.pid_file.parent.mkdir()
    m.main["pid_file"] = str(m.pid_file)
    m.write_config()
    assert m.reload() == 2
    wait_until(lambda: m.pid_file.exists() and not old.exists(), 10, message="the pid file moved")
    assert m.pid_file.read_text() == f"{m.pid}\n"
    assert signal_master(str(m.pid_file), "reload") == m.pid  # `fastproxy -s` with the new config
    wait_until(lambda: m.get()["generation"] == 3, 20, message="the reload sent through the new pid file")
    m.signal(signal.SIGQUIT)
    assert m.wait_exit() == 0
    assert not m.pid_file.exists()


def test_reload_to_a_pid_file_of_another_running_master_fails(make_master):
    a = make_master(workers=1)
    b = make_master(workers=1)
    b.main["pid_file"] = str(a.pid_file)
    b.write_config()
    b.signal(signal.SIGHUP)
    b.wait_log(r"reload failed: .*still serving generation 1")
    assert a.pid_file.read_text() == f"{a.pid}\n" and b.pid_file.read_text() == f"{b.pid}\n"


def test_reload_with_an_address_in_use_keeps_serving(make_master):
    m = make_master(workers=1)
    taken = socket.create_server(("127.0.0.1", 0))
    m.listen.append(f"127.0.0.1:{taken.getsockname()[1]}")
    m.write_config()
    m.signal(signal.SIGHUP)
    m.wait_log(rf"reload failed: cannot listen on 127\.0\.0\.1:{taken.getsockname()[1]}: Address already in use")
    assert m.get()["generation"] == 1
    taken.close()


# ---- worker deaths ---------------------------------------------------------------------------

def test_dead_worker_is_respawned_in_its_slot(make_master):
    m = make_master(workers=2)
    victim, title = next(iter(m.workers().items()))
    os.kill(victim, signal.SIGKILL)

    def respawned():
        workers = m.workers()
        return len(workers) == 2 and victim not in workers and workers
    assert title in wait_until(respawned, 20, message="a respawned worker").values()  # same slot and generation
    m.wait_log(rf"worker #\d pid {victim} \(generation 1\) was killed by signal SIGKILL")


def test_a_slot_that_keeps_dying_backs_off_then_recovers(make_master):
    m = make_master(workers=1)
    m.set_flag(CRASH_AFTER_READY)
    os.kill(next(iter(m.workers())), signal.SIGKILL)
    m.wait_log(r"worker #0 keeps dying; respawning it in 0\.2s")
    m.set_flag(CRASH_AFTER_READY, False)
    wait_until(lambda: m.get()["slot"] == 0, 30, message="the slot to serve again")


def test_first_generation_boot_failure_stops_the_master(make_master):
    m = make_master(start=False, workers=2)
    m.set_flag(FAIL_BOOT)
    m.start(wait=False)
    assert m.wait_exit() == 1
    _, err = m.proc.communicate()
    assert "failed to boot (exit code 3) before generation 1 was ready; stopping" in err
    assert not m.pid_file.exists()
    assert not children(m.pid)


# ---- startup failures ------------------------------------------------------------------------

@pytest.mark.parametrize("reuseport", [False, True])
def test_address_in_use_at_startup_is_fatal(make_master, reuseport):
    m = make_master(start=False, workers=1)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    holder.bind(("127.0.0.1", m.port))
    holder.listen()
    try:
        m.start(wait=False)
        assert m.wait_exit() == 1
        _, err = m.proc.communicate()
        assert f"cannot listen on 127.0.0.1:{m.port}: Address already in use" in err
        assert not m.pid_file.exists()
    finally:
        holder.close()


def test_second_master_on_the_same_pid_file_refuses_to_start(make_master):
    first = make_master(workers=1)
    second = make_master(start=False, workers=1, pid_file=str(first.pid_file))
    second.start(wait=False)
    assert second.wait_exit() == 1
    _, err = second.proc.communicate()
    assert f"fastproxy is already running with pid {first.pid}" in err
    assert first.pid_file.read_text() == f"{first.pid}\n"


def test_stale_pid_file_does_not_block_start(make_master):
    m = make_master(start=False, workers=1)
    write_pid_file(str(m.pid_file), unused_pid())
    m.start()
    assert m.pid_file.read_text() == f"{m.pid}\n"


# ---- USR1 and sd_notify --------------------------------------------------------------------------

def test_usr1_reopens_the_error_log_in_master_and_workers(make_master):
    m = make_master(workers=2)
    rotated = m.error_log.with_suffix(".log.1")
    m.error_log.rename(rotated)
    m.signal(signal.SIGUSR1)
    m.wait_log(rf"\[info\] {m.pid}#master: reopened log files")
    wait_until(lambda: len(re.findall(r"\[info\] \d+#[01]: stand-in worker reopened its log", m.log_text())) == 2,
               20, message="both workers' lines in the new log")
    assert "reopened log files" not in rotated.read_text()


@pytest.mark.parametrize("abstract", [True, False])
def test_sd_notify_ready_reloading_stopping(make_master, tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"fastproxy-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(20)

    def next_message():
        return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())

    try:
        m = make_master(workers=2, notify_socket=address)
        ready = next_message()
        assert ready == {"READY": "1", "MAINPID": str(m.pid), "STATUS": "serving, generation 1, 2 workers"}
        m.signal(signal.SIGHUP)
        reloading = next_message()
        assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}, (reloading, m.diagnostics())
        assert 0 < int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        ready = next_message()
        assert ready.get("READY") == "1", (ready, m.diagnostics())
        assert ready["STATUS"] == "serving, generation 2, 2 workers"
        m.signal(signal.SIGQUIT)
        assert next_message()["STOPPING"] == "1"
        assert m.wait_exit() == 0
    finally:
        sock.close()


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    n.ready("x")
    n.close()


# ---- pid file and `fastproxy -s` -------------------------------------------------------------

def test_signal_master_errors(tmp_path):
    pid_file = tmp_path / "fp.pid"
    with pytest.raises(PidFileError, match="no pid file at .*: is fastproxy running"):
        signal_master(str(pid_file), "reload")
    pid_file.write_text("garbage\n")
    with pytest.raises(PidFileError, match="does not hold a process id"):
        signal_master(str(pid_file), "quit")
    dead = unused_pid()
    write_pid_file(str(pid_file), dead)
    with pytest.raises(PidFileError, match=rf"names process {dead}, which is not a running fastproxy master"):
        signal_master(str(pid_file), "stop")
    # A live process that is not a fastproxy master is never signalled.
    other = subprocess.Popen(["sleep", "30"])
    try:
        write_pid_file(str(pid_file), other.pid)
        with pytest.raises(PidFileError, match="stale pid file"):
            signal_master(str(pid_file), "stop")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    with pytest.raises(PidFileError, match="unknown signal"):
        signal_master(str(pid_file), "restart")
    with pytest.raises(PidFileError, match="sets no main.pid_file"):
        signal_master(None, "reload")


def test_pid_file_in_a_missing_directory_is_a_clear_startup_error(make_master, tmp_path):
    m = make_master(start=False, workers=1, pid_file=str(tmp_path / "missing" / "fp.pid"))
    m.start(wait=False)
    assert m.wait_exit() == 1
    _, err = m.proc.communicate()
    assert f"cannot write pid file {tmp_path}/missing/fp.pid: No such file or directory" in err


# ---- the socket set, in this process ---------------------------------------------------------

def _runtime(tmp_path, workers, listen, admin=None):
    from fastproxy.config import load_runtime
    text = to_toml({
        "main": {"workers": workers},
        **({"admin": {"listen": admin}} if admin else {}),
        "listen": [{"address": a} for a in listen],
        "routes": [{"path_prefix": "/", "respond": {"status": 200, "body": "ok"}}],
    })
    path = tmp_path / f"{uuid.uuid4().hex}.toml"
    path.write_text(text)
    return load_runtime(str(path))


def test_listen_sockets_one_per_slot_kept_and_closed_by_configuration(tmp_path):
    from fastproxy.master.sockets import ListenSockets
    port, admin_port = free_port(), free_port()
    two = _runtime(tmp_path, 2, [f"127.0.0.1:{port}"], admin=f"127.0.0.1:{admin_port}")
    sockets = ListenSockets()
    try:
        sockets.bind(two)
        slot0, slot1 = sockets.for_slot(two, 0)[0], sockets.for_slot(two, 1)[0]
        assert slot0 is not slot1
        for s in (slot0, slot1):
            assert s.getsockname() == ("127.0.0.1", port)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert not s.getblocking()
        admin = sockets.admin(two)
        assert admin.getsockname() == ("127.0.0.1", admin_port)
        assert admin.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0

        one = _runtime(tmp_path, 1, [f"127.0.0.1:{port}"])
        sockets.bind(one)  # a reload: slot 0 is reused, nothing is bound
        assert sockets.for_slot(one, 0)[0] is slot0
        assert sockets.close_unused([one, two]) == []  # the old generation still runs
        assert set(map(str, sockets.close_unused([one]))) == {f"127.0.0.1:{admin_port} (admin)",
                                                     f"127.0.0.1:{port} (slot 1)"}
        assert slot1.fileno() == -1 and admin.fileno() == -1 and slot0.fileno() >= 0
    finally:
        sockets.close_all()


def test_a_failed_bind_leaves_the_socket_set_as_it_was(tmp_path):
    from fastproxy.master.sockets import BindError, ListenSockets
    port = free_port()
    taken = socket.create_server(("127.0.0.1", 0))
    sockets = ListenSockets()
    try:
        sockets.bind(_runtime(tmp_path, 1, [f"127.0.0.1:{port}"]))
        before = sockets.all()
        with pytest.raises(BindError, match=rf"cannot listen on 127\.0\.0\.1:{taken.getsockname()[1]}: "
                                            r"Address already in use"):
            sockets.bind(_runtime(tmp_path, 2, [f"127.0.0.1:{free_port()}",
                                                 f"127.0.0.1:{taken.getsockname()[1]}"]))
        assert sockets.all() == before
    finally:
        sockets.close_all()
        taken.close()


def test_ipv6_listeners_are_v6_only(tmp_path):
    from fastproxy.master.sockets import ListenSockets
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    port = free_port()
    runtime = _runtime(tmp_path, 1, [f"[::1]:{port}"])
    sockets = ListenSockets()
    try:
        sockets.bind(runtime)
        sock = sockets.for_slot(runtime, 0)[0]
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sockets.close_all()
