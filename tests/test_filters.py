"""The phase layout every route compiles to, the run order of filters within it, and the
built-in filters pinned."""
import dataclasses

import pytest

from fastproxy.config import load_runtime
from fastproxy.filters.base import Filter, Phase, compile_phases
from fastproxy.filters.headers import REQUEST_SECTION, RequestHeaders, compile_transform
from fastproxy.filters.registry import FILTERS, FilterType


def make(name, priority, *phases):
    f = Filter()
    f.name, f.priority, f.phases = name, priority, frozenset(phases)
    return f


def test_route_without_filters_has_one_empty_tuple_per_phase(tmp_path):
    conf = tmp_path / "f.toml"
    conf.write_text('[[listen]]\naddress = "127.0.0.1:8080"\n'
                    '[[routes]]\npath = "/"\nrespond = { status = 204 }\n')
    (route,) = load_runtime(str(conf)).routes
    assert route.phases == ((),) * len(Phase)


def test_request_phases_run_by_priority_and_response_phases_in_reverse():
    auth = make("auth", 1000, Phase.REQUEST_HEADERS, Phase.LOG)
    limit = make("ratelimit", 900, Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS)
    gzip = make("compress", 100, Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY)
    phases = compile_phases([gzip, auth, limit])
    assert [f.name for f in phases[Phase.REQUEST_HEADERS]] == ["auth", "ratelimit"]
    assert [f.name for f in phases[Phase.RESPONSE_HEADERS]] == ["compress", "ratelimit"]
    assert [f.name for f in phases[Phase.RESPONSE_BODY]] == ["compress"]
    assert [f.name for f in phases[Phase.LOG]] == ["auth"]
    assert phases[Phase.ACCEPT] == () and phases[Phase.UPSTREAM] == ()


def test_builtin_filters_pinned():
    """The built-ins, in registry order, with what decides where they run. A change here
    changes what every configuration using them does: make it on purpose."""
    assert [(t.config.name, t.config.priority, sorted(t.config.phases), t.config.runtime, t.config.upstream_only)
            for t in FILTERS] == [
        ("request_headers", 100, [Phase.REQUEST_HEADERS], "request_headers", True),
        ("response_headers", 2000, [Phase.RESPONSE_HEADERS], "response_headers", False),
        ("compress", 1900, [Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY], "compress", False),
        ("mirror", 50, [Phase.REQUEST_BODY, Phase.UPSTREAM, Phase.LOG], "mirror", True),
    ]
    assert [t.config.name for t in FILTERS if t.config.stateful] == ["compress", "mirror"]
    assert [t.config.name for t in FILTERS if t.config.main_default] == ["compress"]


def test_route_with_every_builtin_compiles_them_in_order(tmp_path):
    conf = tmp_path / "f.toml"
    conf.write_text('[[listen]]\naddress = "127.0.0.1:8080"\n[upstreams.app]\nservers = ["127.0.0.1:9"]\n'
                    '[[routes]]\npath_prefix = "/"\nupstream = "app"\n'
                    'response_headers = { set = { X-Frame-Options = "DENY" } }\n'
                    'request_headers = { remove = ["Cookie"], add = { Via = ["a", "b"] } }\n'
                    'compress = { encodings = ["gzip"] }\n')
    (route,) = load_runtime(str(conf)).routes
    request, response = route.phases[Phase.REQUEST_HEADERS], route.phases[Phase.RESPONSE_HEADERS]
    assert [f.name for f in request] == ["compress", "request_headers"]
    assert [f.name for f in response] == ["compress", "response_headers"]
    assert [f.name for f in route.phases[Phase.RESPONSE_BODY]] == ["compress"]
    assert (request[1].set, request[1].add, request[1].remove) == ((), ((b"Via", b"a"), (b"Via", b"b")), (b"Cookie",))
    assert response[1].set == ((b"X-Frame-Options", b"DENY"),)
    assert all(route.phases[p] == () for p in Phase
               if p not in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY))


def test_every_builtin_has_its_runtime_class_in_the_core():
    from fastproxy import _core  # not at the top: the config half must import without it
    assert sorted(t.config.runtime for t in FILTERS) == sorted(_core.FILTER_CLASSES)


def test_every_handler_runs_in_the_core_and_has_its_key_in_routes(tmp_path):
    """A handler type is one registry entry: its key reaches [[routes]] (and the docs), and
    its compiled handler names a runtime the core has."""
    from fastproxy import _core
    from fastproxy.config import handlers, schema
    routes = next(s for s in schema.sections() if s.name == "routes")
    assert [h.key for h in handlers.HANDLERS] == [k for k in routes.keys if k in handlers.route_keys()]
    conf = tmp_path / "h.toml"
    conf.write_text('[[listen]]\naddress = "127.0.0.1:1"\n[upstreams.app]\nservers = ["127.0.0.1:2"]\n'
                    '[[routes]]\npath = "/a"\nupstream = "app"\n'
                    '[[routes]]\npath = "/b"\nrespond = { status = 200 }\n')
    runtimes = {route.handler.runtime for route in load_runtime(str(conf)).routes}
    assert runtimes == {"proxy", "respond"} and runtimes - {"proxy"} <= set(_core.HANDLER_CLASSES)


def test_a_filter_type_must_hook_phases_the_core_runs():
    @dataclasses.dataclass(frozen=True)
    class BodyFilter(RequestHeaders):
        phases = frozenset({Phase.ACCEPT})  # not run yet
    with pytest.raises(TypeError, match="ACCEPT"):
        FilterType(BodyFilter, REQUEST_SECTION, compile_transform)
