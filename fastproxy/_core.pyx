# cython: language_level=3
"""fastproxy's compiled core: everything that runs once per request or per byte.

One extension module made of the parts in fastproxy/core/, included in dependency
order (the way uvloop's loop.pyx includes its parts)."""

include "core/common.pyx"
include "core/zones.pyx"
include "core/metrics.pyx"
include "core/decl.pxi"
include "core/filters.pyx"
include "core/compress.pyx"
include "core/router.pyx"
include "core/path.pyx"
include "core/static.pyx"
include "core/accesslog.pyx"
include "core/consumer.pyx"
include "core/balance.pyx"
include "core/upstream.pyx"
include "core/http.pyx"
include "core/tls.pyx"
include "core/stream.pyx"
include "core/subrequest.pyx"
include "core/f_mirror.pyx"
include "core/context.pyx"


def versions():
    """Versions of the libraries the core runs on (fastproxy --version)."""
    from importlib.metadata import version
    return {name: version(name) for name in ("httptools", "uvloop", "setproctitle", "zstandard", "brotli")}
