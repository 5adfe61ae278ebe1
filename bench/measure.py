"""What one run measures: wrk's result, and CPU and memory of process trees from /proc.

CPU is counted in clock ticks. A process tree's CPU is the sum over its live processes of
utime + stime + cutime + cstime: a live process is counted once by its own times, and a
process that already exited (e.g. a worker replaced on reload) once in its reaper's c-times.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LUA_DIR = Path(__file__).parent / "lua"


def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def processes() -> Dict[int, List[str]]:
    """stat fields of every process now."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                procs[int(entry)] = fields
    return procs


def tree_pids(root: int, procs: Optional[Dict[int, List[str]]] = None) -> List[int]:
    """root and all its descendants, from the ppid of every process."""
    procs = processes() if procs is None else procs
    children: Dict[int, List[int]] = {}
    for pid, fields in procs.items():
        children.setdefault(int(fields[1]), []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def _cpu(fields: List[str]) -> int:
    # utime, stime, cutime, cstime: stat fields 14-17, i.e. 11-14 after the name.
    return sum(int(x) for x in fields[11:15])


def tree_cpu_ticks(root: int) -> int:
    procs = processes()
    return sum(_cpu(procs[pid]) for pid in tree_pids(root, procs) if pid in procs)


def tree_rss_bytes(root: int) -> int:
    procs = processes()
    # rss is stat field 24, in pages
    return sum(int(procs[pid][21]) * PAGE for pid in tree_pids(root, procs) if pid in procs)


def foreign_cpu_ticks() -> int:
    """CPU of user processes outside this runner's tree: other load on the machine.
    Kernel threads (children of kthreadd, pid 2) are left out: on loopback they mostly
    carry the benchmark's own packets."""
    procs = processes()
    ours = set(tree_pids(os.getpid(), procs))
    return sum(_cpu(f) for pid, f in procs.items()
               if pid not in ours and pid != 2 and f[1] != "2")


def steal_ticks() -> int:
    """CPU stolen by the hypervisor, all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


class RssSampler:
    """Samples the summed RSS of process trees in a thread; keeps the peak of each."""

    def __init__(self, roots: Dict[str, int], interval: float = 0.1):
        self.roots = roots
        self.peak = {name: 0 for name in roots}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], tree_rss_bytes(pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int  # wrk counts status >= 400
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def wrk_script(workdir: Path, scenario_script: Optional[str]) -> Path:
    """The scenario's Lua (if any) followed by the report hook, as one file for `wrk -s`."""
    parts = []
    if scenario_script:
        parts.append((LUA_DIR / scenario_script).read_text())
    parts.append((LUA_DIR / "report.lua").read_text())
    path = workdir / f"wrk-{scenario_script or 'get'}.lua"
    path.write_text("\n".join(parts))
    return path


def run_wrk(url: str, connections: int, duration: float, script: Path, headers=(),
            cpu: Optional[str] = None, timeout_s: float = 5.0) -> WrkResult:
    """Run wrk (one thread) for `duration` seconds; it is killed if it overstays by 20 s."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s:g}s", "-s", str(script)]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    if cpu is not None:
        argv = ["taskset", "-c", cpu] + argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 20)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line[len("BENCH_RESULT "):])
            break
    else:
        raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return WrkResult(
        requests=r["requests"], seconds=r["duration_us"] / 1e6, bytes=r["bytes"],
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        non_2xx=r["status"], p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000,
        p99_ms=r["p99_us"] / 1000, max_ms=r["max_us"] / 1000)
