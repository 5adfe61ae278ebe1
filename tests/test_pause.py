"""FILTER_PAUSE and resume through the real proxy, by the filter that uses them: a `respond`
route's `delay` (a loop timer, then the answer). What must hold while a request is paused:
the worker serves others, the client's leaving, pipelining, a request body, pause_timeout
and a drain."""
from __future__ import annotations

import json
import select
import signal
import socket
import struct
import threading
import time

import pytest

from fastproxy.config import load_runtime
from harness.client import RawClient, build_request, chunked, fetch
from harness.proxy import ProxyProcess, pid_alive, respond, to_toml, wait_until

SLOW = respond(201, "slow\n", {"Content-Type": "text/plain", "X-Mock": "yes"}) | {"delay": "200ms"}


def config(slow=SLOW, **main):
    return {
        "main": {"workers": 1, "shutdown_timeout": "10s"} | main,
        "access_log": {"format": "json", "flush": "100ms"},
        "routes": [
            {"name": "slow", "path": "/slow", "respond": slow},
            {"name": "fast", "path": "/fast", "respond": respond(200, "fast\n")},
        ],
    }


def read_by_proxy(proxy, *clients) -> bool:
    """Whether the proxy has read everything these clients sent: the receive queues of its
    side of their connections are empty (/proc/net/tcp), so their requests are parsed (a
    read is parsed in the callback that reads it)."""
    ports = {c.sock.getsockname()[1] for c in clients}
    queued = {}
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if int(local.split(":")[1], 16) == proxy.port and int(remote.split(":")[1], 16) in ports:
                queued[int(remote.split(":")[1], 16)] = int(queues.split(":")[1], 16)
    return len(queued) == len(ports) and not any(queued.values())


def sent_and_read(proxy, client, data: bytes) -> None:
    client.send(data)
    wait_until(lambda: read_by_proxy(proxy, client), 10, message="the proxy to read the request")


def leave(client) -> None:
    """Close with a reset, as a client that gives up does (a plain close is a half-close,
    after which the proxy still answers)."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def access_lines(proxy) -> list:
    text = proxy.access_log.read_text() if proxy.access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def logged(proxy, status: int, uri: str) -> dict:
    def find():
        return next((line for line in access_lines(proxy) if line["status"] == status and line["uri"] == uri),
                    None)
    return wait_until(find, 10, message=f"an access-log line {status} {uri}")


def test_delayed_answer_comes_after_the_delay_with_its_status_headers_and_body(make_proxy):
    p = make_proxy(config())
    started = time.monotonic()
    r = fetch(p.port, "GET", "/slow")
    waited = time.monotonic() - started
    assert (r.status, r.body, r.header("X-Mock"), r.header("Content-Type")) == (201, b"slow\n", "yes", "text/plain")
    assert r.header("X-Request-ID") and r.header("Content-Length") == "5"
    # the loop's timers count from its cached time, in whole milliseconds: a few early at most
    assert waited >= 0.19, f"answered after {waited:.3f} s, before its delay"
    r = fetch(p.port, "HEAD", "/slow")
    assert (r.status, r.body, r.header("Content-Length")) == (201, b"", "5"), r


def test_delay_and_pause_timeout_in_the_config(tmp_path):
    proxy = ProxyProcess(tmp_path, config(slow=SLOW | {"delay": "1.5s"}))
    proxy.write_config()
    runtime = load_runtime(str(proxy.config_path))
    assert runtime.main.pause_timeout == 60.0
    assert [route.handler.delay for route in runtime.routes] == [1.5, 0.0]
    proxy.write_config(config(slow=SLOW | {"delay": "soon"}, pause_timeout=0))
    errors = proxy.run_cli("-t", "-c", str(proxy.config_path)).stderr
    assert 'routes[0].respond.delay: "soon" is not a duration' in errors, errors
    assert "main.pause_timeout: must be more than 0" in errors, errors


def test_many_delayed_requests_wait_together_and_others_are_served_meanwhile(make_proxy):
    p = make_proxy(config(slow=SLOW | {"delay": "3s"}))
    clients = [RawClient(p.port) for _ in range(50)]
    try:
        for c in clients:
            c.send(build_request("GET", "/slow"))
        wait_until(lambda: read_by_proxy(p, *clients), 10, message="the proxy to read the 50 requests")
        r = fetch(p.port, "GET", "/fast")
        assert (r.status, r.body) == (200, b"fast\n"), r
        answered = select.select([c.sock for c in clients], [], [], 0)[0]
        assert not answered, f"{len(answered)} delayed requests answered before the plain one"
        for c in clients:
            r = c.read_response()
            assert (r.status, r.body) == (201, b"slow\n"), r
    finally:
        for c in clients:
            c.close()


def test_client_leaving_while_paused_is_logged_499_and_the_worker_goes_on(make_proxy):
    cfg = config(slow=SLOW | {"delay": "1s"})
    cfg["routes"].append({"name": "slower", "path": "/slower", "respond": SLOW | {"delay": "3s"}})
    p = make_proxy(cfg)
    (pid,) = p.worker_pids()
    c = RawClient(p.port)
    sent_and_read(p, c, build_request("GET", "/slow?alone"))
    leave(c)
    logged(p, 499, "/slow?alone")
    # Three on one connection. Reading is paused while requests queue, so the reset is seen
    # when the first answer is written: the second is then the one answered (paused, 499)
    # and the third, paused behind it, is dropped unanswered; the timers of both let go.
    c = RawClient(p.port)
    sent_and_read(p, c, b"".join(build_request("GET", t) for t in ("/slow?1", "/slower?2", "/slower?3")))
    leave(c)
    logged(p, 499, "/slower?2")
    time.sleep(2.5)  # past the delays: timers not cancelled would run now (and must be harmless)
    assert fetch(p.port, "GET", "/fast").status == 200
    assert fetch(p.port, "GET", "/slow").status == 201
    assert p.worker_pids() == [pid] and pid_alive(pid)
    assert not [line for line in access_lines(p) if line["uri"] == "/slower?3"], "a request never answered"
    assert "Traceback" not in p.error_log.read_text()


def test_client_body_timeout_still_applies_while_paused(make_proxy):
    p = make_proxy(config(slow=SLOW | {"delay": "2s"}, client_body_timeout="1s"))
    with RawClient(p.port) as c:
        c.send(build_request("POST", "/slow", [("Content-Length", "10")]) + b"12345")
        r = c.read_response()
        assert r.status == 408, r
        assert c.is_closed()
    time.sleep(1.5)  # past the delay: its timer finds the request over
    assert fetch(p.port, "GET", "/fast").status == 200
    assert [line["status"] for line in access_lines(p) if line["uri"] == "/slow"] == [408]
    assert "Traceback" not in p.error_log.read_text()


def test_pause_past_pause_timeout_is_answered_504_and_logged_with_the_filter(make_proxy):
    p = make_proxy(config(slow=SLOW | {"delay": "3s"}, pause_timeout="1s"))
    started = time.monotonic()
    with RawClient(p.port) as c:
        r = c.request("GET", "/slow", [("X-Request-ID", "paused-too-long")])
        assert r.status == 504, r
        assert r.header("X-Request-ID") == "paused-too-long" and r.json()["request_id"] == "paused-too-long"
        assert time.monotonic() - started >= 0.99
        # answered in full (no body pending): the connection stays usable, and the delay's
        # timer, when it runs, finds nothing to resume
        assert c.request("GET", "/fast").status == 200
    wait_until(lambda: "paused in filter Respond" in p.error_log.read_text(), 10, message="the error-log line")
    line = next(x for x in p.error_log.read_text().splitlines() if "paused in filter Respond" in x)
    assert "pause_timeout" in line and "paused-too-long" in line and '"GET /slow"' in line, line
    time.sleep(2.5)  # the delay's timer runs: resume() on an exchange answered 504 is a no-op
    assert fetch(p.port, "GET", "/fast").status == 200
    assert [x["status"] for x in access_lines(p) if x["uri"] == "/slow"] == [504]


@pytest.mark.parametrize("order", ["slow-first", "fast-first"])
def test_pipelined_requests_are_answered_in_order_around_a_paused_one(make_proxy, order):
    p = make_proxy(config())
    targets = ["/slow", "/fast", "/slow", "/fast"] if order == "slow-first" else ["/fast", "/slow", "/fast", "/slow"]
    with RawClient(p.port) as c:
        c.send(b"".join(build_request("GET", t + f"?{i}") for i, t in enumerate(targets)))
        bodies = [c.read_response().body for _ in targets]
    assert bodies == [b"slow\n" if t == "/slow" else b"fast\n" for t in targets]


def test_request_refused_while_paused_behind_another_gets_its_refusal(make_proxy):
    """A pipelined request paused behind a slower one, whose chunked body outgrows the
    route's max_body_size: it is answered 413 in its turn, not with the delayed answer its
    timer brings meanwhile."""
    cfg = config()
    cfg["routes"] += [{"name": "slower", "path": "/slower", "respond": SLOW | {"delay": "1s"}},
                      {"name": "small", "path": "/small", "max_body_size": "1k", "respond": SLOW}]
    p = make_proxy(cfg)
    with RawClient(p.port) as c:
        c.send(build_request("GET", "/slower")
               + build_request("POST", "/small", [("Transfer-Encoding", "chunked")])
               + chunked(b"x" * 2048))
        first, second = c.read_response(), c.read_response()
        assert (first.status, first.body) == (201, b"slow\n"), first
        assert second.status == 413, second
        assert c.is_closed()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_sent_to_a_delayed_route_is_dropped_and_the_connection_reused(make_proxy, framing):
    """More than the body buffered for an upstream (256 KiB), sent while paused: a respond
    route reads and drops it at once, rather than holding it for an upstream it has not
    (and stopping reading from the client until the delay is over)."""
    p = make_proxy(config(slow=SLOW | {"delay": "4s"}))
    body = b"x" * (1 << 20)
    with RawClient(p.port) as c:
        if framing == "chunked":
            head = build_request("POST", "/slow", [("Transfer-Encoding", "chunked")])
            rest = chunked(*[body[i:i + 65536] for i in range(0, len(body), 65536)])
        else:
            head = build_request("POST", "/slow", [("Content-Length", str(len(body)))])
            rest = body
        sent_and_read(p, c, head)
        sender = threading.Thread(target=c.send, args=(rest,), daemon=True)
        sender.start()
        # well within the delay (reading 1 MiB takes milliseconds)
        wait_until(lambda: not sender.is_alive() and read_by_proxy(p, c), 3,
                   message="the proxy to read the whole body during the delay")
        r = c.read_response()
        assert (r.status, r.body) == (201, b"slow\n"), r
        assert not r.has_token("Connection", "close"), r
        r = c.request("GET", "/fast")
        assert (r.status, r.body) == (200, b"fast\n"), r


def test_quit_while_paused_answers_before_the_worker_exits(make_proxy):
    p = make_proxy(config(slow=SLOW | {"delay": "1s"}))
    (pid,) = p.worker_pids()
    with RawClient(p.port) as c:
        sent_and_read(p, c, build_request("GET", "/slow"))
        p.signal(signal.SIGQUIT)
        r = c.read_response()
        assert (r.status, r.body) == (201, b"slow\n"), r
        assert r.has_token("Connection", "close") and c.is_closed()
    assert p.wait_exit(20) == 0
    assert not pid_alive(pid)


def test_quit_answers_503_a_request_still_paused_half_way_through_shutdown_timeout(make_proxy):
    p = make_proxy(config(slow=SLOW | {"delay": "30s"}, shutdown_timeout="2s"))
    with RawClient(p.port) as c:
        sent_and_read(p, c, build_request("GET", "/slow", [("X-Request-ID", "drained")]))
        p.signal(signal.SIGQUIT)
        r = c.read_response()
        assert r.status == 503 and r.json()["request_id"] == "drained", r
    assert p.wait_exit(20) == 0
