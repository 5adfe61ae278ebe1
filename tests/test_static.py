"""Static files (`static` handler) through the real proxy, real files in a temporary root:
path mapping and traversal, index and try_files, content types, conditional and range
requests, precompressed siblings, HEAD, keep-alive and pipelining after file responses, a
client leaving mid-file, a 2 GiB file in bounded memory, and the config errors."""
from __future__ import annotations

import gzip
import os
import signal
import socket
import time
from email.utils import formatdate

import pytest
import zstandard

from harness.client import RawClient, build_request, fetch
from harness.proxy import RssSampler, summed_metric

BODY = bytes(range(256)) * 400  # 100 KiB, every byte value
TEXT = ("hello static world\n" * 200).encode()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("static")
    www = base / "www"
    (www / "sub").mkdir(parents=True)
    (www / "spa").mkdir()
    (www / ".git").mkdir()
    (www / "data.bin").write_bytes(BODY)
    (www / "page.html").write_bytes(TEXT)
    (www / "index.html").write_bytes(b"root index\n")
    (www / "sub" / "index.html").write_bytes(b"sub index\n")
    (www / "spa" / "index.html").write_bytes(b"spa shell\n")
    (www / ".env").write_bytes(b"SECRET=1\n")
    (www / ".git" / "config").write_bytes(b"[core]\n")
    (www / "%2e%2e").write_bytes(b"literal name\n")
    (www / "app.wasm").write_bytes(b"\0asm")
    (www / "notes.custom").write_bytes(b"custom\n")
    # precompressed siblings of app.js, not older than it
    js = b"function f() { return 1; }\n" * 100
    (www / "app.js").write_bytes(js)
    (www / "app.js.gz").write_bytes(gzip.compress(js))
    (www / "app.js.zst").write_bytes(zstandard.ZstdCompressor().compress(js))
    # a stale sibling: older than its file, never served
    (www / "old.css").write_bytes(b"body{}\n" * 50)
    (www / "old.css.gz").write_bytes(gzip.compress(b"stale"))
    past = time.time() - 3600
    os.utime(www / "old.css.gz", (past, past))
    (base / "outside.txt").write_bytes(b"outside the root\n")
    os.symlink(base / "outside.txt", www / "escape.txt")
    os.symlink(www / "page.html", www / "inside.html")
    return www


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, root):
    return module_proxy_factory({
        "main": {"workers": 1},
        "routes": [
            {"name": "files", "path_prefix": "/files/", "static": {"root": str(root), "cache_control": "max-age=60"}},
            {"name": "spa", "path_prefix": "/app/",
             "static": {"root": str(root / "spa"), "try_files": ["$uri", "/index.html"]}},
            {"name": "gz", "path_prefix": "/gz/", "static": {"root": str(root)},
             "compress": {"encodings": ["gzip"], "min_length": "100"}},
        ],
        "mime_types": {"custom": "text/x-custom", "wasm": "application/wasm"},
    })


def get(proxy, target, headers=(), method="GET"):
    return fetch(proxy.port, method, target, list(headers))


def test_file_served_with_its_headers(proxy, root):
    r = get(proxy, "/files/data.bin")
    assert r.status == 200 and r.body == BODY, r
    assert r.header("content-length") == str(len(BODY))
    assert r.header("content-type") == "application/octet-stream"
    assert r.header("accept-ranges") == "bytes"
    assert r.header("cache-control") == "max-age=60"
    st = os.stat(root / "data.bin")
    assert r.header("last-modified") == formatdate(int(st.st_mtime), usegmt=True)
    assert r.header("etag") == '"%x-%x"' % (int(st.st_mtime), st.st_size)


@pytest.mark.parametrize("target,media", [
    ("/files/page.html", "text/html; charset=utf-8"),
    ("/files/app.js", "text/javascript; charset=utf-8"),
    ("/files/app.wasm", "application/wasm"),
    ("/files/notes.custom", "text/x-custom; charset=utf-8"),  # from [mime_types]
])
def test_content_types(proxy, target, media):
    r = get(proxy, target)
    assert r.status == 200 and r.header("content-type") == media, r


def test_index_and_directory_redirect(proxy):
    assert get(proxy, "/files/").body == b"root index\n"
    assert get(proxy, "/files/sub/").body == b"sub index\n"
    r = get(proxy, "/files/sub")
    assert r.status == 301 and r.header("location") == "/files/sub/", r


def test_try_files_falls_back_for_a_single_page_app(proxy):
    r = get(proxy, "/app/some/client/route")
    assert r.status == 200 and r.body == b"spa shell\n", r
    assert get(proxy, "/app/index.html").body == b"spa shell\n"


@pytest.mark.parametrize("target", [
    "/files/../outside.txt",
    "/files/%2e%2e/outside.txt",
    "/files/%2E%2E/%2e%2e/outside.txt",
    "/files/%252e%252e/outside.txt",
    "/files/sub/%2f..%2f..%2foutside.txt",
    "/files/..%5coutside.txt",
    "/files/..\\outside.txt",
    "/files/page.html%00.txt",
    "/files/escape.txt",  # a symlink out of the root
    "/files/.env",
    "/files/.git/config",
    "/files/%2eenv",
    "/files/nothing-here",
])
def test_traversal_and_hidden_refused(proxy, target):
    r = get(proxy, target)
    assert r.status in (400, 404), (target, r)
    assert b"outside the root" not in r.body and b"SECRET" not in r.body and b"[core]" not in r.body


def test_double_encoded_dots_are_a_literal_name(proxy):
    # decoded once: "%252e%252e" is the file named "%2e%2e", never ".."
    r = get(proxy, "/files/%252e%252e")
    assert r.status == 200 and r.body == b"literal name\n", r


def test_symlink_inside_the_root_is_followed(proxy):
    assert get(proxy, "/files/inside.html").body == TEXT


def test_head(proxy):
    r = get(proxy, "/files/data.bin", method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == str(len(BODY)), r


def test_post_is_405(proxy):
    r = get(proxy, "/files/data.bin", method="POST")
    assert r.status == 405 and r.header("allow") == "GET, HEAD", r


# -- conditional and range requests ------------------------------------------------------------

def _validators(root):
    st = os.stat(root / "data.bin")
    etag = '"%x-%x"' % (int(st.st_mtime), st.st_size)
    return etag, formatdate(int(st.st_mtime), usegmt=True), formatdate(int(st.st_mtime) - 10, usegmt=True)


N = len(BODY)
CASES = [
    # (headers, with ETAG / LM / EARLIER substituted), status, Content-Range, body slice
    ([("If-None-Match", "ETAG")], 304, None, None),
    ([("If-None-Match", 'W/ETAG')], 304, None, None),  # weak comparison
    ([("If-None-Match", '"other", ETAG')], 304, None, None),
    ([("If-None-Match", "*")], 304, None, None),
    ([("If-None-Match", '"other"')], 200, None, slice(None)),
    ([("If-Modified-Since", "LM")], 304, None, None),
    ([("If-Modified-Since", "EARLIER")], 200, None, slice(None)),
    ([("If-None-Match", '"other"'), ("If-Modified-Since", "LM")], 200, None, slice(None)),  # INM wins
    ([("If-Modified-Since", "not a date")], 200, None, slice(None)),
    ([("If-Match", '"other"')], 412, None, None),
    ([("If-Match", "W/ETAG")], 412, None, None),  # strong comparison
    ([("If-Match", "ETAG")], 200, None, slice(None)),
    ([("If-Unmodified-Since", "EARLIER")], 412, None, None),
    ([("If-Unmodified-Since", "LM")], 200, None, slice(None)),
    ([("Range", "bytes=0-99")], 206, "bytes 0-99/%d" % N, slice(0, 100)),
    ([("Range", "bytes=100-")], 206, "bytes 100-%d/%d" % (N - 1, N), slice(100, None)),
    ([("Range", "bytes=-10")], 206, "bytes %d-%d/%d" % (N - 10, N - 1, N), slice(N - 10, None)),
    ([("Range", "bytes=5-%d" % (N + 100))], 206, "bytes 5-%d/%d" % (N - 1, N), slice(5, None)),
    ([("Range", "bytes=%d-" % N)], 416, "bytes */%d" % N, None),
    ([("Range", "bytes=9-3")], 200, None, slice(None)),  # invalid: ignored
    ([("Range", "items=0-3")], 200, None, slice(None)),
    ([("Range", "bytes=0-9"), ("If-Range", "ETAG")], 206, "bytes 0-9/%d" % N, slice(0, 10)),
    ([("Range", "bytes=0-9"), ("If-Range", '"old"')], 200, None, slice(None)),
    ([("Range", "bytes=0-9"), ("If-Range", "LM")], 206, "bytes 0-9/%d" % N, slice(0, 10)),
    ([("Range", "bytes=0-9"), ("If-Range", "EARLIER")], 200, None, slice(None)),
    ([("Range", "bytes=0-9"), ("If-None-Match", "ETAG")], 304, None, None),
]


@pytest.mark.parametrize("headers,status,content_range,part", CASES)
def test_conditional_and_range_table(proxy, root, headers, status, content_range, part):
    etag, lm, earlier = _validators(root)
    sub = {"ETAG": etag, "W/ETAG": "W/" + etag, "LM": lm, "EARLIER": earlier}
    sent = [(name, sub.get(value, value.replace("ETAG", etag))) for name, value in headers]
    r = get(proxy, "/files/data.bin", sent)
    assert r.status == status, (sent, r)
    assert r.header("content-range") == content_range, r
    if part is not None:
        assert r.body == BODY[part] and r.header("content-length") == str(len(BODY[part])), r
    if status == 304:
        assert r.body == b"" and r.header("etag") == etag and r.header("content-length") is None, r


def test_multiple_ranges_are_multipart_byteranges(proxy):
    r = get(proxy, "/files/data.bin", [("Range", "bytes=0-9, 100-109, -5")])
    assert r.status == 206 and int(r.header("content-length")) == len(r.body), r
    kind, _, boundary = r.header("content-type").partition("; boundary=")
    assert kind == "multipart/byteranges" and boundary, r
    parts = r.body.split(b"--" + boundary.encode())
    assert parts[0] in (b"", b"\r\n") and parts[-1] == b"--\r\n", r.body[:200]
    got = []
    for part in parts[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        assert b"Content-Type: application/octet-stream" in head
        got.append((head.split(b"Content-Range: ")[1].split(b"\r\n")[0], data[:-2] if data.endswith(b"\r\n") else data))
    assert got == [(b"bytes 0-9/%d" % N, BODY[:10]), (b"bytes 100-109/%d" % N, BODY[100:110]),
                   (b"bytes %d-%d/%d" % (N - 5, N - 1, N), BODY[-5:])]


# -- precompressed siblings and compression -----------------------------------------------------

@pytest.mark.parametrize("accept,coding", [
    (None, None), ("gzip", "gzip"), ("zstd", "zstd"), ("gzip, zstd", "zstd"), ("zstd;q=0.5, gzip", "gzip"),
    ("br", None), ("zstd;q=0, gzip;q=0", None), ("gzip;q=0.5, identity", None), ("*", "zstd"),
])
def test_precompressed_variant_chosen_by_accept_encoding(proxy, root, accept, coding):
    js = (root / "app.js").read_bytes()
    r = get(proxy, "/files/app.js", [("Accept-Encoding", accept)] if accept else [])
    assert r.status == 200 and r.header("content-encoding") == coding, r
    assert r.header("vary") == "Accept-Encoding", r
    body = {"gzip": gzip.decompress, "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
            None: lambda b: b}[coding](r.body)
    assert body == js
    if coding:
        st = os.stat(root / ("app.js." + {"gzip": "gz", "zstd": "zst"}[coding]))
        assert r.header("etag") == '"%x-%x"' % (int(st.st_mtime), st.st_size), r


def test_stale_sibling_is_not_served(proxy):
    r = get(proxy, "/files/old.css", [("Accept-Encoding", "gzip")])
    assert r.status == 200 and r.header("content-encoding") is None and r.body == b"body{}\n" * 50, r


def test_compress_applies_to_a_file_without_sibling(proxy):
    r = get(proxy, "/gz/page.html", [("Accept-Encoding", "gzip")])
    assert r.status == 200 and r.header("content-encoding") == "gzip", r
    assert r.framing == "chunked" and gzip.decompress(r.body) == TEXT, r
    r = fetch(proxy.port, "GET", "/gz/page.html", [("Accept-Encoding", "gzip")], version="HTTP/1.0")
    assert r.framing == "close" and gzip.decompress(r.body) == TEXT, r
    r = get(proxy, "/gz/page.html", [("Accept-Encoding", "gzip"), ("Range", "bytes=0-4")])
    assert r.status == 206 and r.body == TEXT[:5] and r.header("content-encoding") is None, r


# -- connections -------------------------------------------------------------------------------

def test_keep_alive_and_pipelining_after_file_responses(proxy):
    reqs = b"".join(build_request("GET", t, [("Host", "x")]) for t in
                    ("/files/data.bin", "/files/page.html", "/files/data.bin"))
    with RawClient(proxy.port) as c:
        c.send(reqs)
        bodies = [c.read_response().body for _ in range(3)]
        assert bodies == [BODY, TEXT, BODY]
        r = c.request("HEAD", "/files/data.bin", [("Host", "x")])
        assert r.status == 200 and r.body == b""
        assert c.request("GET", "/files/page.html", [("Host", "x")]).body == TEXT


def test_http10_client(proxy):
    r = fetch(proxy.port, "GET", "/files/data.bin", [], version="HTTP/1.0")
    assert r.status == 200 and r.body == BODY, r


def test_client_leaving_mid_file_then_next_is_served(make_proxy, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    p = make_proxy({"main": {"workers": 1}, "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})
    worker = p.worker_pids()[0]
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()  # a reset mid-file
    r = fetch(p.port, "GET", "/big.bin", [("Range", "bytes=0-9")])
    assert r.status == 206 and r.body == b"\0" * 10, r

    def open_big():
        return sum(1 for fd in os.listdir(f"/proc/{worker}/fd")
                   if os.path.realpath(f"/proc/{worker}/fd/{fd}") == str(big))
    deadline = time.monotonic() + 10
    while open_big() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_big() <= 1  # the cached descriptor only: none left behind by the cut responses


@pytest.mark.slow
def test_2gib_file_in_bounded_memory(make_proxy, tmp_path):
    big = tmp_path / "huge.bin"
    size = 2 * 1024 ** 3
    with open(big, "wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")
    p = make_proxy({"main": {"workers": 1}, "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})
    with RssSampler(p.worker_pids()) as rss, RawClient(p.port, timeout=60) as c:
        c.send(build_request("GET", "/huge.bin", [("Host", "x")]))
        head = c.read_head()
        assert head.status == 200 and head.header("content-length") == str(size)
        got, last = 0, b""
        for piece in c.iter_body(head):
            got += len(piece)
            last = (last + piece)[-5:]
        assert got == size and last == b"tail!"
    assert max(rss.growth().values()) < 50 * 1024, rss.growth()  # KiB


def test_file_that_shrinks_while_sent_closes_the_connection(make_proxy, tmp_path):
    big = tmp_path / "shrink.bin"
    with open(big, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    p = make_proxy({"main": {"workers": 1}, "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})
    with RawClient(p.port, timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(build_request("GET", "/shrink.bin", [("Host", "x")]))
        head = c.read_head()
        assert head.header("content-length") == str(32 * 1024 * 1024)
        os.truncate(big, 1024)
        got = 0
        with pytest.raises(Exception):
            for piece in c.iter_body(head):
                got += len(piece)
        assert got < 32 * 1024 * 1024
    assert fetch(p.port, "GET", "/shrink.bin", []).status == 200


# -- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("static,problem", [
    ({"root": "/nonexistent/dir"}, ".static.root: /nonexistent/dir does not exist"),
    ({"root": "FILE"}, "is not a directory"),
    ({}, ".static.root: required key is missing"),
    ({"root": "ROOT", "index": ["../x"]}, ".static.index[0]:"),
    ({"root": "ROOT", "try_files": ["=404", "$uri"]}, ".static.try_files[0]: \"=404\" can only be the last"),
    ({"root": "ROOT", "try_files": ["uri"]}, ".static.try_files[0]:"),
    ({"root": "ROOT", "precompressed": ["xz"]}, ".static.precompressed[0]:"),
    ({"root": "ROOT", "follow_symlinks": "maybe"}, ".static.follow_symlinks:"),
])
def test_config_errors(make_proxy, tmp_path, static, problem):
    (tmp_path / "f").write_bytes(b"")
    static = {k: (str(tmp_path) if v == "ROOT" else str(tmp_path / "f") if v == "FILE" else v)
              for k, v in static.items()}
    p = make_proxy({"routes": [{"path_prefix": "/", "static": static}]}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode != 0 and problem in out.stderr + out.stdout, out.stderr


def test_config_error_in_mime_types(make_proxy, tmp_path):
    p = make_proxy({"routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}],
                    "mime_types": {"x": "not a type"}}, start=False)
    p.write_config()
    out = p.run_cli("-t", "-c", str(p.config_path))
    assert out.returncode != 0 and "mime_types.x:" in out.stderr + out.stdout, out.stderr


def test_static_responses_counted_by_status(make_proxy, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a\n")
    p = make_proxy({"main": {"workers": 1}, "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})

    def counts():
        text = p.metrics()
        return [summed_metric(text, "fastproxy_static_responses_total", code=code) for code in ("2xx", "4xx")]
    before = counts()  # the harness's readiness probe was a 404
    for target in ("/a.txt", "/a.txt", "/missing"):
        fetch(p.port, "GET", target, [])
    fetch(p.port, "GET", "/a.txt", [("Range", "bytes=9-")])  # 416
    assert [after - was for after, was in zip(counts(), before)] == [2, 2]


def test_try_files_code_and_follow_symlinks_never(make_proxy, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "real.txt").write_bytes(b"real\n")
    os.symlink(www / "real.txt", www / "link.txt")
    p = make_proxy({"main": {"workers": 1}, "routes": [
        {"path_prefix": "/never/", "static": {"root": str(www), "follow_symlinks": "never"}},
        {"path_prefix": "/spa/", "static": {"root": str(www), "try_files": ["$uri", "=410"]}},
        {"path_prefix": "/exact", "static": {"root": str(www)}},
    ]})
    assert fetch(p.port, "GET", "/never/real.txt", []).body == b"real\n"
    assert fetch(p.port, "GET", "/never/link.txt", []).status == 404
    assert fetch(p.port, "GET", "/spa/real.txt", []).body == b"real\n"
    assert fetch(p.port, "GET", "/spa/nothing", []).status == 410
    assert fetch(p.port, "GET", "/exactreal.txt", []).status == 404  # not under "/exact/"


def test_drain_on_sigquit_finishes_the_file_response(make_proxy, tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom(1024 * 1024) * 16
    big.write_bytes(data)
    p = make_proxy({"main": {"workers": 1, "shutdown_timeout": "5s"},
                    "routes": [{"path_prefix": "/", "static": {"root": str(tmp_path)}}]})
    with RawClient(p.port, timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        c.send(build_request("GET", "/big.bin", [("Host", "x")]))
        head = c.read_head()
        assert head.status == 200
        p.signal(signal.SIGQUIT)  # a graceful stop: the response in flight is finished
        assert b"".join(c.iter_body(head)) == data
    assert p.wait_exit(15) == 0


def test_error_found_in_the_body_replaces_the_file_answer(make_proxy, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"the file\n")
    p = make_proxy({"main": {"workers": 1}, "routes": [
        {"path_prefix": "/", "max_body_size": "1k", "static": {"root": str(tmp_path)}}]})
    body = b"x" * 4096
    r = fetch(p.port, "GET", "/a.txt", [("Transfer-Encoding", "chunked")],
              body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert r.status == 413 and b"the file" not in r.body, r
