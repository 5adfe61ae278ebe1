"""Response compression, config half (runtime half: core/compress.pyx; docs/compression.md).

    compress = { encodings = ["zstd", "br", "gzip"], min_length = 256, types = ["text/*", ...],
                 zstd_level = 3, br_level = 4, gzip_level = 5 }

in a route, or in `[main]` as the default of every route that sets none (`compress = false`
in a route turns that default off). A route's own table replaces the default whole.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from fastproxy.config.schema import _TOKEN, OFF, TABLE, Choice, Integer, Invalid, Key, Kind, ListOf, Section, Size

from .base import Filter, Phase

ENCODINGS = ("zstd", "br", "gzip")  # the codings the core has (CODING_NAMES in core/metrics.pyx)

DEFAULT_TYPES = ["text/*", "application/json", "application/javascript", "application/xml",
                 "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
                 "application/ld+json", "application/manifest+json", "application/problem+json",
                 "application/wasm", "image/svg+xml"]

_MEDIA_RANGE = re.compile(f"{_TOKEN.pattern}/({_TOKEN.pattern}|\\*)")


def brotli_problem() -> Optional[str]:
    """Why `br` cannot be used here, or None when the brotli package imports."""
    try:
        import brotli  # noqa: F401
    except ImportError as error:
        return f'"br" needs the brotli package (pip install brotli), which cannot be imported: {error}'
    return None


class MediaRange(Kind):
    """A media type ("application/json") or all the subtypes of one ("text/*"), lower-cased."""
    name = 'media type ("type/subtype" or "type/*")'
    types = (str,)

    def convert(self, value):
        lower = value.strip().lower()
        if not _MEDIA_RANGE.fullmatch(lower):
            raise Invalid(f'{json.dumps(value)} is not a media type: write "type/subtype" or "type/*", '
                          f"without parameters")
        return lower


@dataclass(frozen=True)
class Compress(Filter):
    encodings: Tuple[str, ...]  # in preference order, each once
    min_length: int  # bytes; a response declaring less is sent as it is
    types: Tuple[bytes, ...]  # lower-case media types; "type/*" for a whole type
    zstd_level: int
    br_level: int
    gzip_level: int

    name = "compress"
    # Response phases run in reverse: below response_headers (2000), whose edits stay the
    # last word on the head, and above any body transform to come, which must see the
    # body before it is compressed.
    priority = 1900
    phases = frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY})
    runtime = "compress"
    stateful = True  # the coding negotiated, then the response's compressor
    main_default = True
    doc = ("Compress responses with zstd, brotli or gzip as the client accepts; see below and "
           "[compression.md](compression.md). `false`: not on this route, whatever `[main]` `compress` says.")


SECTION = Section("compress", "[[routes]].compress", TABLE, OFF, (
    Key("encodings", ListOf(Choice(*ENCODINGS), "array of encodings"), list(ENCODINGS),
        'The codings offered, in the order preferred when the client weighs them equally: `"zstd"`, '
        '`"br"` (needs the brotli package), `"gzip"`.'),
    Key("min_length", Size(zero=True), 256, "Responses whose Content-Length is below this are sent as "
        "they are; a response without Content-Length is compressed."),
    Key("types", ListOf(MediaRange(), "array of media types"), DEFAULT_TYPES,
        'Media types compressed (the Content-Type without its parameters), `"type/*"` for all of a type.'),
    Key("zstd_level", Integer(1, 22), 3, "zstd level."),
    Key("br_level", Integer(0, 11), 4, "brotli quality."),
    Key("gzip_level", Integer(1, 9), 5, "gzip (deflate) level."),
), "Response compression, in a route or in `[main]` (the default of every route without its own "
   "`compress`; a route's table replaces it whole). Negotiated on Accept-Encoding; never applied to an "
   "encoded response, `Cache-Control: no-transform`, HEAD, 1xx, 204, 206, 304 or a `Range` request "
   "(see [compression.md](compression.md)).")


def compile_compress(config, values: dict) -> Compress:
    problems = []
    encodings = values.get("encodings")
    if encodings is not None:
        for index, name in enumerate(encodings):
            if name in encodings[:index]:
                problems.append((f".encodings[{index}]", f'"{name}" is listed twice'))
        if "br" in encodings:
            reason = brotli_problem()
            if reason:
                problems.append((f".encodings[{encodings.index('br')}]", reason))
    if problems:
        raise Invalid(problems=problems)
    if any(values.get(key) is None for key in ("encodings", "min_length", "types", "zstd_level",
                                                "br_level", "gzip_level")):
        return None  # an invalid key, already reported
    return config(encodings=tuple(encodings), min_length=values["min_length"],
                  types=tuple(dict.fromkeys(t.encode("ascii") for t in values["types"])),
                  zstd_level=values["zstd_level"], br_level=values["br_level"],
                  gzip_level=values["gzip_level"])
