"""Route handlers: what answers a request that the route's filters let through.

A route sets exactly one handler key. Each handler type brings that key (its kind and doc,
so `fastproxy -t` checks it and docs/config.md documents it), its checks against the rest
of the config, and its build step into a compiled handler of config/runtime.py, whose
`runtime` names the class that runs it in the core (`HANDLER_CLASSES` in core/filters.pyx;
`proxy` is the core's own path upstream). Adding a handler (static files, redirects, mocks,
aggregation) is one entry in HANDLERS and nothing else here or in compile.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from fastproxy.filters.headers import refuse_in_response

from . import static
from .runtime import Proxy, Respond
from .schema import RESPOND, Key, Report, String, Table, did_you_mean, quote_key


@dataclass(frozen=True)
class HandlerType:
    key: Key  # its key in [[routes]]
    # (value, key path, the whole checked tree, report): rules against the rest of the config
    check: Callable[[object, str, dict, Report], None]
    # (checked value, the route's checked keys, the whole checked tree) -> compiled handler
    # (config/runtime.py)
    build: Callable[[object, dict, dict], object]
    sends_upstream: bool  # filters that only edit what goes upstream make sense with it


def check_upstream(name: str, where: str, tree: dict, report: Report) -> None:
    upstreams = tree.get("upstreams") or {}
    if name not in upstreams:
        known = did_you_mean(name, upstreams) or (
            f" (defined: {', '.join(sorted(upstreams))})" if upstreams else " (no [upstreams.NAME] is defined)")
        report(where, f"unknown upstream '{name}'{known}")


def _check_respond(respond: dict, where: str, tree: dict, report: Report) -> None:
    for name, _ in respond.get("headers") or ():
        reason = refuse_in_response(name)
        if reason:
            report(f"{where}.headers.{quote_key(name)}", reason)
    if respond.get("body") and "status" in respond and (respond["status"] < 200 or respond["status"] in (204, 304)):
        report(f"{where}.body", f"a {respond['status']} response cannot have a body")


def _build_respond(respond: dict, route: dict, tree: dict) -> Respond:
    return Respond(status=respond["status"], body=respond["body"].encode(),
                   headers=tuple((name.encode("ascii"), value.encode()) for name, value in respond["headers"]),
                   delay=respond["delay"])


HANDLERS: Tuple[HandlerType, ...] = (
    HandlerType(Key("upstream", String(), None, "Name of the `[upstreams.NAME]` to proxy to (a route sets exactly "
                    "one handler: `upstream`, `respond` or `static`)."),
                check_upstream, lambda name, route, tree: Proxy(name), sends_upstream=True),
    HandlerType(Key("respond", Table(RESPOND), None, "Answer locally instead; see below."),
                _check_respond, _build_respond, sends_upstream=False),
    HandlerType(Key("static", Table(static.SECTION), None, "Serve files from a directory; see below and "
                    "docs/static.md."),
                static.check, static.build, sends_upstream=False),
)
_NAMES = ", ".join(f"'{h.key.name}'" for h in HANDLERS[:-1]) + f" and '{HANDLERS[-1].key.name}'"


def route_keys() -> Tuple[Key, ...]:
    return tuple(handler.key for handler in HANDLERS)


def _set(route: dict):
    return [h for h in HANDLERS if route.get(h.key.name) is not None]


def check_route(route: dict, where: str, tree: dict, filters: tuple, report: Report) -> None:
    """Exactly one handler (unless a handler key was invalid: already reported), its own
    checks, and no filter that only acts upstream on a route that sends nothing there."""
    chosen = _set(route)
    if len(chosen) > 1:
        report(where, f"set exactly one of {_NAMES} (several are set: "
                      f"{', '.join(h.key.name for h in chosen)})")
    elif not chosen and all(h.key.name in route for h in HANDLERS):
        report(where, f"set exactly one of {_NAMES}")
    for handler in chosen:
        handler.check(route[handler.key.name], f"{where}.{handler.key.name}", tree, report)
        if not handler.sends_upstream:
            for compiled in filters:
                if compiled.upstream_only:
                    report(f"{where}.{compiled.name}", f"has no effect on a route that answers with "
                                                       f"`{handler.key.name}` (nothing is sent upstream)")


def route_handler(route: dict, tree: dict) -> Optional[object]:
    """The compiled handler of a route that check_route passed."""
    handler = _set(route)[0]
    return handler.build(route[handler.key.name], route, tree)
