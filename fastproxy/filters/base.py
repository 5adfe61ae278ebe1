"""Phases and the filter contract.

A feature (authentication, rate limiting, caching, compression, ...) is a filter: a
config half in Python (its schema and compile step, run once per reload) and, where it
runs per request, a runtime half in Cython. A filter declares the phases it hooks and a
priority; each route compiles one tuple per phase holding only the filters that use it,
so a route with no filters carries only empty tuples and takes the bare fast path.

Request-side phases run filters in priority order (highest first); response-side phases
run them in reverse, so the first filter to see the request is the last to see the
response (as in Kong and Envoy). A hook answers CONTINUE, RESPOND (a local response) or
PAUSE (resumed later). Filters never call each other.
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


class Filter:
    """Base of a filter's compiled, per-route instance (frozen once built)."""

    name: str = ""
    priority: int = 0  # higher runs earlier on the request side
    phases: FrozenSet[Phase] = frozenset()


def compile_phases(filters) -> tuple:
    """One tuple per Phase, in run order, holding the filters that hook it."""
    ordered = sorted(filters, key=lambda f: (-f.priority, f.name))
    return tuple(
        tuple(reversed([f for f in ordered if phase in f.phases])) if phase in RESPONSE_PHASES
        else tuple(f for f in ordered if phase in f.phases)
        for phase in Phase
    )
