"""TLS on listeners (docs/tls.md) against the real fastproxy, with a CA and certificates made at
run time (harness/pki.py) and Python's ssl module as the client: SNI, versions, resumption across
workers, mTLS, certificates swapped on HUP under load, bad certificates refused on HUP and by
`-t`, redirect_https, HSTS, X-Forwarded-Proto, the X-Client-Cert-* headers, metrics, the log."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import ssl
import time
import warnings
from functools import partial

import pytest

from harness.client import RawClient, ServerClosed, TlsClient, fetch
from harness.load import Load
from harness.pki import CA, der_in, serial_in, serial_of
from test_websocket import handshake as ws_handshake
from harness.proxy import free_port, summed_metric, upstream, wait_until

NAMES = {"a": ["a.test"], "b": ["b.test", "www.b.test"], "w": ["*.w.test"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CA(tmp_path_factory.mktemp("pki"))
    certs = {stem: ca.issue(stem, names) for stem, names in NAMES.items()}
    return ca, certs


def client_context(ca, version=None, cert=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca.path))
    context.check_hostname = False  # the certificate served is what the tests look at
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return context


def tls_config(certs, stems=("a", "b", "w"), **tls):
    return {"certificates": [{"cert": str(certs[s][0]), "key": str(certs[s][1])} for s in stems]} | tls


def start(make_proxy, origin, tls, workers=1, main=None, extra_listen=()):
    """A proxy with its plain listener (the harness probes it), a TLS one, and an upstream route."""
    p = make_proxy(start=False)
    p.tls_port = free_port()
    p.write_config({
        "main": {"workers": workers} | (main or {}),
        "access_log": {"format": "json", "flush": "100ms"},
        "listen": [{"address": f"127.0.0.1:{p.port}"}, {"address": f"127.0.0.1:{p.tls_port}", "tls": tls},
                   *extra_listen],
        "upstreams": {"origin": upstream(origin)},
        "routes": [{"name": "api", "path_prefix": "/api/", "upstream": "origin"},
                   {"name": "hello", "path": "/hello", "respond": {"status": 200, "body": "hi\n"}}],
    })
    return p.start()


def handshake(port, context, name=None, session=None, timeout=15):
    """A TLS client that has completed its handshake (TLS 1.3 alerts come with the first read)."""
    return TlsClient(port, context, server_hostname=name, session=session, timeout=timeout)


def served_serial(port, context, name):
    with handshake(port, context, name) as c:
        return serial_of(c.sock.getpeercert(binary_form=True))


def echo_headers(response) -> dict:
    return {k.lower(): v for k, v in response.json()["headers"]}


def test_sni_picks_certificate_by_san_names_and_default(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs))
    context = client_context(ca)
    serial = {stem: serial_in(cert) for stem, (cert, _) in certs.items()}
    assert served_serial(p.tls_port, context, "a.test") == serial["a"]
    assert served_serial(p.tls_port, context, "WWW.B.test") == serial["b"]
    assert served_serial(p.tls_port, context, "x.w.test") == serial["w"]  # the wildcard, one label
    for unknown in ("other.test", "y.x.w.test", "w.test", None):  # a wildcard covers one label only
        assert served_serial(p.tls_port, context, unknown) == serial["a"], unknown
    with handshake(p.tls_port, context, "b.test") as c:
        r = c.request("GET", "/hello", [("Host", "b.test")])
        assert (r.status, r.body) == (200, b"hi\n")
        assert c.sock.selected_alpn_protocol() is None  # the client offered none


def test_rsa_and_ecdsa_certificates_for_the_same_names(make_proxy, origin, pki):
    """The client's algorithms pick: an RSA-only TLS 1.2 suite gets the RSA certificate."""
    ca, certs = pki
    rsa_a = ca.issue("a-rsa2", NAMES["a"], kind="rsa")
    p = start(make_proxy, origin, {"certificates": [{"cert": str(c), "key": str(k)} for c, k in (certs["a"], rsa_a)]})
    for suite, want in (("ECDHE-RSA-AES128-GCM-SHA256", rsa_a), ("ECDHE-ECDSA-AES128-GCM-SHA256", certs["a"])):
        context = client_context(ca, ssl.TLSVersion.TLSv1_2)
        context.set_ciphers(suite)
        assert served_serial(p.tls_port, context, "a.test") == serial_in(want[0]), suite


def test_unknown_sni_reject_fails_the_handshake(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs, unknown_sni="reject"))
    context = client_context(ca)
    for unknown in ("other.test", None):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            handshake(p.tls_port, context, unknown)
    assert served_serial(p.tls_port, context, "a.test") == serial_in(certs["a"][0])
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_tls_handshake_failures_total",
                                     reason="unknown_sni") == 2, 5, message="2 unknown_sni failures")


def test_versions_tls11_refused_12_and_13_negotiated(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is: that is the point
        old = client_context(ca, ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so this client can offer TLS 1.1 at all
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # the server's alert, not a local refusal
        handshake(p.tls_port, old, "a.test")
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        with handshake(p.tls_port, client_context(ca, version), "a.test") as c:
            assert c.sock.version() == name
            assert c.request("GET", "/hello", [("Host", "a.test")]).status == 200
    text = p.metrics()
    assert summed_metric(text, "fastproxy_tls_handshake_failures_total", reason="protocol_version") == 1
    for version in ("TLSv1.2", "TLSv1.3"):
        assert summed_metric(text, "fastproxy_tls_handshakes_total", version=version, resumed="false") == 1

    p13 = start(make_proxy, origin, tls_config(certs, min_version="1.3"))
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        handshake(p13.tls_port, client_context(ca, ssl.TLSVersion.TLSv1_2), "a.test")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_session_resumed_on_either_of_two_workers(make_proxy, origin, pki, version):
    """SO_REUSEPORT spreads the connections over both workers; each resumes the session (the
    ticket keys were made in the master, before fork)."""
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs), workers=2)
    context = client_context(ca, version)
    session, reused, workers = None, [], set()
    for _ in range(40):
        with handshake(p.tls_port, context, "a.test", session) as c:
            r = c.request("GET", "/hello", [("Host", "a.test")])
            assert r.status == 200
            workers.add(r.header("X-Request-ID")[:16])  # the id's first half names the worker
            reused.append(c.sock.session_reused)
            session = c.sock.session  # a TLS 1.3 ticket arrives with the response
    assert reused == [False] + [True] * 39
    assert len(workers) == 2, "all 40 connections went to one worker"
    name = "TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2"
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_tls_handshakes_total", version=name,
                                     resumed="true") == 39, 5, message="39 resumed handshakes counted")


def test_client_verify_required(make_proxy, origin, pki):
    ca, certs = pki
    alice = ca.issue("alice", cn="alice", client=True)
    stranger = CA(ca.dir / "other", "stranger CA").issue("mallory", cn="mallory", client=True)
    p = start(make_proxy, origin, tls_config(certs, client_verify="required", client_ca=str(ca.path)))
    for refused in (client_context(ca), client_context(ca, cert=stranger)):
        with pytest.raises((ssl.SSLError, ConnectionError, ServerClosed)):
            with handshake(p.tls_port, refused, "a.test") as c:  # TLS 1.3: refused after it, client side
                c.request("GET", "/hello", [("Host", "a.test")])
    with handshake(p.tls_port, client_context(ca, cert=alice), "a.test") as c:
        r = c.request("GET", "/api/echo", [("Host", "a.test"), ("X-Client-Cert-Subject", "CN=admin")])
    der = der_in(alice[0])
    assert r.status == 200, r
    seen = [(k.lower(), v) for k, v in r.json()["headers"]]
    assert [v for k, v in seen if k == "x-client-cert-subject"] == ["CN=alice,O=fastproxy tests"]
    assert [v for k, v in seen if k == "x-client-cert-fingerprint"] == [hashlib.sha256(der).hexdigest()]
    text = p.metrics()
    assert summed_metric(text, "fastproxy_tls_handshake_failures_total", reason="no_client_certificate") == 1
    assert summed_metric(text, "fastproxy_tls_handshake_failures_total", reason="bad_client_certificate") == 1


def test_hup_takes_a_new_client_ca(make_proxy, origin, pki, tmp_path):
    """Client certificates are verified against the CAs of the chosen certificate's context,
    which a reload makes anew (the front context, kept for its ticket keys, holds none)."""
    ca, certs = pki
    other = CA(tmp_path / "other", "other CA")
    carol = other.issue("carol", cn="carol", client=True)
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(ca.path.read_bytes())
    p = start(make_proxy, origin, tls_config(certs, client_verify="required", client_ca=str(bundle)))
    with pytest.raises((ssl.SSLError, ConnectionError, ServerClosed)):
        with handshake(p.tls_port, client_context(ca, cert=carol), "a.test") as c:
            c.request("GET", "/hello", [("Host", "a.test")])
    bundle.write_bytes(other.path.read_bytes())
    p.reload()
    with handshake(p.tls_port, client_context(ca, cert=carol), "a.test") as c:
        assert c.request("GET", "/hello", [("Host", "a.test")]).status == 200


def test_client_verify_optional(make_proxy, origin, pki):
    ca, certs = pki
    bob = ca.issue("bob", cn="bob", client=True)
    p = start(make_proxy, origin, tls_config(certs, client_verify="optional", client_ca=str(ca.path)))
    for cert, subject in ((None, []), (bob, ["CN=bob,O=fastproxy tests"])):
        with handshake(p.tls_port, client_context(ca, cert=cert), "a.test") as c:
            r = c.request("GET", "/api/echo", [("Host", "a.test")])
        assert r.status == 200, r
        assert [v for k, v in r.json()["headers"] if k.lower() == "x-client-cert-subject"] == subject


def test_forwarded_proto_hsts_and_client_cert_headers_stripped(make_proxy, origin, pki):
    """X-Forwarded-Proto says https on the TLS listener only; HSTS is added to its answers,
    proxied, local and errors; client-sent X-Client-Cert-* never reach the upstream."""
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs, hsts="max-age=31536000"))
    forged = [("X-Client-Cert-Subject", "CN=admin"), ("x-client-cert-fingerprint", "00")]
    with handshake(p.tls_port, client_context(ca), "a.test") as c:
        proxied = c.request("GET", "/api/echo", [("Host", "a.test")] + forged)
        local = c.request("GET", "/hello", [("Host", "a.test")])
        missing = c.request("GET", "/nowhere", [("Host", "a.test")])
    plain = fetch(p.port, "GET", "/api/echo", [("Host", "a.test")] + forged)
    for r in (proxied, local, missing):
        assert r.header_all("Strict-Transport-Security") == ["max-age=31536000"], r
    assert plain.header("Strict-Transport-Security") is None
    assert echo_headers(proxied)["x-forwarded-proto"] == "https"
    assert echo_headers(plain)["x-forwarded-proto"] == "http"
    for r in (proxied, plain):
        assert not {"x-client-cert-subject", "x-client-cert-fingerprint"} & set(echo_headers(r)), r.json()


def test_redirect_https(make_proxy, origin, pki):
    ca, certs = pki
    ports = free_port(), free_port()
    p = start(make_proxy, origin, tls_config(certs), extra_listen=[
        {"address": f"127.0.0.1:{ports[0]}", "redirect_https": True},
        {"address": f"127.0.0.1:{ports[1]}", "redirect_https": "https://{host}:8443"}])
    r = fetch(ports[0], "GET", "/hello?x=1&y=%20", [("Host", "Example.COM:80")])
    assert (r.status, r.header("Location")) == (308, "https://example.com/hello?x=1&y=%20")
    r = fetch(ports[1], "POST", "/api/echo", [("Host", "example.com")], body=b"data")
    assert (r.status, r.header("Location")) == (308, "https://example.com:8443/api/echo")
    r = fetch(ports[1], "HEAD", "/", [("Host", "[::1]:80")])
    assert (r.status, r.header("Location")) == (308, "https://[::1]:8443/")
    with RawClient(ports[0]) as c:
        c.send(b"GET /a HTTP/1.0\r\n\r\n")
        assert c.read_response().status == 400  # no host to send the client to
    assert fetch(p.port, "GET", "/hello").status == 200  # the other listeners route as before
    text = p.metrics()
    assert summed_metric(text, "fastproxy_requests_total", route=f"redirect_https 127.0.0.1:{ports[0]}",
                         code="3xx") == 1


def test_static_file_over_tls_and_json_log(make_proxy, origin, pki, tmp_path):
    """A file response goes through TLS (never sendfile past it); the JSON access log names the
    TLS version and cipher."""
    ca, certs = pki
    body = bytes(range(256)) * 4096 * 3  # 3 MiB: several reads and pauses
    (tmp_path / "f.bin").write_bytes(body)
    p = make_proxy(start=False)
    p.tls_port = free_port()
    p.write_config({"access_log": {"format": "json", "flush": "100ms"},
                    "listen": [{"address": f"127.0.0.1:{p.port}"},
                               {"address": f"127.0.0.1:{p.tls_port}", "tls": tls_config(certs)}],
                    "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})
    p.start()
    with handshake(p.tls_port, client_context(ca, ssl.TLSVersion.TLSv1_2), "a.test") as c:
        r = c.request("GET", "/f.bin", [("Host", "a.test")])
        cipher = c.sock.cipher()[0]
    assert r.status == 200 and r.body == body

    def logged():
        lines = [json.loads(line) for line in p.access_log.read_text().splitlines()]
        return [line for line in lines if line["uri"] == "/f.bin"]
    line = wait_until(logged, 5, message="the access log line")[0]
    assert (line["tls_protocol"], line["tls_cipher"]) == ("TLSv1.2", cipher)
    plain = [json.loads(x) for x in p.access_log.read_text().splitlines() if "/__harness" in x]
    assert plain and "tls_protocol" not in plain[0]


def test_plain_http_to_a_tls_port_is_answered_400_and_garbage_closed(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs))
    with RawClient(p.tls_port, timeout=5) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.header("Connection"), r.json()["status"]) == (400, "close", 400), r
    with RawClient(p.tls_port, timeout=5) as c:
        c.send(b"\x00" * 64)
        assert c.is_closed()  # OpenSSL has no alert for it: nothing to wait for (else 60 s)
    wait_until(lambda: summed_metric(p.metrics(), "fastproxy_tls_handshake_failures_total",
                                     reason="not_tls") == 2, 5, message="2 not_tls failures")


def test_websocket_over_tls(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs, hsts="max-age=60"))
    with handshake(p.tls_port, client_context(ca), "a.test") as c:
        r = ws_handshake(c, "/api/ws")
        assert r.header("Strict-Transport-Security") == "max-age=60"
        assert c.ws_recv() == (0x1, b"hello")
        payload = bytes(range(256)) * 1000
        c.ws_send(0x2, payload)
        assert c.ws_recv() == (0x2, payload)


def test_bad_request_over_tls_is_answered_and_closed(make_proxy, origin, pki):
    ca, certs = pki
    p = start(make_proxy, origin, tls_config(certs))
    with handshake(p.tls_port, client_context(ca), "a.test") as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert c.read_response().status == 400
        assert c.is_closed()
    assert served_serial(p.tls_port, client_context(ca), "a.test") == serial_in(certs["a"][0])
    assert "Traceback" not in p.error_log.read_text()  # TLS has no half-close to linger with


def _swap(site, cert, key):
    """Replace site.pem and site.key as certbot does: new files renamed over the old ones."""
    for source, target in ((cert, site / "site.pem"), (key, site / "site.key")):
        shutil.copy(source, str(target) + ".new")
        (site / (target.name + ".new")).rename(target)


def site_proxy(make_proxy, origin, ca, tmp_path, stem, workers=1):
    """A proxy serving site.test from files swapped in place; its certificate and a second
    one for the same name."""
    site = tmp_path / "site"
    site.mkdir()
    first, second = ca.issue(f"{stem}-1", ["site.test"]), ca.issue(f"{stem}-2", ["site.test"])
    _swap(site, *first)
    tls = {"certificates": [{"cert": str(site / "site.pem"), "key": str(site / "site.key")}]}
    return start(make_proxy, origin, tls, workers=workers), site, first, second


@pytest.mark.slow
def test_hup_serves_swapped_certificate_under_load_with_no_failure(make_proxy, origin, pki, tmp_path):
    """64 keep-alive TLS connections and 4 clients doing a fresh handshake per request run
    while the certificate files are replaced and HUP reloads: nothing fails, new handshakes get
    the new certificate, and a session from before the reload still resumes after it."""
    ca, _ = pki
    p, site, old, new = site_proxy(make_proxy, origin, ca, tmp_path, "swap", workers=2)
    context = client_context(ca)
    with handshake(p.tls_port, context, "site.test") as c:
        assert c.request("GET", "/hello", [("Host", "site.test")]).status == 200
        before_hup = c.sock.session
    assert served_serial(p.tls_port, context, "site.test") == serial_in(old[0])
    load = Load()

    def exchange(i, c):
        r = c.request("GET", "/hello" if i % 2 else f"/api/echo?client={i}", [("Host", "site.test")])
        return r, r.status == 200

    def fresh():
        with handshake(p.tls_port, context, "site.test", timeout=20) as c:
            return c.request("GET", "/hello", [("Host", "site.test"), ("Connection", "close")])

    load.start(*[(load.keepalive, partial(handshake, p.tls_port, context, "site.test", timeout=20),
                  partial(exchange, i)) for i in range(64)],
               *[(load.fresh, fresh) for _ in range(4)])
    try:
        time.sleep(1)
        gen = p.generation()
        _swap(site, *new)
        p.signal(signal.SIGHUP)
        p.wait_generation(gen, timeout=30, settled=False)
        time.sleep(1)
        p.signal(signal.SIGHUP)  # a second reload under load, with the same files
        p.wait_generation(gen + 1, timeout=30, settled=False)
        time.sleep(1)
    finally:
        load.finish()
    print(f"tls reload: {load.counts}, {len(load.failures)} failures")
    assert not load.failures, f"{len(load.failures)} failures out of {load.counts}; first: {load.failures[:10]}"
    assert load.counts["connections"] > 64 + 10, load.counts  # the fresh clients' handshakes
    assert served_serial(p.tls_port, context, "site.test") == serial_in(new[0])
    with handshake(p.tls_port, context, "site.test", session=before_hup) as c:
        assert c.request("GET", "/hello", [("Host", "site.test")]).status == 200
        assert c.sock.session_reused, "the ticket from before the reloads was not accepted"


def test_hup_with_mismatched_key_keeps_old_certificate(make_proxy, origin, pki, tmp_path):
    ca, _ = pki
    p, site, old, new = site_proxy(make_proxy, origin, ca, tmp_path, "mismatch")
    gen = p.generation()
    _swap(site, new[0], old[1])  # a new certificate, the old key
    p.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in p.error_log.read_text(), 10, message="the reload to fail")
    log = p.error_log.read_text()
    assert "listen[1].tls.certificates[0].key" in log and "is not the key of the certificate" in log, log
    assert p.generation() == gen
    assert served_serial(p.tls_port, client_context(ca), "site.test") == serial_in(old[0])


def test_config_test_reports_every_certificate_problem_with_its_key(make_proxy, pki, tmp_path):
    ca, certs = pki
    expired = ca.issue("expired", ["e.test"], days=-1)
    soon = ca.issue("soon", ["soon.test"], days=3)
    p = make_proxy(start=False)
    pairs = [expired, (certs["a"][0], certs["b"][1]), (tmp_path / "missing.pem", certs["a"][1])]
    p.write_config({"listen": [{"address": f"127.0.0.1:{p.port}"},
                               {"address": f"127.0.0.1:{free_port()}", "redirect_https": True,
                                "tls": {"certificates": [{"cert": str(c), "key": str(k)} for c, k in pairs],
                                        "client_verify": "optional", "ciphers": "NOPE"}},
                               {"address": f"127.0.0.1:{free_port()}", "redirect_https": "http://{host}"}],
                    "routes": [{"respond": {"status": 200}}]})
    result = p.run_cli("-t", "-c", str(p.config_path))
    assert result.returncode == 1, result
    for key, reason in (("listen[1].redirect_https", "a TLS listener cannot also redirect"),
                        ("listen[1].tls.certificates[0].cert", "expired on"),
                        ("listen[1].tls.certificates[1].key", "is not the key of the certificate"),
                        ("listen[1].tls.certificates[2].cert", "cannot read"),
                        ("listen[1].tls.ciphers", "no cipher suite"),
                        ("listen[1].tls.client_ca", "required with"),
                        ("listen[2].redirect_https", "is not")):
        lines = [line for line in result.stderr.splitlines() if f": {key}: " in line]
        assert len(lines) == 1 and reason in lines[0], (key, result.stderr)

    rsa_a = ca.issue("a-rsa", NAMES["a"], kind="rsa")
    p.write_config({"listen": [{"address": f"127.0.0.1:{p.port}"},
                               {"address": f"127.0.0.1:{free_port()}", "tls": {"certificates": [
                                   {"cert": str(c), "key": str(k)} for c, k in (certs["a"], rsa_a, certs["a"])]}}],
                    "routes": [{"respond": {"status": 200}}]})
    result = p.run_cli("-t", "-c", str(p.config_path))
    assert result.returncode == 1 and "listen[1].tls.certificates[2]: a second ECDSA certificate for the same " \
        "names" in result.stderr, result.stderr  # an RSA and an ECDSA one may share names

    p.write_config({"listen": [{"address": f"127.0.0.1:{p.port}"},
                               {"address": f"127.0.0.1:{free_port()}", "tls": {"certificates": [
                                   {"cert": str(c), "key": str(k)} for c, k in (certs["a"], rsa_a, soon)]}}],
                    "routes": [{"respond": {"status": 200}}]})
    result = p.run_cli("-t", "-c", str(p.config_path))
    assert result.returncode == 0, result
    assert f"warning: certificate {soon[0]} (soon.test) expires on" in result.stderr, result.stderr
    assert str(certs["a"][0]) not in result.stderr
