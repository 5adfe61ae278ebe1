"""Header transforms, config half: `request_headers` edits the request sent upstream,
`response_headers` the response sent to the client (runtime half: core/filters.pyx).

    request_headers = { set = { X-Env = "prod" }, add = { Via = "edge" }, remove = ["Cookie"] }

`set` replaces every value of a name with one, `add` appends values and keeps those already
there, `remove` drops every value; names match case-insensitively, and each name may appear
once in a transform. Values are plain strings for now (templates come with routing).
Headers the proxy itself manages cannot be touched: the table below says why, and
docs/http.md (Header transforms) says it for users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fastproxy.config.schema import (OFF, TABLE, HeaderName, Headers, HeaderValue, Invalid, Key, ListOf,
                                     Section, quote_key)

from .base import Filter, Phase

_HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade")

# lower-case name -> why a transform may not touch it; {verb} is "set", "added" or "removed"
_REQUEST_MANAGED: Dict[str, str] = {
    **{name: "hop-by-hop header cannot be {verb}" for name in _HOP_BY_HOP},
    "content-length": "cannot be {verb}: fastproxy frames the body it sends",
    "host": "cannot be {verb}: the upstream gets the Host the client sent, which the route matched "
            "(setting it may come with routing templates)",
    "expect": "cannot be {verb}: fastproxy answers Expect itself and never forwards it",
    "x-request-id": "cannot be {verb}: fastproxy sets it (the request id of logs and error bodies)",
    "x-forwarded-for": "cannot be {verb}: fastproxy sets it (the client's address appended)",
    "x-forwarded-proto": "cannot be {verb}: fastproxy sets it",
    "x-forwarded-host": "cannot be {verb}: fastproxy sets it",
}
# Host, Expect and X-Forwarded-* are end to end in a response (passed as received), so
# they may be edited there.
_RESPONSE_MANAGED: Dict[str, str] = {
    **{name: "hop-by-hop header cannot be {verb}" for name in _HOP_BY_HOP},
    "content-length": "cannot be {verb}: fastproxy frames the body it sends",
    "x-request-id": "cannot be {verb}: fastproxy sets it (the request id of logs and error bodies)",
    "server": "cannot be {verb}: main.server_header sets it (main.pass_server_header keeps the upstream's)",
    "date": "cannot be {verb}: fastproxy passes the upstream's Date, or adds one",
}


def _refuse(managed: Dict[str, str], verb: str):
    def refuse(name: str) -> Optional[str]:
        reason = managed.get(name.lower())
        return reason.format(verb=verb) if reason else None
    return refuse


# Why a local answer (`respond.headers`) may not carry a name: the same rules as a response
# transform's `set` (fastproxy writes these on every response it sends).
refuse_in_response = _refuse(_RESPONSE_MANAGED, "set")


@dataclass(frozen=True)
class HeaderTransform(Filter):
    set: Tuple[Tuple[bytes, bytes], ...]  # (name, value): every value of the name replaced by this one
    add: Tuple[Tuple[bytes, bytes], ...]  # (name, value): appended; a name may come more than once
    remove: Tuple[bytes, ...]  # names whose every value is dropped


@dataclass(frozen=True)
class RequestHeaders(HeaderTransform):
    name = "request_headers"
    priority = 100  # late on the way in: after the filters that decide whether a request passes
    phases = frozenset({Phase.REQUEST_HEADERS})
    runtime = "request_headers"
    upstream_only = True
    doc = "Edit the headers of the request sent upstream; see below. Only on a route with `upstream`."


@dataclass(frozen=True)
class ResponseHeaders(HeaderTransform):
    name = "response_headers"
    priority = 2000  # response phases run in reverse: the last word on the response
    phases = frozenset({Phase.RESPONSE_HEADERS})
    runtime = "response_headers"
    doc = "Edit the headers of the response sent to the client; see below."


def _section(config, managed: Dict[str, str], doc: str) -> Section:
    return Section(config.name, f"[[routes]].{config.name}", TABLE, OFF, (
        Key("set", Headers(HeaderName(_refuse(managed, "set")), HeaderValue()), None,
            "Headers to send with exactly this value, replacing every value the message had."),
        Key("add", Headers(HeaderName(_refuse(managed, "added")),
                           ListOf(HeaderValue(), "string or array of strings", single=True),
                           "table of header name = string or array of strings"), None,
            "Values to append, keeping those the message had; an array adds several."),
        Key("remove", ListOf(HeaderName(_refuse(managed, "removed")), "array of header names"), None,
            "Headers to drop, every value."),
    ), doc)


REQUEST_SECTION = _section(RequestHeaders, _REQUEST_MANAGED, (
    "Edits of the request headers sent upstream, e.g. `request_headers = { set = { X-Env = \"prod\" }, "
    "remove = [\"Cookie\"] }` (see http.md, Header transforms)."))
RESPONSE_SECTION = _section(ResponseHeaders, _RESPONSE_MANAGED, (
    "Edits of the response headers sent to the client: on the upstream's responses and on the route's "
    "`respond` answers, not on fastproxy's own error responses (see http.md, Header transforms)."))


def compile_transform(config, values: dict) -> Optional[HeaderTransform]:
    """The compiled transform (`config` is its class) from its checked keys; None when empty."""
    set_, add, remove = values.get("set") or (), values.get("add") or (), values.get("remove") or ()
    named = [(f".set.{quote_key(name)}", name) for name, _ in set_]
    named += [(f".add.{quote_key(name)}", name) for name, _ in add]
    named += [(f".remove[{index}]", name) for index, name in enumerate(remove)]
    first, problems = {}, []
    for where, name in named:
        seen = first.setdefault(name.lower(), where)
        if seen != where:
            problems.append((where, f"{name} is also in {seen[1:]}: a transform names each header once "
                                    f"(set replaces its values, add appends, remove drops them)"))
    if problems:
        raise Invalid(problems=problems)
    if not named:
        return None  # an empty table: nothing to do, no filter
    return config(set=tuple((name.encode("ascii"), value.encode()) for name, value in set_),
                  add=tuple((name.encode("ascii"), value.encode()) for name, values in add for value in values),
                  remove=tuple(name.encode("ascii") for name in remove))
