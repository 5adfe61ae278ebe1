"""The origin and the targets under test, each a process tree in its own session and temp dir.

Every server runs in the foreground in a new session, so stop() can signal its whole
process group (workers, reload generations) and nothing outlives the runner.
"""
from __future__ import annotations

import datetime
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.measure import tree_pids

HERE = Path(__file__).parent
# Idle connections each proxy worker keeps to the origin: more than any scenario needs
# at once, so no target closes upstream connections under load (c2000 included).
UPSTREAM_KEEPALIVE = 4096
START_TIMEOUT = 15.0
STOP_TIMEOUT = 8.0

# The fair layout on 2 cores: origin and wrk share CPU 0, a one-worker proxy owns CPU 1.
PINNED = (os.cpu_count() or 1) >= 2
LOAD_CPU = "0" if PINNED else None
PROXY_CPU = "1" if PINNED else None

_running: List["Server"] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(text: str, **values) -> str:
    """Fill {{name}} placeholders (nginx configs are full of $ and braces)."""
    def sub(m):
        return str(values[m.group(1)])
    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def render(template: str, **values) -> str:
    return fill((HERE / template).read_text(), **values)


def server_lines(config: str, ports: List[int], keepalive: int) -> str:
    """The upstream servers (the origin's ports) as config file `config` lists them."""
    if config == "fastproxy.toml":
        return ", ".join(f'"127.0.0.1:{port}"' for port in ports)
    if config == "nginx.conf":  # nginx's defaults, written out (one server: ignored)
        return "\n".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;" for port in ports)
    return "\n".join(f"    server origin{i} 127.0.0.1:{port} pool-max-conn {keepalive}"
                     for i, port in enumerate(ports))


def http_get(port: int, path: str, timeout: float = 2.0, headers: Optional[Dict[str, str]] = None,
             tls: bool = False):
    """(status, headers, body) of one GET on a fresh connection (over TLS: unverified)."""
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    finally:
        conn.close()


class Server:
    """One started process tree; stop() sends SIGTERM to its process group, then SIGKILL."""

    def __init__(self, name: str, argv: List[str], workdir: Path, cpu: Optional[str],
                 env: Optional[Dict[str, str]] = None):
        if cpu is not None:
            argv = ["taskset", "-c", cpu] + argv
        self.name = name
        self.workdir = workdir
        self._out = open(workdir / "output.log", "wb")
        self.proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        _running.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, port: int, path: str, tls: bool = False) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.output_tail())
            try:
                if http_get(port, path, timeout=1.0, tls=tls)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT:g} s:\n"
                                   + self.output_tail())
            time.sleep(0.1)

    def output_tail(self) -> str:
        self._out.flush()
        text = ""
        for log in sorted(self.workdir.glob("*.log")):
            text += f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:]
        return text

    def stop(self) -> None:
        pgid = self.proc.pid  # leader of its own session
        if self.proc.poll() is None:
            self._signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # Workers of a reload generation may outlive the leader: none may stay.
        self._signal_group(pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(STOP_TIMEOUT)
        self._out.close()
        if self in _running:
            _running.remove(self)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def stop_all() -> None:
    """Stop every server still running (called on exit, error or interrupt)."""
    for server in list(_running):
        server.stop()


class Workdir:
    """A temp dir for one server; removed when the server stops unless kept."""

    def __init__(self, name: str, keep: bool):
        self.path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.keep = keep

    def remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def make_certificate(directory: Path) -> Dict[str, Path]:
    """The TLS scenarios' certificate, self-signed ECDSA P-256 for "bench": its cert, key and
    both in one file (HAProxy's form)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench")]), critical=False)
            .sign(key, hashes.SHA256()))
    files = {"cert": directory / "bench.pem", "key": directory / "bench.key", "both": directory / "bench.both.pem"}
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files["both"].write_bytes(files["cert"].read_bytes() + files["key"].read_bytes())
    return files


class Origin:
    """nginx, one worker on the load CPU, serving the files the scenarios fetch; it also holds
    the TLS scenarios' certificate (files). A scenario with several upstream servers gets more
    of them (add_servers): each its own nginx process on its own port, serving the same files,
    so that one can be killed and started again (kill, revive)."""

    FILES = {"100b": 100, "16k": 16384, "1m": 1 << 20, "64m": 64 << 20}

    def __init__(self, keep: bool = False):
        self.dir = Workdir("origin", keep)
        self.port = free_port()
        self.server: Optional[Server] = None
        self.certificate = make_certificate(self.dir.path)
        self.extra: List[Workdir] = []  # the other servers' directories; each has its port
        self.extra_ports: List[int] = []
        self.extra_servers: List[Optional[Server]] = []

    @property
    def ports(self) -> List[int]:
        return [self.port] + self.extra_ports

    def add_servers(self, count: int) -> None:
        """Make the origin `count` servers (their files are the first one's)."""
        while len(self.ports) < count:
            d = Workdir(f"origin{len(self.ports)}", self.dir.keep)
            (d.path / "client_body").mkdir()
            (d.path / "www").symlink_to(self.dir.path / "www")
            port = free_port()
            (d.path / "nginx.conf").write_text(render("origin/nginx.conf", dir=d.path, port=port))
            self.extra.append(d)
            self.extra_ports.append(port)
            self.extra_servers.append(None)
            self.revive(len(self.ports) - 1)

    def revive(self, index: int) -> None:
        """Start server `index` (not the first) and wait until it serves."""
        d = self.extra[index - 1].path
        server = Server(f"origin{index}", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], d, LOAD_CPU)
        self.extra_servers[index - 1] = server
        server.wait_ready(self.ports[index], "/100b")

    def kill(self, index: int) -> None:
        """Kill server `index` (not the first) at once, as a crash would: SIGKILL to its
        processes; its connections are reset or closed by the kernel, new ones refused."""
        server = self.extra_servers[index - 1]
        if server is not None:
            Server._signal_group(server.pid, signal.SIGKILL)
            server.stop()
            self.extra_servers[index - 1] = None

    def start(self) -> None:
        d = self.dir.path
        www = d / "www"
        www.mkdir()
        (d / "client_body").mkdir()
        for name, size in self.FILES.items():
            (www / name).write_bytes(b"x" * size)
        # JSON that compresses as an API's answer does (not one repeated byte): ~16 and ~64 KiB.
        for name, want in (("16k.json", 16384), ("64k.json", 65536)):
            items, size, i = [], 2, 0
            while size < want:
                items.append(f'{{"id":{i},"name":"item {i}","price":{i * 37 % 1000}.{i % 100:02d},'
                             f'"tags":["t{i % 7}","t{i % 11}"],"in_stock":{"true" if i % 3 else "false"}}}')
                size += len(items[-1]) + 1
                i += 1
            (www / name).write_text("[" + ",".join(items) + "]")
        # Text around an SSI command: nginx streams it with Transfer-Encoding: chunked.
        (www / "chunked.html").write_text(("c" * 1023 + "\n") * 8 + '<!--# echo var="uri" -->\n'
                                          + ("k" * 1023 + "\n") * 8)
        conf = d / "nginx.conf"
        conf.write_text(render("origin/nginx.conf", dir=d, port=self.port))
        self.server = Server("origin", ["nginx", "-p", str(d), "-c", str(conf)], d, LOAD_CPU)
        self.server.wait_ready(self.port, "/100b")
        status, headers, _ = http_get(self.port, "/chunked")
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"origin /chunked is not chunked: {status} {headers}")

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        for server in self.extra_servers:
            if server is not None:
                server.stop()
        for d in self.extra:
            d.remove()
        self.dir.remove()


class Target:
    """Something wrk can load. Subclasses start a proxy in front of the origin."""

    name = ""
    workers = 1
    baseline: Optional[str] = None  # the nginx target this one is compared with

    def __init__(self, origin: Origin, access_log: bool, keep: bool, snippets: Optional[str] = None,
                 tls: bool = False, upstreams: int = 1):
        self.origin = origin
        self.access_log = access_log
        self.keep = keep
        self.snippets = snippets
        self.tls = tls  # its listener terminates TLS
        self.upstreams = upstreams  # servers it balances over: the origin's first ones
        self.port = origin.port
        self.server: Optional[Server] = None
        self.dir: Optional[Workdir] = None

    @property
    def pinned(self) -> bool:
        return PINNED and self.workers == 1

    @property
    def layout(self) -> str:
        if self.server is None:
            return "origin only"
        return f"pinned to CPU {PROXY_CPU}" if self.pinned else "unpinned"

    @property
    def pid(self) -> Optional[int]:
        """Root of the process tree whose CPU and memory count as this target's."""
        return self.server.pid if self.server else None

    def start(self) -> None:
        pass

    def snippet(self, config: str) -> str:
        """What the scenario adds to config file `config` (empty without snippets, or without
        that file: configs/SNIPPETS/upstream.CONFIG is what it adds to the upstream's
        definition); its {{www}} is the origin's directory of files (the static scenarios serve
        them too)."""
        path = HERE / "configs" / (self.snippets or "") / config
        if not self.snippets or not path.exists():
            return ""
        return fill(path.read_text().rstrip("\n"), www=self.origin.dir.path / "www")

    def upstream_values(self, config: str) -> Dict[str, str]:
        """The upstream's servers and the scenario's additions to it, for config file `config`."""
        return {"servers": server_lines(config, self.origin.ports[:self.upstreams], UPSTREAM_KEEPALIVE),
                "upstream_snippet": self.snippet("upstream." + config)}

    def _launch(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.server = Server(self.name, argv, self.dir.path, PROXY_CPU if self.pinned else None,
                             env)
        self.server.wait_ready(self.port, "/100b", self.tls)

    def tls_config(self, config: str) -> str:
        """What a TLS scenario adds to the listener in config file `config`."""
        if not self.tls:
            return ""
        files = self.origin.certificate
        return {"fastproxy.toml": f'[listen.tls]\ncertificates = [{{ cert = "{files["cert"]}", '
                                  f'key = "{files["key"]}" }}]',
                # nginx before 1.23.4 leaves TLS 1.3 out unless told: wrk then gets TLS 1.2
                "nginx.conf": f" ssl;\n        ssl_protocols TLSv1.2 TLSv1.3;\n"
                              f"        ssl_certificate {files['cert']};\n        ssl_certificate_key {files['key']}",
                "haproxy.cfg": f" ssl crt {files['both']}"}[config]

    def reload(self) -> None:
        raise NotImplementedError(f"{self.name} cannot reload")

    def worker_pids(self) -> List[int]:
        return tree_pids(self.pid)[1:] if self.pid else []

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        if self.dir:
            self.dir.remove()


class Direct(Target):
    name = "direct"


class Nginx(Target):
    def __init__(self, workers: int, *args):
        super().__init__(*args)
        self.workers = workers
        self.name = self.baseline = f"nginx-{workers}w"

    def start(self) -> None:
        self.dir = Workdir(self.name, self.keep)
        d = self.dir.path
        for sub in ("client_body", "proxy_temp"):
            (d / sub).mkdir()
        self.port = free_port()
        log = (f"access_log {d}/access.log combined buffer=64k flush=1s;" if self.access_log
               else "access_log off;")
        self.conf = d / "nginx.conf"
        self.conf.write_text(render("configs/nginx.conf", dir=d, port=self.port,
                                    workers=self.workers, **self.upstream_values("nginx.conf"),
                                    keepalive=UPSTREAM_KEEPALIVE, access_log=log,
                                    snippet=self.snippet("nginx.conf"), tls=self.tls_config("nginx.conf")))
        self._launch(["nginx", "-p", str(d), "-c", str(self.conf)])

    def reload(self) -> None:
        subprocess.run(["nginx", "-p", str(self.dir.path), "-c", str(self.conf), "-s", "reload"],
                       check=True, timeout=5, capture_output=True)


class HAProxy(Target):
    def __init__(self, threads: int, *args):
        super().__init__(*args)
        self.workers = threads
        self.name = f"haproxy-{threads}t"
        self.baseline = f"nginx-{threads}w"

    def start(self) -> None:
        self.dir = Workdir(self.name, self.keep)
        d = self.dir.path
        self.port = free_port()
        # HAProxy logs to stdout (our output.log) when the access log is on.
        global_log = "    log stdout format raw local0" if self.access_log else ""
        defaults_log = "    log global\n    option httplog" if self.access_log else ""
        conf = d / "haproxy.cfg"
        conf.write_text(render("configs/haproxy.cfg", dir=d, port=self.port,
                               threads=self.workers, **self.upstream_values("haproxy.cfg"),
                               global_log=global_log,
                               defaults_log=defaults_log, snippet=self.snippet("haproxy.cfg"),
                               tls=self.tls_config("haproxy.cfg")))
        self._launch(["haproxy", "-W", "-f", str(conf)])

    def reload(self) -> None:
        os.kill(self.server.pid, signal.SIGUSR2)


class FastProxy(Target):
    def __init__(self, workers: int, *args, tree: Path = HERE.parent, suffix: str = ""):
        super().__init__(*args)
        self.workers = workers
        self.tree = tree
        self.name = f"fastproxy-{workers}w{suffix}"
        self.baseline = f"nginx-{workers}w"

    def start(self) -> None:
        self.dir = Workdir(self.name, self.keep)
        d = self.dir.path
        self.port = free_port()
        conf = d / "fastproxy.toml"
        conf.write_text(render("configs/fastproxy.toml", dir=d, port=self.port,
                               workers=self.workers, **self.upstream_values("fastproxy.toml"),
                               keepalive=UPSTREAM_KEEPALIVE,
                               access_log=d / "access.log" if self.access_log else "off",
                               snippet=self.snippet("fastproxy.toml"), tls=self.tls_config("fastproxy.toml")))
        # The checkout measured: this bench's own, or the one given with --before.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.tree),
                                                          env.get("PYTHONPATH")]))
        self._launch([sys.executable, "-m", "fastproxy", "-c", str(conf)], env)

    def reload(self) -> None:
        os.kill(self.server.pid, signal.SIGHUP)


def make_targets(names, origin: Origin, access_log: bool, keep: bool,
                 before: Optional[Path] = None, snippets: Optional[str] = None,
                 tls: bool = False, upstreams: int = 1) -> Dict[str, Target]:
    """Targets by name; with `snippets`, their configs get a scenario's additions; with `tls`,
    their listener terminates TLS; they balance over the origin's first `upstreams` servers."""
    common = (origin, access_log, keep, snippets, tls, upstreams)
    kinds = {"direct": lambda: Direct(*common)}
    for n in (1, 2):
        kinds[f"fastproxy-{n}w"] = lambda n=n: FastProxy(n, *common)
        if before is not None:
            kinds[f"fastproxy-{n}w-before"] = lambda n=n: FastProxy(
                n, *common, tree=before, suffix="-before")
        kinds[f"nginx-{n}w"] = lambda n=n: Nginx(n, *common)
        kinds[f"haproxy-{n}t"] = lambda n=n: HAProxy(n, *common)
    unknown = [n for n in names if n not in kinds]
    if unknown:
        raise SystemExit(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(kinds)}")
    return {n: kinds[n]() for n in names}
