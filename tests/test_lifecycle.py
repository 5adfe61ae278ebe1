"""The master's lifecycle driven with real signals against the real processes.

Reload (valid and broken config, under load, with a slow request in flight),
graceful quit, fast stop, worker respawn, master death, log reopening, the `-s`
and `-t` command-line verbs and the process titles.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from functools import partial

import pytest

from harness.client import RawClient, ServerClosed, build_request, fetch
from harness.load import Load
from harness.proxy import ProxyProcess, cmdline, free_port, pid_alive, respond, upstream, wait_until


def config(origin, body="version one\n", workers=2, **main):
    return {
        "main": {"workers": workers, "shutdown_timeout": "10s"} | main,
        "access_log": {"flush": "100ms"},
        "upstreams": {"origin": upstream(origin)},
        "routes": [
            {"name": "hello", "path": "/hello", "respond": respond(200, body, {"Content-Type": "text/plain"})},
            {"name": "api", "path_prefix": "/api/", "upstream": "origin"},
        ],
    }


def hello(proxy) -> bytes:
    r = fetch(proxy.port, "GET", "/hello")
    assert r.status == 200, r
    return r.body


class Background:
    """Run fn in a thread and keep its result or exception."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self._t = threading.Thread(target=self._run, args=(fn,) + args, daemon=True)
        self._t.start()

    def _run(self, fn, *args):
        try:
            self.result = fn(*args)
        except BaseException as e:  # reported by get()
            self.error = e

    def get(self, timeout: float = 30):
        self._t.join(timeout)
        assert not self._t.is_alive(), "background request still running"
        if self.error:
            raise self.error
        return self.result


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- titles ------------------------------------------------------------------------------
def test_process_titles(make_proxy, origin):
    p = make_proxy(config(origin))
    assert cmdline(p.pid) == f"fastproxy: master process {p.config_path}"
    st = p.status()
    assert len(st["workers"]) == 2 and len({w["slot"] for w in st["workers"]}) == 2, st
    for w in st["workers"]:
        assert cmdline(int(w["pid"])) == f"fastproxy: worker process #{w['slot']} (generation {st['generation']})"


# -- reload ------------------------------------------------------------------------------
def test_hup_with_new_config_switches_routes(make_proxy, origin):
    p = make_proxy(config(origin, "version one\n"))
    assert hello(p) == b"version one\n"
    gen = p.generation()
    p.write_config(config(origin, "version two\n"))
    p.signal(signal.SIGHUP)
    st = p.wait_generation(gen)
    assert st["generation"] == gen + 1
    assert all(w["generation"] == gen + 1 for w in st["workers"]), st
    assert [hello(p) for _ in range(10)] == [b"version two\n"] * 10


def test_hup_switches_upstream_workers_and_listeners(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    p = make_proxy(config(a))
    gen = p.generation()
    assert fetch(p.port, "GET", "/api/echo").json()["origin"] == "a"
    extra_port = free_port()
    cfg = config(b, workers=3)
    cfg["listen"] = [{"address": f"127.0.0.1:{p.port}"}, {"address": f"127.0.0.1:{extra_port}"}]
    p.write_config(cfg)
    p.signal(signal.SIGHUP)
    st = p.wait_generation(gen)
    assert len(st["workers"]) == 3 and len({w["slot"] for w in st["workers"]}) == 3, st
    for port in (p.port, extra_port):
        for _ in range(6):
            r = fetch(port, "GET", "/api/echo")
            assert r.status == 200 and r.json()["origin"] == "b", r
    cfg = config(b, workers=1)
    cfg["listen"] = [{"address": f"127.0.0.1:{extra_port}"}]
    p.write_config(cfg)
    p.signal(signal.SIGHUP)
    st = p.wait_generation(gen + 1)
    assert len(st["workers"]) == 1, st
    assert fetch(extra_port, "GET", "/hello").status == 200
    wait_until(lambda: refused(p.port), 10, message="the listener removed from the config to close")


def test_hup_with_broken_config_keeps_serving(make_proxy, origin):
    p = make_proxy(config(origin, "still here\n"))
    gen, pids = p.generation(), p.worker_pids()
    good = p.config_path.read_text()
    p.write_config(text=good.replace("[main]\n", "[main]\nno_such_key = 1\n", 1))
    p.signal(signal.SIGHUP)
    wait_until(lambda: "no_such_key" in p.error_log.read_text(), 10, message="the config error in the error log")
    log = p.error_log.read_text()
    line = next(l for l in log.splitlines() if "no_such_key" in l)
    assert str(p.config_path) in line or str(p.config_path) in log, log[-2000:]
    assert "main.no_such_key" in log, log[-2000:]
    assert p.generation() == gen and p.worker_pids() == pids
    assert [hello(p) for _ in range(5)] == [b"still here\n"] * 5
    p.write_config(text=good.replace("still here", "fixed"))  # a later valid reload still works
    p.signal(signal.SIGHUP)
    p.wait_generation(gen)
    assert hello(p) == b"fixed\n"


@pytest.mark.slow
@pytest.mark.parametrize("deferred", [False, True], ids=["listen", "listen-deferred"])
def test_zero_downtime_reload_under_load(make_proxy, origin, deferred):
    """64 keep-alive connections plus fresh connections for 10 s, HUP every second: nothing fails
    (also with a `deferred` listener, whose connections wait in the kernel for their first bytes)."""
    p = make_proxy(start=False)
    listen = {"address": f"127.0.0.1:{p.port}"} | ({"deferred": True} if deferred else {})
    p.write_config(config(origin) | {"listen": [listen]})
    p.start()
    gen0 = p.generation()
    load = Load()

    def exchange(i, c):
        target = "/hello" if i % 2 else f"/api/echo?client={i}"
        body = b"p" * 20000 if i % 4 == 2 else b""  # a quarter of the clients POST a body
        r = c.request("POST" if body else "GET", target, body=body)
        return r, r.status == 200 and not (body and r.json()["body_len"] != len(body))

    def fresh(i):
        return fetch(p.port, "GET", "/hello" if i % 2 else "/api/echo?fresh", [("Connection", "close")],
                     timeout=20)

    load.start(*[(load.keepalive, lambda: RawClient(p.port, timeout=20), partial(exchange, i)) for i in range(64)],
               *[(load.fresh, partial(fresh, i)) for i in range(4)])
    hups = 0
    try:
        for _ in range(10):
            time.sleep(1)
            p.signal(signal.SIGHUP)
            hups += 1
    finally:
        time.sleep(1)
        load.finish()
    failures, counts = load.failures, load.counts
    st = p.wait_generation(gen0, timeout=30)
    print(f"zero-downtime: {counts}, {hups} HUPs, generation {gen0} -> {st['generation']}, "
          f"{len(failures)} failures")
    assert not failures, f"{len(failures)} failures out of {counts}; first: {failures[:10]}"
    assert counts["ok"] > 500, counts
    assert st["generation"] >= gen0 + 3, "the HUPs did not cause several reloads"


def test_lowering_workers_serves_every_new_connection_while_old_ones_drain(make_proxy, origin):
    """The slots above a lowered `workers` are closed once the new generation is up, not when
    the old one has drained: the kernel must not keep queueing connections on them."""
    p = make_proxy(config(origin, workers=3))
    gen = p.generation()
    old_workers = p.worker_pids(generation=gen)
    slow = Background(fetch, p.port, "GET", "/api/slowbody?delay=6&old")  # keeps an old worker draining
    origin.wait_for_request(lambda r: "old" in r.target)
    p.write_config(config(origin, workers=2))
    p.signal(signal.SIGHUP)
    st = p.wait_generation(gen, settled=False)
    assert any(w["generation"] == gen for w in st["workers"]), "the old generation should still be draining"
    # a draining worker retitles itself and closes its listeners in the same callback
    wait_until(lambda: all(not pid_alive(w) or cmdline(w).endswith("shutting down") for w in old_workers),
               10, message="the old workers to stop accepting")
    # Each connection has its own source port, so the kernel's SO_REUSEPORT hash spreads
    # these over every socket of the port, the removed slot's too while it is open.
    answers = [fetch(p.port, "GET", "/hello", [("Connection", "close")], timeout=3).status
               for _ in range(60)]
    assert answers == [200] * 60
    assert slow.get().status == 200
    p.wait_generation(gen, settled=True)


def test_slow_request_survives_reload(make_proxy, origin):
    p = make_proxy(config(origin))
    gen = p.generation()
    slow = Background(fetch, p.port, "GET", "/api/slow?delay=3&before-hup")
    origin.wait_for_request(lambda r: "before-hup" in r.target)
    p.signal(signal.SIGHUP)
    p.wait_generation(gen, settled=False)
    r = slow.get()
    assert r.status == 200 and "before-hup" in r.json()["target"], r
    p.wait_generation(gen, settled=True)


def test_draining_worker_answers_kept_alive_connection(make_proxy, origin):
    """After a reload, the next request on an old kept-alive connection is answered with
    Connection: close (not reset), even after the connection sat idle for a while."""
    p = make_proxy(config(origin))
    gen = p.generation()
    with RawClient(p.port) as busy, RawClient(p.port) as idle:
        assert busy.request("GET", "/hello").status == 200
        assert idle.request("GET", "/api/echo?first").status == 200
        p.signal(signal.SIGHUP)
        p.wait_generation(gen, settled=False)
        r = busy.request("GET", "/hello")
        assert r.status == 200 and r.has_token("connection", "close"), r
        assert busy.is_closed()
        time.sleep(1.5)  # idle on a draining worker, well under keepalive/shutdown timeouts
        r = idle.request("GET", "/api/echo?second")
        assert r.status == 200 and r.json()["target"] == "/api/echo?second", r
        assert r.has_token("connection", "close"), r
        assert idle.is_closed()
    p.wait_generation(gen, settled=True)


def test_draining_worker_closes_idle_connections_then_exits(make_proxy, origin):
    """An idle kept-alive connection does not keep an old worker alive until shutdown_timeout."""
    p = make_proxy(config(origin, keepalive_timeout="1s", shutdown_timeout="30s"))
    gen = p.generation()
    old = p.worker_pids()
    with RawClient(p.port, timeout=20) as idle:
        assert idle.request("GET", "/hello").status == 200
        p.signal(signal.SIGHUP)
        p.wait_generation(gen, settled=False)
        assert idle.is_closed(15), "the draining worker kept an idle connection open"
    wait_until(lambda: not any(pid_alive(x) for x in old), 15, message="old workers to exit")
    assert "killing" not in p.error_log.read_text(), p.error_log.read_text()[-2000:]


# -- stopping ------------------------------------------------------------------------------
def test_quit_drains_then_exits(make_proxy, origin):
    p = make_proxy(config(origin))
    pids = p.worker_pids()
    slow = Background(fetch, p.port, "GET", "/api/slow?delay=3&before-quit")
    origin.wait_for_request(lambda r: "before-quit" in r.target)
    p.signal(signal.SIGQUIT)
    wait_until(lambda: any("shutting down" in cmdline(pid) for pid in pids), 5,
               message="a worker titled '... shutting down'")
    r = slow.get()
    assert r.status == 200 and "before-quit" in r.json()["target"], r
    assert p.wait_exit(20) == 0, "master did not exit 0 after QUIT"
    p.assert_no_leftovers(timeout=0.5)
    assert refused(p.port)


def test_quit_kills_workers_past_shutdown_timeout(make_proxy, origin):
    p = make_proxy(config(origin, shutdown_timeout="2s"))
    pids = p.worker_pids()
    slow = Background(fetch, p.port, "GET", "/api/slow?delay=60&stuck", None, b"", 40)
    origin.wait_for_request(lambda r: "stuck" in r.target)
    p.signal(signal.SIGQUIT)
    assert p.wait_exit(20) is not None, "master still running long after shutdown_timeout"
    with pytest.raises((ServerClosed, ConnectionResetError)):
        slow.get()
    assert not any(pid_alive(x) for x in pids)
    p.assert_no_leftovers(timeout=2)


def test_term_stops_fast(make_proxy, origin):
    p = make_proxy(config(origin))
    slow = Background(fetch, p.port, "GET", "/api/slow?delay=60&before-term")
    origin.wait_for_request(lambda r: "before-term" in r.target)
    p.signal(signal.SIGTERM)
    assert p.wait_exit(10) is not None, "master still running 10 s after TERM"
    with pytest.raises((ServerClosed, ConnectionResetError)):
        slow.get()
    p.assert_no_leftovers(timeout=2)
    assert refused(p.port)


def test_killed_worker_is_respawned(make_proxy, origin):
    p = make_proxy(config(origin))
    before = p.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)

    def respawned():
        now = p.worker_pids()
        return now if len(now) == 2 and victim not in now else None
    now = wait_until(respawned, 15, message="a respawned worker in /status")
    assert before[1] in now
    for i in range(20):
        assert hello(p) == b"version one\n"
        r = fetch(p.port, "GET", f"/api/echo?after-kill={i}")
        assert r.status == 200, r


def test_connections_queued_while_worker_is_dead_are_served(make_proxy, origin):
    """The master keeps the slot's socket: connections that arrive between a worker's death
    and its replacement wait in the accept queue and are answered."""
    p = make_proxy(config(origin, workers=1))
    victim = p.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    clients = [RawClient(p.port) for _ in range(20)]  # connect() succeeds: the queue is the master's
    try:
        for i, c in enumerate(clients):
            c.send(build_request("GET", f"/api/echo?q={i}"))
        for i, c in enumerate(clients):
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == f"/api/echo?q={i}", r
    finally:
        for c in clients:
            c.close()
    assert victim not in p.worker_pids()


def test_master_killed_workers_exit(make_proxy, origin):
    p = make_proxy(config(origin))
    pids = p.worker_pids()
    os.kill(p.pid, signal.SIGKILL)
    p.wait_exit(5)
    wait_until(lambda: not any(pid_alive(x) for x in pids), 15, message="workers to exit after the master died")
    assert refused(p.port), "the listen port still accepts connections with the master dead"


# -- logs and the command line -----------------------------------------------------------
def test_usr1_reopens_access_log(make_proxy, origin):
    p = make_proxy(config(origin))
    fetch(p.port, "GET", "/hello?before-rotate")
    wait_until(lambda: p.access_log.exists() and "before-rotate" in p.access_log.read_text(), 10,
               message="the first access-log line")
    rotated = p.access_log.with_name(p.access_log.name + ".1")
    p.access_log.rename(rotated)
    p.signal(signal.SIGUSR1)

    def new_file_has_line():
        fetch(p.port, "GET", "/hello?after-rotate")
        return p.access_log.exists() and "after-rotate" in p.access_log.read_text()
    wait_until(new_file_has_line, 10, interval=0.3, message="lines in the reopened access log")
    assert "before-rotate" in rotated.read_text()
    assert "before-rotate" not in p.access_log.read_text()


def test_usr1_reopens_error_log(make_proxy, origin):
    p = make_proxy(config(origin))
    rotated = p.error_log.with_name(p.error_log.name + ".1")
    p.error_log.rename(rotated)
    p.signal(signal.SIGUSR1)
    wait_until(lambda: p.error_log.exists(), 10, message="a new error log after USR1")
    p.reload()  # logs "generation N ready"
    wait_until(lambda: "generation" in p.error_log.read_text(), 10, message="new lines in the reopened error log")


def test_signal_verbs_via_pid_file(make_proxy, origin):
    p = make_proxy(config(origin))
    assert int(p.pid_file.read_text().strip()) == p.pid
    gen = p.generation()
    out = p.run_cli("-s", "reload", "-c", str(p.config_path))
    assert out.returncode == 0, out
    p.wait_generation(gen)
    out = p.run_cli("-s", "reopen", "-c", str(p.config_path))
    assert out.returncode == 0, out
    out = p.run_cli("-s", "quit", "-c", str(p.config_path))
    assert out.returncode == 0, out
    assert p.wait_exit(20) == 0
    p.assert_no_leftovers(timeout=0.5)


def test_signal_stop_via_pid_file(make_proxy, origin):
    p = make_proxy(config(origin))
    out = p.run_cli("-s", "stop", "-c", str(p.config_path))
    assert out.returncode == 0, out
    assert p.wait_exit(15) is not None
    p.assert_no_leftovers(timeout=2)


def test_version(tmp_path):
    out = ProxyProcess(tmp_path).run_cli("--version")
    assert out.returncode == 0, out
    text = out.stdout + out.stderr
    assert text.startswith("fastproxy ") and "httptools" in text and "uvloop" in text, text


def test_config_test_flag(tmp_path, origin):
    p = ProxyProcess(tmp_path, config(origin))
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode == 0, out
    assert f"configuration file {p.config_path} test is successful" in out.stdout + out.stderr, out
    good = p.config_path.read_text()
    p.write_config(text=good.replace('shutdown_timeout = "10s"', 'shutdown_timeout = "ten seconds"')
                   .replace("[main]\n", "[main]\nno_such_key = 1\n", 1))
    out = p.run_cli("-t", "-c", str(p.config_path))
    text = out.stdout + out.stderr
    assert out.returncode == 1, out
    assert str(p.config_path) in text and "main.shutdown_timeout" in text and "main.no_such_key" in text, text
    assert "test is successful" not in text
