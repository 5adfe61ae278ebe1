"""The admin endpoint: GET /metrics (Prometheus text) and GET /status (JSON), served by every worker.

All workers accept on the one admin socket the master bound and they inherited. Whichever worker
takes a connection reads the shared region, which holds every worker's counters, so any worker
gives the same answer. This is plain Python on purpose: it runs once per scrape, never per
proxied request.

The admin side shares its worker's event loop with public traffic, so it is bounded the way the
public side is: pipelined requests are answered one per loop turn, at most MAX_WAITING parsed
requests wait for their answer before reading stops, no answer is rendered while the client is
not reading the previous ones, and a request head may not exceed MAX_HEAD_SIZE.

Worker call sequence::

    admin = await start_admin(loop, admin_sock, region, reader.configured_servers(runtime))
    admin.close()                                          # when the worker drains or stops
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from http import HTTPStatus
from typing import Optional, Set

import httptools

from .shm import reader

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0  # seconds a connection may wait for its next complete request
MAX_URL_SIZE = 8192
MAX_HEAD_SIZE = 16384  # request line and headers; a scrape needs a few hundred bytes
MAX_WAITING = 4  # parsed requests waiting for their answer; reading pauses at this many
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

    def __init__(self, region, servers=()):
        self.region = region
        self.servers = servers  # reader.configured_servers of the worker's runtime
        self.closing = False
        self.connections: Set["_AdminProtocol"] = set()
        self.server: Optional[asyncio.AbstractServer] = None

    def close(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their answer."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if not connection.busy:
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
            return 200, reader.CONTENT_TYPE, reader.render_prometheus(self.region, self.servers), b""
        body = json.dumps(reader.status(self.region, self.servers), indent=2).encode() + b"\n"
        return 200, "application/json", body, b""


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, admin: AdminServer):
        self.admin = admin
        self.loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = bytearray()
        self.unparsed = bytearray()  # received but not yet fed to the parser
        self.waiting: deque = deque()  # (method, url, keep_alive) of parsed requests, in order
        self.in_request = False
        self.in_head = False
        self.head_bytes = 0
        self.stopped = False  # nothing more is parsed: an upgrade or a refused request
        self.refusal = 0  # error status answered after the waiting requests, then close
        self.reading = True
        self.write_paused = False
        self.answer_handle: Optional[asyncio.Handle] = None
        self.idle_timer: Optional[asyncio.TimerHandle] = None

    @property
    def busy(self) -> bool:
        """A request is being read or answered."""
        return self.in_request or bool(self.waiting) or self.answer_handle is not None

    # --- asyncio callbacks ---

    def connection_made(self, transport):
        self.transport = transport
        self.admin.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc):
        self.admin.connections.discard(self)
        self.waiting.clear()
        for handle in (self.idle_timer, self.answer_handle):
            if handle is not None:
                handle.cancel()

    def data_received(self, data):
        if not self.stopped:
            self.unparsed += data
            self._parse()

    def pause_writing(self):
        # The client reads slower than we answer: render nothing more until it catches up
        # (the queue then fills and reading stops too).
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self._schedule_answer()

    # --- httptools callbacks ---

    def on_message_begin(self):
        self.in_request = self.in_head = True
        self.head_bytes = 0
        self.url.clear()

    def on_url(self, url: bytes):
        self.url += url
        if len(self.url) > MAX_URL_SIZE:
            raise ValueError("request target too long")  # feed_data raises HttpParserCallbackError

    def on_headers_complete(self):
        self.in_head = False

    def on_message_complete(self):
        self.in_request = False
        self.waiting.append((self.parser.get_method(), bytes(self.url),
                             self.parser.should_keep_alive()))

    # --- reading: one request head per feed, only while few answers wait ---

    def _parse(self):
        """Feed the parser up to the end of the next request head at a time, so a packet of
        pipelined requests is parsed only as fast as it is answered."""
        while self.unparsed and len(self.waiting) < MAX_WAITING and not self.stopped:
            end = self.unparsed.find(b"\r\n\r\n")
            size = len(self.unparsed) if end < 0 else end + 4
            piece = bytes(self.unparsed[:size])
            del self.unparsed[:size]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # the request was parsed; what follows is a protocol we do not speak
                if self.waiting:
                    method, url, _ = self.waiting.pop()
                    self.waiting.append((method, url, False))
                self._stop_parsing(0)
            except httptools.HttpParserCallbackError:
                self._stop_parsing(414)  # on_url is the only callback that raises
            except httptools.HttpParserError:
                self._stop_parsing(400)
            else:
                if self.in_head:
                    self.head_bytes += size
                    if self.head_bytes > MAX_HEAD_SIZE:
                        self._stop_parsing(431)
        # after a refusal, what follows is read and dropped: closing with unread bytes
        # would reset the connection and could lose our answer
        self._set_reading(self.stopped or len(self.waiting) < MAX_WAITING)
        self._schedule_answer()

    def _stop_parsing(self, status: int):
        """Parse nothing more; answer the requests already waiting, then `status` (if any)
        and close."""
        self.stopped = True
        self.refusal = status
        self.unparsed.clear()

    def _set_reading(self, reading: bool):
        if reading != self.reading and not self.transport.is_closing():
            self.reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # --- answering: one request per loop turn, so public traffic runs in between ---

    def _schedule_answer(self):
        if self.answer_handle is None and not self.write_paused \
                and (self.waiting or self.refusal):
            self.answer_handle = self.loop.call_soon(self._answer_next)

    def _answer_next(self):
        self.answer_handle = None
        if self.transport.is_closing():
            return
        if not self.waiting:
            self._reply_and_close(self.refusal)
            return
        method, url, keep_alive = self.waiting.popleft()
        keep_alive = keep_alive and not self.admin.closing
        try:
            status, content_type, body, extra = self.admin.answer(method, url)
        except Exception:
            log.exception("admin request %r failed", url)
            status, content_type, body, extra = 500, "application/json", _error_body(500), b""
        self.transport.write(_response(status, content_type, body, keep_alive,
                                       method == b"HEAD", extra))
        if not keep_alive:
            self.close()
            return
        self._arm_idle_timer()
        self._parse()

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


async def start_admin(loop: asyncio.AbstractEventLoop, sock, region, servers=()) -> AdminServer:
    """Serve the admin endpoint on an already bound and listening socket; `servers`: the
    worker's configured servers (reader.configured_servers), for their state in /status."""
    admin = AdminServer(region, servers)
    admin.server = await loop.create_server(lambda: _AdminProtocol(admin), sock=sock)
    return admin
