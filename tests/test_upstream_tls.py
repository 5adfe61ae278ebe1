"""TLS to upstreams (docs/upstream-tls.md) against the real fastproxy and a real TLS origin
(harness/origin.py with `tls=`), with CAs and certificates made at run time (harness/pki.py):
verification by a configured CA, the system store, server_name and the default name, verify =
false, a client certificate, connections kept alive across requests, and the config errors."""
from __future__ import annotations

import socket
import ssl

import pytest

from fastproxy.config import load_runtime
from harness.client import RawClient, build_request, consume_pattern_body, fetch, send_pattern
from harness.origin import pattern_crc
from harness.pki import CA, der_in
from harness.proxy import summed_metric, wait_until
from test_websocket import handshake as ws_handshake

LONG = 8 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA with an origin's certificates and a client's, and another CA nobody configures."""
    directory = tmp_path_factory.mktemp("pki")
    ca, unknown = CA(directory), CA(directory, "unknown CA")
    return {"ca": ca, "origin": ca.issue("origin", ["origin.test"]), "localhost": ca.issue("localhost", ["localhost"]),
            "client": ca.issue("client", cn="proxy client", client=True),
            "unknown": unknown.issue("stranger", ["origin.test"])}


def server_context(cert, client_ca=None, required=False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, cert))
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca.path))
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context


def start(make_proxy, servers, tls=None, workers=1):
    """A proxy whose /api/ goes to an upstream "secure" of these servers (the harness's readiness
    probe stays off it: no upstream error but those a test makes)."""
    upstream = {"servers": servers} | ({"tls": tls} if tls is not None else {})
    return make_proxy({"main": {"workers": workers}, "upstreams": {"secure": upstream},
                       "routes": [{"path_prefix": "/api/", "upstream": "secure"}]})


def https(origin, host="127.0.0.1") -> str:
    return f"https://{host}:{origin.port}"


def error_lines(p, text):
    return [line for line in p.error_log.read_text().splitlines() if text in line]


def test_proxied_over_tls_with_its_ca(make_proxy, make_origin, pki):
    origin = make_origin("tls", tls=server_context(pki["origin"]))
    p = start(make_proxy, [https(origin)], {"ca": str(pki["ca"].path), "server_name": "origin.test"})
    r = fetch(p.port, "POST", "/api/echo", body=b"x" * 1000)
    assert r.status == 200, r
    assert r.json()["origin"] == "tls" and r.json()["body_len"] == 1000
    # long bodies both ways: the upload goes out through the TLS transport's flow control, the
    # download's reads switch to the buffered protocol, over TLS too
    with RawClient(p.port) as c:
        c.send(build_request("POST", "/api/echo", [("Content-Length", str(LONG))]))
        send_pattern(c.sock, LONG)
        echo = c.read_response().json()
        assert (echo["body_len"], echo["body_crc"]) == (LONG, pattern_crc(LONG))
        c.send(build_request("GET", f"/api/bytes?n={LONG}"))
        response = c.read_head()
        assert response.status == 200
        assert consume_pattern_body(c, response) == (LONG, pattern_crc(LONG))
    assert origin.handshakes >= 1 and not origin.handshake_failures


def test_server_name_defaults_to_the_configured_host_name(make_proxy, make_origin, pki):
    """servers = ["https://localhost:PORT"]: verified as "localhost" (the certificate has no IP),
    not as the 127.0.0.1 it resolved to."""
    if {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)} != {"127.0.0.1"}:
        pytest.skip("localhost resolves to more than 127.0.0.1 here")
    origin = make_origin("tls", tls=server_context(pki["localhost"]))
    p = start(make_proxy, [https(origin, "localhost")], {"ca": str(pki["ca"].path)})
    assert fetch(p.port, "GET", "/api/echo").status == 200
    assert origin.handshakes == 1


def test_unknown_ca_refused_with_502_and_logged_unless_configured(make_proxy, make_origin, pki):
    origin = make_origin("stranger", tls=server_context(pki["unknown"]))
    # https:// alone: the system store, which knows no test CA
    p = start(make_proxy, [https(origin)], {"server_name": "origin.test"})
    r = fetch(p.port, "GET", "/api/echo")
    assert r.status == 502, r
    wait_until(lambda: error_lines(p, "certificate verify failed"), 5, message="the failure logged")
    [line] = error_lines(p, 'upstream "secure"')  # logged once, with OpenSSL's reason
    assert "self-signed certificate in certificate chain" in line and "GET /api/echo" in line, line
    assert summed_metric(p.metrics(), "fastproxy_upstream_errors_total", upstream="secure", kind="connect") == 1
    assert not origin.find_requests(lambda req: True)
    wait_until(lambda: origin.handshake_failures, 5, message="the origin to see the handshake fail")

    # its CA configured (this CA and the test CA: the file may hold several), or no verification
    both = pki["ca"].dir / "both.pem"
    both.write_bytes(pki["ca"].path.read_bytes() + (pki["ca"].dir / "unknown-CA.pem").read_bytes())
    for tls in ({"ca": str(both), "server_name": "origin.test"}, {"verify": False}):
        assert fetch(start(make_proxy, [https(origin)], tls).port, "GET", "/api/echo").status == 200, tls


def test_failed_verification_tries_the_next_server(make_proxy, make_origin, pki):
    stranger = make_origin("stranger", tls=server_context(pki["unknown"]))
    good = make_origin("good", tls=server_context(pki["origin"]))
    p = start(make_proxy, [https(stranger), https(good)], {"ca": str(pki["ca"].path), "server_name": "origin.test"})
    for _ in range(4):
        r = fetch(p.port, "GET", "/api/echo")
        assert r.status == 200 and r.json()["origin"] == "good", r
    assert error_lines(p, "certificate verify failed")


def test_server_name_mismatch_refused(make_proxy, make_origin, pki):
    origin = make_origin("tls", tls=server_context(pki["origin"]))
    p = start(make_proxy, [https(origin)], {"ca": str(pki["ca"].path), "server_name": "other.test"})
    assert fetch(p.port, "GET", "/api/echo").status == 502
    wait_until(lambda: error_lines(p, "certificate verify failed"), 5, message="the failure logged")
    assert "Hostname mismatch" in error_lines(p, "certificate verify failed")[0]
    # and by default the IP a server is written as, which the certificate does not name
    p = start(make_proxy, [https(origin)], {"ca": str(pki["ca"].path)})
    assert fetch(p.port, "GET", "/api/echo").status == 502
    wait_until(lambda: error_lines(p, "IP address mismatch"), 5, message="the failure logged")


def test_connections_kept_alive_one_handshake_per_worker(make_proxy, make_origin, pki):
    origin = make_origin("tls", tls=server_context(pki["origin"]))
    p = start(make_proxy, [https(origin)], {"ca": str(pki["ca"].path), "server_name": "origin.test"}, workers=2)
    with RawClient(p.port) as c:  # one client connection: one worker serves it
        for i in range(20):
            r = c.request("GET", f"/api/echo?i={i}")
            assert r.status == 200, r
    assert origin.handshakes == 1 and origin.connections == 1
    assert {req.conn_id for req in origin.find_requests(lambda req: True)} == {1}


def test_stale_pooled_connection_retried_and_websocket_tunnel(make_proxy, make_origin, pki):
    """Pooled TLS connections behave as plain ones: one the origin closed behind the pool's back
    is replaced (the request goes again on a new connection), and a 101 becomes a tunnel."""
    origin = make_origin("tls", close_after_response=True, tls=server_context(pki["origin"]))
    p = start(make_proxy, [https(origin)], {"ca": str(pki["ca"].path), "server_name": "origin.test"})
    with RawClient(p.port) as c:  # first: an upgrade is not sent again on a new connection
        ws_handshake(c, "/api/ws")
        assert c.ws_recv() == (0x1, b"hello")
        payload = bytes(range(256)) * 1000
        c.ws_send(0x2, payload)
        assert c.ws_recv() == (0x2, payload)
    with RawClient(p.port) as c:
        for i in range(5):
            assert c.request("GET", f"/api/echo?i={i}").status == 200, i
    assert origin.handshakes == 6


def test_handshake_within_connect_timeout_and_plain_server_refused(make_proxy, make_origin, pki):
    silent = make_origin("plain")  # reads the ClientHello as the start of a request: never answers
    p = make_proxy({"upstreams": {"secure": {"servers": [https(silent)], "tls": {"verify": False},
                                             "connect_timeout": "1s"}},
                    "routes": [{"path_prefix": "/api/", "upstream": "secure"}]})
    assert fetch(p.port, "GET", "/api/echo").status == 504
    wait_until(lambda: error_lines(p, "connect_timeout (1s) expired"), 5, message="the timeout logged")

    silent.on_accept = lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # plain HTTP
    assert fetch(p.port, "GET", "/api/echo").status == 502
    wait_until(lambda: error_lines(p, "WRONG_VERSION_NUMBER"), 5, message="the failure logged")


def test_client_certificate_presented_when_set(make_proxy, make_origin, pki):
    origin = make_origin("mtls", tls=server_context(pki["origin"], client_ca=pki["ca"]))
    tls = {"ca": str(pki["ca"].path), "server_name": "origin.test"}
    p = start(make_proxy, [https(origin)], tls | {"cert": str(pki["client"][0]), "key": str(pki["client"][1])})
    assert fetch(p.port, "GET", "/api/echo").status == 200
    assert origin.client_certs == [der_in(pki["client"][0])]
    p = start(make_proxy, [https(origin)], tls)
    assert fetch(p.port, "GET", "/api/echo").status == 200
    assert origin.client_certs[1:] == [None]


def test_config_errors_name_their_keys(make_proxy, pki, tmp_path):
    (tmp_path / "not-pem.pem").write_text("not a certificate\n")
    other = pki["ca"].issue("other", ["other.test"])
    cases = {
        "upstreams.a.tls.ca": ({"ca": str(tmp_path / "missing.pem")}, "cannot read"),
        "upstreams.b.tls.ca": ({"ca": str(tmp_path / "not-pem.pem")}, "no PEM certificate"),
        "upstreams.c.tls.key": ({"cert": str(pki["client"][0]), "key": str(other[1])}, "is not the key of"),
        "upstreams.d.tls.key": ({"cert": str(pki["client"][0])}, "required with cert"),
        "upstreams.e.tls.ca": ({"verify": False, "ca": str(pki["ca"].path)}, "nothing is verified"),
        "upstreams.f.tls.server_name": ({"server_name": "bad name"}, "not a host name"),
    }
    upstreams = {key.split(".")[1]: {"servers": ["127.0.0.1:1"], "tls": tls} for key, (tls, _) in cases.items()}
    upstreams |= {"g": {"servers": ["https://127.0.0.1:1", "127.0.0.1:2"]},
                  "h": {"servers": ["http://127.0.0.1:1"], "tls": {}},
                  "i": {"servers": ["ftp://127.0.0.1:1"]}}
    p = make_proxy({"upstreams": upstreams, "routes": [{"path": "/", "upstream": "a"}]}, start=False)
    p.write_config(p.config)
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode != 0
    lines = out.stderr.splitlines()

    def problem(key, text):
        assert any(key in line and text in line for line in lines), (key, text, out.stderr)
    for key, (_, text) in cases.items():
        problem(key, text)
    problem("upstreams.g.servers[1].address", "servers[0] (https://) makes the upstream TLS")
    problem("upstreams.h.servers[0].address", "its tls table makes the upstream TLS")
    problem("upstreams.i.servers[0]", '"ftp://" is not "https://" or "http://"')


def test_compiled_schemes_ports_and_names(tmp_path):
    """What the workers get: https:// and a tls table make every server TLS with the master's
    context, the default ports, and the name each server is verified as."""
    path = tmp_path / "fastproxy.toml"
    path.write_text('''
[[listen]]
address = "127.0.0.1:1"
[upstreams.web]
servers = ["https://127.0.0.1", { address = "https://localhost:8443", weight = 2 }]
[upstreams.named]
servers = ["127.0.0.1:9000"]
tls = { server_name = "API.internal", verify = false }
[upstreams.plain]
servers = ["http://127.0.0.1", "127.0.0.1:81"]
[[routes]]
upstream = "web"
''')
    upstreams = {u.name: u for u in load_runtime(str(path)).upstreams}
    web, named, plain = upstreams["web"], upstreams["named"], upstreams["plain"]
    first, *local = web.servers  # localhost: one server per address it resolves to
    assert (str(first.address), first.tls_name) == ("127.0.0.1:443", "127.0.0.1")
    assert {(s.address.port, s.name, s.tls_name) for s in local} == {(8443, "localhost:8443", "localhost")}
    assert web.tls.verify_mode == ssl.CERT_REQUIRED and web.tls.check_hostname
    assert [s.tls_name for s in named.servers] == ["api.internal"]
    assert named.tls.verify_mode == ssl.CERT_NONE and not named.tls.check_hostname
    assert plain.tls is None and [(str(s.address), s.tls_name) for s in plain.servers] == [
        ("127.0.0.1:80", None), ("127.0.0.1:81", None)]
