"""Rules that span several keys, and the build of the frozen Runtime from checked values.

Input is the tree schema.check_tree returns: values already converted, defaults filled in,
bad values left out (so a check here skips what was already reported).
"""
from __future__ import annotations

import os
from typing import Optional

from fastproxy.filters import registry  # a module, not its names: the registry imports schema
from fastproxy.filters.base import compile_phases

from . import handlers, tls, upstreams
from .runtime import AccessLog, Address, Admin, Listener, Main, Route, Runtime
from .schema import SOURCE, Report

_MATCH_KEYS = ("name", "host", "path", "path_prefix", "methods")
_TLS = "__tls__"  # a checked listener's compiled Tls (no key has that name)
_ANY_IP = ("0.0.0.0", "::")


def check_references(tree: dict, report: Report) -> None:
    """Report what no single key can know: overlapping listeners, route handlers and the
    upstreams they name, and route names that clash."""
    _check_listeners(tree, report)
    upstreams.check(tree, report)
    first_with_name = {}
    for index, route in enumerate(tree.get("routes") or ()):
        if route is None:
            continue
        where = f"routes[{index}]"
        _check_route(route, where, tree, report)
        name = route_name(route)
        if name is None:
            continue
        if name in first_with_name:
            used_by = f"routes[{first_with_name[name]}]"
            if route["name"] is None:
                report(where, f"its derived name '{name}' is already used by {used_by}; "
                              f"give one of them a 'name'")
            else:
                report(f"{where}.name", f"'{name}' is already used by {used_by}")
        else:
            first_with_name[name] = index
    for index, listener in enumerate(tree.get("listen") or ()):
        if listener and listener.get("redirect_https") and listener.get("address") is not None:
            name = redirect_route_name(listener["address"])
            if name in first_with_name:
                report(f"routes[{first_with_name[name]}].name", f"'{name}' names listen[{index}]'s redirect")


def _overlap(address: Address, other: Address) -> Optional[str]:
    """Why two listening addresses cannot both be bound, or None if they can."""
    if address.port != other.port or (":" in address.host) != (":" in other.host):
        return None
    if address.host == other.host:
        return "duplicates"
    if address.host in _ANY_IP or other.host in _ANY_IP:
        return "overlaps"
    return None


def _check_listeners(tree: dict, report: Report) -> None:
    bound = []
    base = os.path.dirname(tree[SOURCE])
    for index, listener in enumerate(tree.get("listen") or ()):
        if listener is not None:
            # the SSL contexts are built here, once, and kept in the checked tree for build_runtime
            listener[_TLS] = tls.build(listener, f"listen[{index}]", base, report)
        address = (listener or {}).get("address")
        if address is None:
            continue
        for other_index, other in bound:
            clash = _overlap(address, other)
            if clash:
                report(f"listen[{index}].address", f"{address} {clash} listen[{other_index}].address ({other})")
                break
        bound.append((index, address))
    admin = (tree.get("admin") or {}).get("listen")
    for other_index, other in bound if admin else ():
        clash = _overlap(admin, other)
        if clash:
            report("admin.listen", f"{admin} {clash} listen[{other_index}].address ({other})")
            break


def _check_route(route: dict, where: str, tree: dict, report: Report) -> None:
    if route.get("path") is not None and route.get("path_prefix") is not None:
        report(where, "set at most one of 'path' and 'path_prefix'")
    filters = registry.route_filters(route)
    handlers.check_route(route, where, tree, filters, report)
    for compiled in filters:
        compiled.check(f"{where}.{compiled.name}", tree, report)


def route_name(route: dict) -> Optional[str]:
    """The route's name: its own, or one derived from what it matches ("GET example.com/api/*").
    None when a key it depends on was bad (that problem is already reported)."""
    if any(key not in route for key in _MATCH_KEYS):
        return None
    if route["name"] is not None:
        return route["name"]
    name = route["path"] or (route["path_prefix"] or "/") + "*"
    if route["host"]:
        name = ",".join(dict.fromkeys(route["host"])) + name
    if route["methods"]:
        name = ",".join(dict.fromkeys(route["methods"])) + " " + name
    return name


def _file(path: Optional[str], base: str, *special: str) -> Optional[str]:
    """A file path made absolute against the config file's directory, so it means the same
    whatever directory the master runs in."""
    return path if path is None or path in special else os.path.join(base, path)


def _ascii(text: Optional[str]) -> Optional[bytes]:
    return None if text is None else text.encode("ascii")


def redirect_route_name(address: Address) -> str:
    return f"redirect_https {address}"


def _redirect_route(listener: dict, main: dict) -> Optional[Route]:
    """A redirect_https listener's own route: every request on it, whatever its host or path."""
    handler = tls.redirect(listener["redirect_https"])
    if handler is None:
        return None
    return Route(name=redirect_route_name(listener["address"]), hosts=(), path=None, path_prefix=None,
                 methods=(), handler=handler, max_body_size=main["max_body_size"],
                 max_header_size=main["max_header_size"], phases=compile_phases(()))


def build_runtime(tree: dict, source: str) -> Runtime:
    """The Runtime of a tree in which check_tree and check_references found nothing wrong."""
    source = os.path.abspath(source)
    base = os.path.dirname(source)
    main, log, admin = tree["main"], tree["access_log"], tree["admin"]
    main_filters = {key.name for key in registry.main_keys()}  # defaults the routes took
    routes = tuple(Route(
        name=route_name(route),
        hosts=tuple(dict.fromkeys(host.encode("ascii") for host in route["host"] or ())),
        path=_ascii(route["path"]),
        path_prefix=_ascii(route["path_prefix"]),
        methods=tuple(dict.fromkeys(method.encode("ascii") for method in route["methods"] or ())),
        handler=handlers.route_handler(route, tree),
        max_body_size=main["max_body_size"] if route["max_body_size"] is None else route["max_body_size"],
        max_header_size=main["max_header_size"] if route["max_header_size"] is None else route["max_header_size"],
        phases=compile_phases(registry.route_filters(route, main)),
    ) for route in tree["routes"])
    listeners = tuple(Listener(listener["address"], listener["backlog"], listener["deferred"], listener[_TLS],
                               _redirect_route(listener, main))
                      for listener in tree["listen"])
    tls.keep_fronts(listeners)
    return Runtime(
        source=source,
        main=Main(**{**{key: value for key, value in main.items() if key not in main_filters},
                     "pid_file": _file(main["pid_file"], base),
                     "error_log": _file(main["error_log"], base, "stderr"),
                     "server_header": main["server_header"].encode()}),
        access_log=AccessLog(path=_file(log["path"], base, "stdout", "off"), format=log["format"],
                             buffer_size=log["buffer"], flush_interval=log["flush"]),
        admin=Admin(admin["listen"]) if admin else None,
        listeners=listeners,
        upstreams=tuple(upstreams.build(name, upstream) for name, upstream in tree["upstreams"].items()),
        routes=routes,
    )
