"""Instructions per proxied request in one fastproxy worker, counted with callgrind.

    python -m bench.callgrind [--scenarios get-100b,get-100b-ka] [--tree PATH] [--short 200 --long 2000]

On a shared VM wall-clock CPU per request moves by more than the 2 % a change is held to;
callgrind's instruction counts do not. For each scenario (a plain GET: its path, its headers
and its config snippet), fastproxy runs with one worker under callgrind in front of the bench's
nginx origin, and one client connection sends `short` requests in one run and
`long` in another (a new connection every `per_connection` requests when the scenario sets it).
The difference of the worker's user-space instructions over long - short requests leaves out
start-up and shutdown; the short run then idles for as long as its missing requests would
take, so both count about as many ticks of the once-a-second sweep, and what remains is per
request.

`--tree` measures another checkout (built in place), e.g. a worktree of main, for a
before/after in the same session.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

from bench.measure import tree_pids
from bench.scenarios import BY_NAME, Scenario
from bench.targets import HERE, Origin, free_port, render, server_lines

START_TIMEOUT = 120.0  # python, uvloop and the extension start ~50x slower under callgrind
STOP_TIMEOUT = 60.0
IO_TIMEOUT = 30.0
def read_response(sock: socket.socket, buf: bytes) -> Tuple[bytes, bytes]:
    """(status line, bytes after the response) of the next response on `sock`."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the proxy closed the connection")
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the proxy closed the connection in a body")
        buf += data
    return head.split(b"\r\n", 1)[0], buf[length:]


def send_requests(port: int, scenario: Scenario, n: int) -> None:
    request = ("GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (
        scenario.path, "".join(h + "\r\n" for h in scenario.headers))).encode()
    # the last request of a connection says so, unless the scenario's headers do on every one
    last = request if scenario.per_connection == 1 else request[:-2] + b"Connection: close\r\n\r\n"
    sock: Optional[socket.socket] = None
    buf = b""
    try:
        for i in range(n):
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
                buf = b""
            closing = scenario.per_connection and (i + 1) % scenario.per_connection == 0
            sock.sendall(last if closing else request)
            status, buf = read_response(sock, buf)
            if b" 200 " not in status:
                raise RuntimeError(f"{scenario.name}: {status!r}")
            if closing:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    """Until a request is answered: the master listens before its worker has started."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("fastproxy exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
                sock.sendall(b"GET /100b HTTP/1.1\r\nHost: bench\r\n\r\n")
                read_response(sock, b"")
                return
        except (OSError, RuntimeError):
            time.sleep(0.2)
    raise RuntimeError("fastproxy did not start in time")


def worker_instructions(tree: Path, scenario: Scenario, origin: Origin, n: int, workdir: Path,
                        pad: float = 0.0) -> Tuple[int, float]:
    """User-space instructions the worker ran over a whole run of n requests, and the seconds
    the requests took; the worker then idles for `pad` seconds before it is stopped."""
    port = free_port()
    conf = workdir / "fastproxy.toml"
    snippet = ""
    if scenario.snippets:
        snippet = (HERE / "configs" / scenario.snippets / "fastproxy.toml").read_text()
    conf.write_text(render("configs/fastproxy.toml", dir=workdir, port=port, workers=1,
                           servers=server_lines("fastproxy.toml", [origin.port], 16), upstream_snippet="",
                           keepalive=16, access_log="off",
                           snippet=snippet, tls=""))  # plain scenarios only
    for old in workdir.glob("callgrind.*"):
        old.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes",
         f"--callgrind-out-file={workdir}/callgrind.%p",
         sys.executable, "-m", "fastproxy", "-c", str(conf)],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(workdir / "valgrind.log", "wb"), start_new_session=True)
    try:
        wait_ready(port, proc)
        workers = [pid for pid in tree_pids(proc.pid) if pid != proc.pid]
        if len(workers) != 1:
            raise RuntimeError(f"expected one worker, found {workers}")
        started = time.monotonic()
        send_requests(port, scenario, n)
        took = time.monotonic() - started
        time.sleep(pad)
        proc.send_signal(signal.SIGTERM)
        proc.wait(STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = workdir / f"callgrind.{workers[0]}"
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), took
    raise RuntimeError(f"no instruction count in {out}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="get-100b,get-100b-ka",
                    help="comma-separated; plain GETs of a file the origin serves (%s)" % ", ".join(Origin.FILES))
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout to measure")
    ap.add_argument("--short", type=int, default=200)
    ap.add_argument("--long", type=int, default=2000)
    args = ap.parse_args(argv)
    if not shutil.which("valgrind"):
        ap.error("valgrind is not installed")
    scenarios = [BY_NAME[name] for name in args.scenarios.split(",")]
    for s in scenarios:
        if (s.script and not s.per_connection) or s.path.lstrip("/") not in Origin.FILES:
            ap.error(f"{s.name}: not a plain GET of {', '.join(Origin.FILES)}")
    origin = Origin()
    origin.start()
    print(f"| scenario | instructions per request ({args.tree.resolve()}) |\n|---|---|")
    try:
        with tempfile.TemporaryDirectory(prefix="fp-callgrind-") as tmp:
            for s in scenarios:
                long, took = worker_instructions(args.tree, s, origin, args.long, Path(tmp))
                # the short run idles for what its missing requests would take, so both
                # runs count about as many sweeps
                short, _ = worker_instructions(args.tree, s, origin, args.short, Path(tmp),
                                               pad=took * (1 - args.short / args.long))
                print(f"| {s.name} | {(long - short) / (args.long - args.short):,.0f} |", flush=True)
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
