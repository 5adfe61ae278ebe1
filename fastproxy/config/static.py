"""Static files, config half: the `static` route handler's keys, checks and build step
(the runtime half is fastproxy/core/static.pyx; the whole picture: docs/static.md).

Run once per reload in the master: the root is resolved here, names are checked here and
everything the core compares per request is bytes."""
from __future__ import annotations

import os
import re
from typing import Dict

from .runtime import Static
from .schema import (_TOKEN, MAP, OFF, REQUIRED, SOURCE, TABLE, Boolean, Choice, Invalid, Key, Kind, ListOf,
                     Report, Section, String)

# Content types by extension (lower-case, without the dot); `[mime_types]` adds or replaces
# entries. Text types get "; charset=utf-8" (see content_type).
MIME_TYPES: Dict[str, str] = {
    "html": "text/html", "htm": "text/html", "css": "text/css", "txt": "text/plain",
    "csv": "text/csv", "md": "text/markdown", "xml": "text/xml", "js": "text/javascript",
    "mjs": "text/javascript", "json": "application/json", "map": "application/json",
    "webmanifest": "application/manifest+json", "wasm": "application/wasm", "pdf": "application/pdf",
    "zip": "application/zip", "gz": "application/gzip", "zst": "application/zstd",
    "br": "application/octet-stream", "tar": "application/x-tar", "svg": "image/svg+xml",
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
    "webp": "image/webp", "avif": "image/avif", "ico": "image/x-icon", "bmp": "image/bmp",
    "woff": "font/woff", "woff2": "font/woff2", "ttf": "font/ttf", "otf": "font/otf",
    "mp4": "video/mp4", "webm": "video/webm", "mp3": "audio/mpeg", "ogg": "audio/ogg",
    "wav": "audio/wav",
}
DEFAULT_TYPE = "application/octet-stream"
_CHARSET_TYPES = ("text/", "application/json", "application/javascript", "application/manifest+json",
                  "image/svg+xml", "application/xml")
PRECOMPRESSED = {"zst": "zstd", "br": "br", "gz": "gzip"}  # sibling suffix -> its Content-Encoding
_MEDIA_TYPE = re.compile(f"{_TOKEN.pattern}/{_TOKEN.pattern}(\\s*;[\\x20-\\x7e]*)?")


def content_type(media_type: str) -> str:
    """The Content-Type value for a media type: text types say their charset."""
    if ";" not in media_type and media_type.lower().startswith(_CHARSET_TYPES):
        return media_type + "; charset=utf-8"
    return media_type


class FileName(Kind):
    """One file name (an index file): no slash, not "." or "..", no control character."""
    name = "file name"
    types = (str,)

    def convert(self, value):
        if not value or value in (".", "..") or "/" in value or "\\" in value or re.search(r"[\x00-\x1f\x7f]", value):
            raise Invalid(f"{value!r} is not a file name (no '/', '\\', '.', '..' or control characters)")
        return value


class TryFile(Kind):
    """A try_files entry: a path starting with "/" or "$uri" (which stands for the request's
    path), ending with "/" to try a directory's index files; or "=CODE" as the last one."""
    name = 'string: "$uri", "$uri/", "/path" or "=404"'
    types = (str,)

    def convert(self, value):
        if re.fullmatch(r"=[1-5][0-9][0-9]", value):
            return value
        rest = value[4:] if value.startswith("$uri") else value
        if not value.startswith(("$uri", "/")) or "$" in rest or re.search(r"[\x00-\x20\x7f\\]", value) \
                or any(part in (".", "..") for part in value.split("/")):
            raise Invalid(f'{value!r} must be "$uri", "$uri/", a path starting with "/" (no "." or ".." '
                          f'segments, no spaces) or "=CODE"')
        return value


class MimeType(Kind):
    """A media type, type/subtype with optional parameters."""
    name = "media type"
    types = (str,)

    def convert(self, value):
        if not _MEDIA_TYPE.fullmatch(value):
            raise Invalid(f"{value!r} is not a media type (type/subtype)")
        return value


MIME_SECTION = Section("mime_types", "[mime_types]", MAP, OFF, (
    Key("extension", MimeType(), None, "Each key is a file extension (case-insensitive), its value the "
        'content type of the files whose name ends in it: `wasm = "application/wasm"`; text types get '
        "`; charset=utf-8`."),
), "Additions to (or replacements in) the table of content types of static files (docs/static.md).")

SECTION = Section("static", "[[routes]].static", TABLE, OFF, (
    Key("root", String(), REQUIRED, "Directory the files are served from (relative paths are against the "
        "config file's directory); it must exist and be a directory."),
    Key("strip_prefix", Boolean(), True, "`true`: the route's `path_prefix` is taken off the request path "
        "before it is mapped under `root` (`/assets/app.js` on a route for `/assets/` is `root/app.js`)."),
    Key("index", ListOf(FileName(), "array of file names"), ["index.html"], "Files tried, in order, for a "
        "request path ending in `/`; a directory requested without the `/` is redirected (301) to it."),
    Key("try_files", ListOf(TryFile(), "array of paths"), None, 'Paths tried in order when the request\'s own '
        'is not a file, `$uri` standing for it: `["$uri", "$uri/", "/index.html"]` serves a single-page '
        'app; a last `"=404"` answers that status.', "none: only the request's own path"),
    Key("precompressed", ListOf(Choice(*PRECOMPRESSED), 'array of "zst", "br", "gz"'), ["zst", "br", "gz"],
        "Siblings (`app.js.zst`, `.br`, `.gz`) served instead of the file to a client that accepts their "
        "coding, when they are not older than the file; the client's weights choose, then this order."),
    Key("cache_control", String(empty=True), "", "`Cache-Control` value of every response; empty: none."),
    Key("hidden", Boolean(), False, "`true`: serve files and directories whose name starts with `.`; "
        "`false`: 404 (`.git/`, `.env`)."),
    Key("follow_symlinks", Choice("inside_root", "always", "never"), "inside_root", "`inside_root`: a "
        "symbolic link is followed when its target is under `root` (404 otherwise); `always`; `never`: "
        "no path under `root` may go through a link."),
), "Serve files from a directory: `static = { root = \"/srv/www\" }`; see docs/static.md.")


def check(value: dict, where: str, tree: dict, report: Report) -> None:
    root = value.get("root")  # absent: a problem already reported
    if root is not None:
        path = _root_path(root, tree)
        if not os.path.exists(path):
            report(f"{where}.root", f"{path} does not exist")
        elif not os.path.isdir(path):
            report(f"{where}.root", f"{path} is not a directory")
    entries = value.get("try_files") or ()
    for index, entry in enumerate(entries[:-1]):
        if entry.startswith("="):
            report(f"{where}.try_files[{index}]", f'"{entry}" can only be the last entry')


def _root_path(root: str, tree: dict) -> str:
    base = os.path.dirname(os.path.abspath(tree.get(SOURCE) or "."))
    return os.path.realpath(os.path.join(base, root))


def build(value: dict, route: dict, tree: dict) -> Static:
    types = dict(MIME_TYPES)
    types.update({ext.lower(): media for ext, media in (tree.get("mime_types") or {}).items()})
    prefix = route.get("path_prefix") if value["strip_prefix"] else None
    return Static(
        root=_root_path(value["root"], tree).encode(),
        strip_prefix=(prefix.rstrip("/") if prefix else "").encode(),
        index=tuple(name.encode() for name in value["index"]),
        try_files=tuple(entry.encode() for entry in value["try_files"] or ()),
        precompressed=tuple(dict.fromkeys(value["precompressed"] or ())),
        cache_control=value["cache_control"].encode(),
        hidden=value["hidden"],
        follow_symlinks=value["follow_symlinks"],
        mime_types=tuple(sorted((ext.encode(), content_type(media).encode()) for ext, media in types.items())),
        default_type=DEFAULT_TYPE.encode(),
    )
