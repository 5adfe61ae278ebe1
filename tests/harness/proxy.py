"""Start the real `python -m fastproxy` master on free loopback ports and stop it cleanly.

`ProxyProcess` writes a TOML config (pid file, error log and access log inside the
test's directory), starts the master in its own process group, waits until every
worker answers, and on stop sends QUIT, then TERM, then KILL, and fails if any
process of the proxy is left behind.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

from .client import ServerClosed, fetch, get_json

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0


_handed_out = set()  # ports free_port gave in this test process


def free_port() -> int:
    """A loopback port nothing is bound to now, never one this process was given before: the
    kernel may hand a just-closed port out again, so a config that takes two ports (a
    listener and the admin) before the proxy binds either could otherwise get one twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# -- TOML writing (only what our configs use) -----------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(cfg: Dict) -> str:
    """Top-level dicts become tables, lists of dicts arrays of tables; a dict of dicts
    (upstreams) becomes dotted tables; anything deeper is written inline."""
    out: List[str] = []
    for section, body in cfg.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
        elif body and all(isinstance(v, dict) for v in body.values()) and section == "upstreams":
            for name, table in body.items():
                out.append(f"[{section}.{_toml_key(name)}]")
                out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
                out.append("")
        else:
            out.append(f"[{section}]")
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
            out.append("")
    return "\n".join(out)


def upstream(*servers, **opts) -> Dict:
    """An [upstreams.X] table for the given origins (objects with .address) or "host:port"s."""
    return {"servers": [getattr(s, "address", s) for s in servers], **opts}


def respond(status: int = 200, body: str = "", headers: Optional[Dict[str, str]] = None) -> Dict:
    d = {"status": status, "body": body}
    if headers:
        d["headers"] = headers
    return d


# -- processes ---------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def group_members(pgid: int) -> List[int]:
    """Live (non-zombie) processes in process group pgid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """Samples every worker's VmRSS in a thread; `growth()` is the largest peak - baseline."""

    def __init__(self, pids):
        self.pids = pids
        self.baseline = {p: rss_kib(p) for p in pids}
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            for p in self.pids:
                try:
                    self.peak[p] = max(self.peak[p], rss_kib(p))
                except (OSError, AssertionError):
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def growth(self):
        return {p: self.peak[p] - self.baseline[p] for p in self.pids}


def fork_child(fn) -> int:
    """Run fn in a forked child that exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing polled may not be up yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


class ProxyProcess:
    """One fastproxy master with its workers, configured from a dict (see to_toml)."""

    def __init__(self, workdir: Path, config: Optional[Dict] = None, name: str = "fastproxy"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}.toml"
        self.pid_file = self.workdir / f"{name}.pid"
        self.error_log = self.workdir / f"{name}.error.log"
        self.access_log = self.workdir / f"{name}.access.log"
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._stopped = False
        self.seen_pids: Set[int] = set()
        self.config = self._with_defaults(config or {})

    # -- config --------------------------------------------------------------------
    def _with_defaults(self, config: Dict) -> Dict:
        cfg = copy.deepcopy(config)
        main = {"workers": 1, "pid_file": str(self.pid_file), "shutdown_timeout": "10s",
                "error_log": str(self.error_log), "log_level": "info"}
        main.update(cfg.pop("main", {}))
        access = {"path": str(self.access_log), "format": "combined"}
        access.update(cfg.pop("access_log", {}))
        admin = {"listen": f"127.0.0.1:{self.admin_port}"}
        admin.update(cfg.pop("admin", {}))
        listen = cfg.pop("listen", [{"address": f"127.0.0.1:{self.port}"}])
        out = {"main": main, "access_log": access, "admin": admin, "listen": listen}
        if cfg.get("upstreams"):
            out["upstreams"] = cfg.pop("upstreams")
        else:
            cfg.pop("upstreams", None)
        out["routes"] = cfg.pop("routes", [])
        out.update(cfg)
        return out

    @property
    def workers(self) -> int:
        return int(self.config["main"]["workers"])

    def write_config(self, config: Optional[Dict] = None, text: Optional[str] = None) -> None:
        """Write the config file: a dict (defaults filled in) or exact TOML text."""
        if config is not None:
            self.config = self._with_defaults(config)
        self.config_path.write_text(text if text is not None else to_toml(self.config))

    # -- running -------------------------------------------------------------------
    def command(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "fastproxy", *args]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)
        return env

    def run_cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run `python -m fastproxy ARGS` (e.g. "-t", "-c", path) and wait for it."""
        return subprocess.run(self.command(*args), cwd=REPO, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def start(self, wait: bool = True) -> "ProxyProcess":
        if not self.config_path.exists():
            self.write_config()
        self.proc = subprocess.Popen(
            self.command("-c", str(self.config_path)), cwd=REPO, env=self.env(),
            stdin=subprocess.DEVNULL, stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"),
            start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def diagnostics(self) -> str:
        parts = []
        for p in (self.stderr_path, self.stdout_path, self.error_log):
            try:
                text = p.read_text(errors="replace")
            except FileNotFoundError:
                continue
            parts.append(f"--- {p.name} (last 4000 chars) ---\n{text[-4000:]}")
        return "\n".join(parts)

    def fail(self, message: str):
        raise AssertionError(f"{message}\n{self.diagnostics()}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Dict:
        """Wait until /status lists `workers` running workers of one generation and the
        listen port answers HTTP."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"fastproxy exited with {self.proc.returncode} during startup")
            try:
                st = self.status()
                current = [w for w in st["workers"] if w.get("generation") == st["generation"]]
                if len(current) == self.workers and len(st["workers"]) == self.workers:
                    fetch(self.port, "GET", "/__harness_ready_probe", [("Connection", "close")], timeout=2)
                    return st
                last = st
            except (OSError, ServerClosed, ValueError, KeyError, AssertionError, TimeoutError) as e:
                last = e
            time.sleep(0.05)
        self.fail(f"fastproxy not ready within {timeout}s (last: {last!r})")

    def status(self) -> Dict:
        st = get_json(self.admin_port, "/status", timeout=5)
        self.seen_pids.update(int(w["pid"]) for w in st.get("workers", []))
        return st

    def metrics(self) -> str:
        r = fetch(self.admin_port, "GET", "/metrics", [("Connection", "close")], timeout=5)
        assert r.status == 200, r
        return r.body.decode()

    def worker_pids(self, generation: Optional[int] = None) -> List[int]:
        st = self.status()
        gen = st["generation"] if generation is None else generation
        return sorted(int(w["pid"]) for w in st["workers"] if w.get("generation") == gen)

    def generation(self) -> int:
        return int(self.status()["generation"])

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_generation(self, above: int, timeout: float = 15, settled: bool = True) -> Dict:
        """Wait for a generation > `above` whose workers are all up; with settled, also
        for the old generation to have gone from /status."""
        def ok():
            st = self.status()
            if st["generation"] <= above:
                return None
            cur = [w for w in st["workers"] if w["generation"] == st["generation"]]
            if len(cur) != self.workers:
                return None
            if settled and len(st["workers"]) != self.workers:
                return None
            return st
        return wait_until(ok, timeout, message=f"generation > {above} (settled={settled})")

    def reload(self, timeout: float = 15, settled: bool = True) -> Dict:
        gen = self.generation()
        self.signal(signal.SIGHUP)
        return self.wait_generation(gen, timeout, settled)

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self) -> List[int]:
        """Processes of this proxy still alive: its process group plus every worker pid seen."""
        pids = set(group_members(self.proc.pid)) if self.proc else set()
        pids |= {p for p in self.seen_pids if pid_alive(p)}
        return sorted(pids)

    def stop(self) -> None:
        """QUIT, then TERM, then KILL; fail if anything of ours outlives the master."""
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            try:
                self.status()  # learn the current worker pids for the leftover check
            except Exception:
                pass
            for sig, wait in ((signal.SIGQUIT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                if self.wait_exit(wait) is not None:
                    break
        self.assert_no_leftovers()

    def assert_no_leftovers(self, timeout: float = 5) -> None:
        """Fail (after killing them) if processes of this proxy outlive the master."""
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.leftovers()
        if left:
            desc = ", ".join(f"{p} ({cmdline(p)!r})" for p in left)
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.fail(f"processes left after the master exited: {desc}")


def summed_metric(text: str, name: str, **labels: str) -> float:
    """Sum every sample of metric `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, lab = metric.partition("{")
        if base != name:
            continue
        got = {}
        for part in _split_labels(lab.rstrip("}")):
            k, _, v = part.partition("=")
            got[k.strip()] = v.strip().strip('"')
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def _split_labels(s: str) -> Iterable[str]:
    part, quoted = "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            yield part
            part = ""
        else:
            part += ch
    if part:
        yield part
