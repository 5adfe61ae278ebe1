"""The compiled configuration: frozen objects built once per (re)load by the master.

Only these objects cross into workers (inherited at fork). Strings the hot path
compares or writes are pre-encoded to bytes here, durations are float seconds and
sizes are int bytes, so the core never parses or converts anything per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class Address:
    host: str  # "127.0.0.1", "::1", "0.0.0.0"
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, eq=False)
class Tls:
    """A listener's TLS (config/tls.py): SSL contexts made by the master before fork."""
    front: object  # ssl.SSLContext every connection starts with: policy and ticket keys, no certificate
    exact: Dict[str, object]  # lower-case SNI name -> the SSLContext of the certificate serving it
    wildcard: Dict[str, object]  # "example.com" -> the context of "*.example.com"
    default: Optional[object]  # the context for an unknown or absent SNI; None: refuse the handshake
    hsts: bytes  # the Strict-Transport-Security value; b"": none
    client_verify: bool  # client certificates are asked for (their subject goes upstream)
    expiring: Tuple[Tuple[str, Tuple[str, ...], object], ...]  # (cert file, names, datetime) within 14 days


@dataclass(frozen=True)
class Listener:
    address: Address
    backlog: int = 511
    deferred: bool = False  # TCP_DEFER_ACCEPT on its sockets
    tls: Optional[Tls] = None
    # `redirect_https`: the listener's own route, which answers every request on it
    route: Optional["Route"] = None


@dataclass(frozen=True)
class AccessLog:
    path: str  # a file path, "stdout" or "off"
    format: str  # "combined" or "json"
    buffer_size: int  # bytes buffered before a write
    flush_interval: float  # seconds; buffered lines never wait longer than this


@dataclass(frozen=True)
class Main:
    workers: int  # "auto" is resolved to the CPU count at compile time
    pid_file: Optional[str]
    shutdown_timeout: float
    error_log: str  # a file path or "stderr"
    log_level: str  # "debug" | "info" | "warning" | "error"
    max_body_size: int  # 0 = no limit
    max_header_size: int
    max_uri_size: int
    client_header_timeout: float
    client_body_timeout: float
    keepalive_timeout: float
    keepalive_requests: int
    send_timeout: float
    pause_timeout: float  # longest a request may stay paused by a filter (then 504)
    worker_rlimit_nofile: Optional[int]  # each worker's RLIMIT_NOFILE; None: inherited
    server_header: bytes  # value of the Server header we send
    pass_server_header: bool  # True: keep the upstream's Server header instead
    allow_encoded_slashes: bool  # True: %2F, %5C and a literal backslash in a path pass through (else 400)


@dataclass(frozen=True)
class Server:
    address: Address  # resolved: always an IP
    name: str  # "host:port" as configured (several servers share it when a name resolved to several)
    weight: int
    max_conns: int  # connections in use at once across workers; 0: no limit
    backup: bool  # used only while no other server can take a request
    down: bool  # out of service by config
    slow_start: float  # seconds over which its weight ramps up after it comes back; 0: none
    tls_name: Optional[str] = None  # TLS: the name sent as SNI and verified (upstream.tls); None: plain


@dataclass(frozen=True)
class Queue:
    size: int  # requests waiting per worker while every server is at max_conns; 0: none
    timeout: float


@dataclass(frozen=True)
class HealthCheck:
    path: bytes
    method: bytes
    host: Optional[bytes]  # None: the server's address
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int
    expect_status: Tuple[Tuple[int, int], ...]  # inclusive ranges
    expect_body: Optional[bytes]


@dataclass(frozen=True)
class Upstream:
    name: str
    servers: Tuple[Server, ...]  # one per resolved address, in config order
    balance: str  # "round_robin" | "least_conn" | "random_two" | "ip_hash" | "hash"
    hash_key: str  # "remote_addr" | "path" | "uri" | "header:name" | "cookie:NAME" | "query:NAME"
    queue: Queue
    max_fails: int  # 0: no passive health
    fail_timeout: float
    fail_status: Tuple[int, ...]
    retry_on: Tuple[str, ...]  # config/upstreams.py RETRY_ON
    tries: int
    retry_timeout: float  # 0: no bound
    retry_non_idempotent: bool
    retry_buffer: int
    keepalive: int  # idle connections each worker keeps for this upstream
    keepalive_timeout: float  # an idle pooled connection is closed after this
    connect_timeout: float
    read_timeout: float
    send_timeout: float
    health: Optional[HealthCheck]
    tls: Optional[object] = None  # ssl.SSLContext of TLS to every server (config/upstream_tls.py); None: plain

    def server_key(self, server: Server) -> str:
        """What a server's shared state is kept under (the metrics zone's server names): it
        survives a reload while the upstream keeps that address."""
        return f"{self.name}/{server.address}"


# Route handlers (config/handlers.py): `runtime` names the core class that runs one
# (HANDLER_CLASSES in core/filters.pyx); "proxy" is the core's own path upstream.

@dataclass(frozen=True)
class Proxy:
    """Route handler: forward to an upstream."""
    runtime: ClassVar[str] = "proxy"
    upstream: str


@dataclass(frozen=True)
class Respond:
    """Route handler: answer locally with a fixed response."""
    runtime: ClassVar[str] = "respond"
    status: int
    body: bytes
    headers: Tuple[Tuple[bytes, bytes], ...]
    delay: float = 0.0  # seconds to wait before answering; 0: at once

    @property
    def stateful(self) -> bool:
        """Its runtime half keeps per-request state (the delay's timer): it gets a slot."""
        return self.delay > 0


@dataclass(frozen=True)
class Static:
    """Route handler: files under a directory (config/static.py, core/static.pyx)."""
    runtime: ClassVar[str] = "static"
    stateful: ClassVar[bool] = False  # no per-request slot
    root: bytes  # absolute, symbolic links resolved, no trailing "/"
    strip_prefix: bytes  # the route's path_prefix without its trailing "/", taken off; b"": none
    index: Tuple[bytes, ...]
    try_files: Tuple[bytes, ...]
    precompressed: Tuple[str, ...]  # sibling suffixes ("zst", "br", "gz") in preference order
    cache_control: bytes  # b"": no Cache-Control
    hidden: bool
    follow_symlinks: str  # "inside_root" | "always" | "never"
    mime_types: Tuple[Tuple[bytes, bytes], ...]  # (lower-case extension, Content-Type value)
    default_type: bytes


@dataclass(frozen=True)
class RedirectHttps:
    """Route handler of a `redirect_https` listener: 308 to prefix + host + suffix + path and query."""
    runtime: ClassVar[str] = "redirect_https"
    stateful: ClassVar[bool] = False
    prefix: bytes  # b"https://" (then the request's host), or the whole authority
    use_host: bool  # the request's host (without its port) follows the prefix
    suffix: bytes  # b":8443" or b""


@dataclass(frozen=True)
class Route:
    name: str  # label in metrics and logs
    hosts: Tuple[bytes, ...]  # lower-case, no port; "*.example.com" matches subdomains; () = any
    path: Optional[bytes]  # exact match
    path_prefix: Optional[bytes]
    methods: Tuple[bytes, ...]  # upper-case; () = any
    handler: Union[Proxy, Respond, Static]
    max_body_size: int
    max_header_size: int
    # One tuple per filters.base.Phase of the route's compiled filters (fastproxy/filters/), in
    # run order; a route without filters has only empty tuples.
    phases: Tuple[Tuple[object, ...], ...]


@dataclass(frozen=True)
class Admin:
    listen: Address


@dataclass(frozen=True)
class Runtime:
    source: str  # path of the config file this was compiled from
    main: Main
    access_log: AccessLog
    admin: Optional[Admin]
    listeners: Tuple[Listener, ...]
    upstreams: Tuple[Upstream, ...]
    routes: Tuple[Route, ...]  # in config order; the router ranks them

    @property
    def all_routes(self) -> Tuple[Route, ...]:
        """routes, then the listeners' own (redirect_https): every name metrics count under."""
        return self.routes + tuple(listener.route for listener in self.listeners if listener.route is not None)
