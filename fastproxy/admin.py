"""The admin endpoint: GET /metrics (Prometheus text) and GET /status (JSON), served by every worker.

All workers accept on the one admin socket the master bound and they inherited. Whichever worker
takes a connection reads the shared region, which holds every worker's counters, so any worker
gives the same answer. This is plain Python on purpose: it runs once per scrape, never per
proxied request.

Worker call sequence::

    admin = await start_admin(loop, admin_sock, region)   # at worker start
    admin.close()                                          # when the worker drains or stops
"""
from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Optional, Set

import httptools

from .shm import reader

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0  # seconds a connection may wait for its next complete request
MAX_URL_SIZE = 8192
_ALLOWED = (b"GET", b"HEAD")


def _response(status: int, content_type: str, body: bytes, keep_alive: bool, head: bool,
              extra: bytes = b"") -> bytes:
    head_lines = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
    ).encode()
    return head_lines + extra + b"\r\n" + (b"" if head else body)


def _error_body(status: int) -> bytes:
    return json.dumps({"status": status, "error": HTTPStatus(status).phrase.lower()}).encode()


class AdminServer:
    """One worker's admin listener and its open connections."""

    def __init__(self, region):
        self.region = region
        self.closing = False
        self.connections: Set["_AdminProtocol"] = set()
        self.server: Optional[asyncio.AbstractServer] = None

    def close(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their answer."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if not connection.in_request:
                connection.close()

    def answer(self, method: bytes, url: bytes) -> tuple:
        """(status, content type, body, extra header bytes) for one request."""
        try:
            path = httptools.parse_url(url).path
        except httptools.HttpParserInvalidURLError:
            return 400, "application/json", _error_body(400), b""
        if path not in (b"/metrics", b"/status"):
            return 404, "application/json", _error_body(404), b""
        if method not in _ALLOWED:
            return 405, "application/json", _error_body(405), b"Allow: GET, HEAD\r\n"
        if path == b"/metrics":
            return 200, reader.CONTENT_TYPE, reader.render_prometheus(self.region), b""
        body = json.dumps(reader.status(self.region), indent=2).encode() + b"\n"
        return 200, "application/json", body, b""


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, admin: AdminServer):
        self.admin = admin
        self.loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = bytearray()
        self.in_request = False
        self.idle_timer: Optional[asyncio.TimerHandle] = None

    # --- asyncio callbacks ---

    def connection_made(self, transport):
        self.transport = transport
        self.admin.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc):
        self.admin.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close()  # the request was answered; what follows is a protocol we do not speak
        except httptools.HttpParserCallbackError:
            self._reply_and_close(414)  # on_url is the only callback that raises
        except httptools.HttpParserError:
            self._reply_and_close(400)

    def pause_writing(self):
        # Pipelined scrapes faster than the client reads: stop reading until it catches up.
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()

    # --- httptools callbacks ---

    def on_message_begin(self):
        self.in_request = True
        self.url.clear()

    def on_url(self, url: bytes):
        self.url += url
        if len(self.url) > MAX_URL_SIZE:
            raise ValueError("request target too long")  # feed_data raises HttpParserCallbackError

    def on_message_complete(self):
        self.in_request = False
        if self.transport.is_closing():
            return  # pipelined requests after one we answered with Connection: close
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive() and not self.admin.closing
        try:
            status, content_type, body, extra = self.admin.answer(method, bytes(self.url))
        except Exception:
            log.exception("admin request %r failed", bytes(self.url))
            status, content_type, body, extra = 500, "application/json", _error_body(500), b""
        self.transport.write(_response(status, content_type, body, keep_alive,
                                       method == b"HEAD", extra))
        if keep_alive:
            self._arm_idle_timer()
        else:
            self.close()

    # --- helpers ---

    def close(self):
        self.transport.close()

    def _reply_and_close(self, status: int):
        if not self.transport.is_closing():
            self.transport.write(_response(status, "application/json", _error_body(status),
                                           False, False))
            self.close()

    def _arm_idle_timer(self):
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(IDLE_TIMEOUT, self.close)


async def start_admin(loop: asyncio.AbstractEventLoop, sock, region) -> AdminServer:
    """Serve the admin endpoint on an already bound and listening socket."""
    admin = AdminServer(region)
    admin.server = await loop.create_server(lambda: _AdminProtocol(admin), sock=sock)
    return admin
