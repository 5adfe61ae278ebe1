"""Phases and the filter contract (config half; docs/extending.md has the whole picture).

A feature (header edits, authentication, rate limiting, compression, ...) is a filter: a
config half in Python (its schema and compile step, run once per reload) and, where it
runs per request, a runtime half in Cython (fastproxy/core/filters.pyx). A filter declares
the phases it hooks and a priority; each route compiles one tuple per phase holding only
the filters that use it, so a route with no filters carries only empty tuples and takes the
bare fast path.

Request-side phases run filters in priority order (highest first); response-side phases
run them in reverse, so the first filter to see the request is the last to see the
response (as in Kong and Envoy). A hook answers CONTINUE, RESPOND (a local response) or
PAUSE (from request_head: wait until the filter calls ex.resume()). Filters never call each
other.
"""
from __future__ import annotations

import enum
from typing import FrozenSet


class Phase(enum.IntEnum):
    ACCEPT = 0
    REQUEST_HEADERS = 1
    REQUEST_BODY = 2
    UPSTREAM = 3
    RESPONSE_HEADERS = 4
    RESPONSE_BODY = 5
    LOG = 6


RESPONSE_PHASES = frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.LOG})
# The phases the core runs hooks for today (all but ACCEPT).
CORE_PHASES = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.UPSTREAM, Phase.RESPONSE_HEADERS,
                         Phase.RESPONSE_BODY, Phase.LOG})


class Filter:
    """Base of a filter's compiled, per-route config (a frozen dataclass once built). The
    class attributes say what the filter is; the dataclass fields, what this route asked."""

    name: str = ""  # its key in [[routes]]
    priority: int = 0  # higher runs earlier on the request side
    phases: FrozenSet[Phase] = frozenset()
    runtime: str = ""  # the key of its runtime class in the core (FILTER_CLASSES in core/filters.pyx)
    upstream_only: bool = False  # it acts only on what is sent upstream: refused on a `respond` route
    doc: str = ""  # the meaning of its key, in the [[routes]] table of docs/config.md
    zones: tuple = ()  # the shared-memory zones it needs (ZoneSpec; docs/extending.md, Zones)
    stateful: bool = False  # it keeps per-request state: its runtime half gets a slot in ex.slots
    main_default: bool = False  # [main] may set it for every route that does not set its own

    def check(self, where: str, tree: dict, report) -> None:
        """Rules against the rest of the config (the upstream it names, ...): report(key path,
        reason) for each problem; `where` is its key's path ("routes[3].mirror")."""


def compile_phases(filters) -> tuple:
    """One tuple per Phase, in run order, holding the filters that hook it."""
    ordered = sorted(filters, key=lambda f: (-f.priority, f.name))
    return tuple(
        tuple(reversed([f for f in ordered if phase in f.phases])) if phase in RESPONSE_PHASES
        else tuple(f for f in ordered if phase in f.phases)
        for phase in Phase
    )
