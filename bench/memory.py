"""Memory a hostile or idle client costs each proxy: `python -m bench.memory --help`.

For every target (fastproxy, nginx, HAProxy; one worker each, same origin as the
throughput scenarios) and every client behaviour below, the runner opens N connections
that behave that way, waits until the proxy's memory stops growing, and reports the
growth of the proxy's process tree RSS per connection; then it closes them and reports
what the proxy kept.

    idle        one small request answered, then the keep-alive connection stays open
    slow-reader asks for a 1 MiB response and never reads it
    pipeline    writes as many pipelined small requests as the socket takes (about
                256 KiB and more) and never reads a response

No timing is asserted anywhere: this is a measurement, printed and written as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from bench.measure import tree_rss_bytes
from bench.targets import Origin, Target, make_targets, stop_all

RESULTS = Path(__file__).parent / "results"
SETTLE_SECONDS = 1.0    # RSS is settled when it moved less than 1 % over this long
SETTLE_LIMIT = 20.0     # ... or after this long, whichever is first
SMALL_REQUEST = b"GET /100b HTTP/1.1\r\nHost: bench\r\n\r\n"


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def idle(port: int) -> socket.socket:
    s = _connect(port)
    s.sendall(SMALL_REQUEST)
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 100:
        piece = s.recv(65536)
        if not piece:
            raise RuntimeError("idle: the proxy closed the connection")
        got += piece
    return s


def slow_reader(port: int) -> socket.socket:
    # A small receive buffer, so the kernel holds little of the response for us and
    # what the proxy buffers is what it chose to read ahead.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /64m HTTP/1.1\r\nHost: bench\r\n\r\n")
    return s


def pipeline(port: int) -> socket.socket:
    s = _connect(port)
    s.settimeout(0.5)
    # ~256 KiB of requests in one write: what one read of the proxy may take at once.
    try:
        s.sendall(SMALL_REQUEST * 7500)
    except socket.timeout:
        pass  # the proxy stopped reading: it took what it wanted
    return s


BEHAVIOURS: Dict[str, Callable[[int], socket.socket]] = {
    "idle": idle, "slow-reader": slow_reader, "pipeline": pipeline}


def settled_rss(pid: int) -> int:
    """The tree's RSS once it has stopped moving."""
    last = tree_rss_bytes(pid)
    start = since = time.monotonic()
    while time.monotonic() - start < SETTLE_LIMIT:
        time.sleep(0.2)
        now = tree_rss_bytes(pid)
        if abs(now - last) > last / 100:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_SECONDS:
            break
    return last


def measure(target: Target, behaviour: str, count: int) -> dict:
    opener = BEHAVIOURS[behaviour]
    before = settled_rss(target.pid)
    socks: List[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(opener(target.port))
        during = settled_rss(target.pid)
    finally:
        for s in socks:
            s.close()
    after = settled_rss(target.pid)
    return {"target": target.name, "behaviour": behaviour, "connections": count,
            "rss_before": before, "rss_during": during, "rss_after": after,
            "per_connection": (during - before) / count, "kept": after - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="fastproxy-1w,nginx-1w,haproxy-1t")
    p.add_argument("--behaviours", default=",".join(BEHAVIOURS))
    p.add_argument("--connections", type=int, default=300, help="per behaviour (default 300)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    origin = Origin()
    rows = []
    try:
        origin.start()
        for name, target in make_targets(args.targets.split(","), origin, False, False).items():
            try:
                target.start()
                for behaviour in args.behaviours.split(","):
                    row = measure(target, behaviour, args.connections)
                    rows.append(row)
                    print(f"{name:14} {behaviour:12} {row['per_connection'] / 1024:8.1f} KiB/conn "
                          f"(RSS {row['rss_before'] >> 20} -> {row['rss_during'] >> 20} MiB, "
                          f"{row['kept'] >> 10:+d} KiB kept after close)", flush=True)
            finally:
                target.stop()
    finally:
        stop_all()
        origin.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{datetime.date.today().isoformat()}-memory.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
