"""The phase layout every route compiles to, and the run order of filters within it."""
from fastproxy.config import load_runtime
from fastproxy.filters.base import Filter, Phase, compile_phases


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
