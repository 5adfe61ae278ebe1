"""Client load in threads for the zero-failure reload tests: kept-alive clients and clients
that open a new connection per request, every failure recorded."""
from __future__ import annotations

import threading
from typing import Callable, List, Tuple


class Load:
    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: List[Tuple[str, object]] = []
        self.counts = {"ok": 0, "connections": 0}
        self.threads: List[threading.Thread] = []

    def record(self, kind: str, detail) -> None:
        with self.lock:
            self.failures.append((kind, detail))

    def count(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                self.counts[key] += 1

    def keepalive(self, connect: Callable, exchange: Callable) -> None:
        """Until stopped: exchange(client) -> (response, ok) on a kept connection from
        connect(), a new one when the response closes it or something failed."""
        c = None
        while not self.stop.is_set():
            try:
                if c is None:
                    c = connect()
                    self.count("connections")
                r, ok = exchange(c)
                if ok:
                    self.count("ok")
                else:
                    self.record("status", r)
                if r.has_token("connection", "close"):
                    c.close()
                    c = None
            except Exception as e:
                self.record(type(e).__name__, str(e)[:200])
                if c is not None:
                    c.close()
                c = None
        if c is not None:
            c.close()

    def fresh(self, fetch_one: Callable) -> None:
        """Until stopped: fetch_one() -> response on a new connection each time (200 expected)."""
        while not self.stop.is_set():
            try:
                r = fetch_one()
                if r.status != 200:
                    self.record("status", r)
                else:
                    self.count("ok", "connections")
            except Exception as e:
                self.record(type(e).__name__, str(e)[:200])

    def start(self, *clients: Callable) -> "Load":
        """Run each (function, args...) tuple in its own thread."""
        for fn, *args in clients:
            self.threads.append(threading.Thread(target=fn, args=tuple(args), daemon=True))
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "load threads hung"
