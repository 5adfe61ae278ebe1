"""Every config key, declared once: its type, default and meaning.

`sections()` is the whole file format. `check_tree` walks a parsed TOML document against it,
reporting every problem with its key path and returning the converted values with defaults
filled in; rules that span several keys live in compile.py. docs/config.md embeds
`reference()` verbatim (a test keeps the two equal), so a key cannot exist undocumented.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .runtime import Address

Report = Callable[[str, str], None]  # (key path, reason)


class Invalid(Exception):
    """A value that does not fit its key.

    `problems` holds (path suffix, reason) pairs, so an array or table value can report
    each bad item at its own path (`servers[1]`, `headers.Host`).
    """

    def __init__(self, reason: str = "", problems: Optional[List[Tuple[str, str]]] = None):
        super().__init__(reason)
        self.problems = problems if problems is not None else [("", reason)]


def type_name(value) -> str:
    """TOML's name for the type tomllib gave `value`."""
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
                              (list, "array"), (dict, "table")):
        if isinstance(value, python_type):
            return name
    return "date/time"


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything a default uses
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{quote_key(k)} = {toml_literal(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)


def describe(value) -> str:
    """`value` for an error message: its type, and the value itself when short."""
    if isinstance(value, (list, dict)):
        return type_name(value)
    shown = toml_literal(value)
    return f"{type_name(value)} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def quote_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def join(path: str, name: str) -> str:
    return f"{path}.{quote_key(name)}" if path else quote_key(name)


# --- kinds: the value types keys can have ------------------------------------------------

class Kind:
    """A value type. `name` is how docs and type errors call it; `convert` checks a value
    of one of `types` and returns it compiled, raising Invalid with the reason."""
    name = ""
    types: tuple = ()

    def __call__(self, value):
        # bool is an int subclass in Python but its own type in TOML.
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            raise Invalid(f"expected {self.name}, got {describe(value)}")
        return self.convert(value)

    def convert(self, value):
        return value


class Integer(Kind):
    types = (int,)

    def __init__(self, minimum: int, maximum: Optional[int] = None):
        self.minimum, self.maximum = minimum, maximum
        self.name = f"integer {minimum}..{maximum}" if maximum is not None else f"integer >= {minimum}"

    def convert(self, value):
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise Invalid(f"must be an {self.name}, got {value}")
        return value


class Boolean(Kind):
    name = "boolean"
    types = (bool,)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class String(Kind):
    """A string; by default non-empty and one line (it ends up in headers, logs or file names)."""
    name = "string"
    types = (str,)

    def __init__(self, empty: bool = False, control: bool = False):
        self.empty, self.control = empty, control

    def convert(self, value):
        if not value and not self.empty:
            raise Invalid("must not be empty")
        if not self.control and _CONTROL.search(value):
            raise Invalid("must not contain control characters (newlines, tabs, NUL)")
        return value


class Choice(Kind):
    types = (str,)

    def __init__(self, *choices: str, aliases: Optional[Dict[str, str]] = None):
        self.choices, self.aliases = choices, aliases or {}
        self.name = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def convert(self, value):
        word = self.aliases.get(value.lower(), value.lower())
        if word not in self.choices:
            raise Invalid(f"{json.dumps(value)} is not one of {self.name}" + did_you_mean(word, self.choices))
        return word


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Duration(Kind):
    """Float seconds, from "500ms", "30s", "5m", "1h" or a bare number of seconds."""
    name = "duration"
    types = (str, int, float)

    def __init__(self, zero: bool = False):
        self.zero = zero

    def convert(self, value):
        if isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if not match:
                raise Invalid(f'{json.dumps(value)} is not a duration; write e.g. "500ms", "30s", "5m", "1h" '
                              f"or a number of seconds")
            seconds = float(match[1]) * _SECONDS[match[2]]
        else:
            seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise Invalid(f"must be a finite duration of 0 or more, got {toml_literal(value)}")
        if seconds == 0 and not self.zero:
            raise Invalid("must be more than 0")
        return seconds


_SIZE = re.compile(r"(-?\d+)([kmg]?)", re.IGNORECASE)
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class Size(Kind):
    """Int bytes, from "512", "16k", "1m", "1g" (k = 1024) or a bare number of bytes."""
    name = "size"
    types = (str, int)

    def __init__(self, zero: bool = False):
        self.zero = zero

    def convert(self, value):
        if isinstance(value, str):
            match = _SIZE.fullmatch(value)
            if not match:
                raise Invalid(f'{json.dumps(value)} is not a size; write e.g. "512", "16k", "1m", "1g" '
                              f"or a number of bytes")
            size = int(match[1]) * _BYTES[match[2].lower()]
        else:
            size = value
        if size < 0:
            raise Invalid(f"must be 0 or more, got {value}")
        if size == 0 and not self.zero:
            raise Invalid("must be more than 0")
        return size


class Workers(Kind):
    name = 'integer >= 1 or "auto"'
    types = (int, str)

    def convert(self, value):
        if value == "auto":
            return os.cpu_count() or 1
        if isinstance(value, str) or value < 1:
            raise Invalid(f"expected {self.name}, got {describe(value)}")
        return value


_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid(f"port must be a number from 1 to 65535, got {json.dumps(text)}")
    return int(text)


class HostPort(Kind):
    """An Address from "host:port" or "[v6]:port". A listening address must be an IP
    (or "*" for every IPv4 address), since the master binds it without resolving names."""
    types = (str,)

    def __init__(self, listen: bool):
        self.listen = listen
        self.name = '"ip:port"' if listen else '"host:port"'

    def convert(self, value):
        if value.startswith("["):
            host, bracket, port = value[1:].partition("]:")
            if not bracket:
                raise Invalid(f'{json.dumps(value)} is not "[ipv6]:port"')
            try:
                return Address(str(ipaddress.IPv6Address(host)), _port(port))
            except ipaddress.AddressValueError:
                raise Invalid(f"{json.dumps(host)} is not an IPv6 address") from None
        host, colon, port = value.rpartition(":")
        if not colon or not host:
            raise Invalid(f"expected {self.name}, got {json.dumps(value)}")
        if ":" in host:
            raise Invalid(f'an IPv6 address needs brackets: "[{host}]:{port}"')
        port_number = _port(port)
        if self.listen and host == "*":
            return Address("0.0.0.0", port_number)
        try:
            return Address(str(ipaddress.IPv4Address(host)), port_number)
        except ipaddress.AddressValueError:
            if self.listen:
                raise Invalid(f'{json.dumps(host)} is not an IP address; listen on an IP such as '
                              f'"127.0.0.1" or "[::1]", or "*" for all IPv4 addresses') from None
            if re.fullmatch(r"[\d.]+", host) or not _HOSTNAME.fullmatch(host.lower()):
                raise Invalid(f"{json.dumps(host)} is not a host name or IP address") from None
            return Address(host.lower(), port_number)


class HostPattern(Kind):
    """A name a route matches in the Host header: lower-case, no port, optionally "*.domain"."""
    name = "host name"
    types = (str,)

    def convert(self, value):
        host = value.lower()
        if host.startswith("[") and host.endswith("]"):
            try:
                return f"[{ipaddress.IPv6Address(host[1:-1])}]"
            except ipaddress.AddressValueError:
                raise Invalid(f"{json.dumps(value)} is not an IPv6 address") from None
        if re.fullmatch(r".+:\d+", host):
            raise Invalid(f"{json.dumps(value)} must not include a port (the Host header is matched without it)")
        if not host.isascii():
            raise Invalid(f"{json.dumps(value)}: write international names in their ASCII (xn--) form")
        if not _HOSTNAME.fullmatch(host.removeprefix("*.")):
            raise Invalid(f"{json.dumps(value)} is not a host name (letters, digits, '-' and '.', "
                          f"optionally starting with '*.')")
        return host


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def not_normal(path: str) -> Optional[str]:
    """What keeps `path` from being in the normal form requests are routed in, or None."""
    if "//" in path:
        return "'//' (slashes are merged)"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "a '.' or '..' segment (they are resolved)"
    for escape in re.findall(r"%.{0,2}", path):
        if not re.fullmatch(r"%[0-9A-Fa-f]{2}", escape) or escape == "%00":
            return f"{escape} (requests with it are refused)"
        char = chr(int(escape[1:], 16))
        if char in _UNRESERVED:
            return f"{escape} (decoded to {char!r})"
        if escape != escape.upper():
            return f"{escape} (written {escape.upper()})"
    return None


class Path(Kind):
    """A request path as clients send it on the wire."""
    name = 'string starting with "/"'
    types = (str,)

    def convert(self, value):
        if not value.startswith("/"):
            raise Invalid(f'{json.dumps(value)} must start with "/"')
        if not re.fullmatch(r"[\x21-\x7e]+", value):
            raise Invalid(f"{json.dumps(value)} must be printable ASCII without spaces (percent-encode the rest)")
        if "?" in value or "#" in value:
            raise Invalid(f"{json.dumps(value)} must not contain '?' or '#' (routes match the path only)")
        problem = not_normal(value)
        if problem:
            raise Invalid(f"{json.dumps(value)} can never match: request paths are matched in normal form "
                          f"(docs/http.md, Request paths), and this has {problem}")
        return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


class Method(Kind):
    name = "method"
    types = (str,)

    def convert(self, value):
        if not _TOKEN.fullmatch(value):
            raise Invalid(f"{json.dumps(value)} is not an HTTP method")
        return value.upper()


class ListOf(Kind):
    """An array of `item`, as a tuple: non-empty unless `empty`; `single` also takes one bare item."""
    types = (list,)

    def __init__(self, item: Kind, name: str, single: bool = False, empty: bool = False):
        self.item, self.name, self.empty = item, name, empty
        self.types = (list, *item.types) if single else (list,)

    def convert(self, value):
        if not isinstance(value, list):
            return (self.item(value),)
        if not value and not self.empty:
            raise Invalid("must not be empty")
        items, problems = [], []
        for index, element in enumerate(value):
            try:
                items.append(self.item(element))
            except Invalid as error:
                problems += [(f"[{index}]{suffix}", reason) for suffix, reason in error.problems]
        if problems:
            raise Invalid(problems=problems)
        return tuple(items)


# Framing and hop-by-hop headers: fastproxy writes these itself for every response.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                               "proxy-connection", "te", "trailer", "upgrade"})


def _set_by_fastproxy(name: str) -> Optional[str]:
    return f"{name} is set by fastproxy itself" if name.lower() in _RESERVED_HEADERS else None


class HeaderName(Kind):
    """A header name (an RFC 9110 token); `refuse` gives the reason a name may not be used
    here, or None."""
    name = "header name"
    types = (str,)

    def __init__(self, refuse: Callable[[str], Optional[str]] = _set_by_fastproxy):
        self.refuse = refuse

    def convert(self, value):
        if not _TOKEN.fullmatch(value):
            raise Invalid(f"{json.dumps(value)} is not a valid header name")
        reason = self.refuse(value)
        if reason:
            raise Invalid(reason)
        return value


class HeaderValue(String):
    """A header value: one line, with no control character but tab."""

    def convert(self, value):
        if not value and not self.empty:
            raise Invalid("must not be empty")
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise Invalid("must not contain control characters other than tab")
        return value


class Headers(Kind):
    """A table of header name -> value, as a tuple of (name, value) in file order."""
    types = (dict,)

    def __init__(self, names: Kind = HeaderName(), values: Kind = HeaderValue(empty=True),
                 name: str = "table of header name = value strings"):
        self.names, self.values, self.name = names, values, name

    def convert(self, value):
        headers, problems = [], []
        for name, text in value.items():
            try:
                headers.append((self.names(name), self.values(text)))
            except Invalid as error:
                problems += [("." + quote_key(name) + suffix, reason) for suffix, reason in error.problems]
        if problems:
            raise Invalid(problems=problems)
        return tuple(headers)


class Table(Kind):
    """A nested table checked against its own section; converts to a dict of its keys."""
    name = "table"
    types = (dict,)

    def __init__(self, section: "Section"):
        self.section = section

    def convert(self, value):
        problems: List[Tuple[str, str]] = []
        values = check_table(self.section.keys, value, "", lambda path, reason: problems.append(("." + path, reason)))
        if problems:
            raise Invalid(problems=problems)
        return values


# --- keys and sections --------------------------------------------------------------------

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Key:
    name: str
    kind: Kind
    default: object  # a TOML value passed through `kind`, REQUIRED, or None (absent stays None)
    doc: str
    default_doc: str = ""  # how docs show the default when it is not a plain value

    def default_text(self) -> str:
        if self.default_doc:
            return self.default_doc
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return "none"
        return f"`{toml_literal(self.default)}`"


TABLE, ARRAY, NAMED, MAP = "table", "array of tables", "table of named tables", "table of values"
# the key of the checked tree holding the config file's absolute path (relative paths in
# checks are against its directory); no section has that name
SOURCE = "__source__"
DEFAULTS, OFF, NEEDED = "defaults", "off", "needed"  # what an absent section means


@dataclass(frozen=True)
class Section:
    name: str  # its key at the root of the file
    title: str  # how docs and hints call it
    shape: str  # TABLE, ARRAY, NAMED, or MAP (any names, each value of the kind of its one key)
    absent: str  # DEFAULTS: all keys take their defaults; OFF: feature off; NEEDED: an error
    keys: Tuple[Key, ...]
    doc: str


MAIN = Section("main", "[main]", TABLE, DEFAULTS, (
    Key("workers", Workers(), "auto", 'Worker processes to run; `"auto"` runs one per CPU.'),
    Key("pid_file", String(), None, "File the master writes its pid to, which `fastproxy -s` reads; "
        "none: no pid file. A reload that changes it writes the new file and removes the old one "
        "once the new workers are up."),
    Key("shutdown_timeout", Duration(zero=True), "30s", "How long a draining worker (after a reload or a "
        "graceful stop) may finish in-flight requests before it is killed."),
    Key("error_log", String(), "stderr", '`"stderr"` or a file path for the error log.'),
    Key("log_level", Choice("debug", "info", "warning", "error", aliases={"warn": "warning"}), "info",
        'Least severe message the error log keeps; `"warn"` is accepted for `"warning"`.'),
    Key("max_body_size", Size(zero=True), "1g", 'Largest request body accepted (413 above it); `"0"`: no '
        "limit. A route may override it."),
    Key("max_header_size", Size(), "16k", "Largest request line plus header section accepted (431 above "
        "it). A route may override it."),
    Key("max_uri_size", Size(), "8k", "Longest request target accepted (414 above it)."),
    Key("client_header_timeout", Duration(), "60s", "Time a client has to send a whole request "
        "header section."),
    Key("client_body_timeout", Duration(), "60s", "Longest a client may stay silent while sending a "
        "request body."),
    Key("keepalive_timeout", Duration(), "75s", "How long an idle kept-alive client connection stays open."),
    Key("keepalive_requests", Integer(1), 1000, "Requests served on one client connection before it is "
        "closed."),
    Key("send_timeout", Duration(), "60s", "Longest a client may go without reading while a response "
        "is sent to it."),
    Key("pause_timeout", Duration(), "60s", "Longest a request may wait in a route's filter that paused "
        "it (a `respond` `delay`, or a filter waiting for an answer elsewhere): then it is answered 504 "
        "and the error log names the filter."),
    Key("worker_rlimit_nofile", Integer(16), None, "Most file descriptors each worker may hold (its "
        "`RLIMIT_NOFILE`, as nginx's `worker_rlimit_nofile`); none: what the master was started with "
        "(the systemd unit sets 65536). Each client and each upstream connection holds one. A worker "
        "that runs out stops accepting for 0.5 s and logs it; its open connections go on."),
    Key("server_header", String(), "fastproxy", "Value of the `Server` header of every response."),
    Key("pass_server_header", Boolean(), False, "`true`: keep the upstream's `Server` header instead of "
        "replacing it with `server_header`."),
    Key("allow_encoded_slashes", Boolean(), False, "`true`: `%2F` and `%5C` in a request path go to the "
        "upstream as they are (hex upper-cased), and so does a literal `\\`; `false`: refused with 400, "
        "since an upstream that decodes them would see other path segments than the routes did (see "
        "http.md, Request paths). `%00` is always refused. Process-wide, not per route: the path must "
        "be checked before it can choose a route."),
), "Process-wide settings. The section may be left out; every key has a default.")

ACCESS_LOG = Section("access_log", "[access_log]", TABLE, DEFAULTS, (
    Key("path", String(), "stdout", '`"stdout"`, `"off"` or a file path.'),
    Key("format", Choice("combined", "json"), "combined", "The Apache/nginx combined line, or one JSON "
        "object per line."),
    Key("buffer", Size(), "64k", "Bytes each worker buffers before writing."),
    Key("flush", Duration(), "1s", "Longest a buffered line waits before it is written."),
), "One line per request. The section may be left out; every key has a default.")

ADMIN = Section("admin", "[admin]", TABLE, OFF, (
    Key("listen", HostPort(listen=True), REQUIRED, "Address serving `/metrics` and `/status`."),
), "The admin listener. Without this section there is none.")

LISTEN = Section("listen", "[[listen]]", ARRAY, NEEDED, (
    Key("address", HostPort(listen=True), REQUIRED, '`"ip:port"`, `"[ipv6]:port"`, or `"*:port"` for '
        "every IPv4 address."),
    Key("backlog", Integer(1), 511, "Accept queue length of each listening socket."),
    Key("deferred", Boolean(), False, "Hand a connection to a worker only once the client has sent "
        "something (Linux `TCP_DEFER_ACCEPT`, as nginx's `deferred`): a worker wakes once per connection "
        "instead of twice when the request comes in a later packet. A client that connects and stays "
        "silent is handed over after about 1 s more, then closed after `client_header_timeout` as "
        "without it. Ignored where the system has no such option."),
), "Where clients connect. At least one is required; no two may overlap.")

RESPOND = Section("respond", "[[routes]].respond", TABLE, OFF, (
    Key("status", Integer(100, 599), REQUIRED, "Response status."),
    Key("body", String(empty=True, control=True), "", "Response body."),
    Key("headers", Headers(), {}, "Response headers; fastproxy adds `Content-Length`, `Server`, `Date` and "
        "`X-Request-ID` itself (they are refused here)."),
    Key("delay", Duration(zero=True), "0s", "Wait this long before answering (a mock of a slow service, "
        "or a tarpit); the worker serves other requests meanwhile. A client that leaves first is logged "
        "with 499. `[main]` `pause_timeout` bounds it: a longer delay is answered 504."),
), "A fixed local response, written inline: `respond = { status = 200, body = \"ok\\n\" }`.")

# [[routes]] without the keys of the handlers and filters, which sections() adds: the keys
# that match requests, then the handlers' (config/handlers.py), the limits, the filters'.
_ROUTE_MATCH_KEYS = (
    Key("name", String(), None, "Label in metrics and logs; must be unique.", "derived from the match"),
    Key("host", ListOf(HostPattern(), "host name or array of them", single=True), None,
        'Host header values to match, without port; `"*.example.com"` matches any subdomain of example.com.',
        "any host"),
    Key("path", Path(), None, "Exact path to match."),
    Key("path_prefix", Path(), None, "Path prefix to match (at most one of `path` and `path_prefix`; "
        "neither: every path)."),
    Key("methods", ListOf(Method(), "array of methods"), None, 'Methods to match, e.g. `["GET", "HEAD"]`.',
        "any method"),
)
_ROUTE_LIMIT_KEYS = (
    Key("max_body_size", Size(zero=True), None, "Overrides `[main]` `max_body_size` for this route.",
        "from `[main]`"),
    Key("max_header_size", Size(), None, "Overrides `[main]` `max_header_size` for this route.",
        "from `[main]`"),
)
_ROUTES = Section("routes", "[[routes]]", ARRAY, NEEDED, (), "What to do with a request: the most specific "
                  "matching route wins (see Route matching). At least one is required.")


@functools.lru_cache(maxsize=None)
def sections() -> Tuple[Section, ...]:
    """The sections of the file: [[routes]] with a key per handler and filter type, [main]
    with the defaults of the filters that have one. Their registries are imported here
    rather than at the top because they build their keys from the kinds above."""
    from fastproxy.config import handlers, static, tls, upstreams
    from fastproxy.filters import registry
    main = dataclasses.replace(MAIN, keys=MAIN.keys + registry.main_keys())
    listen = dataclasses.replace(LISTEN, keys=LISTEN.keys + tls.listen_keys())
    routes = dataclasses.replace(_ROUTES, keys=_ROUTE_MATCH_KEYS + handlers.route_keys() + _ROUTE_LIMIT_KEYS
                                 + registry.route_keys())
    return (main, ACCESS_LOG, ADMIN, listen, upstreams.UPSTREAMS, routes, static.MIME_SECTION)


def all_sections() -> Tuple[Section, ...]:
    """sections() plus the tables nested in them, in docs order."""
    nested = {}  # once each, though [main] has a key for one too
    for section in sections():
        for key in section.keys:
            # a Table key, or an array whose items may be tables (an upstream's servers)
            inner = getattr(key.kind, "section", None) or getattr(getattr(key.kind, "item", None), "section", None)
            if inner is not None:
                nested[id(inner)] = inner
    return sections() + tuple(nested.values())


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# --- walking a document -------------------------------------------------------------------

def _unknown_key(name: str, keys: Tuple[Key, ...]) -> str:
    homes = [s.title for s in all_sections() if s.keys is not keys and any(k.name == name for k in s.keys)]
    if homes:
        return f"unknown key here (it belongs in {' or '.join(homes)})"
    return "unknown key" + did_you_mean(name, [key.name for key in keys])


def check_table(keys: Tuple[Key, ...], raw: dict, path: str, report: Report) -> dict:
    """Check one table against `keys`, reporting every problem.

    Returns the converted value of every key, with defaults for absent ones (None for
    optional keys without a default); a key whose value was bad is left out, so later
    checks can tell "not given" from "given wrong" and stay quiet about the latter.
    """
    for name in raw:
        if all(key.name != name for key in keys):
            report(join(path, name), _unknown_key(name, keys))
    values = {}
    for key in keys:
        if key.name in raw:
            try:
                values[key.name] = key.kind(raw[key.name])
            except Invalid as error:
                for suffix, reason in error.problems:
                    report(join(path, key.name) + suffix, reason)
        elif key.default is REQUIRED:
            report(join(path, key.name), "required key is missing")
        else:
            values[key.name] = None if key.default is None else key.kind(key.default)
    return values


def check_tree(raw: dict, report: Report) -> dict:
    """Check a whole parsed document against sections().

    Returns {section name: values}: a dict for a TABLE (None when OFF and absent), a list
    for an ARRAY (None in place of an element that is not a table), a dict of name ->
    values for NAMED.
    """
    for name in raw:
        if all(section.name != name for section in sections()):
            report(quote_key(name), "unknown section" + did_you_mean(name, [s.name for s in sections()]))
    tree = {}
    for section in sections():
        value = raw.get(section.name)
        if value is None or value == [] or value == {}:
            if section.absent == NEEDED:
                report(section.name, f"at least one {section.title} is required")
        if section.shape == TABLE:
            if value is None and section.absent == OFF:
                tree[section.name] = None
            elif isinstance(value, (dict, type(None))):
                tree[section.name] = check_table(section.keys, value or {}, section.name, report)
            else:
                report(section.name, f"expected a table {section.title}, got {describe(value)}")
        elif section.shape == ARRAY:
            if not isinstance(value, (list, type(None))):
                report(section.name, f"expected an array of tables {section.title}, got {describe(value)}")
                continue
            tree[section.name] = elements = []
            for index, element in enumerate(value or ()):
                where = f"{section.name}[{index}]"
                if isinstance(element, dict):
                    elements.append(check_table(section.keys, element, where, report))
                else:
                    elements.append(None)
                    report(where, f"expected a table, got {describe(element)}")
        elif section.shape == MAP:
            if not isinstance(value, (dict, type(None))):
                report(section.name, f"expected a table {section.title}, got {describe(value)}")
                continue
            tree[section.name] = values = {}
            for name, element in (value or {}).items():
                where = join(section.name, name)
                if not _NAME.fullmatch(name):
                    report(where, "name may contain only letters, digits, '_', '-' and '.'")
                try:
                    values[name] = section.keys[0].kind(element)
                except Invalid as error:
                    for suffix, reason in error.problems:
                        report(where + suffix, reason)
        else:
            if not isinstance(value, (dict, type(None))):
                report(section.name, f"expected a table of {section.title} tables, got {describe(value)}")
                continue
            tree[section.name] = named = {}
            for name, element in (value or {}).items():
                where = join(section.name, name)
                if not _NAME.fullmatch(name):
                    report(where, "name may contain only letters, digits, '_', '-' and '.'")
                if isinstance(element, dict):
                    named[name] = check_table(section.keys, element, where, report)
                else:
                    named[name] = None
                    report(where, f"expected a table, got {describe(element)}")
    return tree


# --- documentation ------------------------------------------------------------------------

def reference() -> str:
    """The key reference embedded in docs/config.md, generated so the two cannot drift."""
    parts = []
    for section in all_sections():
        rows = [f"### `{section.title}`", "", section.doc, "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        rows += [f"| `{key.name}` | {key.kind.name} | {key.default_text()} | {key.doc} |" for key in section.keys]
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"
