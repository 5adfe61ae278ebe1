"""Response compression (`compress`) through the real proxy and a real origin: negotiation,
each coding decoded with the real decoders, every framing, the responses never compressed,
the header edits, streaming piece by piece, a large body in bounded memory, and the config."""
from __future__ import annotations

import gzip
import json
import threading
import zlib

import brotli
import pytest
import zstandard

from harness.client import RawClient, build_request, fetch
from harness.origin import Origin, OriginConn, Request
from harness.proxy import RssSampler, respond, upstream

# compressible, and not a repetition of one short line: ~20 KiB of JSON
DOC = json.dumps([{"id": i, "name": f"item {i}", "tags": ["a", "b", str(i % 7)], "ok": i % 3 == 0}
                  for i in range(400)]).encode()
assert len(DOC) > 16 * 1024


def decode(coding: str, body: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(body)
    if coding == "br":
        return brotli.decompress(body)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    assert coding is None, coding
    return body


def doc(conn: OriginConn, req: Request) -> None:
    """DOC (or its first n bytes), with the headers and framing the query asks for."""
    q = req.query
    status = int(q.get("status", "200"))
    body = DOC[:int(q["n"])] if "n" in q else DOC
    headers = [("Content-Type", q.get("type", "application/json"))]
    for key, name in (("vary", "Vary"), ("cc", "Cache-Control"), ("ce", "Content-Encoding")):
        if key in q:
            headers.append((name, q[key]))
    if "etag" in q:
        headers.append(("ETag", '"v1"' if q["etag"] == "strong" else 'W/"v1"'))
    if status == 206:
        headers.append(("Content-Range", f"bytes 0-{len(body) - 1}/{len(body) * 2}"))
    framing = q.get("framing", "length")
    if framing == "http10":  # an HTTP/1.0 upstream: no length, the body ends when it closes
        conn.keep_alive = False
        conn.sendall(("\r\n".join([f"HTTP/1.0 {status} X"] + [f"{k}: {v}" for k, v in headers])
                      + "\r\n\r\n").encode() + body)
        return
    if req.method == "HEAD" or status in (204, 304):
        lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
        if req.method == "HEAD":
            lines.append(f"Content-Length: {len(body)}")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return
    conn.respond(status, body, headers, framing=framing)


@pytest.fixture(scope="module")
def origin():
    with Origin("compress-origin") as o:
        o.handlers["doc"] = doc
        yield o


ROUTES = [
    {"name": "plain", "path_prefix": "/plain/", "upstream": "origin"},
    {"name": "all", "path_prefix": "/all/", "upstream": "origin",
     "compress": {"encodings": ["zstd", "br", "gzip"], "min_length": "1k"}},
    {"name": "gz", "path_prefix": "/gz/", "upstream": "origin", "compress": {"encodings": ["gzip", "zstd"]}},
    {"name": "local", "path": "/local", "compress": {"encodings": ["gzip", "br", "zstd"]},
     "respond": respond(200, DOC.decode(), {"Content-Type": "text/plain; charset=utf-8", "ETag": '"l1"'})},
    {"name": "local-small", "path": "/local-small", "compress": {},
     "respond": respond(200, "tiny\n", {"Content-Type": "text/plain"})},
    {"name": "edited", "path_prefix": "/edited/", "upstream": "origin", "compress": {},
     "response_headers": {"remove": ["Vary"]}},
]


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, origin):
    return module_proxy_factory({
        "main": {"workers": 1},
        "upstreams": {"origin": upstream(origin)},
        "routes": ROUTES,
    })


def get(proxy, target: str, accept=None, method: str = "GET", headers=(), version: str = "HTTP/1.1"):
    hdrs = list(headers)
    if accept is not None:
        hdrs.append(("Accept-Encoding", accept))
    with RawClient(proxy.port) as c:
        c.send(build_request(method, target, hdrs, version=version))
        return c.read_response(method)


# -- negotiation ------------------------------------------------------------------------------

NEGOTIATION = [
    # Accept-Encoding, the route's codings in order, what the client gets (None: identity)
    (None, "all", None),
    ("", "all", None),
    ("gzip", "all", "gzip"),
    ("gzip, br", "all", "br"),  # equal weights: the configured order (zstd, br, gzip)
    ("gzip, br, zstd", "all", "zstd"),
    ("GZIP;Q=1, br;q=0.5", "all", "gzip"),  # case-insensitive; the client's weights first
    ("br;q=0.9, gzip;q=0.91", "all", "gzip"),
    ("zstd;q=0, gzip;q=0.1", "all", "gzip"),  # q=0: not acceptable
    ("zstd;q=0", "all", None),
    ("*", "all", "zstd"),
    ("*;q=0.5, gzip;q=0.6", "all", "gzip"),
    ("*;q=0.5, zstd;q=0", "all", "br"),
    ("compress, deflate, x-unknown", "all", None),  # unknown codings ignored
    ("x-gzip", "all", "gzip"),
    ("gzip;q=0.5, identity", "all", None),  # identity weighs more
    ("gzip;q=1.000, identity;q=1", "all", "gzip"),  # a tie goes to compression
    ("gzip;q=2, br;q=abc", "all", None),  # malformed weights: the entry is ignored
    ("gzip ; q = 0.8 , br ; level=1", "all", "br"),  # spaces, and a parameter that is not q
    ("br", "gz", None),  # not offered on that route
    ("br, zstd", "gz", "zstd"),
    ("gzip, zstd", "gz", "gzip"),
]


@pytest.mark.parametrize("accept,route,expected", NEGOTIATION)
def test_negotiation(proxy, accept, route, expected):
    r = get(proxy, f"/{route}/doc", accept)
    assert r.status == 200, r
    assert r.header("content-encoding") == expected, (accept, r)
    assert decode(expected, r.body) == DOC


@pytest.mark.parametrize("accept", ["identity;q=0", "*;q=0", "br;q=0.5, identity;q=0", "x-unknown, identity;q=0"])
def test_nothing_acceptable_left_is_406(proxy, origin, accept):
    before = len(origin.find_requests(lambda req: req.path == "/gz/doc"))
    r = get(proxy, "/gz/doc", accept)
    assert r.status == 406, r
    assert r.header("content-encoding") is None and b"not acceptable" in r.body, r
    assert len(origin.find_requests(lambda req: req.path == "/gz/doc")) == before  # no upstream request


def test_identity_refused_but_a_coding_left_is_compressed(proxy):
    r = get(proxy, "/gz/doc", "gzip;q=0.3, identity;q=0")
    assert r.status == 200 and r.header("content-encoding") == "gzip", r
    assert decode("gzip", r.body) == DOC


# -- every coding, every framing -------------------------------------------------------------

@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
@pytest.mark.parametrize("framing", ["length", "chunked", "close", "http10"])
def test_each_coding_decodes_to_the_origin_bytes(proxy, coding, framing):
    r = get(proxy, f"/all/doc?framing={framing}", coding)
    assert r.status == 200 and r.header("content-encoding") == coding, r
    assert r.framing == "chunked" and r.header("content-length") is None, r
    assert decode(coding, r.body) == DOC
    assert len(r.body) < len(DOC) // 3


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_http10_client_gets_the_compressed_body_close_delimited(proxy, coding):
    r = get(proxy, "/all/doc", coding, version="HTTP/1.0")
    assert r.status == 200 and r.header("content-encoding") == coding, r
    assert r.framing == "close" and r.header("connection") == "close", r
    assert decode(coding, r.body) == DOC


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_local_answer_is_compressed_with_its_length(proxy, coding):
    r = get(proxy, "/local", coding)
    assert r.status == 200 and r.header("content-encoding") == coding, r
    assert r.framing == "length" and int(r.header("content-length")) == len(r.body) < len(DOC), r
    assert decode(coding, r.body) == DOC
    assert r.header("etag") == 'W/"l1"' and r.header("vary") == "Accept-Encoding", r


def test_local_answer_below_min_length_and_head_are_sent_as_they_are(proxy):
    r = get(proxy, "/local-small", "br")
    assert r.status == 200 and r.header("content-encoding") is None and r.body == b"tiny\n", r
    r = get(proxy, "/local", "gzip", method="HEAD")
    assert r.status == 200 and r.header("content-encoding") is None, r
    assert r.header("content-length") == str(len(DOC)), r


# -- never compressed ------------------------------------------------------------------------

@pytest.mark.parametrize("query,method,headers", [
    ("ce=gzip", "GET", ()),  # already encoded
    ("ce=identity", "GET", ()),
    ("cc=public,%20no-transform", "GET", ()),
    ("cc=No-Transform", "GET", ()),
    ("", "HEAD", ()),
    ("status=204", "GET", ()),
    ("status=304", "GET", ()),
    ("status=206", "GET", ()),
    ("", "GET", (("Range", "bytes=0-99"),)),  # a response to a Range request
    ("n=1000", "GET", ()),  # below min_length (1k)
    ("type=image/png", "GET", ()),
    ("type=application/jsonx", "GET", ()),
])
def test_never_compressed(proxy, query, method, headers):
    r = get(proxy, f"/all/doc?{query}", "gzip, br, zstd", method=method, headers=headers)
    # the origin's answer, not an error page without any Content-Encoding either
    assert r.status == (int(query[len("status="):]) if query.startswith("status=") else 200), r
    assert r.header("content-encoding") in (None, "gzip", "identity"), r
    assert r.header("content-encoding") == {"ce=gzip": "gzip", "ce=identity": "identity"}.get(query), r
    if method == "GET" and r.status not in (204, 304):
        expected = DOC[:1000] if query == "n=1000" else DOC
        assert r.body == expected and r.header("content-length") == str(len(expected)), r


def test_types_with_parameters_and_wildcards(proxy):
    for ctype, compressed in (("text/html;%20charset=utf-8", True), ("TEXT/CSS", True),
                              ("application/json;charset=utf-8", True), ("text", False)):
        r = get(proxy, f"/all/doc?type={ctype}", "gzip")
        assert (r.header("content-encoding") == "gzip") == compressed, (ctype, r)
        assert decode(r.header("content-encoding"), r.body) == DOC


# -- header edits ----------------------------------------------------------------------------

def test_vary_is_added_or_merged(proxy):
    r = get(proxy, "/all/doc", "gzip")
    assert r.header_all("vary") == ["Accept-Encoding"], r
    r = get(proxy, "/all/doc?vary=Origin", "gzip")
    assert r.header_all("vary") == ["Origin, Accept-Encoding"], r
    r = get(proxy, "/all/doc?vary=accept-encoding", "gzip")
    assert r.header_all("vary") == ["accept-encoding"], r
    r = get(proxy, "/all/doc?vary=*", "gzip")
    assert r.header_all("vary") == ["*"], r
    # not compressed for this client, but it would be for another: caches must know
    r = get(proxy, "/all/doc?vary=Origin")
    assert r.header("content-encoding") is None and r.header_all("vary") == ["Origin, Accept-Encoding"], r
    # never compressible: Vary untouched
    r = get(proxy, "/all/doc?type=image/png&vary=Origin", "gzip")
    assert r.header_all("vary") == ["Origin"], r


def test_strong_etag_turns_weak_and_accept_ranges_goes(proxy):
    r = get(proxy, "/all/doc?etag=strong", "br")
    assert r.header("content-encoding") == "br" and r.header_all("etag") == ['W/"v1"'], r
    r = get(proxy, "/all/doc?etag=weak", "br")
    assert r.header_all("etag") == ['W/"v1"'], r
    r = get(proxy, "/all/doc?etag=strong")
    assert r.header_all("etag") == ['"v1"'], r


def test_response_headers_keep_the_last_word(proxy):
    r = get(proxy, "/edited/doc?framing=chunked", "br")
    assert r.header("content-encoding") == "br" and r.header("vary") is None, r
    assert decode("br", r.body) == DOC


# -- [main] default --------------------------------------------------------------------------

def test_main_default_is_inherited_replaced_or_turned_off(make_proxy, origin):
    p = make_proxy({"main": {"compress": {"encodings": ["br"], "min_length": 10}},
                    "upstreams": {"origin": upstream(origin)},
                    "routes": [{"path_prefix": "/inherit/", "upstream": "origin"},
                               {"path_prefix": "/own/", "upstream": "origin", "compress": {"encodings": ["gzip"]}},
                               {"path_prefix": "/off/", "upstream": "origin", "compress": False}]})
    r = get(p, "/inherit/doc", "gzip, br, zstd")
    assert r.header("content-encoding") == "br", r  # [main] offers only br
    assert decode("br", r.body) == DOC
    r = get(p, "/own/doc", "gzip, br, zstd")
    assert r.header("content-encoding") == "gzip", r
    r = get(p, "/off/doc", "gzip, br, zstd")
    assert r.header("content-encoding") is None and r.body == DOC and r.header("vary") is None, r


# -- streaming -------------------------------------------------------------------------------

def test_each_piece_reaches_the_client_compressed_before_the_next_is_sent(make_proxy, make_origin):
    """The origin sends one event, then waits until the test has decoded it from what the
    client received before it sends the next: a proxy holding compressed bytes back hangs
    this test (bounded waits) instead of passing it."""
    events = [b"data: %d %s\n\n" % (i, b"x" * (i * 10)) for i in range(5)]
    received = [threading.Event() for _ in events]

    def stream(conn: OriginConn, req: Request) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event, seen in zip(events, received):
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            if not seen.wait(10):
                return
        conn.sendall(b"0\r\n\r\n")

    origin = make_origin("stream")
    origin.handlers["stream"] = stream
    p = make_proxy({"upstreams": {"o": upstream(origin)},
                    "routes": [{"path_prefix": "/", "upstream": "o", "compress": {"min_length": 0}}]})
    for coding in ("zstd", "br", "gzip"):
        decoder = {"gzip": zlib.decompressobj(31), "zstd": zstandard.ZstdDecompressor().decompressobj(),
                   "br": brotli.Decompressor()}[coding]
        feed = decoder.process if coding == "br" else decoder.decompress
        for seen in received:
            seen.clear()
        with RawClient(p.port) as c:
            c.send(build_request("GET", "/stream", [("Accept-Encoding", coding)]))
            r = c.read_head()
            assert r.header("content-encoding") == coding and r.framing == "chunked", r
            pieces = c.iter_body(r)
            for event, seen in zip(events, received):
                text = b""
                while len(text) < len(event):
                    text += feed(next(pieces))
                assert text == event
                seen.set()
            assert feed(b"".join(pieces)) == b""  # the trailer, once the origin ended


def test_large_body_streams_in_bounded_memory(make_proxy, make_origin):
    """8 MiB of compressible text, chunked by the origin, through each coding: it decodes to
    the origin's bytes, and the worker (its codecs made by a first round) does not hold it."""
    line = b"".join(b"%06d the quick brown fox jumps over the lazy dog\n" % i for i in range(1000))
    total = 8 << 20

    def big(conn: OriginConn, req: Request) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while sent < total:
            piece = line[:min(len(line), total - sent)]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        conn.sendall(b"0\r\n\r\n")

    origin = make_origin("big")
    origin.handlers["big"] = big
    p = make_proxy({"main": {"workers": 1}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"path_prefix": "/", "upstream": "o", "compress": {}}]})
    for coding in ("zstd", "br", "gzip"):  # the worker's first codecs and buffers
        fetch(p.port, "GET", "/big", [("Accept-Encoding", coding)], timeout=60)
    sampler = RssSampler(p.worker_pids())
    with sampler:
        for coding in ("zstd", "br", "gzip"):
            with RawClient(p.port, timeout=60) as c:
                c.send(build_request("GET", "/big", [("Accept-Encoding", coding)]))
                r = c.read_head()
                assert r.header("content-encoding") == coding, r
                decoder = {"gzip": zlib.decompressobj(31), "zstd": zstandard.ZstdDecompressor().decompressobj(),
                           "br": brotli.Decompressor()}[coding]
                feed = decoder.process if coding == "br" else decoder.decompress
                n, crc = 0, 0
                for piece in c.iter_body(r):
                    text = feed(piece)
                    n += len(text)
                    crc = zlib.crc32(text, crc)
                expected = (line * (total // len(line) + 1))[:total]
                assert (n, crc) == (total, zlib.crc32(expected)), coding
    # a worker that held the body would grow by its 8 MiB; one that streams, by next to nothing
    assert max(sampler.growth().values()) < total // 2 // 1024, sampler.growth()


# -- routes without compress -----------------------------------------------------------------

def test_route_without_compress_is_unchanged_byte_for_byte(proxy):
    with RawClient(proxy.port) as c:
        c.send(build_request("GET", "/plain/doc?etag=strong&vary=Origin", [("Accept-Encoding", "gzip, br, zstd")]))
        r = c.read_head()
        raw = bytes(c.buf)
        while len(raw) < len(DOC):
            c._fill()
            raw = bytes(c.buf)
    assert raw == DOC
    assert [(k, v) for k, v in r.headers if k not in ("Date", "X-Request-ID")] == [
        ("X-Origin", "compress-origin"), ("Content-Type", "application/json"), ("Vary", "Origin"),
        ("ETag", '"v1"'), ("Content-Length", str(len(DOC))), ("Server", "fastproxy")], r


# -- metrics ---------------------------------------------------------------------------------

def test_metrics_count_compressed_responses_and_bytes(make_proxy, origin):
    p = make_proxy({"main": {"workers": 1}, "upstreams": {"o": upstream(origin)},
                    "routes": [{"path_prefix": "/", "upstream": "o", "compress": {}}]})
    sizes = {}
    for coding in ("gzip", "gzip", "zstd"):
        r = get(p, "/doc", coding)
        sizes.setdefault(coding, []).append(len(r.body))
    get(p, "/doc")  # not compressed: not counted
    text = p.metrics()
    values = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("fastproxy_compressed_")}
    assert values['fastproxy_compressed_responses_total{encoding="gzip"}'] == 2, text
    assert values['fastproxy_compressed_responses_total{encoding="zstd"}'] == 1, text
    assert values['fastproxy_compressed_responses_total{encoding="br"}'] == 0, text
    assert values['fastproxy_compressed_bytes_in_total{encoding="gzip"}'] == 2 * len(DOC), text
    # chunk framing is not counted, only the compressed body
    assert values['fastproxy_compressed_bytes_out_total{encoding="gzip"}'] == sum(sizes["gzip"]), text
    assert values['fastproxy_compressed_bytes_out_total{encoding="zstd"}'] == sum(sizes["zstd"]), text


# -- configuration ---------------------------------------------------------------------------

def check(make_proxy, config: dict):
    p = make_proxy({"upstreams": {"app": upstream("127.0.0.1:9")}, **config}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    return out.returncode, [line.split(": ", 1)[1] for line in out.stderr.splitlines()
                            if ": routes[" in line or ": main." in line]


def test_config_errors_name_their_key(make_proxy):
    code, problems = check(make_proxy, {
        "main": {"compress": {"gzip_level": 0}},
        "routes": [{"path_prefix": "/", "upstream": "app",
                    "compress": {"encodings": ["gzip", "lz4", "gzip"], "zstd_level": 23, "br_level": 12,
                                 "types": ["text/*", "text/html; charset=utf-8"], "min_length": "-1",
                                 "level": 5}},
                   {"path": "/t", "upstream": "app", "compress": True}]})
    assert code == 1
    assert problems == [
        "main.compress.gzip_level: must be an integer 1..9, got 0",
        "routes[0].compress.level: unknown key (did you mean 'br_level'?)",
        'routes[0].compress.encodings[1]: "lz4" is not one of "zstd", "br" or "gzip"',
        "routes[0].compress.min_length: must be 0 or more, got -1",
        'routes[0].compress.types[1]: "text/html; charset=utf-8" is not a media type: write "type/subtype" or '
        '"type/*", without parameters',
        "routes[0].compress.zstd_level: must be an integer 1..22, got 23",
        "routes[0].compress.br_level: must be an integer 0..11, got 12",
        "routes[1].compress: true is not a table: write the table, or false to turn off the [main] default",
    ], problems
    code, problems = check(make_proxy, {"routes": [{"path_prefix": "/", "upstream": "app",
                                                    "compress": {"encodings": ["gzip", "zstd", "gzip"]}}]})
    assert code == 1 and problems == ['routes[0].compress.encodings[2]: "gzip" is listed twice'], problems


def test_br_without_brotli_is_refused_with_the_reason(make_proxy, tmp_path, monkeypatch):
    """An interpreter where brotli cannot be imported (a module of that name that fails)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "brotli.py").write_text('raise ImportError("no brotli here")\n')
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    code, problems = check(make_proxy, {"routes": [
        {"path_prefix": "/", "upstream": "app", "compress": {"encodings": ["gzip", "br"]}},
        {"path": "/z", "upstream": "app", "compress": {"encodings": ["zstd", "gzip"]}}]})
    assert code == 1
    assert problems == ['routes[0].compress.encodings[1]: "br" needs the brotli package (pip install brotli), '
                        "which cannot be imported: no brotli here"], problems
