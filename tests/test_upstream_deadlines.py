"""Upstream deadlines follow activity, and the log names the one that expired.

Timeouts here are one second and every transfer outlasts them several times over, so a
deadline that did not follow activity would cut the transfer: taking a connection from the
pool resets its idle deadline, read_timeout counts from the end of the request (or the last
byte read), and send_timeout from the last time the upstream took any of the request.
"""
from __future__ import annotations

import re
import socket
import threading
import time
import zlib

import pytest

from harness.client import RawClient, ServerClosed, build_request
from harness.origin import BLOCK, OriginConn, Request, pattern_crc
from harness.proxy import upstream, wait_until

TIMEOUT = "1s"
PIECE = 64 * 1024


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    module_origin.handlers["stream_echo"] = stream_echo
    module_origin.handlers["slow_reader"] = slow_reader
    module_origin.handlers["never_reads"] = never_reads
    return module_proxy_factory({
        "main": {"workers": 1, "max_body_size": "64m", "client_body_timeout": "10s"},
        "upstreams": {"short": upstream(module_origin, keepalive_timeout=TIMEOUT, read_timeout=TIMEOUT,
                                        send_timeout=TIMEOUT)},
        "routes": [{"name": "short", "path_prefix": "/", "upstream": "short"}],
    })


def stream_echo(conn: OriginConn, req: Request) -> None:
    """Answers at once, then echoes each piece of the body as it arrives."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    left = int(req.header("content-length"))
    while left:
        piece = conn.read_some(left)
        left -= len(piece)
        conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.sendall(b"0\r\n\r\n")


stream_echo.reads_body = True


def slow_reader(conn: OriginConn, req: Request) -> None:
    """Sips the body (64 KiB every 0.1 s through a small receive buffer) for 3 seconds,
    takes the rest at full speed, then answers with its length and CRC.

    Each sip is a recv on the socket freeing a whole segment (loopback's MSS is 64 KiB), so
    the proxy sees progress on every sip. Sipping 16 KiB through conn.read_some did not: it
    took from the harness's buffer, which each recv fills with all that is queued (the head's
    read brought 110 KiB of body along), so no room was freed for 0.7 s or more at a time, and
    on a loaded machine (sleeps overrunning) the slow upstream looked stuck past send_timeout."""
    def took(piece: bytes) -> int:
        req.body_len += len(piece)
        req.body_crc = zlib.crc32(piece, req.body_crc)
        return len(piece)

    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sipping_until = time.monotonic() + 3
    left = int(req.header("content-length"))
    left -= took(conn.read_some(left) if conn.buf else b"")  # read with the head: no progress for the proxy
    while left and time.monotonic() < sipping_until:
        piece = conn.sock.recv(min(left, 64 * 1024))
        assert piece, "the proxy closed the upload"
        left -= took(piece)
        time.sleep(0.1)
    while left:
        left -= took(conn.read_some(left))
    conn.respond_json({"body_len": req.body_len, "body_crc": req.body_crc})


slow_reader.reads_body = True


GIVE_UP = threading.Event()


def never_reads(conn: OriginConn, req: Request) -> None:
    """Reads the request head, never its body (until the test gives up)."""
    GIVE_UP.wait(30)


never_reads.reads_body = True


def send_paced(c: RawClient, size: int, seconds: float) -> None:
    """`size` pattern bytes spread evenly over about `seconds`."""
    pieces = size // PIECE
    start = time.monotonic()
    for i in range(pieces):
        assert c.send(BLOCK[(i * PIECE) % len(BLOCK):][:PIECE]), f"the proxy closed after {i} pieces"
        time.sleep(max(0.0, start + (i + 1) * seconds / pieces - time.monotonic()))


def error_log(proxy) -> str:
    return proxy.error_log.read_text()


def test_slow_upload_on_reused_connection_outlasts_its_idle_deadline(proxy):
    """3 MiB at 1 MiB/s over a pooled connection whose idle deadline (1s) falls early in the
    upload: the deadline is reset when the connection is taken from the pool, so the upload
    completes. Before, it was cut with a 504 and a truncated body at the old deadline."""
    size = 3 << 20
    with RawClient(proxy.port, timeout=20) as c:
        pooled = c.request("GET", "/echo?leave-a-connection-in-the-pool").json()["conn_id"]
        c.send(build_request("PUT", "/echo?slow-upload", [("Content-Length", str(size))]))
        send_paced(c, size, 3.0)
        r = c.read_response()
    assert r.status == 200, r
    echo = r.json()
    assert echo["conn_id"] == pooled, "the upload did not reuse the pooled connection"
    assert (echo["body_len"], echo["body_crc"]) == (size, pattern_crc(size))


def test_read_timeout_counts_from_the_end_of_the_request(proxy):
    """An upstream that answers at once and echoes a slow upload piece by piece is silent
    between pieces for longer than read_timeout: waiting for the client is not its fault."""
    pieces = [b"one ", b"two ", b"three"]
    body = b"".join(pieces)
    with RawClient(proxy.port, timeout=20) as c:
        c.send(build_request("POST", "/stream_echo", [("Content-Length", str(len(body)))]))
        for piece in pieces:
            time.sleep(1.5)  # longer than read_timeout, shorter than client_body_timeout
            assert c.send(piece), "the proxy closed the connection"
        r = c.read_response()
    assert (r.status, r.body) == (200, body), r


def test_send_timeout_counts_from_the_last_byte_the_upstream_took(proxy):
    """An upstream that reads slowly keeps our write buffer full for longer than
    send_timeout, but takes some of the request every second: it is slow, not stuck.
    (The 8 MiB fill the kernel's socket buffers, so our own buffer does fill.)"""
    size = 8 << 20
    with RawClient(proxy.port, timeout=30) as c:
        c.send(build_request("POST", "/slow_reader", [("Content-Length", str(size))]))
        send_paced(c, size, 0)
        r = c.read_response()
    assert r.status == 200, r
    assert (r.json()["body_len"], r.json()["body_crc"]) == (size, pattern_crc(size))


def test_timeout_log_names_the_timeout_and_the_time(proxy):
    with RawClient(proxy.port, timeout=20) as c:
        r = c.request("GET", "/slow?delay=3")
    assert r.status == 504, r
    line = wait_until(lambda: [l for l in error_log(proxy).splitlines() if "/slow?delay=3" in l], 5)[0]
    waited = re.search(r"read_timeout \(1s\) expired: no response ([\d.]+)s after the request was sent", line)
    assert waited and float(waited[1]) >= 1, line

    sender_done = threading.Event()
    with RawClient(proxy.port, timeout=20) as c:
        c.send(build_request("POST", "/never_reads", [("Content-Length", str(64 << 20))]))

        def upload():
            try:
                for i in range((64 << 20) // PIECE):
                    c.sock.sendall(BLOCK[:PIECE])
            except OSError:
                pass  # the proxy gave up on the upload, as it should
            sender_done.set()
        threading.Thread(target=upload, daemon=True).start()
        try:
            assert c.read_response().status == 504
        except (ServerClosed, ConnectionResetError):
            pass  # answered while the upload was still coming: the reset may win over the 504
        assert sender_done.wait(20)
    GIVE_UP.set()
    line = wait_until(lambda: [l for l in error_log(proxy).splitlines() if "/never_reads" in l], 5)[0]
    waited = re.search(r"send_timeout \(1s\) expired: the upstream took none of the request for ([\d.]+)s", line)
    assert waited and float(waited[1]) >= 1, line
