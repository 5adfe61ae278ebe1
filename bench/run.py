"""The side-by-side runner: `python -m bench --help`.

For each scenario: every target is fetched once and checked against the origin, warmed up,
then measured round by round in interleaved order (A B C A B C ...). A run that other load on
the machine disturbed is repeated; results go to bench/results/ as JSON, Markdown and PNG.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import zstandard

from bench import report
from bench.measure import (TICKS, RssSampler, foreign_cpu_ticks, run_wrk, steal_ticks,
                           tree_cpu_ticks, wrk_script)
from bench.scenarios import BY_NAME, SCENARIOS, Scenario
from bench.targets import (LOAD_CPU, PINNED, Origin, Target, http_get, make_targets,
                           stop_all)

RESULTS = Path(__file__).parent / "results"
# A run is disturbed when processes outside this runner's tree used more than this share of
# one CPU during it, or the hypervisor stole more than this.
OTHER_CPU_LIMIT = 0.10
STEAL_LIMIT = 0.05
RETRIES = 2  # per run
RETRY_BUDGET = 60.0  # seconds all retries of one invocation may add, so it still ends on time
QUIET_WAIT = 5.0  # seconds to wait for other load to pass before a retry
NOFILE = 20000  # c2000 needs ~3 descriptors per connection across wrk, proxy and origin


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", help="comma-separated; default: all of "
                   + ", ".join(s.name for s in SCENARIOS))
    p.add_argument("--targets", help="comma-separated; default: each scenario's own set")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    p.add_argument("--quick", action="store_true",
                   help="one round of 2 s runs, no retries (the smoke test)")
    p.add_argument("--access-log", choices=("on", "off"), default="off",
                   help="access log to a file in every target (default off)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy flame graph of fastproxy-1w's worker for each scenario, "
                        "instead of the comparison")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the targets' temp dirs")
    p.add_argument("--before", type=Path, metavar="TREE",
                   help="another fastproxy checkout, built in place (setup.py build_ext "
                        "--inplace): measured as fastproxy-Nw-before beside fastproxy-Nw in the "
                        "same rounds, so a change's CPU per request is compared in one run")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = p.parse_args(argv)
    args.retries, args.retry_budget = RETRIES, RETRY_BUDGET
    if args.quick:  # shape, not numbers: no retry of disturbed runs either
        args.rounds, args.duration, args.retries = 1, 2.0, 0
    args.warmup = 1.0  # fills upstream pools and allocator caches; not recorded
    return args


def select(args) -> List[Scenario]:
    if not args.scenarios:
        return list(SCENARIOS) if not args.profile else [BY_NAME["get-100b"]]
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    # Default order always: reload runs last, after it the targets are a new generation.
    return [s for s in SCENARIOS if s.name in names]


def scenario_targets(sc: Scenario, args) -> List[str]:
    if args.profile:
        return ["fastproxy-1w"]
    names = args.targets.split(",") if args.targets else list(sc.targets)
    if args.before is not None and not sc.snippets:  # a feature's own scenario has no "before"
        names += [n + "-before" for n in names if n.startswith("fastproxy-")]
    if sc.reload_every:
        names = [n for n in names if n != "direct"]  # the origin is not reloaded
    return names


class DuringRun:
    """Something done in a thread while a run lasts (a `with` block), if `active`; `_run`
    waits on `_stop` so that the run's end interrupts it."""

    def __init__(self, active: bool):
        self.active = active
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.active:
            self._thread.join()


class Reloader(DuringRun):
    """Reloads a target every `every` seconds in a thread while a run lasts."""

    def __init__(self, target: Target, every: float):
        super().__init__(bool(every))
        self.target, self.every = target, every
        self.count, self.failures = 0, 0

    def _run(self) -> None:
        # A fixed schedule, so a slow reload command does not mean fewer reloads.
        due = time.monotonic() + self.every
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due += self.every
            try:
                self.target.reload()
                self.count += 1
            except (OSError, subprocess.SubprocessError):
                self.failures += 1


class Killer(DuringRun):
    """Kills the origin's server `index` `at` seconds into a run (in a thread), and starts it
    again when the run is over, so that the next run begins with every server up."""

    def __init__(self, origin: Origin, index: int, at: float):
        super().__init__(bool(at))
        self.origin, self.index, self.at = origin, index, at
        self.killed = False

    def _run(self) -> None:
        if not self._stop.wait(self.at):
            self.origin.kill(self.index)
            self.killed = True

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.killed:
            self.origin.revive(self.index)


def measure(target: Target, origin: Origin, sc: Scenario, duration: float, script: Path,
            reload_every: float = 0.0, kill_at: float = 0.0) -> dict:
    """One wrk run against one target, with CPU accounting over the wrk window (the origin's:
    its first server only); `kill_at` seconds in, the last of the scenario's upstream servers
    is killed (0: none is)."""
    roots = {"origin": origin.server.pid}
    if target.pid:
        roots["target"] = target.pid
    cpu0 = {k: tree_cpu_ticks(pid) for k, pid in roots.items()}
    other0, steal0, t0 = foreign_cpu_ticks(), steal_ticks(), time.monotonic()
    with RssSampler(roots) as rss, Reloader(target, reload_every) as reloader, \
            Killer(origin, sc.upstreams - 1, kill_at):
        try:
            w = run_wrk(f"{'https' if sc.tls else 'http'}://127.0.0.1:{target.port}{sc.path}", sc.connections, duration,
                        script, sc.headers, LOAD_CPU)
        except RuntimeError as e:
            logs = target.server.output_tail() if target.server else ""
            raise RuntimeError(f"{sc.name} on {target.name}: {e}\n{logs}") from None
    window = (time.monotonic() - t0) * TICKS  # ticks of one CPU over the run
    cpu = {k: tree_cpu_ticks(pid) - cpu0[k] for k, pid in roots.items()}
    other = (foreign_cpu_ticks() - other0) / window
    steal = (steal_ticks() - steal0) / window
    reqs = max(w.requests, 1)
    target_cpu = cpu.get("target")
    return {
        "target": target.name, "layout": target.layout,
        "requests": w.requests, "seconds": w.seconds,
        "throughput": (w.bytes / w.seconds / 1e6) if sc.unit == "MB/s" else w.requests / w.seconds,
        "req_per_s": w.requests / w.seconds, "mb_per_s": w.bytes / w.seconds / 1e6,
        "p50_ms": w.p50_ms, "p90_ms": w.p90_ms, "p99_ms": w.p99_ms, "max_ms": w.max_ms,
        "socket_errors": w.socket_errors, "non_2xx": w.non_2xx,
        "cpu_us_per_req": None if target_cpu is None else target_cpu / TICKS * 1e6 / reqs,
        "origin_cpu_us_per_req": cpu["origin"] / TICKS * 1e6 / reqs,
        "peak_rss_mib": rss.peak["target"] / 2**20 if "target" in roots else None,
        "other_cpu": round(other, 3), "steal": round(steal, 3),
        "disturbed": other > OTHER_CPU_LIMIT or steal > STEAL_LIMIT,
        "reloads": reloader.count, "reload_failures": reloader.failures,
    }


def wait_for_quiet() -> None:
    """Return once processes outside this runner have been idle for half a second, or after
    QUIET_WAIT seconds."""
    deadline = time.monotonic() + QUIET_WAIT
    while time.monotonic() < deadline:
        before = foreign_cpu_ticks()
        time.sleep(0.5)
        if (foreign_cpu_ticks() - before) / (0.5 * TICKS) <= OTHER_CPU_LIMIT:
            return


def decoded(headers: Dict[str, str], body: bytes) -> bytes:
    """The body without the content coding a compression scenario has the proxy apply."""
    coding = headers.get("content-encoding")
    if coding == "gzip":
        return gzip.decompress(body)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return body


def check_targets(sc: Scenario, targets: Dict[str, Target], origin: Origin) -> None:
    """One request per target before measuring, with the scenario's headers: each must answer
    as the origin does (once decoded), and each proxy with the response headers the scenario
    has it add."""
    sent = dict(line.split(": ", 1) for line in sc.headers)
    _, _, want = http_get(origin.port, sc.path, headers=sent)
    for t in targets.values():
        status, headers, body = http_get(t.port, sc.path, headers=sent, tls=sc.tls)
        if headers.get("content-encoding"):
            log(f"  {t.name}: {len(want)} bytes sent as {len(body)} ({headers['content-encoding']})")
            body = decoded(headers, body)
        if status != 200 or body != want:
            raise RuntimeError(f"{t.name} {sc.path}: status {status}, {len(body)} bytes, "
                               f"origin sends {len(want)}")
        for line in sc.response_headers if t.pid else ():
            name, _, value = line.partition(": ")
            if headers.get(name.lower()) != value:
                raise RuntimeError(f"{t.name} {sc.path}: {name} is {headers.get(name.lower())!r}, "
                                   f"not {value!r}: is the scenario's config snippet in place?")


def run_scenario(sc: Scenario, targets: Dict[str, Target], origin: Origin, args,
                 workdir: Path) -> dict:
    check_targets(sc, targets, origin)
    script = wrk_script(workdir, sc.script)
    for t in targets.values():
        measure(t, origin, sc, args.warmup, script)
    runs = []
    for rnd in range(args.rounds):
        for t in targets.values():
            for attempt in range(args.retries + 1):
                run = measure(t, origin, sc, args.duration, script, sc.reload_every,
                              sc.kill_one_at * args.duration)
                if not run["disturbed"] or attempt == args.retries or args.retry_budget <= 0:
                    break
                retry_start = time.monotonic()
                wait_for_quiet()
                args.retry_budget -= time.monotonic() - retry_start + args.duration
            run.update(round=rnd, retries=attempt)
            runs.append(run)
            log(f"  {sc.name:9} r{rnd} {t.name:13} {run['throughput']:10.1f} {sc.unit:5} "
                f"p99 {run['p99_ms']:7.2f} ms  cpu/req "
                + (f"{run['cpu_us_per_req']:6.1f} µs" if run["cpu_us_per_req"] else "     -   ")
                + f"  err {run['socket_errors'] + run['non_2xx']}"
                + (f"  DISTURBED (other {run['other_cpu']:.2f} CPU)" if run["disturbed"] else "")
                + (f"  reloads {run['reloads']}" if run["reloads"] else ""))
    baselines = {n: t.baseline for n, t in targets.items()}
    return {"scenario": asdict(sc), "runs": runs, "summary": report.aggregate(runs, baselines)}


def profile(sc: Scenario, target: Target, origin: Origin, args, workdir: Path,
            out: Path) -> Path:
    """Record the fastproxy worker with py-spy while wrk loads it."""
    if not shutil.which("py-spy"):
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    script = wrk_script(workdir, sc.script)
    measure(target, origin, sc, args.warmup, script)
    worker = target.worker_pids()[-1]
    svg = out / f"{datetime.date.today()}-{sc.name}-{target.name}-profile.svg"
    # --native shows the Cython functions by their C symbols, not only Python frames.
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(worker), "--native", "--rate", "250",
                            "--duration", str(round(args.duration)), "--format", "flamegraph",
                            "--output", str(svg)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    run = measure(target, origin, sc, args.duration, script)
    out_text, _ = spy.communicate(timeout=args.duration + 30)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {out_text}")
    log(f"  {sc.name}: {run['throughput']:.0f} {sc.unit} under py-spy, flame graph {svg}")
    return svg


def header(args) -> dict:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv, words=3):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            return " ".join((out.stdout + out.stderr).split()[:words])
        except (OSError, subprocess.SubprocessError):
            return "missing"

    rev = version(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], 1)
    return {
        "date": str(datetime.date.today()),
        "machine": f"{os.cpu_count()} × {cpu}, Linux {platform.release()}, "
                   + ("origin+wrk on CPU 0, 1-worker proxies on CPU 1" if PINNED else "unpinned"),
        "versions": ", ".join([version(["nginx", "-v"]), version(["haproxy", "-v"]),
                               version(["wrk", "--version"], 2),
                               f"Python {platform.python_version()}", f"fastproxy {rev}"]),
        "rounds": args.rounds, "duration": args.duration, "access_log": args.access_log,
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(names: List[str]) -> None:
    needed = {"wrk", "nginx", "taskset"}
    if any(n.startswith("haproxy") for n in names):
        needed.add("haproxy")
    missing = [tool for tool in sorted(needed) if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install wrk nginx haproxy)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        width = max(len(s.name) for s in SCENARIOS)
        for s in SCENARIOS:
            print(f"{s.name:{width}} {s.description}  [{', '.join(s.targets)}]")
        return 0
    scenarios = select(args)
    # a target runs once per set of config snippets, TLS or not and upstream servers its scenarios need
    wanted: Dict[Tuple[Tuple[Optional[str], bool, int], str], None] = {}
    for sc in scenarios:
        wanted.update(dict.fromkeys(((sc.snippets, sc.tls, sc.upstreams), n) for n in scenario_targets(sc, args)))
    preflight(list(dict.fromkeys(n for _, n in wanted)))
    args.out.mkdir(parents=True, exist_ok=True)

    # SIGTERM/SIGHUP stop the run like ^C does: through the finally below.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    origin = Origin(args.keep)
    targets: Dict[Tuple[Tuple[Optional[str], bool, int], str], Target] = {}
    for variant in dict.fromkeys(s for s, _ in wanted):
        made = make_targets([n for s, n in wanted if s == variant], origin, args.access_log == "on",
                            args.keep, args.before.resolve() if args.before else None, *variant)
        targets.update({(variant, n): t for n, t in made.items()})
    results = []
    started = time.monotonic()
    try:
        origin.start()
        origin.add_servers(max(sc.upstreams for sc in scenarios))
        for t in targets.values():
            t.start()
        workdir = origin.dir.path
        # Runs with the access log on keep their own files beside the default ones.
        stem = str(datetime.date.today()) + ("-accesslog" if args.access_log == "on" else "")
        for sc in scenarios:
            mine = {n: targets[((sc.snippets, sc.tls, sc.upstreams), n)] for n in scenario_targets(sc, args)}
            if args.profile:
                profile(sc, mine["fastproxy-1w"], origin, args, workdir, args.out)
                continue
            log(f"{sc.name}: {sc.description}")
            res = run_scenario(sc, mine, origin, args, workdir)
            res["header"] = header(args)
            (args.out / f"{stem}-{sc.name}.json").write_text(json.dumps(res, indent=1) + "\n")
            results.append(res)
    except KeyboardInterrupt as e:
        log(f"interrupted {e}")
        return 130
    finally:
        for t in targets.values():
            t.stop()
        origin.stop()
        stop_all()
    if results:
        md = report.markdown(results, header(args))
        (args.out / f"{stem}-summary.md").write_text(md)
        print(md)
        png = args.out / f"{stem}-summary.png"
        if not report.chart(results, png):
            log("no chart: matplotlib is missing (pip install -e '.[bench]')")
    log(f"done in {time.monotonic() - started:.0f} s; results in {args.out}")
    return 0
