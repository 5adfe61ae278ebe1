"""A refused upload: the client is still sending when the proxy answers and closes. The
answer must reach it (a close with unread bytes would reset the connection and could
destroy the answer on its way), and the connection must still end."""
from __future__ import annotations

import socket

import pytest

from harness.client import RawClient, ServerClosed
from harness.proxy import upstream


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, module_origin):
    return module_proxy_factory({
        "upstreams": {"app": upstream(module_origin)},
        "routes": [{"path_prefix": "/", "upstream": "app", "max_body_size": "1k"}],
    })


@pytest.mark.parametrize("round_", range(5))
def test_a_refused_upload_still_being_sent_gets_its_answer(proxy, round_):
    body = b"x" * (8 << 20)
    with RawClient(proxy.port, timeout=10) as c:
        # chunked, so the 413 comes only once the body passes 1 KiB: the client is mid-send
        c.sock.sendall(b"POST /up/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            while sent < len(body):
                piece = body[sent:sent + 65536]
                c.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy ended its side; what it answered must still be readable
        c.sock.shutdown(socket.SHUT_WR)
        r = c.read_response("POST")
        assert r.status == 413 and r.json()["status"] == 413, r
        assert c.is_closed(10)
