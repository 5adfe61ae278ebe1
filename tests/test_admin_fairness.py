"""The admin listener shares its worker with public traffic and must not starve it.

Pipelined scrapes are answered one per loop turn and only as fast as the client reads
them; an oversized admin request head is refused.
"""
from __future__ import annotations

import select

from harness.client import RawClient, fetch
from harness.proxy import respond, summed_metric

PIPELINED = 500
# Routes only there to make /metrics large (every route adds a histogram, ~1.3 KB): 500
# answers (27 MB) are then far more than loopback socket buffers hold (a few MB), so the
# answers stall until the client reads them.
FILLER_ROUTES = 40


def config():
    return {
        "main": {"workers": 1},  # admin and public traffic on the same event loop
        "routes": [{"name": "pub", "path": "/pub", "respond": respond(200, "pub\n")}] + [
            {"name": f"filler{i}", "path": f"/filler/{i}", "respond": respond(200, "")}
            for i in range(FILLER_ROUTES)],
    }


def test_pipelined_scrapes_let_public_requests_through(make_proxy):
    p = make_proxy(config())
    with RawClient(p.admin_port) as admin:
        admin.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n" * PIPELINED)
        first = admin.read_response()
        assert first.status == 200, first
        # The worker is serving the admin backlog now; a public request must not wait for
        # the end of it. Each scrape shows how many public requests were done when it was
        # rendered, so the answers tell whether the public one ran in between.
        r = fetch(p.port, "GET", "/pub")
        assert r.status == 200 and r.body == b"pub\n", r
        served = [first] + [admin.read_response() for _ in range(PIPELINED - 1)]
    assert all(s.status == 200 and s.header("content-type").startswith("text/plain")
               for s in served), [s for s in served if s.status != 200][:1]
    public_done = [summed_metric(s.body.decode(), "fastproxy_requests_total", route="pub")
                   for s in served]
    assert public_done == sorted(public_done), public_done
    assert public_done[0] == 0 and public_done[-1] == 1, (
        "every scrape was rendered before the public request was answered", public_done)


def test_pipelined_requests_and_a_bad_one_answered_in_order(make_proxy):
    p = make_proxy(config())
    with RawClient(p.admin_port) as admin:
        admin.send(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n" * 10
                   + b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
                   + b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\r\n\r\n"
                   + b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
                   + b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n"
                   + b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n")
        statuses = [admin.read_response().status for _ in range(10)]
        statuses.append(admin.read_response("HEAD").status)
        statuses += [admin.read_response().status for _ in range(3)]
        assert statuses == [200] * 11 + [405, 404, 400], statuses
        assert admin.is_closed()


def test_admin_request_head_is_capped(make_proxy):
    p = make_proxy(config())
    with RawClient(p.admin_port) as admin:
        admin.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
        for _ in range(64):  # up to 64 KiB of header lines, never ending the head
            if select.select([admin.sock], [], [], 0)[0]:
                break  # answered
            admin.send(b"X-Filler: " + b"a" * 1012 + b"\r\n")
        r = admin.read_response()
        assert r.status == 431 and r.header("connection") == "close", r
        assert admin.is_closed()
    assert fetch(p.admin_port, "GET", "/status", [("Connection", "close")]).status == 200
