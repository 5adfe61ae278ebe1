"""Active health checks (issue 10): the one checker process the master runs, what it probes and
concludes, how workers follow its verdict, how it survives kills and reloads, and /status and
/metrics. Real origins on loopback, the real master with 2 workers, real signals; every wait is
bounded and no assertion is about time: "within interval x healthy_threshold" is asserted as
"after healthy_threshold passed probes" (the log line says how many in a row).
"""
from __future__ import annotations

import os
import re
import signal
import ssl
import threading
import time

import pytest

from harness.client import fetch
from harness.pki import CA
from harness.proxy import cmdline, pid_alive, upstream, wait_until

INTERVAL = "0.2s"
CHECKER_TITLE = "fastproxy: health checker"


class Health:
    """What an origin's /healthz answers (changed by the test at any time), and the probes
    it got, with the status each was given."""

    def __init__(self, origin, status=200, body=b"ok", delay=0.0):
        self.origin, self.status, self.body, self.delay = origin, status, body, delay
        self.probes = []  # (request, status answered)
        self.lock = threading.Lock()
        origin.handlers["healthz"] = self.answer

    def answer(self, conn, req):
        status, body, delay = self.status, self.body, self.delay
        with self.lock:
            self.probes.append((req, status))
        if delay:
            time.sleep(delay)
        conn.respond(status, body)

    def count(self, status=None) -> int:
        with self.lock:
            return sum(1 for _, s in self.probes if status is None or s == status)

    def set(self, status=None, body=None, delay=None) -> int:
        """Change the answers; returns how many probes came before."""
        with self.lock:
            self.status = self.status if status is None else status
            self.body = self.body if body is None else body
            self.delay = self.delay if delay is None else delay
            return len(self.probes)


def server_context(cert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, cert))
    return context


def proxied(origin):
    """Requests the origin got through the proxy (not the checker's probes)."""
    return [r for r in origin.requests if not r.path.endswith("/healthz")]


def config(*origins, workers=2, **health):
    check = {"path": "/healthz", "interval": INTERVAL, "timeout": "1s", "healthy_threshold": 2,
             "unhealthy_threshold": 3, **health}
    return {"main": {"workers": workers},
            "upstreams": {"app": upstream(*origins, max_fails=0, health=check)},
            "routes": [{"path_prefix": "/", "upstream": "app"}]}


def servers(proxy, name="app"):
    """/status upstreams.NAME servers, by address."""
    return {s["address"]: s for s in proxy.status()["upstreams"][name]["servers"]}


def state_of(proxy, origin):
    return servers(proxy)[origin.address]["state"]


def wait_state(proxy, origin, state, timeout=15):
    wait_until(lambda: state_of(proxy, origin) == state, timeout,
               message=f"{origin.address} {state} in /status")


def log_lines(proxy, pattern):
    text = proxy.error_log.read_text() if proxy.error_log.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def checker_pids(proxy):
    """Live children of the master titled as the health checker."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_alive(int(entry)):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == proxy.pid and cmdline(int(entry)) == CHECKER_TITLE:
                found.append(int(entry))
    return found


def spread(proxy, n=30):
    """n requests on fresh connections (so both workers serve some): the origins' names."""
    names = []
    for _ in range(n):
        r = fetch(proxy.port, "GET", "/api/echo", [("Connection", "close")], timeout=5)
        assert r.status == 200, r
        names.append(r.json()["origin"])
    return names


def test_one_checker_probes_each_server_once_per_interval(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    health = [Health(a), Health(b)]
    proxy = make_proxy(config(a, b, host="health.example"))
    wait_until(lambda: all(h.count() >= 3 for h in health), 15, message="probes")
    assert len(checker_pids(proxy)) == 1  # one for the instance, not one per worker
    # Probes are counted over a window the test measures: a checker may run late on a busy
    # machine (fewer probes), never early, so two checkers (or one per worker) would show
    # about twice the bound.
    before, started = [h.count() for h in health], time.monotonic()
    wait_until(lambda: all(h.count() >= n + 10 for h, n in zip(health, before)), 30, message="more probes")
    elapsed = time.monotonic() - started
    for h, n in zip(health, before):
        assert h.count() - n <= elapsed / 0.2 + 2, (h.count() - n, elapsed)
        req = h.probes[-1][0]
        assert (req.method, req.target, req.header("host")) == ("GET", "/healthz", "health.example")
        assert req.header("user-agent") == "fastproxy-health-check"


def test_probe_host_defaults_to_the_server_address(make_proxy, make_origin):
    a = make_origin("a")
    health = Health(a)
    make_proxy(config(a, workers=1, method="HEAD"))
    wait_until(lambda: health.count() >= 1, 15, message="a probe")
    req = health.probes[0][0]
    assert (req.method, req.header("host")) == ("HEAD", a.address)


def test_no_checker_without_checks(make_proxy, origin):
    proxy = make_proxy({"upstreams": {"app": upstream(origin)},
                        "routes": [{"path_prefix": "/", "upstream": "app"}]})
    assert checker_pids(proxy) == []
    server = servers(proxy)[origin.address]
    assert (server["state"], server["check"]) == ("up", None)


def test_failing_server_goes_down_then_back_up(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    health_b = Health(b)
    Health(a)
    proxy = make_proxy(config(a, b))
    wait_state(proxy, a, "up")
    wait_state(proxy, b, "up")
    assert set(spread(proxy, 10)) == {"a", "b"}

    health_b.set(status=500)
    wait_state(proxy, b, "down")
    server = servers(proxy)[b.address]
    assert server["cause"] == "active" and server["effective_weight"] == 0
    assert (server["check"]["status"], server["check"]["result"]) == (500, "status")
    # exactly unhealthy_threshold failed probes took it down, logged once with the reason
    down = log_lines(proxy, rf"upstream app server {re.escape(b.address)} is down")
    assert len(down) == 1 and down[0].endswith("is down: GET /healthz: status 500 (3 probes in a row)"), down
    assert "[warn]" in down[0] and "#checker:" in down[0]

    seen = len(proxied(b))
    assert set(spread(proxy)) == {"a"}  # every worker follows the checker
    assert len(proxied(b)) == seen
    assert 'fastproxy_upstream_server_up{upstream="app",server="%s"} 0' % b.address in proxy.metrics()

    passed_before = health_b.count(200)
    health_b.set(status=200)
    wait_state(proxy, b, "up")
    # back after healthy_threshold passed probes (so within interval x healthy_threshold,
    # plus the probe in flight when it was fixed)
    assert health_b.count(200) - passed_before >= 2
    up = log_lines(proxy, rf"upstream app server {re.escape(b.address)} is up")
    assert up[-1].endswith("is up: GET /healthz: status 200 (2 probes in a row)"), up
    wait_until(lambda: "b" in spread(proxy, 10), 10, message="requests to b again")
    assert len(log_lines(proxy, r"is down")) == 1  # one line per change, no repeats


def test_killed_server_down_then_back_when_restarted(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    Health(a)
    Health(b)
    proxy = make_proxy(config(a, b))
    wait_state(proxy, b, "up")
    b.stop()  # gone: its port refuses connections
    wait_state(proxy, b, "down")
    assert log_lines(proxy, rf"server {re.escape(b.address)} is down: connect refused \(3 probes in a row\)$")
    assert set(spread(proxy, 10)) == {"a"}
    again = make_origin("b-again", port=b.port)
    health = Health(again)
    wait_state(proxy, b, "up")
    # back after healthy_threshold passed probes: within interval x healthy_threshold, plus
    # the probe in flight when it came back
    assert health.count() >= 2
    assert log_lines(proxy, rf"server {re.escape(b.address)} is up")[-1].endswith("(2 probes in a row)")
    wait_until(lambda: "b-again" in spread(proxy, 10), 10, message="requests to the restarted server")


def test_expect_body(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    Health(a, body=b"status: ok")
    Health(b, body=b"degraded")
    proxy = make_proxy(config(a, b, expect_body="ok", workers=1))
    wait_state(proxy, a, "up")
    wait_state(proxy, b, "down")  # a server not checked yet is decided by its first probe
    check = servers(proxy)[b.address]["check"]
    assert (check["status"], check["result"]) == (200, "body")
    assert log_lines(proxy, rf"server {re.escape(b.address)} is down: body lacks 'ok'$")


def test_timeout_and_refused(make_proxy, make_origin):
    a, slow, gone = make_origin("a"), make_origin("slow"), make_origin("gone")
    Health(a)
    Health(slow, delay=2.0)
    gone.stop()
    proxy = make_proxy(config(a, slow, gone, timeout="0.3s", workers=1))
    wait_state(proxy, slow, "down")
    wait_state(proxy, gone, "down")
    assert servers(proxy)[slow.address]["check"]["result"] == "timeout"
    assert servers(proxy)[gone.address]["check"]["result"] == "connect"
    assert servers(proxy)[gone.address]["check"]["status"] == 0
    assert log_lines(proxy, rf"server {re.escape(slow.address)} is down: timeout after 0.3s$")
    assert log_lines(proxy, rf"server {re.escape(gone.address)} is down: connect refused$")
    assert state_of(proxy, a) == "up"
    assert set(spread(proxy, 10)) == {"a"}


def test_probe_reads_a_bounded_response(make_proxy, make_origin):
    big, garbage, silent = make_origin("big"), make_origin("garbage"), make_origin("silent")

    def endless(conn, req):
        # a body announced as 1 GiB, sent until the prober goes: it is judged on its first
        # 64 KiB, not read to the end (nor timed out)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\nok")
        while True:
            conn.sendall(b"x" * 65536)

    def not_http(conn, req):
        conn.sendall(b"SPDY/9 hello\r\n\r\n")
        conn.keep_alive = False

    big.handlers["healthz"] = endless
    garbage.handlers["healthz"] = not_http
    silent.handlers["healthz"] = lambda conn, req: setattr(conn, "keep_alive", False)
    proxy = make_proxy(config(big, garbage, silent, expect_body="ok", timeout="5s", workers=1))
    wait_state(proxy, big, "up")
    wait_state(proxy, garbage, "down")
    wait_state(proxy, silent, "down")
    assert servers(proxy)[garbage.address]["check"]["result"] == "invalid"
    assert servers(proxy)[silent.address]["check"]["result"] == "closed"
    assert log_lines(proxy, rf"server {re.escape(garbage.address)} is down: invalid response$")
    assert log_lines(proxy, rf"server {re.escape(silent.address)} is down: closed before a full response$")


def test_tls_upstream_probed_over_tls(make_proxy, make_origin, tmp_path):
    ca, unknown = CA(tmp_path), CA(tmp_path, "unknown CA")
    good = make_origin("good", tls=server_context(ca.issue("good", ["origin.test"])))
    stranger = make_origin("stranger", tls=server_context(unknown.issue("stranger", ["origin.test"])))
    Health(good)
    Health(stranger)
    cfg = config(workers=1)
    cfg["upstreams"]["app"].update(servers=[f"https://{good.address}", f"https://{stranger.address}"],
                                   tls={"ca": str(ca.path), "server_name": "origin.test"})
    proxy = make_proxy(cfg)
    wait_state(proxy, good, "up")
    wait_state(proxy, stranger, "down")  # its certificate is not from the configured CA
    assert servers(proxy)[stranger.address]["check"]["result"] == "connect"
    assert log_lines(proxy, rf"server {re.escape(stranger.address)} is down: TLS handshake failed: "
                            r"CERTIFICATE_VERIFY_FAILED$")
    assert good.handshakes >= 1


def test_checker_restarted_when_killed_and_gone_after_quit(make_proxy, make_origin):
    a = make_origin("a")
    health = Health(a)
    proxy = make_proxy(config(a))
    first = wait_until(lambda: checker_pids(proxy), 15, message="the checker")
    assert len(first) == 1
    os.kill(first[0], signal.SIGKILL)
    second = wait_until(lambda: [p for p in checker_pids(proxy) if p != first[0]], 15,
                        message="a new checker")
    assert len(second) == 1
    assert log_lines(proxy, rf"health checker pid {first[0]} was killed by signal SIGKILL")
    n = health.count()
    wait_until(lambda: health.count() > n + 2, 15, message="probes by the new checker")
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait_exit(15) == 0
    assert not pid_alive(second[0])
    assert log_lines(proxy, rf"health checker pid {second[0]} exited with code 0")


def test_checker_exits_with_a_killed_master(make_proxy, make_origin):
    a = make_origin("a")
    Health(a)
    proxy = make_proxy(config(a, workers=1))
    checker = wait_until(lambda: checker_pids(proxy), 15, message="the checker")[0]
    proxy.signal(signal.SIGKILL)
    proxy.wait_exit(10)
    wait_until(lambda: not pid_alive(checker), 15, message="the checker to exit with its master")


def test_reload_keeps_a_down_server_down(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    Health(a)
    health_b = Health(b, status=503)
    proxy = make_proxy(config(a, b))
    wait_state(proxy, b, "down")
    old = checker_pids(proxy)
    cfg = config(a, b)
    cfg["upstreams"]["app"]["keepalive"] = 4  # any change: a new generation, a new checker
    proxy.write_config(cfg)
    proxy.reload()
    wait_until(lambda: checker_pids(proxy) and checker_pids(proxy) != old, 15, message="the new checker")
    n = health_b.count()
    wait_until(lambda: health_b.count() >= n + 3, 15, message="probes by the new checker")
    # the new checker started from the zone's state: still down, and no new transition
    assert state_of(proxy, b) == "down"
    assert len(log_lines(proxy, rf"server {re.escape(b.address)} is down")) == 1
    assert set(spread(proxy, 10)) == {"a"}
    health_b.set(status=200)
    wait_state(proxy, b, "up")
    assert log_lines(proxy, rf"server {re.escape(b.address)} is up")[-1].endswith("(2 probes in a row)")


def test_reload_removing_a_server_or_the_checks(make_proxy, make_origin):
    a, b, c = make_origin("a"), make_origin("b"), make_origin("c")
    Health(a)
    Health(b, status=500)
    Health(c)
    proxy = make_proxy(config(a, b, c))
    wait_state(proxy, b, "down")
    proxy.write_config(config(a, b))
    proxy.reload()
    assert set(servers(proxy)) == {a.address, b.address}  # c: removed, nothing in use
    metrics = proxy.metrics()
    assert f'fastproxy_upstream_server_up{{upstream="app",server="{c.address}"}}' not in metrics
    # its counters stay while its name is kept
    assert f'fastproxy_upstream_server_requests_total{{upstream="app",server="{c.address}"}}' in metrics
    assert state_of(proxy, b) == "down"

    old = checker_pids(proxy)
    proxy.write_config({"main": {"workers": 2}, "upstreams": {"app": upstream(a, b, max_fails=0)},
                        "routes": [{"path_prefix": "/", "upstream": "app"}]})
    proxy.reload()
    wait_until(lambda: not any(pid_alive(p) for p in old), 15, message="the checker to stop")
    assert checker_pids(proxy) == []
    # without checks, the old verdict is forgotten: b takes requests again
    wait_state(proxy, b, "up")
    assert servers(proxy)[b.address]["check"] is None
    assert "b" in spread(proxy, 20)


def test_status_and_metrics_content(make_proxy, make_origin):
    a, b = make_origin("a"), make_origin("b")
    Health(a)
    Health(b, status=500)
    cfg = config(workers=1)
    cfg["upstreams"]["app"]["servers"] = [{"address": a.address, "weight": 3},
                                          {"address": b.address, "backup": True}]
    cfg["upstreams"]["other"] = upstream(a)
    proxy = make_proxy(cfg)
    wait_state(proxy, b, "down")
    wait_state(proxy, a, "up")
    st = proxy.status()
    server = servers(proxy)[a.address]
    assert {k: server[k] for k in ("name", "state", "weight", "effective_weight", "backup")} == {
        "name": a.address, "state": "up", "weight": 3, "effective_weight": 3, "backup": False}
    assert set(server) >= {"active", "requests", "failures", "check"}
    assert set(server["failures"]) == {"connect", "reset", "timeout", "status"}
    assert server["check"]["result"] == "passed" and server["check"]["status"] == 200
    assert abs(server["check"]["time"] - time.time()) < 60
    other = st["upstreams"]["other"]["servers"][0]
    assert (other["state"], other["check"]) == ("up", None)

    metrics = proxy.metrics()
    labels = f'upstream="app",server="{a.address}"'
    for line in (f"fastproxy_upstream_server_requests_total{{{labels}}} ",
                 f'fastproxy_upstream_server_failures_total{{{labels},kind="connect"}} ',
                 f"fastproxy_upstream_server_active{{{labels}}} ",
                 f'fastproxy_upstream_server_response_seconds_bucket{{{labels},le="+Inf"}} ',
                 f"fastproxy_upstream_server_response_seconds_count{{{labels}}} ",
                 f"fastproxy_upstream_server_up{{{labels}}} 1\n",
                 f'fastproxy_upstream_server_up{{upstream="app",server="{b.address}"}} 0\n',
                 f'fastproxy_upstream_server_up{{upstream="other",server="{a.address}"}} 1\n',
                 "# TYPE fastproxy_upstream_server_response_seconds histogram\n",
                 "# TYPE fastproxy_upstream_server_up gauge\n"):
        assert line in metrics, line


@pytest.mark.parametrize("state", ["backup", "config"])
def test_status_backup_and_down_by_config(make_proxy, make_origin, state):
    a, b = make_origin("a"), make_origin("b")
    cfg = {"upstreams": {"app": upstream(max_fails=0)}, "routes": [{"path_prefix": "/", "upstream": "app"}]}
    second = {"address": b.address, "backup" if state == "backup" else "down": True}
    cfg["upstreams"]["app"]["servers"] = [a.address, second]
    proxy = make_proxy(cfg)
    server = servers(proxy)[b.address]
    if state == "backup":
        assert (server["state"], server["backup"]) == ("backup", True)
    else:
        assert (server["state"], server["cause"], server["effective_weight"]) == ("down", "config", 0)
