"""System calls per request of one fastproxy worker and one nginx worker, counted with strace.

    python -m bench.syscalls [--scenarios new-conn,conn-10] [--tree PATH] [--requests 1000] [--clients 1]

For each scenario (a plain GET, as bench.callgrind runs them; the static ones get the files
they serve and their config snippets) each proxy runs with one worker in front of the same
small origin; strace -c attaches to the worker, `clients` clients send
`requests` requests between them (a new connection per request when the scenario sends Connection: close,
else one per `per_conn` requests), and the table shows each system call per request, side by
side. Counts, not times: strace slows every call alike, so its timings say little.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

from bench.callgrind import send_requests, wait_ready
from bench.measure import tree_pids
from bench.scenarios import BY_NAME, Scenario
from bench.targets import HERE, Origin, fill, free_port, render, server_lines

STOP_TIMEOUT = 10.0


def snippet(scenario: Scenario, config: str, origin: Origin) -> str:
    """The scenario's addition to `config`, serving files from the origin's directory (as the
    bench targets do)."""
    if not scenario.snippets:
        return ""
    return fill((HERE / "configs" / scenario.snippets / config).read_text().rstrip("\n"),
                www=origin.dir.path / "www")


def send_concurrently(port: int, scenario: Scenario, n: int, clients: int) -> None:
    """`n` requests from `clients` clients at once (a client's socket then fills, as under load)."""
    threads = [threading.Thread(target=send_requests, args=(port, scenario, n // clients + (i < n % clients)))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def count_calls(worker: int, scenario: Scenario, port: int, n: int, clients: int, workdir: Path) -> Counter:
    out = workdir / "strace.out"
    strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(worker)],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace has attached (it prints nothing to wait on)
        send_concurrently(port, scenario, n, clients)
        time.sleep(0.5)  # the last close is handled
    finally:
        strace.send_signal(signal.SIGINT)
        strace.wait(STOP_TIMEOUT)
    calls = Counter()
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] += int(fields[3])
    return calls


def run_fastproxy(tree: Path, origin: Origin, scenario: Scenario, n: int, clients: int,
                  workdir: Path) -> Counter:
    port = free_port()
    conf = workdir / "fastproxy.toml"
    conf.write_text(render("configs/fastproxy.toml", dir=workdir, port=port, workers=1,
                           servers=server_lines("fastproxy.toml", [origin.port], 16), upstream_snippet="",
                           keepalive=16, access_log="off",
                           snippet=snippet(scenario, "fastproxy.toml", origin), tls=""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "-c", str(conf)], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return _measure(proc, port, scenario, n, clients, workdir)


def run_nginx(origin: Origin, scenario: Scenario, n: int, clients: int, workdir: Path) -> Counter:
    port = free_port()
    conf = workdir / "nginx.conf"
    for d in ("client_body", "proxy_temp", "logs"):
        (workdir / d).mkdir(exist_ok=True)
    conf.write_text(render("configs/nginx.conf", dir=workdir, port=port, workers=1,
                           servers=server_lines("nginx.conf", [origin.port], 16), upstream_snippet="",
                           keepalive=16, access_log="access_log off;",
                           snippet=snippet(scenario, "nginx.conf", origin), tls=""))
    proc = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(conf)], cwd=workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return _measure(proc, port, scenario, n, clients, workdir)


def _measure(proc: subprocess.Popen, port: int, scenario: Scenario, n: int, clients: int,
             workdir: Path) -> Counter:
    try:
        wait_ready(port, proc)
        workers = [pid for pid in tree_pids(proc.pid) if pid != proc.pid]
        if len(workers) != 1:
            raise RuntimeError(f"expected one worker, found {workers}")
        return count_calls(workers[0], scenario, port, n, clients, workdir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="new-conn,conn-10")
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout to measure")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=1, help="clients sending at once")
    args = ap.parse_args(argv)
    for tool in ("strace", "nginx"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed")
    origin = Origin()
    origin.start()
    try:
        for name in args.scenarios.split(","):
            s = BY_NAME[name]
            with tempfile.TemporaryDirectory(prefix="fp-strace-") as a, \
                    tempfile.TemporaryDirectory(prefix="fp-strace-") as b:
                ours = run_fastproxy(args.tree, origin, s, args.requests, args.clients, Path(a))
                theirs = run_nginx(origin, s, args.requests, args.clients, Path(b))
            print(f"\n{s.name}: system calls per request ({args.requests} requests, "
                  f"{args.clients} at a time)\n"
                  f"| system call | fastproxy | nginx |\n|---|---|---|")
            for call in sorted(set(ours) | set(theirs), key=lambda c: -(ours[c] + theirs[c])):
                print(f"| {call} | {ours[call] / args.requests:.2f} | {theirs[call] / args.requests:.2f} |")
            print(f"| total | {sum(ours.values()) / args.requests:.2f} | "
                  f"{sum(theirs.values()) / args.requests:.2f} |", flush=True)
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
