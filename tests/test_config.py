"""Unit tests of fastproxy.config.load_runtime on real files."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastproxy.config import load_runtime
from fastproxy.config.runtime import Address, Proxy, Respond
from fastproxy.config.schema import all_sections, reference
from fastproxy.errors import ConfigError, FastproxyError, Problem

REPO = Path(__file__).resolve().parent.parent

# The config block of issue 2, which must load exactly as written.
ISSUE_EXAMPLE = '''\
[main]
workers = 2
pid_file = "/tmp/fastproxy.pid"
shutdown_timeout = "30s"
error_log = "stderr"
log_level = "info"

[access_log]
path = "stdout"          # a file path, "stdout" or "off"
format = "combined"      # or "json"

[admin]
listen = "127.0.0.1:9901"

[[listen]]
address = "127.0.0.1:8080"

[upstreams.app]
servers = ["127.0.0.1:9000", "127.0.0.1:9001"]
keepalive = 32
connect_timeout = "3s"
read_timeout = "60s"

[[routes]]
path_prefix = "/api/"
upstream = "app"

[[routes]]
path = "/"
respond = { status = 200, body = "fastproxy is running\\n", headers = { "Content-Type" = "text/plain" } }
'''

# The smallest valid file; tests append to it.
MINIMAL = '''\
[[listen]]
address = "127.0.0.1:8080"

[[routes]]
respond = { status = 200 }
'''


@pytest.fixture
def load(tmp_path):
    """Write TOML text to a file and load it."""
    def load(text):
        path = tmp_path / "fastproxy.toml"
        path.write_text(text)
        return load_runtime(str(path))
    return load


@pytest.fixture
def problems(load):
    """The problems of a config that must be refused, as "key.path: reason" strings."""
    def problems(text):
        with pytest.raises(ConfigError) as caught:
            load(text)
        return [f"{p.key_path}: {p.reason}" for p in caught.value.problems]
    return problems


def test_issue_example(load):
    runtime = load(ISSUE_EXAMPLE)
    assert runtime.main.workers == 2
    assert runtime.main.pid_file == "/tmp/fastproxy.pid"
    assert runtime.main.shutdown_timeout == 30.0
    assert runtime.admin.listen == Address("127.0.0.1", 9901)
    assert [listener.address for listener in runtime.listeners] == [Address("127.0.0.1", 8080)]
    (app,) = runtime.upstreams
    assert app.name == "app"
    assert [s.address for s in app.servers] == [Address("127.0.0.1", 9000), Address("127.0.0.1", 9001)]
    assert (app.keepalive, app.connect_timeout, app.read_timeout) == (32, 3.0, 60.0)
    api, root = runtime.routes
    assert (api.name, api.path_prefix, api.path, api.handler) == ("/api/*", b"/api/", None, Proxy("app"))
    assert (root.name, root.path, root.path_prefix) == ("/", b"/", None)
    assert root.handler == Respond(200, b"fastproxy is running\n", ((b"Content-Type", b"text/plain"),))
    assert api.phases == root.phases == ((),) * 7  # one empty tuple per filters.base.Phase


def test_shipped_config():
    runtime = load_runtime(str(REPO / "conf" / "fastproxy.toml"))
    assert runtime.main.workers == os.cpu_count()
    assert runtime.main.pid_file == "/tmp/fastproxy.pid"
    assert (runtime.access_log.path, runtime.access_log.format) == ("stdout", "combined")
    assert runtime.admin.listen == Address("127.0.0.1", 9901)
    assert [listener.address for listener in runtime.listeners] == [Address("127.0.0.1", 8080)]
    assert [(u.name, [s.address for s in u.servers]) for u in runtime.upstreams] == [
        ("app", [Address("127.0.0.1", 9000)])]
    assert [(r.path_prefix, r.path, r.handler) for r in runtime.routes] == [
        (b"/api/", None, Proxy("app")),
        (None, b"/", Respond(200, b"fastproxy is running\n", ((b"Content-Type", b"text/plain"),))),
    ]


def test_defaults(load, tmp_path):
    runtime = load(MINIMAL)
    main = runtime.main
    assert runtime.source == str(tmp_path / "fastproxy.toml")
    assert main.workers == os.cpu_count()
    assert main.pid_file is None
    assert (main.shutdown_timeout, main.error_log, main.log_level) == (30.0, "stderr", "info")
    assert (main.max_body_size, main.max_header_size, main.max_uri_size) == (1 << 30, 16 << 10, 8 << 10)
    assert (main.client_header_timeout, main.client_body_timeout, main.send_timeout) == (60.0, 60.0, 60.0)
    assert (main.keepalive_timeout, main.keepalive_requests) == (75.0, 1000)
    assert (main.server_header, main.pass_server_header) == (b"fastproxy", False)
    log = runtime.access_log
    assert (log.path, log.format, log.buffer_size, log.flush_interval) == ("stdout", "combined", 65536, 1.0)
    assert runtime.admin is None
    assert runtime.listeners[0].backlog == 511
    assert runtime.upstreams == ()
    (route,) = runtime.routes
    assert (route.name, route.hosts, route.path, route.path_prefix, route.methods) == ("/*", (), None, None, ())
    assert route.handler == Respond(200, b"", ())
    assert (route.max_body_size, route.max_header_size) == (1 << 30, 16 << 10)
    upstream = load(MINIMAL + '[upstreams.u]\nservers = ["localhost:80"]\n').upstreams[0]
    # a name is resolved at load, one server per address
    assert Address("127.0.0.1", 80) in [s.address for s in upstream.servers]
    assert {s.name for s in upstream.servers} == {"localhost:80"}
    assert (upstream.keepalive, upstream.keepalive_timeout, upstream.connect_timeout,
            upstream.read_timeout, upstream.send_timeout) == (32, 60.0, 60.0, 60.0, 60.0)


def test_compiled_values(load, tmp_path):
    runtime = load('''
        [main]
        workers = 3
        log_level = "WARN"
        max_body_size = "0"
        pid_file = "run/fp.pid"
        error_log = "/var/log/fp.log"
        server_header = "edge"
        pass_server_header = true
        [access_log]
        path = "access.log"
        format = "json"
        [admin]
        listen = "[::1]:9901"
        [[listen]]
        address = "*:8080"
        backlog = 100
        [[listen]]
        address = "[0:0::1]:8080"
        [upstreams.api-v2]
        servers = ["LocalHost:9000", "[::1]:9001"]
        keepalive = 0
        [[routes]]
        host = ["API.Example.com", "*.example.org"]
        path_prefix = "/v2/"
        methods = ["get", "POST", "GET"]
        upstream = "api-v2"
        max_body_size = 1024
        max_header_size = "4k"
        [[routes]]
        name = "teapot"
        host = "tea.example.com"
        path = "/brew"
        respond = { status = 418, body = "short and stout\\n", headers = { "X-Tea" = "earl grey" } }
    ''')
    main = runtime.main
    assert (main.workers, main.log_level, main.max_body_size) == (3, "warning", 0)
    assert main.pid_file == str(tmp_path / "run" / "fp.pid")  # relative to the config file
    assert main.error_log == "/var/log/fp.log"
    assert (main.server_header, main.pass_server_header) == (b"edge", True)
    assert (runtime.access_log.path, runtime.access_log.format) == (str(tmp_path / "access.log"), "json")
    assert runtime.admin.listen == Address("::1", 9901)
    assert [(l.address, l.backlog) for l in runtime.listeners] == [
        (Address("0.0.0.0", 8080), 100), (Address("::1", 8080), 511)]
    assert str(runtime.listeners[1].address) == "[::1]:8080"
    (upstream,) = runtime.upstreams
    assert (upstream.name, upstream.keepalive) == ("api-v2", 0)
    assert {s.name for s in upstream.servers} == {"localhost:9000", "[::1]:9001"}  # names lower-cased
    assert Address("127.0.0.1", 9000) in [s.address for s in upstream.servers]
    api, tea = runtime.routes
    assert api.name == "GET,POST api.example.com,*.example.org/v2/*"
    assert api.hosts == (b"api.example.com", b"*.example.org")
    assert api.methods == (b"GET", b"POST")
    assert (api.max_body_size, api.max_header_size) == (1024, 4096)
    assert (tea.name, tea.hosts, tea.path) == ("teapot", (b"tea.example.com",), b"/brew")
    assert tea.handler == Respond(418, b"short and stout\n", ((b"X-Tea", b"earl grey"),))


@pytest.mark.parametrize("match, name", [
    ('path_prefix = "/api/"', "/api/*"),
    ('path = "/"', "/"),
    ('host = "example.com"\npath = "/x"', "example.com/x"),
    ('host = "example.com"', "example.com/*"),
    ('methods = ["DELETE"]\npath = "/x"', "DELETE /x"),
])
def test_derived_route_names(load, match, name):
    text = f'[[listen]]\naddress = "127.0.0.1:1"\n[[routes]]\n{match}\nrespond = {{ status = 204 }}\n'
    assert load(text).routes[0].name == name


@pytest.mark.parametrize("text, seconds", [
    ('"500ms"', 0.5), ('"30s"', 30.0), ('"5m"', 300.0), ('"1h"', 3600.0), ('"1.5s"', 1.5),
    ("45", 45.0), ("0.25", 0.25), ('"7"', 7.0),
])
def test_durations(load, text, seconds):
    assert load(f"[main]\nsend_timeout = {text}\n" + MINIMAL).main.send_timeout == seconds


@pytest.mark.parametrize("text, size", [
    ('"512"', 512), ('"16k"', 16384), ('"1m"', 1 << 20), ('"1g"', 1 << 30), ('"2K"', 2048), ("100", 100),
])
def test_sizes(load, text, size):
    assert load(f"[main]\nmax_header_size = {text}\n" + MINIMAL).main.max_header_size == size


@pytest.mark.parametrize("key, value, reason", [
    ("shutdown_timeout", '"soon"', '"soon" is not a duration; write e.g. "500ms", "30s", "5m", "1h" or a '
                                   "number of seconds"),
    ("shutdown_timeout", '"30 s"', '"30 s" is not a duration'),
    ("shutdown_timeout", "-1", "must be a finite duration of 0 or more, got -1"),
    ("shutdown_timeout", '"-5s"', 'must be a finite duration of 0 or more, got "-5s"'),
    ("shutdown_timeout", "inf", "must be a finite duration of 0 or more"),
    ("send_timeout", '"0s"', "must be more than 0"),
    ("send_timeout", "true", "expected duration, got boolean true"),
    ("max_body_size", '"1t"', '"1t" is not a size; write e.g. "512", "16k", "1m", "1g" or a number of bytes'),
    ("max_body_size", '"1.5m"', '"1.5m" is not a size'),
    ("max_body_size", "-1", "must be 0 or more, got -1"),
    ("max_body_size", "1.0", "expected size, got float 1.0"),
    ("max_header_size", '"0"', "must be more than 0"),
])
def test_bad_durations_and_sizes(problems, key, value, reason):
    (problem,) = problems(f"[main]\n{key} = {value}\n" + MINIMAL)
    assert problem.startswith(f"main.{key}: {reason}")


@pytest.mark.parametrize("text, expected", [
    ('[main]\nworkers = "many"', 'main.workers: expected integer >= 1 or "auto", got string "many"'),
    ("[main]\nworkers = 0", 'main.workers: expected integer >= 1 or "auto", got integer 0'),
    ('[main]\npass_server_header = "yes"', 'main.pass_server_header: expected boolean, got string "yes"'),
    ("[main]\nkeepalive_requests = 1.5", "main.keepalive_requests: expected integer >= 1, got float 1.5"),
    ("[main]\nerror_log = []", "main.error_log: expected string, got array"),
    ('[main]\nlog_level = "verbose"', 'main.log_level: "verbose" is not one of "debug", "info", "warning" or '
                                      '"error"'),
    ('[access_log]\nformat = "jsno"', 'access_log.format: "jsno" is not one of "combined" or "json" '
                                      "(did you mean 'json'?)"),
    ("main = 1", "main: expected a table [main], got integer 1"),
    ('[admin]\nlisten = "localhost:9901"', 'admin.listen: "localhost" is not an IP address; listen on an IP '
                                           'such as "127.0.0.1" or "[::1]", or "*" for all IPv4 addresses'),
    ('[admin]\nlisten = "::1:9901"', 'admin.listen: an IPv6 address needs brackets: "[::1]:9901"'),
    ('[admin]\nlisten = "127.0.0.1:0"', 'admin.listen: port must be a number from 1 to 65535, got "0"'),
    ('[admin]\nlisten = "127.0.0.1"', 'admin.listen: expected "ip:port", got "127.0.0.1"'),
    ("[admin]", "admin.listen: required key is missing"),
    ('[upstreams.u]\nservers = "127.0.0.1:1"', 'upstreams.u.servers: expected array of "host:port" or server tables, got '
                                               'string "127.0.0.1:1"'),
    ("[upstreams.u]\nservers = []", "upstreams.u.servers: must not be empty"),
    ('[upstreams.u]\nservers = ["b@d:1"]', 'upstreams.u.servers[0]: "b@d" is not a host name or IP address'),
    ('[upstreams."a b"]\nservers = ["127.0.0.1:1"]', "upstreams.\"a b\": name may contain only letters, digits, '_', "
                                             "'-' and '.'"),
    ("[upstreams.u]\nkeepalive = -1\nservers = ['127.0.0.1:1']", "upstreams.u.keepalive: must be an integer >= 0, "
                                                          "got -1"),
    ("[upstreams.u]", "upstreams.u.servers: required key is missing"),
    ("upstreams = 3", "upstreams: expected a table of [upstreams.NAME] tables, got integer 3"),
])
def test_wrong_values(problems, text, expected):
    assert problems(text + "\n" + MINIMAL) == [expected]


def test_unknown_keys(problems):
    found = problems('''
        mian = 1
        [main]
        connect_timeout = "3s"
        [upstreams.app]
        servers = ["127.0.0.1:9000"]
        read_timout = "3s"
        [[listen]]
        address = "127.0.0.1:8080"
        port = 8080
        [[routes]]
        path_prefix = "/"
        upstream = "app"
        [[routes]]
        path = "/x"
        respond = { status = 200, header = {} }
        status = 200
    ''')
    assert found == [
        "mian: unknown section (did you mean 'main'?)",
        "main.connect_timeout: unknown key here (it belongs in [upstreams.NAME])",
        "listen[0].port: unknown key",
        "upstreams.app.read_timout: unknown key (did you mean 'read_timeout'?)",
        "routes[1].status: unknown key here (it belongs in [[routes]].respond)",
        "routes[1].respond.header: unknown key (did you mean 'headers'?)",
    ]


def test_missing_sections(problems):
    assert problems("") == ["listen: at least one [[listen]] is required",
                            "routes: at least one [[routes]] is required"]
    assert problems("listen = []\nroutes = []") == ["listen: at least one [[listen]] is required",
                                                   "routes: at least one [[routes]] is required"]
    assert problems('[listen]\naddress = "127.0.0.1:1"\n[[routes]]\nrespond = {status = 200}') == [
        "listen: expected an array of tables [[listen]], got table"]


def test_routes(problems):
    listen = '[[listen]]\naddress = "127.0.0.1:8080"\n[upstreams.app]\nservers = ["127.0.0.1:9000"]\n'
    found = problems(listen + '''
        [[routes]]
        path = "api"
        upstream = "ap"
        [[routes]]
        path_prefix = "/a?b"
        host = ["example.com:80", "*"]
        methods = ["GET", "BAD METHOD"]
        upstream = "other"
        [[routes]]
        path = "/x"
        path_prefix = "/x/"
        upstream = "app"
        respond = { status = 200 }
        [[routes]]
        path = "/y"
        [[routes]]
        path = "/w"
        respond = { status = 600, headers = { "Content-Length" = "1", "Bad Name" = "x", "X-A" = 1, "X-B" = "a\\nb" } }
        [[routes]]
        path = "/z"
        respond = { status = 304, body = "x" }
        [[routes]]
        methods = []
        respond = { body = "x" }
    ''')
    assert found == [
        'routes[0].path: "api" must start with "/"',
        'routes[1].host[0]: "example.com:80" must not include a port (the Host header is matched without it)',
        "routes[1].host[1]: \"*\" is not a host name (letters, digits, '-' and '.', optionally starting with '*.')",
        "routes[1].path_prefix: \"/a?b\" must not contain '?' or '#' (routes match the path only)",
        'routes[1].methods[1]: "BAD METHOD" is not an HTTP method',
        "routes[4].respond.status: must be an integer 100..599, got 600",
        "routes[4].respond.headers.Content-Length: Content-Length is set by fastproxy itself",
        'routes[4].respond.headers."Bad Name": "Bad Name" is not a valid header name',
        "routes[4].respond.headers.X-A: expected string, got integer 1",
        "routes[4].respond.headers.X-B: must not contain control characters other than tab",
        "routes[6].methods: must not be empty",
        "routes[6].respond.status: required key is missing",
        "routes[0].upstream: unknown upstream 'ap' (did you mean 'app'?)",
        "routes[1].upstream: unknown upstream 'other' (defined: app)",
        "routes[2]: set at most one of 'path' and 'path_prefix'",
        "routes[2]: set exactly one of 'upstream', 'respond' and 'static' (several are set: upstream, respond)",
        "routes[3]: set exactly one of 'upstream', 'respond' and 'static'",
        "routes[5].respond.body: a 304 response cannot have a body",
    ]
    assert problems(MINIMAL + '[[routes]]\npath = "/a"\nupstream = "app"') == [
        "routes[1].upstream: unknown upstream 'app' (no [upstreams.NAME] is defined)"]


def test_respond_headers_refuse_what_fastproxy_writes_on_every_response(problems):
    """A local answer's Server, Date or X-Request-ID would go out next to fastproxy's own."""
    assert problems(MINIMAL + '[[routes]]\npath = "/a"\nrespond = { status = 200, headers = '
                    '{ Server = "x", date = "y", "X-Request-ID" = "z", "X-Ok" = "1" } }') == [
        "routes[1].respond.headers.Server: cannot be set: main.server_header sets it "
        "(main.pass_server_header keeps the upstream's)",
        "routes[1].respond.headers.date: cannot be set: fastproxy passes the upstream's Date, or adds one",
        "routes[1].respond.headers.X-Request-ID: cannot be set: fastproxy sets it (the request id of logs "
        "and error bodies)"]


def test_duplicate_names(problems):
    found = problems('''
        [admin]
        listen = "127.0.0.1:8080"
        [[listen]]
        address = "127.0.0.1:8080"
        [[listen]]
        address = "[::1]:8080"
        [[listen]]
        address = "*:8080"
        [[listen]]
        address = "127.0.0.1:8080"
        [[routes]]
        path_prefix = "/api/"
        respond = { status = 200 }
        [[routes]]
        path_prefix = "/api/"
        respond = { status = 200 }
        [[routes]]
        name = "/api/*"
        respond = { status = 200 }
        [[routes]]
        name = "mine"
        respond = { status = 200 }
        [[routes]]
        name = "mine"
        respond = { status = 200 }
    ''')
    assert found == [
        "listen[2].address: 0.0.0.0:8080 overlaps listen[0].address (127.0.0.1:8080)",
        "listen[3].address: 127.0.0.1:8080 duplicates listen[0].address (127.0.0.1:8080)",
        "admin.listen: 127.0.0.1:8080 duplicates listen[0].address (127.0.0.1:8080)",
        "routes[1]: its derived name '/api/*' is already used by routes[0]; give one of them a 'name'",
        "routes[2].name: '/api/*' is already used by routes[0]",
        "routes[4].name: 'mine' is already used by routes[3]",
    ]


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[main]\nworkers = 2\nlog_level = "info\n')
    with pytest.raises(ConfigError) as caught:
        load_runtime(str(path))
    (problem,) = caught.value.problems
    assert (problem.file, problem.key_path, problem.line) == (str(path), "", 3)
    assert problem.column is not None
    assert re.fullmatch(rf"{re.escape(str(path))}: line 3, column \d+: invalid TOML: .+", str(problem))


def test_unreadable_file(tmp_path):
    for path in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as caught:
            load_runtime(str(path))
        (problem,) = caught.value.problems
        assert problem.file == str(path) and problem.reason.startswith("cannot read: ")
    (tmp_path / "latin1.toml").write_bytes(b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_runtime(str(tmp_path / "latin1.toml"))


def test_error_text(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('[main]\nworkers = "x"\nlog_level = 1\n' + MINIMAL)
    with pytest.raises(FastproxyError) as caught:
        load_runtime(str(path))
    assert isinstance(caught.value, ConfigError)
    assert str(caught.value) == (f'{path}: main.workers: expected integer >= 1 or "auto", got string "x"\n'
                                 f'{path}: main.log_level: expected "debug", "info", "warning" or "error", '
                                 f"got integer 1")
    assert str(Problem("f.toml", "routes[1].respond.status", "bad")) == "f.toml: routes[1].respond.status: bad"


def test_docs_cover_every_key():
    docs = (REPO / "docs" / "config.md").read_text()
    for section in all_sections():
        heading = f"### `{section.title}`"
        assert heading in docs, f"docs/config.md has no {heading}"
        table = docs.split(heading, 1)[1].split("\n### ", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
        assert documented == [key.name for key in section.keys], f"keys of {section.title} in docs/config.md"
    begin, end = "<!-- BEGIN keys: generated by fastproxy.config.schema.reference() -->\n", "<!-- END keys -->"
    assert docs.split(begin, 1)[1].split(end, 1)[0] == reference(), (
        "docs/config.md is out of date: paste the output of fastproxy.config.schema.reference() between the "
        "markers")


def test_import_needs_no_extension():
    code = "import sys, fastproxy.config; assert 'fastproxy._core' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
